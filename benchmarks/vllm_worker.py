"""Runs inside vLLM's own environment (``benchmarks/vllm_env.py``), started by the serving tests and
by ``benchmarks/bench_vllm.py``; it prints its answer as one line ``ARMOR_RESULT {json}`` (vLLM's
processes log to the same stdout; ``vllm_env.result`` finds it).

    python vllm_worker.py generate MODEL --tp N --prompts '[[ids], ...]' --max-tokens K
        -> {"tokens": [[ids], ...]}                       greedy, fp32 by default
    python vllm_worker.py bench MODEL --tp N --prefill P --new-tokens K --dtype bfloat16
        -> {"prefill_tokens_per_s", "decode_tokens_per_s", "rss_bytes", "worker_rss_bytes", ...}

Bench timing: wall clock of ``LLM.generate`` (batch 1, prefix caching off), median of ``--reps``
after one warm-up of each shape. Prefill = P prompt tokens / the time of a 1-token generation;
decode = K / (time of K+1 tokens - time of 1 token) from an 8-token prompt. Resident memory: the
RSS of this process and of every process it started (the engine core and the workers).
"""

import argparse
import json
import statistics
import time


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("generate", "bench"))
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", help="generate: JSON list of token id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None, help="not used on CPU builds; vLLM picks its platform")
    return ap.parse_args()


def make_llm(args, max_len: int, **kwargs):
    from vllm import LLM

    return LLM(args.model, tensor_parallel_size=args.tp, dtype=args.dtype, max_model_len=max_len, seed=0,
               distributed_executor_backend="mp" if args.tp > 1 else None, **kwargs)


def generate(args) -> dict:
    from vllm import SamplingParams, TokensPrompt

    llm = make_llm(args, 256)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(args.prompts)], params)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs]}


def _rss() -> tuple[int, int]:
    import psutil

    me = psutil.Process()
    children = [p.memory_info().rss for p in me.children(recursive=True) if p.is_running()]
    return me.memory_info().rss + sum(children), max(children, default=0)


def bench(args) -> dict:
    from vllm import SamplingParams, TokensPrompt

    llm = make_llm(args, args.prefill + args.new_tokens + 16, enable_prefix_caching=False)
    vocab = llm.get_tokenizer().vocab_size
    long = TokensPrompt(prompt_token_ids=[(7 * i + 3) % vocab for i in range(args.prefill)])
    short = TokensPrompt(prompt_token_ids=[(11 * i + 5) % vocab for i in range(8)])
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=args.new_tokens + 1, ignore_eos=True)

    def timed(prompt, params) -> float:
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    for prompt, params in ((long, one), (short, one), (short, many)):
        timed(prompt, params)  # warm-up: compilation and first-shape costs
    prefill = statistics.median(timed(long, one) for _ in range(args.reps))
    first = statistics.median(timed(short, one) for _ in range(args.reps))
    full = statistics.median(timed(short, many) for _ in range(args.reps))
    rss, worker = _rss()
    return {
        "prefill_tokens_per_s": args.prefill / prefill, "prefill_s": prefill,
        "decode_tokens_per_s": args.new_tokens / (full - first), "decode_s": full - first,
        "rss_bytes": rss, "worker_rss_bytes": worker,
    }


def main() -> None:
    args = parse_args()
    result = generate(args) if args.mode == "generate" else bench(args)
    print("ARMOR_RESULT " + json.dumps(result), flush=True)  # vllm_env.RESULT_PREFIX (not importable here)


if __name__ == "__main__":  # the engine spawns processes
    main()
