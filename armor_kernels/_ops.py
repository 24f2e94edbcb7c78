"""The public ops, declared once with torch.library; each runs the backend ``dispatch`` picks.

Custom ops are opaque to ``torch.compile`` (fullgraph works) and carry fake
kernels so shapes propagate on the meta device and under tracing.
"""

from __future__ import annotations

import torch

from . import dispatch


@torch.library.custom_op("armor::blockdiag_matmul", mutates_args=())
def blockdiag_matmul(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · blockdiag(blocks)ᵀ (+ bias)``; ``blocks`` is ``[n_blocks, b, b]``."""
    return dispatch.run("blockdiag_matmul", x, blocks, bias)


@blockdiag_matmul.register_fake
def _(x, blocks, bias=None):
    return torch.empty_like(x)


@torch.library.custom_op("armor::sparse24_matmul", mutates_args=())
def sparse24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x · Sᵀ (+ bias)`` with ``S`` as 2:4 values ``[d_out, d_in/2]`` + uint8 metadata."""
    return dispatch.run("sparse24_matmul", x, values, meta, bias)


@sparse24_matmul.register_fake
def _(x, values, meta, bias=None):
    return x.new_empty(*x.shape[:-1], values.shape[0])


@torch.library.custom_op("armor::armor_linear", mutates_args=())
def armor_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ARMOR layer ``y = ((x Bᵀ) Sᵀ) Aᵀ + bias``."""
    return dispatch.run("armor_linear", x, a, values, meta, b, bias)


@armor_linear.register_fake
def _(x, a, values, meta, b, bias=None):
    return x.new_empty(*x.shape[:-1], values.shape[0])
