"""Kernel microbenchmarks: one linear layer, dense vs plain 2:4 (cuSPARSELt) vs ARMOR per backend.

    python -m benchmarks.bench_kernels --shapes llama3-8b --tokens 1,16,2048 --dtypes bf16 --out k.csv
    python -m benchmarks.bench_kernels --smoke          # CPU harness check in seconds

Providers (``--providers``, comma-separated, default all):
- ``dense``: ``F.linear`` (cuBLAS on GPU);
- ``cslt_search``: plain 2:4 through PyTorch's cuSPARSELt, by the library's wrapper
  (``armor_kernels.backends.torch_sparse.matmul``) with the algorithm found by
  cuSPARSELt's search, once per shape and token bucket, outside the timed region;
- ``cslt_alg0``: the same with the default algorithm 0;
- ``armor_<backend>``: ``armor_kernels.armor_linear`` with ``ARMOR_BACKEND=<backend>``
  (the public op, as the runtime calls it), one per backend module of ``armor_kernels.dispatch``;
  a backend that runs only the 2:4 core gets its wrappers from dispatch (the note says
  ``runs composite(...)``);
- ``armor_auto``: the same op with dispatch's automatic choice (what ``ArmorLinear`` runs);
- ``armor_<name>+cslt``: the same with ``ARMOR_CUSPARSELT_LAYOUT=1`` (each layer keeps
  cuSPARSELt's compressed copy of its core; the ``layout_bytes`` column says how much).

Every point writes one row per provider; a provider that cannot run writes status
``unavailable`` with the reason. On CPU only ``dense``, ``armor_cpu_dense`` (the CPU runtime
path: ``W_hat`` multiplied out once) and ``armor_reference`` (labelled "cpu reference") are timed
unless named explicitly.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from armor_kernels.backends import torch_sparse
from benchmarks import common
from benchmarks.common import Unavailable

TOKENS = (1, 4, 16, 64, 256, 1024, 2048, 4096)
SMOKE_TOKENS = (1, 16)
PLAIN24 = ("cslt_search", "cslt_alg0")
AUTO = "auto"  # armor_auto: dispatch's own choice, what ArmorLinear runs
CPU_TIMED = ("armor_reference", "armor_cpu_dense")  # the others only say whether they could run
CSLT = "+cslt"  # armor_<name>+cslt: with ARMOR_CUSPARSELT_LAYOUT=1 (cuSPARSELt's copy of each core kept)

COLUMNS = common.ENV_COLUMNS + [
    "model", "layer", "d_out", "d_in", "block_out", "block_in", "dtype", "tokens", "provider", "status", "reason",
    "median_ms", "tflops_dense_equiv", "tflops_actual", "gbps", "weight_bytes", "bytes_moved", "roofline_frac",
    "peak_tflops", "peak_gbps", "speedup_vs_dense", "speedup_vs_plain24", "plain24_ref", "max_rel_err", "timer",
    "layout_bytes", "note",
]  # fmt: skip

# An output further than this from the fp32 reference (max |err| / max |ref|) marks the row wrong_result.
REL_ERR_LIMIT = 5e-2


# ---- providers --------------------------------------------------------------


def armor_provider_names() -> list[str]:
    """``armor_auto`` (and ``+cslt``), ``armor_<name>`` for each loaded backend and each backend module
    that failed to load, and ``+cslt`` for the backends that can keep cuSPARSELt's copy."""
    from armor_kernels import dispatch

    names = [f"armor_{AUTO}", f"armor_{AUTO}{CSLT}"] + [f"armor_{b.name}" for b in dispatch.backends()]
    names += [f"armor_{m}" for m in dispatch.report()["load_errors"]]
    names += [f"armor_{m}{CSLT}" for m in ("cuda_ext",) if f"armor_{m}" in names]
    return names


def make_cslt(w24: torch.Tensor, x: torch.Tensor, search: bool):
    """``y = x W24ᵀ`` through cuSPARSELt by the library's wrapper (tokens padded to a multiple of 8
    inside the timed call, as PyTorch's own semi-structured linear does). Returns (fn, buffer
    bytes, note); with ``search`` the algorithm is searched here, outside the timed region."""
    ok, why = torch_sparse.status()
    if not ok:
        raise Unavailable(why)
    packed = torch_sparse.compress(w24)
    d_out, m = w24.shape[0], x.shape[0]

    def fn():
        return torch_sparse.matmul(packed, x, d_out, search_alg=search)

    fn()  # the search (first call of its class)
    pad = (-m) % torch_sparse.DENSE_MULTIPLE
    notes = [f"tokens padded {m}->{m + pad}"] if pad else []
    if search:
        kwargs, how = torch_sparse.searched_for(x, d_out)
        notes.append(f"{how} -> " + ",".join(f"{k}={v}" for k, v in kwargs.items()))
    return fn, packed.nbytes, ";".join(notes)


def forced_backend(name: str):
    """``ARMOR_BACKEND=name`` for the duration (``auto``: unset, automatic selection; a ``+cslt``
    suffix adds ``ARMOR_CUSPARSELT_LAYOUT=1``); dispatch choices reset on entry and exit."""
    backend, cslt = (name[: -len(CSLT)], "1") if name.endswith(CSLT) else (name, None)
    return common.environment({"ARMOR_BACKEND": None if backend == AUTO else backend, "ARMOR_CUSPARSELT_LAYOUT": cslt})


def armor_choice(name: str, x: torch.Tensor, w) -> str:
    """What dispatch runs ``armor_linear`` on with ``ARMOR_BACKEND=name`` (a backend, or a
    composite of wrapper and 2:4-core backends); raises Unavailable with dispatch's reason."""
    from armor_kernels import dispatch

    with forced_backend(name):
        try:
            return dispatch.select("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias).backend.name
        except dispatch.BackendUnavailable as e:
            raise Unavailable(str(e)) from None


# ---- one point --------------------------------------------------------------


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _armor(prov: str, x: torch.Tensor, w, row: dict, device, args) -> tuple:
    """(output, median ms, timer) of ``armor_linear`` as provider ``prov`` runs it; notes and the
    layout bytes it holds go into ``row``. Layouts are built untimed, as at load, and freed after."""
    from armor_kernels import armor_linear, dispatch

    name = prov[len("armor_") :]
    chosen = armor_choice(name, x, w)
    if device.type == "cpu" and chosen == "reference":
        row["note"] = "cpu reference"
    elif chosen != name.removesuffix(CSLT):
        row["note"] = f"runs {chosen}"
    with forced_backend(name):
        try:
            row["layout_bytes"] = sum(dispatch.prepare(w.a, w.values, w.meta, w.b, None).values())
            y = armor_linear(x, w.a, w.values, w.meta, w.b, None)
            ms, timer = common.bench(
                lambda: armor_linear(x, w.a, w.values, w.meta, w.b, None), device, args.smoke, args.rep_ms
            )
        finally:
            dispatch.release(w.values)
    return y, ms, timer


def measure(prov: str, ctx: dict, x: torch.Tensor, row: dict, args) -> dict:
    """The timing columns of one provider at one point (raises Unavailable when it cannot run)."""
    from armor_kernels import reference

    device, tokens = ctx["device"], x.shape[0]
    n, k = ctx["d_out"], ctx["d_in"]
    w, wd, w24 = ctx["armor"], ctx["dense"], ctx["w24"]
    ref = None
    if prov == "dense":
        fn, wbytes = (lambda: F.linear(x, wd)), wd.nbytes
        flops_d, flops_s = 2 * tokens * n * k, 0
    elif prov in PLAIN24:
        fn, wbytes, row["note"] = make_cslt(w24, x, search=prov == "cslt_search")
        flops_d, flops_s = 0, tokens * n * k  # 2·M·N·K/2 on the sparse core
        ref = F.linear(x.float(), w24.float())
    elif prov.startswith("armor_"):
        fn, wbytes = None, w.nbytes()["total"]
        flops_d, flops_s = 2 * tokens * (w.block_in * k + w.block_out * n), tokens * n * k
        ref = reference.armor_linear(x.float(), w.a.float(), w.values.float(), w.meta, w.b.float())
        y, ms, timer = _armor(prov, x, w, row, device, args)
    else:
        raise Unavailable(f"unknown provider {prov!r}")
    if fn is not None:
        y = fn()
        ms, timer = common.bench(fn, device, args.smoke, args.rep_ms)
    moved = wbytes + (tokens * k + tokens * n) * x.element_size()
    roof, dtype_name = ctx["roof"], ctx["dtype_name"]
    return {
        "median_ms": ms, "timer": timer, "weight_bytes": wbytes, "bytes_moved": moved,
        "max_rel_err": rel_err(y, ref) if ref is not None else 0.0,
        "tflops_dense_equiv": 2 * tokens * n * k / (ms * 1e-3) / 1e12,
        "tflops_actual": (flops_d + flops_s) / (ms * 1e-3) / 1e12,
        "gbps": moved / (ms * 1e-3) / 1e9, "roofline_frac": roof.ideal_ms(dtype_name, flops_d, flops_s, moved) / ms,
        "peak_tflops": roof.tflops[dtype_name], "peak_gbps": roof.gbps,
    }  # fmt: skip


def run_point(ctx: dict, tokens: int, providers: list[str], explicit: set[str], args, out, base: dict) -> list:
    """One row per provider at ``tokens``; a provider that cannot run is a row with the reason."""
    device = ctx["device"]
    x = torch.randn(tokens, ctx["d_in"], device=device).to(common.DTYPES[ctx["dtype_name"]])
    rows = []
    for prov in providers:
        row = dict(base, tokens=tokens, provider=prov, status="ok", reason="", note="")
        try:
            if (
                device.type == "cpu"
                and prov.startswith("armor_")
                and prov not in CPU_TIMED
                and prov not in explicit
            ):
                armor_choice(prov[len("armor_") :], x, ctx["armor"])  # unavailable beats skipped
                row.update(status="skipped",
                           reason="on CPU only cpu_dense and the reference are timed (name it in --providers)")
            else:
                row.update(measure(prov, ctx, x, row, args))
                if row["max_rel_err"] > REL_ERR_LIMIT:
                    row.update(status="wrong_result",
                               reason=f"max rel err {row['max_rel_err']:.3g} > {REL_ERR_LIMIT} vs fp32 reference")  # fmt: skip
        except Unavailable as e:
            row.update(status="unavailable", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a failing provider is a row, never the end of the run
            row.update(status="error", reason=common.reason(e))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    add_speedups(rows)
    for row in rows:
        out.write(row)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Speedup = reference time / this time, against dense and against the best-labelled plain 2:4."""
    timed = {r["provider"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    plain = next((p for p in PLAIN24 if p in timed), "")
    for r in rows:
        if r["status"] not in ("ok", "wrong_result"):
            continue
        if "dense" in timed:
            r["speedup_vs_dense"] = timed["dense"] / r["median_ms"]
        if plain:
            r["speedup_vs_plain24"] = timed[plain] / r["median_ms"]
            r["plain24_ref"] = plain


# ---- main -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", default=None, help="all | model | model:layer | NxK, comma-separated (default all; smoke: tiny)"
    )
    p.add_argument("--tokens", default=None, help=f"token counts (default {','.join(map(str, TOKENS))})")
    p.add_argument("--dtypes", default=None, help="bf16,fp16 (default both; smoke: bf16)")
    p.add_argument("--providers", default="all", help="all | dense,cslt_search,cslt_alg0,armor_<backend>,...")
    p.add_argument("--exclude", default="", help="providers to leave out, comma-separated (e.g. armor_reference)")
    p.add_argument("--block-size", type=int, default=128, help="ARMOR wrapper block size per side (default 128)")
    p.add_argument("--out", default="runs/bench_kernels.csv", help="CSV to append to (default runs/bench_kernels.csv)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time per point, ms (GPU)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few tokens, short timing: a harness check")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = common.pick_device(args.device)
    shapes = common.select_shapes(args.shapes or ("tiny" if args.smoke else "all"))
    tokens = common.parse_list(args.tokens, int) if args.tokens else list(SMOKE_TOKENS if args.smoke else TOKENS)
    dtypes = common.parse_dtypes(args.dtypes or ("bf16" if args.smoke else "bf16,fp16"))
    all_providers = ["dense", *PLAIN24, *armor_provider_names()]
    if args.providers == "all":
        providers, explicit = all_providers, set()
    else:
        providers = common.parse_list(args.providers)
        explicit = set(providers)
    providers = [p for p in providers if p not in common.parse_list(args.exclude)]
    torch.manual_seed(0)
    roof = common.measure_roofline(device, dtypes, args.smoke)
    print(
        f"roofline ({roof.how}): copy {roof.gbps:.1f} GB/s; matmul "
        + ", ".join(f"{d} {t:.2f} TFLOP/s" for d, t in roof.tflops.items()),
        flush=True,
    )
    env = common.env_info(device.type)
    out = common.CsvOut(args.out, COLUMNS)
    n_rows = 0
    try:
        for model, layer, n, k in shapes:
            for dtype_name in dtypes:
                dt = common.DTYPES[dtype_name]
                ctx = {"device": device, "dtype_name": dtype_name, "d_out": n, "d_in": k, "roof": roof}
                ctx["dense"] = (torch.randn(n, k, device=device) / k**0.5).to(dt)
                ctx["w24"] = ctx["dense"] * common.random_24_mask(n, k, device)
                ctx["armor"] = common.random_armor_weights(n, k, args.block_size, dt, device)
                base = dict(env, model=model, layer=layer, d_out=n, d_in=k, dtype=dtype_name,
                            block_out=ctx["armor"].block_out, block_in=ctx["armor"].block_in)  # fmt: skip
                for t in tokens:
                    rows = run_point(ctx, t, providers, explicit, args, out, base)
                    n_rows += len(rows)
                    print(summary_line(rows), flush=True)
                del ctx
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        out.close()
    print(f"wrote {n_rows} rows to {args.out}", flush=True)
    return 0


def summary_line(rows: list[dict]) -> str:
    r0 = rows[0]
    parts = []
    for r in rows:
        if r["status"] in ("ok", "wrong_result"):
            sp = r.get("speedup_vs_dense")
            parts.append(
                f"{r['provider']} {r['median_ms']:.4g}ms"
                + (f" x{sp:.2f}" if sp else "")
                + ("" if r["status"] == "ok" else " WRONG")
            )
        else:
            parts.append(f"{r['provider']} {r['status']}")
    return f"{r0['model']} {r0['layer']} {r0['d_out']}x{r0['d_in']} {r0['dtype']} M={r0['tokens']}: " + " | ".join(
        parts
    )


if __name__ == "__main__":
    sys.exit(main())
