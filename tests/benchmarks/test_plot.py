"""Plot and target table from benchmark CSVs, the `armor bench` command, the GPU suite script."""

from pathlib import Path

import pytest

from armor_runtime import cli
from benchmarks import bench_kernels, common, plot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_csv(tmp_path_factory):
    """A smoke CSV written through the `armor bench` command (one shape, two token counts)."""
    out = tmp_path_factory.mktemp("plot") / "k.csv"
    argv = ["bench", "kernels", "--smoke", "--shapes", "tiny:up", "--tokens", "1,4", "--providers", "dense,armor_reference,cslt_search",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_armor_bench_forwards_to_the_script(smoke_csv):
    rows = common.read_csv(smoke_csv)
    assert len(rows) == 2 * 3  # tokens x providers
    assert {r["provider"] for r in rows} == {"dense", "armor_reference", "cslt_search"}


def test_armor_bench_without_a_checkout_says_how(monkeypatch, capsys):
    from armor_runtime.commands import bench

    monkeypatch.setattr(bench, "checkout", lambda: None)
    assert cli.main(["bench", "e2e", "--smoke"]) == 2
    assert "python -m benchmarks.bench_e2e" in capsys.readouterr().err


def test_the_package_never_imports_the_benchmarks():
    import ast

    for path in (REPO / "armor_runtime").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "benchmarks" or n.startswith("benchmarks.") for n in names), path
        assert "sys.path.insert" not in path.read_text(), path


def test_plot_writes_one_panel_per_shape(smoke_csv, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the [plot] extra) is not installed")
    png = tmp_path / "s.png"
    assert plot.main(["--kernels", str(smoke_csv), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = plot.speedup_series(common.read_csv(smoke_csv))
    assert {(p[0], p[1]) for p in panels} == {("tiny", "up")}
    for provs in panels.values():
        assert set(provs) <= {"armor_reference", "cslt_search"}  # dense is the baseline, not a line
        assert all([t for t, _ in pts] == sorted(t for t, _ in pts) for pts in provs.values())


def test_plot_refuses_a_csv_without_timed_rows(tmp_path):
    path = tmp_path / "k.csv"
    out = common.CsvOut(path, bench_kernels.COLUMNS)
    out.write({"model": "tiny", "provider": "cslt_search", "status": "unavailable", "reason": "no GPU"})
    out.close()
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.plot_speedups(common.read_csv(path), str(tmp_path / "x.png"))


def _krow(layer, tokens, provider, ms, **extra):
    return dict(device="cuda", model="llama3-8b", layer=layer, d_out="14336", d_in="4096", dtype="bf16",
                tokens=str(tokens), provider=provider, status="ok", median_ms=str(ms), block_in="128", **extra)  # fmt: skip


def test_target_table_reads_gpu_rows_only():
    rows = [
        _krow("gate_proj/up_proj", 1, "dense", 2.0, speedup_vs_dense="1", weight_bytes="1000"),
        _krow("gate_proj/up_proj", 1, "armor_triton", 1.0, speedup_vs_dense="2", weight_bytes="600"),
        _krow("gate_proj/up_proj", 1, "armor_cuda", 1.6, speedup_vs_dense="1.25", weight_bytes="600"),
        _krow("gate_proj/up_proj", 2048, "armor_cuda", 1.0, speedup_vs_dense="1.3", speedup_vs_plain24="0.9"),
        dict(_krow("down_proj", 1, "armor_triton", 1.0, speedup_vs_dense="9"), device="cpu"),
    ]
    e2e = [
        {
            "model": "llama3-8b-shaped",
            "phase": "decode",
            "variant": "armor",
            "status": "ok",
            "device": "cuda",
            "batch": "1",
            "decode_mode": "cuda_graph",
            "speedup_vs_dense": "1.3",
            "layers_note": "32 of 32",
        }
    ]
    table = dict(plot.target_table(rows, e2e))
    decode, e2e_text, prefill, vs24, mem = (table[t] for t in plot.TARGETS)
    assert decode == "gate_proj/up_proj x2.00 (armor_triton)"  # the best backend; the CPU row is ignored
    assert e2e_text == "batch 1 cuda_graph x1.30 (32 of 32 layers)"
    assert prefill == "gate_proj/up_proj x1.30 (armor_cuda)"
    assert vs24 == "gate_proj/up_proj x0.90 (armor_cuda)"
    assert mem == "gate_proj/up_proj x0.60 (b=128)"
    assert set(dict(plot.target_table([], [])).values()) == {"not measured in these CSVs"}
