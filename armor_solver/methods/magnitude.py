"""Magnitude 2:4: keep the 2 largest |W_ij| of every group of 4 input columns. No calibration needed."""

from __future__ import annotations

import torch

from armor_kernels.sparse24 import topk_mask

from ..stats import LayerStats
from ._plain24 import check_weight, plain24_result
from .base import MethodResult, PruneConfig

PROPAGATION = "dense"  # statistics only feed the reported proxy loss


def prune(weight: torch.Tensor, stats: LayerStats | None, cfg: PruneConfig) -> MethodResult:
    check_weight(weight, stats)
    mask = topk_mask(weight.float().abs())
    return plain24_result(weight, weight, mask, stats)
