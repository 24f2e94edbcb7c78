"""``armor prune``: calibrate, prune every target linear, save an ARMOR checkpoint (resumable).

Options this command does not know (``--solver X``, ``--time-budget 60``,
``--flag``) are passed to the method in ``PruneConfig.extra`` as
``{"solver": "X", "time_budget": 60, "flag": True}``; the method's ``OPTIONS``
decide which it takes, and anything else is refused before any work.

The model is loaded and pruned in float32; the checkpoint is stored in the
source's dtype (``models.source_dtype``: config.json's dtype, the GGUF's float
type, bfloat16 for a quantized source) unless ``--dtype`` says otherwise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

from armor_kernels import WRAPPER_BUDGET
from armor_solver import methods as registry

from ._common import add_trust_remote_code, check_device, check_shard_size

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help='local HF directory, a .gguf file, or "smollm2-135m" (bundled)')
    parser.add_argument("--method", required=True, choices=list(registry.METHODS))
    parser.add_argument("--out", required=True, help="output checkpoint directory (resumes an unfinished run of the same command)")
    parser.add_argument("--iters", type=int, default=None, help="ARMOR iteration budget (default: the method's)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="preferred wrapper block size per side (largest valid divisor <= this is used); "
                             "default: per layer, the largest (at most 128) within --wrapper-budget")
    parser.add_argument("--wrapper-budget", type=float, default=WRAPPER_BUDGET,
                        help="without --block-size: the wrappers' share of each layer, b_out/d_in + b_in/d_out "
                             "(default 0.0625, the paper's 128-wide blocks on 4096-wide layers)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence")
    parser.add_argument("--device", default="cpu", help="where each block and the solver run (the model stays on CPU)")
    parser.add_argument("--text", default=None, help="calibration text file (default: the bundled Wikipedia corpus)")
    parser.add_argument("--targets", default=None, help="comma-separated projection names or module patterns (default: the model family's table)")
    parser.add_argument("--ignore", default="", help="comma-separated fnmatch patterns of module names never pruned")
    parser.add_argument("--propagation", choices=("dense", "sequential"), default=None,
                        help="statistics of the dense model, or through the already-pruned blocks (default: as the method was published)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype the checkpoint is stored in (default auto: the source's; pruning runs in float32)")
    parser.add_argument("--max-shard-size", default=None, help="e.g. 2GB (default: transformers' own, 50GB in transformers 5)")
    add_trust_remote_code(parser)
    parser.set_defaults(_accepts_unknown=True)
    parser.epilog = (
        "Other --name value options go to the method (PruneConfig.extra), e.g. for ARMOR: "
        "--solver exact|adam, --sweeps N, --time-budget SECONDS (per layer), --cg-steps N (exact), "
        "--lr, --seed (adam); for SparseGPT: --damp. Unknown options are refused. "
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


def save_dtype(args) -> tuple[str, str]:
    """(dtype name the checkpoint is stored in, why)."""
    from armor_solver import models

    if args.dtype != "auto":
        return args.dtype, "--dtype"
    dtype, why = models.source_dtype(args.model)
    return str(dtype).replace("torch.", ""), f"the source's: {why}"


def settings_from_args(args, dtype: str | None = None):
    """``PruneSettings`` of the command line, validated (method, its options, numbers) before any work.

    ``dtype``: the stored dtype (default: ``save_dtype(args)``).
    """
    from armor_solver import data
    from armor_solver.pipeline import PruneSettings

    return PruneSettings(
        model=args.model,
        method=args.method,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        block_size=args.block_size,
        wrapper_budget=args.wrapper_budget,
        iters=args.iters,
        text=args.text or data.WIKIPEDIA,
        targets=_split(args.targets) or None,
        ignore=_split(args.ignore),
        extra=parse_extra(getattr(args, "unknown", None) or []),
        propagation=args.propagation or "",
        dtype=dtype or save_dtype(args)[0],
    ).resolved()


def run(args) -> int:
    import torch

    from armor_runtime import sizes
    from armor_runtime.loading import load_model
    from armor_runtime.pruned import finisher
    from armor_solver import data, pipeline, resume

    t0 = time.time()
    check_device(args.device)
    shard_size = check_shard_size(args.max_shard_size)
    settings_from_args(args, dtype="float32")  # method, options and numbers first, before the model is read
    dtype, why = save_dtype(args)
    settings = settings_from_args(args, dtype)
    try:
        # held for the whole run: a different run, a foreign or locked --out is refused before anything is loaded
        with resume.claim_out_dir(args.out, asdict(settings)) as found:
            for line in found.recovered:
                print(f"armor prune: {line}", file=sys.stderr)
            if found.finished:
                print(f"{args.out} already holds the finished checkpoint of this run (same settings); nothing to do "
                      "(remove it to prune again)")
                return 0
            corpus = data.load_corpus(args.text)
            model, tokenizer, source = load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
            print(f"model {source} ({type(model).__name__}); method {settings.method} ({settings.propagation} "
                  f"statistics); calibration {settings.nsamples} x {settings.seqlen} tokens from {corpus.source}; "
                  f"computed in float32, stored in {dtype} ({why})", file=sys.stderr)
            reports = []
            result = pipeline.prune_model(model, tokenizer, settings, out_dir=args.out, device=args.device,
                                          calib=pipeline.Calibration(corpus=corpus),
                                          finish=finisher(model, tokenizer, reports, shard_size))
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished blocks are kept in {args.out}/{resume.PARTIAL}: "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    blocks = sorted({(v["block_out"], v["block_in"]) for v in result.layers.values()})
    print(f"pruned {len(result.layers)} layers with {settings.method} in {time.time() - t0:.0f} s; "
          f"mean proxy loss {result.mean_loss():.4f} (as stored in {settings.dtype}: "
          f"{result.mean_loss('proxy_loss_deployed'):.4f}); block sizes (out/in) {blocks}")
    print(reports[0].summary())
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    report = sizes.prune_report(args.out, args.model, model)
    print(report["text"])
    if report["larger_than_source"]:
        print(f"warning: {report['larger_than_source']}", file=sys.stderr)
    print(f"saved {args.out}")
    return 0
