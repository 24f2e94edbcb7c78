"""ArmorLinear: a packed-only drop-in for nn.Linear."""

import pytest
import torch
from torch import nn

from armor_kernels import ArmorFormatError, dispatch, reference
from armor_runtime.linear import ArmorLinear, NoDenseWeightError


def _layer(make_armor_weights, d_out=48, d_in=64, bias=True, dtype=torch.float32):
    lin = nn.Linear(d_in, d_out, bias=bias)
    w = make_armor_weights(lin, preferred=16)
    return ArmorLinear.from_weights(w.to(dtype=dtype)), w


def test_forward_matches_materialized_weight_any_leading_dims(make_armor_weights):
    layer, w = _layer(make_armor_weights)
    w_hat = reference.materialize(w.a, w.values, w.meta, w.b)
    for shape in [(64,), (3, 64), (2, 5, 64), (2, 1, 3, 64)]:
        x = torch.randn(*shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], 48)
        torch.testing.assert_close(y, x @ w_hat.T + w.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_inference_mode(make_armor_weights, dtype):
    layer, _ = _layer(make_armor_weights, dtype=dtype)
    x = torch.randn(17, 64).to(dtype)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == dtype
    ref = reference.armor_linear(x.float(), *(t.float() if t.is_floating_point() else t for t in
                                               (layer.a, layer.values, layer.meta, layer.b, layer.bias)))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * 4)


def test_state_dict_holds_only_packed_tensors(make_armor_weights):
    layer, _ = _layer(make_armor_weights)
    sd = layer.state_dict()
    assert set(sd) == {"a", "values", "meta", "b", "bias"}
    assert sd["meta"].dtype == torch.uint8
    assert not any(t.shape == (48, 64) for t in sd.values())
    assert list(layer.parameters()) == []
    no_bias, _ = _layer(make_armor_weights, bias=False)
    assert set(no_bias.state_dict()) == {"a", "values", "meta", "b"} and no_bias.bias is None


def test_weight_access_raises_clearly(make_armor_weights):
    layer, _ = _layer(make_armor_weights)
    with pytest.raises(NoDenseWeightError, match="to_dense"):
        _ = layer.weight
    assert isinstance(NoDenseWeightError("x"), AttributeError)
    assert not hasattr(layer, "weight")
    assert layer.in_features == 64 and layer.out_features == 48  # the nn.Linear attributes still work


def test_to_dense_is_w_hat(make_armor_weights):
    layer, w = _layer(make_armor_weights)
    dense = layer.to_dense()
    assert dense.shape == (48, 64) and dense.dtype == torch.float32
    torch.testing.assert_close(dense, reference.materialize(w.a, w.values, w.meta, w.b), rtol=0, atol=0)
    assert layer.to_dense(torch.bfloat16).dtype == torch.bfloat16


def test_to_dtype_keeps_meta_uint8_and_prepares(make_armor_weights, monkeypatch):
    layer, _ = _layer(make_armor_weights)
    calls = []
    monkeypatch.setattr(dispatch, "prepare", lambda *t: calls.append([x.dtype for x in t if x is not None]))
    layer.to(torch.bfloat16)
    assert layer.values.dtype == layer.a.dtype == layer.b.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.meta.dtype == torch.uint8
    assert calls and calls[-1][0] == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_meta_device_construction_and_fresh_layer_validity():
    meta = ArmorLinear(576, 1536, bias=False, device="meta", dtype=torch.bfloat16)
    assert meta.values.device.type == "meta" and meta.meta.dtype == torch.uint8
    assert (meta.block_out, meta.block_in) == (128, 96)  # 576 has no divisor in 97..128 that is a multiple of 4
    assert tuple(meta.a.shape) == (12, 128, 128) and tuple(meta.b.shape) == (6, 96, 96)
    assert meta(torch.empty(3, 576, device="meta", dtype=torch.bfloat16)).shape == (3, 1536)
    assert "meta" in repr(meta)
    fresh = ArmorLinear(64, 32, block_out=16, block_in=32)
    fresh.validate("fresh")
    x = torch.randn(4, 64)
    torch.testing.assert_close(fresh(x), torch.zeros(4, 32) + fresh.bias)


def test_bad_block_sizes_and_invalid_weights_raise(make_armor_weights):
    with pytest.raises(ArmorFormatError, match="block_out = 24 does not divide"):
        ArmorLinear(64, 64, block_out=24)
    with pytest.raises(ArmorFormatError, match="multiple of 4"):
        ArmorLinear(64, 64, block_in=2)
    lin = nn.Linear(64, 48)
    w = make_armor_weights(lin)
    w.meta[0, 0] = 0xFF  # pattern 0b1111: not one of the 6 valid 2:4 codes
    with pytest.raises(ArmorFormatError, match=r"layer\.meta: row 0, group 0"):
        ArmorLinear.from_weights(w, "layer")


def test_extra_repr_shows_shapes_blocks_dtype_backend(make_armor_weights):
    layer, _ = _layer(make_armor_weights)
    text = repr(layer)
    for part in ("in_features=64", "out_features=48", "block_out=16", "block_in=16", "dtype=float32",
                 "backend(decode)=cpu_dense", "backend(prefill)=cpu_dense"):
        assert part in text


def test_torch_compile_fullgraph_matches_eager(make_armor_weights):
    layer, _ = _layer(make_armor_weights)
    x = torch.randn(3, 7, 64)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)  # inductor on CPU: the custom op stays opaque
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)


def test_load_state_dict_and_pickle_round_trip(make_armor_weights, tmp_path, monkeypatch):
    layer, _ = _layer(make_armor_weights)
    torch.save(layer, tmp_path / "layer.pt")  # whole-module pickling works (no lambdas held)
    again = torch.load(tmp_path / "layer.pt", weights_only=False)
    x = torch.randn(5, 64)
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)
    calls = []
    monkeypatch.setattr(dispatch, "prepare", lambda *t: calls.append(1))
    fresh = ArmorLinear(64, 48, block_out=16, block_in=16)
    fresh.load_state_dict(layer.state_dict())
    assert calls  # layouts rebuilt after loading
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="size mismatch for a"):
        ArmorLinear(64, 48, block_out=24, block_in=16).load_state_dict(layer.state_dict())


def test_runtime_imports_without_transformers():
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "import armor_runtime\n"
        "from armor_runtime.convert import convert_model\n"
        "from armor_runtime.linear import ArmorLinear\n"
        "import torch\n"
        "print(armor_runtime.register_with_transformers(), ArmorLinear(8, 8)(torch.ones(1, 8)).shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False torch.Size([1, 8])"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_inputs_are_refused_like_nn_linear(make_armor_weights, dtype):
    layer, _ = _layer(make_armor_weights)
    x = torch.ones(3, 64).to(dtype)
    with pytest.raises(RuntimeError):
        nn.Linear(64, 48)(x)  # what nn.Linear does
    with pytest.raises(TypeError, match=rf"input dtype {dtype} is not floating point"):
        layer(x)


@pytest.mark.parametrize("layer_dtype,x_dtype", [
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float64), (torch.float32, torch.float16),
])
def test_mixed_dtypes_give_the_input_dtype_computed_from_the_stored_values(make_armor_weights, layer_dtype, x_dtype):
    """The rule: y has x's dtype; the reference computes in fp32 (fp64 for fp64 x) from the layer's stored values."""
    layer, _ = _layer(make_armor_weights, dtype=layer_dtype)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    y = layer(x)
    assert y.dtype == x_dtype
    ct = torch.float64 if x_dtype == torch.float64 else torch.float32
    w_hat = reference.materialize(layer.a, layer.values, layer.meta, layer.b).to(ct)  # of the stored values
    expected = (x.to(ct) @ w_hat.T + layer.bias.to(ct)).to(x_dtype)  # one rounding, at the end
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[x_dtype]
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
