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
            f"degrees that divide its {rows // block_out} blocks ({_degrees(rows // block_out)}) work for this layer"
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
