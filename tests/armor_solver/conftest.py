"""Fixtures for the solver tests: a small deterministic text and tiny random causal LMs with a byte tokenizer."""

from __future__ import annotations

import random

import pytest
import torch

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


def tiny_model(family: str = "llama", hidden: int = 64, layers: int = 2, max_pos: int = 128, seed: int = 0):
    import transformers

    common = {
        "vocab_size": 260, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_pos, "tie_word_embeddings": False,
    }
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[family]
    if family in ("qwen3", "gemma3"):
        common["head_dim"] = hidden // 4
    if family in ("mistral", "gemma3"):
        common["sliding_window"] = 8  # shorter than the test sequences, so the masks differ per block
    if family == "gemma3":
        common["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    torch.manual_seed(seed)
    return model_cls(config_cls(**common)).eval()


@pytest.fixture(scope="session")
def solver_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def solver_tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def solver_model_dir(tmp_path_factory, solver_tokenizer):
    """A tiny random Llama saved as a local HF directory (model + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(path)
    solver_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def solver_make_model():
    """``solver_make_model(family="llama", ...)`` -> a fresh tiny random model (same seed: same weights)."""
    return tiny_model
