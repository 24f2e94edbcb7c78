"""ARMOR solver: calibration, pruning methods (ARMOR and baselines), evaluation."""
