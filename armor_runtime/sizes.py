"""Bytes of pruned layers, dense vs plain 2:4 vs ARMOR, in memory and on disk.

Resident bytes per pruned layer ``d_out x d_in`` in a 2-byte dtype (``armor_kernels.layer_bytes``):

- dense: ``2·d_out·d_in``;
- plain 2:4: kept values ``2·d_out·d_in/2`` + 4-bit metadata ``d_out·d_in/8`` = exactly 9/16 of dense;
- ARMOR: the same core + the wrappers ``2·(b_out·d_out + b_in·d_in)`` (+ the bias, as in dense).

``python -m benchmarks.sizes`` measures the checkpoints ``armor prune`` writes for SmolLM2-135M with these.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from armor_kernels import layer_bytes


def model_layer_bytes(layers: dict[str, tuple[int, int, int, int]], elem: int = 2) -> dict[str, int]:
    """Sum of ``layer_bytes`` over ``{name: (d_out, d_in, block_out, block_in)}``."""
    total: dict[str, int] = {}
    for d_out, d_in, bo, bi in layers.values():
        for key, v in layer_bytes(d_out, d_in, bo, bi, elem).items():
            total[key] = total.get(key, 0) + v
    return total


def folder_bytes(path) -> dict[str, int]:
    files = [p for p in Path(path).iterdir() if p.is_file()]
    return {
        "safetensors": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        "all_files": sum(p.stat().st_size for p in files),
    }


def weight_bytes(path) -> int:
    """Bytes of a model's weights on disk: a file's size (.gguf), or a folder's *.safetensors (else *.bin) files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    for pattern in ("*.safetensors", "*.bin"):
        files = [p for p in path.glob(pattern) if p.is_file()]
        if files:
            return sum(p.stat().st_size for p in files)
    return 0


def wrapper_bytes(model: nn.Module) -> int:
    """Bytes of the wrappers ``a`` and ``b`` of every ArmorLinear of ``model``."""
    from .linear import ArmorLinear

    return sum(m.a.nbytes + m.b.nbytes for m in model.modules() if isinstance(m, ArmorLinear))


def prune_report(out, source: str, model: nn.Module) -> dict:
    """What ``armor prune`` prints at the end: the checkpoint's bytes on disk, the source's, plain 2:4's.

    -> ``{"checkpoint", "source", "plain24", "wrappers", "text", "larger_than_source"}`` (the last: a warning
    text, or None). Plain 2:4 is the same checkpoint without the wrappers (values + metadata + the rest).
    """
    from armor_solver import models

    ckpt = weight_bytes(out)
    paths = models.model_sources(source)
    src = weight_bytes(paths[0]) if paths else 0
    wrappers = wrapper_bytes(model)
    plain = ckpt - wrappers

    def vs(n: int) -> str:
        return f" ({n / src:.3f}x the source)" if src else ""

    text = (f"on disk: checkpoint {ckpt:,} bytes{vs(ckpt)}; source {src:,} bytes ({paths[0] if paths else source}); "
            f"plain 2:4 would take {plain:,} bytes{vs(plain)} (the checkpoint without its {wrappers:,} bytes of "
            "wrappers A, B)")
    larger = None
    if src and ckpt > src:
        stored = next((str(p.dtype).replace("torch.", "") for p in model.parameters()), "?")
        kept, why = models.source_dtype(source)
        reasons = []
        if "quantized" in why:
            reasons.append(f"{why.split(':')[0]}, while the checkpoint stores {stored}")
        elif torch.empty((), dtype=kept).element_size() < torch.empty((), dtype=getattr(torch, stored, torch.float32)).element_size():
            reasons.append(f"the source is {str(kept).replace('torch.', '')}, the checkpoint {stored} (see --dtype)")
        if wrappers and plain <= src:
            reasons.append(f"its wrappers take {wrappers:,} bytes (a smaller --block-size shrinks them)")
        larger = (f"the checkpoint ({ckpt:,} bytes) is larger than the source ({src:,} bytes)"
                  + (f": {'; '.join(reasons)}" if reasons else ""))
    return {"checkpoint": ckpt, "source": src, "plain24": plain, "wrappers": wrappers, "text": text,
            "larger_than_source": larger}


def checkpoint_bytes(folder) -> dict[str, int]:
    """Bytes of a checkpoint folder's shards, and what its tensors imply, from the safetensors headers.

    ``files``: the *.safetensors files; ``tensors``: their tensor payload; ``headers``: the difference;
    ``implied``: the layer formula (``layer_bytes``, with the bias) for every ARMOR layer plus ``numel x
    element size`` for every other tensor; ``wrappers``, ``armor_core``, ``dense_equivalent`` (every ARMOR
    layer as a dense weight + bias of the same dtype) for the table.
    """
    import json

    from safetensors import safe_open

    elem = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "I32": 4, "BOOL": 1}
    shapes: dict[str, tuple[list[int], str]] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                sl = h.get_slice(key)
                shapes[key] = (list(sl.get_shape()), sl.get_dtype())

    def nbytes(key: str) -> int:
        shape, kind = shapes[key]
        n = 1
        for d in shape:
            n *= d
        return n * elem[kind]

    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    layers = sorted({k.rsplit(".", 1)[0] for k in shapes if k.endswith(".values")}) if qc.get("quant_method") == "armor" else []
    out = {"files": sum(f.stat().st_size for f in files), "tensors": sum(nbytes(k) for k in shapes),
           "wrappers": 0, "armor_core": 0, "dense_equivalent": 0, "layers": len(layers)}
    implied, used = 0, set()
    for name in layers:
        (d_out, half), kind = shapes[f"{name}.values"]
        e = elem[kind]
        bo, bi = shapes[f"{name}.a"][0][-1], shapes[f"{name}.b"][0][-1]
        sizes = layer_bytes(d_out, 2 * half, bo, bi, e)
        bias = nbytes(f"{name}.bias") if f"{name}.bias" in shapes else 0
        implied += sizes["armor"] + bias
        out["wrappers"] += sizes["armor_wrappers"]
        out["armor_core"] += sizes["armor_core"]
        out["dense_equivalent"] += sizes["dense"]
        used |= {f"{name}.{k}" for k in ("a", "values", "meta", "b", "bias")}
    out["implied"] = implied + sum(nbytes(k) for k in shapes if k not in used)
    out["headers"] = out["files"] - out["tensors"]
    return out


