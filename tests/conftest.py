"""Shared test setup: offline hub, deterministic seeds, fresh backend choices per test."""

import os

import pytest
import torch

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
