"""Peak memory of an ARMOR solver on one matrix, as a multiple of its fp32 size.

Each run is a fresh subprocess (1 torch thread) that builds a random ``d_out x d_in``
fp32 weight and ``h = exp(randn)`` (``fullcov``: full statistics of correlated random
inputs, built before the measurement), then prunes it with the exact solver (or
``--solver``) at block 128 (or ``--block``) for ``--sweeps`` sweeps. Peak RSS growth is the high-water mark (``VmHWM``) after the
prune minus the one just before it (after a small warm-up prune, so
code pages and thread pools do not count); ``MALLOC_MMAP_THRESHOLD_=131072`` makes
glibc return freed large blocks to the OS, so the peak is the true high-water mark.

Each run also times the prune once more with glibc's default malloc (the wall time
that matters: unmapping every freed block costs page faults).

    python3 -m benchmarks.solver_memory                      # 2048x2048, 3 sweeps, 2 runs
    python3 -m benchmarks.solver_memory --shape 512 1024 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from armor_solver.methods import armor
from armor_solver.methods.base import PruneConfig
from armor_solver.stats import LayerStats


def high_water_kib():
    # VmHWM belongs to this process's own memory map; ru_maxrss also carries the parent's peak
    # from the fork (a parent holding a model made every growth read 0)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

d_out, d_in, sweeps = (int(v) for v in sys.argv[1:4])
solver, block = sys.argv[4], int(sys.argv[5])
full = solver == "fullcov"
# warm-up on a small matrix: loads the kernels' code pages and thread pools, which
# would otherwise count as growth (about 10-20 MiB, independent of the matrix)
warm = LayerStats.empty(512, full=full)
warm.add(torch.randn(1024, 512))
armor.prune(torch.randn(256, 512), warm, PruneConfig(block_size=128, extra={"solver": solver, "sweeps": 3}))
g = torch.Generator().manual_seed(0)
w = torch.randn(d_out, d_in, generator=g)
if full:  # correlated inputs; the statistics exist before the prune (the pipeline holds them too)
    stats, mix = LayerStats.empty(d_in, full=True), torch.randn(d_in, d_in, generator=g)
    for _ in range(8):  # small batches: their temporaries must not raise the high-water mark before the prune
        stats.add(torch.randn(256, d_in, generator=g) @ mix)
    del mix
else:
    stats = LayerStats(h=torch.exp(torch.randn(d_in, generator=g)), n_tokens=1)
cfg = PruneConfig(block_size=block or None, iters=None, device="cpu", extra={"solver": solver, "sweeps": sweeps})
before = high_water_kib()
t0 = time.perf_counter()
res = armor.prune(w, stats, cfg)
sec = time.perf_counter() - t0
after = high_water_kib()
print(json.dumps({"peak_growth_bytes": (after - before) * 1024, "matrix_bytes": w.numel() * 4,
                  "seconds": sec, "loss": res.info["proxy_loss"], "losses": res.info["losses"]}))
"""


def measure(d_out: int, d_in: int, sweeps: int, return_freed: bool = True, solver: str = "exact",
            block: int = 128) -> dict:
    """One fresh-process measurement: peak RSS growth (bytes and multiple), seconds, losses.

    ``return_freed=False`` keeps glibc's default malloc (freed blocks are reused, not
    unmapped): the realistic setting for the wall time, not for the peak.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if return_freed:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-c", CHILD, str(d_out), str(d_in), str(sweeps), solver, str(block)],
                         env=env, capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["multiple"] = rec["peak_growth_bytes"] / rec["matrix_bytes"]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(2048, 2048), metavar=("D_OUT", "D_IN"))
    ap.add_argument("--sweeps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--solver", default="exact", choices=("exact", "fullcov"))
    ap.add_argument("--block", type=int, default=128, help="preferred block size (0: the wrapper-budget rule)")
    args = ap.parse_args(argv)
    for i in range(args.runs):
        r = measure(*args.shape, args.sweeps, solver=args.solver, block=args.block)
        print(f"run {i + 1}: {args.shape[0]}x{args.shape[1]}, {args.sweeps} sweeps: peak RSS growth "
              f"{r['peak_growth_bytes'] / 2**20:.1f} MiB = {r['multiple']:.2f}x the fp32 matrix, "
              f"{r['seconds']:.2f} s, loss {r['loss']:.9g}, losses {r['losses']}")
        r = measure(*args.shape, args.sweeps, return_freed=False, solver=args.solver, block=args.block)
        print(f"       default malloc: {r['seconds']:.2f} s, loss {r['loss']:.9g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
