"""Triton kernels against the reference (under TRITON_INTERPRET=1 on CPU, on the GPU when present).

Tolerance (DESIGN.md): the kernel's error against the fp64 oracle is at most 4x
the error of PyTorch's own same-dtype product, plus 1 ulp of the output's
magnitude in the output dtype (the interpreter truncates fp32 -> bf16 stores).
"""

import pytest
import torch

from armor_kernels import reference, sparse24
from armor_kernels.formats import valid_block_sizes
from tests.helpers import random_layer_weights

tb = pytest.importorskip("armor_kernels.backends.triton")
if tb.IMPORT_ERROR:
    pytest.skip(f"triton unavailable: {tb.IMPORT_ERROR}", allow_module_level=True)

# Under the interpreter an out-of-bounds read returns whatever lies in host memory, which usually
# overflows somewhere in numpy: make that fail the test instead of a warning.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_matches(got, exact, same_dtype, dtype, what=""):
    """``got`` within 4x PyTorch's same-dtype error + 1 ulp (4 ulps for fp32) of the fp64 oracle."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output (poison left or overflow)"
    exact = exact.double().cpu()
    scale = float(exact.abs().max())
    err = float((got.double().cpu() - exact).abs().max())
    base = float((same_dtype.double().cpu() - exact).abs().max())
    ulps = 4 if dtype == torch.float32 else 1
    allowed = 4 * base + ulps * EPS[dtype] * scale
    assert err <= allowed, f"{what}: max error {err:.3g} > allowed {allowed:.3g} (torch {dtype}: {base:.3g})"


def poisoned_view(m, n, dtype):
    """A NaN-filled [m, n] view inside a larger NaN buffer (margins on every side), and the buffer."""
    big = torch.full((m + 3, n + 5), float("nan"), dtype=dtype, device=DEVICE)
    return big[1 : 1 + m, 2 : 2 + n], big


def assert_margins_untouched(big, m, n):
    margin = torch.ones_like(big, dtype=torch.bool)
    margin[1 : 1 + m, 2 : 2 + n] = False
    assert bool(big[margin].isnan().all()), "kernel wrote outside its output view"


def rand_weights(d_out, d_in, b_out, b_in, dtype=torch.float32, bias=True, signed_zeros=True):
    w = random_layer_weights(d_out, d_in, b_out, b_in, dtype, bias, scaled=True)
    if signed_zeros:
        # kept values that are zero and negative zero must behave as zeros
        w.values[::5, ::3] = 0.0
        w.values[1::7, 1::4] = -0.0
    return w.to(DEVICE)


def dense_core(w):
    return sparse24.decompress(w.values, w.meta)


# ---------------------------------------------------------------------------
# block-diagonal wrapper
# ---------------------------------------------------------------------------
def blockdiag_same_dtype(x, blocks, bias):
    n, bs, _ = blocks.shape
    y = torch.einsum("mnk,njk->mnj", x.reshape(x.shape[0], n, bs), blocks).reshape(x.shape)
    return y if bias is None else y + bias


@pytest.mark.parametrize("bs", valid_block_sizes(48))
@pytest.mark.parametrize("tokens", [1, 17])
def test_blockdiag_every_block_size(bs, tokens):
    x = torch.randn(tokens, 48, device=DEVICE)
    blocks = torch.randn(48 // bs, bs, bs, device=DEVICE)
    bias = torch.randn(48, device=DEVICE) if bs % 2 else None
    got = tb.blockdiag(x, blocks, bias)
    exact = reference.blockdiag_matmul(x.double(), blocks.double(), None if bias is None else bias.double())
    assert_matches(got, exact, blockdiag_same_dtype(x, blocks, bias), torch.float32, f"bs={bs}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
def test_blockdiag_dtypes_and_token_counts(dtype, tokens):
    bs = 24 if tokens % 2 else 16  # 24: not a power of two (masked tile)
    x = torch.randn(tokens, 48, device=DEVICE).to(dtype)
    blocks = (torch.randn(48 // bs, bs, bs, device=DEVICE) / bs**0.5).to(dtype)
    bias = torch.randn(48, device=DEVICE).to(dtype) if tokens > 1 else None
    got, big = poisoned_view(tokens, 48, dtype)
    tb.blockdiag(x, blocks, bias, out=got)
    assert_margins_untouched(big, tokens, 48)
    exact = reference.blockdiag_matmul(x.double(), blocks.double(), None if bias is None else bias.double())
    assert_matches(got, exact, blockdiag_same_dtype(x, blocks, bias), dtype, f"{dtype} tokens={tokens}")


def test_blockdiag_poisoned_guarded_noncontiguous():
    x = torch.randn(48, 6, device=DEVICE).t()  # [6, 48], strides (1, 6): not contiguous
    assert not x.is_contiguous()
    blocks = torch.randn(4, 12, 12, device=DEVICE)
    out, big = poisoned_view(6, 48, torch.float32)
    tb.blockdiag(x, blocks, None, out=out)
    assert_margins_untouched(big, 6, 48)
    exact = reference.blockdiag_matmul(x.double(), blocks.double())
    assert_matches(out, exact, blockdiag_same_dtype(x, blocks, None), torch.float32, "view")


def test_blockdiag_leading_batch_dims_and_errors():
    x = torch.randn(2, 3, 32, device=DEVICE)
    blocks = torch.randn(4, 8, 8, device=DEVICE)
    got = tb.blockdiag(x, blocks)
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, reference.blockdiag_matmul(x, blocks), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last dim 32"):
        tb.blockdiag(x, torch.randn(3, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        tb.blockdiag(x, blocks, torch.randn(31, device=DEVICE))


# ---------------------------------------------------------------------------
# small-batch 2:4, with and without the fused output wrapper
# ---------------------------------------------------------------------------
def sparse_same_dtype(x, w, a=None, bias=None):
    z = torch.nn.functional.linear(x, dense_core(w))
    if a is not None:
        z = blockdiag_same_dtype(z, a, None)
    return z if bias is None else z + bias


@pytest.mark.parametrize("b_out", valid_block_sizes(48))
def test_sparse24_fused_a_every_output_block(b_out):
    # d_in = 36: 9 groups, so the last metadata byte carries a padding nibble
    w = rand_weights(48, 36, b_out, 4)
    tokens = (1, 3, 17)[valid_block_sizes(48).index(b_out) % 3]
    x = torch.randn(tokens, 36, device=DEVICE)
    split = 3 if b_out in (1, 16, 48) else 1
    got = tb.sparse24_small(x, w.values, w.meta, a=w.a, bias=w.bias, split_k=split)
    exact = reference.blockdiag_matmul(
        reference.sparse24_matmul(x.double(), w.values.double(), w.meta), w.a.double(), w.bias.double()
    )
    assert_matches(got, exact, sparse_same_dtype(x, w, w.a, w.bias), torch.float32, f"b_out={b_out}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
def test_sparse24_dtypes_and_token_counts(dtype, tokens):
    w = rand_weights(48, 40, 48, 4, dtype=dtype, bias=tokens != 3)
    x = torch.randn(tokens, 40, device=DEVICE).to(dtype)
    got, big = poisoned_view(tokens, 48, dtype)
    tb.sparse24_small(x, w.values, w.meta, bias=w.bias, out=got, split_k=2 if tokens in (3, 64) else 1)
    assert_margins_untouched(big, tokens, 48)
    bias64 = None if w.bias is None else w.bias.double()
    exact = reference.sparse24_matmul(x.double(), w.values.double(), w.meta, bias64)
    assert_matches(got, exact, sparse_same_dtype(x, w, None, w.bias), dtype, f"{dtype} tokens={tokens}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,use_dot", [(1, True), (5, True), (16, False), (3, False), (17, True)])
def test_sparse24_both_inner_products(tokens, use_dot, dtype):
    # CUDA-core and tensor-core main loops, each also outside its default token range
    w = rand_weights(64, 48, 32, 4, dtype=dtype)
    x = torch.randn(tokens, 48, device=DEVICE).to(dtype)
    got, big = poisoned_view(tokens, 64, dtype)
    tb.sparse24_small(x, w.values, w.meta, a=w.a, bias=w.bias, out=got, use_dot=use_dot, split_k=2)
    assert_margins_untouched(big, tokens, 64)
    exact = reference.blockdiag_matmul(
        reference.sparse24_matmul(x.double(), w.values.double(), w.meta), w.a.double(), w.bias.double()
    )
    assert_matches(got, exact, sparse_same_dtype(x, w, w.a, w.bias), dtype, f"use_dot={use_dot}")


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("b_out", valid_block_sizes(48))
def test_sparse24_16bit_every_output_block_odd_groups(b_out, use_dot):
    # bf16 weights, fp32 input (the decode layer's h): d_in = 36 is 9 groups (odd: a padding nibble),
    # and 36 is not a multiple of a 64-value step (masked tail); tokens 1, 3, 17 in turn
    w = rand_weights(48, 36, b_out, 4, dtype=torch.bfloat16, bias=b_out % 2 == 0)
    tokens = (1, 3, 17)[valid_block_sizes(48).index(b_out) % 3]
    x = torch.randn(tokens, 36, device=DEVICE)
    got, big = poisoned_view(tokens, 48, torch.bfloat16)
    tb.sparse24_small(x, w.values, w.meta, a=w.a, bias=w.bias, out=got, use_dot=use_dot, split_k=3 if b_out % 3 else 1)
    assert_margins_untouched(big, tokens, 48)
    bias64 = None if w.bias is None else w.bias.double()
    exact = reference.blockdiag_matmul(
        reference.sparse24_matmul(x.double(), w.values.double(), w.meta), w.a.double(), bias64
    )
    same = sparse_same_dtype(x.to(torch.bfloat16), w, w.a, w.bias)
    assert_matches(got, exact, same, torch.bfloat16, f"b_out={b_out} use_dot={use_dot} tokens={tokens}")


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,split,fuse", [(1, 1, True), (2, 2, True), (4, 2, False), (3, 2, True), (17, 2, False)])
def test_sparse24_even_tiles_unmasked_loop(dtype, tokens, split, fuse, use_dot):
    # d_out = 128 rows in whole tiles, d_in = 256 (two full 64-value steps): both main loops run without
    # masks (EVEN), except the CUDA-core loop when its token tile is partial (3 of 4 tokens, 17 = 4 x 4 + 1)
    d_out = 128 if fuse else 32
    w = rand_weights(d_out, 256, 32, 4, dtype=dtype, bias=tokens != 2)
    x = torch.randn(tokens, 256, device=DEVICE)
    a = w.a if fuse else None
    dot = use_dot and dtype != torch.float32
    plan = tb._sparse_plan(tokens, d_out, 256, 32 if fuse else None, dtype, x.dtype, 4, use_dot, split)
    assert plan["meta"]["USE_DOT"] == dot and plan["grid"][1] == split
    assert plan["meta"]["EVEN"] == (dot or tokens not in (3, 17))
    assert plan["meta"]["PAIRS"] == (dtype != torch.float32)
    got, big = poisoned_view(tokens, d_out, dtype)
    tb.sparse24_small(x, w.values, w.meta, a=a, bias=w.bias, out=got, use_dot=use_dot, split_k=split)
    assert_margins_untouched(big, tokens, d_out)
    bias64 = None if w.bias is None else w.bias.double()
    z = reference.sparse24_matmul(x.double(), w.values.double(), w.meta, None if fuse else bias64)
    exact = reference.blockdiag_matmul(z, w.a.double(), bias64) if fuse else z
    assert_matches(got, exact, sparse_same_dtype(x.to(dtype), w, a, w.bias), dtype, f"{dtype} T={tokens}")


def test_sparse24_plan_is_cached_and_uses_no_triton_helpers(monkeypatch):
    # the hot path: a repeated shape computes no tile sizes or grids and calls no triton.cdiv
    w = rand_weights(32, 48, 16, 4)
    x = torch.randn(2, 48, device=DEVICE)
    tb.decode_layer(x, w.a, w.values, w.meta, w.b)
    tb.sparse24_small(x, w.values, w.meta, a=w.a)
    plans = (len(tb._sp_plans), len(tb._bd_plans))

    def no_cdiv(*a):
        raise AssertionError("triton.cdiv on the hot path")

    monkeypatch.setattr(tb.triton, "cdiv", no_cdiv)
    calls = []
    monkeypatch.setattr(tb, "_launch", lambda *a: calls.append(a))
    tb.decode_layer(x, w.a, w.values, w.meta, w.b)
    tb.sparse24_small(x, w.values, w.meta, a=w.a)
    assert (len(tb._sp_plans), len(tb._bd_plans)) == plans, "a repeated shape planned again"
    assert [c[0].fn.__name__ for c in calls] == ["blockdiag_kernel", "sparse24_small_kernel", "sparse24_small_kernel"]
    assert calls[2][1] == tb._sparse_plan(2, 32, 48, 16, w.values.dtype, x.dtype, tb._sm_count(x.device))["grid"]


def test_sparse24_poisoned_guarded_noncontiguous_and_repeatable():
    w = rand_weights(32, 48, 16, 4)
    x = torch.randn(48, 5, device=DEVICE).t()  # [5, 48], not contiguous
    exact = reference.blockdiag_matmul(
        reference.sparse24_matmul(x.double(), w.values.double(), w.meta), w.a.double(), w.bias.double()
    )
    for _ in range(2):  # split-K counters must be back to 0 for the second call
        out, big = poisoned_view(5, 32, torch.float32)
        tb.sparse24_small(x, w.values, w.meta, a=w.a, bias=w.bias, out=out, split_k=4)
        assert_margins_untouched(big, 5, 32)
        assert_matches(out, exact, sparse_same_dtype(x, w, w.a, w.bias), torch.float32, "view")


def test_sparse24_rejects_bad_inputs(monkeypatch):
    w = rand_weights(32, 32, 16, 4)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="last dim 31"):
        tb.sparse24_small(x[:, :31], w.values, w.meta)
    with pytest.raises(ValueError, match="meta"):
        tb.sparse24_small(x, w.values, w.meta[:, :-1])
    with pytest.raises(ValueError, match="a: expected"):
        tb.sparse24_small(x, w.values, w.meta, a=w.a[:1])
    monkeypatch.setattr(tb, "MAX_FUSED_BLOCK", 8)
    with pytest.raises(ValueError, match="wider than the fused epilogue"):
        tb.sparse24_small(x, w.values, w.meta, a=w.a)


# ---------------------------------------------------------------------------
# the whole layer for decode
# ---------------------------------------------------------------------------
def layer_same_dtype(x, w):
    w_hat = reference.materialize(w.a, w.values, w.meta, w.b).to(x.dtype)
    return torch.nn.functional.linear(x, w_hat, w.bias)


def layer_exact(x, w):
    bias = None if w.bias is None else w.bias.double()
    return reference.armor_linear(x.double(), w.a.double(), w.values.double(), w.meta, w.b.double(), bias)


@pytest.mark.parametrize("b_in", valid_block_sizes(48, 4))
def test_decode_layer_every_input_block(b_in):
    w = rand_weights(32, 48, 8, b_in, bias=b_in % 8 == 0)
    x = torch.randn(1, 48, device=DEVICE)
    got = tb.decode_layer(x, w.a, w.values, w.meta, w.b, w.bias)
    assert_matches(got, layer_exact(x, w), layer_same_dtype(x, w), torch.float32, f"b_in={b_in}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 64])
def test_decode_layer_dtypes(dtype, tokens):
    w = rand_weights(64, 48, 32, 12, dtype=dtype)
    x = torch.randn(tokens, 48, device=DEVICE).to(dtype)
    got, big = poisoned_view(tokens, 64, dtype)
    tb.decode_layer(x, w.a, w.values, w.meta, w.b, w.bias, out=got)
    assert_margins_untouched(big, tokens, 64)
    assert_matches(got, layer_exact(x, w), layer_same_dtype(x, w), dtype, f"{dtype} tokens={tokens}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layer_hot_path_repeats_the_checked_result(dtype, monkeypatch):
    # the second call with the same shapes skips the checks and the public launchers: same results,
    # new weights and inputs every call (nothing but shapes may be cached), leading dims and out= views
    w1 = rand_weights(128, 256, 32, 16, dtype=dtype)
    x1 = torch.randn(2, 3, 256, device=DEVICE).to(dtype)
    x1_2d = x1.reshape(6, 256)
    first = tb.decode_layer(x1, w1.a, w1.values, w1.meta, w1.b, w1.bias)
    assert first.shape == (2, 3, 128)
    assert_matches(first.reshape(6, 128), layer_exact(x1_2d, w1), layer_same_dtype(x1_2d, w1), dtype, "checked")
    out, _ = poisoned_view(6, 128, dtype)
    tb.decode_layer(x1_2d, w1.a, w1.values, w1.meta, w1.b, w1.bias, out=out)  # plans the 2-D, out= key

    def checked(*a, **k):
        raise AssertionError("the hot path called a checked launcher")

    monkeypatch.setattr(tb, "blockdiag", checked)
    monkeypatch.setattr(tb, "sparse24_small", checked)
    for _ in range(2):
        w = rand_weights(128, 256, 32, 16, dtype=dtype)
        x = torch.randn(2, 3, 256, device=DEVICE).to(dtype)
        got = tb.decode_layer(x, w.a, w.values, w.meta, w.b, w.bias)
        x2 = x.reshape(6, 256)
        assert_matches(got.reshape(6, 128), layer_exact(x2, w), layer_same_dtype(x2, w), dtype, "hot path")
    out2, big2 = poisoned_view(6, 128, dtype)
    tb.decode_layer(x1_2d, w1.a, w1.values, w1.meta, w1.b, w1.bias, out=out2)
    assert_margins_untouched(big2, 6, 128)
    torch.testing.assert_close(out2, first.reshape(6, 128), rtol=0, atol=0)


def test_decode_layer_unfused_output_wrapper(monkeypatch):
    # blocks wider than the epilogue's limit go through a third launch
    monkeypatch.setattr(tb, "MAX_FUSED_BLOCK", 8)
    w = rand_weights(32, 32, 16, 8)
    assert not tb.fusable(w.a)
    x = torch.randn(2, 32, device=DEVICE)
    got, big = poisoned_view(2, 32, torch.float32)
    tb.decode_layer(x, w.a, w.values, w.meta, w.b, w.bias, out=got)
    assert_margins_untouched(big, 2, 32)
    assert_matches(got, layer_exact(x, w), layer_same_dtype(x, w), torch.float32, "unfused A")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_layer_gpu_llama_shape(dtype):
    w = rand_weights(4096, 4096, 128, 128, dtype=dtype)
    x = torch.randn(4, 4096, device=DEVICE).to(dtype)
    got = tb.decode_layer(x, w.a, w.values, w.meta, w.b, w.bias)
    assert_matches(got, layer_exact(x, w), layer_same_dtype(x, w), dtype, "4096x4096")
