"""``armor bench kernels|e2e [--smoke] ...``: run a benchmark of the source checkout.

The benchmarks are not part of the installed package (they live in ``benchmarks/`` of
the source tree, next to ``armor_runtime/``), and the package never imports them: this
command runs ``python -m benchmarks.bench_<name>`` as its own process, with the checkout
first on that process's ``PYTHONPATH``, in the current folder (so relative ``--out``
paths stay the caller's). Without a checkout it says so and exits 2. Everything after
the benchmark name is passed on unchanged (``armor bench kernels --help`` lists the options).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = {"kernels": "benchmarks.bench_kernels", "e2e": "benchmarks.bench_e2e"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=sorted(SCRIPTS), help="kernels: one-layer microbenchmarks; e2e: whole models")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="options of the benchmark script")
    parser.set_defaults(_accepts_unknown=True)


def checkout() -> Path | None:
    """The source checkout holding this ``armor_runtime`` and a ``benchmarks/`` folder, if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "common.py").is_file() else None


def run(args) -> int:
    argv = list(args.script_args) + list(getattr(args, "unknown", []) or [])
    module = SCRIPTS[args.which]
    root = checkout()
    if root is None:
        print(
            f"armor bench: the benchmarks ship with the source tree, not the installed package; from a "
            f"checkout run `python -m {module}` (or `pip install -e .` there and use `armor bench`)",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", module, *argv], env=env, check=False).returncode
