"""Quality measures: perplexity on held-out windows, and an optional lm-evaluation-harness bridge."""

from __future__ import annotations

import importlib.util
import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device=None) -> dict:
    """exp(mean next-token NLL) over ``windows`` ``[n, seqlen]`` (each window scored independently,
    ``seqlen - 1`` predicted tokens per window)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows: expected [n, seqlen >= 2] token ids, got shape {tuple(windows.shape)}")
    device = device or model.get_input_embeddings().weight.device
    t0 = time.time()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "tokens": total_tokens,
        "seconds": time.time() - t0,
    }


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1,
                include_path: str | None = None) -> dict:
    """Run lm-evaluation-harness ``tasks`` on an in-memory (pruned) model; {task: metrics}.

    ``include_path``: a folder of task YAMLs of one's own (lm-eval's ``--include_path``), e.g. a
    task over a local JSON file. Needs the optional ``lm_eval`` package (the ``eval`` extra);
    raises ``RuntimeError`` naming it when absent.
    """
    if not lm_eval_available():
        raise RuntimeError("lm-evaluation-harness is not installed (pip install lm_eval); perplexity still works")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else None
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)
    return out["results"]
