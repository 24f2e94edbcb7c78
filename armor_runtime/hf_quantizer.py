"""The "armor" quantization method for transformers' ``from_pretrained``.

Importing this module needs transformers; ``armor_runtime`` imports it only once
transformers' quantizer registry is loaded (see ``armor_runtime.__init__``).

Loading an ARMOR checkpoint:

1. ``update_attn_implementation`` (runs before the weight files are looked up)
   clears the ``transformers_weights`` guard that ``checkpoint.save_pretrained``
   writes into config.json (a deliberately unloadable name, so a transformers
   without this quantizer refuses the checkpoint instead of loading garbage);
2. ``_process_model_before_weight_loading`` checks format_version, reads every
   shard's header (a truncated shard fails here, naming the file), checks that
   each target layer's tensors are present with the right shapes, and swaps the
   target ``nn.Linear`` modules (still on the meta device) for ``ArmorLinear``;
3. transformers copies the tensors into the ArmorLinear buffers (no dense weight
   is ever built);
4. ``_process_model_after_weight_loading`` validates every layer (2:4 metadata,
   finite values), naming the file and tensor, then lets the backends build their
   layouts (``dispatch.prepare``) and puts the guard back into the config.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from armor_kernels import FORMAT_VERSION, ArmorFormatError

from .checkpoint import UNLOADABLE_GUARD
from .linear import ArmorLinear
from .targets import is_target

QUANT_METHOD = "armor"


class ArmorCheckpointError(ValueError):
    """An ARMOR checkpoint is broken or unsupported; the message names the file and the tensor."""


class ArmorConfig(QuantizationConfigMixin):
    """``quantization_config`` of an ARMOR checkpoint (config.json)."""

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        block_size: dict | list | int | None = None,
        sparsity_structure: str = "2:4",
        targets: list[str] | tuple[str, ...] = (),
        ignore: list[str] | tuple[str, ...] = (),
        solver: dict | None = None,
        **extra,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.block_size = block_size
        self.sparsity_structure = sparsity_structure
        self.targets = list(targets)
        self.ignore = list(ignore)
        self.solver = dict(solver or {})
        extra.pop("quant_method", None)
        for key, value in extra.items():  # keys written by newer versions are kept, not dropped
            setattr(self, key, value)

    def layer_block_size(self, name: str) -> tuple[int | None, int | None]:
        """(block_out, block_in) for layer ``name``; None where the layer's default choice applies."""
        bs = self.block_size
        if isinstance(bs, dict):
            per_layer = (bs.get("layers") or {}).get(name)
            bs = per_layer if per_layer is not None else bs.get("default")
        if bs is None:
            return None, None
        if isinstance(bs, int):
            return bs, bs
        return int(bs[0]), int(bs[1])


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
        if qc.format_version != FORMAT_VERSION:
            raise ArmorCheckpointError(
                f"{where}: quantization_config.format_version = {qc.format_version!r} is not supported "
                f"(this armor_runtime reads format_version {FORMAT_VERSION}); upgrade armor-sparse or re-export"
            )
        if qc.sparsity_structure != "2:4":
            raise ArmorCheckpointError(
                f"{where}: quantization_config.sparsity_structure = {qc.sparsity_structure!r}; only '2:4' is supported"
            )
        headers = _read_headers(files)
        self.key_files = {key: path for key, (path, _, _) in headers.items()}
        dtype = dtype or torch.get_default_dtype()
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or not is_target(name, qc.targets, qc.ignore):
                continue
            block_out, block_in = qc.layer_block_size(name)
            try:
                layer = ArmorLinear(
                    module.in_features, module.out_features, bias=module.bias is not None,
                    block_out=block_out, block_in=block_in, dtype=dtype, device="meta",
                )
            except ArmorFormatError as e:
                raise ArmorCheckpointError(f"{where}: block_size of layer {name}: {e}") from None
            if files:  # transformers < 5 does not pass the files: the post-load checks still run
                _check_layer_tensors(name, layer, headers, files)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)
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


def register() -> None:
    """Add "armor" to transformers' quantizer and quantization-config registries (idempotent)."""
    hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = ArmorConfig
    hf_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = ArmorHfQuantizer


register()
