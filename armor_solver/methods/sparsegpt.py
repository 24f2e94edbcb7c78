"""SparseGPT 2:4 (Frantar & Alistarh 2023): one-shot OBS pruning with weight updates.

H = XᵀX/n + 1 % of its mean diagonal; U = the upper Cholesky factor of H⁻¹.
Columns are processed left to right in blocks of 128; at the start of every
group of 4 the 2 weights of each row with the smallest w² / U_jj² are chosen
for pruning; each pruned (or kept) column's error is pushed onto the columns to
its right through U, so the kept weights absorb what the pruned ones did.
"""

from __future__ import annotations

import torch

from ..stats import LayerStats
from ._plain24 import check_weight, plain24_result
from .base import MethodResult, Option, PruneConfig, check_options

PROPAGATION = "sequential"
NEEDS_XTX = True
DAMP = 0.01  # fraction of the mean diagonal added to H
COLUMN_BLOCK = 128
OPTIONS = {"damp": Option(float, "fraction of the mean diagonal of XᵀX added to it", default=DAMP, minimum=0)}


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹; retries with 10x damping if H is not positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(h.diagonal().mean())
    for attempt in range(4):
        l, info = torch.linalg.cholesky_ex(h + damp * (10**attempt) * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
    raise ValueError("sparsegpt: XᵀX stays singular even with 10x damping (degenerate calibration inputs)")


@torch.no_grad()
def prune(weight: torch.Tensor, stats: LayerStats, cfg: PruneConfig) -> MethodResult:
    check_options("sparsegpt", OPTIONS, cfg.extra)
    w, mask = solve(weight, stats, float(cfg.extra.get("damp", DAMP)))
    return plain24_result(weight, w, mask, stats)


@torch.no_grad()
def solve(weight: torch.Tensor, stats: LayerStats, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's updated weights (fp32, on ``weight``'s device) and 2:4 keep-mask."""
    check_weight(weight, stats)
    if stats is None or stats.xtx is None:
        raise ValueError("sparsegpt: needs the full XᵀX statistics (LayerStats with xtx)")
    w = weight.detach().float().clone()
    h = stats.xtx.to(w.device, torch.float32).clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp)

    d_in = w.shape[1]
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = kept
    for start in range(0, d_in, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, d_in)
        w_blk = w[:, start:end].clone()
        u_blk = u[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        for i in range(end - start):
            if i % 4 == 0:
                # per row, keep the 2 of these 4 columns with the largest saliency w² / U_jj²
                sal = w_blk[:, i : i + 4].square() / u_blk.diagonal()[i : i + 4].square()
                keep = torch.topk(sal, 2, dim=1).indices
                mask[:, start + i : start + i + 4].scatter_(1, keep, True)
            col = w_blk[:, i]
            q = torch.where(mask[:, start + i], col, torch.zeros_like(col))
            err = (col - q) / u_blk[i, i]
            w_blk[:, i:] -= err[:, None] * u_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, start:end] = w_blk
        w[:, end:] -= err_blk @ u[start:end, end:]
    return w, mask
