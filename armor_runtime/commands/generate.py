"""``armor generate``: text from a checkpoint (ARMOR or dense), greedy or sampled, with tokens/s."""

from __future__ import annotations

import time

from ._common import add_model_arguments, check_device, torch_dtype


def add_arguments(parser) -> None:
    add_model_arguments(parser, 'checkpoint directory (ARMOR or plain Hugging Face), .gguf file or "smollm2-135m"',
                        "auto: the checkpoint's dtype")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")


def run(args) -> int:
    import torch

    from armor_runtime.loading import load_model

    check_device(args.device)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_model(args.model, dtype=torch_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
    model = model.to(args.device).eval()
    prompt = args.prompt
    if args.chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt").to(args.device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sampling)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    print(tokenizer.decode(new, skip_special_tokens=True))
    n = int(new.numel())
    print(f"\n[{n} new tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s on {args.device}, "
          f"{'sampled' if args.do_sample else 'greedy'}, prompt {inputs['input_ids'].shape[1]} tokens]")
    return 0
