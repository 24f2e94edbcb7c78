"""The Adam solver must actually descend, not only keep its starting point."""

import torch

from armor_solver.methods import armor_adam
from armor_solver.methods.armor_problem import Problem
from armor_solver.methods.normalize import normalize
from armor_solver.methods.nowag_p import nowag_mask


def _problem(seed=5, d=64, block=16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g)
    h = torch.rand(d, generator=g) + 0.1
    w_bar = normalize(w)[0]
    prob = Problem(w_bar, h, block, block)
    mask = nowag_mask(w_bar, h)
    a, b = prob.identity_wrappers()
    return prob, a, w_bar * mask, mask, b


def test_thirty_steps_cut_the_loss_by_a_third():
    prob, a, s, mask, b = _problem()
    start = prob.loss(a, s, b)
    # seen: 0.1316 -> 0.0851 at lr 1e-3 in 30 steps; a solver whose steps do nothing stays at 0.1316
    fit = armor_adam.fit_adam(prob, a, s, mask, b, iters=30, lr=1e-3)
    assert fit.loss < 0.8 * start
    assert fit.iters == 30 and len(fit.trace) == 31
    assert fit.trace[-1][1] < fit.trace[0][1]
    torch.testing.assert_close(prob.loss(fit.a, fit.s, fit.b), fit.loss, rtol=1e-5, atol=0)  # the state is the loss's


def test_the_default_rate_descends_too():
    prob, a, s, mask, b = _problem(seed=6)
    start = prob.loss(a, s, b)
    fit = armor_adam.fit_adam(prob, a, s, mask, b, iters=30)
    assert fit.loss < 0.99 * start
    assert bool(((fit.s != 0) <= fit.mask).all())  # values stay on the 2:4 support
    assert bool((fit.mask.reshape(64, 16, 4).sum(-1) == 2).all())
