"""The one test on the real bundled SmolLM2-135M: GGUF loading, real text, one pruned block, perplexity."""

import math

import pytest
import torch

from armor_runtime.loading import load_model
from armor_runtime.pruned import finisher
from armor_solver import data, evaluate, models
from armor_solver.pipeline import Calibration, PruneSettings, prune_model


@pytest.mark.slow
def test_smollm2_block0_wanda_keeps_perplexity_sane():
    try:
        model, tokenizer, _ = load_model("smollm2-135m")
        corpus = data.load_corpus()
    except (models.ModelSpecError, data.CorpusError) as e:
        pytest.skip(f"bundled model or corpus not installed: {e}")
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    windows = data.evaluation_ids(tokenizer, corpus, 2, 64)
    dense = evaluate.perplexity(model, windows)["ppl"]
    assert 1 < dense < 200, dense  # a working model on English text

    settings = PruneSettings(model="smollm2-135m", method="wanda", nsamples=2, seqlen=64, targets=["model.layers.0.*"])
    result = prune_model(model, tokenizer, settings, calib=Calibration(corpus=corpus), log=lambda s: None,
                         finish=finisher(model, tokenizer))  # the runtime's step: ArmorLinear layers
    assert len(result.layers) == 7
    # 576-wide inputs: plain 2:4 uses 4x4 identity input blocks
    assert {v["block_in"] for v in result.layers.values()} == {4}
    pruned = evaluate.perplexity(model, windows)["ppl"]
    assert math.isfinite(pruned) and pruned > dense * 0.99 and pruned < dense * 3, (dense, pruned)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "ArmorLinear"
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)
