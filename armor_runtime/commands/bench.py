"""``armor bench kernels|e2e [--smoke] ...``: run a benchmark script of the source tree.

Everything after the benchmark name is passed to ``benchmarks/bench_<name>.py``
unchanged (``armor bench kernels --help`` lists its options). The scripts live in
the source checkout, not in the installed package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

SCRIPTS = {"kernels": "benchmarks.bench_kernels", "e2e": "benchmarks.bench_e2e"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=sorted(SCRIPTS), help="kernels: one-layer microbenchmarks; e2e: whole models")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="options of the benchmark script")
    parser.set_defaults(_accepts_unknown=True)


def _import_script(module: str):
    root = Path(__file__).resolve().parents[2]  # the checkout holding armor_runtime/ and benchmarks/
    if not (root / "benchmarks" / "common.py").is_file():
        raise FileNotFoundError(
            f"benchmarks/ not found next to armor_runtime/ ({root}); the benchmark scripts ship with the "
            "source tree: install with `pip install -e .` from a checkout or run `python -m benchmarks...` there"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


def run(args) -> int:
    argv = list(args.script_args) + list(getattr(args, "unknown", []) or [])
    try:
        script = _import_script(SCRIPTS[args.which])
    except FileNotFoundError as e:
        print(f"armor bench: {e}", file=sys.stderr)
        return 2
    return int(script.main(argv) or 0)
