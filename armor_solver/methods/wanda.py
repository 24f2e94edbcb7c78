"""Wanda 2:4 (Sun et al. 2023): score |W_ij| · ||X_j||₂, keep the top 2 of every group of 4.

No weight update. Published with inputs collected sequentially through the
already-pruned earlier blocks, so the pipeline runs it in "sequential" mode.
"""

from __future__ import annotations

import torch

from armor_kernels.sparse24 import topk_mask

from ..stats import LayerStats
from ._plain24 import check_weight, plain24_result
from .base import MethodResult, PruneConfig

PROPAGATION = "sequential"


def prune(weight: torch.Tensor, stats: LayerStats, cfg: PruneConfig) -> MethodResult:
    check_weight(weight, stats)
    if stats is None:
        raise ValueError("wanda: needs calibration statistics (input norms)")
    scores = weight.float().abs() * stats.sq_norm.sqrt().to(weight.device)[None, :]
    return plain24_result(weight, weight, topk_mask(scores), stats)
