"""2:4 semi-structured sparsity: masks, pattern checks, compress and decompress.

A 2:4 core keeps, in every row, exactly 2 entries of each run of 4 consecutive
input columns (a "group"). The compressed form is hardware-neutral:

- ``values``: ``[d_out, d_in/2]``, the 2 kept entries of each group, in column order.
- ``meta``: ``uint8 [d_out, ceil(d_in/8)]``, 4 bits per group (2 groups per byte,
  the even group in the low nibble). A nibble is ``i0 | i1 << 2`` with the kept
  column offsets ``0 <= i0 < i1 <= 3``. When ``d_in/4`` is odd the last high
  nibble is padding and must be 0.

Values + metadata take ``d_in/2`` elements + ``d_in/8`` bytes per row: 9/16 of a
dense fp16/bf16 row, the same as cuSPARSELt's compressed buffer.

Compress -> decompress is bit-exact: the kept values keep their bit patterns
(-0.0 and kept zeros included), dropped positions decompress to +0.0.
"""

from __future__ import annotations

import torch

# The 6 valid (i0, i1) pairs of a group and their nibble codes i0 | i1 << 2.
PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
VALID_NIBBLES = tuple(i0 | (i1 << 2) for i0, i1 in PAIRS)


class Sparse24Error(ValueError):
    """A tensor breaks the 2:4 rule or the compressed-format layout."""


def _check_groupable(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise Sparse24Error(f"{name}: expected a 2-D [d_out, d_in] tensor, got shape {tuple(t.shape)}")
    if t.shape[1] % 4:
        raise Sparse24Error(f"{name}: d_in = {t.shape[1]} is not a multiple of 4 (2:4 groups are 4 columns wide)")


def _first_violation(bad: torch.Tensor) -> tuple[int, int]:
    row, group = (int(v) for v in bad.nonzero()[0])
    return row, group


def check_mask(mask: torch.Tensor, name: str = "mask", exact: bool = False) -> None:
    """Raise unless every group of 4 keeps at most 2 entries (exactly 2 if ``exact``)."""
    _check_groupable(mask, name)
    counts = mask.reshape(mask.shape[0], -1, 4).sum(-1)
    bad = counts != 2 if exact else counts > 2
    if bool(bad.any()):
        row, group = _first_violation(bad)
        n = int(counts[row, group])
        rule = "exactly 2" if exact else "at most 2"
        raise Sparse24Error(
            f"{name}: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) keeps {n} "
            f"entries; the 2:4 rule allows {rule} of every 4"
        )


def nonzero_mask(core: torch.Tensor) -> torch.Tensor:
    """Positions holding a non-zero value (-0.0 counts as zero)."""
    return core != 0


def check_core(core: torch.Tensor, name: str = "core") -> None:
    """Raise, naming the row and group, unless ``core`` has at most 2 non-zeros per group of 4."""
    _check_groupable(core, name)
    check_mask(nonzero_mask(core), name)


def topk_mask(scores: torch.Tensor) -> torch.Tensor:
    """2:4 mask keeping the 2 highest scores of every group of 4 (ties: lowest column first)."""
    _check_groupable(scores, "scores")
    groups = scores.reshape(scores.shape[0], -1, 4)
    # stable sort so ties are broken deterministically by column position
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(scores.shape)


def _fill_to_two(mask: torch.Tensor) -> torch.Tensor:
    """Extend a mask with <= 2 kept per group to exactly 2, adding the lowest free columns."""
    groups = mask.reshape(mask.shape[0], -1, 4)
    # rank kept columns first, then free columns in order; keep the first 2
    key = (~groups).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8, device=mask.device)
    order = torch.sort(key, dim=-1).indices[..., :2]
    full = torch.zeros_like(groups)
    full.scatter_(-1, order, True)
    return full.reshape(mask.shape)


def compress(core: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 core (+ optional keep-mask) -> (values ``[d_out, d_in/2]``, meta ``uint8``).

    With ``mask`` the kept values are ``core[mask]`` bit for bit (also -0.0 and
    zeros); without it the mask is the non-zeros of ``core``. Groups keeping
    fewer than 2 are padded with the lowest free columns (stored as +0.0).
    """
    _check_groupable(core, "core")
    if mask is None:
        mask, name = nonzero_mask(core), "core"
    else:
        name = "mask"
        if mask.shape != core.shape:
            raise Sparse24Error(f"mask: shape {tuple(mask.shape)} differs from core shape {tuple(core.shape)}")
        mask = mask.to(device=core.device, dtype=torch.bool)
    check_mask(mask, name)
    full = _fill_to_two(mask)
    d_out, d_in = core.shape
    kept = torch.where(mask, core, torch.zeros((), dtype=core.dtype, device=core.device))
    values = kept[full].reshape(d_out, d_in // 2)
    # column offsets of the 2 kept entries per group, ascending
    idx = full.reshape(d_out, -1, 4).nonzero()[:, 2].reshape(d_out, -1, 2).to(torch.uint8)
    nibbles = idx[..., 0] | (idx[..., 1] << 2)
    return values.contiguous(), pack_nibbles(nibbles)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """``uint8 [d_out, n_groups]`` nibbles -> ``uint8 [d_out, ceil(n_groups/2)]`` bytes."""
    d_out, n_groups = nibbles.shape
    if n_groups % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(d_out, 1)], dim=1)
    pairs = nibbles.reshape(d_out, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_nibbles(meta: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``uint8 [d_out, ceil(n_groups/2)]`` -> nibbles ``uint8 [d_out, n_groups]``."""
    lo = meta & 0xF
    hi = meta >> 4
    return torch.stack([lo, hi], dim=-1).reshape(meta.shape[0], -1)[:, :n_groups]


def meta_shape(d_out: int, d_in: int) -> tuple[int, int]:
    return d_out, (d_in // 4 + 1) // 2


def check_meta(meta: torch.Tensor, d_in: int, name: str = "meta") -> None:
    """Raise unless every nibble is one of the 6 valid 2:4 patterns and padding is 0."""
    if meta.dtype != torch.uint8:
        raise Sparse24Error(f"{name}: dtype must be torch.uint8, got {meta.dtype}")
    if meta.dim() != 2 or tuple(meta.shape) != meta_shape(meta.shape[0] if meta.dim() else 0, d_in):
        raise Sparse24Error(
            f"{name}: shape {tuple(meta.shape)} does not match d_in = {d_in} "
            f"(expected [d_out, {meta_shape(0, d_in)[1]}]: 4 bits per group of 4 columns)"
        )
    n_groups = d_in // 4
    nibbles = unpack_nibbles(meta, n_groups)
    valid = torch.zeros(16, dtype=torch.bool, device=meta.device)
    valid[list(VALID_NIBBLES)] = True
    bad = ~valid[nibbles.long()]
    if bool(bad.any()):
        row, group = _first_violation(bad)
        code = int(nibbles[row, group])
        raise Sparse24Error(
            f"{name}: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) has pattern "
            f"{code:#06b} (kept offsets {code & 3} and {code >> 2}); the 2:4 rule needs 2 distinct "
            f"ascending offsets in 0..3"
        )
    if n_groups % 2 and bool((meta[:, -1] >> 4).any()):
        row = int((meta[:, -1] >> 4).nonzero()[0])
        raise Sparse24Error(f"{name}: row {row}: the padding nibble after the last group must be 0")


def kept_columns(meta: torch.Tensor, d_in: int) -> torch.Tensor:
    """Column index of every kept value: ``int64 [d_out, d_in/2]``."""
    n_groups = d_in // 4
    nib = unpack_nibbles(meta, n_groups).long()
    offsets = torch.stack([nib & 3, nib >> 2], dim=-1)  # [d_out, n_groups, 2]
    base = torch.arange(n_groups, device=meta.device).mul_(4).view(1, -1, 1)
    return (base + offsets).reshape(meta.shape[0], -1)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values, meta) -> dense core ``[d_out, d_in]``; dropped positions are +0.0."""
    d_out, half = values.shape
    d_in = 2 * half
    dense = torch.zeros(d_out, d_in, dtype=values.dtype, device=values.device)
    dense.scatter_(1, kept_columns(meta, d_in), values)
    return dense


def dense_mask(meta: torch.Tensor, d_in: int) -> torch.Tensor:
    """The keep-mask ``bool [d_out, d_in]`` described by ``meta``."""
    mask = torch.zeros(meta.shape[0], d_in, dtype=torch.bool, device=meta.device)
    mask.scatter_(1, kept_columns(meta, d_in), True)
    return mask
