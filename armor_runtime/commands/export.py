"""``armor export --dense DIR --out OUT``: a plain checkpoint with W_hat = A·S·B in every pruned layer."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--dense", required=True, metavar="DIR", help="ARMOR checkpoint to export")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--max-shard-size", default=None, help="e.g. 100MB (default: the checkpoint module's)")


def run(args) -> int:
    from armor_runtime.checkpoint import DEFAULT_MAX_SHARD_SIZE, export_dense, is_armor_checkpoint, load_pretrained
    from armor_runtime.commands.generate import torch_dtype

    if not is_armor_checkpoint(args.dense):
        print(f"armor export: {args.dense} is not an ARMOR checkpoint (config.json has no quant_method 'armor')")
        return 2
    model = load_pretrained(args.dense, dtype=torch_dtype(args.dtype))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.dense)
    except (OSError, ValueError):
        tokenizer = None  # a checkpoint saved without its tokenizer
    out = export_dense(model, args.out, tokenizer=tokenizer, max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    print(f"wrote a plain checkpoint with W_hat materialized to {out}")
    return 0
