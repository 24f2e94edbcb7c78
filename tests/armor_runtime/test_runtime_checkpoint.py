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
    (out / "stale.txt").write_text("from an older save")
    _save(model, tmp_path / "ckpt")
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or backup folder left behind
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
