"""Shared test setup: offline hub, deterministic seeds, fresh backend choices per test."""

import os

import pytest
import torch

from tests.helpers import byte_tokenizer, make_text, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated: set it before any kernel module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_reset_dispatch():
    torch.manual_seed(0)
    from armor_kernels import dispatch

    dispatch.reset()
    yield
    dispatch.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- tiny models for the solver and the CLI ------------------------------------------------------------
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
