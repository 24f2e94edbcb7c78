"""ArmorLinear: a drop-in for ``nn.Linear`` that holds only the packed ARMOR tensors.

Buffers (the checkpoint names): ``a`` ``[d_out/b_out, b_out, b_out]``, ``values``
``[d_out, d_in/2]``, ``meta`` uint8 ``[d_out, ceil(d_in/8)]``, ``b``
``[d_in/b_in, b_in, b_in]`` and ``bias`` ``[d_out]`` (or None). There is never a
dense weight: ``forward`` calls ``armor_kernels.armor_linear`` and the dispatcher
picks the backend (the pure-torch reference on CPU).

Dtypes. The input must be floating point (float32, float16, bfloat16 or float64);
integer, bool and complex inputs raise a ``TypeError``, as ``nn.Linear`` refuses
them. The output has the input's dtype. Unlike ``nn.Linear``, the input and the
layer may differ in dtype: the reference path computes in float32 (float64 for a
float64 input) from the stored values and rounds once at the end, so a bf16 layer
fed fp32 inputs gives fp32 outputs of the bf16 weights, and an fp32 layer fed
bf16 inputs gives bf16 outputs. The fast GPU backends need one 16-bit dtype for
input and layer; for any other pair the dispatcher passes them over (``armor
env``, ``print(layer)`` show the choice).
"""

from __future__ import annotations

import torch
from torch import nn

import armor_kernels
from armor_kernels import ArmorFormatError, ArmorWeights, block_pair, dispatch, reference, sparse24
from armor_kernels.formats import PackedShape

# Token counts used to show which backend each regime would get (decode <= 16 tokens).
_REPR_TOKENS = {"decode": 1, "prefill": 2048}
# The nibble of the pattern "keep columns 0 and 1" (0 | 1 << 2): a valid placeholder core.
_PLACEHOLDER_NIBBLE = 0 | (1 << 2)


class NoDenseWeightError(AttributeError):
    """``.weight`` was read on an ArmorLinear, which stores no dense weight.

    An AttributeError so that ``hasattr(module, "weight")`` stays False for code
    that probes for it.
    """


def _prepare_after_load(module: ArmorLinear, _incompatible_keys) -> None:
    # a module-level function (not a lambda) so that ArmorLinear models stay picklable
    module.prepare()


class ArmorLinear(PackedShape, nn.Module):
    """``y = ((x Bᵀ) Sᵀ) Aᵀ + bias`` with S 2:4 sparse and A, B block-diagonal.

    ``block_out``/``block_in`` default to the largest divisor of the side that is
    <= 128 (input blocks also a multiple of 4), e.g. 96 for a 576-wide side.
    A freshly built module holds identity wrappers and an all-zero core (a valid
    layer that outputs the bias); on the meta device the buffers are empty.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_out: int | None = None,
        block_in: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_features % 4:
            raise ArmorFormatError(f"in_features = {in_features} is not a multiple of 4 (2:4 groups are 4 columns wide)")
        default_out, default_in = block_pair(out_features, in_features, 128)
        block_out = default_out if block_out is None else int(block_out)
        block_in = default_in if block_in is None else int(block_in)
        if block_out < 1 or out_features % block_out:
            raise ArmorFormatError(f"block_out = {block_out} does not divide out_features = {out_features}")
        if block_in < 4 or in_features % block_in or block_in % 4:
            raise ArmorFormatError(
                f"block_in = {block_in} must divide in_features = {in_features} and be a multiple of 4"
            )
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        fk = {"dtype": dtype, "device": device}
        n_out, n_in = out_features // block_out, in_features // block_in
        meta_cols = sparse24.meta_shape(out_features, in_features)[1]
        on_meta = torch.device(device or "cpu").type == "meta"
        if on_meta:
            # shapes only: the loader assigns the real tensors
            a = torch.empty(n_out, block_out, block_out, **fk)
            b = torch.empty(n_in, block_in, block_in, **fk)
            values = torch.empty(out_features, in_features // 2, **fk)
            meta = torch.empty(out_features, meta_cols, dtype=torch.uint8, device=device)
        else:
            a = torch.eye(block_out, **fk).repeat(n_out, 1, 1)
            b = torch.eye(block_in, **fk).repeat(n_in, 1, 1)
            values = torch.zeros(out_features, in_features // 2, **fk)
            nibbles = torch.full((out_features, in_features // 4), _PLACEHOLDER_NIBBLE, dtype=torch.uint8, device=device)
            meta = sparse24.pack_nibbles(nibbles)
        self.register_buffer("a", a)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("b", b)
        self.register_buffer("bias", torch.zeros(out_features, **fk) if bias else None)
        # layouts built by backends at load time, never in forward
        self.register_load_state_dict_post_hook(_prepare_after_load)

    # ---- construction -------------------------------------------------------
    @classmethod
    def from_weights(cls, w: ArmorWeights, name: str = "") -> ArmorLinear:
        """Wrap packed weights (validated, made contiguous; no dense copy is made)."""
        w.validate(name)
        layer = cls(
            w.d_in, w.d_out, bias=w.bias is not None, block_out=w.block_out, block_in=w.block_in,
            dtype=w.dtype, device="meta",
        )
        for key, t in w.tensors().items():
            setattr(layer, key, t.contiguous())
        layer.prepare()
        return layer

    def weights(self) -> ArmorWeights:
        """The packed tensors as ``ArmorWeights`` (shared storage, no copy)."""
        return ArmorWeights(a=self.a, values=self.values, meta=self.meta, b=self.b, bias=self.bias)

    def validate(self, name: str = "") -> None:
        """Raise ``ArmorFormatError`` naming ``name.<tensor>`` and the broken rule."""
        self.weights().validate(name)

    def prepare(self) -> None:
        """Let the backends build kernel-specific layouts (after load, convert or ``.to()``)."""
        if self.values.device.type != "meta":
            dispatch.prepare(self.a, self.values, self.meta, self.b, self.bias)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() go through here; nn.Module.to never casts the uint8 meta
        out = super()._apply(fn, recurse)
        self.prepare()
        return out

    # ---- compute ------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # a static dtype check: no graph break, no host sync
            raise TypeError(
                f"ArmorLinear({self.in_features} -> {self.out_features}): input dtype {x.dtype} is not floating "
                "point; like nn.Linear it takes float32, float16, bfloat16 or float64 inputs"
            )
        return armor_kernels.armor_linear(x, self.a, self.values, self.meta, self.b, self.bias)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_hat = A·S·B`` as a dense ``[out_features, in_features]`` tensor (debugging, export).

        fp32 unless ``dtype`` is given.
        """
        w = reference.materialize(self.a, self.values, self.meta, self.b)
        return w if dtype is None else w.to(dtype)

    # ---- nn.Linear look-alike (shape and dtype come from PackedShape) ----------
    def __getattr__(self, name: str):
        if name == "weight":
            raise NoDenseWeightError(
                f"ArmorLinear({self.in_features} -> {self.out_features}) has no dense .weight: it stores the "
                "packed factors a, values, meta, b (W_hat = A·S·B). Use .to_dense() for W_hat, or .weights() "
                "for the packed tensors."
            )
        return super().__getattr__(name)

    def backends(self) -> dict[str, str]:
        """Backend the dispatcher picks (or why none) for decode and prefill on the layer's device and dtype."""
        if self.values.device.type == "meta":
            return {r: "chosen at first call (weights on meta)" for r in _REPR_TOKENS}
        out = {}
        for regime, tokens in _REPR_TOKENS.items():
            x = torch.empty(tokens, self.in_features, dtype=self.dtype, device=self.values.device)
            try:
                out[regime] = dispatch.select("armor_linear", x, self.a, self.values, self.meta, self.b, self.bias).backend.name
            except dispatch.BackendUnavailable as e:
                out[regime] = f"none ({e})"
        return out

    def extra_repr(self) -> str:
        be = self.backends()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_out={self.block_out}, block_in={self.block_in}, dtype={str(self.dtype).replace('torch.', '')}, "
            f"values={tuple(self.values.shape)}, meta={tuple(self.meta.shape)}, "
            f"backend(decode)={be['decode']}, backend(prefill)={be['prefill']}"
        )
