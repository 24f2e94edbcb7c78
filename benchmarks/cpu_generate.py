"""Greedy generation speed on CPU through transformers: dense vs ARMOR checkpoints, rounds interleaved.

    python -m benchmarks.cpu_generate DENSE_DIR ARMOR_DIR [MORE_DIRS...] --new-tokens 32 --rounds 5

Every model is loaded once (as stored: ``armor_runtime.checkpoint.load_pretrained``), then each
round times one greedy generation of ``--new-tokens`` tokens (EOS ignored) per model in turn, so
a change of background load hits all models alike; the table gives the median over rounds. With
``--reference-tokens N`` the ARMOR models also run N tokens on the reference backend
(``ARMOR_DISABLED_BACKENDS=cpu_dense``: the core expanded on every call), once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

PROMPT = "The capital of France is"


def tokens_per_s(model, inputs, n: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - start
    return (out.shape[1] - inputs["input_ids"].shape[1]) / seconds


def reference_speed(model, inputs, n: int) -> float:
    from armor_kernels import dispatch

    os.environ["ARMOR_DISABLED_BACKENDS"] = "cpu_dense"
    dispatch.reset()
    try:
        return tokens_per_s(model, inputs, n)
    finally:
        del os.environ["ARMOR_DISABLED_BACKENDS"]
        dispatch.reset()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="checkpoint folders (the first is the baseline)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reference-tokens", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from armor_runtime.checkpoint import load_pretrained

    models = {p: load_pretrained(p).eval() for p in args.models}
    inputs = AutoTokenizer.from_pretrained(args.models[0])(PROMPT, return_tensors="pt")
    for model in models.values():
        tokens_per_s(model, inputs, 2)  # warm-up
    speeds = {p: [] for p in models}
    for _ in range(args.rounds):
        for p, model in models.items():
            speeds[p].append(tokens_per_s(model, inputs, args.new_tokens))
    base = statistics.median(speeds[args.models[0]])
    print(f"torch threads {torch.get_num_threads()}, {args.new_tokens} new tokens, median of {args.rounds} rounds")
    print("| model | dtype | tokens/s (median) | min-max | vs first |")
    print("|---|---|---:|---:|---:|")
    for p, model in models.items():
        med = statistics.median(speeds[p])
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        print(f"| {p} | {dtype} | {med:.2f} | {min(speeds[p]):.2f}-{max(speeds[p]):.2f} | {med / base:.2f}x |")
        if args.reference_tokens and any(type(m).__name__ == "ArmorLinear" for m in model.modules()):
            print(f"| {p}, reference backend | {dtype} | {reference_speed(model, inputs, args.reference_tokens):.2f} | "
                  f"one run of {args.reference_tokens} tokens | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
