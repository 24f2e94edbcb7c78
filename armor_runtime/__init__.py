"""ARMOR runtime: ArmorLinear, model conversion, checkpoints and the ``armor`` command."""
