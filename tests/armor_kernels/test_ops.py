"""The torch.library ops: opcheck, fake kernels, dispatch to the reference on CPU."""

import pytest
import torch

import armor_kernels
from armor_kernels import dispatch, reference
from tests.helpers import random_layer_weights


def make(bias=True, dtype=torch.float32):
    return random_layer_weights(16, 32, 8, 8, dtype, bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_every_op(bias, dtype):
    w = make(bias, dtype)
    x = torch.randn(3, 32, dtype=dtype)
    cases = [
        (torch.ops.armor.blockdiag_matmul.default, (x, w.b, torch.randn(32, dtype=dtype) if bias else None)),
        (torch.ops.armor.sparse24_matmul.default, (x, w.values, w.meta, w.bias)),
        (torch.ops.armor.armor_linear.default, (x, w.a, w.values, w.meta, w.b, w.bias)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_match_reference_and_pick_cpu_dense_then_reference_on_cpu(monkeypatch):
    w = make()
    x = torch.randn(2, 5, 32)
    want = reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    got = armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    # W_hat multiplied out first: the same sums in another order (outputs here are ~30 in size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert dispatch.select("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias).backend.name == "cpu_dense"
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "cpu_dense")
    dispatch.reset()
    torch.testing.assert_close(armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias), want)
    assert dispatch.select("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias).backend.name == "reference"


def test_meta_device_shapes():
    w = make().to("meta")
    x = torch.empty(4, 7, 32, device="meta")
    assert armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias).shape == (4, 7, 16)
    assert armor_kernels.sparse24_matmul(x, w.values, w.meta).shape == (4, 7, 16)
    assert armor_kernels.blockdiag_matmul(x, w.b).shape == (4, 7, 32)


def test_compile_fullgraph_through_the_op():
    w = make()

    def f(x):
        return torch.relu(armor_kernels.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias))

    x = torch.randn(3, 32)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_import_needs_no_gpu_or_compiled_extension():
    import subprocess
    import sys

    code = "import armor_kernels, armor_runtime, armor_solver; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
