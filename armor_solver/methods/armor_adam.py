"""The paper's schedule: one joint Adam step, then the sampled sparse-core step, per iteration.

Adam (lr 1e-4, no weight decay) moves the blocks of A, the blocks of B and the kept
values of S (the gradient of pruned entries is masked and they are re-zeroed after
the step). The sparse-core step (``sparse_step.sampled_step``) is taken at the
state whose loss and gradient were just computed, so its gain is exact; Adam then
uses that same gradient. Early stopping: no relative improvement of the best loss
by 1e-6 for 100 iterations. The best state seen is returned.
"""

from __future__ import annotations

import time

import torch

from . import sparse_step
from .armor_problem import Fit, Problem

LR = 1e-4
DEFAULT_ITERS = 2000  # the paper runs 20,000; most of the gain comes in the first ~2,500
PATIENCE = 100
RTOL = 1e-6


def fit_adam(prob: Problem, a, s, mask, b, iters: int = DEFAULT_ITERS, time_budget: float | None = None,
             lr: float = LR, seed: int = 0, trace_every: int = 1):
    """-> ``Fit``: the best (A, S, mask, B), its loss, the trace of (seconds, loss), the iterations run."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=prob.w.device).manual_seed(seed)
    A = a.clone().requires_grad_(True)
    B = b.clone().requires_grad_(True)
    S = (s * mask).requires_grad_(True)
    mask = mask.clone()
    opt = torch.optim.Adam([A, B, S], lr=lr)
    best = (float("inf"), None)
    since_best, trace, it = 0, [], 0
    for it in range(iters + 1):
        num = ((prob.w - prob.w_hat(A, S, B)).square() * prob.h).sum()
        loss = float(num.detach()) / prob.denom
        if it % trace_every == 0 or it == iters:
            trace.append((time.perf_counter() - t0, loss))
        if loss < best[0] * (1 - RTOL):
            since_best = 0
        else:
            since_best += 1
        if loss < best[0]:
            best = (loss, (A.detach().clone(), S.detach().clone(), mask.clone(), B.detach().clone()))
        if it == iters or since_best >= PATIENCE:
            break
        if time_budget is not None and time.perf_counter() - t0 >= time_budget:
            break
        opt.zero_grad(set_to_none=False)
        num.backward()
        with torch.no_grad():
            p, q = prob.p_q(A, B)
            sparse_step.sampled_step(prob, S.data, mask, S.grad.clone(), p, q, gen)
            S.grad.mul_(mask)
            S.grad.div_(prob.denom)
            A.grad.div_(prob.denom)
            B.grad.div_(prob.denom)
        opt.step()
        with torch.no_grad():
            S.masked_fill_(~mask, 0.0)
    return Fit(*best[1], best[0], trace, it)
