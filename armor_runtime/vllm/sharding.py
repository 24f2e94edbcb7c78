"""Tensor-parallel slices of one ARMOR layer (pure PyTorch: no vLLM import, tested without it).

``W_hat = A·S·B`` with ``A``, ``B`` block-diagonal and ``S`` 2:4 in (values, meta) form.

- Column-parallel (vLLM's ``qkv_proj``, ``gate_up_proj``): rank ``r`` computes rows
  ``[r·n, (r+1)·n)`` of the output. Those rows of ``A·S·B`` need only whole ``A`` blocks (so
  ``n`` must be a multiple of ``b_out``), the same rows of ``values``/``meta``, and all of ``B``
  (replicated).
- Row-parallel (``o_proj``, ``down_proj``): rank ``r`` gets input columns ``[r·m, (r+1)·m)``
  and vLLM sums the ranks' outputs. ``S·B`` restricted to those inputs needs whole ``B`` blocks
  (``m`` a multiple of ``b_in``), ``values`` columns ``[r·m/2, (r+1)·m/2)`` (2 kept per 4 inputs)
  and ``meta`` bytes ``[r·m/8, (r+1)·m/8)`` (one byte holds the two groups of 8 inputs, so ``m``
  is a multiple of 8). Since ``A·Σ_r z_r = Σ_r A·z_r``, each rank applies the full ``A`` to its
  partial ``z_r`` before the all-reduce; the bias is added on one rank only.

A degree that breaks a block is refused with ``ShardingError`` naming the layer, the block size
and the degree, and the degrees that would work.
"""

from __future__ import annotations

import math

import torch

from armor_kernels import ArmorFormatError

# inputs covered by one byte of metadata: 2 groups of 4
META_INPUTS_PER_BYTE = 8


class ShardingError(ArmorFormatError):
    """A tensor-parallel degree does not align with a layer's blocks."""


def _degrees(units: int) -> list[int]:
    return [d for d in range(1, units + 1) if units % d == 0]


def row_unit(block_in: int) -> int:
    """Input columns per rank must be a multiple of this (whole B blocks, whole meta bytes)."""
    return math.lcm(block_in, META_INPUTS_PER_BYTE)


def check_column(name: str, rows: int, block_out: int, degree: int, local_rows: int) -> None:
    """Refuse a split that gives a rank ``local_rows`` of the ``rows`` output rows cutting an ``A`` block."""
    if local_rows % block_out:
        raise ShardingError(
            f"{name}: tensor-parallel degree {degree} gives {local_rows} of its {rows} output rows per rank, "
            f"which cuts its output wrapper A (block size {block_out}); column-parallel ranks need whole A blocks: "
            f"degrees {_degrees(rows // block_out)} (the divisors of its {rows // block_out} A blocks) work for this layer"
        )


def check_row(name: str, cols: int, block_in: int, degree: int) -> None:
    """Refuse a split of ``cols`` input columns that cuts a ``B`` block or a metadata byte."""
    unit = row_unit(block_in)
    if degree > 1 and (cols % degree or (cols // degree) % unit):
        allowed = sorted({1, *(_degrees(cols // unit) if cols % unit == 0 else [])})
        raise ShardingError(
            f"{name}: tensor-parallel degree {degree} gives {cols / degree:g} of its {cols} input columns per rank, "
            f"which cuts its input wrapper B (block size {block_in}) or a metadata byte ({META_INPUTS_PER_BYTE} "
            f"inputs); row-parallel ranks need multiples of {unit} columns: degrees {allowed} work for this layer"
        )


# the packed tensors each split cuts, and along which dim
SPLIT_ROWS = {"a": 0, "values": 0, "meta": 0}  # b is replicated
SPLIT_COLS = {"values": 1, "meta": 1, "b": 0}  # a is replicated


def local_part(key: str, t: torch.Tensor, split: str, index: int, local: int) -> torch.Tensor:
    """Rank ``index``'s part of packed tensor ``key`` (``a``, ``values``, ``meta``, ``b``) of a full layer.

    ``split``: ``"rows"`` (column-parallel, ``local`` output rows per rank), ``"cols"`` (row-parallel,
    ``local`` input columns per rank) or ``"none"`` (replicated).
    """
    if split == "none" or key not in (SPLIT_ROWS if split == "rows" else SPLIT_COLS):
        return t
    if split == "rows":  # one A block covers b_out rows; values and meta have one row per output row
        per, dim = (t.shape[-1] if key == "a" else 1), 0
    else:  # one value per 2 inputs, one meta byte per 8, one B block per b_in
        per, dim = {"values": 2, "meta": META_INPUTS_PER_BYTE, "b": t.shape[-1]}[key], SPLIT_COLS[key]
    n = local // per
    return t.narrow(dim, index * n, n)


def _refusal(check, *args) -> str:
    try:
        check(*args)
    except ShardingError as e:
        return str(e)
    return ""


def _block_sizes(qc: dict, leaf: str) -> set[tuple[int, int]]:
    """Every (b_out, b_in) the checkpoint uses for projections named ``leaf`` (default and per-layer sizes)."""
    from ..checkpoint import check_quantization_config

    blocks = check_quantization_config(qc)
    sizes = {s for name, s in blocks["layers"].items() if name.rsplit(".", 1)[-1] == leaf}
    return sizes | ({blocks["default"]} if blocks["default"] else set())


def why_not(config: dict, degree: int) -> str:
    """Why a Llama-like checkpoint (its config.json as a dict) cannot run at ``degree``; "" when it can.

    vLLM's own rules first (attention heads divide evenly, KV heads divide or are replicated), then
    ARMOR's: whole ``A`` blocks per rank for q/k/v/gate/up, whole ``B`` blocks and metadata bytes for
    o/down, for every block size the checkpoint uses for that projection.
    """
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or hidden // heads
    if heads % degree:
        return f"vLLM: {heads} attention heads do not split over {degree} ranks"
    if kv % degree and degree % kv:
        return f"vLLM: {kv} KV heads neither split over nor replicate onto {degree} ranks"
    qc = config["quantization_config"]
    kv_rows = kv * hd // degree if degree <= kv else hd  # one head per rank once replicated
    column = {"q_proj": (heads * hd, heads * hd // degree), "k_proj": (kv * hd, kv_rows),
              "v_proj": (kv * hd, kv_rows), "gate_proj": (inter, inter // degree), "up_proj": (inter, inter // degree)}
    row = {"o_proj": heads * hd, "down_proj": inter}
    for leaf, (rows, local) in column.items():
        for bo, _ in sorted(_block_sizes(qc, leaf)):
            if why := _refusal(check_column, leaf, rows, bo, degree, local):
                return why
    for leaf, cols in row.items():
        for _, bi in sorted(_block_sizes(qc, leaf)):
            if why := _refusal(check_row, leaf, cols, bi, degree):
                return why
    return ""


def main(argv=None) -> int:
    """``python -m armor_runtime.vllm.sharding CHECKPOINT [MAX_DEGREE]``: the degrees it allows, and why not the rest."""
    import json
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    config = json.loads((Path(args[0]) / "config.json").read_text())
    for degree in range(1, (int(args[1]) if len(args) > 1 else 8) + 1):
        why = why_not(config, degree)
        print(f"tensor-parallel degree {degree}: " + (f"no: {why}" if why else "yes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
