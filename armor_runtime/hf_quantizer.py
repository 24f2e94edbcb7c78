"""The "armor" quantization method for transformers' ``from_pretrained``.

Importing this module needs transformers; ``armor_runtime`` imports it only once
transformers' quantizer registry is loaded (see ``armor_runtime.__init__``).

Loading an ARMOR checkpoint:

1. ``update_attn_implementation`` (runs before the weight files are looked up)
   clears the ``transformers_weights`` guard that ``checkpoint.save_pretrained``
   writes into config.json (a deliberately unloadable name, so a transformers
   without this quantizer refuses the checkpoint instead of loading garbage);
2. ``_process_model_before_weight_loading`` checks the quantization_config
   (``checkpoint.check_quantization_config``: every key present and known,
   format_version, targets, ignore, block_size), reads every shard's header (a
   truncated shard fails here, naming the file), swaps the target
   ``nn.Linear`` modules (still on the meta device) for ``ArmorLinear`` in the
   loading dtype, and checks that the shards and the model agree exactly: each
   ARMOR layer's tensors present with the right shapes, every layer the config
   names present, every tensor of the shards consumed, no tensor of the model
   missing (tied weights aside);
3. transformers copies the tensors into the ArmorLinear buffers (no dense weight
   is ever built);
4. ``_process_model_after_weight_loading`` validates every layer (2:4 metadata,
   finite values), naming the file and tensor, then lets the backends build their
   layouts (``dispatch.prepare``) and puts the guard back into the config.
"""

from __future__ import annotations

import fnmatch
import os
import re

import torch
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from armor_kernels import ArmorFormatError
from armor_solver.targets import is_target

from .checkpoint import QUANT_METHOD, UNLOADABLE_GUARD, QuantizationConfigError, check_quantization_config
from .linear import ArmorLinear


class ArmorCheckpointError(ValueError):
    """An ARMOR checkpoint is broken or unsupported; the message names the file and the tensor."""


class ArmorConfig(QuantizationConfigMixin):
    """``quantization_config`` of an ARMOR checkpoint (config.json)."""

    def __init__(
        self,
        format_version: int | None = None,
        block_size: dict | list | int | None = None,
        sparsity_structure: str | None = None,
        targets: list[str] | tuple[str, ...] | None = None,
        ignore: list[str] | tuple[str, ...] | None = None,
        solver: dict | None = None,
        **extra,
    ):
        # exactly what config.json holds, checked (naming the file) when a model is loaded
        given = {"format_version": format_version, "block_size": block_size, "sparsity_structure": sparsity_structure,
                 "targets": targets, "ignore": ignore, "solver": solver}
        self._given = {"quant_method": extra.pop("quant_method", QUANT_METHOD),
                       **{k: v for k, v in given.items() if v is not None}, **extra}
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.block_size = block_size
        self.sparsity_structure = sparsity_structure
        self.targets = list(targets or ())
        self.ignore = list(ignore or ())
        self.solver = dict(solver or {})
        for key, value in extra.items():  # kept so that the check can name them
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if not k.startswith("_")}

    def check_config(self, where: str = "config.json") -> dict:
        """``checkpoint.check_quantization_config`` of what config.json held -> the parsed block sizes."""
        return check_quantization_config(dict(self._given), where)

    def layer_block_size(self, name: str) -> tuple[int | None, int | None]:
        """(block_out, block_in) for layer ``name``; None where the layer's default choice applies."""
        sizes = check_quantization_config(dict(self._given))
        bs = sizes["layers"].get(name, sizes["default"])
        return (None, None) if bs is None else bs


class ArmorHfQuantizer(HfQuantizer):
    """Rebuilds pruned layers as ArmorLinear from the packed tensors of an ARMOR checkpoint."""

    requires_calibration = True  # only pre-pruned checkpoints load; pruning is `armor prune`

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.key_files: dict[str, str] = {}  # tensor name -> shard file it came from

    # ---- before the weight files are looked up --------------------------------
    def update_attn_implementation(self, config):
        if getattr(config, "transformers_weights", None) == UNLOADABLE_GUARD:
            config.transformers_weights = None
        return config

    def validate_environment(self, *args, **kwargs):
        return

    # ---- before weights: swap the target linears on the meta device ----------
    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, dtype=None, **kw):
        qc = self.quantization_config
        files = list(checkpoint_files or [])
        where = os.path.join(os.path.dirname(files[0]), "config.json") if files else "config.json"
        try:
            sizes = qc.check_config(where)
        except QuantizationConfigError as e:
            raise ArmorCheckpointError(str(e)) from None
        headers = _read_headers(files)
        self.key_files = {key: path for key, (path, _, _) in headers.items()}
        dtype = dtype or torch.get_default_dtype()
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        swapped = []
        for name, module in linears.items():
            if not is_target(name, qc.targets, qc.ignore):
                continue
            block_out, block_in = sizes["layers"].get(name, sizes["default"] or (None, None))
            try:
                layer = ArmorLinear(
                    module.in_features, module.out_features, bias=module.bias is not None,
                    block_out=block_out, block_in=block_in, dtype=dtype, device="meta",
                )
            except ArmorFormatError as e:
                raise ArmorCheckpointError(f"{where}: quantization_config.block_size of layer {name}: {e}") from None
            if files:  # transformers < 5 does not pass the files: the post-load checks still run
                _check_layer_tensors(name, layer, headers, files)
            model.set_submodule(name, layer)
            swapped.append(name)
        _check_config_names(qc, sizes, linears, swapped, where)
        if files:
            _check_consumed(model, headers, files)
        return model

    # ---- after weights: validate, build kernel layouts ------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, layer in model.named_modules():
            if not isinstance(layer, ArmorLinear):
                continue
            unloaded = [k for k, t in layer.named_buffers() if t.device.type == "meta"]
            if unloaded:
                raise ArmorCheckpointError(f"checkpoint: tensor {name}.{unloaded[0]} was not loaded (missing)")
            try:
                layer.validate(name)
            except ArmorFormatError as e:
                tensor = str(e).split(":", 1)[0]
                raise ArmorCheckpointError(f"{self.key_files.get(tensor, 'checkpoint')}: {e}") from None
            layer.prepare()
        # keep the guard so a plain transformers save of this model still refuses to load without armor
        model.config.transformers_weights = UNLOADABLE_GUARD
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True


def _read_headers(files: list[str]) -> dict[str, tuple[str, list[int], str]]:
    """Tensor name -> (file, shape, dtype) from the shard headers; a broken shard raises naming the file."""
    from safetensors import safe_open

    out = {}
    for path in files:
        if not path.endswith(".safetensors"):
            raise ArmorCheckpointError(f"{path}: ARMOR checkpoints are safetensors shards only")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    s = f.get_slice(key)
                    out[key] = (path, list(s.get_shape()), s.get_dtype())
        except ArmorCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            size = os.path.getsize(path) if os.path.exists(path) else "missing"
            raise ArmorCheckpointError(
                f"{path}: unreadable safetensors shard ({e}); size {size} bytes: truncated or corrupted"
            ) from None
    return out


def _expected_file(key: str, files: list[str]) -> str:
    """The shard the index assigns ``key`` to, else the folder (for error messages)."""
    folder = os.path.dirname(files[0]) if files else "."
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        import json

        with open(index) as f:
            shard = json.load(f).get("weight_map", {}).get(key)
        if shard:
            return os.path.join(folder, shard)
        return index
    return files[0] if len(files) == 1 else folder


def _check_layer_tensors(name: str, layer: ArmorLinear, headers: dict, files: list[str]) -> None:
    expected = {f"{name}.{k}": tuple(t.shape) for k, t in layer.named_buffers() if t is not None}
    for key, shape in expected.items():
        if key not in headers:
            raise ArmorCheckpointError(
                f"{_expected_file(key, files)}: tensor {key} is missing from the checkpoint; "
                f"an ARMOR layer needs {', '.join(k.rsplit('.', 1)[1] for k in expected)}"
            )
        path, got, dt = headers[key]
        if tuple(got) != shape:
            raise ArmorCheckpointError(
                f"{path}: tensor {key} has shape {tuple(got)}, expected {shape} "
                f"(layer {layer.out_features}x{layer.in_features}, blocks {layer.block_out}/{layer.block_in})"
            )
        if key.endswith(".meta") and dt != "U8":
            raise ArmorCheckpointError(f"{path}: tensor {key} has dtype {dt}, the 2:4 metadata must be U8 (uint8)")
    if f"{name}.weight" in headers:
        path = headers[f"{name}.weight"][0]
        raise ArmorCheckpointError(
            f"{path}: tensor {name}.weight is a dense weight of an ARMOR target layer; the checkpoint mixes formats"
        )


def _check_config_names(qc, sizes: dict, linears: dict, swapped: list[str], where: str) -> None:
    """Every name the quantization_config gives must name something of the model."""
    key = f"{where}: quantization_config"
    if not swapped:
        raise ArmorCheckpointError(
            f"{key}.targets = {qc.targets} (ignore {qc.ignore}) selects no linear layer of the model; "
            f"its linears are {', '.join(list(linears)[:6])}{' ...' if len(linears) > 6 else ''}")
    for target in qc.targets:
        if not any(is_target(name, [target]) for name in linears):
            raise ArmorCheckpointError(f"{key}.targets names {target!r}, which matches no linear layer of the model")
    for pattern in qc.ignore:
        if not any(name == pattern or fnmatch.fnmatch(name, pattern) for name in linears):
            raise ArmorCheckpointError(f"{key}.ignore names {pattern!r}, which matches no linear layer of the model")
    for name in sizes["layers"]:
        if name not in swapped:
            raise ArmorCheckpointError(
                f"{key}.block_size.layers names {name!r}, which is not an ARMOR layer of the model "
                "(not a linear, or left dense by targets/ignore)")


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ()
    return set(tied)


def _patterns(model, attr: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model, attr, None) or ())]


def _check_consumed(model, headers: dict, files: list[str]) -> None:
    """The shards hold exactly the model's tensors: none left over, none missing (tied weights aside)."""
    expected = set(model.state_dict().keys())
    ignore_unexpected = _patterns(model, "_keys_to_ignore_on_load_unexpected")
    for key in sorted(set(headers) - expected):
        if any(p.search(key) for p in ignore_unexpected):
            continue
        module = key.rsplit(".", 1)[0]
        hint = (
            f"; {module} is not an ARMOR layer here: quantization_config.targets/ignore leave it dense"
            if key.rsplit(".", 1)[-1] in ("a", "values", "meta", "b") else
            "; the checkpoint is not of this model, or quantization_config.targets/ignore do not match the shards"
        )
        raise ArmorCheckpointError(f"{headers[key][0]}: tensor {key} is not used by the model{hint}")
    ignore_missing = _patterns(model, "_keys_to_ignore_on_load_missing")
    tied = _tied_keys(model)
    for key in sorted(expected - set(headers) - tied):
        if any(p.search(key) for p in ignore_missing):
            continue
        raise ArmorCheckpointError(
            f"{_expected_file(key, files)}: tensor {key} of the model is missing from the checkpoint "
            "(it would be randomly initialized)")


def register() -> None:
    """Add "armor" to transformers' quantizer and quantization-config registries (idempotent)."""
    hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = ArmorConfig
    hf_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = ArmorHfQuantizer


register()
