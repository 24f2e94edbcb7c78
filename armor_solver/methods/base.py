"""What every pruning method takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from armor_kernels import ArmorWeights


@dataclass
class PruneConfig:
    """Settings shared by the methods; each method reads what it needs."""

    block_size: int = 128  # preferred wrapper block size per side (the largest valid divisor <= this is used)
    iters: int | None = None  # ARMOR: iteration / sweep budget (None: the method's default)
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # method-specific options, recorded in the checkpoint


@dataclass
class MethodResult:
    weights: ArmorWeights  # packed, in the layer's dtype
    info: dict  # at least {"proxy_loss": float}; ARMOR adds {"init_loss", "iters", "seconds", ...}
