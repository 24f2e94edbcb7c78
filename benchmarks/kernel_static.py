"""Judge the Triton kernels from their machine code, without a GPU.

    python -m benchmarks.kernel_static            # full table -> benchmarks/results/kernel_static.{csv,md}
    python -m benchmarks.kernel_static --smoke    # a few configurations, both targets, prints only
    python -m benchmarks.kernel_static --name kernel_static_triton3.6   # another Triton (its own venv)

Every launch comes from the real launchers in ``armor_kernels.backends.triton``:
``decode_layer`` (1-16 tokens) and ``blockdiag`` (the wrappers at 2048 tokens) run on
``meta``-device tensors with ``_launch`` replaced by a recorder and the SM count of the
modelled GPU, so the tile sizes, split and grid are the launchers' own. Each recorded
launch is specialised with Triton's own JIT rules (alignment, divisibility) and compiled
ahead of time with ``triton.compile`` for ``GPUTarget("cuda", 80|90, 32)`` (Triton's ptxas);
``benchmarks.sass_stats`` reads registers, spills and the main loop from the cubin.

Bounds and prediction per launch (all on the busiest SM, ``P`` programs over ``S`` SMs):

- issue-bound: ``ceil(P/S) · warps · steps · C / 4 / clock``, with ``C`` the cycles one
  SM sub-partition needs for one pass of the main loop (the slowest of issue and the
  fma / alu / lsu pipes: ``sass_stats``) and ``steps`` the loop trips of a program;
- memory-bound: bytes of every tensor the launch reads or writes, once (values + metadata
  + wrappers + bias + activations; split-K partials stay in L2 and are not counted),
  over the bandwidth (H200: 4.3 TB/s measured copy; A100: 2.04 TB/s datasheet);
- predicted: ``max(memory-bound · inflight, issue of the whole program) + launch``, where
  the whole program counts the main loop ``steps`` times and every other instruction once,
  and ``inflight = max(1, needed / resident)`` is Little's law: resident warps x bytes one
  warp requests per loop pass, against bandwidth per SM x ``LATENCY_S`` of memory latency.
  ``launch`` is ``LAUNCH_S`` per launch (CUDA-graph replay; an assumption, see README).

Dense's memory floor is ``2·d_out·d_in + 2·T·(d_in + d_out)`` bytes at the same bandwidth.
All of this is a model of code that has not run: predictions, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from benchmarks import sass_stats as ss

RESULTS = os.path.join(os.path.dirname(__file__), "results")
LAUNCH_S = 1.0e-6  # per launch under CUDA-graph replay (README performance model); eager is ~2 µs
LATENCY_S = 0.6e-6  # loaded HBM latency used for the in-flight check (assumption)
ARCH = {"sm_80": 80, "sm_90a": 90}
CONFIG_KEYS = ("BLOCK_M", "BLOCK_O", "BLOCK_N", "BLOCK_K", "NT", "SPLIT_K", "USE_DOT", "FUSE_A", "X_SPLIT")

MODELS = {
    "llama3-8b": [(4096, 4096), (14336, 4096), (4096, 14336)],
    "qwen2.5-7b": [(3584, 3584), (18944, 3584), (3584, 18944)],
    "smollm2-135m": [(576, 576), (1536, 576), (576, 1536)],
}
DECODE_TOKENS = (1, 2, 4, 8, 16)
WRAPPER_TOKENS = (2048,)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE = {
    "models": {"llama3-8b": [(4096, 4096)], "smollm2-135m": [(576, 576)]},
    "tokens": (1, 16),
    "wrapper_tokens": (),
    "dtypes": ("bf16",),
}


def _require_compiler():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_static: unset TRITON_INTERPRET (it replaces the compiler with the interpreter)")
    import triton  # noqa: F401

    from armor_kernels.backends import triton as tb

    if tb.IMPORT_ERROR:
        raise SystemExit(f"kernel_static: triton unavailable: {tb.IMPORT_ERROR}")
    return tb


# ---------------------------------------------------------------------------
# recording the launchers' own launches
# ---------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)

    def tensor_bytes(self) -> int:
        """Bytes of every distinct tensor argument except the split-K workspace and counters
        (L2-resident)."""
        names = self.kernel.arg_names
        seen, total = set(), 0
        for n, a in zip(names, self.args):
            if isinstance(a, torch.Tensor) and n not in ("ws_ptr", "cnt_ptr") and id(a) not in seen:
                seen.add(id(a))
                total += a.numel() * a.element_size()
        return total

    def arg(self, name):
        return self.args[self.kernel.arg_names.index(name)]

    def steps(self) -> int:
        """Main-loop trips of one program, from the kernel's loop bounds."""
        k = self.kwargs
        if self.name == "sparse24_small_kernel":
            return -(-self.arg("VALS_PER_SPLIT") // (8 * k["NT"]))
        if self.name == "blockdiag_kernel":
            return -(-self.arg("BS") // k["BLOCK_K"])
        raise KeyError(self.name)


@contextlib.contextmanager
def recording(tb, sm_count: int, pdl: bool = False):
    """Launches recorded instead of run, on a GPU with ``sm_count`` SMs; ``pdl``: as with ARMOR_TRITON_PDL=1.

    ``decode_layer``'s per-shape hot-path plans are set aside (their key has no SM count).
    """
    rec: list[Launch] = []
    saved = tb._launch, tb._sm_count, tb._pdl_enabled, dict(tb._dl_plans)
    tb._launch = lambda kernel, grid, args, kwargs: rec.append(Launch(kernel, tuple(grid), tuple(args), dict(kwargs)))
    tb._sm_count = lambda device: sm_count
    tb._pdl_enabled = lambda device: pdl
    tb._dl_plans.clear()
    try:
        yield rec
    finally:
        tb._launch, tb._sm_count, tb._pdl_enabled = saved[:3]
        tb._dl_plans.clear()
        tb._dl_plans.update(saved[3])


def decode_launches(tb, sm_count, d_out, d_in, tokens, dtype, bias=False, pdl=False):
    """Launches of ``decode_layer`` for one layer, b = 128 (or the largest valid block below it).

    The first call for a shape takes the checked path and the later ones the hot path; both
    launch the same kernels with the same configuration, except that only the hot path uses
    programmatic dependent launch (``pdl``): then the second call is the one recorded.
    """
    from armor_kernels.formats import block_pair

    bo, bi = block_pair(d_out, d_in, 128)
    dev = "meta"
    x = torch.empty(tokens, d_in, dtype=dtype, device=dev)
    a = torch.empty(d_out // bo, bo, bo, dtype=dtype, device=dev)
    b = torch.empty(d_in // bi, bi, bi, dtype=dtype, device=dev)
    values = torch.empty(d_out, d_in // 2, dtype=dtype, device=dev)
    meta = torch.empty(d_out, (d_in // 4 + 1) // 2, dtype=torch.uint8, device=dev)
    bias_t = torch.empty(d_out, dtype=dtype, device=dev) if bias else None
    with recording(tb, sm_count, pdl) as rec:
        tb.decode_layer(x, a, values, meta, b, bias_t)
        if pdl:
            rec.clear()
            tb.decode_layer(x, a, values, meta, b, bias_t)
    return rec, (bo, bi)


def wrapper_launches(tb, sm_count, d_out, d_in, tokens, dtype):
    """The two wrappers on their own (prefill path around cuSPARSELt): B on x, A on z."""
    from armor_kernels.formats import block_pair

    bo, bi = block_pair(d_out, d_in, 128)
    dev = "meta"
    with recording(tb, sm_count) as rec:
        tb.blockdiag(torch.empty(tokens, d_in, dtype=dtype, device=dev), torch.empty(d_in // bi, bi, bi, dtype=dtype, device=dev))
        tb.blockdiag(torch.empty(tokens, d_out, dtype=dtype, device=dev), torch.empty(d_out // bo, bo, bo, dtype=dtype, device=dev))
    return rec, (bo, bi)


# ---------------------------------------------------------------------------
# compiling with Triton's own specialisation
# ---------------------------------------------------------------------------
_compiled: dict = {}


def _specialize(fn, args, kwargs, target):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, spec, opts)


def compile_launch(launch: Launch, arch: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", ARCH[arch], 32)
    options, signature, constexprs, attrs = _specialize(launch.kernel, launch.args, launch.kwargs, target)
    key = (launch.name, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), launch.kwargs.get("num_warps"), launch.kwargs.get("num_stages"))  # fmt: skip
    if key not in _compiled:
        t0 = time.time()
        c = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        cubin = c.asm["cubin"]
        ins = ss.disassemble(cubin)
        lp = ss.main_loop(ins)
        allc = ss.count(ins)
        _compiled[key] = {
            "res": ss.resource_usage(cubin),
            "shared": int(c.metadata.shared),
            "num_warps": int(c.metadata.num_warps),
            "loop": lp.counts if lp else Counter(),
            "rest": allc - (lp.counts if lp else Counter()),
            "compile_s": time.time() - t0,
            "cubin": cubin,
        }
    return _compiled[key]


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------
def _scale(c: Counter, k: float) -> Counter:
    return Counter({n: v * k for n, v in c.items()})


def analyse(launch: Launch, gpu: ss.GPU) -> dict:
    st = compile_launch(launch, gpu.arch)
    warps = st["num_warps"]
    programs = math.prod(launch.grid)
    blocks = ss.occupancy(gpu, st["res"]["regs"], warps, st["shared"])
    per_sm = -(-programs // gpu.sms)
    steps = launch.steps()
    loop_cyc = ss.issue_cycles(st["loop"], gpu.arch)  # per warp, one pass
    issue_s = per_sm * warps * steps * loop_cyc / 4 / gpu.clock_hz
    whole = _scale(st["loop"], steps) + st["rest"]
    whole_s = per_sm * warps * ss.issue_cycles(whole, gpu.arch) / 4 / gpu.clock_hz
    nbytes = launch.tensor_bytes()
    mem_s = nbytes / gpu.bandwidth
    # Little's law: bytes one warp asks for per loop pass x resident warps, vs bandwidth x latency per SM
    loop = st["loop"]
    warp_bytes = 32 * sum(loop.get(f"ldg{w}", 0) * w // 8 for w in (8, 16, 32, 64, 128))
    resident = max(1, min(blocks, per_sm)) * warps
    need = gpu.bandwidth / gpu.sms * LATENCY_S
    inflight = max(1.0, need / max(1, resident * warp_bytes)) if warp_bytes else 1.0
    pred_s = max(mem_s * inflight, whole_s) + LAUNCH_S
    row = {
        "kernel": launch.name.replace("_kernel", ""),
        "grid": "x".join(str(g) for g in launch.grid),
        "programs": programs,
        "num_warps": warps,
        "config": " ".join(f"{k}={v}" for k, v in launch.kwargs.items() if k in CONFIG_KEYS),
        "regs": st["res"]["regs"],
        "spill_bytes": st["res"]["stack"] + st["res"]["local"],
        "shared_bytes": st["shared"],
        "blocks_per_sm": blocks,
        "steps": steps,
        "loop_instr": loop.get("total", 0),
        "loop_ldg128": loop.get("ldg128", 0),
        "loop_ldg64": loop.get("ldg64", 0),
        "loop_ldg32": loop.get("ldg32", 0),
        "loop_ldg16": loop.get("ldg16", 0),
        "loop_ldg8": loop.get("ldg8", 0),
        "loop_lds": loop.get("lds", 0),
        "loop_sts": loop.get("sts", 0),
        "loop_shfl": loop.get("shfl", 0),
        "loop_bar": loop.get("bar", 0),
        "loop_fma": loop.get("fma", 0),
        "loop_ffma": loop.get("ffma", 0),
        "loop_imad": loop.get("imad", 0),
        "loop_mma": loop.get("mma", 0),
        "loop_alu": loop.get("alu", 0),
        "loop_cvt": loop.get("cvt", 0),
        "loop_local": loop.get("local", 0),
        "bytes": nbytes,
        "issue_us": issue_s * 1e6,
        "mem_us": mem_s * 1e6,
        "inflight": inflight,
        "pred_us": pred_s * 1e6,
    }
    return row


def pdl_check(tb, d_out=4096, d_in=4096, tokens=1) -> str:
    """Compile the hot path with programmatic dependent launch for sm_90a and find its two instructions.

    ``griddepcontrol.launch_dependents`` is ``PREEXIT`` in the B-wrapper, ``griddepcontrol.wait``
    is ``ACQBULK`` at the start of the 2:4 kernel; the launch itself asks for ``launch_pdl``.
    """
    rec, _ = decode_launches(tb, ss.GPUS["H200"].sms, d_out, d_in, tokens, torch.bfloat16, pdl=True)
    names = [r.name for r in rec]
    if names != ["blockdiag_kernel", "sparse24_small_kernel"] or not rec[1].kwargs.get("launch_pdl"):
        raise RuntimeError(f"PDL hot path: unexpected launches {names} {[r.kwargs for r in rec]}")
    found = []
    for launch, op in zip(rec, ("PREEXIT", "ACQBULK")):
        ops = {o for o, _, _ in ss.disassemble(compile_launch(launch, "sm_90a")["cubin"])}
        if op not in ops:
            raise RuntimeError(f"{launch.name} compiled for PDL has no {op}")
        found.append(f"{op} in {launch.name.replace('_kernel', '')}")
    return f"H200 bf16 {d_out}x{d_in} T={tokens}, programmatic dependent launch (ARMOR_TRITON_PDL=1): " + ", ".join(found)


def dense_floor_s(d_out, d_in, tokens, gpu):
    return (2 * d_out * d_in + 2 * tokens * (d_in + d_out)) / gpu.bandwidth


def run(models, tokens, wrapper_tokens, dtypes, gpus, progress=True) -> list[dict]:
    tb = _require_compiler()
    import triton

    jobs = [(g, m, s, t, d) for g in gpus for d in dtypes for m, shapes in models.items() for s in shapes for t in tokens]
    jobs += [(g, m, s, t, d) for g in gpus for d in dtypes for m, shapes in models.items() for s in shapes for t in wrapper_tokens]
    try:
        from tqdm import tqdm

        it = tqdm(jobs, desc="kernel_static", disable=not progress)
    except ImportError:
        it = jobs
    rows = []
    for gname, model, (d_out, d_in), tok, dname in it:
        gpu = ss.GPUS[gname]
        decode = tok <= tb.MAX_SMALL_TOKENS
        if decode:
            rec, (bo, bi) = decode_launches(tb, gpu.sms, d_out, d_in, tok, DTYPES[dname])
        else:
            rec, (bo, bi) = wrapper_launches(tb, gpu.sms, d_out, d_in, tok, DTYPES[dname])
        base = {
            "gpu": gname, "arch": gpu.arch, "triton": triton.__version__, "model": model, "d_out": d_out, "d_in": d_in,
            "b_out": bo, "b_in": bi, "dtype": dname, "tokens": tok, "path": "decode_layer" if decode else "wrappers",
        }  # fmt: skip
        krows = []
        for i, launch in enumerate(rec):
            r = dict(base, launch=i, **analyse(launch, gpu))
            krows.append(r)
        dense = dense_floor_s(d_out, d_in, tok, gpu) * 1e6
        layer = dict(
            base, launch="all", kernel=f"{len(rec)} launches",
            spill_bytes=max(r["spill_bytes"] for r in krows), regs=max(r["regs"] for r in krows),
            bytes=sum(r["bytes"] for r in krows), issue_us=sum(r["issue_us"] for r in krows),
            mem_us=sum(r["mem_us"] for r in krows), pred_us=sum(r["pred_us"] for r in krows),
            dense_floor_us=dense, launches=len(rec),
        )  # fmt: skip
        if decode:
            layer["speedup_vs_dense_floor"] = dense / layer["pred_us"]
            # launch cost per launch that would still give 1.4x over dense's floor
            kernel_only = layer["pred_us"] - len(rec) * LAUNCH_S * 1e6
            layer["launch_budget_1p4x_us"] = (dense / 1.4 - kernel_only) / len(rec)
        for r in krows:
            r["dense_floor_us"] = dense
        rows.extend(krows)
        rows.append(layer)
    return rows


COLUMNS = [
    "gpu", "arch", "triton", "model", "d_out", "d_in", "b_out", "b_in", "dtype", "tokens", "path", "launch", "kernel",
    "grid", "programs", "num_warps", "config", "regs", "spill_bytes", "shared_bytes", "blocks_per_sm", "steps",
    "loop_instr", "loop_ldg128", "loop_ldg64", "loop_ldg32", "loop_ldg16", "loop_ldg8", "loop_lds", "loop_sts",
    "loop_shfl", "loop_bar", "loop_fma", "loop_ffma", "loop_imad", "loop_mma", "loop_alu", "loop_cvt", "loop_local", "bytes",
    "issue_us", "mem_us", "inflight", "pred_us", "launches", "dense_floor_us", "speedup_vs_dense_floor",
    "launch_budget_1p4x_us",
]  # fmt: skip


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def targets(rows) -> list[tuple[str, bool, str]]:
    """The decode targets for bf16 on sm_90a (H200), Llama-3-8B shapes."""
    out = []
    for d_out, d_in in MODELS["llama3-8b"]:
        sel = [r for r in rows if r["gpu"] == "H200" and r["dtype"] == "bf16" and (r["d_out"], r["d_in"]) == (d_out, d_in)]
        layer1 = next((r for r in sel if r["tokens"] == 1 and r["launch"] == "all"), None)
        if layer1 is None:
            continue
        k1 = [r for r in sel if r["tokens"] == 1 and r["launch"] != "all"]
        dec = [r for r in sel if r["launch"] != "all" and r["path"] == "decode_layer"]
        shape = f"{d_out}x{d_in}"
        spills = max(r["spill_bytes"] for r in dec)
        out.append((f"{shape}: no spills in any decode config", spills == 0, f"max {spills} B"))
        ratio = layer1["issue_us"] / layer1["mem_us"]
        out.append((f"{shape}, 1 token: issue-bound <= 0.7x memory-bound", ratio <= 0.7, f"{ratio:.2f}x"))
        out.append((f"{shape}, 1 token: <= 2 launches", len(k1) <= 2, f"{len(k1)}"))
        sp = layer1["speedup_vs_dense_floor"]
        out.append((f"{shape}, 1 token: predicted >= 1.4x dense's memory floor", sp >= 1.4, f"{sp:.2f}x"))
        l16 = next((r for r in sel if r["tokens"] == 16 and r["launch"] == "all"), None)
        if l16 is not None:
            out.append((f"{shape}, 16 tokens: predicted under dense's floor", l16["pred_us"] < l16["dense_floor_us"],
                        f"{l16['pred_us']:.2f} vs {l16['dense_floor_us']:.2f} µs"))  # fmt: skip
    return out


def write(rows, csv_path, md_path):
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    os.replace(tmp, csv_path)
    tmp = md_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(markdown(rows))
    os.replace(tmp, md_path)


def summary(rows) -> list[str]:
    """The Llama-3-8B decode rows at 1 and 16 tokens (H200, bf16): the table README.md quotes."""
    hdr = ["layer", "T", "launches", "2:4 kernel regs", "max spill B", "2:4 loop instr", "issue µs", "memory µs",
           "predicted µs", "dense floor µs", "dense floor / predicted"]  # fmt: skip
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for d_out, d_in in MODELS["llama3-8b"]:
        for tok in (1, 16):
            sel = [r for r in rows if r["gpu"] == "H200" and r["dtype"] == "bf16" and r["tokens"] == tok
                   and (r["d_out"], r["d_in"]) == (d_out, d_in)]  # fmt: skip
            layer = next((r for r in sel if r["launch"] == "all"), None)
            core = next((r for r in sel if r.get("kernel") == "sparse24_small"), None)
            if layer is None or core is None:
                continue
            vals = [f"{d_out}x{d_in}", tok, layer["launches"], core["regs"], layer["spill_bytes"], core["loop_instr"],
                    layer["issue_us"], layer["mem_us"], layer["pred_us"], layer["dense_floor_us"],
                    f"{_fmt(layer['speedup_vs_dense_floor'])}x"]  # fmt: skip
            out.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return out


def markdown(rows) -> str:
    import triton

    lines = [
        "# Static kernel report (predictions, not measurements)",
        "",
        f"Generated by `python -m benchmarks.kernel_static` with Triton {triton.__version__}, no GPU: every launch",
        "that `armor_kernels.backends.triton` chooses, compiled for sm_80 / sm_90a, machine code read from the cubin.",
        f"Launch cost assumed: {LAUNCH_S * 1e6:.1f} µs per launch (CUDA-graph replay); memory latency for the",
        f"in-flight check: {LATENCY_S * 1e6:.1f} µs. H200: 132 SMs, 1.98 GHz, 4.3 TB/s (measured copy);",
        "A100: 108 SMs, 1.41 GHz, 2.04 TB/s (datasheet). Model: `benchmarks/kernel_static.py` docstring.",
        "",
        "## Targets (H200, bf16, Llama-3-8B)",
        "",
        "| condition | met | value |",
        "|---|---|---|",
    ]
    for name, ok, val in targets(rows):
        lines.append(f"| {name} | {'yes' if ok else 'no'} | {val} |")
    lines += ["", "## Llama-3-8B decode (H200, bf16, b = 128)", ""] + summary(rows)
    lines += ["", "## Layers", ""]
    hdr = ["gpu", "dtype", "model", "d_out", "d_in", "tokens", "launches", "max regs", "max spill B", "issue µs",
           "memory µs", "predicted µs", "dense floor µs", "dense floor / predicted", "launch budget for 1.4x (µs/launch)"]  # fmt: skip
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        if r["launch"] != "all":
            continue
        vals = [r["gpu"], r["dtype"], r["model"], r["d_out"], r["d_in"], r["tokens"], r["launches"], r["regs"],
                r["spill_bytes"], r["issue_us"], r["mem_us"], r["pred_us"], r["dense_floor_us"],
                r.get("speedup_vs_dense_floor"), r.get("launch_budget_1p4x_us")]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += ["", "## Kernels (one row per launch)", ""]
    hdr = ["gpu", "dtype", "d_out x d_in", "T", "kernel", "config", "grid", "warps", "regs", "spill B", "smem B",
           "blocks/SM", "steps", "loop instr", "LDG.128/64/32/16/8", "LDS/STS", "SHFL", "BAR", "FMA-pipe (FFMA/IMAD)",
           "MMA", "ALU", "issue µs", "memory µs", "in-flight x", "predicted µs"]  # fmt: skip
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        if r["launch"] == "all":
            continue
        ldg = "/".join(str(r[f"loop_ldg{w}"]) for w in (128, 64, 32, 16, 8))
        vals = [r["gpu"], r["dtype"], f"{r['d_out']}x{r['d_in']}", r["tokens"], r["kernel"], r["config"], r["grid"],
                r["num_warps"], r["regs"], r["spill_bytes"], r["shared_bytes"], r["blocks_per_sm"], r["steps"],
                r["loop_instr"], ldg, f"{r['loop_lds']}/{r['loop_sts']}", r["loop_shfl"], r["loop_bar"],
                f"{r['loop_fma']} ({r['loop_ffma']}/{r['loop_imad']})", r["loop_mma"], r["loop_alu"], r["issue_us"], r["mem_us"],
                r["inflight"], r["pred_us"]]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few configurations on both targets; prints, writes nothing")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--name", default="kernel_static", help="file stem of the CSV and markdown written")
    ap.add_argument("--gpus", default="H200,A100")
    ap.add_argument("--models", default=",".join(MODELS), help="subset of the models (prints, writes nothing)")
    ap.add_argument("--tokens", default=None, help="subset of the token counts (prints, writes nothing)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    args = ap.parse_args(argv)
    gpus = args.gpus.split(",")
    subset = args.models != ",".join(MODELS) or args.tokens is not None or args.dtypes != ",".join(DTYPES)
    if subset and not args.smoke:
        models = {m: MODELS[m] for m in args.models.split(",")}
        tokens = tuple(int(t) for t in (args.tokens or "1,2,4,8,16").split(","))
        rows = run(models, tokens, (), args.dtypes.split(","), gpus, progress=False)
        print("\n".join(summary(rows)))
        for name, ok, val in targets(rows):
            print(f"{'MET ' if ok else 'MISS'} {name}: {val}")
        return 0
    if args.smoke:
        rows = run(SMOKE["models"], SMOKE["tokens"], SMOKE["wrapper_tokens"], SMOKE["dtypes"], gpus, progress=False)
        for r in rows:
            if r["launch"] == "all":
                print(f"{r['gpu']} {r['dtype']} {r['d_out']}x{r['d_in']} T={r['tokens']}: {r['launches']} launches, "
                      f"issue {r['issue_us']:.2f} µs, memory {r['mem_us']:.2f} µs, predicted {r['pred_us']:.2f} µs, "
                      f"dense floor {r['dense_floor_us']:.2f} µs, max spill {r['spill_bytes']} B")  # fmt: skip
        if "H200" in gpus:
            print(pdl_check(_require_compiler()))
        return 0
    rows = run(MODELS, DECODE_TOKENS, WRAPPER_TOKENS, list(DTYPES), gpus)
    write(rows, os.path.join(args.out_dir, f"{args.name}.csv"), os.path.join(args.out_dir, f"{args.name}.md"))
    for name, ok, val in targets(rows):
        print(f"{'MET ' if ok else 'MISS'} {name}: {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
