"""Solver speed: ARMOR's exact solver against the paper's Adam schedule on SmolLM2-135M.

For a few real matrices of SmolLM2-135M (dequantized from the bundled GGUF) with
``h`` from a short dense calibration pass over the bundled Wikipedia text, run

- the Adam schedule (``solver="adam"``) for N iterations, recording (time, best loss);
- the exact solver (``solver="exact"``) sweep by sweep, until it is below Adam's
  final loss or has used a tenth of Adam's time (at least ``--exact-min`` seconds),

and report how long each needs to reach Adam's loss after 350, 2,000 and 20,000
iterations (when that many were run). Writes ``solver_speed.csv`` (the table),
``solver_speed_trace.csv`` (loss vs time), ``solver_speed.md`` and
``solver_speed.png`` into ``--out``.

    python3 -m benchmarks.solver_speed                      # ~20 min on 2 shared cores
    python3 -m benchmarks.solver_speed --plot-only          # redraw from the CSVs
    python3 -m benchmarks.solver_speed --fullcov            # full-covariance solver against exact

``--fullcov``: for each matrix (``--fullcov-matrices``), at the CLI's default blocks
(wrappers <= 6.25 % of the layer), the exact solver and the full-covariance solver
run 8 sweeps each on the real matrix and its calibration statistics; the table has
their seconds per layer, each result's output error ``||(W - Ŵ)X||² / ||WX||²``
(damped as SparseGPT damps XᵀX) beside SparseGPT's, and the peak RSS growth of each
solver on a random matrix of the same shape (``benchmarks.solver_memory``, a fresh
process, 1 thread). Writes ``solver_speed_fullcov.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results"
# matrix (module path under model.layers) : Adam iterations. 20,000 Adam iterations
# only on the small k_proj: on 2 shared cores they take ~100 ms each on 576x576.
DEFAULT_MATRICES = "10.self_attn.k_proj:20000,10.self_attn.q_proj:2000,10.mlp.down_proj:350"
MILESTONES = (350, 2000, 20000)


FULLCOV_MATRICES = "10.self_attn.q_proj,10.self_attn.k_proj,10.mlp.up_proj,10.mlp.down_proj"


def calibrate(names: list[str], nsamples: int, seqlen: int, full: bool = False):
    """(weights, LayerStats) of the named linears from a dense calibration pass."""
    from armor_runtime.loading import load_model
    from armor_solver import calibration, data

    model, tok, _ = load_model("smollm2-135m")
    ids = data.calibration_ids(tok, data.load_wikipedia(), nsamples, seqlen)
    last = max(int(n.split(".")[2]) for n in names)
    ignore = [f"*.layers.{i}.*" for i in range(last + 1, 1000)]  # stop after the last needed block
    stats = calibration.collect_dense_stats(model, ids, ignore=ignore, full=full)
    mods = dict(model.named_modules())
    return {n: (mods[n].weight.detach().float().clone(), stats[n]) for n in names}


def _fit(weight, stats, solver: str, device: str, **extra):
    from armor_solver.methods import armor
    from armor_solver.methods.base import PruneConfig

    iters = extra.pop("iters", None)
    cfg = PruneConfig(block_size=128, iters=iters, device=device, extra={"solver": solver, **extra})
    return armor.prune(weight, stats, cfg).info


def time_to(trace, target: float):
    """First time in ``trace`` [(s, loss)] with loss <= target (None if never)."""
    return next((t for t, l in trace if l <= target * (1 + 1e-9)), None)


def run_matrix(name: str, weight, stats, adam_iters: int, device: str, exact_min: float, log):
    numel = weight.numel() / 1e6
    ad = _fit(weight, stats, "adam", device, iters=adam_iters)
    tr_adam = ad["trace"]  # one (seconds, loss) per iteration; index = iteration
    best, best_adam = float("inf"), []
    for t, l in tr_adam:
        best = min(best, l)
        best_adam.append((t, best))
    adam_s = tr_adam[-1][0]
    log(f"{name}: adam {len(tr_adam) - 1} iters {adam_s:.1f}s loss {ad['proxy_loss']:.5f}")
    ran = len(best_adam) - 1
    # a milestone past an early stop gets the stopped run's result (what that many iterations return)
    marks = [m for m in MILESTONES if m <= adam_iters] or [ran]  # short runs: the last iteration
    targets = [(m, best_adam[min(m, ran)][1], best_adam[min(m, ran)][0]) for m in marks]
    final = targets[-1][1]
    budget = max(exact_min, adam_s / 10)
    # sweeps until below the deepest target or out of budget (each sweep is checked once done)
    ex = _fit(weight, stats, "exact", device, sweeps=100000, time_budget=budget, stop_below=final)
    log(f"{name}: exact {ex['iters']} sweeps {ex['trace'][-1][0] if ex['trace'] else 0:.1f}s loss {ex['proxy_loss']:.5f}")
    rows = []
    for m, target, t_adam in targets:
        t_ex = time_to(ex["trace"], target)
        rows.append({
            "matrix": name, "shape": "x".join(map(str, weight.shape)), "device": device,
            "block_out": ex["block_out"], "block_in": ex["block_in"], "init_loss": f"{ex['init_loss']:.4e}",
            "adam_iters": m, "adam_ran": min(m, ran), "adam_loss": f"{target:.4e}", "adam_s": f"{t_adam:.2f}",
            "exact_s": "" if t_ex is None else f"{t_ex:.2f}",
            "exact_sweeps": "" if t_ex is None else 1 + [t for t, _ in ex["trace"]].index(t_ex),
            "speedup": "" if t_ex is None else f"{t_adam / t_ex:.1f}",
            "adam_s_per_iter_per_Mw": f"{adam_s / (len(tr_adam) - 1) / numel:.4f}",
            "exact_s_per_sweep_per_Mw": f"{ex['trace'][-1][0] / max(ex['iters'], 1) / numel:.4f}",
        })
    step = max(1, len(tr_adam) // 400)
    trace = [(name, "adam", t, l) for t, l in best_adam[::step]] + [(name, "exact", t, l) for t, l in ex["trace"]]
    return rows, trace


def fullcov_row(name: str, weight, stats, sweeps: int = 8) -> dict:
    """Exact against fullcov on one real matrix: seconds, output errors, peak memory (fresh processes)."""
    from armor_solver.methods import armor, armor_fullcov
    from armor_solver.methods.base import PruneConfig

    from .solver_memory import measure

    row = {"matrix": name, "shape": "x".join(map(str, weight.shape))}
    for solver in ("exact", "fullcov"):
        res = armor.prune(weight, stats, PruneConfig(block_size=None, extra={"solver": solver, "sweeps": sweeps}))
        row["blocks"] = f"{res.info['block_out']}/{res.info['block_in']}"
        row[f"{solver}_s"] = round(res.info["seconds"], 2)
        row[f"{solver}_error"] = armor_fullcov.deployed_loss(weight, res.weights, stats.xtx)
        if solver == "fullcov":
            row["sparsegpt_error"] = res.info["full_loss_sparsegpt"]
        mem = measure(*weight.shape, sweeps, solver=solver, block=0)
        row[f"{solver}_peak_mib"] = round(mem["peak_growth_bytes"] / 2**20, 1)
        row[f"{solver}_peak_x"] = round(mem["multiple"], 2)
        row[f"{solver}_mem_s"] = round(mem["seconds"], 2)
    return row


def write_fullcov(out: Path, rows: list[dict], meta: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "solver_speed_fullcov.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# ARMOR full-covariance solver against the exact (diagonal) solver, per layer", "", meta, "",
             ("| matrix | shape | blocks | SparseGPT error | exact error | fullcov error | exact s | fullcov s | "
             "exact peak MiB (x matrix) | fullcov peak MiB (x matrix) |"), "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['shape']} | {r['blocks']} | {r['sparsegpt_error']:.4f} | "
                     f"{r['exact_error']:.4f} | {r['fullcov_error']:.4f} | {r['exact_s']} | {r['fullcov_s']} | "
                     f"{r['exact_peak_mib']} ({r['exact_peak_x']}x) | {r['fullcov_peak_mib']} ({r['fullcov_peak_x']}x) |")
    (out / "solver_speed_fullcov.md").write_text("\n".join(lines) + "\n")


def main_fullcov(args) -> int:
    names = [f"model.layers.{m}" for m in args.fullcov_matrices.split(",")]
    t0 = time.perf_counter()
    data = calibrate(names, args.nsamples, args.seqlen, full=True)
    meta = (f"SmolLM2-135M (GGUF Q4_1 dequantized), XᵀX from {args.nsamples}x{args.seqlen} Wikipedia tokens; "
            f"8 sweeps each; error = ||(W - Ŵ)X||² / ||WX||² with XᵀX damped by 1 % of its mean diagonal; "
            f"{args.threads} torch thread(s) on {os.cpu_count()} shared, busy cores; torch {torch.__version__}. "
            "The fullcov seconds include its SparseGPT start. Peak memory: RSS growth of a fresh process on a "
            "random matrix of the shape (`benchmarks.solver_memory`, statistics built before the measurement).")
    rows = []
    for name in names:
        rows.append(fullcov_row(name.removeprefix("model.layers."), *data[name]))
        print(rows[-1], flush=True)
        write_fullcov(args.out, rows, meta)
    from .solver_memory import measure

    d_out, d_in = (int(v) for v in args.fullcov_memory_shape.split("x"))
    mem = {s: measure(d_out, d_in, 3, solver=s, block=0) for s in ("exact", "fullcov")}
    note = "\n".join(f"- {d_out}x{d_in} random, 3 sweeps, {s}: peak RSS growth {m['peak_growth_bytes'] / 2**20:.1f} MiB "
                     f"= {m['multiple']:.2f}x the fp32 matrix, {m['seconds']:.1f} s" for s, m in mem.items())
    with open(args.out / "solver_speed_fullcov.md", "a") as f:
        f.write("\nPeak memory on a larger matrix:\n\n" + note + "\n")
    print(note, flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {args.out}/solver_speed_fullcov.*", flush=True)
    return 0


def write(out: Path, rows, trace, meta: str):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "solver_speed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "solver_speed_trace.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["matrix", "solver", "seconds", "loss"])
        w.writerows([(m, s, f"{t:.4f}", f"{l:.4e}") for m, s, t, l in trace])
    lines = [
        "# ARMOR solver speed: time to reach the Adam schedule's loss", "", meta, "",
        "| matrix | shape | device | Adam iters (run) | Adam loss | Adam s | exact s | exact sweeps | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['matrix']} | {r['shape']} | {r['device']} | {r['adam_iters']} ({r['adam_ran']}) | {r['adam_loss']} | {r['adam_s']} | "
            f"{r['exact_s'] or 'not reached'} | {r['exact_sweeps']} | {r['speedup'] or '-'} |"
        )
    lines += ["", "Throughput (seconds per million weights):", "",
              "| matrix | Adam s/iter/Mw | exact s/sweep/Mw |", "|---|---|---|"]
    seen = set()
    for r in rows:
        if r["matrix"] not in seen:
            seen.add(r["matrix"])
            lines.append(f"| {r['matrix']} | {r['adam_s_per_iter_per_Mw']} | {r['exact_s_per_sweep_per_Mw']} |")
    (out / "solver_speed.md").write_text("\n".join(lines) + "\n")


def plot(out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list]] = {}
    with open(out / "solver_speed_trace.csv") as f:
        for r in csv.DictReader(f):
            d = series.setdefault(r["matrix"], {}).setdefault(r["solver"], [[], []])
            d[0].append(float(r["seconds"]))
            d[1].append(float(r["loss"]))
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (name, by_solver) in zip(axes[0], series.items()):
        for solver, (t, l) in by_solver.items():
            ax.plot([max(x, 1e-2) for x in t], l, label=solver, marker="." if solver == "exact" else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("proxy loss")
        ax.set_title(name, fontsize=9)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "solver_speed.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrices", default=DEFAULT_MATRICES, help="layer.module:adam_iters, comma separated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--exact-min", type=float, default=30.0, help="exact solver time floor per matrix (s)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--fullcov", action="store_true", help="the full-covariance solver against exact (see above)")
    ap.add_argument("--fullcov-matrices", default=FULLCOV_MATRICES)
    ap.add_argument("--fullcov-memory-shape", default="2048x2048", help="D_OUTxD_IN of the peak-memory check")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(args.out)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.fullcov:
        return main_fullcov(args)
    spec = [m.split(":") for m in args.matrices.split(",")]
    names = [f"model.layers.{m}" for m, _ in spec]
    t0 = time.perf_counter()
    data = calibrate(names, args.nsamples, args.seqlen)
    print(f"calibrated {args.nsamples}x{args.seqlen} tokens in {time.perf_counter() - t0:.0f}s", flush=True)
    rows, trace = [], []
    meta = (
        f"SmolLM2-135M (GGUF Q4_1 dequantized), h from {args.nsamples}x{args.seqlen} Wikipedia tokens; "
        f"block 128 (96 where 128 does not divide); device {args.device}"
        + ("" if args.device != "cpu" else f", {args.threads} torch thread(s) on {os.cpu_count()} shared cores "
           f"({platform.processor() or platform.machine()}); timings noisy")
        + f"; torch {torch.__version__}."
    )
    for (m, iters), name in zip(spec, names):
        w, st = data[name]
        r, tr = run_matrix(name.removeprefix("model.layers."), w, st, int(iters), args.device, args.exact_min,
                           lambda s: print(s, flush=True))
        rows += r
        trace += tr
        write(args.out, rows, trace, meta)  # after every matrix, so a cut run keeps its results
    plot(args.out)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {args.out}/solver_speed.*", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
