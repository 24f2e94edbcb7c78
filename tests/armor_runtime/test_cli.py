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

    # the same command again: the directory holds its finished checkpoint, so there is nothing to do
    before = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "armor", "--sweeps", "1") == 0
    assert "already holds the finished checkpoint of this run" in capsys.readouterr().out
    # a different run into it is refused; the checkpoint is untouched either way
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "armor", "--sweeps", "2") == 2
    assert "already holds files" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == before


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


# ---- refusals and errors: one line on stderr, exit code 2, nothing written ------------------------------------

def _err_line(capsys, command="prune") -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"armor {command}: error:")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_prune_refuses_unsafe_out_paths(tmp_path, monkeypatch, solver_model_dir, solver_text_file, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    (work / "a_file").write_text("keep")
    monkeypatch.chdir(work)
    cases = [("", "--out is empty"), (".", "is the working directory"), ("..", "parent of the working directory"),
             (solver_model_dir, "is the source"), ("a_file", "is a file"), ("a_file/sub", "is a file, so nothing"),
             (str(work), "is the working directory")]
    for out, match in cases:
        assert _prune(solver_model_dir, out, solver_text_file, "--method", "magnitude") == 2, out
        assert match in _err_line(capsys)
    assert sorted(os.listdir(work)) == ["a_file", "notes.txt"]
    assert (work / "notes.txt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["work"]  # no lock file or temporary folder either


@pytest.mark.parametrize("method,extra,match", [
    ("armor", ["--sweepz", "1", "--solvr", "adam"], r"unknown option --sweepz \(did you mean --sweeps\?\); armor takes: --solver, --sweeps"),
    ("armor", ["--solver", "bogus"], "--solver 'bogus'.*choose one of exact, adam"),
    ("armor", ["--sweeps", "-5"], "--sweeps -5.*must be at least 0"),
    ("armor", ["--sweeps", "2.5"], "--sweeps 2.5.*expected int"),
    ("armor", ["--lr", "0.1"], "--lr 0.1.*applies only with --solver adam"),
    ("wanda", ["--sweeps", "3"], "wanda takes: no options"),
    ("magnitude", ["--nsampels", "3"], r"did you mean --nsamples\?"),
    ("armor", ["--iters", "-1"], "--iters -1: must be an integer of at least 0"),
])
def test_method_options_are_checked_before_anything_is_written(tmp_path, solver_model_dir, solver_text_file, capsys,
                                                              method, extra, match):
    out = tmp_path / "ckpt"
    assert _prune(solver_model_dir, str(out), solver_text_file, "--method", method, *extra) == 2
    assert re.search(match, _err_line(capsys))
    assert sorted(os.listdir(tmp_path)) == []  # no OUT, no .armor_partial, no lock file


def test_corrected_options_run_after_a_refused_one(tmp_path, solver_model_dir, solver_text_file, capsys):
    out = str(tmp_path / "ckpt")
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "armor", "--sweeps", "-5") == 2
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "armor", "--sweeps", "1") == 0
    assert json.loads(Path(out, "config.json").read_text())["quantization_config"]["solver"]["extra"] == {"sweeps": 1}


def test_bad_models_and_devices_are_one_line(tmp_path, solver_model_dir, solver_text_file, capsys):
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text('{"model_type": "llama",')
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    for name in os.listdir(solver_model_dir):
        if not name.endswith(".safetensors"):
            (config_only / name).write_bytes(Path(solver_model_dir, name).read_bytes())
    out = str(tmp_path / "out")
    assert _prune(str(bad_json), out, solver_text_file, "--method", "magnitude") == 2
    assert "config.json: not valid JSON" in _err_line(capsys)
    assert _prune(str(config_only), out, solver_text_file, "--method", "magnitude") == 2
    _err_line(capsys)
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "magnitude", "--device", "cuda") == 2
    assert "--device cuda:" in _err_line(capsys)
    assert _prune(solver_model_dir, out, solver_text_file, "--method", "magnitude", "--device", "potato") == 2
    assert "--device 'potato': not a device" in _err_line(capsys)
    assert not os.path.exists(out)
    for command, args in [("eval", ["--text", solver_text_file]), ("generate", ["--prompt", "the"])]:
        for model in (str(bad_json), str(config_only), str(tmp_path / "nowhere")):
            assert cli.main([command, "--model", model, *args]) == 2
            _err_line(capsys, command)
        assert cli.main([command, "--model", solver_model_dir, "--device", "cuda:1", *args]) == 2
        assert "--device cuda:1" in _err_line(capsys, command)


def test_env_with_an_unusable_device_is_one_line(capsys):
    assert cli.main(["env", "--device", "cuda"]) == 2
    assert "--device cuda:" in _err_line(capsys, "env")


def test_debug_shows_the_traceback(tmp_path, solver_text_file):
    with pytest.raises(ValueError, match="not valid JSON"):
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text("{")
        cli.main(["eval", "--model", str(bad), "--text", solver_text_file, "--debug"])


HOLD = """
import sys, time
from armor_solver import outputs
with outputs.claim(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_concurrent_prune_is_refused_naming_the_first(tmp_path, solver_model_dir, solver_text_file, capsys):
    import subprocess
    import sys
    import time

    out = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        assert _prune(solver_model_dir, str(out), solver_text_file, "--method", "magnitude") == 2
        assert time.perf_counter() - t0 < 30  # refused before loading or calibrating anything
        assert f"in use by another run (pid {holder.pid}," in _err_line(capsys)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


CRASH_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from armor_solver import outputs
real = os.replace
def replace(src, dst):
    if ".new-" in Path(src).name:   # OUT has been moved aside; the complete checkpoint is not in place yet
        os._exit(9)
    real(src, dst)
outputs.os.replace = replace
from armor_runtime import cli
cli.main(sys.argv[1:])
"""


def test_crash_between_the_renames_of_the_final_save_is_finished_by_the_rerun(
        tmp_path, solver_model_dir, solver_text_file, capsys):
    import subprocess
    import sys

    from armor_runtime.checkpoint import load_pretrained

    out = tmp_path / "ckpt"
    argv = ["prune", "--model", solver_model_dir, "--out", str(out), "--nsamples", "3", "--seqlen", "32",
            "--text", solver_text_file, "--block-size", "16", "--method", "nowag-p"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, *argv], check=False, capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 9, run.stderr[-2000:]
    assert not out.exists()  # what the issue saw: no output directory at all
    hidden = sorted(p.name for p in tmp_path.iterdir())
    assert any(".new-" in n for n in hidden) and any(".old-" in n for n in hidden), hidden

    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "completed the save that a dead run had finished writing" in captured.err
    assert "already holds the finished checkpoint of this run" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the orphaned folders are gone
    assert not (out / ".armor_partial").exists()
    assert type(load_pretrained(out).model.layers[1].mlp.up_proj).__name__ == "ArmorLinear"


def test_disk_full_at_the_final_save_keeps_every_finished_block(tmp_path, monkeypatch, solver_model_dir,
                                                                solver_text_file, capsys):
    import errno

    import transformers

    out = tmp_path / "ckpt"
    args = ("--method", "magnitude")
    real_save = transformers.PreTrainedModel.save_pretrained

    def full(self, path, *a, **k):
        os.makedirs(path, exist_ok=True)
        Path(path, "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    assert _prune(solver_model_dir, str(out), solver_text_file, *args) == 2
    assert "No space left on device" in _err_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the half-written folder is gone
    progress = json.loads((out / ".armor_partial" / "progress.json").read_text())
    assert progress["done_blocks"] == [0, 1]

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real_save)
    assert _prune(solver_model_dir, str(out), solver_text_file, *args) == 0
    assert "resuming: blocks [0, 1] already finished" in capsys.readouterr().out
    assert (out / "config.json").is_file() and not (out / ".armor_partial").exists()


def test_read_only_output_is_refused_before_any_work(tmp_path, monkeypatch, solver_model_dir, solver_text_file, capsys):
    import errno

    from armor_runtime import loading
    from armor_solver import outputs

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(outputs, "_acquire", read_only)
    monkeypatch.setattr(loading, "load_model", None)  # loading the model would crash
    assert _prune(solver_model_dir, str(tmp_path / "ckpt"), solver_text_file, "--method", "magnitude") == 2
    assert "Read-only file system" in _err_line(capsys)


# ---- model code -------------------------------------------------------------------------------------------------

@pytest.fixture
def custom_code_dir(tmp_path, solver_model_dir):
    """A model folder whose config needs code of its own (auto_map); importing that code writes a marker file."""
    folder = tmp_path / "custom"
    folder.mkdir()
    for name in os.listdir(solver_model_dir):
        (folder / name).write_bytes(Path(solver_model_dir, name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="armor_custom_test", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "CODE_RAN"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_custom.py").write_text(code + "from transformers import LlamaConfig as CustomConfig\n")
    (folder / "modeling_custom.py").write_text(code + "from transformers import LlamaForCausalLM as CustomModel\n")
    return folder, marker


def test_model_code_never_runs_without_trust_remote_code(custom_code_dir, tmp_path, monkeypatch, solver_text_file,
                                                         capsys):
    import builtins

    folder, marker = custom_code_dir

    def no_prompt(*a, **k):
        raise AssertionError("transformers prompted whether to run the model's code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    out = tmp_path / "ckpt"
    assert _prune(str(folder), str(out), solver_text_file, "--method", "magnitude") == 2
    line = _err_line(capsys)
    assert "needs model code that is not part of transformers" in line and "--trust-remote-code" in line
    assert "modeling_custom.CustomModel" in line
    for command, args in [("eval", ["--text", solver_text_file]), ("generate", ["--prompt", "the"])]:
        assert cli.main([command, "--model", str(folder), *args]) == 2
        assert "--trust-remote-code" in _err_line(capsys, command)
    assert not marker.exists() and not out.exists()


def test_trust_remote_code_is_passed_only_when_asked(monkeypatch, solver_model_dir):
    import transformers

    from armor_runtime import loading

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.append(k.get("trust_remote_code"))
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loading.load_model(solver_model_dir)
    loading.load_model(solver_model_dir, trust_remote_code=True)
    assert seen == [False, True]  # explicit False: transformers refuses instead of prompting


# ---- dtype and sizes ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, solver_tokenizer, solver_make_model):
    import torch

    path = tmp_path_factory.mktemp("tiny_llama_bf16")
    solver_make_model("llama").to(torch.bfloat16).save_pretrained(path)
    solver_tokenizer.save_pretrained(path)
    return str(path)


def _shard_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    kinds = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            kinds |= {h.get_slice(k).get_dtype() for k in h.keys()}  # noqa: SIM118
    return kinds


def test_bf16_source_pruned_at_the_defaults_gives_a_bf16_checkpoint(bf16_model_dir, tmp_path, solver_text_file, capsys):
    import torch
    import transformers

    from armor_runtime.checkpoint import load_pretrained
    from armor_runtime.sizes import weight_bytes

    out = tmp_path / "ckpt"
    # the defaults, except a calibration small enough for the tiny model and text, and --block-size 128 (the
    # default budget would give these 32..128-wide layers the cheapest 1/4 wrappers)
    assert cli.main(["prune", "--model", bf16_model_dir, "--method", "armor", "--out", str(out), "--nsamples", "3",
                     "--seqlen", "32", "--text", solver_text_file, "--block-size", "128"]) == 0
    captured = capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert _shard_dtypes(out) == {"BF16", "U8"}  # every tensor bf16 but the 2:4 metadata
    solver = config["quantization_config"]["solver"]
    assert solver["dtype"] == "bfloat16"
    layers = solver["per_layer"]
    assert all(v["dtype"] == "bfloat16" for v in layers.values())
    # the loss of the stored (bf16) weights is recorded beside the fp32 fit: with one dense block per wrapper the
    # fp32 fit is exact (~1e-12), the bf16 rounding of A, S and B costs up to ~3e-3, still far below NoWag-P (~0.1)
    for v in layers.values():
        assert v["proxy_loss"] < v["proxy_loss_deployed"] < v["nowag_p_loss"] / 10
    assert solver["mean_proxy_loss_deployed"] == pytest.approx(
        sum(v["proxy_loss_deployed"] for v in layers.values()) / len(layers))
    assert f"as stored in bfloat16: {solver['mean_proxy_loss_deployed']:.4f}" in captured.out
    # the end report: bytes on disk of the checkpoint, of the source, of plain 2:4
    ckpt, src = weight_bytes(out), weight_bytes(bf16_model_dir)
    assert f"on disk: checkpoint {ckpt:,} bytes ({ckpt / src:.3f}x the source); source {src:,} bytes" in captured.out
    assert "plain 2:4 would take" in captured.out
    # block size 128 on 32..128-wide layers: every wrapper is one dense block, larger than the core; said and recorded
    assert "layers get wrappers larger than their 2:4 core at --block-size 128" in captured.err
    assert solver["warnings"] and all("wrappers_exceed_core" in v for v in layers.values())

    # the round trip keeps bf16: our loader, transformers' own, and the dense export
    reloaded = load_pretrained(out)
    assert reloaded.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    plain_hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert plain_hf.model.layers[1].self_attn.q_proj.a.dtype == torch.bfloat16
    assert cli.main(["export", "--dense", str(out), "--out", str(tmp_path / "dense")]) == 0
    assert "plain bfloat16 checkpoint" in capsys.readouterr().out
    assert _shard_dtypes(tmp_path / "dense") == {"BF16"}
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli.main(["eval", "--model", str(out), "--text", solver_text_file, "--seqlen", "32", "--windows", "2"]) == 0
    assert "bfloat16) —" in capsys.readouterr().out


def test_checkpoint_larger_than_the_source_is_warned(bf16_model_dir, tmp_path, solver_text_file, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(["prune", "--model", bf16_model_dir, "--method", "nowag-p", "--out", str(out), "--nsamples", "3",
                     "--seqlen", "32", "--text", solver_text_file, "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert _shard_dtypes(out) == {"F32", "U8"}
    assert "warning: the checkpoint (" in captured.err and "is larger than the source" in captured.err
    assert "the source is bfloat16, the checkpoint float32" in captured.err


def test_source_dtype(tmp_path, solver_model_dir, bf16_model_dir):
    import gguf
    import numpy as np
    import torch

    from armor_solver.models import source_dtype

    assert source_dtype(solver_model_dir)[0] == torch.float32
    assert source_dtype(bf16_model_dir) == (torch.bfloat16, "config.json dtype bfloat16")
    folder = tmp_path / "m"
    folder.mkdir()
    for name in os.listdir(bf16_model_dir):
        (folder / name).write_bytes(Path(bf16_model_dir, name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype")
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    assert source_dtype(str(folder))[0] == torch.float16  # transformers 4 writes torch_dtype
    (folder / "config.json").write_text(json.dumps(config))
    assert source_dtype(str(folder)) == (torch.bfloat16, "the dtype of model.safetensors")  # no dtype: the shards'
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    assert source_dtype(str(folder))[0] == torch.bfloat16  # quantized source: bf16

    def write_gguf(path, quantized: bool):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tensor("a.weight", np.ones((4, 32), dtype=np.float16))
        if quantized:
            q = gguf.quants.quantize(np.ones((4, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor("b.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("norm.weight", np.ones(32, dtype=np.float32))  # 1-D float32 norms do not count
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_gguf(tmp_path / "f16.gguf", quantized=False)
    write_gguf(tmp_path / "q8.gguf", quantized=True)
    assert source_dtype(str(tmp_path / "f16.gguf"))[0] == torch.float16
    assert source_dtype(str(tmp_path / "q8.gguf")) == (torch.bfloat16, "the GGUF's matrices are quantized (Q8_0): bfloat16")
