"""Factories shared by the tests: packed layers, tiny models, uncalibrated pruned weights."""

from __future__ import annotations

import torch
from torch import nn

from armor_kernels import ArmorWeights, choose_block_size, sparse24


def random_armor_weights(d_out: int, d_in: int, block_out: int, block_in: int, dtype=torch.float32, bias: bool = True,
                         gen: torch.Generator | None = None, scale: float = 0.1) -> ArmorWeights:
    """Wrappers near the identity around a random 2:4 core (top-2 magnitudes of each group of 4)."""
    gen = gen or torch.Generator().manual_seed(0)
    a = torch.eye(block_out) + scale * torch.randn(d_out // block_out, block_out, block_out, generator=gen)
    b = torch.eye(block_in) + scale * torch.randn(d_in // block_in, block_in, block_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen)
    mask = sparse24.topk_mask(w.abs())
    bias_t = torch.randn(d_out, generator=gen) if bias else None
    return ArmorWeights.from_factors(a, w * mask, b, bias=bias_t, mask=mask, dtype=dtype)


def nowag_p_weights(model: nn.Module, targets, block: int = 128) -> dict[str, ArmorWeights]:
    """Uncalibrated NoWag-P (``h = 1``) for every target linear, with identity wrappers of ``block``."""
    from armor_solver.methods.normalize import normalize
    from armor_solver.methods.nowag_p import nowag_mask
    from armor_solver.targets import is_target

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not is_target(name, targets):
            continue
        w = m.weight.detach()
        mask = nowag_mask(normalize(w)[0], torch.ones(w.shape[1]))
        bo, bi = choose_block_size(w.shape[0], block), choose_block_size(w.shape[1], block, multiple_of=4)
        bias = None if m.bias is None else m.bias.detach()
        out[name] = ArmorWeights.from_dense(w * mask, bo, bi, bias=bias, mask=mask)
    return out
