"""The 2:4 core through our compiled extension (``armor_kernels.cuda_ext``), above the decode regime.

``sparse24_matmul`` for CUDA fp16/bf16 with more than 16 tokens (decode goes to the
small-batch Triton kernel: cuSPARSELt pads few-token products). ``armor_linear`` is
composed by ``dispatch`` from the wrappers and this core. Two ways to run it:

- default, one copy of the core: our kernel expands ``values``/``meta`` into a dense
  scratch (one per device, stream and dtype, shared by all layers, as large as the
  largest layer seen: 117 MB for Llama-3-8B's MLP), then cuBLAS multiplies. Nothing
  is kept per layer; the expansion reads 9/16 and writes 1 of the dense bytes per call.
- ``ARMOR_CUSPARSELT_LAYOUT=1``: ``prepare()`` compresses each layer into cuSPARSELt's
  layout once at load time (a second copy, 9/16 of the dense bytes) and the product runs
  on 2:4 tensor cores with a searched plan per token bucket. The cache is keyed weakly
  by the ``values`` tensor (the copy goes with the layer); an in-place change of
  ``values`` recompresses it; turning the opt-in off and preparing again frees it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .. import cuda_ext
from .base import DECODE_MAX_TOKENS, HALF_DTYPES, Backend, LayoutCache, cusparselt_layout_enabled


class CudaExtBackend(Backend):
    name = "cuda_ext"
    ops = ("sparse24_matmul",)
    device_types = ("cuda",)
    min_capability = (8, 0)
    dtypes = HALF_DTYPES
    one_dtype = True
    min_tokens: ClassVar[dict[str, int]] = {"sparse24_matmul": DECODE_MAX_TOKENS + 1}

    def __init__(self):
        self._cores = LayoutCache(lambda core: core.buffer.nbytes)

    def is_available(self) -> tuple[bool, str]:
        return cuda_ext.available()

    def check(self, op: str, x: torch.Tensor, *weights) -> str:
        return cuda_ext.check_core_shapes(weights[0], weights[1])

    # ---- layouts --------------------------------------------------------------------------
    def prepare(self, a, values, meta, b, bias) -> None:
        if not cusparselt_layout_enabled():
            self._cores.pop(values)  # the default path reads values/meta: no copy to keep
        elif values.device.type in self.device_types and not cuda_ext.check_core_shapes(values, meta):
            self._core(values, meta)

    def release(self, values=None) -> None:
        self._cores.pop(values)

    def layout_bytes(self, values=None) -> int:
        return self._cores.nbytes(values)

    def workspace_bytes(self) -> int:
        return cuda_ext.workspace_bytes()

    def _core(self, values: torch.Tensor, meta: torch.Tensor) -> cuda_ext.CompressedCore:
        return self._cores.get(values, lambda: cuda_ext.compress(values, meta))

    def sparse24_matmul(self, x, values, meta, bias=None):
        if values in self._cores or cusparselt_layout_enabled():  # a layer never prepared compresses here
            return cuda_ext.sparse24_mm(x, self._core(values, meta), bias)
        return cuda_ext.expanded_mm(x, values, meta, bias)


BACKEND = CudaExtBackend()
