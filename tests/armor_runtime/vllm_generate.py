"""Greedy generation through ``vllm.LLM``, run by the serving tests in vLLM's own environment.

``python vllm_generate.py MODEL --tp N --prompts '[[ids], ...]' --max-tokens K`` prints one JSON
line ``{"tokens": [[ids], ...]}`` (the generated ids per prompt) as its last line of output.
"""

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--prompts", required=True, help="JSON list of token id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(args.model, tensor_parallel_size=args.tp, dtype=args.dtype, max_model_len=256, seed=0,
              distributed_executor_backend="mp" if args.tp > 1 else None)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(args.prompts)], params)
    print(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs]}))


if __name__ == "__main__":  # the engine spawns processes
    main()
