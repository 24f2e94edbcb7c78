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
from .armor_problem import Fit, Problem, left, pxq, right

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
    c = torch.empty_like(s)
    g = s.new_empty(prob.no, prob.bo, prob.bo)
    rhs = s.new_empty(prob.no, prob.bo, prob.bo)
    for r0, r1 in prob.chunks():  # per output-block chunk: no full-size h-weighted copies
        i0, i1 = r0 // prob.bo, r1 // prob.bo
        c[r0:r1] = right(s[r0:r1], b)
        cv = c[r0:r1].reshape(i1 - i0, prob.bo, -1)
        torch.bmm(cv * prob.h, cv.transpose(1, 2), out=g[i0:i1])
        torch.bmm(prob.wh(r0, r1).reshape(i1 - i0, prob.bo, -1), cv.transpose(1, 2), out=rhs[i0:i1])
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


def solve_values(prob: Problem, a, s, b, mask, steps: int = CG_STEPS, inplace: bool = False):
    """Warm-started PCG on the kept values; returns (S, dense residual RHS − P S Q, P, Q).

    Four matrices the size of W (x, residual, direction, P·d·Q which also holds the
    preconditioned residual); the preconditioner is built per row chunk. With
    ``inplace`` the masked ``s`` itself becomes x (saves a copy).
    """
    p, q = prob.p_q(a, b)
    x = s.masked_fill_(~mask, 0.0) if inplace else s * mask
    res = prob.core_rhs(a, b)
    res -= pxq(p, x, q)  # dense: −½ gradient of the numerator
    # Jacobi preconditioner diag(P) ⊗ diag(Q), inverted and zero off the mask (so z is masked too)
    dp, dq = torch.diagonal(p, dim1=1, dim2=2).reshape(-1), torch.diagonal(q, dim1=1, dim2=2).reshape(-1)

    def precondition(out):
        for r0, r1 in prob.chunks():
            inv = torch.outer(dp[r0:r1], dq).clamp_min_(1e-30).reciprocal_().mul_(mask[r0:r1])
            torch.mul(res[r0:r1], inv, out=out[r0:r1])
        return out

    d = precondition(torch.empty_like(res))
    ad = torch.empty_like(res)
    rz = float(torch.dot(res.reshape(-1), d.reshape(-1)))
    for _ in range(steps):
        if not rz > 0:
            break
        pxq(p, d, q, out=ad)
        dad = float(torch.dot(d.reshape(-1), ad.reshape(-1)))
        if not dad > 0:
            break
        step = rz / dad
        x.add_(d, alpha=step)
        res.sub_(ad, alpha=step)
        z = precondition(ad)  # ad is spent: its buffer takes z
        rz_new = float(torch.dot(res.reshape(-1), z.reshape(-1)))
        d, ad = z.add_(d, alpha=rz_new / rz), d
        rz = rz_new
    del d, ad
    return x, res, p, q


def _pack(prob: Problem, s: torch.Tensor, mask: torch.Tensor, check_zeros: bool = True):
    """A copy of ``s`` for a later restore: its kept values (half the size) when ``s`` is 2:4
    on ``mask`` and zero elsewhere, else a dense clone. Keeps a reference to ``mask``.

    ``check_zeros=False`` skips the zero check (~60 ms on 2048x2048) for an ``s``
    that was masked by construction."""
    d_out, d_in = s.shape
    vals = s.new_empty(d_out, d_in // 2)
    for r0, r1 in prob.chunks():
        sc, mc = s[r0:r1], mask[r0:r1]
        if d_in % 2 or not bool((mc.sum(1) == d_in // 2).all()):
            return s.clone(), None
        if check_zeros and bool(sc.masked_select(~mc).any()):
            return s.clone(), None
        vals[r0:r1] = sc.masked_select(mc).view(r1 - r0, d_in // 2)
    return vals, mask


def _unpack_rows(packed, r0: int, r1: int) -> torch.Tensor:
    vals, mask = packed
    if mask is None:
        return vals[r0:r1]
    out = vals.new_zeros(r1 - r0, mask.shape[1])
    return out.masked_scatter_(mask[r0:r1], vals[r0:r1])


def _restore(prob: Problem, packed, out: torch.Tensor) -> torch.Tensor:
    """Write the packed copy back into ``out`` (row chunk by row chunk)."""
    for r0, r1 in prob.chunks():
        out[r0:r1] = _unpack_rows(packed, r0, r1)
    return out


def _extrapolate(prob: Problem, prev, cur, loss: float, gamma: float):
    """Step further along the last sweep's move: ``X + γ (X − X_prev)`` for A, B and S's values.

    Alternating updates of a product zig-zag; extrapolating the sweep's direction
    (accepted only if the loss drops) shortcuts that. γ grows by 1.5x after a
    success and halves after a failure (between 0.125 and 4). ``prev`` holds S
    packed (``_pack``); the new S is built per row chunk, first for the loss and,
    if accepted, again in place of ``s`` (no second full-size S).
    """
    a, s, mask, b = cur
    a0, s0, b0 = prev
    a_x = a + gamma * (a - a0)
    b_x = b + gamma * (b - b0)
    zero = torch.zeros((), device=s.device)

    def s_x(r0, r1):
        sc = s[r0:r1]
        return torch.where(mask[r0:r1], sc + gamma * (sc - _unpack_rows(s0, r0, r1)), zero)

    bo = prob.bo
    l_x = prob._loss_rows(lambda r0, r1: left(a_x[r0 // bo:r1 // bo], right(s_x(r0, r1), b_x)))
    if l_x < loss:
        for r0, r1 in prob.chunks():
            s[r0:r1] = s_x(r0, r1)
        return a_x, s, b_x, l_x, min(gamma * 1.5, GAMMA_MAX)
    return a, s, b, loss, max(gamma * 0.5, GAMMA_MIN)


def _wrapper_steps(prob: Problem, a, s, b, loss: float):
    """The closed-form A step, then the B step, each kept only if the loss does not rise -> (a, b, loss)."""
    a_new, c = solve_a(prob, s, b)
    l_new = prob.loss_left(a_new, c)
    del c
    if l_new <= loss:
        a, loss = a_new, l_new
    b_new, d = solve_b(prob, a, s)
    l_new = prob.loss_right(d, b_new)
    del d
    if l_new <= loss:
        b, loss = b_new, l_new
    return a, b, loss


def fit_exact(prob: Problem, a, s, mask, b, sweeps: int = DEFAULT_SWEEPS, time_budget: float | None = None,
              cg_steps: int = CG_STEPS, support_every: int = SUPPORT_EVERY, extrapolate: bool = True, stop_below: float | None = None,
              callback=None):
    """Run exact sweeps from (A, S, mask, B) -> ``Fit``: the best state and a trace.

    ``trace`` is a list of ``(seconds, loss)`` after each sweep; the state's loss
    never exceeds the starting loss. ``s`` and ``mask`` are updated in place (their
    storage is reused, so no second full-size S is needed).
    """
    t0 = time.perf_counter()
    loss = prob.loss(a, s, b)
    trace, gamma = [], GAMMA0
    for sweep in range(sweeps):
        if time_budget is not None and time.perf_counter() - t0 >= time_budget:
            break
        start_loss = loss
        # the sweep's start: the fallback of the value step and the base of the extrapolation
        a0, s0, b0 = a, _pack(prob, s, mask, check_zeros=sweep == 0), b  # later S are masked
        a, b, loss = _wrapper_steps(prob, a, s, b, loss)
        # s itself becomes the new values (s0 keeps the start)
        s_new, res, p, q = solve_values(prob, a, s, b, mask, cg_steps, inplace=True)
        s = None
        if support_every and sweep % support_every == 0:
            # the support step edits s_new and mask in place; keep what a rejection restores
            mask_keep = mask.clone()
            s0 = (s0[0], mask_keep) if s0[1] is not None else s0
            s_vals = _pack(prob, s_new, mask_keep, check_zeros=False)
            sparse_step.greedy_step(prob, s_new, mask, res.mul_(-2.0), p, q)
            del res
            l_new = prob.loss(a, s_new, b)
            if l_new <= loss:
                s, loss = s_new, l_new
            else:  # rounding in the value or support step: keep the values step alone if it helped
                mask.copy_(mask_keep)
                _restore(prob, s_vals, s_new)
            del s_vals, mask_keep
        else:
            del res
        if s is None:
            l_vals = prob.loss(a, s_new, b)
            if l_vals <= loss:
                s, loss = s_new, l_vals
            else:
                s = _restore(prob, s0, s_new)
        del s_new
        if extrapolate and sweep > 0:
            a, s, b, loss, gamma = _extrapolate(prob, (a0, s0, b0), (a, s, mask, b), loss, gamma)
        del s0
        trace.append((time.perf_counter() - t0, loss))
        if callback is not None:
            callback(sweep, loss)
        if start_loss - loss <= RTOL * start_loss or (stop_below is not None and loss <= stop_below):
            break
    return Fit(a, s, mask, b, loss, trace, len(trace))
