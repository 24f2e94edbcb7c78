"""The public torch.library ops through the Triton backend (forced; interpreter on CPU)."""

import pytest
import torch

import armor_kernels
from armor_kernels import dispatch, reference
from tests.helpers import random_layer_weights

tb = pytest.importorskip("armor_kernels.backends.triton")
if tb.IMPORT_ERROR:
    pytest.skip(f"triton unavailable: {tb.IMPORT_ERROR}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def forced_triton(monkeypatch):
    monkeypatch.setenv("ARMOR_BACKEND", "triton")
    dispatch.reset()


def make(dtype, bias=True):
    return random_layer_weights(32, 48, 8, 12, dtype, bias, scaled=True).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_each_op_through_triton(forced_triton, dtype):
    w = make(dtype, bias=dtype == torch.float32)
    x = torch.randn(3, 48, device=DEVICE).to(dtype)
    cases = [
        (torch.ops.armor.blockdiag_matmul.default, (x, w.b, torch.randn(48, device=DEVICE).to(dtype))),
        (torch.ops.armor.sparse24_matmul.default, (x, w.values, w.meta, w.bias)),
        (torch.ops.armor.armor_linear.default, (x, w.a, w.values, w.meta, w.b, w.bias)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
        key = dispatch.shape_key(op._schema.name.split("::")[1], args[0], args[1:])
        assert dispatch._cache[key].backend.name == "triton"


def test_ops_through_triton_match_reference(forced_triton):
    w = make(torch.float32)
    x = torch.randn(2, 2, 48, device=DEVICE)
    got = armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    want = reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert dispatch.report()["choices"], "the choice was not cached"
    assert set(dispatch.report()["choices"].values()) == {"triton"}
