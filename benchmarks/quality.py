"""Quality of every method in one pipeline: held-out perplexity, proxy loss, prune time.

    python3 -m benchmarks.quality --demo      # SmolLM2-135M, small budget (the README's `make demo`)
    python3 -m benchmarks.quality             # larger budget; writes CSV + markdown tables

All methods share the same calibration token windows and the same evaluation
windows (held-out split, never seen by calibration). Dense-statistics methods
(magnitude, NoWag-P, ARMOR) share one pass over the dense model; its time is
reported once, separately from the per-method prune time. Perplexity is
measured with each layer's W_hat = A·S·B materialized into the dense linear
(the same function as the ArmorLinear checkpoint, evaluated with dense CPU
kernels; `armor eval` measures a saved checkpoint through ArmorLinear). Wanda and SparseGPT
re-run calibration through the already-pruned blocks (as published), so their
prune time includes their own calibration passes.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time

import torch

from armor_runtime.loading import load_model
from armor_solver import calibration, data, evaluate
from armor_solver import methods as registry
from armor_solver.pipeline import Calibration, PruneSettings, materialize_into, prune_model

ALL_METHODS = ("magnitude", "wanda", "sparsegpt", "nowag-p", "armor")
# --demo: 9.5 min wall on 2 CPU cores in total (measured, 1,068 CPU-seconds)
DEMO = {"nsamples": 16, "seqlen": 256, "windows": 24, "eval_seqlen": 256, "armor_time_budget": 2.0}
FULL = {"nsamples": 64, "seqlen": 512, "windows": 64, "eval_seqlen": 512, "armor_time_budget": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="the small budget of `make demo`")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--text", default=None, help="corpus text file (default: bundled Wikipedia)")
    p.add_argument("--nsamples", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--windows", type=int, help="held-out evaluation windows")
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=None, help="ARMOR iterations / sweeps (default: the method's)")
    p.add_argument("--armor-solver", default=None, help="ARMOR solver (default: the method's)")
    p.add_argument("--armor-time-budget", type=float, default=None, help="ARMOR seconds per layer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="folder for quality.csv / quality.md (default: benchmarks/results unless --demo)")
    args = p.parse_args(argv)
    preset = DEMO if args.demo else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def armor_extra(args) -> dict:
    from armor_solver.methods import armor

    # the ARMOR module may publish its own small-budget options for the demo
    extra = dict(getattr(armor, "DEMO_OPTIONS", {})) if args.demo else {}
    if args.armor_solver:
        extra["solver"] = args.armor_solver
    if args.armor_time_budget:
        extra["time_budget"] = args.armor_time_budget
    return extra


def describe_armor_budget(args) -> str:
    from armor_solver.methods import armor, armor_adam, armor_exact

    solver = args.armor_solver or "exact"
    if solver == "exact":
        budget = f"{args.iters or armor_exact.DEFAULT_SWEEPS} sweeps max"
    else:
        budget = f"{args.iters or armor_adam.DEFAULT_ITERS} Adam iterations max"
    per_layer = f", {args.armor_time_budget:g} s per layer (checked between sweeps)" if args.armor_time_budget else ""
    extra = armor_extra(args)
    del armor
    return (f"ARMOR solver {solver}: {budget}{per_layer}, block size {args.block_size} per side "
            f"(largest valid divisor); options {extra}")


def markdown(rows: list[dict]) -> str:
    lines = ["| method | wiki ppl | proxy loss (mean) | prune time (s) |", "|---|---|---|---|"]
    for r in rows:
        loss = "" if r["proxy_loss"] is None else f"{r['proxy_loss']:.4f}"
        secs = "" if r["prune_s"] is None else f"{r['prune_s']:.0f}"
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {loss} | {secs} |")
    return "\n".join(lines)


def relative_reduction(layers: dict) -> dict:
    """Per-layer loss against the same layer's NoWag-P loss: mean of 1 - loss / nowag_p, and how many are not worse."""
    pairs = [(v["proxy_loss"], v["nowag_p_loss"]) for v in layers.values() if v.get("nowag_p_loss")]
    if not pairs:
        return {"mean": None, "not_worse": 0, "layers": 0}
    mean = sum(1 - loss / base for loss, base in pairs) / len(pairs)
    # 1e-6 relative slack: the solver compares losses in fp32
    not_worse = sum(loss <= base * (1 + 1e-6) for loss, base in pairs)
    return {"mean": mean, "not_worse": not_worse, "layers": len(pairs)}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        registry.module(m)  # unknown or missing methods fail now, not after an hour
    t_start = time.time()

    model, tokenizer, source = load_model(args.model)
    corpus = data.load_corpus(args.text)
    calib = data.calibration_ids(tokenizer, corpus, args.nsamples, args.seqlen)
    windows = data.evaluation_ids(tokenizer, corpus, args.windows, args.eval_seqlen)
    say(f"model {source}; calibration {args.nsamples} x {args.seqlen} tokens, evaluation {args.windows} windows x "
        f"{args.eval_seqlen} tokens (held-out split of {corpus.source})")
    if "armor" in methods:
        say(describe_armor_budget(args))

    rows = [{"method": "dense", "ppl": evaluate.perplexity(model, windows)["ppl"], "proxy_loss": None, "prune_s": None,
             "rel_reduction_vs_nowag_p": None}]
    say(f"dense: ppl {rows[0]['ppl']:.3f}")

    dense_stats = None
    if any(registry.propagation(m) == "dense" for m in methods):
        t = time.time()
        dense_stats = calibration.collect_dense_stats(model, calib, device=args.device)
        say(f"dense calibration statistics (shared by {', '.join(m for m in methods if registry.propagation(m) == 'dense')}): "
            f"{time.time() - t:.0f} s")

    for method in methods:
        pruned = copy.deepcopy(model)
        settings = PruneSettings(
            model=args.model, method=method, nsamples=args.nsamples, seqlen=args.seqlen, block_size=args.block_size,
            iters=args.iters if method == "armor" else None, text=corpus.source,
            extra=armor_extra(args) if method == "armor" else {},
        )
        result = prune_model(pruned, tokenizer, settings, device=args.device,
                             calib=Calibration(ids=calib, dense_stats=dense_stats), log=lambda s: None)
        materialize_into(pruned, result.weights)
        ppl = evaluate.perplexity(pruned, windows)["ppl"]
        reduction = relative_reduction(result.layers)
        rows.append({"method": method, "ppl": ppl, "proxy_loss": result.mean_loss(), "prune_s": result.seconds,
                     "rel_reduction_vs_nowag_p": reduction["mean"]})
        say(f"{method}: ppl {ppl:.3f}, mean proxy loss {result.mean_loss():.4f}, {result.seconds:.0f} s; "
            f"per layer vs NoWag-P: mean relative reduction {reduction['mean']:.1%}, "
            f"{reduction['not_worse']}/{reduction['layers']} layers not worse")
        del pruned

    table = markdown(rows)
    print(table)
    total = time.time() - t_start
    print(f"\n{source}; calibration {args.nsamples} x {args.seqlen} tokens; perplexity on {args.windows} held-out "
          f"windows x {args.eval_seqlen} tokens ({corpus.source}); torch threads {torch.get_num_threads()}; "
          f"total {total:.0f} s")

    out = args.out or (None if args.demo else os.path.join("benchmarks", "results"))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "quality.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(out, "quality.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "quality_settings.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items()} | {"model_source": source, "seconds": total}, f, indent=1)
        say(f"wrote {out}/quality.csv, quality.md, quality_settings.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
