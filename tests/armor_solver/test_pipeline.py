import json
import os
from pathlib import Path

import pytest
import torch

from armor_runtime.pruned import finisher
from armor_solver import calibration, data, pipeline, resume
from armor_solver import methods as registry
from armor_solver.outputs import OutputError
from armor_solver.pipeline import Calibration, PipelineError, PruneSettings, prune_model


def settings(method="magnitude", **kw):
    base = {"model": "tiny", "method": method, "nsamples": 3, "seqlen": 24, "block_size": 16, "text": "t.txt"}
    return PruneSettings(**(base | kw))


def calib_ids(n=3, seqlen=24):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(1))


class Interrupt(Exception):
    pass


def _stop_after_block_0(i):
    if i == 0:
        raise Interrupt


@pytest.mark.parametrize("method", ["magnitude", "wanda"])  # dense and sequential propagation
def test_resume_skips_finished_blocks_and_matches_uninterrupted(tmp_path, monkeypatch, method, solver_make_model):
    ids = calib_ids()
    reference = prune_model(solver_make_model(), None, settings(method), calib=Calibration(ids=ids), log=lambda s: None)

    out = str(tmp_path / "out")
    with pytest.raises(Interrupt):
        prune_model(solver_make_model(), None, settings(method), out_dir=out, calib=Calibration(ids=ids),
                    on_block_done=_stop_after_block_0, log=lambda s: None)
    progress = json.loads(Path(os.path.join(out, pipeline.PARTIAL, resume.PROGRESS)).read_text())
    assert progress["done_blocks"] == [0]

    calls = []
    real_get = registry.get

    def counting_get(name):
        fn = real_get(name)
        return lambda w, s, cfg: calls.append(tuple(w.shape)) or fn(w, s, cfg)

    monkeypatch.setattr(registry, "get", counting_get)
    resumed = prune_model(solver_make_model(), None, settings(method), out_dir=out, calib=Calibration(ids=ids),
                          log=lambda s: None)
    assert len(calls) == 7  # only block 1's seven projections were pruned again
    assert set(resumed.weights) == set(reference.weights)
    for name, w in reference.weights.items():
        for key, t in w.tensors().items():
            assert torch.equal(t, resumed.weights[name].tensors()[key]), (name, key)
    assert resumed.layers == reference.layers or all(
        resumed.layers[n]["proxy_loss"] == pytest.approx(reference.layers[n]["proxy_loss"]) for n in reference.layers
    )


def test_different_run_in_same_out_is_refused_before_work(tmp_path, monkeypatch, solver_make_model):
    out = str(tmp_path / "out")
    with pytest.raises(Interrupt):
        prune_model(solver_make_model(), None, settings(), out_dir=out, calib=Calibration(ids=calib_ids()),
                    on_block_done=_stop_after_block_0, log=lambda s: None)
    before = sorted(os.listdir(os.path.join(out, pipeline.PARTIAL)))
    monkeypatch.setattr(calibration, "LayerwiseRunner", None)  # any calibration work would crash
    with pytest.raises(PipelineError, match=r"different run.*nsamples: 3 there, 4 now"):
        prune_model(solver_make_model(), None, settings(nsamples=4), out_dir=out, calib=Calibration(ids=calib_ids(4)))
    assert sorted(os.listdir(os.path.join(out, pipeline.PARTIAL))) == before


def test_foreign_out_dir_is_refused(tmp_path, solver_make_model):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="already holds files"):
        prune_model(solver_make_model(), None, settings(), out_dir=str(tmp_path), calib=Calibration(ids=calib_ids()))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_no_matching_linears(tmp_path, solver_make_model):
    with pytest.raises(PipelineError, match="no linear layer matches"):
        prune_model(solver_make_model(), None, settings(targets=["nothing_proj"]), calib=Calibration(ids=calib_ids()))


def test_targets_and_ignore_select_layers(solver_make_model):
    model = solver_make_model()
    found = calibration.find_targets(model, None, ["*.mlp.*"])
    names = [n for block in found.values() for n in block]
    assert len(names) == 8 and all("self_attn" in n for n in names)
    assert "lm_head" not in {n.rsplit(".", 1)[-1] for n in names}


def test_no_valid_block_size(monkeypatch, solver_make_model):
    with pytest.raises(PipelineError, match="block-size 2"):
        prune_model(solver_make_model(), None, settings(block_size=2), calib=Calibration(ids=calib_ids()))
    # an input width that is not a multiple of 4 has no 2:4 layout at all
    model = solver_make_model()
    model.model.layers[0].self_attn.o_proj = torch.nn.Linear(66, 64, bias=False)
    with pytest.raises(PipelineError, match=r"o_proj \[64x66\]: no valid block size"):
        prune_model(model, None, settings(), calib=Calibration(ids=calib_ids()))


def test_nan_weights_refused_before_work(solver_make_model):
    model = solver_make_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(PipelineError, match=r"layers\.1\.mlp\.up_proj\.weight contains NaN or Inf"):
        prune_model(model, None, settings(), calib=Calibration(ids=calib_ids()))


def test_nan_statistics_stop_and_keep_finished_blocks(tmp_path, solver_make_model):
    model = solver_make_model()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("inf"))  # poisons block 1's MLP inputs
    out = str(tmp_path / "out")
    with pytest.raises(calibration.CalibrationError, match=r"layers\.1\.mlp\.gate_proj.*NaN or Inf"):
        prune_model(model, None, settings(), out_dir=out, calib=Calibration(ids=calib_ids()), log=lambda s: None)
    progress = json.loads(Path(os.path.join(out, pipeline.PARTIAL, resume.PROGRESS)).read_text())
    assert progress["done_blocks"] == [0]
    assert os.path.isfile(os.path.join(out, pipeline.PARTIAL, "block_0000.safetensors"))


def test_seqlen_above_max_positions(solver_make_model):
    with pytest.raises(PipelineError, match="max_position_embeddings = 128"):
        prune_model(solver_make_model(), None, settings(seqlen=256), calib=Calibration(ids=calib_ids(3, 256)))


def test_too_short_corpus_before_any_output(tmp_path, solver_tokenizer, solver_make_model):
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    out = tmp_path / "out"
    with pytest.raises(data.CorpusError, match="tokens"):
        prune_model(solver_make_model(), solver_tokenizer, settings(text=str(text)), out_dir=str(out))
    assert not out.exists()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_dense_and_sequential_statistics(family, monkeypatch, solver_make_model):
    """Dense mode sees the dense model's inputs everywhere; sequential mode sees block 0's pruned outputs."""
    ids = calib_ids()
    dense = calibration.collect_dense_stats(solver_make_model(family), ids)
    seen = {}
    real = calibration.check_finite_stats

    def spy(name, s):
        seen[name] = s.h.clone()
        real(name, s)

    monkeypatch.setattr(calibration, "check_finite_stats", spy)
    runs = {}
    for method in ("magnitude", "wanda"):
        seen.clear()
        prune_model(solver_make_model(family), None, settings(method), calib=Calibration(ids=ids), log=lambda s: None)
        runs[method] = dict(seen)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        torch.testing.assert_close(runs["magnitude"][name], dense[name].h)
    torch.testing.assert_close(runs["wanda"]["model.layers.0.self_attn.q_proj"], dense["model.layers.0.self_attn.q_proj"].h)
    diff = (runs["wanda"]["model.layers.1.self_attn.q_proj"] - dense["model.layers.1.self_attn.q_proj"].h).abs().max()
    assert float(diff) > 1e-4  # block 1 saw the pruned block 0


def test_saved_checkpoint_reloads_to_the_same_model(tmp_path, solver_make_model, solver_tokenizer, solver_text_file):
    from armor_runtime.checkpoint import load_pretrained

    model = solver_make_model()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    out = str(tmp_path / "ckpt")
    result = prune_model(model, solver_tokenizer, settings("sparsegpt", text=solver_text_file), out_dir=out,
                         log=lambda s: None, finish=finisher(model, solver_tokenizer))
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "ArmorLinear"
    assert not os.path.exists(os.path.join(out, pipeline.PARTIAL))
    reloaded = load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    solver = json.loads(Path(os.path.join(out, "config.json")).read_text())["quantization_config"]["solver"]
    assert solver["method"] == "sparsegpt" and solver["propagation"] == "sequential"
    assert solver["per_layer"]["model.layers.0.self_attn.q_proj"]["proxy_loss"] == pytest.approx(
        result.layers["model.layers.0.self_attn.q_proj"]["proxy_loss"])


@pytest.mark.parametrize("kw,match", [
    ({"extra": {"sweepz": 1}}, r"unknown option --sweepz \(did you mean --sweeps\?\)"),
    ({"extra": {"solver": "bogus"}}, "choose one of exact, adam"),
    ({"extra": {"sweeps": -5}}, "must be at least 0"),
    ({"nsamples": 0}, "--nsamples 0: must be an integer of at least 1"),
    ({"block_size": 2}, "--block-size 2: must be an integer of at least 4"),
    ({"dtype": "float64"}, "--dtype 'float64': choose one of"),
    ({"method": "armr"}, "unknown method 'armr'"),
])
def test_settings_are_checked_before_anything_is_written(tmp_path, monkeypatch, solver_make_model, kw, match):
    monkeypatch.setattr(calibration, "find_targets", None)  # any work would crash
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        prune_model(solver_make_model(), None, settings(**({"method": "armor"} | kw)), out_dir=str(out),
                    calib=Calibration(ids=calib_ids()))
    assert list(tmp_path.iterdir()) == []


def test_save_dtype_casts_what_is_stored_and_reports_its_loss(tmp_path, solver_make_model):
    out = str(tmp_path / "out")
    with pytest.raises(Interrupt):
        prune_model(solver_make_model(), None, settings("armor", dtype="bfloat16", extra={"sweeps": 1}), out_dir=out,
                    calib=Calibration(ids=calib_ids()), on_block_done=_stop_after_block_0, log=lambda s: None)
    partial = Path(out, pipeline.PARTIAL)
    (partial / "block_0001.safetensors.tmp").write_bytes(b"half a block from a dead run")
    result = prune_model(solver_make_model(), None, settings("armor", dtype="bfloat16", extra={"sweeps": 1}),
                         out_dir=out, calib=Calibration(ids=calib_ids()), log=lambda s: None)
    assert not any(p.suffix == ".tmp" for p in partial.iterdir())
    from safetensors.torch import load_file

    stored = load_file(partial / "block_0000.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16, torch.uint8}
    for name, w in result.weights.items():
        assert w.dtype == torch.bfloat16
        info = result.layers[name]
        assert info["dtype"] == "bfloat16" and info["proxy_loss_deployed"] >= 0
    assert result.mean_loss("proxy_loss_deployed") != result.mean_loss()  # the bf16 rounding is measured


def test_wrappers_larger_than_the_core_are_warned_and_recorded(solver_make_model):
    lines = []
    big = prune_model(solver_make_model(), None, settings("armor", block_size=64, extra={"sweeps": 0}),
                      calib=Calibration(ids=calib_ids()), log=lines.append)
    assert big.warnings and "layers get wrappers larger than their 2:4 core at --block-size 64" in big.warnings[0]
    assert any(line.startswith("warning: ") for line in lines)
    k_proj = big.layers["model.layers.0.self_attn.k_proj"]  # 32x64 with blocks 32/64: 2*(32*32+64*64) > 32*32*2+32*8
    assert k_proj["wrappers_exceed_core"] == {"wrapper_bytes": 4 * (32 * 32 + 64 * 64), "core_bytes": 4 * 32 * 32 + 32 * 8}
    small = prune_model(solver_make_model(), None, settings("armor", block_size=4, extra={"sweeps": 0}),
                        calib=Calibration(ids=calib_ids()), log=lambda s: None)
    assert small.warnings == [] and not any("wrappers_exceed_core" in v for v in small.layers.values())
    plain = prune_model(solver_make_model(), None, settings("nowag-p", block_size=64), calib=Calibration(ids=calib_ids()),
                        log=lambda s: None)
    assert plain.warnings == []  # NoWag-P keeps identity wrappers of 1 and 4 whatever --block-size says


def test_finished_run_is_not_redone(tmp_path, solver_make_model, solver_tokenizer, solver_text_file):
    out = str(tmp_path / "ckpt")
    model = solver_make_model()
    prune_model(model, solver_tokenizer, settings(text=solver_text_file), out_dir=out, log=lambda s: None,
                finish=finisher(model, solver_tokenizer))
    with pytest.raises(PipelineError, match="already holds the finished checkpoint of this run"):
        prune_model(solver_make_model(), solver_tokenizer, settings(text=solver_text_file), out_dir=out)
    with pytest.raises(OutputError, match="already holds files"):
        prune_model(solver_make_model(), solver_tokenizer, settings(text=solver_text_file, nsamples=2), out_dir=out)


@pytest.mark.parametrize("shape,bo,bi", [((48, 64), 16, 16), ((96, 32), 1, 4), ((20, 8), 4, 8)])
def test_stored_loss_is_the_proxy_loss_of_the_stored_tensors(shape, bo, bi):
    from armor_kernels import ArmorWeights, reference, sparse24
    from armor_solver.methods.normalize import proxy_loss, stored_proxy_loss

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(*shape, generator=gen)
    h = torch.rand(shape[1], generator=gen) + 0.1
    mask = sparse24.topk_mask(w.abs())
    a = torch.eye(bo) + 0.05 * torch.randn(shape[0] // bo, bo, bo, generator=gen)
    b = torch.eye(bi) + 0.05 * torch.randn(shape[1] // bi, bi, bi, generator=gen)
    packed = ArmorWeights.from_factors(a, w * mask, b, mask=mask, dtype=torch.bfloat16)
    w_hat = reference.materialize(packed.a, packed.values, packed.meta, packed.b)
    assert stored_proxy_loss(w, packed, h) == pytest.approx(proxy_loss(w, w_hat, h), rel=1e-5)
