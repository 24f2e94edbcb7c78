"""The fast exact solver: closed-form block updates, batched over blocks, monotone.

One sweep (all in fp32, ``Problem`` notation, ``H_j = diag(h)`` on input block j):

1. Output wrapper, per output block i with ``C_ij = S_ij B_j``:
   ``A_i = (Σ_j W̄_ij H_j C_ijᵀ)(Σ_j C_ij H_j C_ijᵀ + λI)⁻¹``.
2. Input wrapper, per input block j with ``D_ij = A_i S_ij`` (h weighs whole
   columns of the block and cancels): ``B_j = (Σ_i D_ijᵀ D_ij + λI)⁻¹ Σ_i D_ijᵀ W̄_ij``.
3. Kept values of S (mask fixed): a few warm-started Jacobi-preconditioned CG steps
   on the normal equations ``mask ⊙ (P S Q) = mask ⊙ RHS`` (``P_i = A_iᵀA_i``,
   ``Q_j = B_j H_j B_jᵀ``, ``RHS = Aᵀ W̄ H Bᵀ``); CG lowers the quadratic every step.
4. Support: ``sparse_step.greedy_step`` (best of 6 supports per group, many
   groups at once where the exact loss change allows it).

λ is 1e-6 times the mean diagonal of each block's Gram matrix (plus 1e-12). Every
step's new loss is checked; a step that would raise it is rejected, so the loss
is non-increasing by construction.
"""

from __future__ import annotations

import time

import torch

from . import sparse_step
from .armor_problem import Problem, left, right

LAMBDA = 1e-6
CG_STEPS = 3
DEFAULT_SWEEPS = 8  # SmolLM2-135M, all 210 matrices: ~5 min on 2 shared cores with 1 torch thread
RTOL = 1e-6
SUPPORT_EVERY = 3  # the support step every 3rd sweep: per sweep it gains little next to the wrappers
GAMMA0, GAMMA_MIN, GAMMA_MAX = 1.0, 0.125, 4.0  # stop when a sweep improves the loss by less than this, relatively


def _damped(g: torch.Tensor) -> torch.Tensor:
    n = g.shape[-1]
    lam = LAMBDA * torch.diagonal(g, dim1=-2, dim2=-1).mean(-1) + 1e-12
    return g + lam.reshape(-1, 1, 1) * torch.eye(n, device=g.device)


def _spd_solve(g: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``g X = rhs`` for symmetric positive (semi)definite ``g`` (damped), batched."""
    g = _damped(g)
    chol, info = torch.linalg.cholesky_ex(g)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(g, rhs).solution


def solve_a(prob: Problem, s: torch.Tensor, b: torch.Tensor):
    """Closed-form output wrapper given S, B; returns (A, C = S·B)."""
    c = right(s, b)
    cv = c.reshape(prob.no, prob.bo, -1)
    g = torch.bmm(cv * prob.h, cv.transpose(1, 2))
    rhs = torch.bmm(prob.wh.reshape(prob.no, prob.bo, -1), cv.transpose(1, 2))
    return _spd_solve(g, rhs.transpose(1, 2)).transpose(1, 2), c


def solve_b(prob: Problem, a: torch.Tensor, s: torch.Tensor):
    """Closed-form input wrapper given A, S; returns (B, D = A·S)."""
    d = left(a, s)
    d_out = d.shape[0]
    dv = d.reshape(d_out, prob.ni, prob.bi).transpose(0, 1)  # [ni, d_out, bi]
    wv = prob.w.reshape(d_out, prob.ni, prob.bi).transpose(0, 1)
    g = torch.bmm(dv.transpose(1, 2), dv)
    rhs = torch.bmm(dv.transpose(1, 2), wv)
    return _spd_solve(g, rhs), d


def solve_values(prob: Problem, a, s, b, mask, steps: int = CG_STEPS):
    """Warm-started PCG on the kept values; returns (S, dense residual RHS − P S Q, P, Q).

    In-place updates keep the temporaries to a handful of matrices the size of W.
    """
    p, q = prob.p_q(a, b)
    x = s * mask
    res = prob.core_rhs(a, b)
    res -= left(p, right(x, q))  # dense: −½ gradient of the numerator
    # Jacobi preconditioner diag(P) ⊗ diag(Q), inverted and zero off the mask (so z is masked too)
    inv_pre = torch.outer(torch.diagonal(p, dim1=1, dim2=2).reshape(-1), torch.diagonal(q, dim1=1, dim2=2).reshape(-1))
    inv_pre.clamp_min_(1e-30).reciprocal_().mul_(mask)
    d = res * inv_pre
    rz = float(torch.dot(res.reshape(-1), d.reshape(-1)))
    for _ in range(steps):
        if not rz > 0:
            break
        ad = left(p, right(d, q))
        dad = float(torch.dot(d.reshape(-1), ad.reshape(-1)))
        if not dad > 0:
            break
        step = rz / dad
        x.add_(d, alpha=step)
        res.sub_(ad, alpha=step)
        del ad
        z = res * inv_pre
        rz_new = float(torch.dot(res.reshape(-1), z.reshape(-1)))
        d = z.add_(d, alpha=rz_new / rz)
        rz = rz_new
    return x, res, p, q


def _extrapolate(prob: Problem, prev, cur, loss: float, gamma: float):
    """Step further along the last sweep's move: ``X + γ (X − X_prev)`` for A, B and S's values.

    Alternating updates of a product zig-zag; extrapolating the sweep's direction
    (accepted only if the loss drops) shortcuts that. γ grows by 1.5x after a
    success and halves after a failure (between 0.125 and 4).
    """
    a, s, mask, b = cur
    a0, s0, b0 = prev
    a_x = a + gamma * (a - a0)
    b_x = b + gamma * (b - b0)
    s_x = torch.where(mask, s + gamma * (s - s0), torch.zeros((), device=s.device))
    l_x = prob.loss(a_x, s_x, b_x)
    if l_x < loss:
        return a_x, s_x, b_x, l_x, min(gamma * 1.5, GAMMA_MAX)
    return a, s, b, loss, max(gamma * 0.5, GAMMA_MIN)


def fit_exact(prob: Problem, a, s, mask, b, sweeps: int = DEFAULT_SWEEPS, time_budget: float | None = None,
              cg_steps: int = CG_STEPS, support_every: int = SUPPORT_EVERY, extrapolate: bool = True, stop_below: float | None = None,
              callback=None):
    """Run exact sweeps from (A, S, mask, B); returns the best state and a trace.

    ``trace`` is a list of ``(seconds, loss)`` after each sweep; the state's loss
    never exceeds the starting loss.
    """
    t0 = time.perf_counter()
    loss = prob.loss(a, s, b)
    trace, prev, gamma = [], None, GAMMA0
    for sweep in range(sweeps):
        if time_budget is not None and time.perf_counter() - t0 >= time_budget:
            break
        start_loss = loss
        a_new, c = solve_a(prob, s, b)
        l_new = prob.loss_of(left(a_new, c))
        del c
        if l_new <= loss:
            a, loss = a_new, l_new
        b_new, d = solve_b(prob, a, s)
        l_new = prob.loss_of(right(d, b_new))
        del d
        if l_new <= loss:
            b, loss = b_new, l_new
        s_new, res, p, q = solve_values(prob, a, s, b, mask, cg_steps)
        s_try, mask_try = s_new.clone(), mask.clone()
        if support_every and sweep % support_every == 0:
            sparse_step.greedy_step(prob, s_try, mask_try, -2.0 * res, p, q)
        l_new = prob.loss(a, s_try, b)
        if l_new <= loss:
            s, mask, loss = s_try, mask_try, l_new
        else:  # rounding in the value or support step: keep the values step alone if it helped
            l_vals = prob.loss(a, s_new, b)
            if l_vals <= loss:
                s, loss = s_new, l_vals
        if extrapolate and prev is not None:
            a, s, b, loss, gamma = _extrapolate(prob, prev, (a, s, mask, b), loss, gamma)
        prev = (a, s, b)
        trace.append((time.perf_counter() - t0, loss))
        if callback is not None:
            callback(sweep, loss)
        if start_loss - loss <= RTOL * start_loss or (stop_below is not None and loss <= stop_below):
            break
    return a, s, mask, b, loss, trace
