"""The full-covariance ARMOR fit: ``W ≈ diag(r) · A · S · B · diag(c)`` under the layer's output error.

Objective (``FullProblem``). With ``Σ = XᵀX/n`` (the statistics SparseGPT's Hessian
is built from), damped as SparseGPT damps it (``Σ + δ·mean(diag Σ)·I``, δ = 0.01),
and ``W = diag(r) W̄ diag(c)`` (NoWag normalization), the layer's output error is

    ||(W − Ŵ) X||² / n = Σ_i ρ_i [E G Eᵀ]_ii,   E = W̄ − Â S B̂,  ρ = r²,  G = diag(c) Σ diag(c),

so the fit stays in the normalized space (``Â``, ``B̂`` block-diagonal, ``S`` 2:4) and the
loss is ``L = Σ_i ρ_i [E G Eᵀ]_ii / Σ_i ρ_i [W̄ G W̄ᵀ]_ii = ||(W − Ŵ)X||² / ||WX||²``.
With a diagonal ``Σ`` and ``ρ = 1`` it is ARMOR's usual proxy; here the cross terms
of ``Σ`` couple the input columns.

Start: SparseGPT's mask and values (``S = M ⊙ W_sgpt / (r cᵀ)``), ``A = B = I``: the
starting loss is SparseGPT's, and every update below is accepted only if the loss
does not rise, so the result is never worse than SparseGPT under this loss.

One sweep (costs for ``d_out x d_in`` with blocks ``bo``, ``bi``; ``d_in²`` terms are the
price of the full covariance, the diagonal solver has none):

1. ``A`` (closed form). Rows of A separate and ``ρ_i`` is constant on a row, so per
   output block ``A_i (C_i G C_iᵀ) = W̄_i G C_iᵀ`` with ``C = S B̂``.
   Cost: ``C G`` (``d_out·d_in²``) + two Gram products (``2·d_out·d_in·bo``) + ``no`` solves.
2. ``B`` (block-Jacobi PCG). With ``D = Â S``, ``M = Dᵀ R D``, ``N = Dᵀ R W̄ G``, the
   gradient is ``∂f/∂B_j = −2 (N − M B̂ G)_jj``, so the normal equations couple the
   blocks: ``T(B)_j = Σ_k M_jk B_k G_kj = N_jj``. ``T`` is symmetric positive
   semidefinite under the Frobenius product; its block-diagonal part
   ``B_j → M_jj B_j G_jj`` inverts as ``X → M_jj⁻¹ X G_jj⁻¹`` (the preconditioner).
   Cost: ``M`` (``d_out·d_in²``) once, then ``2·d_in²·bi`` per CG step.
3. Kept values (PCG, Jacobi). ``∂f/∂S = 2 (P S Q − RHS)`` with ``P_i = A_iᵀ R_i A_i``
   (block-diagonal), ``Q = B̂ G B̂ᵀ`` (full ``d_in x d_in``), ``RHS = Âᵀ R W̄ G B̂ᵀ``; the
   kept values solve ``M ⊙ (P S Q) = M ⊙ RHS`` (a masked quadratic). Cost: ``Q``
   (``2·d_in²·bi``) once, then ``d_out·d_in² + d_out·d_in·bo`` per CG step.
4. Support (sweeps 0, 3, 6, ...). A group's 4 entries change the loss by ``<∇, δ> + P_rr δᵀ Q_gg δ`` (its
   4x4 block of the full ``Q``), so each group's best of 6 supports is exact with the
   others fixed (``sparse_step.all_group_pairs``). Groups interact through ``P``'s and
   ``Q``'s off-diagonal entries (now also across input blocks); the improving groups
   are switched together and the exact change ``<∇, ΔS> + <ΔS, P ΔS Q>`` is checked,
   then the top half, a quarter, ...; the fallback, the best group of each output
   block, is exact (``P`` is block-diagonal over output blocks). Cost: the gradient
   and each check ``d_out·d_in²``.

Each accepted step is checked with the exact loss (``d_out·d_in²``). Memory: ``G``,
``M`` and ``Q`` (``d_in x d_in`` each) and about eight ``d_out x d_in`` fp32 matrices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import sparse_step
from .armor_exact import _spd_solve
from .armor_problem import BlockGrid, Fit, left, right

DAMP = 0.01  # as SparseGPT: fraction of the mean diagonal of Σ added to it
DEFAULT_SWEEPS = 8
CG_STEPS = 8  # value CG steps per sweep
B_STEPS = 8  # block-Jacobi CG steps on B per sweep
RTOL = 1e-6
SUPPORT_EVERY = 3  # the support step on sweeps 0, 3, 6: it costs ~40 % of a sweep (576x576) and gains less later


def diag_blocks(m: torch.Tensor, b: int) -> torch.Tensor:
    """The ``b x b`` diagonal blocks of a square ``m``: ``[n/b, b, b]``."""
    n = m.shape[0] // b
    return torch.diagonal(m.reshape(n, b, n, b), dim1=0, dim2=2).permute(2, 0, 1)


def covariance(xtx: torch.Tensor, c: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``G = diag(c) (Σ + damp·mean(diag Σ)·I) diag(c)`` in fp32."""
    sigma = xtx.to(device=c.device, dtype=torch.float32).clone()
    sigma.diagonal().add_(damp * float(sigma.diagonal().mean()) + 1e-12)
    return c[:, None] * sigma * c[None, :]


@dataclass
class FullProblem(BlockGrid):
    """Normalized target ``w`` (``W̄``), column covariance ``g`` (``G``), row weights ``rho`` (``r²``)."""

    w: torch.Tensor
    g: torch.Tensor
    rho: torch.Tensor
    bo: int
    bi: int

    def __post_init__(self):
        self.wg = self.w @ self.g
        self.denom = float((self.rho * (self.wg * self.w).sum(1)).sum())
        if not self.denom > 0:
            raise ValueError("weight: ||W X|| is 0 on the calibration inputs (all-zero weight or inputs?)")

    def loss_of(self, w_hat: torch.Tensor) -> float:
        e = self.w - w_hat
        return float((self.rho * ((e @ self.g) * e).sum(1)).sum()) / self.denom

    def loss(self, a, s, b) -> float:
        return self.loss_of(left(a, right(s, b)))


def solve_a(prob: FullProblem, s, b) -> torch.Tensor:
    """Closed-form ``A`` given ``S``, ``B``: ``A_i = (W̄_i G C_iᵀ)(C_i G C_iᵀ)⁻¹``, ``C = S B̂``."""
    c = right(s, b)
    cv = c.reshape(prob.no, prob.bo, -1)
    gram = torch.bmm((c @ prob.g).reshape(prob.no, prob.bo, -1), cv.transpose(1, 2))
    gram = 0.5 * (gram + gram.transpose(1, 2))
    rhs = torch.bmm(prob.wg.reshape(prob.no, prob.bo, -1), cv.transpose(1, 2))
    return _spd_solve(gram, rhs.transpose(1, 2)).transpose(1, 2)


def b_operator(m: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``T(X)_j = Σ_k M_jk X_k G_kj`` = the diagonal blocks of ``M X̂ G`` (``2·d_in²·bi``)."""
    ni, bi, _ = x.shape
    d_in = m.shape[0]
    y = right(m, x).reshape(ni, bi, d_in)  # rows of block j of M X̂
    return torch.bmm(y, g.reshape(d_in, ni, bi).transpose(0, 1))


def b_terms(prob: FullProblem, a, s):
    """``M = Dᵀ R D`` and the diagonal blocks of ``N = Dᵀ R W̄ G`` (``D = Â S``)."""
    d = left(a, s)
    dr = d * prob.rho[:, None]
    m = dr.T @ d
    m = 0.5 * (m + m.T)
    d_out = d.shape[0]
    n = torch.bmm(dr.reshape(d_out, prob.ni, prob.bi).permute(1, 2, 0),
                  prob.wg.reshape(d_out, prob.ni, prob.bi).transpose(0, 1))
    return m, n


def _inverse_blocks(blocks: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(blocks.shape[-1], device=blocks.device)
    return _spd_solve(blocks, eye.expand_as(blocks).contiguous())


def solve_b(prob: FullProblem, a, s, b, steps: int = B_STEPS) -> torch.Tensor:
    """Block-Jacobi PCG on ``T(B) = N`` from the current ``B`` (each step lowers the quadratic)."""
    m, n = b_terms(prob, a, s)
    m_inv, g_inv = _inverse_blocks(diag_blocks(m, prob.bi)), _inverse_blocks(diag_blocks(prob.g, prob.bi))
    x = b.clone()
    res = n - b_operator(m, prob.g, x)
    z = m_inv @ res @ g_inv
    d, rz = z, float((res * z).sum())
    for _ in range(steps):
        if not rz > 0:
            break
        td = b_operator(m, prob.g, d)
        dtd = float((d * td).sum())
        if not dtd > 0:
            break
        step = rz / dtd
        x += step * d
        res -= step * td
        z = m_inv @ res @ g_inv
        rz_new = float((res * z).sum())
        d, rz = z + (rz_new / rz) * d, rz_new
    return x


def value_terms(prob: FullProblem, a, b):
    """``P_i = A_iᵀ R_i A_i`` ``[no, bo, bo]``, ``Q = B̂ G B̂ᵀ`` ``[d_in, d_in]``, ``RHS = Âᵀ R W̄ G B̂ᵀ``."""
    p = a.transpose(1, 2) @ (a * prob.rho.reshape(prob.no, prob.bo, 1))
    bt = b.transpose(1, 2).contiguous()
    q = left(b, right(prob.g, bt))
    q = 0.5 * (q + q.T)
    rhs = left(a.transpose(1, 2).contiguous(), right(prob.wg, bt) * prob.rho[:, None])
    return p, q, rhs


def pxq(p, x, q) -> torch.Tensor:
    """``P̂ X Q`` with block-diagonal ``P̂`` and full ``Q``."""
    return left(p, x) @ q


def solve_values(prob: FullProblem, p, q, rhs, s, mask, steps: int = CG_STEPS) -> torch.Tensor:
    """Jacobi-PCG on the kept values, warm-started at ``s`` (each step lowers the quadratic)."""
    x = s * mask
    res = (rhs - pxq(p, x, q)) * mask
    inv = torch.outer(torch.diagonal(p, dim1=1, dim2=2).reshape(-1), q.diagonal())
    inv = inv.clamp_min_(1e-30).reciprocal_().mul_(mask)
    z = res * inv
    d, rz = z, float((res * z).sum())
    for _ in range(steps):
        if not rz > 0:
            break
        td = pxq(p, d, q).mul_(mask)
        dtd = float((d * td).sum())
        if not dtd > 0:
            break
        step = rz / dtd
        x.add_(d, alpha=step)
        res.sub_(td, alpha=step)
        z = res * inv
        rz_new = float((res * z).sum())
        d, rz = z + (rz_new / rz) * d, rz_new
    return x


def diag_blocks4(q: torch.Tensor) -> torch.Tensor:
    """The 4x4 diagonal blocks of the full ``Q``: ``[d_in/4, 4, 4]`` (one per 2:4 group)."""
    return diag_blocks(q, 4)


def _selection_change(grad, delta, p, q) -> float:
    """Exact change of the loss numerator for ``S += delta``: ``<∇, Δ> + <Δ, P Δ Q>``."""
    return float((grad * delta).sum() + (delta * pxq(p, delta, q)).sum())


def support_step(prob: FullProblem, s, mask, grad, p, q, tries: int = 4):
    """Best 2-of-4 support per group, many groups at once where the exact change allows.

    Returns new ``(s, mask)`` (copies; the inputs are untouched) and the numerator decrease.
    """
    d_out, d_in = s.shape
    alpha = torch.diagonal(p, dim1=1, dim2=2).reshape(-1)
    imp, best, pair_vals = sparse_step.all_group_pairs(grad, s, alpha, diag_blocks4(q))
    vals, keep = sparse_step.expand_pairs(best, pair_vals)
    s4, m4 = s.reshape(d_out, -1, 4), mask.reshape(d_out, -1, 4)
    k = int((imp > 0).sum())
    for attempt in range(tries):
        if k <= prob.no:
            break
        sel = imp > 0 if attempt == 0 else imp >= torch.kthvalue(imp.reshape(-1), imp.numel() - k + 1).values
        sel = sel & (imp > 0)
        delta = ((vals - s4) * sel.unsqueeze(-1)).reshape(d_out, d_in)
        change = _selection_change(grad, delta, p, q)
        if change < 0:
            return _apply(s4, m4, vals, keep, sel, d_in), -change
        k //= 2
    # fallback: the best group of each output block; P is block-diagonal, so they do not interact
    per_block = imp.reshape(prob.no, -1)
    top = per_block.argmax(1)
    sel = torch.zeros_like(per_block, dtype=torch.bool)
    sel[torch.arange(prob.no, device=s.device), top] = True
    sel = sel.reshape(imp.shape) & (imp > 0)
    return _apply(s4, m4, vals, keep, sel, d_in), float(imp[sel].sum())


def _apply(s4, m4, vals, keep, sel, d_in):
    sel4 = sel.unsqueeze(-1)
    s_new = torch.where(sel4, vals, s4).reshape(-1, d_in)
    m_new = torch.where(sel4, keep, m4).reshape(-1, d_in)
    return s_new, m_new


def fit_fullcov(prob: FullProblem, a, s, mask, b, sweeps: int = DEFAULT_SWEEPS, time_budget: float | None = None,
                cg_steps: int = CG_STEPS, b_steps: int = B_STEPS):
    """Sweeps of A, B, values and support from (A, S, mask, B); every step is kept only if the loss does not rise.

    Returns a ``Fit`` whose ``trace`` holds ``(seconds, loss)`` after each sweep.
    """
    t0 = time.perf_counter()
    loss = prob.loss(a, s, b)
    trace = []
    for sweep in range(sweeps):
        if time_budget is not None and time.perf_counter() - t0 >= time_budget:
            break
        start = loss
        a_new = solve_a(prob, s, b)
        a, loss = _keep_better(loss, a, a_new, prob.loss(a_new, s, b))
        b_new = solve_b(prob, a, s, b, b_steps)
        b, loss = _keep_better(loss, b, b_new, prob.loss(a, s, b_new))
        p, q, rhs = value_terms(prob, a, b)
        s_new = solve_values(prob, p, q, rhs, s, mask, cg_steps)
        s, loss = _keep_better(loss, s, s_new, prob.loss(a, s_new, b))
        if sweep % SUPPORT_EVERY == 0:
            grad = 2.0 * (pxq(p, s, q) - rhs)
            (s_new, m_new), _ = support_step(prob, s, mask, grad, p, q)
            del grad
            l_new = prob.loss(a, s_new, b)
            if l_new <= loss:
                s, mask, loss = s_new, m_new, l_new
        trace.append((time.perf_counter() - t0, loss))
        if start - loss <= RTOL * start:
            break
    return Fit(a, s, mask, b, loss, trace, len(trace))


def _keep_better(loss: float, old, new, l_new: float):
    """The new state if its loss is not above the current one (the monotone rule)."""
    return (new, l_new) if l_new <= loss else (old, loss)


def deployed_loss(weight: torch.Tensor, packed, xtx: torch.Tensor, damp: float = DAMP) -> float:
    """``||(W − Ŵ)X||² / ||WX||²`` (damped ``Σ``) of the packed, cast weights, in the original space."""
    from armor_kernels import reference

    w = weight.float()
    w_hat = reference.materialize(packed.a, packed.values, packed.meta, packed.b).to(w.device, torch.float32)
    sigma = xtx.to(w.device, torch.float32).clone()
    sigma.diagonal().add_(damp * float(sigma.diagonal().mean()) + 1e-12)
    e = w - w_hat
    return float(((e @ sigma) * e).sum() / ((w @ sigma) * w).sum())
