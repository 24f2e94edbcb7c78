"""Backend registry and selection.

A backend is chosen once per shape class ``(op, device type, dtype, regime,
weight shapes)`` and cached; calls only look the choice up.

Order: each backend's ``rank(device_type, regime)`` when it defines one, else
its ``priority``; the first that is available and ``can_implement`` the op wins.
So the small-batch Triton kernel leads decode on GPU, cuSPARSELt (or the CUDA
extension) the larger token counts, and on CPU the reference leads (the Triton
interpreter is for tests; force it with ``ARMOR_BACKEND=triton``).

``armor_linear``: when no backend above the reference runs the whole layer, a
composite runs it as B-wrapper -> 2:4 core -> A-wrapper (+ bias), each part from
its own selection, provided the core gets a backend better than the reference.

Environment, read when a shape class is first seen (``reset()`` forgets choices):

- ``ARMOR_BACKEND=name``: force one backend; an op it cannot run raises with its
  reason. For ``armor_linear`` a forced backend that runs the 2:4 core but not the
  whole layer gets its wrappers from automatic selection.
- ``ARMOR_DISABLED_BACKENDS=a,b``: never pick these (also inside composites).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from .backends.base import OPS, Backend

# Every backend module, best first. A module that fails to import is recorded
# with its error and never breaks ``import armor_kernels``.
BACKEND_MODULES = ("cuda_ext", "triton", "torch_sparse", "reference")

# Token-count regimes: decode is memory-bound (<= 16 tokens), prefill compute-bound.
DECODE_MAX_TOKENS = 16
MEDIUM_MAX_TOKENS = 256
# A representative token count per regime (for ``plan`` and ``armor env``).
REGIME_TOKENS = {"decode": 1, "medium": 64, "prefill": 1024}


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run the op; the message says why."""


@dataclass
class Choice:
    backend: Backend
    reasons: dict[str, str]  # backends passed over -> why


class Composite(Backend):
    """``armor_linear`` from three selected parts: B-wrapper, 2:4 core, A-wrapper (+ bias)."""

    ops = ("armor_linear",)

    def __init__(self, wrapper_in: Backend, core: Backend, wrapper_out: Backend):
        self.parts = (wrapper_in, core, wrapper_out)
        self.name = f"composite({wrapper_in.name}>{core.name}>{wrapper_out.name})"

    def armor_linear(self, x, a, values, meta, b, bias=None):
        wrapper_in, core, wrapper_out = self.parts
        h = wrapper_in.run("blockdiag_matmul", x, b, None)
        z = core.run("sparse24_matmul", h, values, meta, None)
        return wrapper_out.run("blockdiag_matmul", z, a, bias)


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


def rank(backend: Backend, device_type: str, regime_name: str) -> int:
    """Selection order of a backend for a device type and regime (higher first)."""
    fn = getattr(backend, "rank", None)
    return int(fn(device_type, regime_name)) if callable(fn) else backend.priority


def ordered(device_type: str, regime_name: str) -> list[Backend]:
    """Loaded backends in selection order for this device type and regime."""
    return sorted(_load().values(), key=lambda b: -rank(b, device_type, regime_name))


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


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _check(backend: Backend, op: str, x: torch.Tensor, weights: tuple) -> tuple[bool, str]:
    ok, why = backend.is_available()
    if ok:
        ok, why = backend.can_implement(op, x, *weights)
    return ok, why


def _first(op: str, x: torch.Tensor, weights: tuple, skip=()) -> Choice:
    """The first backend in selection order that runs ``op``; why each earlier one did not."""
    disabled = _disabled()
    reasons = {}
    for backend in ordered(x.device.type, regime(_tokens(x))):
        if backend.name in skip:
            continue
        if backend.name in disabled:
            reasons[backend.name] = "disabled by ARMOR_DISABLED_BACKENDS"
            continue
        ok, why = _check(backend, op, x, weights)
        if ok:
            return Choice(backend, reasons)
        reasons[backend.name] = why
    raise BackendUnavailable(f"no backend can run {op} for {tuple(x.shape)} {x.dtype} on {x.device}: {reasons}")


def _composite(x: torch.Tensor, weights: tuple, core: Backend | None = None) -> tuple[Composite | None, str]:
    """Compose ``armor_linear`` from parts; None (and why) when the core would be the reference."""
    a, values, meta, b, bias = weights
    if core is None:
        core = _first("sparse24_matmul", x, (values, meta, None)).backend
    if core.name == "reference":
        return None, "no 2:4 backend better than the reference for this shape"
    wrapper_in = _first("blockdiag_matmul", x, (b, None)).backend
    z = x.new_empty(*x.shape[:-1], values.shape[0])
    wrapper_out = _first("blockdiag_matmul", z, (a, bias)).backend
    return Composite(wrapper_in, core, wrapper_out), ""


def _decide(op: str, x: torch.Tensor, weights: tuple) -> Choice:
    forced = os.environ.get("ARMOR_BACKEND", "").strip()
    if forced:
        backend = get(forced)
        ok, why = _check(backend, op, x, weights)
        if ok:
            return Choice(backend, {})
        if op == "armor_linear" and "sparse24_matmul" in backend.ops:
            core_ok, _ = _check(backend, "sparse24_matmul", x, (weights[1], weights[2], None))
            if core_ok:
                return Choice(_composite(x, weights, core=backend)[0], {forced: why})
        raise BackendUnavailable(f"ARMOR_BACKEND={forced} cannot run {op}: {why}")
    if op != "armor_linear":
        return _first(op, x, weights)
    whole = _first(op, x, weights)
    if whole.backend.name != "reference":
        return whole
    composite, why = _composite(x, weights)
    if composite is None:
        whole.reasons["composite"] = why
        return whole
    return Choice(composite, whole.reasons)


def shape_key(op: str, x: torch.Tensor, weights: tuple) -> tuple:
    shapes = tuple(tuple(w.shape) if isinstance(w, torch.Tensor) else w for w in weights)
    return (op, x.device.type, x.dtype, regime(_tokens(x)), shapes)


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


def plan(device, dtype: torch.dtype, d_out: int = 4096, d_in: int = 4096, block: int = 128) -> dict:
    """What each op would run on, per regime, for a layer shape on ``device``: ``{regime: {op: name or 'none (why)'}}``.

    Uses uninitialized stand-in tensors and does not touch the cache.
    """
    device = torch.device(device)
    values = torch.empty(d_out, d_in // 2, dtype=dtype, device=device)
    meta = torch.empty(d_out, (d_in // 4 + 1) // 2, dtype=torch.uint8, device=device)
    a = torch.empty(d_out // block, block, block, dtype=dtype, device=device)
    b = torch.empty(d_in // block, block, block, dtype=dtype, device=device)
    out = {}
    for name, tokens in REGIME_TOKENS.items():
        x = torch.empty(tokens, d_in, dtype=dtype, device=device)
        args = {
            "blockdiag_matmul": (b, None),
            "sparse24_matmul": (values, meta, None),
            "armor_linear": (a, values, meta, b, None),
        }
        row = {}
        for op in OPS:
            try:
                row[op] = _decide(op, x, args[op]).backend.name
            except BackendUnavailable as e:
                row[op] = f"none ({e})"
        out[name] = row
    return out


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
        "passed_over": {
            f"{k[0]} {k[1]} {str(k[2]).replace('torch.', '')} {k[3]} {k[4]}": dict(c.reasons)
            for k, c in _cache.items()
            if c.reasons
        },
    }
