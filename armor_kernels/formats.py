"""The packed per-layer ARMOR format: the contract between solver, runtime and kernels.

A pruned linear layer ``y = x W_hatᵀ + bias`` with ``W_hat = A · S · B``:

- ``a``: output wrapper, ``[d_out/b_out, b_out, b_out]`` (the diagonal blocks of A);
- ``b``: input wrapper, ``[d_in/b_in, b_in, b_in]`` (the diagonal blocks of B);
- ``values`` ``[d_out, d_in/2]`` + ``meta`` ``uint8``: the 2:4 core S, compressed
  (see ``sparse24``); there is never a dense copy;
- ``bias``: optional ``[d_out]``.

``a``, ``b``, ``values`` and ``bias`` share one floating dtype and one device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from . import sparse24

FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ArmorFormatError(ValueError):
    """A packed layer breaks a rule of the format; the message names the tensor and the rule."""


def valid_block_sizes(dim: int, multiple_of: int = 1) -> list[int]:
    """Block sizes that divide ``dim`` and are multiples of ``multiple_of``, ascending."""
    return [b for b in range(multiple_of, dim + 1, multiple_of) if dim % b == 0]


def choose_block_size(dim: int, preferred: int, multiple_of: int = 1) -> int:
    """Largest valid block size <= ``preferred`` (576 with 128 -> 96 for the input side)."""
    sizes = [b for b in valid_block_sizes(dim, multiple_of) if b <= preferred]
    if not sizes:
        raise ArmorFormatError(
            f"dimension {dim} has no block size <= {preferred} that divides it and is a multiple of {multiple_of}"
        )
    return sizes[-1]


WRAPPER_BUDGET = 0.0625  # wrapper share of a layer: the paper's b = 128 on 4096-wide layers
MAX_BLOCK = 128  # the paper's block size; larger blocks cost more than they gain in the kernels


def wrapper_overhead(d_out: int, d_in: int, block_out: int, block_in: int) -> float:
    """Wrapper elements per dense element: ``A`` holds ``d_out·block_out``, ``B`` ``d_in·block_in``."""
    return block_out / d_in + block_in / d_out


def block_pair(d_out: int, d_in: int, preferred: int | None = None, budget: float = WRAPPER_BUDGET,
               largest: int = MAX_BLOCK) -> tuple[int, int]:
    """(output block, input block) of a ``d_out x d_in`` layer; the input block is a multiple of 4.

    ``preferred`` given: the largest valid sizes <= it on each side (576 with 128 -> 96, 96).
    ``preferred`` None: the largest ``p <= largest`` whose pair keeps ``wrapper_overhead <= budget``
    (576x576 at 6.25 %: 18, 16); the smallest pair (1, 4) when none does.
    """
    if preferred is not None:
        return choose_block_size(d_out, preferred, 1), choose_block_size(d_in, preferred, 4)
    for p in range(largest, 3, -1):
        bo, bi = choose_block_size(d_out, p, 1), choose_block_size(d_in, p, 4)
        if wrapper_overhead(d_out, d_in, bo, bi) <= budget:
            return bo, bi
    return 1, choose_block_size(d_in, 4, 4)


class PackedShape:
    """Shape and dtype read off the packed tensors ``a``, ``values``, ``b``: shared by ``ArmorWeights`` and
    ``armor_runtime.ArmorLinear`` (which holds the same tensors as buffers)."""

    @property
    def d_out(self) -> int:
        return self.values.shape[0]

    @property
    def d_in(self) -> int:
        return 2 * self.values.shape[1]

    @property
    def block_out(self) -> int:
        return self.a.shape[-1]

    @property
    def block_in(self) -> int:
        return self.b.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device


def layer_bytes(d_out: int, d_in: int, block_out: int, block_in: int, elem: int = 2) -> dict[str, int]:
    """Bytes of one layer's weight in each form, with ``elem``-byte values (bias excluded: equal in all).

    dense ``elem·d_out·d_in``; the 2:4 core ``elem·d_out·d_in/2`` + 4-bit metadata ``d_out·d_in/8``
    (9/16 of dense in 2-byte dtypes); the wrappers ``elem·(b_out·d_out + b_in·d_in)`` (n blocks of b x b a side).
    """
    dense = elem * d_out * d_in
    core = elem * d_out * (d_in // 2) + d_out * sparse24.meta_shape(d_out, d_in)[1]
    wrappers = elem * (block_out * d_out + block_in * d_in)
    return {"dense": dense, "plain24": core, "armor_core": core, "armor_wrappers": wrappers, "armor": core + wrappers}


@dataclass
class ArmorWeights(PackedShape):
    a: torch.Tensor
    values: torch.Tensor
    meta: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor, bias omitted when absent (the checkpoint layout)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["bias"] is None:
            del out["bias"]
        return out

    def nbytes(self) -> dict[str, int]:
        core = self.values.nbytes + self.meta.nbytes
        wrappers = self.a.nbytes + self.b.nbytes
        bias = 0 if self.bias is None else self.bias.nbytes
        return {"core": core, "wrappers": wrappers, "bias": bias, "total": core + wrappers + bias}

    # ---- construction -------------------------------------------------------
    @classmethod
    def from_factors(
        cls,
        a: torch.Tensor,
        core: torch.Tensor,
        b: torch.Tensor,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> ArmorWeights:
        """Pack block wrappers and a dense 2:4 core (with its keep-mask if known).

        ``a``/``b`` may be block stacks ``[n, b, b]``. ``dtype`` casts everything
        (the solver works in fp32 and deploys in the model's dtype).
        """
        dtype = dtype or core.dtype
        core = core.to(dtype)
        values, meta = sparse24.compress(core, mask)
        w = cls(
            a=a.to(dtype).contiguous(),
            values=values,
            meta=meta,
            b=b.to(dtype).contiguous(),
            bias=None if bias is None else bias.to(dtype).contiguous(),
        )
        w.validate()
        return w

    @classmethod
    def from_dense(cls, core: torch.Tensor, block_out: int, block_in: int, bias=None, mask=None) -> ArmorWeights:
        """Identity wrappers around a 2:4 core: plain 2:4 expressed in ARMOR form."""
        d_out, d_in = core.shape
        eye_out = torch.eye(block_out, dtype=core.dtype, device=core.device).expand(d_out // block_out, -1, -1)
        eye_in = torch.eye(block_in, dtype=core.dtype, device=core.device).expand(d_in // block_in, -1, -1)
        return cls.from_factors(eye_out, core, eye_in, bias=bias, mask=mask)

    def core(self) -> torch.Tensor:
        """The dense 2:4 core (debugging and reference only)."""
        return sparse24.decompress(self.values, self.meta)

    def to(self, *args, **kwargs) -> ArmorWeights:
        """Move/cast; ``meta`` keeps uint8 whatever the dtype asked for."""
        moved = {}
        for name, t in self.tensors().items():
            if name == "meta":
                device = kwargs.get("device") or next((x for x in args if isinstance(x, (str, torch.device))), None)
                moved[name] = t if device is None else t.to(device)
            else:
                moved[name] = t.to(*args, **kwargs)
        return replace(self, **moved)

    # ---- validation ---------------------------------------------------------
    def validate(self, prefix: str = "") -> None:
        """Raise ``ArmorFormatError`` naming the tensor and the rule it breaks."""
        p = prefix + "." if prefix and not prefix.endswith(".") else prefix

        def fail(msg: str):
            raise ArmorFormatError(msg)

        v, m, a, b = self.values, self.meta, self.a, self.b
        if v.dim() != 2:
            fail(f"{p}values: expected [d_out, d_in/2], got shape {tuple(v.shape)}")
        d_out, d_in = v.shape[0], 2 * v.shape[1]
        if d_in % 4:
            fail(f"{p}values: d_in = {d_in} is not a multiple of 4 (2:4 groups are 4 columns wide)")
        for name, t in (("a", a), ("b", b)):
            if t.dim() != 3 or t.shape[1] != t.shape[2]:
                fail(f"{p}{name}: expected square blocks [n_blocks, block, block], got shape {tuple(t.shape)}")
        b_out, b_in = a.shape[-1], b.shape[-1]
        if b_out < 1 or d_out % b_out or a.shape[0] != d_out // b_out:
            fail(f"{p}a: {a.shape[0]} blocks of {b_out} do not tile d_out = {d_out} (block size must divide d_out)")
        if b_in < 1 or d_in % b_in or b.shape[0] != d_in // b_in:
            fail(f"{p}b: {b.shape[0]} blocks of {b_in} do not tile d_in = {d_in} (block size must divide d_in)")
        if b_in % 4:
            fail(f"{p}b: block size {b_in} is not a multiple of 4 (input blocks must hold whole 2:4 groups)")
        if self.bias is not None and tuple(self.bias.shape) != (d_out,):
            fail(f"{p}bias: expected shape ({d_out},), got {tuple(self.bias.shape)}")
        if v.dtype not in FLOAT_DTYPES:
            fail(f"{p}values: dtype {v.dtype} is not one of float32, float16, bfloat16")
        for name, t in self.tensors().items():
            if name != "meta" and t.dtype != v.dtype:
                fail(f"{p}{name}: dtype {t.dtype} differs from values' {v.dtype} (one dtype per layer)")
            if t.device != v.device:
                fail(f"{p}{name}: on {t.device}, values on {v.device} (one device per layer)")
            if name != "meta" and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                fail(f"{p}{name}: contains NaN or Inf")
        if m.device.type != "meta":
            try:
                sparse24.check_meta(m, d_in, name=f"{p}meta")
            except sparse24.Sparse24Error as e:
                raise ArmorFormatError(str(e)) from None
