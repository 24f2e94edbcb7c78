"""GPU check of the 2:4 core's prefill paths against the reference, with their speed against dense,
on Llama-3-8B layer shapes: the compiled extension's cuSPARSELt plan (``ext``, the opt-in copy),
its expansion + cuBLAS path (``expand``, the default: no copy), and PyTorch's cuSPARSELt through
the library's wrapper (``cslt``, searched and default algorithm; also the ``torch_sparse`` backend).

    python -m benchmarks.check_cuda_ext [--dtypes bf16,fp16] [--tokens 16,128,1024,8192] [--budget-s 25]

Builds the extension in place first when it is missing and nvcc is present (``--no-build`` to skip).
Prints one row per (shape, tokens): max error relative to the reference's max |y| per path, then
median milliseconds per path and for dense ``F.linear``, and the extension's plan (alg id, split-K).
Then the core's own bias (fused), a per-call bias, per-row alpha, padded tokens and CUDA-graph
replay of both extension paths are checked once. Exit 1 on any mismatch, 2 when the check cannot
run (no GPU, no extension), 0 otherwise. Rows past ``--budget-s`` are skipped.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts the imports too: the GPU suite gives this script 30 s

import argparse
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch
import torch.nn.functional as F

SHAPES = {  # Llama-3-8B: (d_out, d_in)
    "llama3-8b:q_proj": (4096, 4096),
    "llama3-8b:gate": (14336, 4096),
    "llama3-8b:down": (4096, 14336),
}
TOKENS = (16, 1024, 8192, 128, 4096, 64, 512, 2048)  # most telling first: rows past the budget are skipped
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# max |out - ref| / max |ref|: one output rounding (bf16 2^-8, fp16 2^-11) plus fp32-accumulation order
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


def ensure_extension(build: bool):
    from armor_kernels import cuda_ext

    if cuda_ext._C is None and build and shutil.which("nvcc"):
        print(f"extension not loaded ({cuda_ext.IMPORT_ERROR}); building in place", flush=True)
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        env = dict(os.environ, ARMOR_FORCE_CUDA_BUILD="1")
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        print(f"build rc={run.returncode} in {time.perf_counter() - t0:.1f}s", flush=True)
        if run.returncode:
            print(run.stdout[-3000:], run.stderr[-3000:])
        cuda_ext._C, cuda_ext.IMPORT_ERROR = cuda_ext._load()
    return cuda_ext


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def make_layer(n: int, k: int, dtype: torch.dtype):
    from armor_kernels import sparse24

    w = torch.randn(n, k, device="cuda") / (k / 2) ** 0.5
    mask = sparse24.topk_mask(torch.rand(n, k, device="cuda"))
    w24 = (w * mask).to(dtype)
    values, meta = sparse24.compress(w24, mask)
    return w24, values, meta


def check_row(cuda_ext, name, n, k, tokens, dtype, bench, make_cslt) -> tuple[dict, bool]:
    from armor_kernels import reference
    from armor_kernels.backends import torch_sparse

    w24, values, meta = make_layer(n, k, dtype)
    core = cuda_ext.compress(values, meta)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    ref = reference.sparse24_matmul(x.float(), values.float(), meta)
    row = {"shape": name, "tokens": tokens}
    row["err_ext"] = rel_err(cuda_ext.sparse24_mm(x, core), ref)  # first call: plan + search
    row["err_expand"] = rel_err(cuda_ext.expanded_mm(x, values, meta), ref)
    device = x.device
    row["ext_ms"] = bench(lambda: cuda_ext.sparse24_mm(x, core), device)[0]
    row["expand_ms"] = bench(lambda: cuda_ext.expanded_mm(x, values, meta), device)[0]
    for label, search in (("cslt_searched_ms", True), ("cslt_default_ms", False)):
        try:
            fn, _, _ = make_cslt(w24, x, search=search)
            if search:
                row["err_cslt"] = rel_err(fn(), ref)
                backend = torch_sparse.TorchSparseBackend()  # the backend path: values/meta -> its own copy
                row["err_torch_sparse"] = rel_err(backend.sparse24_matmul(x, values, meta), ref)
            row[label] = bench(fn, device)[0]
        except Exception as e:  # noqa: BLE001 - a missing torch feature is a blank cell, not a failure
            row[label] = float("nan")
            row.setdefault("note", f"{label}: {type(e).__name__}: {e}"[:120])
    row["dense_ms"] = bench(lambda: F.linear(x, w24), device)[0]
    plan = next((p for p in cuda_ext.cached_plans() if (p["n"], p["k"], p["tokens"]) == (n, k, tokens)), {})
    row["plan"] = (
        f"alg {plan.get('alg_id')}/{plan.get('max_alg_id')} splitk {plan.get('split_k')}"
        + ("" if plan.get("searched") else " (not searched)")
        + (f" FALLBACK: {plan['fallback']}" if plan.get("fallback") else "")
    )
    errs = [row[c] for c in ("err_ext", "err_expand", "err_cslt", "err_torch_sparse") if c in row]
    return row, all(e <= TOLERANCE[dtype] for e in errs)


def _captured(fn, side) -> tuple:
    """``fn()`` captured into a CUDA graph on ``side`` after a warm-up there (as cuda_ext documents)."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # plan, search, workspace / scratch on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = fn()
    return graph, out


def check_epilogues(cuda_ext, dtype) -> list[str]:
    """Bias, per-row alpha, padding and CUDA-graph replay on one mid-size problem; returns the failures."""
    from armor_kernels import reference

    n, k, tokens = 4096, 4096, 256
    _, values, meta = make_layer(n, k, dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    core = cuda_ext.compress(values, meta, bias)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    scale = torch.rand(n, device="cuda") + 0.5
    base = reference.sparse24_matmul(x.float(), values.float(), meta)
    fails = []
    cases = {
        "core's bias (fused)": (cuda_ext.sparse24_mm(x, core, bias), base + bias.float()),
        "per-call bias": (cuda_ext.sparse24_mm(x, core, bias.clone()), base + bias.float()),
        "alpha vector": (cuda_ext.sparse24_mm(x, core, None, scale), base * scale),
        "odd tokens (padded)": (cuda_ext.sparse24_mm(x[:250], core), base[:250]),
        "expand + bias": (cuda_ext.expanded_mm(x, values, meta, bias), base + bias.float()),
    }
    side = torch.cuda.Stream()
    g1, captured = _captured(lambda: cuda_ext.sparse24_mm(x, core, bias), side)
    g2, captured_expand = _captured(lambda: cuda_ext.expanded_mm(x, values, meta, bias), side)
    x.copy_(torch.randn_like(x))
    g1.replay()
    g2.replay()
    torch.cuda.synchronize()
    want = reference.sparse24_matmul(x.float(), values.float(), meta) + bias.float()
    cases["cuda graph replay"] = (captured, want)
    cases["cuda graph replay (expand)"] = (captured_expand, want)
    for label, (out, ref) in cases.items():
        err = rel_err(out, ref)
        status = "ok" if err <= TOLERANCE[dtype] else "MISMATCH"
        print(f"  {label:<28} err {err:.2e}  {status}")
        if status != "ok":
            fails.append(f"{label}: {err:.2e}")
    return fails


COLS = ("shape", "tokens", "err_ext", "err_expand", "err_cslt", "err_torch_sparse", "ext_ms", "expand_ms",
        "cslt_searched_ms", "cslt_default_ms", "dense_ms")  # fmt: skip


def check_rows(cuda_ext, dname: str, args, bench, make_cslt) -> list[str]:
    """One printed row per (shape, tokens), token-major, until ``--budget-s``; returns the failures."""
    dtype = DTYPES[dname]
    fails = []
    print(f"\n{dname}: " + " | ".join(COLS) + " | ext/dense | plan", flush=True)
    # token-major: every shape at the most telling token counts before the rest
    cases = [(name, int(t)) for t in args.tokens.split(",") for name in args.shapes.split(",")]
    for name, tokens in cases:
        n, k = SHAPES[name]
        if time.perf_counter() - T0 > args.budget_s:
            print(f"{name} {tokens}: skipped (over --budget-s {args.budget_s:g})", flush=True)
            continue
        try:
            row, good = check_row(cuda_ext, name, n, k, tokens, dtype, bench, make_cslt)
        except Exception as e:  # noqa: BLE001 - report the row and go on
            print(f"{name} {tokens}: ERROR {type(e).__name__}: {e}", flush=True)
            fails.append(f"{name} {tokens}: {e}")
            continue
        if not good:
            fails.append(f"{name} {tokens} {dname}: errors over {TOLERANCE[dtype]:g}")
        cells = [f"{row.get(c, float('nan')):.3g}" if isinstance(row.get(c, 0.0), float) else str(row[c]) for c in COLS]
        speed = f"{row['dense_ms'] / row['ext_ms']:.2f}x (expand {row['dense_ms'] / row['expand_ms']:.2f}x)"
        extra = ("" if good else " | MISMATCH") + (f" | {row['note']}" if "note" in row else "")
        print(" | ".join(cells) + f" | {speed} | {row['plan']}" + extra, flush=True)
    return fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--skip-epilogues", action="store_true", help="only the rows")
    p.add_argument("--budget-s", type=float, default=20.0, help="skip rows after this many seconds")
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 2
    cuda_ext = ensure_extension(not args.no_build)
    ok, why = cuda_ext.available()
    if not ok:
        print(f"the CUDA extension is unavailable: {why}")
        return 2
    from benchmarks import common
    from benchmarks.bench_kernels import make_cslt

    def bench(fn, device):
        return common.bench(fn, device, rep_ms=25.0)

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | ext {cuda_ext.versions()}", flush=True)
    fails = []
    for dname in args.dtypes.split(","):
        fails += check_rows(cuda_ext, dname, args, bench, make_cslt)
        if args.skip_epilogues:
            continue
        print(f"\n{dname} epilogues:", flush=True)
        try:
            fails += check_epilogues(cuda_ext, DTYPES[dname])
        except Exception as e:  # noqa: BLE001
            fails.append(f"epilogues: {type(e).__name__}: {e}")
            print(f"  ERROR {type(e).__name__}: {e}")
    fallbacks = [p for p in cuda_ext.cached_plans() if p.get("fallback")]
    print(f"\n{len(cuda_ext.cached_plans())} plans cached ({len(fallbacks)} fell back to the default algorithm); "
          f"workspaces {cuda_ext.workspace_bytes() / 2**20:.1f} MiB; {time.perf_counter() - T0:.1f}s")  # fmt: skip
    if fails:
        print("MISMATCH: " + "; ".join(fails))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
