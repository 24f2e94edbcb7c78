"""Backend registry and selection.

A backend is chosen once per shape class ``(op, device type, dtype, regime,
weight shapes)`` and cached; calls only look the choice up. The order in which
backends are tried is ``SELECTION`` below: the first that is available and
``can_implement`` the op wins; why each earlier one did not is kept (``armor env``).

``armor_linear``: when no backend above the reference runs the whole layer, a
composite runs it as B-wrapper -> 2:4 core -> A-wrapper (+ bias), each part from
its own selection, provided the core gets a backend better than the reference.

Layouts: ``prepare`` builds, at load time, only the layouts of the backends that a
layer's selection will run (memory is the point of 2:4), and releases the layouts
of every other backend for that layer. By default that is no second copy: decode
reads ``values``/``meta``, and so does prefill (``cuda_ext`` expands the core into
one shared scratch per device and runs cuBLAS). ``ARMOR_CUSPARSELT_LAYOUT=1`` adds
cuSPARSELt's compressed copy of each core for faster prefill on 2:4 tensor cores
(one copy: only the first cuSPARSELt backend of the table builds it).

Environment, read when a shape class is first seen (``reset()`` forgets choices;
call ``prepare`` again, e.g. ``layer.prepare()``, to rebuild or free layouts):

- ``ARMOR_BACKEND=name``: force one backend; an op it cannot run raises with its
  reason. For ``armor_linear`` a forced backend that runs the 2:4 core but not the
  whole layer gets its wrappers from automatic selection.
- ``ARMOR_DISABLED_BACKENDS=a,b``: never pick these (also inside composites).
- ``ARMOR_CUSPARSELT_LAYOUT=1``: let layers hold cuSPARSELt's compressed copy.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from .backends.base import DECODE_MAX_TOKENS, OPS, Backend, cusparselt_layout_enabled, tokens

# Backend order, best first, per device type and token regime. One row per place a
# backend may run; a backend missing from a row is never picked there automatically
# (ARMOR_BACKEND can still force it). Device types without a row use "cpu"'s.
#   cuda decode: the fused small-batch Triton kernels read values/meta at the memory
#     bound. No cuSPARSELt: it pads few-token products (0.11x dense at 1 token for
#     4096²), and a decode copy besides the prefill one would be a second copy.
#   cuda medium/prefill: the 2:4 core on our extension (cuSPARSELt with a searched
#     plan, or expand + cuBLAS without the opt-in layout), then PyTorch's cuSPARSELt
#     (opt-in layout only); the wrappers on Triton.
#   cpu: cpu_dense (W_hat multiplied out once at prepare, one dense matmul per call: dense
#     speed for the dense layer's bytes again), then the reference (no layout; about 14x slower
#     generation on SmolLM2), and the Triton interpreter (TRITON_INTERPRET=1, for tests)
#     only when both are disabled or triton is forced.
SELECTION: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        "decode": ("triton", "reference"),
        "medium": ("cuda_ext", "triton", "torch_sparse", "reference"),
        "prefill": ("cuda_ext", "triton", "torch_sparse", "reference"),
    },
    "cpu": {
        "decode": ("cpu_dense", "reference", "triton"),
        "medium": ("cpu_dense", "reference", "triton"),
        "prefill": ("cpu_dense", "reference", "triton"),
    },
}
# Regimes by token count: decode is memory-bound, prefill compute-bound.
MEDIUM_MAX_TOKENS = 256
# A representative token count per regime (for ``plan``, ``prepare`` and ``armor env``).
REGIME_TOKENS = {"decode": 1, "medium": 64, "prefill": 1024}

# Every backend module. A module that fails to import is recorded with its error and
# never breaks ``import armor_kernels``.
BACKEND_MODULES = ("reference", "cpu_dense", "triton", "torch_sparse", "cuda_ext")

__all__ = ["DECODE_MAX_TOKENS", "SELECTION", "BackendUnavailable", "prepare", "run", "select"]


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
    """Loaded backends, in ``BACKEND_MODULES`` order."""
    return list(_load().values())


def regime(n_tokens: int) -> str:
    if n_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    return "medium" if n_tokens <= MEDIUM_MAX_TOKENS else "prefill"


def order(device_type: str, regime_name: str) -> tuple[str, ...]:
    """Backend names in selection order for a device type and regime (the table's row)."""
    return SELECTION.get(device_type, SELECTION["cpu"])[regime_name]


def ordered(device_type: str, regime_name: str) -> list[Backend]:
    """Loaded backends in selection order for this device type and regime."""
    table = _load()
    return [table[name] for name in order(device_type, regime_name) if name in table]


def get(name: str) -> Backend:
    table = _load()
    if name not in table:
        why = _load_errors.get(name, "no such backend")
        raise BackendUnavailable(f"backend {name!r} is not loaded: {why}; known: {sorted(table)}")
    return table[name]


def _disabled() -> set[str]:
    return {s.strip() for s in os.environ.get("ARMOR_DISABLED_BACKENDS", "").split(",") if s.strip()}


def _check(backend: Backend, op: str, x: torch.Tensor, weights: tuple) -> tuple[bool, str]:
    ok, why = backend.is_available()
    if ok:
        ok, why = backend.can_implement(op, x, *weights)
    return ok, why


def _first(op: str, x: torch.Tensor, weights: tuple) -> Choice:
    """The first backend in selection order that runs ``op``; why each earlier one did not."""
    disabled = _disabled()
    reasons = {}
    for backend in ordered(x.device.type, regime(tokens(x))):
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
    z = x.new_empty(()).expand(*x.shape[:-1], values.shape[0])  # shape only, no allocation
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
    return (op, x.device.type, x.dtype, regime(tokens(x)), shapes)


def select(op: str, x: torch.Tensor, *weights) -> Choice:
    key = shape_key(op, x, weights)
    choice = _cache.get(key)
    if choice is None:
        choice = _cache[key] = _decide(op, x, weights)
    return choice


def run(op: str, x: torch.Tensor, *weights):
    return select(op, x, *weights).backend.run(op, x, *weights)


# ---- layouts -------------------------------------------------------------------------------


def _stand_in(n_tokens: int, d_in: int, like: torch.Tensor) -> torch.Tensor:
    """An input of the right shape, dtype and device without memory (selection reads only those)."""
    return like.new_empty(()).expand(n_tokens, d_in)


def _used(a, values, meta, b, bias) -> set[str]:
    used = set()
    for n in REGIME_TOKENS.values():
        x = _stand_in(n, 2 * values.shape[1], values)
        try:
            choice = select("armor_linear", x, a, values, meta, b, bias)
        except BackendUnavailable:
            continue
        parts = getattr(choice.backend, "parts", (choice.backend,))
        used.update(p.name for p in parts)
    return used


def prepare(a, values, meta, b, bias=None) -> dict[str, int]:
    """Build, once at load time, the layouts of the backends this layer will run (per
    regime, as selected now) and free the layouts every other backend holds for it.

    Returns ``{backend: bytes}`` of the layouts the layer now holds beyond its own
    tensors (empty by default; one cuSPARSELt copy with ``ARMOR_CUSPARSELT_LAYOUT=1``).
    """
    used = _used(a, values, meta, b, bias)
    held = {}
    for backend in backends():
        if backend.name in used and backend.is_available()[0]:
            backend.prepare(a, values, meta, b, bias)
        else:
            backend.release(values)
        nbytes = backend.layout_bytes(values)
        if nbytes:
            held[backend.name] = nbytes
    return held


def release(values: torch.Tensor | None = None) -> None:
    """Free every backend's layouts of ``values`` (of all layers when None)."""
    for backend in backends():
        backend.release(values)


def layout_bytes(values: torch.Tensor | None = None) -> dict[str, int]:
    """``{backend: device bytes}`` held in kernel-specific layouts (for ``values``, or all layers)."""
    return {b.name: n for b in backends() if (n := b.layout_bytes(values))}


def reset() -> None:
    """Forget cached choices (after changing ARMOR_BACKEND, ARMOR_DISABLED_BACKENDS or ARMOR_CUSPARSELT_LAYOUT)."""
    _cache.clear()


# ---- reports ---------------------------------------------------------------------------------


def plan(device, dtype: torch.dtype, d_out: int = 4096, d_in: int = 4096, block: int = 128) -> dict:
    """What each op would run on, per regime, for a layer shape on ``device``: ``{regime: {op: name or 'none (why)'}}``.

    Uses stand-in tensors without memory and does not touch the cache.
    """
    device = torch.device(device)
    one = torch.empty((), dtype=dtype, device=device)
    values = one.expand(d_out, d_in // 2)
    meta = torch.empty((), dtype=torch.uint8, device=device).expand(d_out, (d_in // 4 + 1) // 2)
    a = one.expand(d_out // block, block, block)
    b = one.expand(d_in // block, block, block)
    out = {}
    for name, n in REGIME_TOKENS.items():
        x = one.expand(n, d_in)
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


def _key_text(k: tuple) -> str:
    return f"{k[0]} {k[1]} {str(k[2]).replace('torch.', '')} {k[3]} {k[4]}"


def report() -> dict:
    """The selection table, what is loaded, what is available and why not, the layouts held,
    and the choices made so far."""
    table = _load()
    status = {}
    for name, backend in table.items():
        ok, why = backend.is_available()
        status[name] = {"available": ok, "reason": why, "ops": list(backend.ops)}
    return {
        "selection": {dev: {r: list(names) for r, names in rows.items()} for dev, rows in SELECTION.items()},
        "backends": status,
        "load_errors": dict(_load_errors),
        "cusparselt_layout": cusparselt_layout_enabled(),
        "layout_bytes": layout_bytes(),
        "workspace_bytes": {b.name: n for b in backends() if (n := b.workspace_bytes())},
        "choices": {_key_text(k): c.backend.name for k, c in _cache.items()},
        "passed_over": {_key_text(k): dict(c.reasons) for k, c in _cache.items() if c.reasons},
    }
