import pytest
import torch

from armor_kernels import reference, sparse24
from armor_solver.methods import magnitude, sparsegpt, wanda
from armor_solver.methods.base import PruneConfig
from armor_solver.stats import LayerStats


def correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.rand(d, generator=g) * 3 + 0.1
    return (torch.randn(n, d, generator=g) @ mix) * scale


def stats_of(x, full=False):
    s = LayerStats.empty(x.shape[1], full=full)
    s.add(x)
    return s


def w_hat(result):
    w = result.weights
    return reference.materialize(w.a, w.values, w.meta, w.b)


@pytest.mark.parametrize("mod", [magnitude, wanda, sparsegpt])
def test_result_is_valid_2_4_with_identity_wrappers(mod):
    w = torch.randn(48, 64)
    res = mod.prune(w, stats_of(correlated_inputs(), full=True), PruneConfig())
    res.weights.validate()
    assert (res.weights.block_out, res.weights.block_in) == (1, 4)
    sparse24.check_core(w_hat(res))
    nnz = (w_hat(res) != 0).reshape(48, -1, 4).sum(-1)
    assert int(nnz.max()) <= 2
    assert 0 < res.info["proxy_loss"] < 1


def test_magnitude_keeps_the_two_largest_per_group():
    w = torch.randn(32, 64)
    res = magnitude.prune(w, stats_of(torch.randn(100, 64)), PruneConfig())
    kept = w_hat(res) != 0
    groups = w.abs().reshape(32, -1, 4)
    kept_min = torch.where(kept.reshape(32, -1, 4), groups, torch.inf).min(-1).values
    dropped_max = torch.where(~kept.reshape(32, -1, 4), groups, -torch.inf).max(-1).values
    assert bool((kept_min >= dropped_max).all())
    assert torch.equal(w_hat(res)[kept], w[kept])  # kept values unchanged


def test_magnitude_keeps_kept_zeros():
    w = torch.randn(8, 16)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 0.0])
    res = magnitude.prune(w, None, PruneConfig())
    mask = sparse24.dense_mask(res.weights.meta, 16)
    assert int(mask.sum()) == 8 * 8  # exactly 2 of 4 everywhere, even in the all-zero group


def test_wanda_uses_input_norms():
    # column 0 tiny weights but huge inputs: Wanda keeps it, magnitude drops it
    w = torch.ones(4, 8)
    w[:, 0] = 0.1
    x = torch.ones(50, 8)
    x[:, 0] = 100.0
    res_w = wanda.prune(w, stats_of(x), PruneConfig())
    res_m = magnitude.prune(w, stats_of(x), PruneConfig())
    assert bool((w_hat(res_w)[:, 0] != 0).all())
    assert bool((w_hat(res_m)[:, 0] == 0).all())


def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction():
    x = correlated_inputs()
    w = torch.randn(64, 64)
    s = stats_of(x, full=True)
    err = {}
    for name, mod in (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt)):
        err[name] = float(((w - w_hat(mod.prune(w, s, PruneConfig()))) @ x.T).norm())
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_sparsegpt_needs_xtx():
    with pytest.raises(ValueError, match="XᵀX"):
        sparsegpt.prune(torch.randn(8, 16), stats_of(torch.randn(20, 16)), PruneConfig())


@pytest.mark.parametrize("mod", [magnitude, wanda, sparsegpt])
def test_nan_weight_is_refused(mod):
    w = torch.randn(8, 16)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="weight.*NaN"):
        mod.prune(w, stats_of(torch.randn(40, 16), full=True), PruneConfig())


def test_bad_width_is_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        magnitude.prune(torch.randn(8, 10), None, PruneConfig())
