"""What the plain 2:4 baselines share: the NoWag-style proxy loss and packing in ARMOR form."""

from __future__ import annotations

import torch

from armor_kernels import ArmorWeights

from ..stats import LayerStats
from .base import MethodResult

EPS = 1e-5  # added to the column and row norms, as in NoWag


def normalizers(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row norms r, column norms c) with W̄ = diag(r)⁻¹ W diag(c)⁻¹ (columns first, then rows)."""
    w = weight.float()
    c = w.norm(dim=0) + EPS
    r = (w / c).norm(dim=1) + EPS
    return r, c


def proxy_loss(weight: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """L = Σ h_j (W̄ − Ŵ̄)² / Σ h_j W̄², both normalized by the norms of the dense W."""
    r, c = normalizers(weight)
    scale = (1.0 / r)[:, None] * (1.0 / c)[None, :]
    w_bar = weight.float() * scale
    diff = (weight.float() - w_hat.float()) * scale
    h = h.to(w_bar.device)
    return float((diff.square() * h).sum() / (w_bar.square() * h).sum())


def check_weight(weight: torch.Tensor, stats: LayerStats | None, name: str = "weight") -> None:
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"{name}: expected [d_out, d_in] with d_in a multiple of 4 (2:4 groups), got {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    if stats is not None and stats.h.shape[0] != weight.shape[1]:
        raise ValueError(f"{name}: statistics have {stats.h.shape[0]} input features, the weight {weight.shape[1]}")


def plain24_result(weight: torch.Tensor, core: torch.Tensor, mask: torch.Tensor, stats: LayerStats | None) -> MethodResult:
    """Plain 2:4 in ARMOR form with the cheapest identity wrappers (1x1 output, 4x4 input blocks)."""
    core = torch.where(mask, core, torch.zeros((), dtype=core.dtype, device=core.device))
    packed = ArmorWeights.from_dense(core.to(weight.dtype), block_out=1, block_in=4, mask=mask)
    h = stats.cleaned_h() if stats is not None else torch.ones(weight.shape[1])
    return MethodResult(packed, {"proxy_loss": proxy_loss(weight, core, h)})


def nowag_p_loss(weight: torch.Tensor, h: torch.Tensor) -> float:
    """The NoWag-P proxy loss of ``weight`` (keep the 2 largest W̄²·h of each group of 4): ARMOR's starting point."""
    from armor_kernels.sparse24 import topk_mask

    r, c = normalizers(weight)
    w_bar = weight.float() / r[:, None] / c[None, :]
    h = h.to(w_bar.device)
    mask = topk_mask(w_bar.square() * h)
    return float((w_bar.square() * h * (~mask)).sum() / (w_bar.square() * h).sum())
