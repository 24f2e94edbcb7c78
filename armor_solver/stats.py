"""Per-layer calibration statistics, accumulated in fp32 batch by batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Input statistics of one linear layer over ``n_tokens`` calibration tokens.

    - ``h``: ``diag(XᵀX) / n`` = mean of ``x_j²`` (NoWag-P, ARMOR); always present.
    - ``sq_norm``: ``||X_j||²`` = ``h * n`` (Wanda scores use its square root).
    - ``xtx``: full ``XᵀX / n`` ``[d_in, d_in]``, only when a method needs it (SparseGPT).
    """

    h: torch.Tensor
    n_tokens: int
    xtx: torch.Tensor | None = None

    @property
    def sq_norm(self) -> torch.Tensor:
        return self.h * self.n_tokens

    @classmethod
    def empty(cls, d_in: int, full: bool = False, device="cpu") -> LayerStats:
        xtx = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if full else None
        return cls(h=torch.zeros(d_in, dtype=torch.float32, device=device), n_tokens=0, xtx=xtx)

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``[..., d_in]`` into the running means (fp32)."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.h.device, dtype=torch.float32)
        n, total = x.shape[0], self.n_tokens + x.shape[0]
        if n == 0:
            return
        self.h.mul_(self.n_tokens / total).add_(x.square().sum(0), alpha=1.0 / total)
        if self.xtx is not None:
            self.xtx.mul_(self.n_tokens / total).addmm_(x.T, x, alpha=1.0 / total)
        self.n_tokens = total

    def cleaned_h(self) -> torch.Tensor:
        """``h`` with non-finite or non-positive entries replaced by the mean of the valid ones."""
        h = self.h
        valid = torch.isfinite(h) & (h > 0)
        if not bool(valid.any()):
            raise ValueError("calibration statistics: h has no finite positive entry (empty or broken calibration)")
        return torch.where(valid, h, h[valid].mean())
