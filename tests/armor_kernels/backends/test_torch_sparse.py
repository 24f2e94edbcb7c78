"""The cuSPARSELt backend: availability reasons, feature detection of the search API, GPU correctness."""

import types

import pytest
import torch

from armor_kernels import ArmorWeights, dispatch, reference, sparse24
from armor_kernels.backends import torch_sparse


def test_unavailable_without_gpu_says_why():
    ok, why = torch_sparse.BACKEND.is_available()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert not ok
    assert "CUDA" in why or "cuSPARSELt" in why


def test_can_implement_rejects_cpu_tensors_and_other_ops():
    values = torch.zeros(32, 16, dtype=torch.float16)
    meta = torch.zeros(32, 4, dtype=torch.uint8)
    x = torch.zeros(4, 32, dtype=torch.float16)
    ok, why = torch_sparse.BACKEND.can_implement("sparse24_matmul", x, values, meta, None)
    assert not ok and "needs CUDA" in why
    ok, why = torch_sparse.BACKEND.can_implement("armor_linear", x, None, values, meta, None, None)
    assert not ok and "no armor_linear" in why


def test_not_for_decode_and_after_the_extension_for_prefill():
    decode, prefill = dispatch.order("cuda", "decode"), dispatch.order("cuda", "prefill")
    assert "torch_sparse" not in decode  # cuSPARSELt pads few-token products
    assert prefill.index("cuda_ext") < prefill.index("torch_sparse")


def test_its_copy_of_the_core_is_opt_in(monkeypatch):
    backend = torch_sparse.TorchSparseBackend()
    backend.device_types, backend.min_capability = ("cpu",), None  # the rule under test is the opt-in
    values = torch.zeros(32, 16, dtype=torch.float16)
    meta = torch.zeros(32, 4, dtype=torch.uint8)
    x = torch.zeros(64, 32, dtype=torch.float16)
    monkeypatch.delenv("ARMOR_CUSPARSELT_LAYOUT", raising=False)
    monkeypatch.delenv("ARMOR_BACKEND", raising=False)
    ok, why = backend.can_implement("sparse24_matmul", x, values, meta, None)
    assert not ok and "ARMOR_CUSPARSELT_LAYOUT=1" in why
    monkeypatch.setenv("ARMOR_BACKEND", "torch_sparse")  # forcing it asks for its layout
    assert backend.can_implement("sparse24_matmul", x, values, meta, None) == (True, "")
    monkeypatch.delenv("ARMOR_BACKEND")
    monkeypatch.setenv("ARMOR_CUSPARSELT_LAYOUT", "1")
    assert backend.can_implement("sparse24_matmul", x, values, meta, None) == (True, "")


def test_layout_cache_is_weak_and_bounded_searches(monkeypatch):
    monkeypatch.setattr(torch_sparse, "compress", lambda w: torch.empty(w.numel() * 9 // 16, dtype=torch.uint8))
    backend = torch_sparse.TorchSparseBackend()
    values = torch.zeros(32, 16, dtype=torch.float16)
    meta = torch.zeros(32, 4, dtype=torch.uint8)
    packed = backend._compressed(values, meta)
    assert backend._compressed(values, meta) is packed and backend.layout_bytes() == packed.nbytes == 576
    del values, packed
    assert backend.layout_bytes() == 0  # went with the layer's tensor
    monkeypatch.setattr(torch_sparse, "_searched", {i: {} for i in range(torch_sparse.MAX_SEARCHED)})
    monkeypatch.setattr(torch_sparse, "_notes", {})
    monkeypatch.setattr(torch_sparse, "search", lambda *a: ({"alg_id": 1}, "stand-in"))
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda p, d, bias=None, transpose_result=False, **kw: d.t() @ p)
    y = torch_sparse.matmul(torch.eye(8, 4), torch.randn(3, 8), 4)
    assert y.shape == (3, 4) and len(torch_sparse._searched) == 1  # full: cleared, then this class searched


def test_search_is_feature_detected(monkeypatch):
    # newer torch: torch._C._cusparselt.mm_search -> (alg_id, split_k, split_k_mode, max_alg_id)
    monkeypatch.setattr(
        torch._C, "_cusparselt", types.SimpleNamespace(mm_search=lambda *a: (3, 2, 1, 7)), raising=False
    )
    monkeypatch.setattr(torch_sparse, "_schema_args", lambda: {"alg_id", "split_k", "split_k_mode"})
    kwargs, how = torch_sparse.search(None, None, None)
    assert kwargs == {"alg_id": 3, "split_k": 2, "split_k_mode": 1} and "mm_search" in how
    # older torch: split_k_one_kernel instead of split_k_mode
    monkeypatch.setattr(torch_sparse, "_schema_args", lambda: {"alg_id", "split_k", "split_k_one_kernel"})
    assert torch_sparse.search(None, None, None)[0] == {"alg_id": 3, "split_k": 2, "split_k_one_kernel": True}
    # oldest: only torch._cslt_sparse_mm_search -> alg id
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(), raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 5, raising=False)
    kwargs, how = torch_sparse.search(None, None, None)
    assert kwargs == {"alg_id": 5} and "_cslt_sparse_mm_search" in how

    # a failing search is visible, not fatal
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", broken)
    kwargs, how = torch_sparse.search(None, None, None)
    assert kwargs == {} and "boom" in how


def test_real_schema_has_the_arguments_we_pass():
    names = torch_sparse._schema_args()
    if not names:
        pytest.skip("this torch has no _cslt_sparse_mm")
    assert {"bias", "transpose_result", "alg_id"} <= names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
def test_gpu_matches_reference(dtype, tokens, monkeypatch):
    backend = torch_sparse.BACKEND
    ok, why = backend.is_available()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("ARMOR_CUSPARSELT_LAYOUT", "1")
    core = torch.randn(256, 512)
    mask = sparse24.topk_mask(core.abs())
    w = ArmorWeights.from_factors(
        torch.eye(128).expand(2, 128, 128), torch.where(mask, core, 0.0), torch.eye(128).expand(4, 128, 128),
        bias=torch.randn(256), mask=mask, dtype=dtype,
    ).to("cuda")  # fmt: skip
    backend.prepare(w.a, w.values, w.meta, w.b, w.bias)
    x = torch.randn(tokens, 512, device="cuda").to(dtype)
    got = backend.sparse24_matmul(x, w.values, w.meta, w.bias)
    want = reference.sparse24_matmul(x.float(), w.values.float(), w.meta, w.bias.float())
    same = torch.nn.functional.linear(x, sparse24.decompress(w.values, w.meta), w.bias).float()
    err = float((got.float() - want).abs().max())
    assert err <= 4 * float((same - want).abs().max()) + 2.0**-7 * float(want.abs().max())
    assert backend.plans(), "the searched algorithm was not recorded"


@pytest.mark.gpu
def test_gpu_opcheck_through_torch_sparse(monkeypatch):
    ok, why = torch_sparse.BACKEND.is_available()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("ARMOR_BACKEND", "torch_sparse")
    dispatch.reset()
    core = torch.randn(64, 128)
    mask = sparse24.topk_mask(core.abs())
    w = ArmorWeights.from_factors(
        torch.eye(64).expand(1, 64, 64), torch.where(mask, core, 0.0), torch.eye(128).expand(1, 128, 128),
        bias=torch.randn(64), mask=mask, dtype=torch.bfloat16,
    ).to("cuda")  # fmt: skip
    x = torch.randn(24, 128, device="cuda").to(torch.bfloat16)
    torch.library.opcheck(torch.ops.armor.sparse24_matmul.default, (x, w.values, w.meta, w.bias))
    choice = dispatch.select("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias)
    assert "torch_sparse" in choice.backend.name  # a composite around the cuSPARSELt core
