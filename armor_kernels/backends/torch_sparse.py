"""The 2:4 core through PyTorch's bundled cuSPARSELt (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``).

- ``prepare()`` builds cuSPARSELt's compressed buffer of a layer once (load time);
  a layer never prepared is compressed on its first call.
- The algorithm (id, split-k) is searched once per (device, dtype, d_out, d_in,
  token bucket) on the first call of that class and cached: the id changes
  speed by up to 2x, so alg 0 is used only when no search function exists, and
  ``plans()`` (shown by ``armor env``) says so.
- Signatures moved between torch releases: the search is
  ``torch._C._cusparselt.mm_search`` (newer) or ``torch._cslt_sparse_mm_search``
  (older); ``_cslt_sparse_mm``'s keyword names are read from its schema.

Only ``sparse24_matmul``: cuSPARSELt's epilogue offers bias and scale, not a
block-diagonal ``A``, so ``armor_linear`` is composed by ``dispatch``.
cuSPARSELt pads few-token products and is slow there (0.11x dense at 1 token
for 4096²), hence the low rank in the decode regime.
"""

from __future__ import annotations

import weakref

import torch

from .. import sparse24
from .base import Backend

# torch's own limits for cuSPARSELt fp16/bf16: sparse dims multiples of 16, dense of 8
SPARSE_MULTIPLE = 16
DENSE_MULTIPLE = 8
DTYPES = (torch.float16, torch.bfloat16)


def _schema_args() -> set[str]:
    try:
        return {a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    except Exception:  # noqa: BLE001 - an old torch without the op
        return set()


def _bucket(tokens: int) -> int:
    """Token counts sharing one searched algorithm: powers of two."""
    return 1 << max(0, tokens - 1).bit_length()


class TorchSparseBackend(Backend):
    name = "torch_sparse"
    priority = 20
    ops = ("sparse24_matmul",)

    def __init__(self):
        # (device, data pointers, shape, dtype) -> (weak ref to values, compressed buffer)
        self._packed: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
        self._algs: dict[tuple, dict] = {}
        self._notes: dict[tuple, str] = {}

    def rank(self, device_type: str, regime: str) -> int:
        return 5 if regime == "decode" else self.priority

    # ---- availability -------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        if not hasattr(torch, "_cslt_compress") or not hasattr(torch, "_cslt_sparse_mm"):
            return False, f"torch {torch.__version__} has no cuSPARSELt ops (torch._cslt_compress missing)"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU (cuSPARSELt runs on sm_80 and newer)"
        cusparselt = getattr(torch.backends, "cusparselt", None)
        if cusparselt is None or not cusparselt.is_available():
            return False, "this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
        return True, ""

    def can_implement(self, op: str, x: torch.Tensor, *weights) -> tuple[bool, str]:
        ok, why = super().can_implement(op, x, *weights)
        if not ok:
            return ok, why
        values = weights[0]
        if x.device.type != "cuda":
            return False, f"tensors on {x.device.type}; cuSPARSELt needs CUDA"
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 8:
            return False, f"GPU sm_{major}{minor}: 2:4 sparse tensor cores need sm_80 or newer"
        if x.dtype not in DTYPES or values.dtype != x.dtype:
            return False, f"x {x.dtype}, values {values.dtype}: cuSPARSELt here takes float16 or bfloat16, one dtype"
        d_out, d_in = values.shape[0], 2 * values.shape[1]
        if d_out % SPARSE_MULTIPLE or d_in % SPARSE_MULTIPLE:
            return False, f"core {d_out}x{d_in}: cuSPARSELt needs both dims multiples of {SPARSE_MULTIPLE}"
        return True, ""

    # ---- layouts and plans --------------------------------------------------
    @staticmethod
    def _key(values: torch.Tensor, meta: torch.Tensor) -> tuple:
        return (values.device, values.data_ptr(), meta.data_ptr(), tuple(values.shape), values.dtype)

    def prepare(self, a, values, meta, b, bias) -> None:
        if values.device.type == "cuda" and values.dtype in DTYPES:
            self._compressed(values, meta)

    def _compressed(self, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        key = self._key(values, meta)
        ref, packed = self._packed.get(key, (None, None))
        # the weak reference guards against a freed layer's address being reused
        if ref is None or ref() is not values:
            packed = torch._cslt_compress(sparse24.decompress(values, meta))
            self._packed[key] = (weakref.ref(values), packed)
        return packed

    def _search(self, packed, dense_t, bias) -> tuple[dict, str]:
        """(keyword arguments for ``_cslt_sparse_mm``, how they were found)."""
        names = _schema_args()
        found = None
        note = ""
        mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
        try:
            if mm_search is not None:
                found = mm_search(packed, dense_t, bias, None, None, True)
                note = "torch._C._cusparselt.mm_search"
            elif hasattr(torch, "_cslt_sparse_mm_search"):
                found = torch._cslt_sparse_mm_search(packed, dense_t, bias=bias, transpose_result=True)
                note = "torch._cslt_sparse_mm_search"
        except Exception as e:  # noqa: BLE001 - a failed search must stay visible, not fatal
            note = f"search failed ({type(e).__name__}: {e}); using alg 0"
        if found is None:
            return {}, note or "no search function in this torch; using alg 0"
        if isinstance(found, (tuple, list)):
            alg_id, split_k, mode = (list(found) + [1, -1])[:3]
        else:
            alg_id, split_k, mode = found, None, None
        kwargs = {"alg_id": int(alg_id)}
        if split_k is not None and "split_k" in names:
            kwargs["split_k"] = int(split_k)
        if mode is not None and "split_k_mode" in names:
            kwargs["split_k_mode"] = int(mode)
        elif mode is not None and "split_k_one_kernel" in names:
            kwargs["split_k_one_kernel"] = bool(mode)
        return kwargs, f"{note}: {kwargs}"

    def plans(self) -> dict[str, str]:
        """Searched algorithms so far: 'dtype d_out x d_in tokens<=N on device' -> how/what."""
        return {
            f"{str(k[1]).replace('torch.', '')} {k[2]}x{k[3]} tokens<={k[4]} on {k[0]}": v
            for k, v in self._notes.items()
        }

    # ---- op ---------------------------------------------------------------
    def sparse24_matmul(self, x, values, meta, bias=None):
        d_out, d_in = values.shape[0], 2 * values.shape[1]
        if x.shape[-1] != d_in:
            raise ValueError(f"x: last dim {x.shape[-1]} does not match d_in = {d_in}")
        x2 = x.reshape(-1, d_in)
        tokens = x2.shape[0]
        pad = (-tokens) % DENSE_MULTIPLE
        if pad:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
        packed = self._compressed(values, meta)
        # S · xᵀ with the result transposed in the epilogue: [tokens, d_out] row-major
        dense_t = x2.t()
        key = (x.device, x.dtype, d_out, d_in, _bucket(x2.shape[0]), bias is not None)
        if key not in self._algs:
            self._algs[key], self._notes[key[:5]] = self._search(packed, dense_t, bias)
        y = torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, **self._algs[key])
        return y[:tokens].reshape(*x.shape[:-1], d_out)


BACKEND = TorchSparseBackend()
