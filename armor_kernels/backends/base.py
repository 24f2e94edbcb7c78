"""The interface every backend implements."""

from __future__ import annotations

import torch

# The public ops (declared as torch.library ops in ``armor_kernels._ops``).
OPS = ("blockdiag_matmul", "sparse24_matmul", "armor_linear")


class Backend:
    """A set of op implementations with a priority (higher is tried first).

    Subclasses implement the ops they support as methods named like the op,
    taking the op's arguments; ``ops`` lists them.
    """

    name = "base"
    priority = 0
    ops: tuple[str, ...] = ()

    def is_available(self) -> tuple[bool, str]:
        """(True, "") when usable in this process, else (False, why not)."""
        return True, ""

    def can_implement(self, op: str, x: torch.Tensor, *weights) -> tuple[bool, str]:
        """(True, "") when this backend runs ``op`` for these inputs, else (False, why not)."""
        if op not in self.ops:
            return False, f"{self.name} has no {op}"
        return True, ""

    def prepare(self, a, values, meta, b, bias) -> None:
        """Build and cache any kernel-specific layout of a layer (e.g. cuSPARSELt's
        compressed buffer). Called at load / convert / ``.to()`` time so that forward
        never converts formats. Default: nothing to build."""

    def run(self, op: str, *args):
        return getattr(self, op)(*args)
