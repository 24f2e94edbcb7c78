"""NoWag normalization, the proxy loss and the NoWag-P baseline."""

import itertools

import pytest
import torch

from armor_kernels import reference, sparse24
from armor_solver.methods import nowag_p
from armor_solver.methods.base import PruneConfig
from armor_solver.methods.normalize import normalize, proxy_loss
from armor_solver.stats import LayerStats


def _stats(d_in, n=64):
    s = LayerStats.empty(d_in)
    s.add(torch.randn(n, d_in) * torch.rand(d_in) * 3)
    return s


def test_normalize_reconstructs_and_has_unit_rows():
    w = torch.randn(24, 16) * torch.rand(16) * 5
    w_bar, r, c = normalize(w)
    torch.testing.assert_close(r[:, None] * w_bar * c, w, rtol=1e-5, atol=1e-6)
    # after the column scaling every row of W̄ has norm ~1 (the 1e-5 is negligible here)
    torch.testing.assert_close(w_bar.norm(dim=1), torch.ones(24), rtol=1e-4, atol=1e-4)


def test_proxy_loss_endpoints_and_weighting():
    w = torch.randn(8, 12)
    h = torch.rand(12) + 0.1
    assert proxy_loss(w, w, h) == pytest.approx(0.0, abs=1e-10)
    assert proxy_loss(w, torch.zeros_like(w), h) == pytest.approx(1.0, rel=1e-6)
    # an error in a heavily weighted column costs more than the same error in a light one
    h2 = torch.ones(12)
    h2[3] = 100.0
    e = torch.zeros_like(w)
    e[:, 3] = 0.1 * w[:, 3]
    e_light = torch.zeros_like(w)
    e_light[:, 4] = 0.1 * w[:, 4]
    assert proxy_loss(w, w - e, h2) > proxy_loss(w, w - e_light, h2)


def test_nowag_p_keeps_top2_scores_and_original_values():
    torch.manual_seed(1)
    w = torch.randn(16, 24)
    st = _stats(24)
    res = nowag_p.prune(w, st, PruneConfig())
    packed = res.weights
    packed.validate()
    assert packed.block_out == 1 and packed.block_in == 4
    core = packed.core()
    mask = sparse24.dense_mask(packed.meta, 24)
    # brute force: per group the kept pair maximizes the sum of W̄² h scores
    w_bar, _, _ = normalize(w)
    score = (w_bar.square() * st.cleaned_h()).reshape(16, 6, 4)
    for row, g in itertools.product(range(16), range(6)):
        kept = mask[row, 4 * g : 4 * g + 4].nonzero().flatten().tolist()
        best = sorted(range(4), key=lambda k: -float(score[row, g, k]))[:2]
        assert sorted(kept) == sorted(best)
    torch.testing.assert_close(core, torch.where(mask, w, torch.zeros(())), rtol=0, atol=0)
    w_hat = reference.materialize(packed.a, packed.values, packed.meta, packed.b)
    assert res.info["proxy_loss"] == pytest.approx(proxy_loss(w, w_hat, st.cleaned_h()), rel=1e-5)


def test_nowag_p_bf16_keeps_dtype():
    w = torch.randn(8, 16).bfloat16()
    res = nowag_p.prune(w, _stats(16))
    assert res.weights.dtype == torch.bfloat16
    assert 0 < res.info["proxy_loss"] < 1


@pytest.mark.parametrize("what", ["weight", "h"])
def test_non_finite_input_raises_naming_tensor(what):
    w = torch.randn(8, 16)
    st = _stats(16)
    if what == "weight":
        w[2, 3] = float("nan")
    else:
        st.h[5] = float("inf")
    with pytest.raises(ValueError, match="weight" if what == "weight" else "stats.h"):
        nowag_p.prune(w, st)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 4"):
        nowag_p.prune(torch.randn(8, 10), _stats(10))
    with pytest.raises(ValueError, match="stats.h"):
        nowag_p.prune(torch.randn(8, 16), _stats(12))
