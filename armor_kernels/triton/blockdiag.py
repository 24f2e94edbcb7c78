"""Block-diagonal transform ``y = x · blockdiag(W)ᵀ (+ bias)``.

``W`` is ``[n_blocks, bs, bs]``; output column ``j·bs + r`` of a token is
``Σ_c x[j·bs + c] · W[j, r, c]``. One program computes a ``BLOCK_M x BLOCK_N``
tile of one diagonal block and loops over that block's ``bs`` inputs in steps
of ``BLOCK_K``; masks handle ``bs`` that is not a power of two (96, 12, ...).

Two inner products, picked at compile time:
- ``USE_DOT``: ``tl.dot`` on tensor cores (needs every tile dim >= 16);
  operands are cast to ``DOT_DTYPE`` (the weights' dtype on GPU, fp32 under the
  interpreter), accumulation is fp32, fp32 operands use ``ieee`` precision.
  ``X_SPLIT`` (fp32 input, 16-bit weights): ``x`` goes in as its 16-bit high
  part plus the 16-bit rounding of the remainder, two dots, ~16 bits of mantissa
  without an fp32 ``ieee`` dot (which spills: 4 KB per thread at 128-wide blocks).
- otherwise a broadcast multiply + reduce on CUDA cores, for small blocks
  (bs = 4..12) and few tokens where a 16-wide dot would be mostly padding.

Everything loaded is upcast to fp32 first: the interpreter's bf16 arithmetic is
wrong, and on GPU the upcast is free next to the loads.
"""

import triton
import triton.language as tl

try:  # programmatic dependent launch (sm_90+): in Triton 3.6 and 3.9
    from triton.language.extra.cuda import gdc_launch_dependents
except ImportError:  # pragma: no cover - older Triton: the launcher never asks for it
    gdc_launch_dependents = None


@triton.jit
def blockdiag_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    M,
    BS,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    X_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr = False,
):
    if LAUNCH_DEPENDENTS:
        # let the next kernel (launched with launch_pdl) be scheduled now; it waits for this one
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    pid_n = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output row inside the block
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < BS
    col0 = blk * BS  # first column of this block in x and y
    # int64 row offsets: M * stride can pass 2**31 for long prefills of wide layers
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_blk = w_ptr + blk.to(tl.int64) * BS * BS

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, BS, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < BS
        x = tl.load(x_rows + (col0 + kk)[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        # W[blk, n, k] read as a [BLOCK_K, BLOCK_N] tile (W transposed), contiguous along k
        w = tl.load(w_blk + offs_n[None, :] * BS + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        if X_SPLIT:
            x_hi = x.to(DOT_DTYPE)
            acc = tl.dot(x_hi, w.to(DOT_DTYPE), acc)
            acc = tl.dot((x - x_hi.to(tl.float32)).to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
        elif USE_DOT:
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + col0 + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + (col0 + offs_n)[None, :] * stride_yk
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
