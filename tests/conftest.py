"""Shared test setup: offline hub, deterministic seeds, fresh backend choices per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import; no GPU in CI

import pytest
import torch


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
