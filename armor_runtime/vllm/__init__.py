"""Serve ARMOR checkpoints with vLLM: an out-of-tree quantization plugin (quant_method "armor").

Installed with this package as the ``vllm.general_plugins`` entry point ``armor``, which vLLM
calls in every process it starts (front end, engine core, workers); ``register`` is idempotent.
A checkpoint written by ``armor prune`` loads unchanged: ``vllm serve <checkpoint>`` or
``vllm.LLM(<checkpoint>)``. Only ``plugin`` imports vLLM, so ``import armor_runtime.vllm``
(and ``sharding``, the tensor-parallel rules) work without it.
"""

from __future__ import annotations

from ..checkpoint import QUANT_METHOD  # the one definition; re-exported for the plugin

__all__ = ["QUANT_METHOD", "register"]


def register() -> None:
    """Register quant_method "armor" with vLLM (a no-op when already registered by this plugin)."""
    from . import plugin

    plugin.register()
