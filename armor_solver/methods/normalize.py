"""NoWag normalization and the normalized proxy loss shared by the 2:4 methods.

``W = diag(r) · W̄ · diag(c)`` with column norms ``c_j = ||W[:, j]|| + 1e-5`` and
row norms (after the column scaling) ``r_i = ||(W diag(c)⁻¹)[i, :]|| + 1e-5``.

The proxy loss of a reconstruction ``Ŵ`` is measured in normalized space,
relative to the all-zero reconstruction:

    L = Σ_ij h_j (W̄ − Ŵ̄)²_ij / Σ_ij h_j W̄²_ij,   Ŵ̄ = diag(r)⁻¹ Ŵ diag(c)⁻¹

so L = 0 is exact and L = 1 is as bad as pruning everything.
"""

from __future__ import annotations

import torch

from armor_kernels import reference

EPS = 1e-5  # added to every norm, as in NoWag


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or Inf entries (the solver needs finite inputs)")


def check_inputs(weight: torch.Tensor, h: torch.Tensor, h_name: str = "stats.h") -> None:
    """Shape and finiteness rules shared by the methods; errors name the tensor."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [d_out, d_in] tensor, got shape {tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(f"weight: d_in = {weight.shape[1]} is not a multiple of 4 (2:4 groups are 4 columns wide)")
    if h.dim() != 1 or h.shape[0] != weight.shape[1]:
        raise ValueError(f"{h_name}: expected shape ({weight.shape[1]},) = (d_in,), got {tuple(h.shape)}")
    check_finite(weight, "weight")
    check_finite(h, h_name)


def stats_h(stats, weight: torch.Tensor) -> torch.Tensor:
    """The diagonal statistics ``h`` of ``stats`` as fp32, validated against ``weight``.

    NaN/Inf raise; non-positive entries (dead channels) get the mean of the valid ones.
    """
    check_inputs(weight, stats.h)
    return stats.cleaned_h().float()


def normalize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` -> (``W̄``, ``r``, ``c``) in fp32 with ``weight = diag(r) W̄ diag(c)``."""
    w = weight.float()
    c = w.norm(dim=0) + EPS
    w1 = w / c
    r = w1.norm(dim=1) + EPS
    return w1 / r[:, None], r, c


def weighted_sq(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``Σ_ij h_j x_ij²`` in fp32 (a 0-d tensor)."""
    return (x.square() * h).sum()


def proxy_loss(weight: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """The normalized proxy loss ``L`` of reconstruction ``w_hat`` of ``weight`` under statistics ``h``."""
    if w_hat.shape != weight.shape:
        raise ValueError(f"w_hat: shape {tuple(w_hat.shape)} differs from weight shape {tuple(weight.shape)}")
    check_inputs(weight, h, "h")
    check_finite(w_hat, "w_hat")
    w_bar, r, c = normalize(weight)
    h = h.to(device=w_bar.device, dtype=torch.float32)
    w_hat_bar = w_hat.to(device=w_bar.device, dtype=torch.float32) / c / r[:, None]
    return float(weighted_sq(w_bar - w_hat_bar, h) / weighted_sq(w_bar, h))


def stored_proxy_loss(weight: torch.Tensor, packed, h: torch.Tensor) -> float:
    """``proxy_loss`` of the packed ``ArmorWeights`` as stored (after any cast) against ``weight``.

    Row chunk by row chunk (whole output blocks): the row norms are per row and the column norms are
    summed first, so no dense fp32 copy of the whole layer is made (a 14336x4096 layer would need 235 MB each).
    """
    d_out, d_in = weight.shape
    bo = packed.block_out
    rows = max(bo, (1 << 22) // d_in // bo * bo)
    chunks = [(r0, min(r0 + rows, d_out)) for r0 in range(0, d_out, rows)]
    h = h.to(weight.device, torch.float32)
    col = torch.zeros(d_in, device=weight.device)
    for r0, r1 in chunks:
        col += weight[r0:r1].float().square().sum(0)
    col = col.sqrt() + EPS
    num = den = 0.0
    for r0, r1 in chunks:
        w1 = weight[r0:r1].float() / col
        row = w1.norm(dim=1, keepdim=True) + EPS
        w_hat = reference.materialize(packed.a[r0 // bo:r1 // bo], packed.values[r0:r1], packed.meta[r0:r1], packed.b)
        w_bar = w1 / row
        num += float(weighted_sq(w_bar - w_hat.to(weight.device) / col / row, h))
        den += float(weighted_sq(w_bar, h))
    return num / den
