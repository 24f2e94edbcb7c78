import json
import math
import os
import re
from pathlib import Path

import pytest

from armor_runtime import cli
from armor_runtime.commands.prune import parse_extra


def test_parse_extra_forwards_method_options():
    assert parse_extra(["--solver", "adam", "--time-budget", "2.5", "--sweeps=3", "--verbose"]) == {
        "solver": "adam", "time_budget": 2.5, "sweeps": 3, "verbose": True,
    }
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_extra(["stray"])


def _prune(model_dir, out, text, *extra):
    return cli.main(["prune", "--model", model_dir, "--out", out, "--nsamples", "3", "--seqlen", "32",
                     "--text", text, "--block-size", "16", *extra])


def test_prune_then_eval_end_to_end(tmp_path, solver_model_dir, solver_text_file, capsys):
    out = str(tmp_path / "ckpt")
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "armor", "--sweeps", "1") == 0
    config = json.loads(Path(os.path.join(out, "config.json")).read_text())
    solver = config["quantization_config"]["solver"]
    assert solver["method"] == "armor" and solver["extra"] == {"sweeps": 1}
    assert (solver["nsamples"], solver["seqlen"], solver["block_size"]) == (3, 32, 16)
    assert solver["calibration_text"] == os.path.abspath(solver_text_file)
    assert len(solver["per_layer"]) == 14
    assert all(v["block_out"] <= 16 and v["block_in"] <= 16 for v in solver["per_layer"].values())
    assert not os.path.exists(os.path.join(out, ".armor_partial"))
    capsys.readouterr()

    ppl = {}
    for name, model in (("armor", out), ("dense", solver_model_dir)):
        assert cli.main(["eval", "--model", model, "--text", solver_text_file, "--seqlen", "32", "--windows", "3"]) == 0
        line = capsys.readouterr().out
        assert "3 windows x 32 tokens" in line
        ppl[name] = float(re.search(r"perplexity ([0-9.]+)", line).group(1))
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["armor"] != ppl["dense"]  # the checkpoint really holds the pruned layers

    # the same command again: the directory holds a finished checkpoint, so it is refused untouched
    before = sorted(os.listdir(out))
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "armor", "--sweeps", "1") == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_cli_bad_inputs_exit_2_with_a_message(tmp_path, solver_model_dir, solver_text_file, capsys):
    out = str(tmp_path / "x")
    rc = cli.main(["prune", "--model", solver_model_dir, "--out", out, "--method", "wanda", "--nsamples", "2",
                   "--seqlen", "4096", "--text", solver_text_file])
    assert rc == 2 and "max_position_embeddings = 128" in capsys.readouterr().err
    assert not os.path.exists(out)

    rc = cli.main(["prune", "--model", str(tmp_path / "nowhere"), "--out", out, "--method", "wanda"])
    assert rc == 2 and "not a short name" in capsys.readouterr().err

    rc = cli.main(["eval", "--model", solver_model_dir, "--text", solver_text_file, "--seqlen", "64", "--windows", "500"])
    assert rc == 2 and "held-out" in capsys.readouterr().err


def test_unknown_options_rejected_for_other_commands():
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "x", "--bogus", "1"])
