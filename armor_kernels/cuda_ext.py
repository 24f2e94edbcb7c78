"""The compiled cuSPARSELt extension ``armor_kernels._C`` (from ``csrc/``), when it was built.

Importing this module never fails: without the extension ``available()`` returns
``(False, why)`` with the import error kept word for word. The library is found
through the rpath set at build time, else from the ``nvidia-cusparselt-cu12``/
``-cu13`` wheels on ``sys.path`` or ``ARMOR_CUSPARSELT_ROOT/lib`` (loaded first
with ``ctypes``), else the system loader; when all fail the error names
``libcusparseLt.so.0`` and how to get it.

- ``compress(values, meta)``: our 2:4 format -> cuSPARSELt's compressed buffer,
  once per layer at load time (a small CUDA kernel expands to dense on the GPU,
  then ``cusparseLtSpMMACompress2``).
- ``sparse24_mm(x, core, bias, alpha)``: ``alpha · x · Sᵀ + bias`` on the current
  CUDA stream. The first call of a problem makes its plan and, outside CUDA graph
  capture, runs ``cusparseLtMatmulSearch`` once per token bucket (powers of two);
  later calls neither allocate (except padding tokens to a multiple of 8 and
  the output) nor synchronize, so they can be captured in a CUDA graph.
- ``torch.ops.armor_cuda.sparse24_mm``: the same as a torch.library custom op with a
  fake kernel (shapes under ``torch.compile`` and on the meta device).
- ``cached_plans()``: the plans made so far (``armor env`` prints them).

Environment: ``ARMOR_CUSPARSELT_SEARCH=0`` skips the algorithm search (default algorithm).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from dataclasses import dataclass

import torch

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # csrc/armor_cuda.h DType
LT_LIB = "libcusparseLt.so.0"
WHEEL_LIB_DIRS = ("nvidia/cu13/lib", "nvidia/cusparselt/lib", "nvidia/cu12/lib")
# cuSPARSELt's 16-bit limits: sparse dims multiples of 16, the dense (token) dim of 8
SPARSE_MULTIPLE = 16
TOKEN_MULTIPLE = 8
# workspace for the algorithm search only: candidates with split-K may need more than the default plan
SEARCH_WORKSPACE = 32 << 20
BUILD_HINT = (
    "build it with nvcc and cuSPARSELt present: pip install nvidia-cusparselt-cu13 (or -cu12), then "
    "ARMOR_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace"
)


def _lt_candidates() -> list[str]:
    """libcusparseLt.so.0 files to preload, ARMOR_CUSPARSELT_ROOT first, then wheels on sys.path."""
    roots = []
    if os.environ.get("ARMOR_CUSPARSELT_ROOT"):
        root = os.environ["ARMOR_CUSPARSELT_ROOT"]
        roots += [os.path.join(root, "lib"), os.path.join(root, "lib64")]
    for p in sys.path:
        roots += [os.path.join(p, sub) for sub in WHEEL_LIB_DIRS]
    found = []
    for r in roots:
        path = os.path.join(r, LT_LIB)
        if os.path.isfile(path) and path not in found:
            found.append(path)
    return found


def _load():
    """(module, "") or (None, why): try the rpath, then preload cuSPARSELt from the wheels."""
    try:
        return importlib.import_module(f"{__package__}._C"), ""
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}._C":
            return None, f"the CUDA extension armor_kernels._C is not built ({e}); {BUILD_HINT}"
        return None, f"{type(e).__name__}: {e}"
    except ImportError as e:
        first = f"{type(e).__name__}: {e}"
        if LT_LIB not in str(e):
            return None, first
    tried = []
    for path in _lt_candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return importlib.import_module(f"{__package__}._C"), ""
        except (OSError, ImportError) as e:
            tried.append(f"{path}: {e}")
    where = f"; also tried {tried}" if tried else "; no nvidia-cusparselt wheel found on sys.path"
    return None, f"{first}{where}. pip install nvidia-cusparselt-cu13 (or -cu12), or set ARMOR_CUSPARSELT_ROOT"


_C, IMPORT_ERROR = _load()
_device_error: str | None = None  # the CUDA runtime's answer, asked once


def available() -> tuple[bool, str]:
    """(True, "") when the extension is loaded and a CUDA device answers, else (False, why)."""
    global _device_error
    if _C is None:
        return False, IMPORT_ERROR
    if _device_error is None:
        try:
            _device_error = "" if _C.device_count() > 0 else "the CUDA runtime reports no device"
        except RuntimeError as e:  # e.g. no driver: the runtime's own words
            _device_error = f"the extension is built but CUDA cannot start: {e}"
    if _device_error:
        return False, _device_error
    if not torch.cuda.is_available():
        return False, "the extension sees a CUDA device but this PyTorch build does not (CPU-only torch?)"
    return True, ""


def versions() -> dict:
    """Compiled and loaded cuSPARSELt / CUDA runtime versions ({} without the extension)."""
    return dict(_C.versions()) if _C is not None else {}


def cached_plans() -> list[dict]:
    """The plans made so far: device, dtype, n, k, tokens, bucket, alg_id, split_k, searched, workspace, ..."""
    return list(_C.cached_plans()) if _C is not None else []


def clear_plans(keep_searched: bool = False) -> None:
    """Destroy all plans, and the searched choices unless ``keep_searched`` (captured CUDA graphs
    keep working: they hold the launched kernels, not the plans)."""
    _plans.clear()
    if _C is not None:
        _C.clear_plans(keep_searched)


def _require():
    ok, why = available()
    if not ok:
        raise RuntimeError(f"armor_kernels.cuda_ext is unavailable: {why}")


# ---- compression (load time) ------------------------------------------------------------------


@dataclass(frozen=True)
class CompressedCore:
    """A 2:4 core ``S [n, k]`` in cuSPARSELt's compressed layout (``buffer``: uint8 on the device)."""

    buffer: torch.Tensor
    n: int
    k: int
    dtype: torch.dtype


def check_core_shapes(values: torch.Tensor, meta: torch.Tensor) -> str:
    """ "" when (values, meta) can go through cuSPARSELt, else the rule they break."""
    if values.dtype not in DTYPE_CODES:
        return f"values: dtype {values.dtype} is not float16 or bfloat16"
    if values.dim() != 2:
        return f"values: expected [d_out, d_in/2], got shape {tuple(values.shape)}"
    n, k = values.shape[0], 2 * values.shape[1]
    if n % SPARSE_MULTIPLE or k % SPARSE_MULTIPLE:
        return f"values: S [{n}, {k}] is not a multiple of {SPARSE_MULTIPLE} in both dims (cuSPARSELt 16-bit limit)"
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, k // 8):
        return f"meta: expected uint8 [{n}, {k // 8}], got {meta.dtype} {tuple(meta.shape)}"
    return ""


def compress(values: torch.Tensor, meta: torch.Tensor) -> CompressedCore:
    """Our (values, meta) -> cuSPARSELt's compressed buffer, on the values' device and current stream."""
    _require()
    why = check_core_shapes(values, meta)
    if why:
        raise ValueError(f"cuda_ext.compress: {why}")
    if values.device.type != "cuda" or meta.device != values.device:
        raise ValueError(f"cuda_ext.compress: values on {values.device}, meta on {meta.device}; both must be one GPU")
    values, meta = values.contiguous(), meta.contiguous()
    if values.data_ptr() % 16:
        values = values.clone()  # 16-byte aligned for the expansion kernel's vector loads
    n, k = values.shape[0], 2 * values.shape[1]
    device = values.device
    code = DTYPE_CODES[values.dtype]
    with torch.cuda.device(device):
        size, scratch_size = _C.compressed_size(device.index, code, n, k)
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
        scratch = torch.empty(max(scratch_size, 1), dtype=torch.uint8, device=device)
        dense = torch.empty(n, k, dtype=values.dtype, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        _C.compress(
            device.index,
            code,
            n,
            k,
            values.data_ptr(),
            meta.data_ptr(),
            dense.data_ptr(),
            buffer.data_ptr(),
            scratch.data_ptr() if scratch_size else 0,
            stream,
        )
    # dense and scratch go back to the caching allocator in stream order: no sync needed
    return CompressedCore(buffer, n, k, values.dtype)


# ---- matmul (hot path) ------------------------------------------------------------------------

# plan key -> plan info; mirrors the C++ cache so a call costs one dict lookup here
_plans: dict[tuple, dict] = {}
# Plans are per exact token count and bias address (a few KB of host memory each); past this
# many they are all dropped and remade from their buckets' searched choices, without searching.
MAX_PLANS = 4096
# (device index, stream) -> workspace; grown only when a new plan needs more
_workspaces: dict[tuple[int, int], torch.Tensor] = {}
# replaced workspaces stay alive: a captured CUDA graph may still point at them
_retired: list[torch.Tensor] = []


def _workspace(device: torch.device, stream: int, nbytes: int) -> torch.Tensor:
    key = (device.index, stream)
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < nbytes:
        if ws is not None:
            _retired.append(ws)
        ws = _workspaces[key] = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
    return ws


def _search_enabled() -> bool:
    return os.environ.get("ARMOR_CUSPARSELT_SEARCH", "1") != "0"


def _first_use(key, x, core, out, bias_ptr, alpha_ptr, alpha, stream) -> dict:
    device = x.device
    info = _C.plan(device.index, DTYPE_CODES[core.dtype], core.n, core.k, x.shape[0], bias_ptr, bool(alpha_ptr))
    # the search times kernels and synchronizes: never inside a graph capture
    if _search_enabled() and not info["searched"] and not torch.cuda.is_current_stream_capturing():
        scratch = torch.empty(max(info["workspace"], SEARCH_WORKSPACE), dtype=torch.uint8, device=device)
        info = _C.search(
            device.index,
            DTYPE_CODES[core.dtype],
            core.n,
            core.k,
            x.shape[0],
            bias_ptr,
            bool(alpha_ptr),
            x.data_ptr(),
            core.buffer.data_ptr(),
            out.data_ptr(),
            alpha_ptr,
            alpha,
            scratch.data_ptr(),
            scratch.numel(),
            stream,
        )
    _plans[key] = info
    return info


def sparse24_mm(
    x: torch.Tensor,
    core: CompressedCore,
    bias: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``alpha · x · Sᵀ (+ bias)`` -> ``[..., n]``; ``alpha`` a float or a float32 ``[n]`` per-row scale on the device."""
    if _C is None:
        raise RuntimeError(f"armor_kernels.cuda_ext is unavailable: {IMPORT_ERROR}")
    n, k = core.n, core.k
    if x.shape[-1] != k or x.dtype != core.dtype or x.device != core.buffer.device:
        raise ValueError(
            f"cuda_ext.sparse24_mm: x {tuple(x.shape)} {x.dtype} on {x.device} does not match the core "
            f"[{n}, {k}] {core.dtype} on {core.buffer.device} (x's last dim must be {k})"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    tokens = x2.shape[0]
    if tokens == 0:
        return x.new_empty(*lead, n)
    padded = -(-tokens // TOKEN_MULTIPLE) * TOKEN_MULTIPLE
    if padded != tokens:  # cuSPARSELt's dense dims are multiples of 8: pad with zero rows
        x2 = torch.cat([x2, x2.new_zeros(padded - tokens, k)])
    elif not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
    bias_ptr = 0
    if bias is not None:
        if tuple(bias.shape) != (n,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"cuda_ext.sparse24_mm: bias {tuple(bias.shape)} {bias.dtype} must be [{n}] {x.dtype}")
        bias = bias.contiguous()
        bias_ptr = bias.data_ptr()
    alpha_ptr, alpha_value = 0, 1.0
    if isinstance(alpha, torch.Tensor):
        if tuple(alpha.shape) != (n,) or alpha.dtype != torch.float32 or alpha.device != x.device:
            raise ValueError(
                f"cuda_ext.sparse24_mm: alpha vector {tuple(alpha.shape)} {alpha.dtype} must be float32 [{n}]"
            )
        alpha = alpha.contiguous()
        alpha_ptr = alpha.data_ptr()
    else:
        alpha_value = float(alpha)
    device = x.device
    stream = torch.cuda.current_stream(device).cuda_stream
    out = torch.empty(padded, n, dtype=x.dtype, device=device)
    key = (device.index, x.dtype, n, k, padded, bias_ptr, bool(alpha_ptr))
    info = _plans.get(key)
    if info is None:
        if len(_plans) >= MAX_PLANS:
            clear_plans(keep_searched=True)
        info = _first_use(key, x2, core, out, bias_ptr, alpha_ptr, alpha_value, stream)
    ws = _workspace(device, stream, info["workspace"])
    _C.matmul(
        device.index,
        DTYPE_CODES[x.dtype],
        n,
        k,
        padded,
        bias_ptr,
        x2.data_ptr(),
        core.buffer.data_ptr(),
        out.data_ptr(),
        alpha_ptr,
        alpha_value,
        ws.data_ptr(),
        ws.numel(),
        stream,
    )
    if padded != tokens:
        out = out[:tokens]
    return out.reshape(*lead, n)


# ---- torch.library op ------------------------------------------------------------------------


@torch.library.custom_op("armor_cuda::sparse24_mm", mutates_args=(), device_types="cuda")
def sparse24_mm_op(
    x: torch.Tensor,
    compressed: torch.Tensor,
    n: int,
    k: int,
    bias: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha · x · Sᵀ (+ bias)`` with ``S [n, k]`` given as cuSPARSELt's compressed buffer."""
    core = CompressedCore(compressed, n, k, x.dtype)
    return sparse24_mm(x, core, bias, 1.0 if alpha is None else alpha)


@sparse24_mm_op.register_fake
def _(x, compressed, n, k, bias=None, alpha=None):
    torch._check(x.shape[-1] == k, lambda: f"x's last dim {x.shape[-1]} must equal k = {k}")
    torch._check(compressed.dtype == torch.uint8, lambda: f"compressed must be uint8, got {compressed.dtype}")
    return x.new_empty(*x.shape[:-1], n)
