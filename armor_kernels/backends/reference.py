"""The pure-PyTorch backend: runs everywhere (last in every row of the selection table), the oracle."""

from __future__ import annotations

from .. import reference
from .base import OPS, Backend


class ReferenceBackend(Backend):
    name = "reference"
    ops = OPS

    blockdiag_matmul = staticmethod(reference.blockdiag_matmul)
    sparse24_matmul = staticmethod(reference.sparse24_matmul)
    armor_linear = staticmethod(reference.armor_linear)


BACKEND = ReferenceBackend()
