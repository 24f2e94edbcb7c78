"""The CPU backend: W_hat built once per layer at prepare time, one dense matmul per call, reference results."""

import gc

import pytest
import torch

import armor_kernels
from armor_kernels import ArmorWeights, dispatch, reference, sparse24
from armor_kernels.backends.cpu_dense import BACKEND as CPU_DENSE
from armor_runtime.linear import ArmorLinear


def make(d_out=48, d_in=64, bias=True, dtype=torch.float32):
    core = torch.randn(d_out, d_in)
    mask = sparse24.topk_mask(core.abs())
    return ArmorWeights.from_factors(
        torch.eye(16) + 0.1 * torch.randn(d_out // 16, 16, 16), torch.where(mask, core, 0.0) / 8,
        torch.eye(16) + 0.1 * torch.randn(d_in // 16, 16, 16),
        bias=torch.randn(d_out) if bias else None, mask=mask, dtype=dtype,
    )  # fmt: skip


# fp32: the same sums in another order; 16-bit: W_hat is rounded once to the layer's dtype
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 64), (300, 64)])  # decode, medium, prefill regimes
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_reference(dtype, shape, bias):
    w = make(bias=bias, dtype=dtype)
    x = torch.randn(*shape).to(dtype)
    choice = dispatch.select("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias)
    assert choice.backend.name == "cpu_dense"
    got = armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    want = reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    assert got.dtype == dtype and got.shape == (*shape[:-1], 48)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def test_layout_is_built_once_at_prepare_not_per_call():
    layer = ArmorLinear.from_weights(make())  # from_weights prepares
    before = CPU_DENSE.builds
    assert dispatch.layout_bytes(layer.values) == {"cpu_dense": 48 * 64 * 4}  # the dense layer's bytes, fp32
    for tokens in (1, 5, 40, 300, 1):
        layer(torch.randn(tokens, 64))
    assert CPU_DENSE.builds == before, "forward built a layout"
    with torch.no_grad():
        layer.values.mul_(2)  # an in-place change of the core rebuilds on the next call, once
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), reference.armor_linear(x, *layer.weights().tensors().values()), rtol=1e-5, atol=1e-5)
    layer(x)
    assert CPU_DENSE.builds == before + 1


def test_layout_moves_and_frees_with_the_layer():
    gc.collect()
    held = len(CPU_DENSE._dense)
    layer = ArmorLinear.from_weights(make(dtype=torch.bfloat16))
    assert dispatch.layout_bytes(layer.values) == {"cpu_dense": 48 * 64 * 2}
    layer.float()  # .to() re-prepares for the new tensors; the bf16 layout goes with the bf16 values
    gc.collect()
    assert dispatch.layout_bytes(layer.values) == {"cpu_dense": 48 * 64 * 4} and len(CPU_DENSE._dense) == held + 1
    del layer
    gc.collect()
    assert len(CPU_DENSE._dense) == held


def test_mixed_dtypes_and_float64_go_to_the_reference():
    w = make(dtype=torch.bfloat16)
    x = torch.randn(2, 64)
    choice = dispatch.select("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias)
    assert choice.backend.name == "reference" and "one dtype" in choice.reasons["cpu_dense"]
    w64 = make().to(torch.float64)
    x64 = torch.randn(2, 64, dtype=torch.float64)
    choice = dispatch.select("armor_linear", x64, w64.a, w64.values, w64.meta, w64.b, w64.bias)
    assert choice.backend.name == "reference" and "float64" in choice.reasons["cpu_dense"]


def test_wrong_input_width_raises():
    w = make()
    with pytest.raises(ValueError, match="does not match d_in = 64"):
        CPU_DENSE.armor_linear(torch.randn(2, 32), w.a, w.values, w.meta, w.b, w.bias)
