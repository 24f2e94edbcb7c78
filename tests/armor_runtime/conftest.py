"""Fixtures of the runtime tests: converted tiny Llama / Qwen2 / Qwen3 models and random ARMOR factors."""

import pytest
import torch

from tests.helpers import build_converted, random_armor_weights, runtime_config


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
    return runtime_config


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
