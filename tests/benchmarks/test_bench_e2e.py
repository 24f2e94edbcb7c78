"""The end-to-end benchmark harness in --smoke mode on CPU (tiny random Llama)."""

import math

import pytest
import torch

from armor_kernels import dispatch
from benchmarks import bench_e2e, common
from benchmarks.e2e import decode, models, variants


def _fake_sparse_mm(packed, dense, bias=None, transpose_result=False, alg_id=0, **_):
    y = packed.float() @ dense.float() + (0 if bias is None else bias.float()[:, None])
    return (y.t() if transpose_result else y).to(dense.dtype)


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    """One smoke run in the GPU suite's variant order (dense, armor, armor_cslt, plain24). The plain
    2:4 arm runs on CPU stand-ins with cuSPARSELt's calling convention (the plumbing is real)."""
    from armor_kernels.backends import torch_sparse

    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "e.csv"
    dispatch.reset()
    argv = ["--smoke", "--variants", "dense,armor,armor_cslt,plain24", "--prefill", "8", "--decode-batches", "1",
            "--decode-modes", "eager,cuda_graph", "--new-tokens", "2", "--out", str(out), "--scratch", str(tmp)]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_cslt_compress", lambda w: w.clone())
        mp.setattr(torch, "_cslt_sparse_mm", _fake_sparse_mm)
        mp.setattr(torch._C, "_cusparselt", None, raising=False)
        mp.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 0, raising=False)
        mp.setattr(torch_sparse, "status", lambda: (True, ""))
        mp.setattr(torch_sparse, "_searched", {})
        mp.setattr(torch_sparse, "_notes", {})
        assert bench_e2e.main(argv) == 0
    with open(out) as f:
        header = f.readline().strip().split(",")
    return header, common.read_csv(out)


def _f(v):
    return float(v) if v != "" else math.nan


def _row(rows, **want):
    hits = [r for r in rows if all(r[k] == str(v) for k, v in want.items())]
    assert len(hits) == 1, (want, hits)
    return hits[0]


def test_columns_and_rows(smoke_rows):
    header, rows = smoke_rows
    assert header == bench_e2e.COLUMNS
    dense = [r for r in rows if r["variant"] == "dense"]
    # weights, 2 decode modes, prefill, disk
    assert [r["phase"] for r in dense] == ["weights", "decode", "decode", "prefill", "disk"]
    assert all(r["model"] == "tiny" and r["layers_note"] == "2 of 2" for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only reasons")
def test_what_cannot_run_is_unavailable_with_reasons(smoke_rows):
    _, rows = smoke_rows
    graphs = [r for r in rows if r["decode_mode"] == "cuda_graph"]
    assert len(graphs) == 4 and all(r["status"] == "unavailable" and "CUDA" in r["reason"] for r in graphs)
    disk = _row(rows, variant="plain24", phase="disk")
    assert disk["status"] == "unavailable" and "no plain 2:4 checkpoint format" in disk["reason"]


def test_variants_run_in_order_each_from_the_dense_model(smoke_rows):
    _, rows = smoke_rows
    assert [r["variant"] for r in rows if r["phase"] == "weights"] == ["dense", "armor", "armor_cslt", "plain24"]
    plain = _row(rows, variant="plain24", phase="weights")
    assert plain["status"] == "ok" and plain["impl"].startswith("Plain24Linear")
    # built from the restored dense layers (ArmorLinear has no dense weight): the stand-in
    # "compress" keeps the whole masked matrix, so this model holds exactly the dense bytes
    assert int(plain["weights_bytes"]) == int(_row(rows, variant="dense", phase="weights")["weights_bytes"])
    timed = [r for r in rows if r["variant"] == "plain24" and r["phase"] in ("prefill", "decode")]
    assert [r["status"] for r in timed] == ["ok", "unavailable", "ok"]  # eager, cuda_graph, prefill


def test_armor_rows_are_labelled_with_the_cpu_backend_and_timed(smoke_rows):
    _, rows = smoke_rows
    for variant in ("armor", "armor_cslt"):
        timed = [r for r in rows if r["variant"] == variant and r["phase"] in ("prefill", "decode") and r["status"] == "ok"]  # fmt: skip
        assert len(timed) == 2  # prefill, decode eager
        for r in timed:
            assert r["impl"] == "armor_linear via cpu_dense"
            assert _f(r["tokens_per_s"]) > 0


def test_weights_rows_report_layouts_and_what_the_copy_costs(smoke_rows):
    _, rows = smoke_rows
    armor, cslt = _row(rows, variant="armor", phase="weights"), _row(rows, variant="armor_cslt", phase="weights")
    assert "ARMOR_CUSPARSELT_LAYOUT=1" in cslt["impl"]
    if torch.cuda.is_available():
        assert armor["layout_bytes"] == "0"  # one copy of each core by default
    else:  # cpu_dense's W_hat per layer; no cuSPARSELt backend runs, so the opt-in adds no copy
        assert int(armor["layout_bytes"]) > 0 and cslt["layout_bytes"] == armor["layout_bytes"]
    assert all(r["resident_gib"] == "" for r in rows if r["phase"] == "weights") or torch.cuda.is_available()


def test_tokens_per_s_and_speedups_are_consistent(smoke_rows):
    _, rows = smoke_rows
    for r in rows:
        if r["phase"] not in ("prefill", "decode") or r["status"] != "ok":
            continue
        n_tok = int(r["tokens"]) if r["phase"] == "prefill" else int(r["batch"]) * int(r["new_tokens"])
        assert _f(r["tokens_per_s"]) == pytest.approx(n_tok / _f(r["seconds"]), rel=1e-4)
        key = {k: r[k] for k in ("phase", "tokens", "batch", "decode_mode")}
        dense = _row(rows, variant="dense", **key)
        assert _f(r["speedup_vs_dense"]) == pytest.approx(_f(r["tokens_per_s"]) / _f(dense["tokens_per_s"]), rel=1e-3)


def test_weights_and_disk_bytes(smoke_rows):
    _, rows = smoke_rows
    for phase, col in (("weights", "weights_bytes"), ("disk", "disk_bytes")):
        dense, armor = _row(rows, variant="dense", phase=phase), _row(rows, variant="armor", phase=phase)
        assert dense["status"] == armor["status"] == "ok"
        assert int(dense[col]) > 0 and int(armor[col]) > 0
        held = int(armor[col]) + (int(armor["layout_bytes"] or 0) if phase == "weights" else 0)  # + cpu_dense's W_hat
        assert _f(armor["bytes_vs_dense"]) == pytest.approx(held / int(dense[col]), rel=1e-4)
    # in memory the packed layers are smaller than the dense ones they replace (block 8, d 32..128)
    assert int(_row(rows, variant="armor", phase="weights")["weights_bytes"]) < int(
        _row(rows, variant="dense", phase="weights")["weights_bytes"]
    )


def test_static_cache_decoder_matches_dynamic_cache():
    """The fixed-address decode step (what a CUDA graph captures) computes the same logits."""
    from transformers import DynamicCache

    model, *_ = models.build_model("tiny", None, torch.float32, torch.device("cpu"))
    ids = torch.randint(model.config.vocab_size, (2, 5))
    ck = decode.cache_kwarg(model)
    with torch.no_grad():
        dec = decode.StaticDecoder(model, ids, new=3)
        cache = DynamicCache()
        tok = model(ids, use_cache=True, **{ck: cache}).logits[:, -1:].argmax(-1)
        assert torch.equal(tok, dec.tok)
        for _ in range(2):
            want = model(tok, use_cache=True, **{ck: cache}).logits
            got = dec.step()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            dec.advance(got)
            tok = want[:, -1:].argmax(-1)
        dec.rewind()  # rewinding replays the first step exactly
        first = dec.step()
        assert int(dec.pos) == 5 and first.shape == (2, 1, model.config.vocab_size)


def test_plain24_module_reports_why_it_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("cuSPARSELt may run here")
    with pytest.raises(common.Unavailable, match="GPU"):
        variants.Plain24Linear(torch.nn.Linear(16, 8))
