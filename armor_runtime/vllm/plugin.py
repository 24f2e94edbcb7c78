"""The vLLM side of the plugin: ``ArmorQuantConfig`` (quant_method "armor") and ``ArmorLinearMethod``.

Loading. vLLM builds the model with its fused layers (``qkv_proj`` = q, k, v; ``gate_up_proj`` =
gate, up) and asks ``get_quant_method(layer, prefix)`` for each linear: layers whose parts the
checkpoint pruned get ``ArmorLinearMethod``, the others (``ignore``d, or not targets) vLLM's
unquantized method. A fused layer must be pruned in all parts or in none.

Parameters. ``ArmorLinearMethod`` gives a layer four parameters, ``a``, ``values``, ``meta``, ``b``,
holding this rank's part of every partition (partition = q, k, v or gate, up; one for an unfused
layer): ``values``/``meta`` stacked by rows, ``a``/``b`` flattened and concatenated (partitions may
have different block sizes). vLLM's name mapping sends ``...q_proj.values`` to ``qkv_proj.values``
with shard id ``"q"``; the parameters' own loader cuts the full checkpoint tensor for this rank
(``sharding.local_part``) and copies it into the partition's place. The bias is vLLM's own
parameter, added once (row-parallel: on rank 0 only).

After loading, ``process_weights_after_loading`` makes per-partition views, validates each (2:4
metadata, finite values; errors name the checkpoint layer) and has ``armor_kernels.dispatch``
build each backend layout once (``cpu_dense``'s dense ``W_hat`` on CPU; nothing on CUDA by
default). ``apply`` runs ``armor_kernels.armor_linear`` per partition, each with its own input
wrapper ``B``, and concatenates the partitions' outputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, QKVParallelLinear, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

import armor_kernels
from armor_kernels import ArmorWeights, dispatch, sparse24
from armor_solver.targets import is_target

from ..checkpoint import check_quantization_config
from . import QUANT_METHOD, sharding

# vLLM's fused layers and the checkpoint layers they hold, in shard order (models add theirs at init)
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
KEYS = ("a", "values", "meta", "b")


class ArmorQuantConfig(QuantizationConfig):
    """``quantization_config`` of an ARMOR checkpoint, checked as ``armor_runtime`` checks it."""

    def __init__(self, config: dict):
        super().__init__()
        self.blocks = check_quantization_config(config)
        self.targets = tuple(config["targets"])
        self.ignore = tuple(config["ignore"])

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton 2:4 kernels and cuSPARSELt need sm_80; vLLM skips the check on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict) -> ArmorQuantConfig:
        return cls(config)

    def checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint layers a vLLM layer holds, in shard order (``...qkv_proj`` -> q, k, v)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf) or FUSED.get(leaf) or [leaf]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def block_sizes(self, name: str) -> tuple[int, int]:
        sizes = self.blocks["layers"].get(name) or self.blocks["default"]
        if sizes is None:
            raise ValueError(f"config.json: quantization_config.block_size gives no block size for {name}")
        return sizes

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings and lm_head stay dense (vLLM's default method)
        names = self.checkpoint_names(prefix)
        pruned = [is_target(n, self.targets, self.ignore) for n in names]
        if not any(pruned):
            return UnquantizedLinearMethod()
        if not all(pruned):
            raise ValueError(
                f"{prefix}: vLLM fuses {', '.join(names)} into one layer, but the checkpoint pruned only "
                f"{', '.join(n for n, p in zip(names, pruned) if p)}; a fused layer is pruned in all parts or none"
            )
        return ArmorLinearMethod(self, prefix, names)


@dataclass
class Partition:
    """One checkpoint layer inside a vLLM layer, on this rank."""

    name: str  # checkpoint name, e.g. model.layers.0.self_attn.k_proj
    rows: int  # output rows in the checkpoint
    cols: int  # input columns in the checkpoint
    block_out: int
    block_in: int
    split: str  # "rows" (column-parallel), "cols" (row-parallel) or "none"
    index: int  # which slice this rank holds
    local_rows: int
    local_cols: int
    row_offset: int = 0  # where it starts in values/meta
    a_offset: int = 0  # where it starts in the flat a and b
    b_offset: int = 0

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        bo, bi = self.block_out, self.block_in
        return {"a": (self.rows // bo, bo, bo), "values": (self.rows, self.cols // 2),
                "meta": tuple(sparse24.meta_shape(self.rows, self.cols)), "b": (self.cols // bi, bi, bi)}

    def local_shapes(self) -> dict[str, tuple[int, ...]]:
        bo, bi = self.block_out, self.block_in
        return {"a": (self.local_rows // bo, bo, bo), "values": (self.local_rows, self.local_cols // 2),
                "meta": tuple(sparse24.meta_shape(self.local_rows, self.local_cols)),
                "b": (self.local_cols // bi, bi, bi)}


def _partitions(config, layer, names, input_size, local_in, local_outs) -> list[Partition]:
    """This rank's partitions, checked against the tensor-parallel degree (refused naming the layer)."""
    tp, rank = layer.tp_size, layer.tp_rank
    split_in = local_in != input_size
    parts, row0, a0, b0 = [], 0, 0, 0
    for i, (name, local_rows) in enumerate(zip(names, local_outs)):
        bo, bi = config.block_sizes(name)
        # k and v heads are replicated when the degree exceeds their count
        replicas = layer.num_kv_head_replicas if isinstance(layer, QKVParallelLinear) and i > 0 else 1
        split_out = tp > 1 and not split_in and local_rows * tp // replicas != local_rows
        rows = local_rows * tp // replicas if split_out else local_rows
        if split_out:
            sharding.check_column(name, rows, bo, tp, local_rows)
        if split_in:
            sharding.check_row(name, input_size, bi, tp)
        split = "cols" if split_in else "rows" if split_out else "none"
        index = rank // replicas if split_out else rank if split_in else 0
        p = Partition(name, rows, input_size, bo, bi, split, index, local_rows, local_in, row0, a0, b0)
        parts.append(p)
        row0, a0, b0 = row0 + local_rows, a0 + local_rows * bo, b0 + local_in * bi
    return parts


class ArmorLinearMethod(LinearMethodBase):
    """``y = concat_p(((x B_pᵀ) S_pᵀ) A_pᵀ) + bias`` over the partitions p of a vLLM layer."""

    def __init__(self, config: ArmorQuantConfig, prefix: str, names: list[str]):
        self.config = config
        self.prefix = prefix
        self.names = names

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        parts = _partitions(self.config, layer, self.names, input_size, input_size_per_partition,
                            output_partition_sizes)
        layer.armor_partitions = parts
        rows, cols = sum(p.local_rows for p in parts), input_size_per_partition
        shapes = {
            "a": (sum(p.local_rows * p.block_out for p in parts),),
            "values": (rows, cols // 2),
            "meta": tuple(sparse24.meta_shape(rows, cols)),
            "b": (sum(cols * p.block_in for p in parts),),
        }
        for key in KEYS:
            dtype = torch.uint8 if key == "meta" else params_dtype
            param = Parameter(torch.empty(shapes[key], dtype=dtype), requires_grad=False)
            layer.register_parameter(key, param)
            set_weight_attrs(param, {"weight_loader": functools.partial(_load, layer, key)})

    def process_weights_after_loading(self, layer) -> None:
        layer.armor_weights = []
        for p in layer.armor_partitions:
            w = _local_weights(layer, p)
            w.validate(p.name)
            dispatch.prepare(w.a, w.values, w.meta, w.b, None)  # the backend's layout, built once
            layer.armor_weights.append(w)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = layer.armor_weights
        if len(parts) == 1:
            w = parts[0]
            return armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, bias)
        y = torch.cat([armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, None) for w in parts], dim=-1)
        return y if bias is None else y + bias


def _region(layer, p: Partition, key: str) -> torch.Tensor:
    """Where partition ``p``'s part of ``key`` lives in the layer's parameter, shaped like that part."""
    shape = p.local_shapes()[key]
    data = getattr(layer, key).data
    if key in ("values", "meta"):
        return data[p.row_offset:p.row_offset + shape[0]]
    start = p.a_offset if key == "a" else p.b_offset
    n = shape[0] * shape[1] * shape[2]
    return data[start:start + n].view(shape)


def _shard_index(shard_id) -> int:
    if shard_id is None:
        return 0
    return QKV_SHARDS[shard_id] if isinstance(shard_id, str) else int(shard_id)


def _load(layer, key: str, param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy this rank's part of one full checkpoint tensor into its partition's place."""
    shard_id = getattr(loaded, "shard_id", None) if shard_id is None else shard_id
    p = layer.armor_partitions[_shard_index(shard_id)]
    want = p.full_shapes()[key]
    if tuple(loaded.shape) != want:
        raise ValueError(
            f"{p.name}.{key}: shape {tuple(loaded.shape)} in the checkpoint, expected {want} (block sizes "
            f"{p.block_out}/{p.block_in} from config.json's quantization_config)"
        )
    local = p.local_rows if p.split == "rows" else p.local_cols
    _region(layer, p, key).copy_(sharding.local_part(key, loaded, p.split, p.index, local))


def _local_weights(layer, p: Partition) -> ArmorWeights:
    return ArmorWeights(*(_region(layer, p, key) for key in KEYS))


def register() -> None:
    """Add "armor" to vLLM's quantization methods, once per process."""
    from vllm.model_executor.layers.quantization import _CUSTOMIZED_METHOD_TO_QUANT_CONFIG

    if QUANT_METHOD in QUANTIZATION_METHODS and _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(QUANT_METHOD) is ArmorQuantConfig:
        return
    register_quantization_config(QUANT_METHOD)(ArmorQuantConfig)
