"""The interface every backend implements, and the checks they share.

A backend declares what it can run (``ops``, ``device_types``, ``min_capability``,
``dtypes``, token limits per op); ``Backend.can_implement`` applies those checks
once, here, and a backend adds only its own rules in ``check``. The order in which
backends are tried is not a property of a backend: it is the table in ``dispatch``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import ClassVar

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..formats import FLOAT_DTYPES

__all__ = [
    "CUSPARSELT_LAYOUT_ENV", "DECODE_MAX_TOKENS", "FLOAT_DTYPES", "HALF_DTYPES", "OPS", "Backend", "LayoutCache",
    "cusparselt_layout_enabled", "next_power_of_two", "second_copy_allowed", "tokens",
]  # fmt: skip

# The public ops (declared as torch.library ops in ``armor_kernels._ops``).
OPS = ("blockdiag_matmul", "sparse24_matmul", "armor_linear")

# Decode: at most this many tokens per call. Memory-bound (the weights are read once for
# every token), the regime of the small-batch kernels; more tokens go to tensor-core GEMMs.
DECODE_MAX_TOKENS = 16
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Opt-in: keep cuSPARSELt's compressed copy of each 2:4 core next to values/meta (faster
# prefill on 2:4 tensor cores, +9/16 of the dense bytes per layer). Off by default.
CUSPARSELT_LAYOUT_ENV = "ARMOR_CUSPARSELT_LAYOUT"


def cusparselt_layout_enabled() -> bool:
    """True when ``ARMOR_CUSPARSELT_LAYOUT=1``: layers may hold a second, cuSPARSELt copy of the core."""
    return os.environ.get(CUSPARSELT_LAYOUT_ENV, "").strip() == "1"


def second_copy_allowed(backend_name: str) -> bool:
    """A backend whose kernel needs its own copy of the core builds it only when asked:
    ``ARMOR_CUSPARSELT_LAYOUT=1``, or ``ARMOR_BACKEND`` naming that backend."""
    return cusparselt_layout_enabled() or os.environ.get("ARMOR_BACKEND", "").strip() == backend_name


def tokens(x: torch.Tensor) -> int:
    """Rows of the flattened input: every leading dim counts as tokens."""
    return x.numel() // max(x.shape[-1], 1)


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


class LayoutCache:
    """Per-layer layouts keyed weakly by the layer's ``values`` tensor: an entry goes when
    the tensor does (a freed or moved layer frees its layout), and an in-place change of
    ``values`` (its version counter moves) rebuilds it on the next ``get``."""

    def __init__(self, nbytes: Callable[[object], int]):
        self._entries = WeakTensorKeyDictionary()  # values -> (version, layout)
        self._nbytes = nbytes

    @staticmethod
    def _version(t: torch.Tensor) -> int:
        try:
            return t._version
        except RuntimeError:  # inference tensors have no version counter: built once
            return -1

    def get(self, values: torch.Tensor, build: Callable[[], object]):
        entry = self._entries.get(values)
        version = self._version(values)
        if entry is None or entry[0] != version:
            entry = (version, build())
            self._entries[values] = entry
        return entry[1]

    def __contains__(self, values: torch.Tensor) -> bool:
        return values in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def pop(self, values: torch.Tensor | None = None) -> None:
        if values is None:
            self._entries.clear()
        else:
            self._entries.pop(values, None)

    def nbytes(self, values: torch.Tensor | None = None) -> int:
        if values is not None:
            entry = self._entries.get(values)
            return self._nbytes(entry[1]) if entry is not None else 0
        return sum(self._nbytes(layout) for _, layout in self._entries.values())


def _sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


class Backend:
    """A set of op implementations.

    Subclasses implement the ops they support as methods named like the op, taking
    the op's arguments; ``ops`` lists them. Declared limits (checked by
    ``can_implement``, the reason naming the rule):

    - ``device_types``: device types of the tensors it takes, all on one device (``None``: any);
    - ``min_capability``: on CUDA, the lowest compute capability, e.g. ``(8, 0)``;
    - ``dtypes``: float dtypes it takes (``None``: any), and ``one_dtype``: ``x`` and the
      float weights must share one;
    - ``max_tokens`` / ``min_tokens``: per op, e.g. ``{"sparse24_matmul": DECODE_MAX_TOKENS}``.
    """

    name = "base"
    ops: tuple[str, ...] = ()
    device_types: tuple[str, ...] | None = None
    min_capability: tuple[int, int] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    one_dtype = False
    max_tokens: ClassVar[dict[str, int]] = {}
    min_tokens: ClassVar[dict[str, int]] = {}

    def is_available(self) -> tuple[bool, str]:
        """(True, "") when usable in this process, else (False, why not)."""
        return True, ""

    # ---- shared checks ---------------------------------------------------------------
    def check_device(self, x: torch.Tensor, weights: tuple) -> str:
        if self.device_types is not None and x.device.type not in self.device_types:
            return f"tensors on {x.device.type}: {self.name} needs {' or '.join(self.device_types).upper()}"
        for t in weights:
            if isinstance(t, torch.Tensor) and t.device != x.device:
                return f"x on {x.device}, a weight on {t.device}: {self.name} needs all on one device"
        if x.device.type == "cuda" and self.min_capability is not None:
            cap = torch.cuda.get_device_capability(x.device)
            if tuple(cap) < self.min_capability:
                return (
                    f"GPU {_sm(cap)}: {self.name} needs {_sm(self.min_capability)} or newer (2:4 sparse tensor cores)"
                )
        return ""

    def check_dtypes(self, x: torch.Tensor, weights: tuple) -> str:
        floats = [t for t in (x, *weights) if isinstance(t, torch.Tensor) and t.dtype != torch.uint8]
        for t in floats if self.dtypes is not None else ():
            if t.dtype not in self.dtypes:
                names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                return f"dtype {str(t.dtype).replace('torch.', '')}: {self.name} takes {names}"
        other = next((t.dtype for t in floats if t.dtype != x.dtype), None) if self.one_dtype else None
        if other is not None:
            return f"x is {x.dtype}, a weight {other}: {self.name} needs one dtype"
        return ""

    def check_tokens(self, op: str, x: torch.Tensor) -> str:
        n = tokens(x)
        if op in self.max_tokens and n > self.max_tokens[op]:
            return f"{n} tokens: {self.name}'s {op} covers at most {self.max_tokens[op]} (the decode regime)"
        if op in self.min_tokens and n < self.min_tokens[op]:
            return f"{n} tokens: {self.name}'s {op} starts at {self.min_tokens[op]} (decode goes to the small-batch kernel)"
        return ""

    def check(self, op: str, x: torch.Tensor, *weights) -> str:
        """The backend's own rules beyond the declared limits: "" when fine, else why not."""
        return ""

    def can_implement(self, op: str, x: torch.Tensor, *weights) -> tuple[bool, str]:
        """(True, "") when this backend runs ``op`` for these inputs, else (False, why not)."""
        if op not in self.ops:
            return False, f"{self.name} has no {op}"
        for why in (
            self.check_device(x, weights),
            self.check_dtypes(x, weights),
            self.check_tokens(op, x),
            self.check(op, x, *weights),
        ):
            if why:
                return False, why
        return True, ""

    # ---- layouts (load time) -----------------------------------------------------------
    def prepare(self, a, values, meta, b, bias) -> None:
        """Build and cache any kernel-specific layout of a layer (e.g. cuSPARSELt's
        compressed buffer). Called at load / convert / ``.to()`` time, only for the
        backends the layer will run, so that forward never converts formats."""

    def release(self, values: torch.Tensor | None = None) -> None:
        """Drop the layouts built for ``values`` (all of them when None)."""

    def layout_bytes(self, values: torch.Tensor | None = None) -> int:
        """Device bytes held in layouts for ``values`` (for all layers when None)."""
        return 0

    def workspace_bytes(self) -> int:
        """Device bytes in buffers shared by all layers (workspaces, scratch), not per layer."""
        return 0

    def run(self, op: str, *args):
        return getattr(self, op)(*args)
