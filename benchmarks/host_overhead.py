"""Host (Python) cost of one eager ``decode_layer`` call, with the kernel launches replaced by no-ops.

    python -m benchmarks.host_overhead                  # 4096x4096, b = 128, bf16, tokens 1 and 16
    python -m benchmarks.host_overhead --profile        # also the functions it spends the time in

What is timed: argument checks, output allocation, plan and workspace look-ups and the
argument tuples of both launches, on CPU tensors (no GPU needed). What is not: Triton's
own launcher (``kernel[grid](...)``: binding, specialisation key, driver call), which needs
a GPU and adds its own cost; under CUDA-graph replay neither runs. Timer: best of
``--repeat`` runs of ``--number`` calls (the minimum is the figure least disturbed by
other work on a shared machine), with the median printed beside it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch


def _layer(d_out, d_in, b, dtype):
    from armor_kernels.formats import block_pair

    bo, bi = block_pair(d_out, d_in, b)
    a = torch.randn(d_out // bo, bo, bo).to(dtype)
    bb = torch.randn(d_in // bi, bi, bi).to(dtype)
    values = torch.randn(d_out, d_in // 2).to(dtype)
    meta = torch.zeros(d_out, (d_in // 4 + 1) // 2, dtype=torch.uint8)
    return a, values, meta, bb


def measure(tb, tokens, d_out, d_in, b, dtype, number, repeat) -> tuple[float, float]:
    a, values, meta, bb = _layer(d_out, d_in, b, dtype)
    x = torch.randn(tokens, d_in).to(dtype)
    tb.decode_layer(x, a, values, meta, bb)  # plans and workspaces, as the warm-up call before capture
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            tb.decode_layer(x, a, values, meta, bb)
        runs.append((time.perf_counter() - t0) / number)
    return min(runs), statistics.median(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096x4096", help="d_out x d_in")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("host_overhead: unset TRITON_INTERPRET (the launch plans differ under the interpreter)")
    from armor_kernels.backends import triton as tb

    if tb.IMPORT_ERROR:
        raise SystemExit(f"host_overhead: triton unavailable: {tb.IMPORT_ERROR}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    d_out, d_in = (int(v) for v in args.shape.lower().split("x"))
    launches = []
    tb._launch = lambda kernel, grid, a, kw: launches.append(kernel)  # no-op launch (counted)
    torch.set_num_threads(1)
    for tok in (int(t) for t in args.tokens.split(",")):
        best, med = measure(tb, tok, d_out, d_in, args.block, dtype, args.number, args.repeat)
        per_call = len(launches) // (1 + args.number * args.repeat)
        launches.clear()
        print(f"decode_layer {d_out}x{d_in} b={args.block} {args.dtype} tokens={tok}: "
              f"{best * 1e6:.1f} µs per call (best of {args.repeat}; median {med * 1e6:.1f} µs), "
              f"{per_call} launches, no-op")  # fmt: skip
        if args.profile:
            a, values, meta, bb = _layer(d_out, d_in, args.block, dtype)
            x = torch.randn(tok, d_in).to(dtype)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.number):
                tb.decode_layer(x, a, values, meta, bb)
            pr.disable()
            pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
