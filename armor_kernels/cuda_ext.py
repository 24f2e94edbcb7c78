"""The compiled cuSPARSELt extension ``armor_kernels._C`` (from ``csrc/``), when it was built.

Importing this module never fails: without the extension ``available()`` returns
``(False, why)`` with the import error kept word for word. The library is found
through the rpath set at build time, else from the ``nvidia-cusparselt-cu12``/
``-cu13`` wheels on ``sys.path`` or ``ARMOR_CUSPARSELT_ROOT/lib`` (loaded first
with ``ctypes``), else the system loader; when all fail the error names
``libcusparseLt.so.0`` and how to get it.

- ``compress(values, meta, bias=None)``: our 2:4 format -> cuSPARSELt's compressed
  buffer, once per layer at load time (a small CUDA kernel expands to dense on the GPU,
  then ``cusparseLtSpMMACompress2``). A ``bias`` given here belongs to the core and is
  fused into cuSPARSELt's epilogue.
- ``sparse24_mm(x, core, bias, alpha)``: ``alpha · x · Sᵀ + bias`` on the current CUDA
  stream. The first call of a problem makes its plan and, outside CUDA graph capture,
  runs ``cusparseLtMatmulSearch`` once per token bucket (powers of two). Later calls
  neither allocate (except padding tokens to a multiple of 8, and the output) nor
  synchronize, so they can be captured in a CUDA graph.
- ``expanded_mm(x, values, meta, bias)``: the same product without a second copy of the
  core: our kernel expands values/meta into a shared dense scratch, then cuBLAS.
- ``torch.ops.armor_cuda.sparse24_mm``: ``sparse24_mm`` as a torch.library custom op
  with a fake kernel (shapes under ``torch.compile`` and on the meta device).
- ``cached_plans()``: the plans made so far (``armor env`` prints them).

Plans (the policy lives here, the C++ side makes and runs them):

- A plan is per exact problem: (device, dtype, n, k, padded tokens, alpha vector or
  scalar, and the core's own bias). Its key never holds the address of a per-call
  tensor: a bias passed per call (not the core's) is added after the product, and an
  alpha vector's address is given to each call, so neither makes a new plan.
- The searched choice (algorithm id, split-K) is kept per token bucket; another count
  in the bucket makes its plan from it, and when cuSPARSELt cannot build that
  configuration for the other count, the plan falls back to the default algorithm
  (the plan's ``fallback`` entry says why) instead of failing the call.
- The search workspace is sized by cuSPARSELt itself: the largest
  ``cusparseLtMatmulGetWorkspace`` over a plan per algorithm id; if the chosen
  configuration then asks for more, the search runs again with that much.
- Past ``MAX_PLANS`` plans all are dropped and remade from their buckets' choices.

CUDA graphs: the workspace of a matmul belongs to (device, current stream) and is
allocated by PyTorch's caching allocator on that stream the first time a plan needs
it (it only grows, geometrically; replaced ones stay alive because a captured graph
may use them). Under ``torch.cuda.graph`` the current stream is the capture stream:
warm up on that same stream first (``torch.cuda.graph(g, stream=s)`` after calls on
``s``), so that the plan, the search and the workspace exist before capture. A
problem first seen during capture gets its plan (host-only) and, if needed, its
workspace from the graph's private pool (allowed, kept alive here); its search is
deferred to the first call after capture. The same holds for ``expanded_mm``'s scratch.

Environment: ``ARMOR_CUSPARSELT_SEARCH=0`` skips the algorithm search (default algorithm).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from dataclasses import dataclass

import torch

from .backends.base import next_power_of_two

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # csrc/armor_cuda.h DType
LT_LIB = "libcusparseLt.so.0"
WHEEL_LIB_DIRS = ("nvidia/cu13/lib", "nvidia/cusparselt/lib", "nvidia/cu12/lib")
# cuSPARSELt's 16-bit limits: sparse dims multiples of 16, the dense (token) dim of 8
SPARSE_MULTIPLE = 16
TOKEN_MULTIPLE = 8
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
    """The plans made so far: device, dtype, n, k, tokens, bucket, alg_id, split_k, searched,
    workspace, search_workspace, fallback (why the default algorithm replaced the bucket's), ..."""
    return [dict(info) for info in _plans.values()]


def clear_plans(keep_searched: bool = False) -> None:
    """Destroy all plans, and the searched choices unless ``keep_searched`` (captured CUDA graphs
    keep working: they hold the launched kernels, not the plans)."""
    _plans.clear()
    if not keep_searched:
        _searched.clear()
    if _C is not None:
        _C.clear_plans()


def _require():
    ok, why = available()
    if not ok:
        raise RuntimeError(f"armor_kernels.cuda_ext is unavailable: {why}")


# ---- compression (load time) ------------------------------------------------------------------


@dataclass(frozen=True)
class CompressedCore:
    """A 2:4 core ``S [n, k]`` in cuSPARSELt's compressed layout (``buffer``: uint8 on the device).

    ``bias``: the core's own bias (kept alive here), fused into cuSPARSELt's epilogue when a
    call passes this same tensor; any other bias is added after the product.
    """

    buffer: torch.Tensor
    n: int
    k: int
    dtype: torch.dtype
    bias: torch.Tensor | None = None


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


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _capturing() -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except (RuntimeError, AssertionError):  # no CUDA in this process
        return False


def _aligned(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous, 16-byte aligned values (the expansion kernel's vector loads) and contiguous meta."""
    values, meta = values.contiguous(), meta.contiguous()
    if values.data_ptr() % 16:
        values = values.clone()
    return values, meta


def _check_core_device(values: torch.Tensor, meta: torch.Tensor, what: str) -> None:
    why = check_core_shapes(values, meta)
    if why:
        raise ValueError(f"cuda_ext.{what}: {why}")
    if values.device.type != "cuda" or meta.device != values.device:
        raise ValueError(f"cuda_ext.{what}: values on {values.device}, meta on {meta.device}; both must be one GPU")


def compress(values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None) -> CompressedCore:
    """Our (values, meta) -> cuSPARSELt's compressed buffer, on the values' device and current stream."""
    _require()
    _check_core_device(values, meta, "compress")
    values, meta = _aligned(values, meta)
    n, k = values.shape[0], 2 * values.shape[1]
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != values.dtype or bias.device != values.device):
        raise ValueError(f"cuda_ext.compress: bias {tuple(bias.shape)} {bias.dtype} must be [{n}] {values.dtype}")
    device = values.device
    code = DTYPE_CODES[values.dtype]
    with torch.cuda.device(device):
        size, scratch_size = _C.compressed_size(device.index, code, n, k)
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
        scratch = torch.empty(max(scratch_size, 1), dtype=torch.uint8, device=device)
        dense = torch.empty(n, k, dtype=values.dtype, device=device)
        _C.compress(
            device.index, code, n, k, values.data_ptr(), meta.data_ptr(), dense.data_ptr(), buffer.data_ptr(),
            scratch.data_ptr() if scratch_size else 0, _stream(device),
        )  # fmt: skip
    # dense and scratch go back to the caching allocator in stream order: no sync needed
    return CompressedCore(buffer, n, k, values.dtype, None if bias is None else bias.contiguous())


# ---- device buffers shared by all layers -------------------------------------------------------

# (kind, device index, stream, dtype) -> a 1-D buffer that only grows (geometrically)
_buffers: dict[tuple, torch.Tensor] = {}
# replaced buffers stay alive: a captured CUDA graph may still point at them
_retired: list[torch.Tensor] = []


def _buffer(kind: str, device: torch.device, stream: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    key = (kind, device.index, stream, dtype)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _retired.append(buf)
            numel = max(numel, 2 * buf.numel())
        buf = _buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _workspace(device: torch.device, stream: int, nbytes: int) -> torch.Tensor:
    return _buffer("workspace", device, stream, max(nbytes, 1 << 20), torch.uint8)


def workspace_bytes() -> int:
    """Device bytes in the shared cuSPARSELt workspaces and expansion scratches (live and retired)."""
    return sum(t.nbytes for t in (*_buffers.values(), *_retired))


# ---- expansion + cuBLAS: the product without a second copy of the core --------------------------


def expand_into(values: torch.Tensor, meta: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Write the dense ``[n, k]`` core into ``dense`` (contiguous, values' dtype) on the current stream."""
    _check_core_device(values, meta, "expand_into")
    values, meta = _aligned(values, meta)
    n, k = values.shape[0], 2 * values.shape[1]
    if tuple(dense.shape) != (n, k) or dense.dtype != values.dtype or not dense.is_contiguous():
        raise ValueError(f"cuda_ext.expand_into: dense must be contiguous [{n}, {k}] {values.dtype}")
    with torch.cuda.device(values.device):  # the launch goes to the current device
        _C.expand24(values.data_ptr(), meta.data_ptr(), dense.data_ptr(), n, k, _stream(values.device))
    return dense


def expanded_mm(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x · Sᵀ (+ bias)``: expand the core into the shared scratch of (device, stream, dtype),
    then ``F.linear`` (cuBLAS). Costs one read of values/meta and one write + read of the dense
    core per call on top of the dense GEMM; keeps nothing per layer."""
    if _C is None:
        raise RuntimeError(f"armor_kernels.cuda_ext is unavailable: {IMPORT_ERROR}")
    n, k = values.shape[0], 2 * values.shape[1]
    if x.shape[-1] != k or x.dtype != values.dtype or x.device != values.device:
        raise ValueError(
            f"cuda_ext.expanded_mm: x {tuple(x.shape)} {x.dtype} on {x.device} does not match the core "
            f"[{n}, {k}] {values.dtype} on {values.device}"
        )
    scratch = _buffer("dense", x.device, _stream(x.device), n * k, values.dtype)[: n * k].view(n, k)
    return torch.nn.functional.linear(x, expand_into(values, meta, scratch), bias)


# ---- plans ------------------------------------------------------------------------------------

# plan key -> plan info (mirrors the C++ plans; a call costs one dict lookup here)
_plans: dict[tuple, dict] = {}
# bucket key -> searched configuration (alg_id, split_k, split_k_mode, split_k_buffers)
_searched: dict[tuple, dict] = {}
# Plans are per exact token count (a few KB of host memory each); past this many they are all
# dropped and remade from their buckets' searched choices, without searching.
MAX_PLANS = 4096
DEFAULT_CONFIG = {"alg_id": -1, "split_k": 1, "split_k_mode": 0, "split_k_buffers": 0}  # -1: cuSPARSELt's default
CONFIG_KEYS = tuple(DEFAULT_CONFIG)


def _search_enabled() -> bool:
    return os.environ.get("ARMOR_CUSPARSELT_SEARCH", "1") != "0"


def bucket_of(tokens: int) -> int:
    """Token counts sharing one searched algorithm: powers of two (1000 tokens -> 1024)."""
    return next_power_of_two(tokens)


def _search_workspace(problem: tuple, default: dict) -> int:
    """Bytes for the search: the most any algorithm id needs, by cuSPARSELt's own query."""
    need = [default["workspace"]]
    for alg_id in range(int(default.get("max_alg_id", 0)) + 1):
        try:
            need.append(int(_C.plan_workspace(*problem, alg_id)))
        except RuntimeError:  # an id cuSPARSELt cannot build for this problem is not searched either
            continue
    return max(need)


def _search(problem: tuple, default: dict, x2, core, out, alpha_ptr, alpha, stream, device) -> dict:
    """Run cusparseLtMatmulSearch on the problem's plan; the workspace is sized by cuSPARSELt."""
    nbytes = _search_workspace(problem, default)
    for _ in range(2):  # again, once, if the chosen configuration needs more than the search had
        scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        info = dict(
            _C.search(
                *problem, x2.data_ptr(), core.buffer.data_ptr(), out.data_ptr(), alpha_ptr, alpha,
                scratch.data_ptr(), scratch.numel(), stream,
            )
        )  # fmt: skip
        info["search_workspace"] = scratch.numel()
        if info["workspace"] <= scratch.numel():
            return info
        nbytes = info["workspace"]
    return info


def _make_plan(problem: tuple, x2, core, out, alpha_ptr, alpha, stream) -> dict:
    """The plan of ``problem`` (device, dtype code, n, k, padded tokens, bias address, alpha vector):
    from its bucket's searched configuration, else the default and a search; recorded in ``_plans``."""
    device_index, code, n, k, tokens, bias_ptr, alpha_vector = problem
    bucket = (device_index, code, n, k, bucket_of(tokens), bool(bias_ptr), alpha_vector)
    cfg = _searched.get(bucket)
    if cfg is not None:
        try:
            info = dict(_C.plan(*problem, *(cfg[c] for c in CONFIG_KEYS)))
            info["searched"] = cfg["alg_id"] >= 0  # -1: the bucket's search failed, default kept
        except RuntimeError as e:  # the bucket's choice does not build for this count: the default does
            info = dict(_C.plan(*problem, *DEFAULT_CONFIG.values()))
            info["fallback"] = (
                f"the configuration searched for this bucket ({cfg}) does not build for {tokens} tokens "
                f"({str(e).splitlines()[0][:160]}); default algorithm"
            )
    else:
        info = dict(_C.plan(*problem, *DEFAULT_CONFIG.values()))
        if _search_enabled():
            if _capturing():  # the search times kernels and synchronizes: never inside a capture
                info["search_pending"] = True
            else:
                try:
                    info = _search(problem, info, x2, core, out, alpha_ptr, alpha, stream, x2.device)
                    info["searched"] = True
                    _searched[bucket] = {c: int(info[c]) for c in CONFIG_KEYS}
                except RuntimeError as e:  # a failed search leaves the default algorithm, visibly, once
                    info = dict(_C.plan(*problem, *DEFAULT_CONFIG.values()))
                    info["fallback"] = f"the search failed ({str(e).splitlines()[0][:160]}); default algorithm"
                    _searched[bucket] = dict(DEFAULT_CONFIG)
    info["bucket"] = bucket[4]
    _plans[problem] = info
    return info


def sparse24_mm(
    x: torch.Tensor,
    core: CompressedCore,
    bias: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``alpha · x · Sᵀ (+ bias)`` -> ``[..., n]``; ``alpha`` a float or a float32 ``[n]`` per-row scale
    on the device. ``bias`` is fused into the epilogue when it is ``core.bias``, else added after."""
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
    fused = bias is not None and bias is core.bias
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"cuda_ext.sparse24_mm: bias {tuple(bias.shape)} {bias.dtype} must be [{n}] {x.dtype}")
    alpha_ptr, alpha_value = 0, 1.0
    if isinstance(alpha, torch.Tensor):
        if tuple(alpha.shape) != (n,) or alpha.dtype != torch.float32 or alpha.device != x.device:
            raise ValueError(
                f"cuda_ext.sparse24_mm: alpha vector {tuple(alpha.shape)} {alpha.dtype} must be float32 [{n}]"
            )
        alpha = alpha.contiguous()
        alpha_ptr = alpha.data_ptr()  # given to each call, never part of the plan
    else:
        alpha_value = float(alpha)
    device = x.device
    stream = _stream(device)
    out = torch.empty(padded, n, dtype=x.dtype, device=device)
    # the core's bias lives as long as the core: its address may name a plan; no other address does
    problem = (device.index, DTYPE_CODES[x.dtype], n, k, padded, core.bias.data_ptr() if fused else 0, bool(alpha_ptr))
    info = _plans.get(problem)
    if info is None or (info.get("search_pending") and not _capturing()):
        if len(_plans) >= MAX_PLANS:
            clear_plans(keep_searched=True)
        info = _make_plan(problem, x2, core, out, alpha_ptr, alpha_value, stream)
    ws = _workspace(device, stream, info["workspace"])
    _C.matmul(
        *problem[:6], x2.data_ptr(), core.buffer.data_ptr(), out.data_ptr(), alpha_ptr, alpha_value,
        ws.data_ptr(), ws.nbytes, stream,
    )  # fmt: skip
    if padded != tokens:
        out = out[:tokens]
    if bias is not None and not fused:
        out = out + bias
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
