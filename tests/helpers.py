"""Factories shared by the tests: packed layers, tiny models and their text, uncalibrated pruned weights."""

from __future__ import annotations

import random

import torch
from torch import nn

from armor_kernels import ArmorWeights, block_pair, sparse24


def random_layer_weights(d_out: int, d_in: int, block_out: int, block_in: int, dtype=torch.float32, bias: bool = True,
                         scaled: bool = False, near_identity: float | None = None, gen: torch.Generator | None = None
                         ) -> ArmorWeights:
    """Random wrappers around a random 2:4 core (the top-2 magnitudes of each group of 4), from ``gen`` or the
    global generator. ``scaled``: wrapper entries / sqrt(block) (outputs of unit scale); ``near_identity=eps``:
    wrappers ``I + eps·randn`` instead."""

    def blocks(n: int, b: int) -> torch.Tensor:
        r = torch.randn(n, b, b, generator=gen)
        if near_identity is not None:
            return torch.eye(b) + near_identity * r
        return r / b**0.5 if scaled else r

    a = blocks(d_out // block_out, block_out)
    core = torch.randn(d_out, d_in, generator=gen)
    b = blocks(d_in // block_in, block_in)
    mask = sparse24.topk_mask(core.abs())
    bias_t = torch.randn(d_out, generator=gen) if bias else None
    return ArmorWeights.from_factors(a, core * mask, b, bias=bias_t, mask=mask, dtype=dtype)


def nowag_p_weights(model: nn.Module, targets, block: int = 128) -> dict[str, ArmorWeights]:
    """Uncalibrated NoWag-P (``h = 1``) for every target linear, with identity wrappers of ``block``."""
    from armor_solver.methods.normalize import normalize
    from armor_solver.methods.nowag_p import nowag_mask
    from armor_solver.targets import is_target

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not is_target(name, targets):
            continue
        w = m.weight.detach()
        mask = nowag_mask(normalize(w)[0], torch.ones(w.shape[1]))
        bo, bi = block_pair(w.shape[0], w.shape[1], block)
        bias = None if m.bias is None else m.bias.detach()
        out[name] = ArmorWeights.from_dense(w * mask, bo, bi, bias=bias, mask=mask)
    return out


# ---- tiny models, tokenizer and text (no download) ----------------------------------------------------
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from", "his", "her", "that", "which", "were", "are", "city", "river", "music", "film", "century", "war", "king", "state", "north", "south", "team", "church", "school", "water", "light", "stone", "island", "language", "people", "history"]


def make_text(n_paragraphs: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    paras = []
    for _ in range(n_paragraphs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(5)]
        paras.append(" ".join(sentences))
    return "\n\n".join(paras)


def byte_tokenizer():
    """One token per byte (256) plus <eos>: works on any text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_config(family: str = "llama", hidden: int = 64, layers: int = 2, max_pos: int = 128, vocab: int = 260,
                intermediate: int | None = None):
    """A tiny random config of ``family`` (4 heads, 2 KV heads): llama, qwen2 (q/k/v biases), qwen3, mistral, gemma3."""
    import transformers

    common = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate or 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": max_pos, "tie_word_embeddings": False,
    }
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "mistral": transformers.MistralConfig, "gemma3": transformers.Gemma3TextConfig}[family]
    if family in ("qwen3", "gemma3"):
        common["head_dim"] = hidden // 4
    if family in ("mistral", "gemma3"):
        common["sliding_window"] = 8  # shorter than the test sequences, so the masks differ per block
    if family == "gemma3":
        common["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    return config_cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, **config):
    """A fresh tiny random causal LM (same seed: same weights), eval mode; ``config``: see ``tiny_config``."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, **config)).eval()


# ---- converted tiny models (runtime) --------------------------------------------------------------------
FAMILIES = ("llama", "qwen2", "qwen3")


def runtime_config(family: str):
    """The runtime tests' tiny config: 96-wide MLP, so down_proj's blocks differ from the others."""
    return tiny_config(family, vocab=128, intermediate=96, max_pos=64)


def random_armor_weights(linear: nn.Linear, preferred: int = 32, gen: torch.Generator | None = None) -> ArmorWeights:
    """Random near-identity wrappers around the 2:4 top-2 core of the layer's weight (fp32 factors, layer dtype)."""
    w = linear.weight.detach().float()
    d_out, d_in = w.shape
    bo, bi = block_pair(d_out, d_in, preferred)
    a = torch.eye(bo) + 0.1 * torch.randn(d_out // bo, bo, bo, generator=gen)
    b = torch.eye(bi) + 0.1 * torch.randn(d_in // bi, bi, bi, generator=gen)
    mask = sparse24.topk_mask(w.abs())
    bias = None if linear.bias is None else linear.bias.detach() + 0.01
    return ArmorWeights.from_factors(a, w * mask, b, bias=bias, mask=mask, dtype=linear.weight.dtype)


def armor_weights_for(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Random ARMOR weights for every target linear; down_proj uses 16-wide blocks so sizes differ per layer."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out[name] = random_armor_weights(m, 16 if name.endswith("down_proj") else 32, gen)
    return out


def build_converted(family: str, dtype=torch.float32):
    """(model converted to ARMOR, report); seeded, eval mode."""
    import transformers

    from armor_runtime.convert import convert_model

    torch.manual_seed(0)
    # dtype= at build time keeps the rotary inv_freq in fp32, as from_pretrained does (.to(dtype) would round it)
    model = transformers.AutoModelForCausalLM.from_config(runtime_config(family), dtype=dtype).eval()
    report = convert_model(model, armor_weights_for(model))
    return model, report
