"""The 2:4 core through our compiled cuSPARSELt extension (``armor_kernels.cuda_ext``).

Runs ``sparse24_matmul`` for CUDA fp16/bf16 above the decode regime (more than
16 tokens), where cuSPARSELt's tensor-core GEMM pays off; decode is left to the
small-batch Triton kernel (cuSPARSELt pads few-token products). ``armor_linear``
is composed by ``dispatch`` from the wrappers and this core.

``prepare()`` compresses a layer into cuSPARSELt's layout once at load time and
caches it keyed by the ``values`` tensor (weakly: the buffer goes when the layer
does); a layer never prepared is compressed on its first call, and an in-place
change of ``values`` (its version counter moves) recompresses it.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .. import cuda_ext
from ..dispatch import DECODE_MAX_TOKENS
from .base import Backend


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference tensors have none: compressed once."""
    try:
        return t._version
    except RuntimeError:
        return -1


class CudaExtBackend(Backend):
    name = "cuda_ext"
    priority = 30  # above torch_sparse (20) and triton: same library, but searched plans and no per-call setup
    ops = ("sparse24_matmul",)

    def __init__(self):
        # values -> (values._version when compressed, CompressedCore)
        self._cores = WeakTensorKeyDictionary()

    def rank(self, device_type: str, regime: str) -> int:
        return 4 if regime == "decode" else self.priority

    def is_available(self) -> tuple[bool, str]:
        return cuda_ext.available()

    def can_implement(self, op: str, x: torch.Tensor, *weights) -> tuple[bool, str]:
        ok, why = super().can_implement(op, x, *weights)
        if not ok:
            return ok, why
        values, meta = weights[0], weights[1]
        if x.device.type != "cuda" or values.device != x.device:
            return False, f"x on {x.device}, values on {values.device}: the extension needs both on one CUDA device"
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 8:
            return False, f"GPU sm_{major}{minor}: 2:4 sparse tensor cores need sm_80 or newer"
        if x.dtype != values.dtype:
            return False, f"x is {x.dtype}, values {values.dtype}: one dtype expected"
        why = cuda_ext.check_core_shapes(values, meta)
        if why:
            return False, why
        tokens = x.numel() // max(x.shape[-1], 1)
        if tokens <= DECODE_MAX_TOKENS:
            return False, f"{tokens} tokens: cuSPARSELt pads few-token products; decode goes to the small-batch kernel"
        return True, ""

    def _core(self, values: torch.Tensor, meta: torch.Tensor) -> cuda_ext.CompressedCore:
        entry = self._cores.get(values)
        version = _version(values)
        if entry is None or entry[0] != version:
            entry = (version, cuda_ext.compress(values, meta))
            self._cores[values] = entry
        return entry[1]

    def prepare(self, a, values, meta, b, bias) -> None:
        if values.device.type == "cuda" and not cuda_ext.check_core_shapes(values, meta):
            self._core(values, meta)

    def sparse24_matmul(self, x, values, meta, bias=None):
        return cuda_ext.sparse24_mm(x, self._core(values, meta), bias)


BACKEND = CudaExtBackend()
