"""PyTorch's bundled cuSPARSELt (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``): the
``torch_sparse`` backend, and the one wrapper of it that the benchmarks use for plain 2:4.

- ``compress(w)``: a dense 2:4 matrix -> cuSPARSELt's compressed buffer (load time).
- ``matmul(packed, x, d_out, bias, search=True)``: ``x · Wᵀ (+ bias)``; tokens are padded
  to a multiple of 8 inside the call (cuSPARSELt's minimum for the dense operand), the
  product is ``(W · xᵀ)ᵀ`` with the transpose done by the kernel's epilogue.
- The algorithm (id, split-k) is searched once per (device, dtype, d_out, d_in, token
  bucket, bias) on the first call of that class and cached (bounded): the id changes
  speed by up to 2x, so alg 0 is used only when no search function exists, and
  ``plans()`` (shown by ``armor env``) says so. ``search=False`` runs alg 0.
- Signatures moved between torch releases: the search is
  ``torch._C._cusparselt.mm_search`` (newer) or ``torch._cslt_sparse_mm_search``
  (older); ``_cslt_sparse_mm``'s keyword names are read from its schema.

The backend runs only ``sparse24_matmul``: cuSPARSELt's epilogue offers bias and scale,
not a block-diagonal ``A``, so ``armor_linear`` is composed by ``dispatch``. Its layout is
a second copy of the core (9/16 of the dense bytes), so it is built only when asked:
``ARMOR_CUSPARSELT_LAYOUT=1`` or ``ARMOR_BACKEND=torch_sparse``.
"""

from __future__ import annotations

import torch

from .. import sparse24
from .base import HALF_DTYPES, Backend, LayoutCache, next_power_of_two, second_copy_allowed

# torch's own limits for cuSPARSELt fp16/bf16: sparse dims multiples of 16, dense of 8
SPARSE_MULTIPLE = 16
DENSE_MULTIPLE = 8
# searched algorithms kept (a few per layer shape and token bucket); past this, searched again
MAX_SEARCHED = 1024


def _schema_args() -> set[str]:
    try:
        return {a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    except Exception:  # noqa: BLE001 - an old torch without the op
        return set()


def status() -> tuple[bool, str]:
    """(True, "") when PyTorch's cuSPARSELt can run on this machine's current GPU, else why not."""
    if not hasattr(torch, "_cslt_compress") or not hasattr(torch, "_cslt_sparse_mm"):
        return False, f"torch {torch.__version__} has no cuSPARSELt ops (torch._cslt_compress missing)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (cuSPARSELt runs on sm_80 and newer)"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is None or not cusparselt.is_available():
        return False, "this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU sm_{major}{minor}: 2:4 sparse tensor cores need sm_80 or newer"
    return True, ""


def compress(w: torch.Tensor) -> torch.Tensor:
    """A dense 2:4 ``[d_out, d_in]`` fp16/bf16 CUDA matrix -> cuSPARSELt's compressed buffer."""
    return torch._cslt_compress(w.contiguous())


def search(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> tuple[dict, str]:
    """(keyword arguments for ``_cslt_sparse_mm``, how they were found) for this product."""
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
    if isinstance(found, (tuple, list)):  # (alg_id, split_k, split_k_mode or split_k_one_kernel, max_alg_id)
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
    return kwargs, note


# (device, dtype, d_out, d_in, token bucket, has bias) -> _cslt_sparse_mm keyword arguments / how found
_searched: dict[tuple, dict] = {}
_notes: dict[tuple, str] = {}


def _call(packed, dense_t, bias, key, kwargs):
    try:
        return torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, **kwargs)
    except TypeError:  # split-k arguments this torch does not take: keep the algorithm only
        kwargs = {"alg_id": kwargs.get("alg_id", 0)}
        if key is not None:
            _searched[key] = kwargs
            _notes[key] = _notes.get(key, "") + "; split-k arguments not accepted, alg id only"
        return torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, **kwargs)


def _class_key(x: torch.Tensor, d_out: int, has_bias: bool) -> tuple:
    n = x.numel() // max(x.shape[-1], 1)
    padded = n + (-n) % DENSE_MULTIPLE
    return (x.device, x.dtype, d_out, x.shape[-1], next_power_of_two(padded), has_bias)


def searched_for(x: torch.Tensor, d_out: int, has_bias: bool = False) -> tuple[dict, str]:
    """(keyword arguments, how found) that ``matmul`` uses for inputs like ``x``; ({}, why) before its first call."""
    key = _class_key(x, d_out, has_bias)
    return _searched.get(key, {}), _notes.get(key, "not searched yet")


def matmul(
    packed: torch.Tensor, x: torch.Tensor, d_out: int, bias: torch.Tensor | None = None, search_alg: bool = True
) -> torch.Tensor:
    """``x · Wᵀ (+ bias)`` -> ``[..., d_out]`` with ``W`` given as cuSPARSELt's buffer ``packed``.

    ``search_alg``: use the algorithm searched for this class (searched on its first call);
    False runs the default algorithm 0.
    """
    d_in = x.shape[-1]
    x2 = x.reshape(-1, d_in)
    n = x2.shape[0]
    pad = (-n) % DENSE_MULTIPLE
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    dense_t = x2.t()
    if not search_alg:
        y = torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, alg_id=0)
    else:
        key = _class_key(x, d_out, bias is not None)
        if key not in _searched:
            if len(_searched) >= MAX_SEARCHED:
                _searched.clear()
                _notes.clear()
            _searched[key], _notes[key] = search(packed, dense_t, bias)
        y = _call(packed, dense_t, bias, key, _searched[key])
    return (y[:n] if pad else y).reshape(*x.shape[:-1], d_out)


def plans() -> dict[str, str]:
    """Searched algorithms so far: 'dtype d_out x d_in tokens<=N on device' -> how/what."""
    return {
        f"{str(k[1]).replace('torch.', '')} {k[2]}x{k[3]} tokens<={k[4]}{' +bias' if k[5] else ''} on {k[0]}": (
            f"{how}: {_searched.get(k, {})}"
        )
        for k, how in _notes.items()
    }


class TorchSparseBackend(Backend):
    name = "torch_sparse"
    ops = ("sparse24_matmul",)
    device_types = ("cuda",)
    min_capability = (8, 0)
    dtypes = HALF_DTYPES
    one_dtype = True

    def __init__(self):
        self._packed = LayoutCache(lambda packed: packed.nbytes)

    def is_available(self) -> tuple[bool, str]:
        return status()

    def check(self, op: str, x: torch.Tensor, *weights) -> str:
        values = weights[0]
        d_out, d_in = values.shape[0], 2 * values.shape[1]
        if d_out % SPARSE_MULTIPLE or d_in % SPARSE_MULTIPLE:
            return f"core {d_out}x{d_in}: cuSPARSELt needs both dims multiples of {SPARSE_MULTIPLE}"
        if not second_copy_allowed(self.name):
            return (
                "its cuSPARSELt copy of the core is off by default (+9/16 of the dense bytes per layer); "
                "ARMOR_CUSPARSELT_LAYOUT=1 builds it"
            )
        return ""

    # ---- layouts --------------------------------------------------------------------------
    def prepare(self, a, values, meta, b, bias) -> None:
        if values.device.type in self.device_types and values.dtype in HALF_DTYPES:
            self._compressed(values, meta)

    def release(self, values=None) -> None:
        self._packed.pop(values)

    def layout_bytes(self, values=None) -> int:
        return self._packed.nbytes(values)

    def _compressed(self, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        # a layer never prepared is compressed on its first call
        return self._packed.get(values, lambda: compress(sparse24.decompress(values, meta)))

    def plans(self) -> dict[str, str]:
        return plans()

    # ---- op ------------------------------------------------------------------------------
    def sparse24_matmul(self, x, values, meta, bias=None):
        d_out, d_in = values.shape[0], 2 * values.shape[1]
        if x.shape[-1] != d_in:
            raise ValueError(f"x: last dim {x.shape[-1]} does not match d_in = {d_in}")
        return matmul(self._compressed(values, meta), x, d_out, bias)


BACKEND = TorchSparseBackend()
