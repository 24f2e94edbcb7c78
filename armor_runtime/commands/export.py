"""``armor export --dense DIR --out OUT``: a plain checkpoint with W_hat = A·S·B in every pruned layer.

OUT must be new or empty (``armor_solver.outputs``); the export keeps the checkpoint's dtype unless
``--dtype`` says otherwise.
"""

from __future__ import annotations

import sys

from ._common import DTYPES, add_trust_remote_code, check_shard_size, torch_dtype


def add_arguments(parser) -> None:
    parser.add_argument("--dense", required=True, metavar="DIR", help="ARMOR checkpoint to export")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: the checkpoint's dtype")
    parser.add_argument("--max-shard-size", default=None, help="e.g. 100MB (default: transformers' own, 50GB in transformers 5)")
    add_trust_remote_code(parser)


def run(args) -> int:
    from armor_runtime.checkpoint import DEFAULT_MAX_SHARD_SIZE, export_dense, is_armor_checkpoint, load_pretrained
    from armor_solver import outputs

    shard_size = check_shard_size(args.max_shard_size) or DEFAULT_MAX_SHARD_SIZE
    if not is_armor_checkpoint(args.dense):
        raise ValueError(f"--dense {args.dense}: not an ARMOR checkpoint (no config.json with quant_method 'armor')")
    with outputs.claim(args.out, sources=[args.dense]) as claimed:
        for line in claimed.recovered:
            print(f"armor export: {line}", file=sys.stderr)
        model = load_pretrained(args.dense, dtype=torch_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.dense, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError):
            tokenizer = None  # a checkpoint saved without its tokenizer
        dtype = str(model.dtype).replace("torch.", "")
        out = export_dense(model, args.out, tokenizer=tokenizer, max_shard_size=shard_size, may_replace=None)
    print(f"wrote a plain {dtype} checkpoint with W_hat materialized to {out}")
    return 0
