"""The sparse-core step: re-choose the 2:4 support of groups of 4 and refit their 2 values.

With A, B and the rest of S fixed, the loss numerator as a function of the 4
entries ``s`` of one group (row ``y``, columns ``4g..4g+3``) is

    f(s) = const − 2 sᵀ β + sᵀ (α M) s,
    β = −½ ∂num/∂S[y, g] + α M s0,   α = P[y, y] = ||A[:, y]||²,   M = Q[g, g] (4x4 block of B H Bᵀ),

where ``s0`` holds the group's current values. For each of the 6 two-of-four
supports the best 2 values solve a 2x2 system (damped by 1e-9 times its mean
diagonal); the gain over the current values is exact, so a group changes only
when the loss drops. Groups in different block pairs do not interact, so one
group per block pair is updated in parallel with an exactly known loss change.
"""

from __future__ import annotations

import torch

from .armor_problem import left, pxq, right

# the 6 two-of-four supports, in the order of ``armor_kernels.sparse24.PAIRS``
_I0 = (0, 0, 0, 1, 1, 2)
_I1 = (1, 2, 3, 2, 3, 3)
DAMP = 1e-9  # relative damping of the 2x2 Gram matrices


def diag_blocks4(q: torch.Tensor) -> torch.Tensor:
    """The 4x4 diagonal blocks of blockdiag(q): ``[d_in/4, 4, 4]``."""
    ni, bi, _ = q.shape
    nb = bi // 4
    d = torch.diagonal(q.reshape(ni, nb, 4, nb, 4), dim1=1, dim2=3)  # [ni, 4, 4, nb]
    return d.permute(0, 3, 1, 2).reshape(ni * nb, 4, 4)


def _best_pairs(beta, mpp, mqq, mpq, cur):
    """Improvement, best pair index and its two values (``[..., 2]``) per group."""
    i0 = torch.tensor(_I0, device=beta.device)
    i1 = torch.tensor(_I1, device=beta.device)
    bp, bq = beta[..., i0], beta[..., i1]
    damp = DAMP * 0.5 * (mpp + mqq) + 1e-30
    g00, g11 = mpp + damp, mqq + damp
    det = (g00 * g11 - mpq * mpq).clamp_min(1e-30)
    sp = (g11 * bp - mpq * bq) / det
    sq = (g00 * bq - mpq * bp) / det
    # the exact (undamped) decrease of f relative to an all-zero group
    gain = 2 * (sp * bp + sq * bq) - (sp * sp * mpp + 2 * sp * sq * mpq + sq * sq * mqq)
    gain = torch.where(torch.isfinite(gain), gain, torch.full_like(gain, -float("inf")))
    best_gain, best = gain.max(-1)
    b1 = best.unsqueeze(-1)
    return best_gain - cur, best, torch.cat([sp.gather(-1, b1), sq.gather(-1, b1)], -1)


def expand_pairs(best: torch.Tensor, pq: torch.Tensor):
    """Pair index ``[...]`` and values ``[..., 2]`` -> (values ``[..., 4]``, keep ``[..., 4]``)."""
    i0 = torch.tensor(_I0, device=pq.device)[best.long()].unsqueeze(-1)
    i1 = torch.tensor(_I1, device=pq.device)[best.long()].unsqueeze(-1)
    new = pq.new_zeros(*pq.shape[:-1], 4)
    new.scatter_(-1, i0, pq[..., :1])
    new.scatter_(-1, i1, pq[..., 1:])
    keep = torch.zeros(new.shape, dtype=torch.bool, device=pq.device)
    keep.scatter_(-1, i0, True)
    keep.scatter_(-1, i1, True)
    return new, keep


def best_supports(beta, mpp, mqq, mpq, cur):
    """Best support and values per group.

    ``beta`` ``[..., 4]``; ``mpp``, ``mqq``, ``mpq`` ``[..., 6]``: the entries of α M for
    each candidate pair (p, q); ``cur`` ``[...]``: the current values' decrease of f
    relative to an all-zero group. Returns (improvement ``[...]`` over the current
    values, new values ``[..., 4]``, new keep-mask ``[..., 4]``).
    """
    improvement, best, pair_values = _best_pairs(beta, mpp, mqq, mpq, cur)
    new, keep = expand_pairs(best, pair_values)
    return improvement, new, keep


def _terms(grad4, s0, alpha, qgg):
    """β, the pair entries of α M and the current decrease, for groups laid out alike.

    ``grad4``/``s0`` ``[..., 4]``, ``alpha`` broadcastable to ``[...]``, ``qgg`` ``[..., 4, 4]``
    (broadcast over leading dims); no tiny matmuls (slow on CPU): products are sums.
    """
    i0 = torch.tensor(_I0, device=s0.device)
    i1 = torch.tensor(_I1, device=s0.device)
    qs0 = (qgg * s0.unsqueeze(-2)).sum(-1)  # M s0
    al = alpha.unsqueeze(-1)
    beta = -0.5 * grad4 + al * qs0
    cur = 2 * (s0 * beta).sum(-1) - alpha * (s0 * qs0).sum(-1)
    mpp = al * qgg[..., i0, i0]
    mqq = al * qgg[..., i1, i1]
    mpq = al * qgg[..., i0, i1]
    return beta, mpp, mqq, mpq, cur


def selected_improvements(grad, s, alpha, qgg, rows, groups):
    """Best support for the groups ``(rows[k], groups[k])``: (improvement, values, keep)."""
    d_out = s.shape[0]
    grad4, s4 = grad.reshape(d_out, -1, 4), s.reshape(d_out, -1, 4)
    return best_supports(*_terms(grad4[rows, groups], s4[rows, groups], alpha[rows], qgg[groups]))


def all_group_pairs(grad, s, alpha, qgg, chunk_groups: int = 1 << 13):
    """Best support for every group, compactly: (improvement ``[d_out, G]``, pair index
    uint8 ``[d_out, G]``, the pair's values ``[d_out, G, 2]``): 0.56x the size of S.

    Rows go in chunks of about ``chunk_groups`` groups so the ~30 temporaries of the
    6-pair evaluation stay small (8,192 groups x 6 pairs: 192 KiB each).
    """
    d_out, d_in = s.shape
    g = d_in // 4
    chunk_rows = max(1, chunk_groups // g)
    grad4, s4 = grad.reshape(d_out, g, 4), s.reshape(d_out, g, 4)
    imp = torch.empty(d_out, g, device=s.device)
    best = torch.empty(d_out, g, dtype=torch.uint8, device=s.device)
    vals = torch.empty(d_out, g, 2, device=s.device)
    for r0 in range(0, d_out, chunk_rows):
        r1 = min(r0 + chunk_rows, d_out)
        imp[r0:r1], best[r0:r1], vals[r0:r1] = _best_pairs(
            *_terms(grad4[r0:r1], s4[r0:r1], alpha[r0:r1].reshape(-1, 1), qgg))
    return imp, best, vals


def _pair_view(x: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """``[d_out, G, ...]`` -> ``[no, ni, bo * bi/4, ...]`` (groups of each block pair last)."""
    d_out, g = x.shape[:2]
    nb = bi // 4
    rest = x.shape[2:]
    y = x.reshape(d_out // bo, bo, g // nb, nb, *rest).transpose(1, 2)
    return y.reshape(d_out // bo, g // nb, bo * nb, *rest)


def pair_groups_to_index(flat: torch.Tensor, bo: int, bi: int, n_groups: int):
    """Index within each block pair ``[no, ni, k]`` -> global (rows, groups), flattened."""
    no, ni = flat.shape[:2]
    nb = bi // 4
    i = torch.arange(no, device=flat.device).reshape(no, 1, 1)
    j = torch.arange(ni, device=flat.device).reshape(1, ni, 1)
    rows = i * bo + flat // nb
    groups = j * nb + flat % nb
    return rows.reshape(-1), groups.reshape(-1)


def sample_groups(grad: torch.Tensor, bo: int, bi: int, generator=None):
    """One group per block pair, drawn with probability ∝ the L1 norm of ``grad`` over its 4 entries."""
    d_out, d_in = grad.shape
    l1 = grad.abs().reshape(d_out, d_in // 4, 4).sum(-1)
    pv = _pair_view(l1, bo, bi)
    no, ni, n = pv.shape
    probs = pv.reshape(no * ni, n) + 1e-30  # an exactly fitted block still draws a group
    idx = torch.multinomial(probs, 1, generator=generator).reshape(no, ni, 1)
    return pair_groups_to_index(idx, bo, bi, d_in // 4)


def apply_groups(s, mask, rows, groups, vals, keep, improve):
    """Write new values/support for the groups whose ``improve`` > 0; return the applied ΔS rows."""
    ok = improve > 0
    rows, groups = rows[ok], groups[ok]
    d_out, d_in = s.shape
    s4, m4 = s.view(d_out, d_in // 4, 4), mask.view(d_out, d_in // 4, 4)
    delta = vals[ok] - s4[rows, groups]
    s4[rows, groups] = vals[ok]
    m4[rows, groups] = keep[ok]
    return rows, groups, delta, float(improve[ok].sum())


def sampled_step(prob, s, mask, grad, p, q, generator=None) -> float:
    """The paper's step: one sampled group per block pair, best of 6 supports. Returns the numerator decrease."""
    rows, groups = sample_groups(grad, prob.bo, prob.bi, generator)
    alpha = torch.diagonal(p, dim1=1, dim2=2).reshape(-1)
    imp, vals, keep = selected_improvements(grad, s, alpha, diag_blocks4(q), rows, groups)
    return apply_groups(s, mask, rows, groups, vals, keep, imp)[3]


def _delta_dense(shape, rows, groups, delta, device):
    d = torch.zeros(shape[0], shape[1] // 4, 4, device=device)
    d[rows, groups] = delta
    return d.reshape(shape)


def greedy_step(prob, s, mask, grad, p, q, tries: int = 3) -> float:
    """Exact-solver step: many groups at once where that pays, never a loss increase.

    Every group's best support is evaluated (others fixed). First all improving
    groups are switched together and the exact loss change is checked
    (``Δnum = <grad, ΔS> + <ΔS, P ΔS Q>``); if it is not a decrease, the top half,
    then a quarter are tried; the fallback, the best group of each block pair, is
    exact by construction. Updates ``s``, ``mask`` and ``grad`` in place; returns
    the numerator decrease. Selections are boolean masks, candidates are kept as a
    pair index and 2 values per group, and ΔS and ``P ΔS Q`` are built per row
    chunk (``P`` is block-diagonal over rows), so the step needs about half a
    matrix of its own beyond its inputs.
    """
    d_out, d_in = s.shape
    bo = prob.bo
    alpha = torch.diagonal(p, dim1=1, dim2=2).reshape(-1)
    qgg = diag_blocks4(q)
    imp, best, pair_vals = all_group_pairs(grad, s, alpha, qgg)
    s4, m4 = s.view(d_out, -1, 4), mask.view(d_out, -1, 4)
    pos = imp > 0
    n_pos = int(pos.sum())
    n_pairs = prob.no * prob.ni
    k = n_pos

    def delta_rows(sel, r0, r1):  # ΔS rows r0:r1 and the new values/keep there
        vals, keep = expand_pairs(best[r0:r1], pair_vals[r0:r1])
        sel4 = sel[r0:r1].unsqueeze(-1)
        return (vals - s4[r0:r1]).mul_(sel4).reshape(r1 - r0, d_in), vals, keep, sel4

    for _ in range(tries):
        if k <= n_pairs:
            break
        if k == n_pos:
            sel = pos
        else:  # the k largest improvements (ties may add a few)
            sel = imp >= torch.kthvalue(imp.reshape(-1), imp.numel() - k + 1).values
        change = torch.zeros(d_out, device=s.device)
        for r0, r1 in prob.chunks():
            dense = delta_rows(sel, r0, r1)[0]
            pdq = left(p[r0 // bo:r1 // bo], right(dense, q))
            change[r0:r1] = (grad[r0:r1] * dense).sum(1) + (dense * pdq).sum(1)
        change = float(change.sum())
        if change < 0:
            for r0, r1 in prob.chunks():  # P ΔS Q again, now to update the gradient (cheaper than a full copy)
                dense, vals, keep, sel4 = delta_rows(sel, r0, r1)
                grad[r0:r1].add_(left(p[r0 // bo:r1 // bo], right(dense, q)), alpha=2.0)
                s4[r0:r1] = torch.where(sel4, vals, s4[r0:r1])
                m4[r0:r1] = torch.where(sel4, keep, m4[r0:r1])
            return -change
        k //= 2
    return _best_group_per_pair(prob, s, mask, grad, p, q, imp, best, pair_vals)


def _best_group_per_pair(prob, s, mask, grad, p, q, imp, best, pair_vals) -> float:
    """``greedy_step``'s fallback: switch the best group of each block pair (independent, so exact)."""
    top = _pair_view(imp, prob.bo, prob.bi).argmax(-1, keepdim=True)
    rows, groups = pair_groups_to_index(top, prob.bo, prob.bi, s.shape[1] // 4)
    vals, keep = expand_pairs(best[rows, groups], pair_vals[rows, groups])
    rows, groups, delta, gained = apply_groups(s, mask, rows, groups, vals, keep, imp[rows, groups])
    if rows.numel():
        dense = _delta_dense(s.shape, rows, groups, delta, s.device)
        grad.add_(pxq(p, dense, q), alpha=2.0)
    return gained
