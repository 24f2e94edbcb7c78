"""ARMOR end to end: options, monotonicity, the NoWag-P guarantee, folding and packing."""

import itertools

import pytest
import torch

from armor_kernels import reference, sparse24
from armor_solver.methods import armor, armor_exact, nowag_p
from armor_solver.methods.armor_problem import Problem
from armor_solver.methods.base import PruneConfig
from armor_solver.methods.normalize import normalize, proxy_loss
from armor_solver.methods.nowag_p import nowag_mask
from armor_solver.stats import LayerStats


def _layer(d_out=48, d_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # low-rank plus noise with uneven column scales: structure the wrappers can exploit
    w = torch.randn(d_out, 6, generator=g) @ torch.randn(6, d_in, generator=g) + 0.3 * torch.randn(d_out, d_in, generator=g)
    w = w * (torch.rand(d_in, generator=g) + 0.2)
    st = LayerStats.empty(d_in)
    st.add(torch.randn(256, d_in, generator=g) * (torch.rand(d_in, generator=g) * 3 + 0.1))
    return w, st


@pytest.mark.parametrize(
    "shape, expect", [((576, 576), (96, 96)), ((192, 576), (96, 96)), ((1536, 576), (128, 96)), ((576, 1536), (96, 128))]
)
def test_block_sizes_for_smollm2_shapes(shape, expect):
    assert armor.block_sizes(*shape, 128) == expect
    assert armor.block_sizes(*shape, 64) == (64, 64)


def test_exact_sweeps_are_monotone_and_beat_nowag_p():
    w, st = _layer()
    res = armor.prune(w, st, PruneConfig(block_size=16, extra={"sweeps": 6}))
    info = res.info
    losses = [info["init_loss"]] + info["losses"]
    assert all(b <= a for a, b in itertools.pairwise(losses))
    assert info["proxy_loss"] == losses[-1] and info["iters"] == len(info["losses"]) <= 6
    assert info["init_loss"] == pytest.approx(nowag_p.prune(w, st).info["proxy_loss"], rel=1e-5)
    assert info["proxy_loss"] < 0.8 * info["init_loss"]
    assert (info["block_out"], info["block_in"]) == (16, 16)
    assert [t for t, _ in info["trace"]] == sorted(t for t, _ in info["trace"])


def test_folding_gives_the_unnormalized_product():
    w, st = _layer(seed=1)
    res = armor.prune(w, st, PruneConfig(block_size=16, extra={"sweeps": 3}))
    packed = res.weights
    packed.validate()
    assert packed.dtype == torch.float32 and packed.block_out == 16 and packed.block_in == 16
    w_hat = reference.materialize(packed.a, packed.values, packed.meta, packed.b)
    # the packed layer, measured in the original space by the shared proxy loss, is what the solver fitted
    assert proxy_loss(w, w_hat, st.cleaned_h()) == pytest.approx(res.info["proxy_loss"], rel=1e-3)
    assert res.info["proxy_loss_deployed"] == pytest.approx(res.info["proxy_loss"], rel=1e-3)
    # and W_hat = diag(r) · A S B · diag(c) with the unfolded factors rebuilt from the packed ones
    _, r, c = normalize(w)
    a_n = packed.a / r.reshape(-1, 16, 1)
    b_n = packed.b / c.reshape(-1, 1, 16)
    prob = Problem(normalize(w)[0], st.cleaned_h(), 16, 16)
    torch.testing.assert_close(r[:, None] * prob.w_hat(a_n, packed.core(), b_n) * c, w_hat, rtol=1e-4, atol=1e-5)


def test_packing_keeps_the_solver_mask():
    w, st = _layer(seed=2)
    res = armor.prune(w, st, PruneConfig(block_size=16, extra={"sweeps": 2}))
    mask = sparse24.dense_mask(res.weights.meta, w.shape[1])
    assert bool((mask.reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
    assert bool((res.weights.core()[~mask] == 0).all())


def test_bf16_weight_gives_bf16_layer():
    w, st = _layer(seed=3)
    res = armor.prune(w.bfloat16(), st, PruneConfig(block_size=16, extra={"sweeps": 2}))
    assert res.weights.dtype == torch.bfloat16
    res.weights.validate()
    assert res.info["proxy_loss_deployed"] < res.info["init_loss"]


def test_time_budget_stops_early():
    w, st = _layer(seed=4)
    res = armor.prune(w, st, PruneConfig(block_size=16, extra={"sweeps": 1000, "time_budget": 0.0}))
    assert res.info["iters"] == 0
    assert res.info["proxy_loss"] == pytest.approx(res.info["init_loss"])


def test_adam_runs_and_never_returns_worse_than_init():
    w, st = _layer(seed=5)
    res = armor.prune(w, st, PruneConfig(block_size=16, iters=30, extra={"solver": "adam"}))
    info = res.info
    assert info["solver"] == "adam" and info["iters"] == 30
    assert info["proxy_loss"] <= info["init_loss"]
    assert info["proxy_loss"] == min(l for _, l in info["trace"])
    res.weights.validate()
    # a learning rate so large that Adam diverges still returns the best state seen (the start)
    bad = armor.prune(w, st, PruneConfig(block_size=16, iters=5, extra={"solver": "adam", "lr": 10.0}))
    assert bad.info["proxy_loss"] <= bad.info["init_loss"]


def test_random_layers_never_worse_than_nowag_p():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed + 10)
        w = torch.randn(32, 32, generator=g)
        st = LayerStats.empty(32)
        st.add(torch.randn(16, 32, generator=g))
        res = armor.prune(w, st, PruneConfig(block_size=8, extra={"sweeps": 3}))
        assert res.info["proxy_loss"] <= nowag_p.prune(w, st).info["proxy_loss"] * (1 + 1e-5)


def test_fit_exact_rejects_nothing_it_should_keep():
    # already optimal start (W is 2:4 with identity wrappers): the loss stays 0
    w, st = _layer(seed=6)
    w_bar, _, _ = normalize(w)
    mask = nowag_mask(w_bar, st.cleaned_h())
    prob = Problem(w_bar * mask, st.cleaned_h(), 16, 16)
    a, b = prob.identity_wrappers()
    loss = armor_exact.fit_exact(prob, a, prob.w.clone(), mask, b, sweeps=2).loss
    assert loss == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize(
    "extra, match",
    [({"solver": "sgd"}, "solver"), ({"sweeps": -1}, "sweeps"), ({"time_budget": "soon"}, "time_budget")],
)
def test_bad_options_raise(extra, match):
    w, st = _layer()
    with pytest.raises(ValueError, match=match):
        armor.prune(w, st, PruneConfig(block_size=16, extra=extra))


@pytest.mark.parametrize("what", ["weight", "h"])
def test_non_finite_input_raises_naming_tensor(what):
    w, st = _layer()
    if what == "weight":
        w[0, 0] = float("inf")
    else:
        st.h[3] = float("nan")
    with pytest.raises(ValueError, match="weight" if what == "weight" else "stats.h"):
        armor.prune(w, st, PruneConfig(block_size=16))


@pytest.mark.gpu
def test_cuda_matches_cpu_guarantee():
    w, st = _layer(seed=7)
    res = armor.prune(w, st, PruneConfig(block_size=16, device="cuda", extra={"sweeps": 3}))
    assert res.weights.device.type == "cpu"  # returned where the weight lives
    assert res.info["proxy_loss"] < res.info["init_loss"]
    ad = armor.prune(w, st, PruneConfig(block_size=16, device="cuda", iters=20, extra={"solver": "adam"}))
    assert ad.info["proxy_loss"] <= ad.info["init_loss"]
