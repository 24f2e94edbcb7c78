"""Pure-PyTorch reference for every ARMOR op: the test oracle and the CPU runtime path.

All arithmetic is fp32 (fp64 stays fp64); results are cast back to the input's
dtype once, at the end. Inputs may have any leading batch dims.
"""

from __future__ import annotations

import torch

from . import sparse24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_last_dim(x: torch.Tensor, want: int, what: str) -> None:
    if x.shape[-1] != want:
        raise ValueError(f"x: last dim {x.shape[-1]} does not match {what} = {want}")


def blockdiag_matmul(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · blockdiag(blocks)ᵀ (+ bias)``: block ``j`` of the output is ``x_j @ blocks[j]ᵀ``."""
    n, bs, _ = blocks.shape
    _check_last_dim(x, n * bs, "n_blocks * block")
    ct = _compute_dtype(x.dtype)
    xb = x.to(ct).reshape(*x.shape[:-1], n, bs)
    y = torch.einsum("...nk,njk->...nj", xb, blocks.to(ct)).reshape(x.shape)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def sparse24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x · Sᵀ (+ bias)`` with ``S`` given in compressed 2:4 form."""
    _check_last_dim(x, 2 * values.shape[1], "d_in")
    ct = _compute_dtype(x.dtype)
    core = sparse24.decompress(values.to(ct), meta)
    y = torch.nn.functional.linear(x.to(ct), core, None if bias is None else bias.to(ct))
    return y.to(x.dtype)


def armor_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole layer ``y = ((x Bᵀ) Sᵀ) Aᵀ + bias`` without intermediate rounding."""
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    h = blockdiag_matmul(xc, b.to(ct))
    z = sparse24_matmul(h, values.to(ct), meta)
    y = blockdiag_matmul(z, a.to(ct), None if bias is None else bias.to(ct))
    return y.to(x.dtype)


def materialize(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dense ``W_hat = blockdiag(A) · S · blockdiag(B)`` in fp32 (debugging, export)."""
    ct = _compute_dtype(values.dtype)
    core = sparse24.decompress(values.to(ct), meta)
    n_o, bo, _ = a.shape
    n_i, bi, _ = b.shape
    s = core.reshape(n_o, bo, n_i, bi)
    w = torch.einsum("ixy,iyjw,jwz->ixjz", a.to(ct), s, b.to(ct))
    return w.reshape(n_o * bo, n_i * bi)
