"""The ``armor`` command. Subcommands live in ``armor_runtime.commands.<name>`` and load lazily.

Every failure a subcommand raises becomes one ``armor <cmd>: error: ...`` line on stderr and exit code 2
(1 for an error of an unexpected kind, which the line names); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# the failures users cause (bad paths, files, options, devices, full or read-only disks): exit code 2
EXPECTED = (OSError, ValueError, RuntimeError, ImportError, MemoryError)

# name -> (module, one-line help)
COMMANDS = {
    "prune": ("armor_runtime.commands.prune", "prune a model to ARMOR (or a baseline) and save a checkpoint"),
    "eval": ("armor_runtime.commands.eval", "perplexity of a dense or pruned model on held-out text"),
    "generate": ("armor_runtime.commands.generate", "generate text from a checkpoint, with tokens/s"),
    "export": ("armor_runtime.commands.export", "write a plain dense checkpoint with W_hat materialized"),
    "env": ("armor_runtime.commands.env", "versions, available backends and which one each regime uses"),
    "bench": ("armor_runtime.commands.bench", "run the kernel or end-to-end benchmarks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armor", description="ARMOR 2:4 sparse LLMs: prune, run, measure.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name != "bench":  # bench passes everything after its name to the benchmark script
            p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=f"armor {name} is not available in this installation ({module} missing)")
    return parser


def error_line(command: str, e: BaseException) -> str:
    """One line: ``armor <cmd>: error: <message>`` (multi-line messages are joined)."""
    message = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, EXPECTED):
        message = f"{type(e).__name__}: {message} (unexpected; rerun with --debug for the traceback)"
    return f"armor {command}: error: {message}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # a subcommand that sets _accepts_unknown (prune: method options) receives them as args.unknown
        if not getattr(args, "_accepts_unknown", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.unknown = unknown
    if getattr(args, "_missing", None):
        print(f"armor {args.command}: error: {args._missing}", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"\narmor {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 2 if isinstance(e, EXPECTED) else 1


if __name__ == "__main__":
    sys.exit(main())
