"""The ARMOR fitting problem in normalized space and its block-diagonal products.

Fit ``W̄ ≈ A · S · B`` (A, B block-diagonal, S 2:4 along the input dim) under
``L = Σ_ij h_j (W̄ − A S B)²_ij / Σ_ij h_j W̄²_ij``.

Layout: ``A`` is ``[no, bo, bo]`` (output blocks), ``B`` is ``[ni, bi, bi]``
(input blocks), ``S`` and its boolean ``mask`` are dense ``[d_out, d_in]`` fp32.
Products never build ``d_out x d_in x b`` intermediates: each is a batched matmul
over blocks with an output the size of ``W̄``. The solver's own products and losses
go over row chunks of whole output blocks (``chunk_rows``, ~1 MiB of fp32 each) so
their temporaries stay small: peak memory per matrix is a few times its fp32 size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def left(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``blockdiag(a) @ x`` for ``x`` ``[d_out, d]``."""
    no, bo, _ = a.shape
    return torch.bmm(a, x.reshape(no, bo, -1)).reshape(x.shape)


def right(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(b)`` for ``x`` ``[d, d_in]``."""
    ni, bi, _ = b.shape
    d = x.shape[0]
    y = torch.bmm(x.reshape(d, ni, bi).transpose(0, 1), b)  # [ni, d, bi]
    return y.transpose(0, 1).reshape(d, ni * bi)


CHUNK_ELEMS = 1 << 18  # ~1 MiB of fp32 per row-chunk temporary


def chunk_rows(bo: int, d: int) -> int:
    """Rows per chunk: whole output blocks of ``bo`` rows, about ``CHUNK_ELEMS`` entries of width ``d``."""
    return bo * max(1, CHUNK_ELEMS // (bo * d))


def pxq(p: torch.Tensor, x: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``blockdiag(p) @ x @ blockdiag(q)`` row chunk by row chunk (into ``out`` if given)."""
    bo = p.shape[1]
    out = torch.empty_like(x) if out is None else out
    step = chunk_rows(bo, x.shape[1])
    for r0 in range(0, x.shape[0], step):
        r1 = min(r0 + step, x.shape[0])
        out[r0:r1] = left(p[r0 // bo:r1 // bo], right(x[r0:r1], q))
    return out


@dataclass
class Fit:
    """A solver's best state (normalized space) and how it got there."""

    a: torch.Tensor  # [no, bo, bo]
    s: torch.Tensor  # [d_out, d_in], zero outside ``mask``
    mask: torch.Tensor  # [d_out, d_in] bool, 2:4
    b: torch.Tensor  # [ni, bi, bi]
    loss: float
    trace: list  # (seconds, loss) pairs
    iters: int


class BlockGrid:
    """Block counts of a layer ``w`` cut into ``bo`` x ``bi`` wrapper blocks (both solvers' problems)."""

    @property
    def no(self) -> int:
        return self.w.shape[0] // self.bo

    @property
    def ni(self) -> int:
        return self.w.shape[1] // self.bi


@dataclass
class Problem(BlockGrid):
    """Normalized target ``w`` (``W̄``), column weights ``h`` and the loss denominator."""

    w: torch.Tensor  # [d_out, d_in] fp32
    h: torch.Tensor  # [d_in] fp32, positive
    bo: int
    bi: int

    def __post_init__(self):
        self.denom = float((self.w.square() * self.h).sum())
        if not self.denom > 0:
            raise ValueError("weight: the h-weighted norm of the normalized weight is 0 (all-zero weight?)")

    def wh(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``W̄ H`` (built per chunk: a full copy would cost one more matrix)."""
        return self.w[r0:r1] * self.h

    def chunks(self):
        """``(r0, r1)`` row chunks of whole output blocks."""
        d_out, step = self.w.shape[0], chunk_rows(self.bo, self.w.shape[1])
        for r0 in range(0, d_out, step):
            yield r0, min(r0 + step, d_out)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def identity_wrappers(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.w.device
        a = torch.eye(self.bo, device=dev).repeat(self.no, 1, 1)
        b = torch.eye(self.bi, device=dev).repeat(self.ni, 1, 1)
        return a, b

    def w_hat(self, a: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return left(a, right(s, b))

    def loss_of(self, w_hat: torch.Tensor) -> float:
        """Loss of a reconstruction; ``w_hat`` is consumed (overwritten by the weighted residual)."""
        r = w_hat.sub_(self.w).square_()
        return float(torch.mv(r, self.h).sum()) / self.denom

    def _loss_rows(self, chunk) -> float:
        """Loss from ``chunk(r0, r1)`` -> rows of W_hat; per-row sums gathered, then one sum."""
        per_row = torch.empty(self.w.shape[0], device=self.w.device)
        for r0, r1 in self.chunks():
            r = chunk(r0, r1).sub_(self.w[r0:r1]).square_()
            per_row[r0:r1] = torch.mv(r, self.h)
        return float(per_row.sum()) / self.denom

    def loss(self, a: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> float:
        bo = self.bo
        return self._loss_rows(lambda r0, r1: left(a[r0 // bo:r1 // bo], right(s[r0:r1], b)))

    def loss_left(self, a: torch.Tensor, c: torch.Tensor) -> float:
        """Loss of ``blockdiag(a) @ c`` (``c = S B`` given)."""
        bo = self.bo
        return self._loss_rows(lambda r0, r1: left(a[r0 // bo:r1 // bo], c[r0:r1]))

    def loss_right(self, d: torch.Tensor, b: torch.Tensor) -> float:
        """Loss of ``d @ blockdiag(b)`` (``d = A S`` given)."""
        return self._loss_rows(lambda r0, r1: right(d[r0:r1], b))

    def p_q(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_i = A_iᵀA_i`` ``[no, bo, bo]`` and ``Q_j = B_j H_j B_jᵀ`` ``[ni, bi, bi]``.

        The loss numerator is a quadratic in S: ``const − 2<RHS, S> + <S, P S Q>``.
        """
        hb = self.h.reshape(self.ni, 1, self.bi)
        return a.transpose(1, 2) @ a, (b * hb) @ b.transpose(1, 2)

    def core_rhs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``RHS = Aᵀ W̄ H Bᵀ`` (blockwise), the linear term of the quadratic in S."""
        out = torch.empty_like(self.w)
        at, bt, bo = a.transpose(1, 2), b.transpose(1, 2), self.bo
        for r0, r1 in self.chunks():
            out[r0:r1] = left(at[r0 // bo:r1 // bo], right(self.wh(r0, r1), bt))
        return out

    def core_grad(self, s: torch.Tensor, p: torch.Tensor, q: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Gradient of the loss numerator w.r.t. the dense core: ``2 (P S Q − RHS)``."""
        return 2.0 * (pxq(p, s, q) - rhs)
