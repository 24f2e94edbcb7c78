import math

import pytest
import torch

from armor_solver import evaluate


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_perplexity_matches_direct_computation(family, solver_make_model):
    model = solver_make_model(family)
    windows = torch.randint(0, 256, (5, 20), generator=torch.Generator().manual_seed(3))
    got = evaluate.perplexity(model, windows, batch_size=2)  # batches of 2, 2, 1
    nll = []
    with torch.no_grad():
        for row in windows:
            logp = torch.log_softmax(model(row[None]).logits[0].double(), -1)
            nll += [-float(logp[t, row[t + 1]]) for t in range(len(row) - 1)]
    assert got["tokens"] == 5 * 19 == len(nll)
    assert got["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert (got["windows"], got["seqlen"]) == (5, 20)


def test_labels_path_agrees():
    """The library's own loss (labels=) gives the same perplexity for a single window."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    assert evaluate.perplexity(model, ids)["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_bad_windows_shape():
    with pytest.raises(ValueError, match="windows"):
        evaluate.perplexity(None, torch.zeros(10, dtype=torch.long))


def test_lm_eval_bridge_skips_cleanly_without_the_package():
    if evaluate.lm_eval_available():
        pytest.skip("lm_eval is installed here; the bridge is exercised by `armor eval --tasks`")
    with pytest.raises(RuntimeError, match="lm-evaluation-harness is not installed"):
        evaluate.run_lm_eval(None, None, ["arc_easy"])
