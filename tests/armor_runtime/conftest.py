"""Tiny random Llama / Qwen2 / Qwen3 models and random ARMOR factors for the runtime tests."""

import pytest
import torch
from torch import nn

from armor_kernels import ArmorWeights, block_pair, sparse24

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_config(family: str):
    import transformers

    common = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)  # q/k/v carry a bias
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    raise ValueError(family)


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
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype).eval()
    report = convert_model(model, armor_weights_for(model))
    return model, report


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def make_converted():
    """Factory fixture: ``make_converted(family, dtype=torch.float32) -> (model, report)``."""
    return build_converted


@pytest.fixture
def make_armor_weights():
    """Factory fixture: ``make_armor_weights(linear, preferred=32) -> ArmorWeights``."""
    return random_armor_weights


@pytest.fixture
def make_tiny_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared, loaded machine 2 threads run ~40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A converted tiny Llama saved as a sharded ARMOR checkpoint (one per test module; copy before editing)."""
    from armor_runtime.checkpoint import save_pretrained

    model, _ = build_converted("llama")
    return save_pretrained(model, tmp_path_factory.mktemp("good") / "ckpt", max_shard_size=40_000)
