"""Swap named ``nn.Linear`` modules for ``ArmorLinear``, one instance at a time, with a report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from armor_kernels import ArmorFormatError, ArmorWeights
from armor_solver.targets import default_targets, is_target

from .linear import ArmorLinear


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it was left as is
    dense_bytes: int = 0  # bytes of the dense weights (+ bias) that were freed
    armor_bytes: int = 0  # bytes of the packed layers that replaced them

    def summary(self) -> str:
        ratio = self.armor_bytes / self.dense_bytes if self.dense_bytes else float("nan")
        head = (
            f"converted {len(self.converted)} linear layers: {self.dense_bytes / 2**20:.2f} MiB dense -> "
            f"{self.armor_bytes / 2**20:.2f} MiB ARMOR ({ratio:.3f}x)"
        )
        lines = [head]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _why_not(name: str, module: nn.Module | None, w: ArmorWeights) -> str | None:
    if module is None:
        return "no such module in the model"
    if not isinstance(module, nn.Linear):
        return f"is a {type(module).__name__}, not an nn.Linear"
    if (module.out_features, module.in_features) != (w.d_out, w.d_in):
        return (
            f"shape mismatch: the module is {module.out_features}x{module.in_features}, "
            f"the ArmorWeights are {w.d_out}x{w.d_in}"
        )
    if module.weight.device.type == "meta":
        return "the module's weight is on the meta device (load the model first)"
    try:
        w.validate(name)
    except ArmorFormatError as e:
        return f"invalid ArmorWeights: {e}"
    return None


def convert_model(model: nn.Module, weights: dict[str, ArmorWeights], targets=None, ignore=()) -> ConversionReport:
    """Replace each ``nn.Linear`` named in ``weights`` by an ``ArmorLinear`` built from its weights.

    The packed tensors are moved to the replaced module's device and cast to its
    dtype; when the ArmorWeights carry no bias but the module has one, the
    module's bias is kept. Each dense module is dropped as soon as its
    replacement is in place, so only one dense weight is ever released at a time
    (no second dense copy exists). Layers that match ``targets`` (default: the
    model type's table, when known) but get no weights are listed as skipped.
    """
    report = ConversionReport()
    modules = dict(model.named_modules())
    for name, w in weights.items():
        module = modules.get(name)
        why = _why_not(name, module, w)
        if why is not None:
            report.skipped[name] = why
            continue
        w = w.to(device=module.weight.device, dtype=module.weight.dtype)
        if w.bias is None and module.bias is not None:
            w.bias = module.bias.detach()
        new = ArmorLinear.from_weights(w, name)
        report.dense_bytes += module.weight.nbytes + (0 if module.bias is None else module.bias.nbytes)
        report.armor_bytes += w.nbytes()["total"]
        model.set_submodule(name, new)
        modules[name] = new
        del module  # the last reference: the dense weight is freed here
        report.converted.append(name)

    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        try:
            targets = default_targets(model_type) if model_type else ()
        except ValueError:
            targets = ()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in weights and is_target(name, targets, ignore):
            report.skipped[name] = "matches the targets but no ArmorWeights were given"
    return report


def armor_layers(model: nn.Module) -> dict[str, ArmorLinear]:
    """Name -> ArmorLinear for every converted layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ArmorLinear)}


def dense_layer(layer: ArmorLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``W_hat`` of ``layer`` (export to a plain checkpoint)."""
    dtype = dtype or layer.dtype
    device = layer.values.device
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype, device="meta")
    lin.weight = nn.Parameter(layer.to_dense(dtype), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return lin.to(device)
