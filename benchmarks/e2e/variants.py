"""The variants of one model: ``dense`` (``F.linear``), ``armor`` (``ArmorLinear``, one copy of each
core), ``armor_cslt`` (the same with ``ARMOR_CUSPARSELT_LAYOUT=1``: cuSPARSELt's compressed copy
kept for prefill) and ``plain24`` (each target linear magnitude-pruned to 2:4 and run by PyTorch's
cuSPARSELt through the library's wrapper, ``armor_kernels.backends.torch_sparse``)."""

from __future__ import annotations

import torch
from torch import nn

from armor_kernels.backends import torch_sparse
from benchmarks import common
from benchmarks.common import Unavailable

VARIANTS = ("dense", "plain24", "armor", "armor_cslt")
# the environment each variant runs under (the dispatcher reads it when a shape class is first seen)
VARIANT_ENV = {"armor_cslt": {"ARMOR_CUSPARSELT_LAYOUT": "1"}}


class Plain24Linear(nn.Module):
    """``nn.Linear`` with its weight magnitude-pruned to 2:4, held only as cuSPARSELt's compressed
    buffer and run by ``torch_sparse.matmul`` (algorithm searched once per token bucket, in warm-up)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        ok, why = torch_sparse.status()
        if not ok:
            raise Unavailable(why)
        w = linear.weight.detach()
        w24 = w * magnitude_24(w)
        self.register_buffer("packed", torch_sparse.compress(w24))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_sparse.matmul(self.packed, x, self.out_features, self.bias)


def magnitude_24(w: torch.Tensor) -> torch.Tensor:
    from armor_kernels import sparse24

    return sparse24.topk_mask(w.abs().float())


def variant_environment(variant: str):
    """The variant's environment for the duration, dispatch choices reset on entry and exit."""
    return common.environment(VARIANT_ENV.get(variant, {}))


def apply_variant(model, variant: str, block: int, dense_layers: dict[str, nn.Linear]) -> str:
    """Swap the target linears for ``variant``; returns a description of the implementation."""
    if variant == "dense":
        for name, lin in dense_layers.items():
            model.set_submodule(name, lin)
        return "F.linear"
    if variant == "plain24":
        for name, lin in dense_layers.items():
            model.set_submodule(name, Plain24Linear(lin))
        return "Plain24Linear: torch_sparse.matmul (torch._cslt_sparse_mm), algorithm searched per token bucket"
    if variant in ("armor", "armor_cslt"):
        try:
            from armor_runtime.convert import convert_model
        except ImportError as e:
            raise Unavailable(f"armor_runtime.convert is missing: {e}") from None
        dev = next(iter(dense_layers.values())).weight.device
        dtype = next(iter(dense_layers.values())).weight.dtype
        weights = {
            name: common.random_armor_weights(lin.out_features, lin.in_features, block, dtype, dev)
            for name, lin in dense_layers.items()
        }
        report = convert_model(model, weights)
        if report.skipped:
            raise Unavailable(
                f"convert_model skipped {len(report.skipped)} layers, e.g. {next(iter(report.skipped.items()))}"
            )
        copy = "; cuSPARSELt copy of each core kept (ARMOR_CUSPARSELT_LAYOUT=1)" if variant == "armor_cslt" else ""
        return "ArmorLinear (random factors, valid 2:4 core)" + copy
    raise ValueError(f"--variants: unknown {variant!r}; known: {VARIANTS}")


def current_variant(model) -> str:
    kinds = {type(m).__name__ for m in model.modules()}
    if "ArmorLinear" in kinds:
        return "armor"
    return "plain24" if "Plain24Linear" in kinds else "dense"


def armor_impl_label(device: torch.device) -> str:
    """Which backends armor_linear used so far (dispatch's cached choices)."""
    from armor_kernels import dispatch

    used = sorted({v for k, v in dispatch.report()["choices"].items() if k.startswith("armor_linear")})
    if device.type == "cpu" and used == ["reference"]:
        return "cpu reference"
    return "armor_linear via " + ("+".join(used) or "?")
