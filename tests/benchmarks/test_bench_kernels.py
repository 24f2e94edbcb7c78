"""The kernel benchmark harness in --smoke mode on CPU: rows, columns, arithmetic, unavailable providers."""

import math

import pytest
import torch

from armor_kernels import dispatch, reference
from armor_kernels.backends.base import OPS, Backend
from benchmarks import bench_kernels, common

TOKENS = (1, 8)


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bk") / "k.csv"
    dispatch.reset()
    assert (
        bench_kernels.main(
            ["--smoke", "--shapes", "tiny:up", "--tokens", ",".join(map(str, TOKENS)), "--out", str(out)]
        )
        == 0
    )
    with open(out) as f:
        header = f.readline().strip().split(",")
    return header, common.read_csv(out)


def _f(v):
    return float(v) if v != "" else math.nan


def test_columns_and_one_row_per_provider_and_point(smoke_rows):
    header, rows = smoke_rows
    assert header == bench_kernels.COLUMNS
    providers = ["dense", *bench_kernels.PLAIN24, *bench_kernels.armor_provider_names()]
    assert len(rows) == len(TOKENS) * len(providers)
    for t in TOKENS:
        assert sorted(r["provider"] for r in rows if r["tokens"] == str(t)) == sorted(providers)


def test_cpu_timed_providers_and_labels(smoke_rows):
    _, rows = smoke_rows
    for r in rows:
        if r["provider"] in ("dense", "armor_reference", "armor_cpu_dense"):
            assert r["status"] == "ok", r
            assert _f(r["median_ms"]) > 0
            assert r["device"] == "cpu" and r["dtype"] == "bf16"
        if r["provider"] == "armor_reference":
            assert r["note"] == "cpu reference"
            assert _f(r["max_rel_err"]) <= bench_kernels.REL_ERR_LIMIT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only reasons")
def test_plain24_unavailable_on_cpu_with_reason(smoke_rows):
    _, rows = smoke_rows
    for r in rows:
        if r["provider"] in bench_kernels.PLAIN24:
            assert r["status"] == "unavailable"
            assert "GPU" in r["reason"]
            assert r["median_ms"] == "" and r["speedup_vs_dense"] == ""


def test_speedups_match_times(smoke_rows):
    _, rows = smoke_rows
    for t in TOKENS:
        point = {r["provider"]: r for r in rows if r["tokens"] == str(t)}
        dense_ms = _f(point["dense"]["median_ms"])
        assert _f(point["dense"]["speedup_vs_dense"]) == pytest.approx(1.0)
        for r in point.values():
            if r["status"] == "ok":
                assert _f(r["speedup_vs_dense"]) == pytest.approx(dense_ms / _f(r["median_ms"]), rel=1e-4)


def test_flops_and_bytes_follow_the_formulas(smoke_rows):
    _, rows = smoke_rows
    for r in rows:
        if r["status"] != "ok":
            continue
        m, n, k, ms = int(r["tokens"]), int(r["d_out"]), int(r["d_in"]), _f(r["median_ms"])
        assert _f(r["tflops_dense_equiv"]) == pytest.approx(2 * m * n * k / (ms * 1e-3) / 1e12, rel=1e-4)
        if r["provider"] == "armor_reference":
            bo, bi = int(r["block_out"]), int(r["block_in"])
            actual = 2 * m * (n * k / 2 + bi * k + bo * n)
            assert _f(r["tflops_actual"]) == pytest.approx(actual / (ms * 1e-3) / 1e12, rel=1e-4)
            # weights: values (bf16) + metadata (1 byte per 8 columns) + two wrappers
            assert int(r["weight_bytes"]) == n * k // 2 * 2 + n * k // 8 + 2 * (bo * n + bi * k)
        if r["provider"] == "dense":
            assert int(r["weight_bytes"]) == 2 * n * k
        assert int(r["bytes_moved"]) == int(r["weight_bytes"]) + 2 * m * (n + k)
        assert _f(r["gbps"]) == pytest.approx(int(r["bytes_moved"]) / (ms * 1e-3) / 1e9, rel=1e-4)
        assert 0 < _f(r["roofline_frac"])


class _Fake(Backend):
    """A backend whose availability and output the test controls."""

    ops = OPS

    def __init__(self, name, available=True, scale=1.0, fail=False):
        self.name, self._available, self._scale, self._fail = name, available, scale, fail

    def is_available(self):
        return (True, "") if self._available else (False, "no fake device here")

    def armor_linear(self, x, a, values, meta, b, bias=None):
        if self._fail:
            raise RuntimeError("fake kernel crashed")
        return reference.armor_linear(x, a, values, meta, b, bias) * self._scale


def test_unavailable_failing_and_wrong_backends_are_rows_not_crashes(tmp_path, monkeypatch):
    table = dispatch._load()
    monkeypatch.setitem(table, "fakeoff", _Fake("fakeoff", available=False))
    monkeypatch.setitem(table, "fakecrash", _Fake("fakecrash", fail=True))
    monkeypatch.setitem(table, "fakewrong", _Fake("fakewrong", scale=1.5))
    out = tmp_path / "k.csv"
    provs = "dense,armor_fakeoff,armor_fakecrash,armor_fakewrong,armor_nosuch"
    assert (
        bench_kernels.main(
            ["--smoke", "--shapes", "tiny:down", "--tokens", "4", "--providers", provs, "--out", str(out)]
        )
        == 0
    )
    rows = {r["provider"]: r for r in common.read_csv(out)}
    assert rows["dense"]["status"] == "ok"
    assert rows["armor_fakeoff"]["status"] == "unavailable"
    assert "no fake device here" in rows["armor_fakeoff"]["reason"]
    assert rows["armor_fakecrash"]["status"] == "error"
    assert "fake kernel crashed" in rows["armor_fakecrash"]["reason"]
    assert rows["armor_fakewrong"]["status"] == "wrong_result"
    assert _f(rows["armor_fakewrong"]["max_rel_err"]) > bench_kernels.REL_ERR_LIMIT
    assert rows["armor_nosuch"]["status"] == "unavailable" and "not loaded" in rows["armor_nosuch"]["reason"]


def test_add_speedups_prefers_searched_plain24():
    rows = [
        {"provider": "dense", "status": "ok", "median_ms": 2.0},
        {"provider": "cslt_search", "status": "ok", "median_ms": 1.0},
        {"provider": "cslt_alg0", "status": "ok", "median_ms": 4.0},
        {"provider": "armor_x", "status": "ok", "median_ms": 0.5},
        {"provider": "armor_y", "status": "unavailable", "median_ms": ""},
    ]
    bench_kernels.add_speedups(rows)
    assert rows[3]["speedup_vs_dense"] == 4.0 and rows[3]["speedup_vs_plain24"] == 2.0
    assert rows[3]["plain24_ref"] == "cslt_search"
    assert "speedup_vs_dense" not in rows[4]


def test_select_shapes():
    llama = common.select_shapes("llama3-8b")
    assert [(n, k) for _, _, n, k in llama] == [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
    assert common.select_shapes("llama3-8b:down,llama3-8b:down") == [("llama3-8b", "down_proj", 4096, 14336)]
    assert common.select_shapes("384x256") == [("custom", "384x256", 384, 256)]
    assert all(s[0] != "tiny" for s in common.select_shapes("all"))
    with pytest.raises(ValueError, match="matches no shape"):
        common.select_shapes("llama9-70b")


def test_csv_refuses_a_different_header(tmp_path):
    path = tmp_path / "x.csv"
    out = common.CsvOut(path, ["a", "b"])
    out.write({"a": 1.5, "b": None})
    out.close()
    assert common.read_csv(path) == [{"a": "1.5", "b": ""}]
    with pytest.raises(ValueError, match="header differs"):
        common.CsvOut(path, ["a", "c"])


def test_roofline_time_is_the_larger_bound():
    roof = common.Roofline({"bf16": 100.0}, 1000.0, "test")
    # memory-bound: 1e9 bytes at 1000 GB/s = 1 ms; 1e9 flops at 100 TF/s = 0.01 ms
    assert roof.ideal_ms("bf16", 1e9, 0, 1e9) == pytest.approx(1.0)
    # compute-bound, 2:4 flops run at twice the dense rate
    assert roof.ideal_ms("bf16", 0, 2e14, 1) == pytest.approx(1000.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CPU automatic selection picks cpu_dense")
def test_auto_provider_times_dispatch_choice(tmp_path):
    out = tmp_path / "k.csv"
    argv = ["--smoke", "--shapes", "tiny:up", "--tokens", "2", "--providers", "dense,armor_auto", "--out", str(out)]
    assert bench_kernels.main(argv) == 0
    auto = {r["provider"]: r for r in common.read_csv(out)}["armor_auto"]
    assert auto["status"] == "ok" and auto["note"] == "runs cpu_dense"
    assert _f(auto["max_rel_err"]) <= bench_kernels.REL_ERR_LIMIT


@pytest.fixture
def fake_cusparselt(monkeypatch):
    """CPU stand-ins with cuSPARSELt's calling convention, to exercise the plumbing
    (padding, transposes, search results) that otherwise runs only on a GPU."""
    import types

    from armor_kernels.backends import torch_sparse

    calls = {"search": 0}

    def compress(w):
        return w.clone()

    def sparse_mm(packed, dense, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0, split_k=1, split_k_mode=-1):  # fmt: skip
        assert dense.shape[1] % 8 == 0, "cuSPARSELt needs the dense operand padded to 8"
        y = packed.float() @ dense.float()
        if bias is not None:
            y = y + bias.float()[:, None]
        return (y.t() if transpose_result else y).to(dense.dtype)

    def mm_search(packed, dense, bias, alpha, out_dtype, transpose_result):
        calls["search"] += 1
        return (3, 2, 1, 10)  # alg_id, split_k, split_k_mode, max_alg_id

    monkeypatch.setattr(torch, "_cslt_compress", compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(mm_search=mm_search), raising=False)
    monkeypatch.setattr(torch_sparse, "status", lambda: (True, ""))
    monkeypatch.setattr(torch_sparse, "_schema_args", lambda: {"alg_id", "split_k", "split_k_mode", "bias"})
    monkeypatch.setattr(torch_sparse, "_searched", {})
    monkeypatch.setattr(torch_sparse, "_notes", {})
    return calls


@pytest.mark.parametrize("tokens", [3, 8])
def test_cslt_provider_pads_and_uses_the_searched_algorithm(fake_cusparselt, tokens):
    w = torch.randn(32, 64) * common.random_24_mask(32, 64, "cpu")
    x = torch.randn(tokens, 64)
    fn, nbytes, note = bench_kernels.make_cslt(w, x, search=True)
    torch.testing.assert_close(fn(), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert nbytes == w.nbytes
    assert "alg_id=3" in note and "split_k=2" in note and "split_k_mode=1" in note
    assert ("padded" in note) == (tokens % 8 != 0)
    assert fake_cusparselt["search"] == 1  # timed calls reuse the search


def test_plain24_module_is_the_library_wrapper_and_matches_the_pruned_linear(fake_cusparselt):
    from benchmarks.e2e import variants

    lin = torch.nn.Linear(64, 32)
    mod = variants.Plain24Linear(lin)
    x = torch.randn(2, 3, 64)
    w24 = lin.weight * variants.magnitude_24(lin.weight)
    torch.testing.assert_close(mod(x), torch.nn.functional.linear(x, w24, lin.bias), rtol=1e-5, atol=1e-5)
    mod(torch.randn(2, 3, 64))  # same token bucket: the search result is reused
    assert fake_cusparselt["search"] == 1
    assert [n for n, _ in mod.named_buffers()] == ["packed", "bias"]  # no dense weight kept


def test_benchmarks_have_no_cusparselt_wrapper_of_their_own():
    import inspect

    from benchmarks import check_cuda_ext
    from benchmarks.e2e import variants

    for module in (bench_kernels, variants, check_cuda_ext):
        text = inspect.getsource(module)
        assert "_cslt_sparse_mm(" not in text and "mm_search(" not in text, module.__name__


def test_forced_backend_sets_and_restores_the_environment(monkeypatch):
    import os

    monkeypatch.setenv("ARMOR_BACKEND", "reference")
    monkeypatch.delenv("ARMOR_CUSPARSELT_LAYOUT", raising=False)
    with bench_kernels.forced_backend("auto+cslt"):
        assert "ARMOR_BACKEND" not in os.environ and os.environ["ARMOR_CUSPARSELT_LAYOUT"] == "1"
    assert os.environ["ARMOR_BACKEND"] == "reference" and "ARMOR_CUSPARSELT_LAYOUT" not in os.environ
    with bench_kernels.forced_backend("cuda_ext"):
        assert os.environ["ARMOR_BACKEND"] == "cuda_ext" and "ARMOR_CUSPARSELT_LAYOUT" not in os.environ
