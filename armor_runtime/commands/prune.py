"""``armor prune``: calibrate, prune every target linear, save an ARMOR checkpoint (resumable).

Options this command does not know (``--solver X``, ``--time-budget 60``,
``--flag``) are passed to the method in ``PruneConfig.extra`` as
``{"solver": "X", "time_budget": 60, "flag": True}``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

from armor_solver import methods as registry

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help='local HF directory, a .gguf file, or "smollm2-135m" (bundled)')
    parser.add_argument("--method", required=True, choices=list(registry.METHODS))
    parser.add_argument("--out", required=True, help="output checkpoint directory (resumes an unfinished run of the same command)")
    parser.add_argument("--iters", type=int, default=None, help="ARMOR iteration budget (default: the method's)")
    parser.add_argument("--block-size", type=int, default=128, help="preferred wrapper block size per side (largest valid divisor <= this is used)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence")
    parser.add_argument("--device", default="cpu", help="where each block and the solver run (the model stays on CPU)")
    parser.add_argument("--text", default=None, help="calibration text file (default: the bundled Wikipedia corpus)")
    parser.add_argument("--targets", default=None, help="comma-separated projection names or module patterns (default: the model family's table)")
    parser.add_argument("--ignore", default="", help="comma-separated fnmatch patterns of module names never pruned")
    parser.add_argument("--propagation", choices=("dense", "sequential"), default=None,
                        help="statistics of the dense model, or through the already-pruned blocks (default: as the method was published)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the model is loaded and saved in")
    parser.set_defaults(_accepts_unknown=True)
    parser.epilog = (
        "Other --name value options go to the method (PruneConfig.extra), e.g. for ARMOR: "
        "--solver exact|adam, --sweeps N, --time-budget SECONDS (per layer), --cg-steps N, --lr, --seed. "
        "Rerunning the same command after a crash or Ctrl-C resumes after the last finished block."
    )


def _coerce(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def parse_extra(tokens: list[str]) -> dict:
    """``["--time-budget", "60", "--flag", "--solver=adam"]`` -> ``{"time_budget": 60, "flag": True, "solver": "adam"}``."""
    extra, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ValueError(f"unexpected argument {tok!r} (method options look like --name value)")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            extra[key] = _coerce(value)
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            extra[key] = _coerce(tokens[i + 1])
            i += 1
        else:
            extra[key] = True
        i += 1
    return extra


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def settings_from_args(args):
    from armor_solver.pipeline import PruneSettings

    return PruneSettings(
        model=args.model,
        method=args.method,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        block_size=args.block_size,
        iters=args.iters,
        text=args.text or "wikipedia (bundled)",
        targets=_split(args.targets) or None,
        ignore=_split(args.ignore),
        extra=parse_extra(getattr(args, "unknown", None) or []),
        propagation=args.propagation or "",
    ).resolved()


def run(args) -> int:
    import torch

    from armor_solver import data, models, pipeline

    t0 = time.time()
    try:
        settings = settings_from_args(args)
        # refuse a different run in --out before loading anything
        pipeline.check_out_dir(args.out, asdict(settings))
        corpus = data.load_corpus(args.text)
        model, tokenizer, source = models.load_model(args.model, dtype=getattr(torch, args.dtype))
        print(f"model {source} ({type(model).__name__}); method {settings.method} ({settings.propagation} statistics); "
              f"calibration {settings.nsamples} x {settings.seqlen} tokens from {corpus.source}", file=sys.stderr)
        result = pipeline.prune_model(model, tokenizer, settings, out_dir=args.out, device=args.device, corpus=corpus)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished blocks are kept in {args.out}/{pipeline.PARTIAL}: "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as e:
        print(f"armor prune: error: {e}", file=sys.stderr)
        return 2
    sizes = sorted({(v["block_out"], v["block_in"]) for v in result.layers.values()})
    print(f"pruned {len(result.layers)} layers with {settings.method} in {time.time() - t0:.0f} s; "
          f"mean proxy loss {result.mean_loss():.4f}; block sizes (out/in) {sizes}")
    print(result.conversion.summary() if result.conversion is not None else "")
    print(f"saved {args.out}")
    return 0
