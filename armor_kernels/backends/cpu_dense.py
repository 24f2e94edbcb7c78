"""The CPU backend: ``W_hat = A·S·B`` multiplied out once per layer, then one dense matmul per call.

On a CPU a 2:4 core has no hardware to exploit, and the reference path pays for expanding
the core (and two block-diagonal products) on every call: ``armor generate`` on SmolLM2-135M
ran 0.5 tokens/s with it against 7.2 for the dense model on the 2-core test machine. Here the
layer's dense ``W_hat`` is built once, at ``prepare`` (load / convert / ``.to()``), and every
call is ``F.linear(x, W_hat, bias)``: the speed of a dense layer.

Memory: the layout is one dense ``[d_out, d_in]`` matrix in the layer's dtype, i.e. exactly the
bytes of the dense layer (``2·d_out·d_in`` in bf16/fp16, ``4·d_out·d_in`` in fp32), held next to
the packed tensors the layer keeps (values + metadata 9/16 of dense, plus the wrappers). For
SmolLM2-135M's 210 projections in bf16: 212,336,640 bytes of layouts on top of their packed
131,650,560 (default blocks). ``ARMOR_DISABLED_BACKENDS=cpu_dense`` falls back to the reference (no layout, slow).

Numerics: ``W_hat`` is computed in fp32 and rounded once to the layer's dtype, so for fp32
layers it matches the reference up to summation order; for 16-bit layers the weight is rounded
where the reference rounds only the output (a dense 16-bit layer rounds the same way). Input and
layer must share one dtype; other pairs (and float64) go to the reference.

The layout is keyed weakly by the layer's ``values`` tensor (``LayoutCache``): freeing or moving
the layer frees it, an in-place change of ``values`` rebuilds it. ``a`` and ``b`` are read when
the layout is built; changing them in place needs ``prepare`` again (``layer.prepare()``).
"""

from __future__ import annotations

import torch

from .. import reference
from ..formats import FLOAT_DTYPES
from .base import Backend, LayoutCache


def build_layout(a, values, meta, b) -> torch.Tensor:
    """The dense ``W_hat`` in the layer's dtype, contiguous (what ``F.linear`` reads fastest)."""
    return reference.materialize(a, values, meta, b).to(values.dtype).contiguous()


class CpuDenseBackend(Backend):
    name = "cpu_dense"
    ops = ("armor_linear",)
    device_types = ("cpu",)
    dtypes = FLOAT_DTYPES
    one_dtype = True

    def __init__(self):
        self._dense = LayoutCache(lambda w: w.nbytes)
        self.builds = 0  # layouts built so far (tests check it does not grow per call)

    def _layout(self, a, values, meta, b) -> torch.Tensor:
        def build():
            self.builds += 1
            return build_layout(a, values, meta, b)

        # a layer never prepared (built by hand, not through ArmorLinear) gets its layout on its first call
        return self._dense.get(values, build)

    # ---- layouts --------------------------------------------------------------------------
    def prepare(self, a, values, meta, b, bias) -> None:
        if values.device.type in self.device_types and values.dtype in self.dtypes:
            self._layout(a, values, meta, b)

    def release(self, values=None) -> None:
        self._dense.pop(values)

    def layout_bytes(self, values=None) -> int:
        return self._dense.nbytes(values)

    # ---- op ------------------------------------------------------------------------------
    def armor_linear(self, x, a, values, meta, b, bias=None):
        d_in = 2 * values.shape[1]
        if x.shape[-1] != d_in:
            raise ValueError(f"x: last dim {x.shape[-1]} does not match d_in = {d_in}")
        return torch.nn.functional.linear(x, self._layout(a, values, meta, b), bias)


BACKEND = CpuDenseBackend()
