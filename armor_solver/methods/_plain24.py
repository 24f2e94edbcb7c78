"""What the plain 2:4 baselines share: input checks, packing in ARMOR form, the proxy loss."""

from __future__ import annotations

import torch

from armor_kernels import ArmorWeights

from ..stats import LayerStats
from .base import MethodResult
from .normalize import check_inputs, proxy_loss


def check_weight(weight: torch.Tensor, stats: LayerStats | None) -> None:
    check_inputs(weight, stats.h if stats is not None else torch.ones(weight.shape[-1]), "stats.h")


def plain24_result(weight: torch.Tensor, core: torch.Tensor, mask: torch.Tensor, stats: LayerStats | None) -> MethodResult:
    """Plain 2:4 in ARMOR form with the cheapest identity wrappers (1x1 output, 4x4 input blocks)."""
    core = torch.where(mask, core.to(weight.dtype), torch.zeros((), dtype=weight.dtype, device=core.device))
    packed = ArmorWeights.from_dense(core, block_out=1, block_in=4, mask=mask)
    h = stats.cleaned_h() if stats is not None else torch.ones(weight.shape[1])
    return MethodResult(packed, {"proxy_loss": proxy_loss(weight, core, h)})
