import pytest
import torch

from armor_kernels import reference
from tests.helpers import random_layer_weights


def make(d_out=24, d_in=32, b_out=8, b_in=8, bias=True):
    return random_layer_weights(d_out, d_in, b_out, b_in, bias=bias)


def blockdiag(blocks):
    return torch.block_diag(*blocks.double())


def test_blockdiag_matmul_matches_dense_block_diagonal():
    blocks = torch.randn(4, 8, 8)
    x = torch.randn(2, 3, 32)
    bias = torch.randn(32)
    want = x.double() @ blockdiag(blocks).T + bias.double()
    got = reference.blockdiag_matmul(x, blocks, bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_sparse24_matmul_matches_dense_core():
    w = make()
    x = torch.randn(5, 32)
    want = x.double() @ w.core().double().T
    torch.testing.assert_close(reference.sparse24_matmul(x, w.values, w.meta).double(), want, rtol=1e-5, atol=1e-5)


def test_materialize_is_a_times_s_times_b():
    w = make()
    want = blockdiag(w.a) @ w.core().double() @ blockdiag(w.b)
    torch.testing.assert_close(reference.materialize(w.a, w.values, w.meta, w.b).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_armor_linear_equals_dense_w_hat(lead, bias):
    w = make(bias=bias)
    x = torch.randn(*lead, 32)
    w_hat = blockdiag(w.a) @ w.core().double() @ blockdiag(w.b)
    want = x.double() @ w_hat.T + (w.bias.double() if bias else 0)
    got = reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    assert got.shape == (*lead, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_within_a_rounding(dtype):
    w32 = make()
    w = w32.to(dtype)
    x = torch.randn(7, 32).to(dtype)
    exact = reference.armor_linear(x.double(), *(t.double() for t in (w.a, w.values)), w.meta, w.b.double(), w.bias.double())
    got = reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    assert got.dtype == dtype
    # the reference computes in fp32 and rounds once: error is at most ~1 ulp of the output
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(1.0)
    assert bool(((got.double() - exact).abs() <= ulp).all())


def test_non_contiguous_input():
    w = make()
    x = torch.randn(32, 6).T  # [6, 32], non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(
        reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias),
        reference.armor_linear(x.contiguous(), w.a, w.values, w.meta, w.b, w.bias),
    )


def test_wrong_input_width_raises():
    w = make()
    with pytest.raises(ValueError, match="x: last dim 30 does not match"):
        reference.armor_linear(torch.randn(2, 30), w.a, w.values, w.meta, w.b)
    with pytest.raises(ValueError, match="x: last dim 31 does not match d_in"):
        reference.sparse24_matmul(torch.randn(2, 31), w.values, w.meta)
