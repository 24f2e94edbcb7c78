"""Backend registry and selection.

A backend is chosen once per shape class ``(op, device type, dtype, regime,
weight shapes)`` and cached; calls only look the choice up. Environment:

- ``ARMOR_BACKEND=name``: force one backend; an op it cannot run raises with its reason.
- ``ARMOR_DISABLED_BACKENDS=a,b``: never pick these.

Both are read when a shape class is first seen; ``reset()`` forgets all choices.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from .backends.base import Backend

# Every backend module, best first. A module that fails to import is recorded
# with its error and never breaks ``import armor_kernels``.
BACKEND_MODULES = ("cuda_ext", "triton", "torch_sparse", "reference")

# Token-count regimes: decode is memory-bound (<= 16 tokens), prefill compute-bound.
DECODE_MAX_TOKENS = 16
MEDIUM_MAX_TOKENS = 256


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run the op; the message says why."""


@dataclass
class Choice:
    backend: Backend
    reasons: dict[str, str]  # backends passed over -> why


_backends: dict[str, Backend] | None = None
_load_errors: dict[str, str] = {}
_cache: dict[tuple, Choice] = {}


def _load() -> dict[str, Backend]:
    global _backends
    if _backends is None:
        found = {}
        for mod in BACKEND_MODULES:
            try:
                backend = importlib.import_module(f"armor_kernels.backends.{mod}").BACKEND
                found[backend.name] = backend
            except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
                _load_errors[mod] = f"{type(e).__name__}: {e}"
        _backends = found
    return _backends


def backends() -> list[Backend]:
    """Loaded backends, highest priority first."""
    return sorted(_load().values(), key=lambda b: -b.priority)


def get(name: str) -> Backend:
    table = _load()
    if name not in table:
        why = _load_errors.get(name, "no such backend")
        raise BackendUnavailable(f"backend {name!r} is not loaded: {why}; known: {sorted(table)}")
    return table[name]


def regime(tokens: int) -> str:
    if tokens <= DECODE_MAX_TOKENS:
        return "decode"
    return "medium" if tokens <= MEDIUM_MAX_TOKENS else "prefill"


def _disabled() -> set[str]:
    return {s.strip() for s in os.environ.get("ARMOR_DISABLED_BACKENDS", "").split(",") if s.strip()}


def _decide(op: str, x: torch.Tensor, weights: tuple) -> Choice:
    forced = os.environ.get("ARMOR_BACKEND", "").strip()
    disabled = _disabled()
    if forced:
        backend = get(forced)
        ok, why = backend.is_available()
        if ok:
            ok, why = backend.can_implement(op, x, *weights)
        if not ok:
            raise BackendUnavailable(f"ARMOR_BACKEND={forced} cannot run {op}: {why}")
        return Choice(backend, {})
    reasons = {}
    for backend in backends():
        if backend.name in disabled:
            reasons[backend.name] = "disabled by ARMOR_DISABLED_BACKENDS"
            continue
        ok, why = backend.is_available()
        if ok:
            ok, why = backend.can_implement(op, x, *weights)
        if ok:
            return Choice(backend, reasons)
        reasons[backend.name] = why
    raise BackendUnavailable(f"no backend can run {op} for {tuple(x.shape)} {x.dtype} on {x.device}: {reasons}")


def shape_key(op: str, x: torch.Tensor, weights: tuple) -> tuple:
    tokens = x.numel() // max(x.shape[-1], 1)
    shapes = tuple(tuple(w.shape) if isinstance(w, torch.Tensor) else w for w in weights)
    return (op, x.device.type, x.dtype, regime(tokens), shapes)


def select(op: str, x: torch.Tensor, *weights) -> Choice:
    key = shape_key(op, x, weights)
    choice = _cache.get(key)
    if choice is None:
        choice = _cache[key] = _decide(op, x, weights)
    return choice


def run(op: str, x: torch.Tensor, *weights):
    return select(op, x, *weights).backend.run(op, x, *weights)


def prepare(a, values, meta, b, bias=None) -> None:
    """Let every available backend build its layout of a layer once, at load time."""
    for backend in backends():
        if backend.name not in _disabled() and backend.is_available()[0]:
            backend.prepare(a, values, meta, b, bias)


def reset() -> None:
    """Forget cached choices (after changing ARMOR_BACKEND or ARMOR_DISABLED_BACKENDS)."""
    _cache.clear()


def report() -> dict:
    """What is loaded, what is available and why not, and the choices made so far."""
    table = _load()
    status = {}
    for name, backend in table.items():
        ok, why = backend.is_available()
        status[name] = {"priority": backend.priority, "available": ok, "reason": why, "ops": list(backend.ops)}
    return {
        "backends": status,
        "load_errors": dict(_load_errors),
        "choices": {
            f"{k[0]} {k[1]} {str(k[2]).replace('torch.', '')} {k[3]} {k[4]}": c.backend.name for k, c in _cache.items()
        },
    }
