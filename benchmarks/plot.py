"""Plots and target checks from the benchmark CSVs.

    python -m benchmarks.plot --kernels k.csv --png speedup.png     # speedup over dense vs tokens
    python -m benchmarks.plot --kernels k.csv --e2e e.csv --targets  # the GPU targets, measured

The PNG has one panel per (shape, dtype) and one line per provider; when a CSV
holds several runs of the same point, the last row wins.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

from benchmarks import common

OK = ("ok", "wrong_result")


def _f(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def latest(rows: list[dict], key_cols: tuple[str, ...]) -> list[dict]:
    """Last row per key (a CSV appended to by several runs)."""
    out = {}
    for r in rows:
        out[tuple(r.get(c, "") for c in key_cols)] = r
    return list(out.values())


KERNEL_KEY = ("device", "gpu_name", "model", "layer", "d_out", "d_in", "dtype", "tokens", "provider")


def speedup_series(rows: list[dict]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """(model, layer, d_out, d_in, dtype) -> provider -> sorted [(tokens, speedup vs dense)]."""
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in latest(rows, KERNEL_KEY):
        sp = _f(r.get("speedup_vs_dense"))
        if r.get("status") in OK and r["provider"] != "dense" and math.isfinite(sp):
            panel = (r["model"], r["layer"], int(r["d_out"]), int(r["d_in"]), r["dtype"])
            panels[panel][r["provider"]].append((int(r["tokens"]), sp))
    return {p: {prov: sorted(pts) for prov, pts in provs.items()} for p, provs in panels.items()}


def plot_speedups(rows: list[dict], png: str) -> int:
    """Write the PNG; returns the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = speedup_series(rows)
    if not panels:
        raise ValueError("no timed non-dense rows with a speedup over dense in the CSV: nothing to plot")
    n = len(panels)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    gpu = {r.get("gpu_name", "") for r in rows}
    for ax, (panel, provs) in zip(axes.flat, sorted(panels.items())):
        model, layer, d_out, d_in, dtype = panel
        for prov, pts in sorted(provs.items()):
            ax.plot([t for t, _ in pts], [s for _, s in pts], marker="o", ms=3, label=prov)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {layer}\n{d_out}x{d_in} {dtype}", fontsize=8)
        ax.set_xlabel("tokens", fontsize=8)
        ax.set_ylabel("speedup over dense", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("speedup over dense F.linear (higher is better) on " + ", ".join(sorted(gpu)), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return n


# ---- targets ------------------------------------------------------------------

# (what, threshold text) in the order of benchmarks/README.md
TARGETS = (
    "decode, 1 token, Llama-3-8B MLP layers: ARMOR / dense >= 1.4x per layer",
    "e2e decode tokens/s, Llama-3-8B-shaped model: ARMOR / dense >= 1.25x",
    "prefill, 2048 tokens, Llama-3-8B layers: ARMOR / dense >= 1.2x per layer",
    "prefill, 2048 tokens, Llama-3-8B layers: ARMOR / plain 2:4 >= 0.85x per layer",
    "memory: pruned layer bytes ARMOR / dense <= 0.63x at b = 128",
)


def _best_armor(rows: list[dict], col: str) -> dict[str, tuple[float, str]]:
    """layer -> (best ARMOR value of ``col``, provider) over the ARMOR backends that ran."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        v = _f(r.get(col))
        ok = r["provider"].startswith("armor_") and r.get("status") == "ok" and math.isfinite(v)
        if ok and (r["layer"] not in best or v > best[r["layer"]][0]):
            best[r["layer"]] = (v, r["provider"])
    return best


def _fmt_layers(best: dict[str, tuple[float, str]], prefix: str = "x") -> str:
    return "; ".join(f"{layer} {prefix}{v:.2f} ({prov})" for layer, (v, prov) in sorted(best.items()))


def target_table(kernel_rows: list[dict], e2e_rows: list[dict], dtype: str = "bf16") -> list[tuple[str, str]]:
    """(target, measured text) for each target; 'not measured in these CSVs' where data is missing."""
    missing = "not measured in these CSVs"
    k = [r for r in latest(kernel_rows, KERNEL_KEY) if r.get("model") == "llama3-8b" and r.get("dtype") == dtype]
    k = [r for r in k if r.get("device") == "cuda"] or []
    mlp1 = [r for r in k if r["tokens"] == "1" and ("gate" in r["layer"] or "down" in r["layer"])]
    pre = [r for r in k if r["tokens"] == "2048"]
    out = [
        (TARGETS[0], _fmt_layers(_best_armor(mlp1, "speedup_vs_dense")) or missing),
    ]
    e = [r for r in e2e_rows if r.get("model") == "llama3-8b-shaped" and r.get("phase") == "decode"
         and r.get("variant") == "armor" and r.get("status") == "ok" and r.get("device") == "cuda"]  # fmt: skip
    out.append((TARGETS[1], "; ".join(
        f"batch {r['batch']} {r['decode_mode']} x{_f(r['speedup_vs_dense']):.2f} ({r['layers_note']} layers)" for r in e
    ) or missing))  # fmt: skip
    out.append((TARGETS[2], _fmt_layers(_best_armor(pre, "speedup_vs_dense")) or missing))
    out.append((TARGETS[3], _fmt_layers(_best_armor(pre, "speedup_vs_plain24")) or missing))
    mem = {}
    for layer in sorted({r["layer"] for r in k}):
        wb = {r["provider"]: _f(r.get("weight_bytes")) for r in k if r["layer"] == layer and r.get("status") == "ok"}
        armor = [v for p, v in wb.items() if p.startswith("armor_")]
        if "dense" in wb and armor:
            mem[layer] = (armor[0] / wb["dense"], "b=" + next(r["block_in"] for r in k if r["layer"] == layer))
    out.append((TARGETS[4], _fmt_layers(mem) or missing))
    return out


def brief_table(rows: list[dict], model: str = "llama3-8b") -> list[str]:
    """Text lines: speedup over dense per (layer, dtype, tokens) and provider, for one model."""
    panels = {p: v for p, v in speedup_series(rows).items() if p[0] == model}
    provs = sorted({prov for v in panels.values() for prov in v})
    if not provs:
        return [f"(no timed {model} rows)"]
    lines = [f"speedup over dense, {model}: " + " | ".join(provs)]
    for (m, layer, d_out, d_in, dtype), v in sorted(panels.items()):
        tokens = sorted({t for pts in v.values() for t, _ in pts})
        for t in tokens:
            cells = []
            for prov in provs:
                sp = dict(v.get(prov, [])).get(t)
                cells.append("-" if sp is None else f"{sp:.2f}")
            lines.append(f"  {layer:<20} {d_out}x{d_in} {dtype} M={t:<5} " + " | ".join(cells))
    return lines


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def e2e_brief(rows: list[dict]) -> list[str]:
    """Text lines: one per timed or weights row of the end-to-end CSV (latest run of each point)."""
    key = ("device", "model", "variant", "phase", "tokens", "batch", "decode_mode")
    lines = []
    for r in latest(rows, key):
        if r.get("status") != "ok" or r.get("phase") not in ("weights", "prefill", "decode"):
            continue
        what = f"  {r['model']:<18} {r['variant']:<10} {r['phase']:<7}"
        if r["phase"] == "weights":
            resident = f"{_f(r['resident_gib']):.2f} GiB resident" if r.get("resident_gib") else "resident n/a (CPU)"
            layouts = _f(r.get("layout_bytes")) if r.get("layout_bytes") else 0.0
            lines.append(f"{what} {_size(_f(r['weights_bytes']))} weights + {_size(layouts)} layouts, {resident}, "
                         f"x{_f(r.get('bytes_vs_dense')):.3f} of dense")  # fmt: skip
        else:
            where = f"prompt {r['tokens']}, batch {r['batch']} {r.get('decode_mode', '')}" if r["phase"] == "decode" else (
                f"{r['tokens']} tokens")  # fmt: skip
            lines.append(f"{what} {where:<28} {_f(r['tokens_per_s']):9.1f} tok/s x{_f(r.get('speedup_vs_dense')):.2f}")
    return ["end to end: " + ("" if lines else "(no rows)")] + lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", help="CSV written by bench_kernels")
    p.add_argument("--e2e", help="CSV written by bench_e2e")
    p.add_argument("--png", help="write the speedup-over-dense plot here (needs --kernels)")
    p.add_argument("--targets", action="store_true", help="print the GPU targets with the measured values")
    p.add_argument("--brief", action="store_true", help="print a compact speedup table (Llama-3-8B layers)")
    p.add_argument("--dtype", default="bf16", help="dtype the targets are read at (default bf16)")
    args = p.parse_args(argv)
    if not (args.png or args.targets or args.brief):
        p.error("nothing to do: give --png, --targets and/or --brief")
    if args.png and not args.kernels:
        p.error("--png needs --kernels")
    krows = common.read_csv(args.kernels) if args.kernels else []
    erows = common.read_csv(args.e2e) if args.e2e else []
    rc = 0
    if args.png:
        try:  # a missing matplotlib or an empty CSV must not hide the tables below
            n = plot_speedups(krows, args.png)
            print(f"wrote {args.png} ({n} panels)")
        except (ImportError, ValueError) as e:
            print(f"no plot: {type(e).__name__}: {e}")
            rc = 1
    if args.targets:
        print("| target | measured (GPU rows only) |\n|---|---|")
        for what, measured in target_table(krows, erows, args.dtype):
            print(f"| {what} | {measured} |")
    if args.brief:
        print("\n".join(brief_table(krows)))
        if erows:
            print("\n".join(e2e_brief(erows)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
