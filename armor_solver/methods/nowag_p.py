"""NoWag-P: the 2:4 baseline that is also ARMOR's starting point.

Normalize ``W`` (see ``normalize``), score every weight by ``W̄_ij² · h_j`` and keep
the 2 highest scores of each group of 4 input columns. The kept weights keep their
original values; the wrappers are identities of the smallest valid size (1 and 4).
"""

from __future__ import annotations

import torch

from armor_kernels import ArmorWeights, sparse24

from .base import MethodResult, PruneConfig
from .normalize import normalize, proxy_loss, stats_h


def nowag_mask(w_bar: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """2:4 keep-mask: the top 2 of ``W̄² · h`` in every group of 4 columns."""
    return sparse24.topk_mask(w_bar.square() * h)


def prune(weight: torch.Tensor, stats, cfg: PruneConfig | None = None) -> MethodResult:
    h = stats_h(stats, weight)
    device = weight.device if cfg is None else torch.device(cfg.device)
    w_bar, _, _ = normalize(weight.to(device))
    mask = nowag_mask(w_bar, h.to(device)).to(weight.device)
    core = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    packed = ArmorWeights.from_dense(core, block_out=1, block_in=4, mask=mask)
    return MethodResult(weights=packed, info={"proxy_loss": proxy_loss(weight, core, h.to(weight.device))})
