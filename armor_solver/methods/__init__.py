"""Pruning methods: (weight, statistics, config) -> MethodResult, looked up by name.

Modules load lazily so a method that is absent or broken only fails when used.
Each module defines ``prune(weight, stats, cfg)`` and may set ``PROPAGATION``
("dense": statistics of the dense model, as ARMOR and NoWag-P are published;
"sequential": inputs through the already-pruned earlier blocks, as Wanda and
SparseGPT are), ``NEEDS_XTX`` (full XᵀX instead of its diagonal; or a function
``needs_xtx(extra)`` when an option decides) and ``OPTIONS``
(``{key: base.Option}``, the ``cfg.extra`` keys it reads; a method without it takes none).
"""

from __future__ import annotations

import importlib

METHODS = {
    "armor": "armor_solver.methods.armor",
    "nowag-p": "armor_solver.methods.nowag_p",
    "wanda": "armor_solver.methods.wanda",
    "sparsegpt": "armor_solver.methods.sparsegpt",
    "magnitude": "armor_solver.methods.magnitude",
}
DEFAULT_PROPAGATION = {"armor": "dense", "nowag-p": "dense", "magnitude": "dense", "wanda": "sequential", "sparsegpt": "sequential"}


def module(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    try:
        return importlib.import_module(METHODS[name])
    except ModuleNotFoundError as e:
        if e.name == METHODS[name]:
            raise ValueError(f"method {name!r} is not available in this installation ({METHODS[name]} missing)") from None
        raise


def get(name: str):
    """The ``prune(weight, stats, cfg) -> MethodResult`` function of method ``name``."""
    return module(name).prune


def propagation(name: str) -> str:
    return getattr(module(name), "PROPAGATION", DEFAULT_PROPAGATION.get(name, "dense"))


def needs_xtx(name: str, extra: dict | None = None) -> bool:
    """Whether method ``name`` with options ``extra`` needs the full XᵀX (its ``needs_xtx(extra)``, else ``NEEDS_XTX``)."""
    mod = module(name)
    if hasattr(mod, "needs_xtx"):
        return bool(mod.needs_xtx(dict(extra or {})))
    return bool(getattr(mod, "NEEDS_XTX", False))


def options(name: str) -> dict:
    """``{key: base.Option}`` of method ``name`` (its ``cfg.extra`` keys)."""
    return dict(getattr(module(name), "OPTIONS", {}))


def check_options(name: str, extra: dict, near: tuple[str, ...] = ()) -> None:
    """Refuse options method ``name`` does not take (naming the valid ones) and bad values, before any work."""
    from .base import check_options as check

    check(name, options(name), extra, near)
