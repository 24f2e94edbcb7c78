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
        pytest.skip("lm_eval is installed here; test_tasks_bridge_runs_a_real_lm_eval_task_from_local_data runs the bridge")
    with pytest.raises(RuntimeError, match="lm-evaluation-harness is not installed"):
        evaluate.run_lm_eval(None, None, ["arc_easy"])


TASK_YAML = """task: armor_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _local_task(folder):
    """A multiple-choice lm-eval task over a local JSON-lines file (no hub): 6 questions, 3 choices each."""
    import json

    rows = [{"question": f"The river {i} flows to the", "choices": ["sea", "king", "stone"], "answer": i % 3}
            for i in range(6)]
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "armor_local_choice.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return len(rows)


def test_tasks_bridge_runs_a_real_lm_eval_task_from_local_data(tmp_path, solver_model_dir, solver_text_file, capsys):
    """``armor eval --tasks`` against the real lm-evaluation-harness, on a tiny model, offline."""
    if not evaluate.lm_eval_available():
        pytest.skip("lm_eval is not installed (the `eval` extra): the bridge needs it")
    import json

    from armor_runtime import cli

    n = _local_task(tmp_path)
    rc = cli.main(["eval", "--model", solver_model_dir, "--text", solver_text_file, "--seqlen", "32", "--windows", "2",
                   "--tasks", "armor_local_choice", "--tasks-path", str(tmp_path), "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    metrics = result["lm_eval"]["armor_local_choice"]
    acc = metrics["acc,none"]
    assert 0.0 <= acc <= 1.0 and abs(acc * n - round(acc * n)) < 1e-9  # a share of the 6 questions
    assert math.isfinite(result["ppl"])
