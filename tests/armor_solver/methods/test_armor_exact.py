"""Each closed-form ARMOR update checked against autograd on small random problems."""

import itertools

import pytest
import torch

from armor_solver.methods import armor_exact, sparse_step
from armor_solver.methods.armor_problem import Problem, left, right
from armor_solver.methods.nowag_p import nowag_mask

D_OUT, D_IN, BO, BI = 24, 32, 8, 16


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, D_IN, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    h = torch.rand(D_IN, generator=g) * 2 + 0.05
    prob = Problem(w, h, BO, BI)
    mask = nowag_mask(w, h)
    a, b = prob.identity_wrappers()
    # perturbed wrappers so no update starts at a special point
    a = a + 0.1 * torch.randn(a.shape, generator=g)
    b = b + 0.1 * torch.randn(b.shape, generator=g)
    return prob, a, w * mask, mask, b


def _grads(prob, a, s, b):
    a, s, b = (t.clone().requires_grad_(True) for t in (a, s, b))
    num = ((prob.w - prob.w_hat(a, s, b)).square() * prob.h).sum()
    num.backward()
    return a.grad, s.grad, b.grad


def test_products_match_dense_blockdiag():
    prob, a, s, _, b = _problem()
    A = torch.block_diag(*a)
    B = torch.block_diag(*b)
    torch.testing.assert_close(prob.w_hat(a, s, b), A @ s @ B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(left(a, s), A @ s)
    torch.testing.assert_close(right(s, b), s @ B)


def test_core_gradient_matches_autograd():
    prob, a, s, _, b = _problem()
    p, q = prob.p_q(a, b)
    grad = prob.core_grad(s, p, q, prob.core_rhs(a, b))
    torch.testing.assert_close(grad, _grads(prob, a, s, b)[1], rtol=1e-4, atol=1e-5)


def test_a_update_is_stationary_and_does_not_increase_loss():
    prob, a, s, _, b = _problem()
    before = prob.loss(a, s, b)
    g_before = _grads(prob, a, s, b)[0].norm()
    a_new, _ = armor_exact.solve_a(prob, s, b)
    assert prob.loss(a_new, s, b) <= before
    assert _grads(prob, a_new, s, b)[0].norm() < 1e-3 * g_before


def test_b_update_is_stationary_and_does_not_increase_loss():
    prob, a, s, _, b = _problem(1)
    before = prob.loss(a, s, b)
    g_before = _grads(prob, a, s, b)[2].norm()
    b_new, _ = armor_exact.solve_b(prob, a, s)
    assert prob.loss(a, s, b_new) <= before
    assert _grads(prob, a, s, b_new)[2].norm() < 1e-3 * g_before


def test_value_solve_converges_to_masked_stationary_point_monotonically():
    prob, a, s, mask, b = _problem(2)
    g_before = (_grads(prob, a, s, b)[1] * mask).norm()
    losses = [prob.loss(a, s, b)]
    for steps in (1, 2, 3, 5):
        x = armor_exact.solve_values(prob, a, s, b, mask, steps)[0]
        losses.append(prob.loss(a, x, b))
        assert bool((x[~mask] == 0).all())  # pruned entries stay pruned
    assert all(l1 <= l0 * (1 + 1e-6) for l0, l1 in itertools.pairwise(losses))
    x, res = armor_exact.solve_values(prob, a, s, b, mask, 200)[:2]
    grad = _grads(prob, a, x, b)[1]
    assert (grad * mask).norm() < 1e-3 * g_before
    # the returned dense residual is −½ the gradient w.r.t. the dense core
    torch.testing.assert_close(-2 * res, grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()))


def _brute_group(prob, a, s, b, row, group):
    """Best loss over the 6 supports of one group, each with exact weighted least-squares values."""
    base = s.clone()
    base[row, 4 * group : 4 * group + 4] = 0
    sqrt_h = prob.h.sqrt()
    resid = ((prob.w - prob.w_hat(a, base, b)) * sqrt_h).reshape(-1).double()
    best = float("inf")
    for pair in itertools.combinations(range(4), 2):
        cols = []
        for k in pair:  # the reconstruction moves linearly with each kept value
            unit = torch.zeros_like(s)
            unit[row, 4 * group + k] = 1.0
            cols.append((prob.w_hat(a, unit, b) * sqrt_h).reshape(-1).double())
        design = torch.stack(cols, 1)
        v = torch.linalg.lstsq(design, resid[:, None]).solution
        best = min(best, float((resid - (design @ v)[:, 0]).square().sum()))
    return best / prob.denom


def test_group_step_matches_brute_force_and_predicts_exact_change():
    prob, a, s, _, b = _problem(3)
    p, q = prob.p_q(a, b)
    grad = prob.core_grad(s, p, q, prob.core_rhs(a, b))
    alpha = torch.diagonal(p, dim1=1, dim2=2).reshape(-1)
    rows, groups = torch.tensor([0, 5, 17]), torch.tensor([1, 4, 7])
    imp, vals, keep = sparse_step.selected_improvements(grad, s, alpha, sparse_step.diag_blocks4(q), rows, groups)
    before = prob.loss(a, s, b)
    for k in range(3):
        r, g = int(rows[k]), int(groups[k])
        t = s.clone()
        t[r, 4 * g : 4 * g + 4] = vals[k]
        after = prob.loss(a, t, b)
        assert imp[k] >= 0
        assert after == pytest.approx(before - float(imp[k]) / prob.denom, rel=1e-4, abs=1e-7)
        assert after == pytest.approx(_brute_group(prob, a, s, b, r, g), rel=1e-4, abs=1e-7)
        assert int(keep[k].sum()) == 2 and bool((vals[k][~keep[k]] == 0).all())


@pytest.mark.parametrize("kind", ["sampled", "greedy"])
def test_sparse_steps_decrease_loss_by_the_reported_amount(kind):
    prob, a, s, mask, b = _problem(4)
    p, q = prob.p_q(a, b)
    grad = prob.core_grad(s, p, q, prob.core_rhs(a, b))
    before = prob.loss(a, s, b)
    s2, m2, g2 = s.clone(), mask.clone(), grad.clone()
    if kind == "sampled":
        gained = sparse_step.sampled_step(prob, s2, m2, g2, p, q, torch.Generator().manual_seed(0))
    else:
        gained = sparse_step.greedy_step(prob, s2, m2, g2, p, q)
        # the gradient is kept up to date in place
        torch.testing.assert_close(g2, prob.core_grad(s2, p, q, prob.core_rhs(a, b)), rtol=1e-3, atol=1e-5)
    after = prob.loss(a, s2, b)
    assert gained > 0 and (m2 != mask).any()
    assert after == pytest.approx(before - gained / prob.denom, rel=1e-4)
    assert bool((s2[~m2] == 0).all())
    assert bool((m2.reshape(D_OUT, -1, 4).sum(-1) == 2).all())
