"""Which linear layers of each model family are pruned (data, not code).

Names are the last component of the module path; ``lm_head`` and embeddings are
never targets. ``ignore`` patterns (fnmatch on the full module name) win.
"""

from __future__ import annotations

import fnmatch

LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TARGETS: dict[str, tuple[str, ...]] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma3": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
}

NEVER = ("lm_head", "embed_tokens", "embed_out", "wte", "wpe")


def default_targets(model_type: str) -> tuple[str, ...]:
    if model_type not in TARGETS:
        raise ValueError(
            f"model_type {model_type!r} has no default target table (known: {sorted(TARGETS)}); "
            "pass targets explicitly"
        )
    return TARGETS[model_type]


def is_target(module_name: str, targets: tuple[str, ...] | list[str], ignore: tuple[str, ...] | list[str] = ()) -> bool:
    """True when ``module_name`` (e.g. ``model.layers.3.mlp.up_proj``) is to be pruned."""
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf in NEVER:
        return False
    if any(fnmatch.fnmatch(module_name, pat) for pat in ignore):
        return False
    return any(leaf == t or fnmatch.fnmatch(module_name, t) for t in targets)
