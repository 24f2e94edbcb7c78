"""benchmarks/quality.py end to end on a tiny model: one table, every method, ARMOR never worse than NoWag-P."""

import csv

from benchmarks import quality


def test_relative_reduction_counts_layers_not_worse():
    layers = {
        "a": {"proxy_loss": 0.5, "nowag_p_loss": 1.0},
        "b": {"proxy_loss": 0.3, "nowag_p_loss": 0.2},  # worse: must not be counted
    }
    r = quality.relative_reduction(layers)
    assert r["layers"] == 2 and r["not_worse"] == 1
    assert abs(r["mean"] - (0.5 + (1 - 1.5)) / 2) < 1e-12


def test_quality_table_on_a_tiny_model(tmp_path, solver_model_dir, solver_text_file, capsys):
    argv = [
        "--model", solver_model_dir, "--text", solver_text_file, "--methods", "magnitude,nowag-p,armor",
        "--nsamples", "3", "--seqlen", "32", "--windows", "3", "--eval-seqlen", "32", "--block-size", "16",
        "--iters", "2", "--out", str(tmp_path),
    ]
    assert quality.main(argv) == 0
    out = capsys.readouterr()
    assert "| armor |" in out.out and "| dense |" in out.out
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "quality.csv").open())}
    assert set(rows) == {"dense", "magnitude", "nowag-p", "armor"}
    assert float(rows["armor"]["proxy_loss"]) <= float(rows["nowag-p"]["proxy_loss"]) * (1 + 1e-6)
    assert float(rows["armor"]["rel_reduction_vs_nowag_p"]) >= 0
    assert "14/14 layers not worse" in out.err
