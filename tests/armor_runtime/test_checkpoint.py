"""ARMOR checkpoints: save, reload with from_pretrained, refuse broken files, export dense."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import armor_kernels
from armor_runtime.checkpoint import UNLOADABLE_GUARD, export_dense, load_pretrained, save_pretrained
from armor_runtime.convert import armor_layers
from armor_runtime.hf_quantizer import ArmorCheckpointError
from armor_runtime.linear import ArmorLinear

REPO = Path(__file__).resolve().parents[2]
SHARD = 40_000  # bytes: a tiny model (~150 KB) is split into several shards


def _save(model, path, **kw):
    return save_pretrained(model, path, solver_settings={"method": "random-test"}, max_shard_size=SHARD, **kw)


def _shards(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                          ("qwen3", torch.float32), ("llama", torch.bfloat16)])
def test_reload_gives_identical_logits(family, dtype, make_converted, input_ids, tmp_path):
    model, _ = make_converted(family, dtype)
    with torch.inference_mode():
        before = model(input_ids).logits
    out = _save(model, tmp_path / "ckpt")
    index, shards = _shards(out)
    assert len(shards) > 1  # sharding is exercised
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "armor" and qc["format_version"] == armor_kernels.FORMAT_VERSION
    assert qc["sparsity_structure"] == "2:4" and qc["solver"] == {"method": "random-test"}
    assert qc["block_size"]["default"] == [32, 32]
    assert qc["block_size"]["layers"]["model.layers.0.mlp.down_proj"] == [16, 16]  # per-layer override
    assert sorted(qc["targets"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert "model.layers.0.mlp.down_proj.meta" in index["weight_map"]
    assert (out / "generation_config.json").is_file()

    reloaded = load_pretrained(out)
    layer = reloaded.model.layers[1].self_attn.q_proj
    assert isinstance(layer, ArmorLinear) and layer.values.dtype == dtype
    with torch.inference_mode():
        after = reloaded(input_ids).logits
    assert after.dtype == before.dtype
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    if family == "qwen3":  # re-saving the loaded model keeps the solver record
        again = save_pretrained(reloaded, tmp_path / "again", max_shard_size=SHARD)
        assert json.loads((again / "config.json").read_text())["quantization_config"]["solver"] == qc["solver"]
    for name, m in armor_layers(model).items():  # bit-exact round trip of every packed tensor
        for key, t in m.state_dict().items():
            assert torch.equal(t, reloaded.get_submodule(name).state_dict()[key]), f"{name}.{key}"


def test_compiled_converted_model_matches_eager(make_converted, input_ids):
    model, _ = make_converted("qwen3")
    with torch.inference_mode():
        eager = model(input_ids).logits
        # fullgraph: any graph break raises; aot_eager keeps the test fast (inductor is covered per layer)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_load_builds_no_dense_weight(make_converted, tmp_path, monkeypatch):
    model, _ = make_converted("llama")
    out = _save(model, tmp_path / "ckpt")

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense core or W_hat was materialized during loading")

    # the loader itself must build nothing dense; cpu_dense's W_hat layout (built on purpose, after loading,
    # and counted in test_linear_layout_memory) is switched off here
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "cpu_dense")
    armor_kernels.dispatch.reset()
    monkeypatch.setattr(armor_kernels.sparse24, "decompress", forbidden)
    monkeypatch.setattr(armor_kernels.reference, "materialize", forbidden)
    reloaded = load_pretrained(out)
    monkeypatch.undo()
    layers = armor_layers(reloaded)
    assert len(layers) == 14
    for name, m in layers.items():
        shapes = [tuple(t.shape) for t in m.state_dict().values()]
        assert (m.out_features, m.in_features) not in shapes, name
        assert list(m.parameters()) == []
    # the loaded model holds exactly the bytes stored on disk: no extra dense copy stayed resident
    on_disk = sum(t.nbytes for f in out.glob("*.safetensors") for t in load_file(f).values())
    resident = sum(t.nbytes for t in reloaded.state_dict().values())
    assert resident == on_disk


def test_fresh_process_refuses_without_import_then_reloads(make_converted, input_ids, tmp_path):
    model, _ = make_converted("qwen2")
    out = _save(model, tmp_path / "ckpt")
    torch.save(input_ids, tmp_path / "ids.pt")
    with torch.inference_mode():
        torch.save(model(input_ids).logits, tmp_path / "expected.pt")
    # one fresh process (transformers' import dominates the cost): plain transformers first, then with armor_runtime
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        "    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "    print('LOADED WITHOUT ARMOR')\n"
        "except Exception as e:\n"
        "    print('REFUSED:', type(e).__name__, e)\n"
        "import armor_runtime\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "with torch.inference_mode():\n"
        "    same = torch.equal(m(torch.load(sys.argv[2])).logits, torch.load(sys.argv[3]))\n"
        "print('LAYER', type(m.model.layers[0].self_attn.q_proj).__name__, 'SAME', same)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "expected.pt")],
                         check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    refused = next(line for line in lines if line.startswith(("REFUSED", "LOADED")))
    assert refused.startswith("REFUSED: ValueError") and UNLOADABLE_GUARD in refused  # the message says what to do
    assert "LAYER ArmorLinear SAME True" in lines


# ---- broken checkpoints --------------------------------------------------------

def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _shard_of(out: Path, key: str) -> Path:
    index, _ = _shards(out)
    return out / index["weight_map"][key]


@pytest.fixture
def broken(saved_llama, tmp_path):
    import shutil

    return Path(shutil.copytree(saved_llama, tmp_path / "broken"))


KEY = "model.layers.1.mlp.up_proj"


def test_truncated_shard_is_refused(broken):
    shard = _shard_of(broken, f"{KEY}.values")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArmorCheckpointError, match=rf"{shard.name}: unreadable safetensors shard.*truncated"):
        load_pretrained(broken)


def test_wrong_shape_is_refused(broken):
    shard = _shard_of(broken, f"{KEY}.values")
    _rewrite(shard, lambda t: t.__setitem__(f"{KEY}.values", t[f"{KEY}.values"][:, :-4].contiguous()))
    with pytest.raises(ArmorCheckpointError, match=rf"{shard.name}: tensor {KEY}\.values has shape \(96, 28\), expected \(96, 32\)"):
        load_pretrained(broken)


def test_core_breaking_2_4_is_refused(broken):
    shard = _shard_of(broken, f"{KEY}.meta")

    def corrupt(t):
        t[f"{KEY}.meta"][5, 2] = 0x0F  # nibble 0b1111: offsets 3 and 3, not two distinct kept columns

    _rewrite(shard, corrupt)
    with pytest.raises(ArmorCheckpointError, match=rf"{shard.name}: {KEY}\.meta: row 5, group 4 .*2:4 rule"):
        load_pretrained(broken)


def test_missing_tensor_is_refused(broken):
    shard = _shard_of(broken, f"{KEY}.b")
    _rewrite(shard, lambda t: t.pop(f"{KEY}.b"))
    with pytest.raises(ArmorCheckpointError, match=rf"tensor {KEY}\.b is missing from the checkpoint"):
        load_pretrained(broken)


def test_unknown_format_version_is_refused(broken):
    cfg_path = broken / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArmorCheckpointError, match=r"config\.json: quantization_config\.format_version = 99 is not supported"):
        load_pretrained(broken)


def test_non_finite_values_are_refused(broken):
    shard = _shard_of(broken, f"{KEY}.a")

    def corrupt(t):
        t[f"{KEY}.a"][0, 0, 0] = float("nan")

    _rewrite(shard, corrupt)
    with pytest.raises(ArmorCheckpointError, match=rf"{shard.name}: {KEY}\.a: contains NaN or Inf"):
        load_pretrained(broken)


def _edit_qc(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,match", [
    (lambda qc: qc.pop("targets"), r"quantization_config\.targets: missing"),
    (lambda qc: qc.pop("format_version"), r"quantization_config\.format_version: missing"),
    (lambda qc: qc.pop("ignore"), r"quantization_config\.ignore: missing"),
    (lambda qc: qc.update(targets=[]), r"quantization_config\.targets is empty"),
    (lambda qc: qc.update(layout="v2"), r"quantization_config\.layout: unknown key"),
    (lambda qc: qc.update(format_version="1"), r"format_version = '1' is not supported"),
    (lambda qc: qc.update(block_size="big"), r"quantization_config\.block_size = 'big': expected \[block_out, block_in\]"),
    (lambda qc: qc.update(block_size=[32]), r"quantization_config\.block_size = \[32\]"),
    (lambda qc: qc["block_size"].update(default="x"), r"quantization_config\.block_size\.default = 'x'"),
    (lambda qc: qc["block_size"]["layers"].update({"model.layers.0.mlp.down_proj": [16, "a"]}),
     r"block_size\.layers\['model\.layers\.0\.mlp\.down_proj'\] = \[16, 'a'\]"),
    (lambda qc: qc["block_size"]["layers"].update({"model.layers.7.mlp.down_proj": [16, 16]}),
     r"block_size\.layers names 'model\.layers\.7\.mlp\.down_proj', which is not an ARMOR layer"),
    (lambda qc: qc.update(block_size={"default": [24, 32], "layers": {}}), r"block_size of layer .*: block_out = 24 does not divide"),
    (lambda qc: qc.update(targets=qc["targets"] + ["w_proj"]), r"targets names 'w_proj', which matches no linear"),
    (lambda qc: qc.update(ignore=["model.layers.9.mlp.up_proj"]), r"ignore names 'model\.layers\.9\.mlp\.up_proj', which matches no"),
])
def test_broken_quantization_config_is_refused_naming_the_key(broken, edit, match):
    _edit_qc(broken, edit)
    with pytest.raises(ArmorCheckpointError, match=rf"{broken / 'config.json'}: .*{match}"):
        load_pretrained(broken)


def test_targets_that_leave_packed_tensors_unused_are_refused(broken):
    # up_proj dropped from the targets: its packed tensors would be ignored and the layer randomly initialized
    _edit_qc(broken, lambda qc: qc.update(targets=[t for t in qc["targets"] if t != "up_proj"]))
    with pytest.raises(ArmorCheckpointError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.a is not used by the "
                                                   r"model; .* quantization_config\.targets/ignore leave it dense"):
        load_pretrained(broken)


def test_ignore_that_contradicts_the_shards_is_refused(broken):
    _edit_qc(broken, lambda qc: qc.update(ignore=[KEY]))
    with pytest.raises(ArmorCheckpointError, match=rf"tensor {KEY}\.a is not used by the model"):
        load_pretrained(broken)


def test_leftover_and_missing_tensors_are_refused(broken):
    import torch

    shard = _shard_of(broken, f"{KEY}.values")
    _rewrite(shard, lambda t: t.__setitem__("model.layers.1.mlp.extra.weight", torch.ones(3)))
    with pytest.raises(ArmorCheckpointError, match=rf"{shard.name}: tensor model\.layers\.1\.mlp\.extra\.weight is not used"):
        load_pretrained(broken)
    _rewrite(shard, lambda t: t.pop("model.layers.1.mlp.extra.weight"))
    norm = _shard_of(broken, "model.norm.weight")
    _rewrite(norm, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ArmorCheckpointError, match=r"tensor model\.norm\.weight of the model is missing .*randomly initialized"):
        load_pretrained(broken)


def test_tied_embeddings_load_without_an_lm_head_tensor(tmp_path, input_ids, make_tiny_config, make_armor_weights):
    import transformers

    from armor_runtime.convert import convert_model

    config = make_tiny_config("llama")
    config.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    convert_model(model, {n: make_armor_weights(m) for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets})
    out = _save(model, tmp_path / "tied")
    index, _ = _shards(out)
    assert "lm_head.weight" not in index["weight_map"]
    with torch.inference_mode():
        torch.testing.assert_close(load_pretrained(out)(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


# ---- export, CLI ---------------------------------------------------------------

def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(127)}
    vocab["[UNK]"] = 127
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="t0")


def test_export_dense_round_trip_and_cli(saved_llama, input_ids, tmp_path, capsys):
    import transformers

    from armor_runtime import cli

    armor = load_pretrained(saved_llama)
    dense_ref = {name: m.to_dense() for name, m in armor_layers(armor).items()}
    assert cli.main(["export", "--dense", str(saved_llama), "--out", str(tmp_path / "dense")]) == 0
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in cfg and "transformers_weights" not in cfg
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for name, w_hat in dense_ref.items():
        layer = plain.get_submodule(name)
        assert type(layer) is torch.nn.Linear
        assert torch.equal(layer.weight, w_hat)
    with torch.inference_mode():
        torch.testing.assert_close(plain(input_ids).logits, armor(input_ids).logits, rtol=1e-4, atol=1e-4)
    # the in-memory API gives the same weights
    export_dense(armor, tmp_path / "dense2")
    assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense2").model.layers[0]
                       .mlp.up_proj.weight, dense_ref["model.layers.0.mlp.up_proj"])


def test_cli_generate_with_copied_tokenizer(make_converted, tmp_path, capsys):
    from armor_runtime import cli

    model, _ = make_converted("llama")
    tokenizer = _tiny_tokenizer()
    out = save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert cli.main(["generate", "--model", str(out), "--prompt", "t5 t9 t17", "--max-new-tokens", "5"]) == 0
    greedy = capsys.readouterr().out
    assert "tokens/s" in greedy and "greedy" in greedy
    ids = tokenizer("t5 t9 t17", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 3:]
    assert greedy.splitlines()[0].strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert cli.main(["generate", "--model", str(out), "--prompt", "t5 t9", "--max-new-tokens", "4",
                     "--do-sample", "--temperature", "0.7", "--dtype", "bfloat16"]) == 0
    assert "sampled" in capsys.readouterr().out


def test_save_is_atomic_and_replaces(make_converted, tmp_path):
    model, _ = make_converted("qwen3")
    out = _save(model, tmp_path / "ckpt")
    (out / "model-00099-of-00099.safetensors").write_text("a shard of an older save")
    _save(model, tmp_path / "ckpt")
    assert not (out / "model-00099-of-00099.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp, backup or lock file left behind
    # a folder holding anything besides a checkpoint is never replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="besides a checkpoint it holds notes.txt"):
        _save(model, tmp_path / "ckpt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    with pytest.raises(ValueError, match="no ArmorLinear layer"):
        import transformers

        save_pretrained(transformers.AutoModelForCausalLM.from_config(model.config), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gguf_loaded_model_saves_after_dropping_the_stale_quantizer(make_converted, tmp_path):
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model, _ = make_converted("llama")
    quantizer = GgufHfQuantizer(GgufConfig(), pre_quantized=True)  # what a gguf_file= load leaves behind
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    out = _save(model, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "armor"
    assert getattr(model, "hf_quantizer", None) is None
    assert isinstance(load_pretrained(out).model.layers[0].mlp.up_proj, ArmorLinear)


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(f"armor {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert f"armor {command}: error:" not in captured.out  # errors go to stderr
    return lines[0]


def test_export_never_replaces_what_it_should_not(saved_llama, tmp_path, monkeypatch, capsys):
    import shutil

    from armor_runtime import cli

    source = Path(shutil.copytree(saved_llama, tmp_path / "lib" / "src"))
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    (work / "file").write_text("keep")
    monkeypatch.chdir(work)
    for out, match in [(".", "is the working directory"), ("", "--out is empty"), ("..", "parent of the working"),
                       (str(source), "is the source"), (str(source / "sub"), "lies inside the source"),
                       ("file", "is a file"), ("file/x", "is a file, so nothing"), (str(source.parent), "holds the source")]:
        assert cli.main(["export", "--dense", str(source), "--out", out]) == 2, out
        assert match in _one_error_line(capsys, "export")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_text("someone's")
    assert cli.main(["export", "--dense", str(source), "--out", str(other)]) == 2
    assert "already holds files" in _one_error_line(capsys, "export")
    assert (other / "model.safetensors").read_text() == "someone's"
    assert sorted(os.listdir(work)) == ["file", "notes.txt"]
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_export_and_generate_errors_are_one_line(saved_llama, tmp_path, capsys):
    from armor_runtime import cli

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    assert cli.main(["export", "--dense", str(plain), "--out", str(tmp_path / "o")]) == 2
    assert "not an ARMOR checkpoint" in _one_error_line(capsys, "export")
    assert cli.main(["export", "--dense", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "export")
    assert cli.main(["export", "--dense", str(saved_llama), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots'" in _one_error_line(capsys, "export")
    (plain / "config.json").write_text("{not json")
    assert cli.main(["export", "--dense", str(plain), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in _one_error_line(capsys, "export")
    assert not (tmp_path / "o").exists()
    # a malformed block_size that names no file or key
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(saved_llama, broken)
    _tiny_tokenizer().save_pretrained(broken)
    _edit_qc(broken, lambda qc: qc.update(block_size={"default": "x"}))
    for command, args in [("generate", ["--model", str(broken), "--prompt", "t1"]),
                          ("export", ["--dense", str(broken), "--out", str(tmp_path / "o")])]:
        assert cli.main([command, *args]) == 2
        assert f"{broken / 'config.json'}: quantization_config.block_size.default = 'x'" in _one_error_line(capsys, command)
    assert cli.main(["generate", "--model", str(saved_llama), "--prompt", "t1", "--device", "cuda"]) == 2
    assert "--device cuda" in _one_error_line(capsys, "generate")
