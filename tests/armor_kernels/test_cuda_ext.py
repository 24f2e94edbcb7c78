"""The cuSPARSELt extension wrapper: import without the module, reasons, fake kernels; GPU checks vs the reference."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import pytest
import torch

import armor_kernels
from armor_kernels import cuda_ext, dispatch, reference, sparse24
from armor_kernels.backends import cuda_ext as cuda_backend

OP = torch.ops.armor_cuda.sparse24_mm


class _FailingFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import armor_kernels._C`` fail with a given ImportError."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "armor_kernels._C":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise self.error

    def exec_module(self, module):
        raise AssertionError("never reached")


@pytest.fixture
def no_extension(monkeypatch):
    """Hide any built armor_kernels._C for the test."""
    monkeypatch.delitem(sys.modules, "armor_kernels._C", raising=False)
    monkeypatch.delattr(armor_kernels, "_C", raising=False)

    def install(error):
        monkeypatch.setattr(sys, "meta_path", [_FailingFinder(error)] + sys.meta_path)

    return install


def test_missing_module_is_a_reason_not_a_crash(no_extension):
    no_extension(ModuleNotFoundError("No module named 'armor_kernels._C'", name="armor_kernels._C"))
    module, why = cuda_ext._load()
    assert module is None
    assert "armor_kernels._C is not built" in why and "ARMOR_FORCE_CUDA_BUILD=1" in why


def test_missing_library_keeps_the_loader_text(no_extension, monkeypatch):
    text = "libcusparseLt.so.0: cannot open shared object file: No such file or directory"
    no_extension(ImportError(text))
    monkeypatch.setattr(cuda_ext, "_lt_candidates", list)
    module, why = cuda_ext._load()
    assert module is None
    assert text in why and "nvidia-cusparselt-cu13" in why


def test_other_import_errors_are_kept_word_for_word(no_extension):
    no_extension(ImportError("undefined symbol: _ZN5armor7matmulE"))
    module, why = cuda_ext._load()
    assert module is None and why == "ImportError: undefined symbol: _ZN5armor7matmulE"


def test_availability_has_a_reason():
    ok, why = cuda_ext.available()
    assert isinstance(ok, bool)
    if not ok:
        assert why  # never a silent False
    if cuda_ext._C is None:
        assert why == cuda_ext.IMPORT_ERROR
    assert cuda_backend.BACKEND.is_available() == (ok, why)
    assert dispatch.report()["backends"]["cuda_ext"]["reason"] == why


def test_backend_identity_and_place_in_the_table():
    b = cuda_backend.BACKEND
    assert b.name == "cuda_ext" and b.ops == ("sparse24_matmul",)
    for regime in ("medium", "prefill"):
        assert dispatch.order("cuda", regime)[0] == "cuda_ext"
    assert "cuda_ext" not in dispatch.order("cuda", "decode")
    assert b.min_tokens == {"sparse24_matmul": dispatch.DECODE_MAX_TOKENS + 1}


def test_can_implement_rejects_cpu_with_reason():
    values = torch.zeros(32, 32, dtype=torch.float16)
    meta = torch.zeros(32, 8, dtype=torch.uint8)
    ok, why = cuda_backend.BACKEND.can_implement(
        "sparse24_matmul", torch.zeros(64, 64, dtype=torch.float16), values, meta
    )
    assert not ok and "CUDA" in why
    ok, why = cuda_backend.BACKEND.can_implement("armor_linear", torch.zeros(64, 64), values, meta)
    assert not ok and "armor_linear" in why


@pytest.mark.parametrize(
    "values, meta, rule",
    [
        (torch.zeros(32, 32, dtype=torch.float32), torch.zeros(32, 8, dtype=torch.uint8), "float16 or bfloat16"),
        (torch.zeros(24, 32, dtype=torch.float16), torch.zeros(24, 8, dtype=torch.uint8), "multiple of 16"),
        (torch.zeros(32, 36, dtype=torch.float16), torch.zeros(32, 9, dtype=torch.uint8), "multiple of 16"),
        (
            torch.zeros(32, 32, dtype=torch.float16),
            torch.zeros(32, 4, dtype=torch.uint8),
            "meta: expected uint8 [32, 8]",
        ),
        (torch.zeros(32, 32, dtype=torch.bfloat16), torch.zeros(32, 8, dtype=torch.uint8), ""),
    ],
)
def test_core_shape_rules(values, meta, rule):
    why = cuda_ext.check_core_shapes(values, meta)
    assert (rule in why and why) if rule else why == ""


def test_backend_caches_one_compression_per_values_tensor(monkeypatch):
    calls = []

    def fake_compress(v, m):
        calls.append(v)
        return cuda_ext.CompressedCore(torch.empty(100, dtype=torch.uint8), 32, 32, torch.float16)

    monkeypatch.setattr(cuda_ext, "compress", fake_compress)
    backend = cuda_backend.CudaExtBackend()
    values, meta = torch.zeros(32, 16, dtype=torch.float16), torch.zeros(32, 4, dtype=torch.uint8)
    first = backend._core(values, meta)
    assert backend._core(values, meta) is first and len(calls) == 1
    values.add_(1)  # an in-place change moves the version counter: compress again
    assert backend._core(values, meta) is not first and len(calls) == 2
    other = values.clone()
    backend._core(other, meta)
    assert len(calls) == 3 and len(backend._cores) == 2
    assert backend.layout_bytes() == 200 and backend.layout_bytes(other) == 100
    del other, calls[:]  # the cache holds values weakly: the entry goes with the tensor
    assert len(backend._cores) == 1 and backend.layout_bytes() == 100
    backend.release(values)
    assert len(backend._cores) == 0 and backend.layout_bytes() == 0
    with torch.inference_mode():
        frozen = torch.zeros(32, 16, dtype=torch.float16)
    assert backend._core(frozen, meta) is backend._core(frozen, meta)


def test_fake_kernel_shapes_on_meta():
    x = torch.empty(2, 5, 128, dtype=torch.bfloat16, device="meta")
    buf = torch.empty(1000, dtype=torch.uint8, device="meta")
    out = OP(x, buf, 256, 128)
    assert out.shape == (2, 5, 256) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="must equal k"):
        OP(x, buf, 256, 64)


def test_opcheck_on_meta():
    x = torch.empty(16, 64, dtype=torch.float16, device="meta")
    buf = torch.empty(600, dtype=torch.uint8, device="meta")
    bias = torch.empty(32, dtype=torch.float16, device="meta")
    torch.library.opcheck(OP, (x, buf, 32, 64), {"bias": bias})


def test_traces_as_one_node():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, buf):
        return OP(x, buf, 48, 32) * 2

    gm = make_fx(f, tracing_mode="fake")(torch.zeros(8, 32, dtype=torch.float16), torch.zeros(10, dtype=torch.uint8))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert OP.default in targets
    assert [n.meta["val"].shape for n in gm.graph.nodes if n.target is OP.default] == [(8, 48)]


def test_cached_plans_is_a_list():
    plans = cuda_ext.cached_plans()
    assert isinstance(plans, list)
    if not torch.cuda.is_available():
        assert plans == []


@pytest.mark.skipif(cuda_ext._C is None, reason=f"extension not loaded: {cuda_ext.IMPORT_ERROR}")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_extension_errors_name_the_call_and_shape():
    err = cuda_ext._C.CudaExtError
    assert issubclass(err, RuntimeError)
    with pytest.raises(err, match=r"cudaGetDevice.*failed for device 0"):
        cuda_ext._C.compressed_size(0, 0, 64, 64)
    with pytest.raises(err, match=r"multiples of 16, got float16 S\[60, 64\]"):
        cuda_ext._C.plan(0, 0, 60, 64, 8, 0, False)
    with pytest.raises(err, match=r"token count to be a positive multiple of 8, got bfloat16 S\[64, 64\] x\[12, 64\]"):
        cuda_ext._C.plan(0, 1, 64, 64, 12, 0, False)
    with pytest.raises(err, match="dtype code 7"):
        cuda_ext._C.plan(0, 7, 64, 64, 8, 0, False)
    with pytest.raises(err, match="no cuSPARSELt plan"):
        cuda_ext._C.matmul(0, 0, 64, 64, 8, 0, 1, 1, 1, 0, 1.0, 0, 0, 0)
    assert set(cuda_ext.versions()) == {"cusparselt_compiled", "cusparselt_loaded", "cudart_compiled", "cudart_loaded"}


@pytest.mark.skipif(cuda_ext._C is None, reason=f"extension not loaded: {cuda_ext.IMPORT_ERROR}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [32, 20])  # 20: an odd group count, the last meta byte half padding
def test_expansion_indexing_matches_decompress_bit_for_bit(dtype, cols):
    # the CUDA kernel's group function, run by a host loop: same indexing, checked without a GPU
    core = torch.randn(7, cols).to(dtype)
    mask = sparse24.topk_mask(torch.rand(7, cols))
    core[0, :4] = torch.tensor([-0.0, 0.0, 1.0, 2.0])  # kept signed zero must survive
    mask[0, :4] = torch.tensor([True, False, False, True])
    values, meta = sparse24.compress(core, mask)
    dense = torch.full((7, cols), float("nan"), dtype=dtype)
    cuda_ext._C.expand24_host(values.data_ptr(), meta.data_ptr(), dense.data_ptr(), 7, cols)
    assert torch.equal(dense.view(torch.int16), sparse24.decompress(values, meta).view(torch.int16))
    with pytest.raises(cuda_ext._C.CudaExtError, match="multiple of 4"):
        cuda_ext._C.expand24_host(values.data_ptr(), meta.data_ptr(), dense.data_ptr(), 7, 30)


# ---- GPU: against the reference -------------------------------------------------------------


def _layer(n, k, dtype, device="cuda"):
    core = torch.randn(n, k, device=device)
    core = core * sparse24.topk_mask(core.abs())
    values, meta = sparse24.compress(core.to(dtype))
    return values, meta


def _close(out, ref, dtype):
    err = (out.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= (2e-2 if dtype == torch.bfloat16 else 4e-3) * scale + 1e-3, (err, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [17, 64, 300])
def test_gpu_matches_reference(dtype, tokens):
    ok, why = cuda_ext.available()
    if not ok:
        pytest.skip(why)
    n, k = 256, 512
    values, meta = _layer(n, k, dtype)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    core = cuda_ext.compress(values, meta)
    for b in (None, bias):
        out = cuda_ext.sparse24_mm(x, core, b)
        ref = reference.sparse24_matmul(x.float(), values.float(), meta, None if b is None else b.float())
        assert out.shape == (tokens, n) and out.dtype == dtype
        _close(out, ref, dtype)
    scale = torch.rand(n, device="cuda", dtype=torch.float32) + 0.5
    out = cuda_ext.sparse24_mm(x, core, None, scale)
    _close(out, reference.sparse24_matmul(x.float(), values.float(), meta) * scale, dtype)


@pytest.mark.gpu
def test_gpu_plan_cache_and_backend(monkeypatch):
    ok, why = cuda_ext.available()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("ARMOR_CUSPARSELT_LAYOUT", "1")  # the compressed copy and its plans
    dispatch.reset()
    dtype, n, k = torch.float16, 128, 256
    values, meta = _layer(n, k, dtype)
    x = torch.randn(3, 40, k, device="cuda", dtype=dtype)  # 120 tokens
    assert dispatch.select("sparse24_matmul", x, values, meta, None).backend.name == "cuda_ext"
    cuda_backend.BACKEND.prepare(None, values, meta, None, None)
    assert cuda_backend.BACKEND.layout_bytes(values) > 0
    out = armor_kernels.sparse24_matmul(x, values, meta)
    _close(out.reshape(-1, n), reference.sparse24_matmul(x.reshape(-1, k).float(), values.float(), meta), dtype)
    plans = [p for p in cuda_ext.cached_plans() if (p["n"], p["k"], p["tokens"]) == (n, k, 120)]
    assert plans and plans[0]["bucket"] == 128 and plans[0]["searched"] == cuda_ext._search_enabled()
    if cuda_ext._search_enabled():
        assert plans[0]["search_workspace"] >= plans[0]["workspace"]
    # another count in the same bucket reuses the searched choice without searching again
    armor_kernels.sparse24_matmul(torch.randn(104, k, device="cuda", dtype=dtype), values, meta)
    again = [p for p in cuda_ext.cached_plans() if (p["n"], p["k"], p["tokens"]) == (n, k, 104)]
    assert again and (again[0].get("fallback") or again[0]["alg_id"] == plans[0]["alg_id"])
    n_plans = len(cuda_ext.cached_plans())
    for _ in range(3):  # a fresh bias per call makes no new plan
        cuda_ext.sparse24_mm(x, cuda_backend.BACKEND._core(values, meta), torch.randn(n, device="cuda", dtype=dtype))
    assert len(cuda_ext.cached_plans()) == n_plans


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_expanded_mm_matches_reference_without_a_copy(dtype, monkeypatch):
    ok, why = cuda_ext.available()
    if not ok:
        pytest.skip(why)
    monkeypatch.delenv("ARMOR_CUSPARSELT_LAYOUT", raising=False)
    n, k = 256, 512
    values, meta = _layer(n, k, dtype)
    dense = torch.full((n, k), float("nan"), device="cuda", dtype=dtype)
    cuda_ext.expand_into(values, meta, dense)
    assert torch.equal(dense.view(torch.int16), sparse24.decompress(values, meta).view(torch.int16))
    x = torch.randn(300, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    before = cuda_backend.BACKEND.layout_bytes()
    out = cuda_backend.BACKEND.sparse24_matmul(x, values, meta, bias)
    _close(out, reference.sparse24_matmul(x.float(), values.float(), meta, bias.float()), dtype)
    assert cuda_backend.BACKEND.layout_bytes() == before  # nothing kept per layer


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    ok, why = cuda_ext.available()
    if not ok:
        pytest.skip(why)
    dtype, n, k = torch.bfloat16, 256, 256
    values, meta = _layer(n, k, dtype)
    core = cuda_ext.compress(values, meta)
    x = torch.randn(64, k, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream: plan, search, workspace
        cuda_ext.sparse24_mm(x, core)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = cuda_ext.sparse24_mm(x, core)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, reference.sparse24_matmul(x.float(), values.float(), meta), dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit code")
def test_gpu_check_script_says_it_cannot_run(capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "check_cuda_ext.py"
    main = runpy.run_path(str(script), run_name="check_cuda_ext")["main"]
    assert main(["--no-build"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
