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

Writes go through ``armor_solver.outputs`` (the one place that decides whether
a directory may be written, with a lock and a save that never loses data).
Loading keeps the stored dtype unless ``dtype=`` asks for another.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from torch import nn

from armor_kernels import FORMAT_VERSION
from armor_solver import outputs
from armor_solver.targets import is_target

from .linear import ArmorLinear

QUANT_METHOD = "armor"
# Not a *.safetensors name on purpose: transformers raises on it, quoting it (see the module docstring).
UNLOADABLE_GUARD = "ARMOR checkpoint: run `import armor_runtime` before from_pretrained to load it"
# None: transformers' own default (50GB in transformers 5); --max-shard-size or max_shard_size= asks for smaller shards.
DEFAULT_MAX_SHARD_SIZE = None


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


# quantization_config keys: every one is required except "solver" (the record of how it was pruned)
CONFIG_KEYS = ("quant_method", "format_version", "block_size", "sparsity_structure", "targets", "ignore", "solver")
OPTIONAL_KEYS = ("solver",)


class QuantizationConfigError(ValueError):
    """config.json's quantization_config breaks the format; the message names the file and the key."""


def _pair(value, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise QuantizationConfigError(f"{where} = {value!r}: expected [block_out, block_in] (positive integers) or one integer")
    return int(value[0]), int(value[1])


def check_quantization_config(qc, where: str = "config.json") -> dict:
    """Validate an ARMOR ``quantization_config`` dict; -> ``{"default": (bo, bi) | None, "layers": {name: (bo, bi)}}``.

    Refuses (naming ``where`` and the key) a missing or unknown key, a format_version this code does not
    read, a structure other than 2:4, malformed targets/ignore (lists of strings, targets not empty) and a
    block_size that is not ``int | [b_out, b_in] | {"default": ..., "layers": {name: ...}}``.
    """
    key = f"{where}: quantization_config"
    if not isinstance(qc, dict):
        raise QuantizationConfigError(f"{key}: expected a JSON object, got {type(qc).__name__}")
    unknown = sorted(set(qc) - set(CONFIG_KEYS))
    if unknown:
        raise QuantizationConfigError(
            f"{key}.{unknown[0]}: unknown key (this armor_runtime reads {', '.join(CONFIG_KEYS)}); "
            "was the checkpoint written by a newer version?")
    missing = [k for k in CONFIG_KEYS if k not in qc and k not in OPTIONAL_KEYS]
    if missing:
        raise QuantizationConfigError(f"{key}.{missing[0]}: missing; an ARMOR checkpoint records {', '.join(CONFIG_KEYS[:-1])}")
    if qc["quant_method"] != QUANT_METHOD:
        raise QuantizationConfigError(f"{key}.quant_method = {qc['quant_method']!r}: expected {QUANT_METHOD!r}")
    if qc["format_version"] != FORMAT_VERSION or isinstance(qc["format_version"], bool):
        raise QuantizationConfigError(
            f"{key}.format_version = {qc['format_version']!r} is not supported (this armor_runtime reads "
            f"format_version {FORMAT_VERSION}); upgrade armor-sparse or re-export")
    if qc["sparsity_structure"] != "2:4":
        raise QuantizationConfigError(f"{key}.sparsity_structure = {qc['sparsity_structure']!r}; only '2:4' is supported")
    for name in ("targets", "ignore"):
        v = qc[name]
        if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t for t in v):
            raise QuantizationConfigError(f"{key}.{name} = {v!r}: expected a list of module names or patterns")
    if not qc["targets"]:
        raise QuantizationConfigError(f"{key}.targets is empty: it must name the pruned projections")
    if "solver" in qc and qc["solver"] is not None and not isinstance(qc["solver"], dict):
        raise QuantizationConfigError(f"{key}.solver = {qc['solver']!r}: expected a JSON object")
    bs = qc["block_size"]
    if isinstance(bs, dict):
        extra = sorted(set(bs) - {"default", "layers"})
        if extra:
            raise QuantizationConfigError(f"{key}.block_size.{extra[0]}: unknown key (expected default, layers)")
        default = None if bs.get("default") is None else _pair(bs["default"], f"{key}.block_size.default")
        layers = bs.get("layers") or {}
        if not isinstance(layers, dict):
            raise QuantizationConfigError(f"{key}.block_size.layers = {layers!r}: expected {{layer name: [b_out, b_in]}}")
        per_layer = {n: _pair(v, f"{key}.block_size.layers[{n!r}]") for n, v in layers.items()}
        return {"default": default, "layers": per_layer}
    return {"default": _pair(bs, f"{key}.block_size"), "layers": {}}


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
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    may_replace=outputs.holds_checkpoint,
) -> Path:
    """Write ``model`` (with ArmorLinear layers) as an ARMOR checkpoint directory, atomically.

    ``out_dir`` must be new, empty, or accepted by ``may_replace(path) -> None | why not`` (default: it
    holds an earlier checkpoint and nothing else); see ``armor_solver.outputs`` for the other refusals.
    The new checkpoint replaces ``out_dir`` only once it is complete.
    """
    qc = quantization_config(model, solver_settings)
    _drop_foreign_quantizer(model)
    return _save_atomically(
        model, out_dir, tokenizer, max_shard_size,
        lambda tmp: _edit_config(tmp, {"quantization_config": qc, "transformers_weights": UNLOADABLE_GUARD}),
        may_replace,
    )


def _model_source(model) -> list[str]:
    """The local directory ``model`` was loaded from, if any (never to be written)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    return [name] if name and Path(name).exists() else []


def _save_atomically(model, out_dir, tokenizer, max_shard_size, edit_config, may_replace) -> Path:
    """``save_pretrained`` into a temporary sibling, edit its config, then put it in place (``outputs.publish``)."""

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        edit_config(tmp)

    with outputs.claim(out_dir, what="output directory", sources=_model_source(model), may_replace=may_replace) as c:
        return outputs.publish(c.path, build)


def load_pretrained(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with the "armor" method registered.

    Keyword arguments go to ``from_pretrained`` (``dtype``, ``device_map``, ...). Without ``dtype`` the
    stored dtype is kept; ``trust_remote_code`` is False unless given.
    """
    from transformers import AutoModelForCausalLM

    from . import register_with_transformers

    register_with_transformers()
    if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
        kwargs["dtype"] = "auto"
    kwargs.setdefault("trust_remote_code", False)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def is_armor_checkpoint(path) -> bool:
    """True when ``path/config.json`` names quant_method "armor"; invalid JSON raises naming the file."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def export_dense(
    model, out_dir, tokenizer=None, max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    may_replace=outputs.holds_checkpoint,
) -> Path:
    """Write a plain checkpoint: every ArmorLinear becomes an ``nn.Linear`` holding ``W_hat`` (in the layer's dtype).

    Layers are swapped one at a time (the model is modified in place); the
    quantization_config and the loading guard are removed from config.json.
    ``out_dir`` follows the rules of ``save_pretrained``.
    """
    # claimed first, so that a refused out_dir leaves the model untouched
    with outputs.claim(out_dir, what="output directory", sources=_model_source(model), may_replace=may_replace):
        return _export_dense(model, out_dir, tokenizer, max_shard_size, may_replace)


def _export_dense(model, out_dir, tokenizer, max_shard_size, may_replace) -> Path:
    from .convert import dense_layer

    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, ArmorLinear)]:
        model.set_submodule(name, dense_layer(layer))
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
        may_replace,
    )
