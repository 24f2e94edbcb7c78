"""The Triton backend: launchers for the kernels in ``armor_kernels.triton`` and the backend object.

Kernels exposed for direct timing (benchmarks) and tests:

- ``blockdiag(x, blocks, bias=None, out=None, out_dtype=None)``: ``x · blockdiag(blocks)ᵀ (+ bias)``;
- ``sparse24_small(x, values, meta, a=None, bias=None, out=None, out_dtype=None, split_k=None, use_dot=None)``:
  ``x Sᵀ`` (then ``· Aᵀ`` when ``a`` is given) ``+ bias``, built for at most
  ``MAX_SMALL_TOKENS`` tokens (more run as 16-token tiles, each re-reading the weights);
- ``decode_layer(x, a, values, meta, b, bias=None, out=None)``: the whole layer in 2 launches
  (B-wrapper, then 2:4 with A and bias fused; 3 when A's blocks are wider than a tile).
  ``ARMOR_TRITON_PDL=1`` (opt-in, sm_90+, not yet measured on a GPU) launches the 2:4 kernel
  of its hot path with programmatic dependent launch behind the B-wrapper.

Availability: needs triton, and either CUDA tensors or ``TRITON_INTERPRET=1``
(set before triton is imported) for CPU tensors. On CPU the selection table puts
the backend after the reference (the interpreter is for tests and is slow);
``ARMOR_BACKEND=triton`` forces it.

Tile sizes are fixed per regime rather than autotuned: decode shapes are
memory-bound, and a fixed table keeps the first call free of tuning runs and
CUDA-graph capture safe. Under the interpreter, tiles are large (it is faster
per element with big tiles).
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from .base import DECODE_MAX_TOKENS, FLOAT_DTYPES, OPS, Backend, next_power_of_two

try:
    import triton
    import triton.language as tl

    from ..triton.blockdiag import blockdiag_kernel
    from ..triton.sparse24_small import sparse24_small_kernel

    IMPORT_ERROR = ""
except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable, with the reason
    triton = tl = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

# The small-batch 2:4 kernel's range: the decode regime. A program holds at most
# 16 tokens, so beyond that every 16-token tile reads the weights again.
MAX_SMALL_TOKENS = DECODE_MAX_TOKENS
# From this many tokens the 2:4 kernel multiplies on tensor cores (16-row tiles, 16-bit
# weights): per pass of 128 rows x 64 values the sm_90a CUDA-core loop costs 318
# instructions at 1 token and 434 at 2 (165 registers: 1 block per SM), the tensor-core
# loop ~321-354 for any count (benchmarks/results/kernel_static.md); on sm_80 2 tokens
# cost the same either way.
DOT_MIN_TOKENS = 2
# Tokens one CUDA-core program handles (one accumulator set per token)
CUDA_CORE_TOKENS = 4
# Widest output block the epilogue fuses: the [128, 128] 16-bit A tile is 32
# registers per thread at 8 warps; wider blocks take a separate wrapper launch.
MAX_FUSED_BLOCK = 128


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


_np2 = next_power_of_two


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_dtype(dtype: torch.dtype):
    """Tensor-core operand type from the *weights'* dtype (an fp32 input is split, not promoted)."""
    # the interpreter's bf16/fp16 dot goes through numpy; fp32 there is exact and fast
    if interpreting() or dtype == torch.float32:
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


_sm_counts: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _sm_counts:
        _sm_counts[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _sm_counts[key]


# Opt-in: launch the 2:4 kernel of decode_layer's hot path with programmatic dependent launch
# (sm_90+), so its set-up overlaps the B-wrapper; not yet measured on a GPU, hence off by default.
PDL_ENV = "ARMOR_TRITON_PDL"
_pdl_ok: dict = {}


def _pdl_enabled(device: torch.device) -> bool:
    if os.environ.get(PDL_ENV, "") != "1" or interpreting() or device.type != "cuda":
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _pdl_ok:
        from ..triton.sparse24_small import gdc_wait

        _pdl_ok[key] = gdc_wait is not None and torch.cuda.get_device_capability(key)[0] >= 9
    return _pdl_ok[key]


def _launch(kernel, grid, args, kwargs):
    """Every launch goes through here (benchmarks/kernel_static.py records them instead)."""
    kernel[grid](*args, **kwargs)


def _as_2d(x: torch.Tensor, k: int, name: str = "x") -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{name}: last dim {x.shape[-1]} does not match the layer's input width {k}")
    return x.reshape(-1, k)


def _out(out, m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if tuple(out.shape) != (m, n):
        raise ValueError(f"out: expected shape ({m}, {n}), got {tuple(out.shape)}")
    return out


# ---------------------------------------------------------------------------
# block-diagonal wrapper
# ---------------------------------------------------------------------------
def _blockdiag_config(m: int, bs: int) -> dict:
    p = _np2(bs)
    if interpreting():
        bn = bk = min(p, 128)
        bm = min(_np2(m), 64)
        if min(bm, bn, bk) < 16:
            bm = max(1, min(_np2(m), 8192 // (bn * bk)))
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": 1}
    if p < 16:
        # CUDA-core path: 4..12-wide blocks, many tokens per program (4096-element product tile)
        return {
            "BLOCK_M": max(1, min(_np2(m), 4096 // (p * p))),
            "BLOCK_N": p,
            "BLOCK_K": p,
            "num_warps": 4,
            "num_stages": 2,
        }
    if m <= MAX_SMALL_TOKENS:
        # one K step for b <= 128: no pipelining (2 stages spilled 8 B/thread on sm_90a)
        return {"BLOCK_M": 16, "BLOCK_N": min(p, 64), "BLOCK_K": min(p, 128), "num_warps": 4, "num_stages": 1}
    bm = 128 if m >= 128 else 64
    bn = min(p, 128)
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": min(p, 64),
        "num_warps": 8 if bm * bn >= 128 * 128 else 4,
        "num_stages": 3,
    }


_bd_plans: dict = {}


def _blockdiag_plan(m: int, n: int, bs: int, x_dtype, w_dtype, has_bias: bool = False) -> tuple:
    key = (m, n, bs, x_dtype, w_dtype, has_bias)
    plan = _bd_plans.get(key)
    if plan is None:
        cfg = _blockdiag_config(m, bs)
        use_dot = min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16
        dot = _dot_dtype(w_dtype)
        x_split = use_dot and x_dtype == torch.float32 and dot != tl.float32
        grid = (_cdiv(m, cfg["BLOCK_M"]), n, _cdiv(bs, cfg["BLOCK_N"]))
        plan = _bd_plans[key] = (grid, dict(cfg, USE_DOT=use_dot, DOT_DTYPE=dot, X_SPLIT=x_split, HAS_BIAS=has_bias))
    return plan


def blockdiag(x, blocks, bias=None, out=None, out_dtype=None) -> torch.Tensor:
    """``x · blockdiag(blocks)ᵀ (+ bias)`` for any number of tokens; ``blocks`` is ``[n, bs, bs]``."""
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"blocks: expected [n_blocks, b, b], got shape {tuple(blocks.shape)}")
    n, bs, _ = blocks.shape
    x2 = _as_2d(x, n * bs)
    m = x2.shape[0]
    if bias is not None and tuple(bias.shape) != (n * bs,):
        raise ValueError(f"bias: expected shape ({n * bs},), got {tuple(bias.shape)}")
    y = _out(out, m, n * bs, out_dtype or x.dtype, x.device)
    if m == 0:
        return y if out is not None else y.reshape(*x.shape[:-1], n * bs)
    w = blocks if blocks.is_contiguous() else blocks.contiguous()
    grid, kw = _blockdiag_plan(m, n, bs, x.dtype, blocks.dtype, bias is not None)
    _launch(blockdiag_kernel, grid, (x2, w, bias if bias is not None else w, y, m, bs, *x2.stride(), *y.stride()), kw)
    return y if out is not None else y.reshape(*x.shape[:-1], n * bs)


# ---------------------------------------------------------------------------
# small-batch 2:4 with fused output wrapper
# ---------------------------------------------------------------------------
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device, m_tiles: int, split: int, bm: int, d_out: int, n_tiles: int):
    """Split-K partials and per-tile arrival counters, one set per (device, shape), reused.

    The counters return to 0 at the end of every launch, so the buffers need no
    reset; they assume one launch at a time per device and shape (one stream).
    Allocated on the first call for a shape: warm up once before CUDA-graph capture.
    """
    key = (device, m_tiles, split, bm, d_out, n_tiles)
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = (
            torch.empty(m_tiles, split, bm, d_out, dtype=torch.float32, device=device),
            torch.zeros(m_tiles, n_tiles, dtype=torch.int32, device=device),
        )
    return ws


def fusable(a: torch.Tensor | None) -> bool:
    """The output wrapper fits the 2:4 kernel's epilogue (a tile holds whole A blocks)."""
    return a is not None and a.shape[-1] <= MAX_FUSED_BLOCK


_sp_plans: dict = {}

# Per-program fixed work (index set-up, partial store, counter, and the epilogue of the last
# program) in main-loop passes: ~830-940 instructions against 320-460 per pass in the sm_90a
# code (benchmarks/results/kernel_static.md).
PROGRAM_COST_STEPS = 3


def _best_split(tiles: int, n_steps: int, sms: int) -> int:
    """Split of the input groups that minimises the busiest SM's work, counted in loop passes.

    Cost: programs on the busiest SM x (passes per program + fixed work), scaled by
    ``sms / busy SMs`` so that leaving SMs idle (their share of the memory bandwidth) costs
    too. A split whose programs overflow the SMs by a few (288 programs on 132 SMs: 3
    rounds instead of 2) loses to the next smaller one.
    """
    best, best_cost = 1, None
    for split in range(1, n_steps + 1):
        programs = tiles * split
        steps = -(-n_steps // split)
        cost = -(-programs // sms) * (steps + PROGRAM_COST_STEPS) * sms / min(programs, sms)
        if best_cost is None or cost < best_cost:
            best, best_cost = split, cost
    return best


def _sparse_plan(m, d_out, d_in, b_out, w_dtype, x_dtype, sms, use_dot=None, split_k=None, has_bias=False) -> dict:
    """Tile sizes, split and grid of ``sparse24_small`` for one shape (cached: no work on the hot path).

    ``b_out``: A's block when it is fused into the epilogue, else None.
    """
    key = (m, d_out, d_in, b_out, w_dtype, x_dtype, sms, use_dot, split_k, has_bias)
    plan = _sp_plans.get(key)
    if plan is not None:
        return plan
    interp = interpreting()
    n_vals = d_in // 2
    if use_dot is None:
        use_dot = m >= DOT_MIN_TOKENS
    use_dot = bool(use_dot) and w_dtype != torch.float32  # the pair-placement path is for 16-bit weights
    bm = 16 if use_dot else min(_np2(m), CUDA_CORE_TOKENS)
    if b_out is not None:
        # a tile = as many whole A blocks as fit in 128 rows (1 block of 96, 4 of 32, ...)
        rows = b_out * max(1, MAX_FUSED_BLOCK // b_out)
    else:
        rows = max(16, min(128, _np2(d_out)))
    bo = _np2(rows)
    # NT threads along a row, 8 values (4 groups) each: 8 x 16 B = 128 B per row and step
    nt = max(1, min(8, _np2(_cdiv(d_in // 4, 4))))
    step = 8 * nt
    n_tiles = _cdiv(d_out, rows)
    m_tiles = _cdiv(m, bm)
    n_steps = _cdiv(n_vals, step)
    if split_k is None:
        split_k = 1 if interp else _best_split(n_tiles * m_tiles, n_steps, sms)
    vals_per_split = _cdiv(n_steps, max(1, split_k)) * step
    split_k = _cdiv(n_vals, vals_per_split)
    dot = _dot_dtype(w_dtype)
    chunks = bo * nt  # 8-value chunks per step
    # every row tile and step full (and, on CUDA cores, every token tile): the main loop runs without masks
    even = rows == bo and d_out % rows == 0 and n_vals % step == 0 and vals_per_split % step == 0
    even = even and (use_dot or m % bm == 0)
    plan = _sp_plans[key] = {
        "grid": (n_tiles, split_k, m_tiles),
        "rows": rows,
        "b_out": b_out or 1,
        "vals_per_split": vals_per_split,
        "steps_per_program": _cdiv(vals_per_split, step),
        "ws_shape": (m_tiles, split_k, bm, n_tiles),
        "meta": {
            "BLOCK_M": bm, "BLOCK_O": bo, "NT": nt, "SPLIT_K": split_k, "USE_DOT": use_dot, "DOT_DTYPE": dot,
            "X_SPLIT": use_dot and x_dtype == torch.float32 and dot != tl.float32,
            "Z_SPLIT": dot != tl.float32, "EPI_M": max(16, bm), "EVEN": even,
            "PAIRS": w_dtype != torch.float32, "FUSE_A": b_out is not None, "HAS_BIAS": has_bias,
            "num_warps": 8 if chunks >= 512 else 4, "num_stages": 1,
        },
    }  # fmt: skip
    return plan


def sparse24_small(
    x, values, meta, a=None, bias=None, out=None, out_dtype=None, split_k=None, use_dot=None
) -> torch.Tensor:
    """``(x Sᵀ)`` then ``· blockdiag(a)ᵀ`` if ``a`` is given, ``+ bias``.

    Built for <= 16 tokens; more run as token tiles (for finding where it
    stops paying; dispatch sends them elsewhere). ``a`` must be fusable
    (block <= 128); ``split_k`` overrides the automatic split of the input
    groups across programs (1 disables it); ``use_dot`` overrides the choice of
    tensor cores (default: from ``DOT_MIN_TOKENS`` tokens; 16-bit weights only).
    """
    d_out, half = values.shape
    d_in = 2 * half
    x2 = _as_2d(x, d_in)
    m = x2.shape[0]
    if d_in % 4:
        raise ValueError(f"values: d_in = {d_in} is not a multiple of 4 (2:4 groups are 4 columns wide)")
    n_groups = d_in // 4
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (d_out, (n_groups + 1) // 2):
        raise ValueError(f"meta: expected uint8 [{d_out}, {(n_groups + 1) // 2}], got {meta.dtype} {tuple(meta.shape)}")
    b_out = None
    if a is not None:
        b_out = a.shape[-1]
        if a.dim() != 3 or a.shape[1] != b_out or a.shape[0] * b_out != d_out:
            raise ValueError(f"a: expected [{d_out}/b, b, b] blocks tiling d_out = {d_out}, got {tuple(a.shape)}")
        if not fusable(a):
            raise ValueError(f"a: block {b_out} is wider than the fused epilogue's {MAX_FUSED_BLOCK}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
    y = _out(out, m, d_out, out_dtype or x.dtype, x.device)
    if m == 0:
        return y if out is not None else y.reshape(*x.shape[:-1], d_out)

    # rows contiguous, even row stride (the kernel reads value pairs as 32-bit words)
    if values.stride(-1) != 1 or values.stride(0) % 2:
        values = values.contiguous()
    if meta.stride(-1) != 1:
        meta = meta.contiguous()
    sms = _sm_count(x.device)
    plan = _sparse_plan(m, d_out, d_in, b_out, values.dtype, x.dtype, sms, use_dot, split_k, bias is not None)
    ws, cnt = _workspace(x.device, *plan["ws_shape"][:3], d_out, plan["ws_shape"][3])
    a_t = values if a is None else (a if a.is_contiguous() else a.contiguous())
    _launch(sparse24_small_kernel, plan["grid"], _sparse_args(plan, x2, values, meta, a_t, bias, y, ws, cnt), plan["meta"])
    return y if out is not None else y.reshape(*x.shape[:-1], d_out)


def _sparse_args(plan, x2, values, meta, a_t, bias, y, ws, cnt) -> tuple:
    d_out, half = values.shape
    return (
        x2, values, meta, a_t, bias if bias is not None else values, y, ws, cnt,
        x2.shape[0], d_out, half, meta.shape[1], plan["rows"], plan["b_out"], plan["vals_per_split"],
        *x2.stride(), values.stride(0), meta.stride(0), *y.stride(),
    )  # fmt: skip


_dl_plans: dict = {}


def decode_layer(x, a, values, meta, b, bias=None, out=None) -> torch.Tensor:
    """The whole ARMOR layer for <= 16 tokens: B-wrapper (fp32 out), then 2:4 + A + bias.

    2 launches when A's blocks fit the epilogue, else 3 (A as a separate wrapper).
    The intermediates stay fp32, like the reference; they are the only
    allocations besides the output (``T·d_in·4`` bytes: 16 KB for 1 token of 4096).
    ``out``: optional ``[tokens, d_out]`` destination (any strides).

    Hot path: the first call for a combination of shapes, dtypes and layouts checks
    everything and plans both launches through ``blockdiag`` and ``sparse24_small``; later
    calls with the same key only allocate ``y`` and launch (``python -m
    benchmarks.host_overhead`` measures it). Like the split-K workspace, ``h`` is one buffer
    per shape: calls on one stream at a time (stream order makes the reuse safe, CUDA-graph
    capture included; warm up once before capturing).
    """
    key = (
        x.shape, x.dtype, x.device, values.shape, values.dtype, values.stride(), meta.shape, meta.stride(), a.shape,
        b.shape, b.dtype, bias is not None, None if out is None else out.shape, a.is_contiguous(), b.is_contiguous(),
    )  # fmt: skip
    p = _dl_plans.get(key)
    if p is None:
        y = _decode_layer_checked(x, a, values, meta, b, bias, out)
        _dl_plans[key] = _decode_fast_plan(x, a, values, meta, b, bias)
        return y
    if p is False:  # layouts that need copies, or A outside the epilogue: the checked path every time
        return _decode_layer_checked(x, a, values, meta, b, bias, out)
    bd_grid, bd_kw, sp_grid, sp_kw, sp_ints, h, ws, cnt, m, d_in, d_out = p
    x2 = x if x.dim() == 2 else x.reshape(m, d_in)
    # h: one buffer per plan, like the split-K workspace (stream order makes the reuse safe)
    _launch(blockdiag_kernel, bd_grid, (x2, b, b, h, m, b.shape[1], *x2.stride(), d_in, 1), bd_kw)
    y = out if out is not None else torch.empty(m, d_out, dtype=x.dtype, device=x.device)
    _launch(
        sparse24_small_kernel, sp_grid,
        (h, values, meta, a, bias if bias is not None else values, y, ws, cnt, *sp_ints, *y.stride()),
        sp_kw,
    )  # fmt: skip
    return y if out is not None or x.dim() == 2 else y.reshape(*x.shape[:-1], d_out)


def _decode_fast_plan(x, a, values, meta, b, bias):
    """What the hot path of ``decode_layer`` reuses, or False when it must take the checked path."""
    d_out, half = values.shape
    d_in = 2 * half
    m = x.numel() // d_in
    if m == 0 or not fusable(a) or not (a.is_contiguous() and b.is_contiguous()):
        return False
    if values.stride(-1) != 1 or values.stride(0) % 2 or meta.stride(-1) != 1:
        return False
    bd_grid, bd_kw = _blockdiag_plan(m, b.shape[0], b.shape[1], x.dtype, b.dtype, False)
    sp = _sparse_plan(m, d_out, d_in, a.shape[-1], values.dtype, torch.float32, _sm_count(x.device), None, None,
                      bias is not None)  # fmt: skip
    ws, cnt = _workspace(x.device, *sp["ws_shape"][:3], d_out, sp["ws_shape"][3])
    h = torch.empty(m, d_in, dtype=torch.float32, device=x.device)
    sp_kw = sp["meta"]
    if _pdl_enabled(x.device):
        bd_kw = dict(bd_kw, LAUNCH_DEPENDENTS=True)
        sp_kw = dict(sp_kw, GDC_WAIT=True, launch_pdl=True)
    # the integer arguments of the 2:4 launch between cnt_ptr and the output strides
    ints = (m, d_out, half, meta.shape[1], sp["rows"], sp["b_out"], sp["vals_per_split"], d_in, 1,
            values.stride(0), meta.stride(0))  # fmt: skip
    return bd_grid, bd_kw, sp["grid"], sp_kw, ints, h, ws, cnt, m, d_in, d_out


def _decode_layer_checked(x, a, values, meta, b, bias, out) -> torch.Tensor:
    h = blockdiag(x, b, out_dtype=torch.float32)
    h = h.reshape(-1, h.shape[-1])
    if fusable(a):
        y = sparse24_small(h, values, meta, a=a, bias=bias, out=out, out_dtype=x.dtype)
    else:
        z = sparse24_small(h, values, meta, out_dtype=torch.float32)
        y = blockdiag(z, a, bias, out=out, out_dtype=x.dtype)
    return y if out is not None else y.reshape(*x.shape[:-1], values.shape[0])


# ---------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------
class TritonBackend(Backend):
    name = "triton"
    ops = OPS
    dtypes = FLOAT_DTYPES
    max_tokens: ClassVar[dict[str, int]] = {"sparse24_matmul": MAX_SMALL_TOKENS, "armor_linear": MAX_SMALL_TOKENS}

    @property
    def device_types(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if interpreting() else ("cuda",)

    def is_available(self) -> tuple[bool, str]:
        if IMPORT_ERROR:
            return False, f"triton is not importable ({IMPORT_ERROR})"
        if not torch.cuda.is_available() and not interpreting():
            return False, "no CUDA GPU, and TRITON_INTERPRET=1 is not set (the interpreter runs the kernels on CPU)"
        return True, ""

    def check_device(self, x, weights) -> str:
        if x.device.type not in self.device_types:
            return f"tensors on {x.device.type}: needs CUDA, or CPU with TRITON_INTERPRET=1"
        return super().check_device(x, weights)

    def blockdiag_matmul(self, x, blocks, bias=None):
        return blockdiag(x, blocks, bias)

    def sparse24_matmul(self, x, values, meta, bias=None):
        return sparse24_small(x, values, meta, bias=bias)

    def armor_linear(self, x, a, values, meta, b, bias=None):
        return decode_layer(x, a, values, meta, b, bias)


BACKEND = TritonBackend()
