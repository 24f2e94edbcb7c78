"""What a kernel launch costs on this GPU, and what the decode layer's 2 launches cost in practice.

    python -m benchmarks.launch_cost --out launch.csv          # needs a CUDA GPU with Triton

The static decode model (benchmarks/kernel_static.py) assumes 1 µs per launch; at 4096x4096 and
1 token the 1.4x-over-dense target needs <= 0.34 µs per launch. This replaces the assumption
with measurements, each the median over CUDA-graph replays (triton.testing.do_bench_cudagraph):

- ``empty_chain``: a graph of N launches of an empty Triton kernel, divided by N: the per-launch
  cost a captured decoder step pays (no host work), and the same eager (host launch included);
- ``decode_layer``: ARMOR's 2-launch decode layer (B-wrapper, then the 2:4 core with A fused) at
  4096x4096, bf16, 1 token, with programmatic dependent launch off and on (``ARMOR_TRITON_PDL``),
  beside dense ``F.linear`` on the same shape. PDL is read when a layer is first planned, so
  each setting runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from benchmarks import common

COLUMNS = common.ENV_COLUMNS + ["what", "mode", "launches", "us_per_call", "us_per_launch", "status", "reason"]
CHAIN = 64  # launches per timed graph: the per-launch figure is the graph's time / CHAIN


def _empty_chain(env: dict) -> list[dict]:
    import triton
    import triton.language as tl
    import triton.testing as tt

    @triton.jit
    def empty(x_ptr, n: tl.constexpr):
        pass

    x = torch.empty(1, device="cuda")

    def chain():
        for _ in range(CHAIN):
            empty[(1,)](x, 1)

    chain()
    torch.cuda.synchronize()
    rows = []
    for mode, bench in (("cuda_graph", tt.do_bench_cudagraph), ("eager", tt.do_bench)):
        us = float(bench(chain, rep=50, return_mode="median")) * 1e3
        rows.append(dict(env, what="empty_chain", mode=mode, launches=CHAIN, us_per_call=us, us_per_launch=us / CHAIN))
    return rows


def _decode(env: dict, pdl: bool) -> list[dict]:
    import triton.testing as tt

    from armor_kernels.backends import triton as tb

    w = common.random_armor_weights(4096, 4096, 128, torch.bfloat16, "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    dense = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    cases = [(f"decode_layer pdl={int(pdl)}", 2, lambda: tb.decode_layer(x, w.a, w.values, w.meta, w.b, out=out))]
    if not pdl:
        cases.append(("dense F.linear", 1, lambda: torch.nn.functional.linear(x, dense)))
    rows = []
    for what, launches, fn in cases:
        fn()
        torch.cuda.synchronize()
        us = float(tt.do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3
        rows.append(dict(env, what=what, mode="cuda_graph", launches=launches, us_per_call=us,
                         us_per_launch=us / launches))  # fmt: skip
    return rows


def _worker(which: str) -> None:
    env = common.env_info("cuda")
    rows = _empty_chain(env) if which == "empty" else _decode(env, pdl=which == "pdl")
    print(json.dumps([{k: r.get(k) for k in COLUMNS} for r in rows]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="launch.csv")
    ap.add_argument("--worker", choices=["empty", "nopdl", "pdl"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if not torch.cuda.is_available():
        print("launch_cost: needs a CUDA GPU; this machine has none", file=sys.stderr)
        return 2
    out = common.CsvOut(args.out, COLUMNS)
    for which in ("empty", "nopdl", "pdl"):
        env = dict(os.environ, ARMOR_TRITON_PDL="1" if which == "pdl" else "0")
        run = subprocess.run([sys.executable, "-m", "benchmarks.launch_cost", "--worker", which],
                             capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip
        if run.returncode != 0:
            out.write({"what": which, "status": "failed", "reason": run.stderr.strip()[-300:]})
            print(f"{which}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        for row in json.loads(run.stdout.strip().splitlines()[-1]):
            out.write(dict(row, status="ok"))
            print(f"{row['what']:<22} {row['mode']:<10} {row['us_per_call']:9.2f} µs per call, "
                  f"{row['us_per_launch']:7.2f} µs per launch")  # fmt: skip
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
