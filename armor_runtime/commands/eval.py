"""``armor eval``: perplexity on the held-out split (never seen by calibration); optional lm-eval tasks."""

from __future__ import annotations

import json
import sys

from ._common import add_model_arguments, check_device, torch_dtype


def add_arguments(parser) -> None:
    add_model_arguments(parser, 'dense HF directory, ARMOR checkpoint, .gguf file or "smollm2-135m"',
                        "auto: the stored dtype (a quantized GGUF: bfloat16)")
    parser.add_argument("--text", default=None, help="text file whose last 10%% is scored (default: bundled Wikipedia held-out split)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--windows", type=int, default=32, help="number of non-overlapping windows")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks (needs lm_eval installed)")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    parser.add_argument("--tasks-path", default=None,
                        help="lm-eval: a folder of task YAMLs of your own (e.g. a task over a local JSON file)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from armor_runtime.loading import load_model
    from armor_solver import data, evaluate, models

    check_device(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
    corpus = data.load_corpus(args.text)
    model, tokenizer, source = load_model(args.model, dtype=torch_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
    limit = models.max_positions(model)
    if limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings = {limit}")
    windows = data.evaluation_ids(tokenizer, corpus, args.windows, args.seqlen)
    model.to(args.device)
    result = evaluate.perplexity(model, windows, batch_size=args.batch_size, device=args.device)
    result.update(model=source, text=corpus.source, dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    if args.tasks:
        if not evaluate.lm_eval_available():
            print("lm_eval is not installed: skipping --tasks", file=sys.stderr)
        else:
            result["lm_eval"] = evaluate.run_lm_eval(model, tokenizer, args.tasks.split(","), limit=args.limit,
                                                     include_path=args.tasks_path)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(f"perplexity {result['ppl']:.3f} on {result['windows']} windows x {result['seqlen']} tokens "
              f"of the held-out split of {result['text']} ({result['seconds']:.1f} s, {result['dtype']}) — {source}")
    return 0
