"""NoWag-P: the 2:4 baseline that is also ARMOR's starting point.

Normalize ``W`` (see ``normalize``), score every weight by ``W̄_ij² · h_j`` and keep
the 2 highest scores of each group of 4 input columns. The kept weights keep their
original values; the wrappers are identities of the smallest valid size (1 and 4).
"""

from __future__ import annotations

import torch

from armor_kernels import sparse24

from ._plain24 import plain24_result
from .base import MethodResult, PruneConfig
from .normalize import normalize, stats_h


def nowag_mask(w_bar: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """2:4 keep-mask: the top 2 of ``W̄² · h`` in every group of 4 columns."""
    return sparse24.topk_mask(w_bar.square() * h)


def nowag_p_loss(weight: torch.Tensor, h: torch.Tensor) -> float:
    """The NoWag-P proxy loss of ``weight`` (keep the 2 largest W̄²·h of each group of 4): ARMOR's starting point."""
    w_bar, _, _ = normalize(weight)
    h = h.to(w_bar.device, torch.float32)
    mask = nowag_mask(w_bar, h)
    return float((w_bar.square() * h * (~mask)).sum() / (w_bar.square() * h).sum())


def prune(weight: torch.Tensor, stats, cfg: PruneConfig | None = None) -> MethodResult:
    h = stats_h(stats, weight)
    device = weight.device if cfg is None else torch.device(cfg.device)
    w_bar, _, _ = normalize(weight.to(device))
    mask = nowag_mask(w_bar, h.to(device)).to(weight.device)
    return plain24_result(weight, weight, mask, stats)
