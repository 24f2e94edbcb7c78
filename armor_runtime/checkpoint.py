"""Save and load Hugging Face-style ARMOR checkpoints.

A checkpoint is a ``save_pretrained`` directory whose config.json carries::

    quantization_config = {"quant_method": "armor", "format_version": 1,
                           "block_size": {"default": [b_out, b_in], "layers": {name: [b_out, b_in]}},
                           "sparsity_structure": "2:4", "targets": [...], "ignore": [...],
                           "solver": {...settings of the pruning run...}}

and whose safetensors shards hold, per pruned layer ``p``, ``p.a``, ``p.values``,
``p.meta``, ``p.b`` (+ ``p.bias``); everything else (embeddings, norms,
``lm_head``) stays dense. config.json also sets ``transformers_weights`` to
``UNLOADABLE_GUARD``, a name transformers rejects: a transformers that does not
know "armor" only warns about an unknown quant_method and would load the model
with random projections; the guard makes it raise instead. ``import
armor_runtime`` registers the quantizer, which clears the guard during loading.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from torch import nn

from armor_kernels import FORMAT_VERSION

from .linear import ArmorLinear
from .targets import is_target

QUANT_METHOD = "armor"
# Not a *.safetensors name on purpose: transformers raises on it, quoting it (see the module docstring).
UNLOADABLE_GUARD = "ARMOR checkpoint: run `import armor_runtime` before from_pretrained to load it"
# Small enough that a SmolLM2-135M checkpoint (~150 MB) is sharded; tests pass smaller values.
DEFAULT_MAX_SHARD_SIZE = "100MB"


def quantization_config(model: nn.Module, solver_settings: dict | None = None) -> dict:
    """The ``quantization_config`` describing the ArmorLinear layers of ``model``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ArmorLinear)}
    if not layers:
        raise ValueError("model has no ArmorLinear layer: convert it first (armor_runtime.convert.convert_model)")
    sizes = {name: [m.block_out, m.block_in] for name, m in layers.items()}
    default = list(Counter(tuple(s) for s in sizes.values()).most_common(1)[0][0])
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    # linears that match the targets by name but stayed dense must be named, or loading would expect them packed
    ignore = sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(name, targets)
    )
    if solver_settings is None:  # re-saving a loaded checkpoint keeps the record of how it was pruned
        old = getattr(getattr(model, "config", None), "quantization_config", None)
        solver_settings = old.get("solver") if isinstance(old, dict) else getattr(old, "solver", None)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "block_size": {"default": default, "layers": {n: s for n, s in sizes.items() if s != default}},
        "sparsity_structure": "2:4",
        "targets": targets,
        "ignore": ignore,
        "solver": dict(solver_settings or {}),
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is replaced only once ``tmp`` is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _edit_config(folder: Path, update: dict, remove: tuple[str, ...] = ()) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in remove:
        cfg.pop(key, None)
    cfg.update(update)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _drop_foreign_quantizer(model) -> None:
    """A model loaded from GGUF keeps transformers' gguf quantizer although its weights are dequantized;
    transformers refuses to save such a model, so the stale quantizer is removed. Other methods raise."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    qm = getattr(quantizer.quantization_config, "quant_method", "")
    method = getattr(qm, "value", qm)  # transformers' methods are str enums
    if method == QUANT_METHOD:
        return
    if method == "gguf":
        quantizer.remove_quantization_config(model)
        return
    raise ValueError(
        f"model: its non-pruned layers are quantized with {method!r}; an ARMOR checkpoint stores them "
        "dense (load the model unquantized before pruning)"
    )


def save_pretrained(
    model,
    out_dir,
    tokenizer=None,
    solver_settings: dict | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` (with ArmorLinear layers) as an ARMOR checkpoint directory, atomically.

    Everything goes to a temporary sibling directory first, which replaces
    ``out_dir`` only when complete.
    """
    qc = quantization_config(model, solver_settings)
    _drop_foreign_quantizer(model)
    return _save_atomically(
        model, out_dir, tokenizer, max_shard_size,
        lambda tmp: _edit_config(tmp, {"quantization_config": qc, "transformers_weights": UNLOADABLE_GUARD}),
    )


def _save_atomically(model, out_dir, tokenizer, max_shard_size, edit_config) -> Path:
    """``save_pretrained`` into a temporary sibling, edit its config, then rename it into place."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        edit_config(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_pretrained(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with the "armor" method registered.

    Keyword arguments go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoModelForCausalLM

    from . import register_with_transformers

    register_with_transformers()
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def is_armor_checkpoint(path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def export_dense(model, out_dir, tokenizer=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a plain checkpoint: every ArmorLinear becomes an ``nn.Linear`` holding ``W_hat``.

    Layers are swapped one at a time (the model is modified in place); the
    quantization_config and the loading guard are removed from config.json.
    """
    from .convert import dense_layer

    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, ArmorLinear)]:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, dense_layer(layer))
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    for attr in ("quantization_config", "transformers_weights"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return _save_atomically(
        model, out_dir, tokenizer, max_shard_size,
        lambda tmp: _edit_config(tmp, {}, remove=("quantization_config", "transformers_weights")),
    )
