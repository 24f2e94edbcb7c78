"""The ARMOR fitting problem in normalized space and its block-diagonal products.

Fit ``W̄ ≈ A · S · B`` (A, B block-diagonal, S 2:4 along the input dim) under
``L = Σ_ij h_j (W̄ − A S B)²_ij / Σ_ij h_j W̄²_ij``.

Layout: ``A`` is ``[no, bo, bo]`` (output blocks), ``B`` is ``[ni, bi, bi]``
(input blocks), ``S`` and its boolean ``mask`` are dense ``[d_out, d_in]`` fp32.
Products never build ``d_out x d_in x b`` intermediates: each is a batched matmul
over blocks with an output the size of ``W̄``.
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


@dataclass
class Problem:
    """Normalized target ``w`` (``W̄``), column weights ``h`` and the loss denominator."""

    w: torch.Tensor  # [d_out, d_in] fp32
    h: torch.Tensor  # [d_in] fp32, positive
    bo: int
    bi: int

    def __post_init__(self):
        self.denom = float((self.w.square() * self.h).sum())
        if not self.denom > 0:
            raise ValueError("weight: the h-weighted norm of the normalized weight is 0 (all-zero weight?)")
        self.wh = self.w * self.h  # W̄ H, reused by every update

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    @property
    def no(self) -> int:
        return self.w.shape[0] // self.bo

    @property
    def ni(self) -> int:
        return self.w.shape[1] // self.bi

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

    def loss(self, a: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> float:
        return self.loss_of(self.w_hat(a, s, b))

    def p_q(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_i = A_iᵀA_i`` ``[no, bo, bo]`` and ``Q_j = B_j H_j B_jᵀ`` ``[ni, bi, bi]``.

        The loss numerator is a quadratic in S: ``const − 2<RHS, S> + <S, P S Q>``.
        """
        hb = self.h.reshape(self.ni, 1, self.bi)
        return a.transpose(1, 2) @ a, (b * hb) @ b.transpose(1, 2)

    def core_rhs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``RHS = Aᵀ W̄ H Bᵀ`` (blockwise), the linear term of the quadratic in S."""
        return left(a.transpose(1, 2), right(self.wh, b.transpose(1, 2)))

    def core_grad(self, s: torch.Tensor, p: torch.Tensor, q: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Gradient of the loss numerator w.r.t. the dense core: ``2 (P S Q − RHS)``."""
        return 2.0 * (left(p, right(s, q)) - rhs)
