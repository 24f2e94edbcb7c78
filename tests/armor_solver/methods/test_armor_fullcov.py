"""The full-covariance ARMOR fit: each update against autograd, its guarantee against SparseGPT, a whole prune."""

import itertools

import pytest
import torch

from armor_kernels import reference
from armor_solver import methods as registry
from armor_solver.methods import armor, armor_fullcov, sparsegpt
from armor_solver.methods.armor_problem import Fit, left, right
from armor_solver.methods.base import PruneConfig
from armor_solver.methods.normalize import normalize
from armor_solver.pipeline import Calibration, PruneSettings, prune_model
from armor_solver.stats import LayerStats

D_OUT, D_IN, BO, BI = 24, 32, 8, 16


def _stats(d_in, n=512, seed=0, rank=None):
    """Correlated inputs (a random mixing), so the covariance has real cross terms."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or d_in, generator=g) @ torch.randn(rank or d_in, d_in, generator=g)
    x = x + 0.3 * torch.randn(n, d_in, generator=g)
    stats = LayerStats.empty(d_in, full=True)
    stats.add(x)
    return stats, x


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_IN, generator=g) * (torch.rand(D_OUT, 1, generator=g) + 0.5)
    stats, x = _stats(D_IN, seed=seed)
    w_bar, r, c = normalize(weight)
    prob = armor_fullcov.FullProblem(w_bar, armor_fullcov.covariance(stats.xtx, c, 0.0), r.square(), BO, BI)
    a = torch.eye(BO).repeat(D_OUT // BO, 1, 1) + 0.1 * torch.randn(D_OUT // BO, BO, BO, generator=g)
    b = torch.eye(BI).repeat(D_IN // BI, 1, 1) + 0.1 * torch.randn(D_IN // BI, BI, BI, generator=g)
    mask = torch.rand(D_OUT, D_IN // 4, 4, generator=g).argsort(-1).argsort(-1).lt(2).reshape(D_OUT, D_IN)
    s = w_bar * mask
    return prob, a, s, mask, b, (weight, x, r, c)


def _numerator(prob, a, s, b):
    e = prob.w - left(a, right(s, b))
    return (prob.rho * ((e @ prob.g) * e).sum(1)).sum()


def _grads(prob, a, s, b):
    a, s, b = (t.clone().requires_grad_(True) for t in (a, s, b))
    _numerator(prob, a, s, b).backward()
    return a.grad, s.grad, b.grad


def test_the_loss_is_the_layer_output_error():
    prob, a, s, _, b, (weight, x, r, c) = _problem()
    w_hat = r[:, None] * left(a, right(s, b)) * c
    direct = float(((weight - w_hat) @ x.T).square().sum() / (weight @ x.T).square().sum())
    assert prob.loss(a, s, b) == pytest.approx(direct, rel=1e-4)


def test_value_gradient_matches_autograd():
    prob, a, s, _, b, _ = _problem()
    p, q, rhs = armor_fullcov.value_terms(prob, a, b)
    grad = 2.0 * (armor_fullcov.pxq(p, s, q) - rhs)
    torch.testing.assert_close(grad, _grads(prob, a, s, b)[1], rtol=1e-3, atol=1e-4)


def test_b_gradient_matches_autograd():
    prob, a, s, _, b, _ = _problem()
    m, n = armor_fullcov.b_terms(prob, a, s)
    grad = -2.0 * (n - armor_fullcov.b_operator(m, prob.g, b))
    torch.testing.assert_close(grad, _grads(prob, a, s, b)[2], rtol=1e-3, atol=1e-4)


def test_a_update_is_stationary():
    prob, a, s, _, b, _ = _problem()
    before, g_before = prob.loss(a, s, b), _grads(prob, a, s, b)[0].norm()
    a_new = armor_fullcov.solve_a(prob, s, b)
    assert prob.loss(a_new, s, b) < before
    assert _grads(prob, a_new, s, b)[0].norm() < 1e-3 * g_before


def test_b_cg_lowers_the_loss_every_step_and_converges():
    prob, a, s, _, b, _ = _problem()
    losses = [prob.loss(a, s, armor_fullcov.solve_b(prob, a, s, b, steps)) for steps in (0, 1, 2, 4, 8)]
    assert all(l1 <= l0 * (1 + 1e-6) for l0, l1 in itertools.pairwise(losses)) and losses[-1] < losses[0]
    b_opt = armor_fullcov.solve_b(prob, a, s, b, steps=300)
    assert _grads(prob, a, s, b_opt)[2].norm() < 1e-3 * _grads(prob, a, s, b)[2].norm()


def test_value_cg_converges_to_the_masked_optimum():
    prob, a, s, mask, b, _ = _problem()
    p, q, rhs = armor_fullcov.value_terms(prob, a, b)
    s_opt = armor_fullcov.solve_values(prob, p, q, rhs, s, mask, steps=400)
    assert not bool(s_opt[~mask].any())  # the support is kept
    g0, g1 = _grads(prob, a, s, b)[1] * mask, _grads(prob, a, s_opt, b)[1] * mask
    assert g1.norm() < 1e-3 * g0.norm()
    assert prob.loss(a, s_opt, b) < prob.loss(a, s, b)


def test_group_change_formula_is_exact_with_the_cross_terms():
    prob, a, s, _mask, b, _ = _problem()
    p, q, rhs = armor_fullcov.value_terms(prob, a, b)
    grad = 2.0 * (armor_fullcov.pxq(p, s, q) - rhs)
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(D_OUT, D_IN, generator=g) * (torch.rand(D_OUT, D_IN, generator=g) < 0.2)
    change = armor_fullcov._selection_change(grad, delta, p, q)
    actual = float(_numerator(prob, a, s + delta, b) - _numerator(prob, a, s, b))
    assert change == pytest.approx(actual, rel=1e-3, abs=1e-5)


def test_support_step_never_raises_the_loss_and_keeps_2_of_4():
    prob, a, s, mask, b, _ = _problem()
    p, q, rhs = armor_fullcov.value_terms(prob, a, b)
    grad = 2.0 * (armor_fullcov.pxq(p, s, q) - rhs)
    (s_new, m_new), gained = armor_fullcov.support_step(prob, s, mask, grad, p, q)
    assert bool((m_new.reshape(D_OUT, -1, 4).sum(-1) == 2).all()) and not bool(s_new[~m_new].any())
    actual = float(_numerator(prob, a, s, b) - _numerator(prob, a, s_new, b))
    assert gained > 0 and actual == pytest.approx(gained, rel=1e-3)


def _sparsegpt_full_loss(weight, stats, damp=armor_fullcov.DAMP):
    w, mask = sparsegpt.solve(weight, stats, damp)
    sigma = stats.xtx + damp * stats.xtx.diagonal().mean() * torch.eye(stats.xtx.shape[0])
    e = weight - w * mask
    return float(((e @ sigma) * e).sum() / ((weight @ sigma) * weight).sum())


@pytest.mark.parametrize("seed,shape,block", [(0, (32, 64), 16), (1, (64, 32), 8), (2, (48, 96), 12), (3, (16, 128), 32)])
def test_never_worse_than_sparsegpt(seed, shape, block):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=g) * (torch.rand(shape[0], 1, generator=g) + 0.2)
    stats, _ = _stats(shape[1], n=256, seed=seed, rank=shape[1] // 2)  # low rank: strong cross terms
    info = armor.prune(weight, stats, PruneConfig(block_size=block, extra={"solver": "fullcov"})).info
    start = _sparsegpt_full_loss(weight, stats)
    assert info["full_loss_sparsegpt"] == pytest.approx(start, rel=1e-3)
    assert info["full_loss"] <= info["full_loss_sparsegpt"]
    assert info["full_loss"] < 0.9 * start  # the wrappers and the value step do gain on SparseGPT
    assert info["full_loss_deployed"] == pytest.approx(info["full_loss"], rel=1e-3)  # fp32: stored = fitted
    assert all(l1 <= l0 for l0, l1 in zip(info["losses"], info["losses"][1:]))


def test_a_rise_above_sparsegpt_is_refused(monkeypatch):
    weight = torch.randn(16, 32)
    stats, _ = _stats(32)

    def worse(prob, a, s, mask, b, *args):
        return Fit(a, s, mask, b, 2.0, [(0.0, 2.0)], 1)

    monkeypatch.setattr(armor_fullcov, "fit_fullcov", worse)
    with pytest.raises(RuntimeError, match="above the SparseGPT start"):
        armor.prune(weight, stats, PruneConfig(block_size=8, extra={"solver": "fullcov"}))


def test_options_and_statistics():
    assert registry.needs_xtx("armor", {"solver": "fullcov"}) and not registry.needs_xtx("armor", {})
    registry.check_options("armor", {"solver": "fullcov", "damp": 0.1, "sweeps": 2, "cg_steps": 4})
    with pytest.raises(ValueError, match="applies only with --solver fullcov"):
        registry.check_options("armor", {"damp": 0.1})
    stats = LayerStats.empty(32)
    stats.add(torch.randn(64, 32))
    with pytest.raises(ValueError, match="needs the full XᵀX"):
        armor.prune(torch.randn(16, 32), stats, PruneConfig(block_size=8, extra={"solver": "fullcov"}))


def test_prune_a_tiny_model_with_fullcov(solver_make_model):
    model = solver_make_model()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    settings = PruneSettings(model="tiny", method="armor", nsamples=4, seqlen=32, block_size=16, text="t.txt",
                             extra={"solver": "fullcov", "sweeps": 3})
    result = prune_model(model, None, settings, calib=Calibration(ids=ids), log=lambda s: None)
    assert len(result.layers) == 14
    for name, info in result.layers.items():
        assert info["solver"] == "fullcov"
        assert info["full_loss"] <= info["full_loss_sparsegpt"], name
        w = result.weights[name]
        w_hat = reference.materialize(w.a, w.values, w.meta, w.b)
        assert torch.isfinite(w_hat).all() and (w.block_out, w.block_in) == armor.block_sizes(*w_hat.shape, 16)
    assert sum(i["full_loss"] for i in result.layers.values()) < sum(i["full_loss_sparsegpt"] for i in result.layers.values())
