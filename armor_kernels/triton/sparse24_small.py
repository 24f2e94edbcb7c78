"""Few-token 2:4 product ``z = x Sᵀ`` read straight from the packed format, with
the output wrapper ``A`` and the bias applied in the epilogue.

Memory-bound regime (1..16 tokens; more run as a grid of token tiles): the time is
the bytes of the compressed core (``d_out·d_in/2`` values + ``d_out·d_in/8``
metadata bytes), read once, never expanded in memory. Layout of the main loop:
a ``[BLOCK_O, NT, 8]`` tile of kept values, contiguous per row, so every thread
owns 8 values (4 groups) of one row: one 16-byte load, plus the 2 metadata bytes
of those 4 groups (one 16-bit word, nibble of group ``q`` at bit ``4q``). Lanes
run along the row (8 lanes = 128 contiguous bytes), warps and registers along
rows. Two inner products, picked at compile time:

- CUDA cores (``USE_DOT=False``, up to 4 tokens per program): ``x`` is loaded
  densely (the thread's 16 columns) and each kept value picks its column by
  arithmetic on the index bits, no compares and no zero padding: an isolated
  bit ``2^k`` times ``0x3F800000 >> k`` is the float 1.0 (or 0.0), so
  ``x[i0] = x0 + b00·(x1-x0) + b01·(x2-x0)`` (``i0`` is 0, 1 or 2) and
  ``x[i1] = x1 + b11·((x2-x1) + b10·(x3-x2))`` (``i1`` is 1, 2 or 3): 2 FMAs per
  value and token, the differences shared by the thread's rows. Products
  accumulate per thread; one reduction after the loop.
- tensor cores (``USE_DOT=True``, 16-bit weights, 16-token tiles): each group's
  value pair is one 32-bit word; the two 32-bit halves of the dense group
  (columns 0-1 and 2-3) are selected from {pair, low half, high half, shifted,
  0} by the nibble, and the ``[BLOCK_O, 16·NT]`` tile goes to ``tl.dot``. An fp32
  ``x`` is split into a 16-bit high part and the 16-bit rounding of the
  remainder (two dots), so it keeps ~16 bits of mantissa.

Epilogue: each program writes its fp32 partial ``[BLOCK_M, BLOCK_O]`` to a
workspace and bumps the tile's counter; the last of the ``SPLIT_K`` programs
sums the partials in split order (deterministic), resets the counter to 0, applies
``A`` restricted to the tile (the tile holds whole ``A`` blocks; ``A`` is loaded
before the counter so its latency overlaps) on tensor cores in the weights'
dtype (``z`` split into high and low 16-bit parts: two dots), adds the bias and
stores ``y`` once. One launch.
"""

import triton
import triton.language as tl

try:  # programmatic dependent launch (sm_90+): in Triton 3.6 and 3.9
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover - older Triton: the launcher never asks for it
    gdc_wait = None


@triton.jit
def _bit_as_float(word, bit):
    # word & 2^k is 0 or 2^k; times 0x3F800000 >> k it is the bit pattern of 0.0 or 1.0 (k <= 15)
    return ((word & bit) * (0x3F800000 // bit)).to(tl.float32, bitcast=True)


@triton.jit
def _dense_group(pr, word, bit00, bit01, bit10, bit11):
    """Columns 0-1 (lo) and 2-3 (hi) of a group as 32-bit pairs of 16-bit weights, from its value pair.

    Bits of the nibble: b00/b01 of i0 (0..2), b10/b11 of i1 (1..3). lo = [v0, v1] when (0, 1),
    [v0, 0] when i0 = 0 < i1 - 1, [0, v0] when i0 = 1, 0 when i0 = 2; hi likewise from i1.
    """
    b00 = (word & bit00) != 0
    b01 = (word & bit01) != 0
    b10 = (word & bit10) != 0
    b11 = (word & bit11) != 0
    lo = tl.where(b00, pr << 16, tl.where(b01, 0, tl.where(b11, pr & 0xFFFF, pr)))
    hi = tl.where(b01, pr, tl.where(b11, tl.where(b10, pr & -65536, (pr >> 16) & 0xFFFF), 0))
    return lo, hi


@triton.jit
def _token_fma(acc, x_row, xcols, x_ok, v0, v1, f00, f01, f10, f11, NT: tl.constexpr, EVEN: tl.constexpr):
    """acc += v0·x[4g+i0] + v1·x[4g+i1] for one token; x_row points at the token's row."""
    if EVEN:
        xv = tl.load(x_row + xcols).to(tl.float32)  # [NT, 16]
    else:
        xv = tl.load(x_row + xcols, mask=x_ok, other=0.0).to(tl.float32)
    xa, xb = tl.split(tl.reshape(xv, (NT, 4, 2, 2)))
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    s0 = x0[None] + f00 * (x1 - x0)[None] + f01 * (x2 - x0)[None]
    s1 = x1[None] + f11 * ((x2 - x1)[None] + f10 * (x3 - x2)[None])
    acc += v0 * s0
    acc += v1 * s1
    return acc


@triton.jit
def _store_partial(ws_tok, rows, row_ok, acc):
    z = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(ws_tok + rows, z, mask=row_ok)


@triton.jit
def _split_dot(z, b, acc, DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr):
    """acc + z @ b in DOT_DTYPE; with SPLIT, z (fp32) is fed as high + low 16-bit parts."""
    hi = z.to(DOT_DTYPE)
    acc = tl.dot(hi, b, acc, input_precision="ieee")
    if SPLIT:
        lo = (z - hi.to(tl.float32)).to(DOT_DTYPE)
        acc = tl.dot(lo, b, acc, input_precision="ieee")
    return acc


@triton.jit
def sparse24_small_kernel(
    x_ptr,
    vals_ptr,
    meta_ptr,
    a_ptr,
    bias_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    D_OUT,
    N_VALS,
    N_META,
    ROWS_PER_TILE,
    B_OUT,
    VALS_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_vo,
    stride_mo,
    stride_ym,
    stride_yo,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    NT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FUSE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    X_SPLIT: tl.constexpr,
    Z_SPLIT: tl.constexpr,
    EPI_M: tl.constexpr,
    EVEN: tl.constexpr,
    PAIRS: tl.constexpr,
    GDC_WAIT: tl.constexpr = False,
):
    if GDC_WAIT:
        # launched with launch_pdl behind the B-wrapper: wait until it has finished and its h is
        # visible, before touching h, the workspace or the counters
        gdc_wait()
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    lane = tl.arange(0, BLOCK_O)
    rows = pid_o * ROWS_PER_TILE + lane
    row_ok = (lane < ROWS_PER_TILE) & (rows < D_OUT)
    m0 = pid_m * BLOCK_M
    t = tl.arange(0, NT)
    q = tl.arange(0, 4)
    b2 = tl.arange(0, 2)
    c16 = tl.arange(0, 16)

    v_lo = pid_k * VALS_PER_SPLIT
    v_hi = tl.minimum(v_lo + VALS_PER_SPLIT, N_VALS)
    # rows the loops read: past the last row they repeat it, so the loads need no row mask
    # (those rows are computed and dropped: every store is masked by row_ok)
    rows_ld = tl.minimum(rows, D_OUT - 1).to(tl.int64)[:, None]
    # bits of the index pair of group q in the thread's 16-bit metadata word
    sh = 4 * q
    bit00 = (1 << sh)[None, None, :]
    bit01 = (2 << sh)[None, None, :]
    bit10 = (4 << sh)[None, None, :]
    bit11 = (8 << sh)[None, None, :]

    ws_base = ws_ptr + (pid_m * SPLIT_K + pid_k).to(tl.int64) * BLOCK_M * D_OUT
    # 16-bit values as 32-bit pairs (the row stride is even: the launcher checks)
    pairs_ptr = vals_ptr.to(tl.pointer_type(tl.int32))
    if USE_DOT:
        # ---- tensor cores: dense 16-bit tile from 32-bit value pairs
        # the values viewed as int32: one word per group; 2-D loads as in the CUDA-core loop
        kp = tl.arange(0, NT * 4)
        kb = tl.arange(0, NT * 2)
        p_rows2 = pairs_ptr + rows_ld * (stride_vo // 2)
        m_rows2 = meta_ptr + rows_ld * stride_mo
        kk = tl.arange(0, NT * 16)
        mm = tl.arange(0, BLOCK_M)
        x_tok = x_ptr + (m0 + mm).to(tl.int64)[None, :] * stride_xm
        x_tok_ok = (m0 + mm < M)[None, :]
        acc = tl.zeros((BLOCK_O, BLOCK_M), dtype=tl.float32)
        for k0 in range(v_lo, v_hi, NT * 8):
            poff = k0 // 2 + kp
            moff = tl.max_contiguous(k0 // 4 + kb, 2)
            cols = 2 * k0 + kk
            if EVEN:
                pr = tl.load(p_rows2 + poff[None, :])
                mb = tl.load(m_rows2 + moff[None, :])
                xt = tl.load(x_tok + cols[:, None] * stride_xk, mask=x_tok_ok, other=0.0)
            else:
                pr = tl.load(p_rows2 + poff[None, :], mask=(poff < v_hi // 2)[None, :], other=0)
                mb = tl.load(m_rows2 + moff[None, :], mask=(moff < N_META)[None, :], other=0)
                xt = tl.load(x_tok + cols[:, None] * stride_xk, mask=x_tok_ok & (cols < 2 * v_hi)[:, None], other=0.0)
            pr = tl.reshape(pr, (BLOCK_O, NT, 4))
            mb = tl.reshape(mb, (BLOCK_O, NT, 2))
            word = tl.sum(mb.to(tl.int32) << (8 * b2)[None, None, :], axis=2)[:, :, None]
            lo, hi = _dense_group(pr, word, bit00, bit01, bit10, bit11)
            w = tl.join(tl.join(lo.to(tl.int16), hi.to(tl.int16)), tl.join((lo >> 16).to(tl.int16), (hi >> 16).to(tl.int16)))
            w = tl.reshape(w, (BLOCK_O, NT * 16)).to(vals_ptr.dtype.element_ty, bitcast=True).to(DOT_DTYPE)
            if X_SPLIT:
                xt = xt.to(tl.float32)
                x_hi = xt.to(DOT_DTYPE)
                acc = tl.dot(w, x_hi, acc)
                acc = tl.dot(w, (xt - x_hi.to(tl.float32)).to(DOT_DTYPE), acc)
            else:
                acc = tl.dot(w, xt.to(DOT_DTYPE), acc, input_precision="ieee")
        tl.store(ws_base + mm[None, :] * D_OUT + rows[:, None], acc, mask=row_ok[:, None])
    else:
        # ---- CUDA cores: per-value column selection by arithmetic, up to 4 tokens
        # values and metadata are loaded as 2-D tiles (contiguous along the row, so every Triton
        # version puts the lanes along the row), then viewed as [BLOCK_O, NT, 8] / [BLOCK_O, NT, 2]
        kv = tl.arange(0, NT * 8)
        kb = tl.arange(0, NT * 2)
        kp = tl.arange(0, NT * 4)
        v_rows = vals_ptr + rows_ld * stride_vo
        p_rows2 = pairs_ptr + rows_ld * (stride_vo // 2)
        m_rows2 = meta_ptr + rows_ld * stride_mo
        xk = (t[:, None] * 16 + c16[None, :]) * stride_xk  # [NT, 16] column offsets inside a chunk
        x0_row = x_ptr + m0.to(tl.int64) * stride_xm
        acc0 = tl.zeros((BLOCK_O, NT, 4), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_O, NT, 4), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_O, NT, 4), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_O, NT, 4), dtype=tl.float32)
        for k0 in range(v_lo, v_hi, NT * 8):
            voff = k0 + kv
            poff = k0 // 2 + kp
            # 2 metadata bytes per thread: the same 8 lanes along the row as the 16-byte value loads
            moff = tl.max_contiguous(k0 // 4 + kb, 2)
            if EVEN:
                mb = tl.load(m_rows2 + moff[None, :])
            else:
                # bytes past the split's end are harmless (their values load as 0)
                mb = tl.load(m_rows2 + moff[None, :], mask=(moff < N_META)[None, :], other=0)
            if PAIRS:
                # 16-bit weights: a value pair is one 32-bit word; bf16 -> fp32 is a shift (low) or a mask (high)
                if EVEN:
                    pr = tl.load(p_rows2 + poff[None, :])
                else:
                    pr = tl.load(p_rows2 + poff[None, :], mask=(poff < v_hi // 2)[None, :], other=0)
                pr = tl.reshape(pr, (BLOCK_O, NT, 4))
                if vals_ptr.dtype.element_ty == tl.bfloat16:
                    v0 = (pr << 16).to(tl.float32, bitcast=True)
                    v1 = (pr & -65536).to(tl.float32, bitcast=True)
                else:
                    v0 = pr.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                    v1 = (pr >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                if EVEN:
                    v = tl.load(v_rows + voff[None, :])
                else:
                    v = tl.load(v_rows + voff[None, :], mask=(voff < v_hi)[None, :], other=0.0)
                v0, v1 = tl.split(tl.reshape(v.to(tl.float32), (BLOCK_O, NT, 4, 2)))
            mb = tl.reshape(mb, (BLOCK_O, NT, 2))
            word = tl.sum(mb.to(tl.int32) << (8 * b2)[None, None, :], axis=2)[:, :, None]
            f00 = _bit_as_float(word, bit00)
            f01 = _bit_as_float(word, bit01)
            f10 = _bit_as_float(word, bit10)
            f11 = _bit_as_float(word, bit11)
            xcols = 2 * k0 * stride_xk + xk
            x_ok = (2 * k0 + t[:, None] * 16 + c16[None, :]) < 2 * v_hi  # unused (removed) when EVEN
            tz = m0 + 0 * t[:, None]  # token index as a tensor (a scalar compare is not a mask)
            acc0 = _token_fma(acc0, x0_row, xcols, x_ok & (tz < M), v0, v1, f00, f01, f10, f11, NT, EVEN)
            if BLOCK_M > 1:
                acc1 = _token_fma(acc1, x0_row + stride_xm, xcols, x_ok & (tz + 1 < M), v0, v1, f00, f01, f10, f11, NT, EVEN)
            if BLOCK_M > 2:
                acc2 = _token_fma(acc2, x0_row + 2 * stride_xm, xcols, x_ok & (tz + 2 < M), v0, v1, f00, f01, f10, f11, NT, EVEN)
                acc3 = _token_fma(acc3, x0_row + 3 * stride_xm, xcols, x_ok & (tz + 3 < M), v0, v1, f00, f01, f10, f11, NT, EVEN)
        _store_partial(ws_base, rows, row_ok, acc0)
        if BLOCK_M > 1:
            _store_partial(ws_base + D_OUT, rows, row_ok, acc1)
        if BLOCK_M > 2:
            _store_partial(ws_base + 2 * D_OUT, rows, row_ok, acc2)
            _store_partial(ws_base + 3 * D_OUT, rows, row_ok, acc3)

    # ---- A tile (epilogue operand): loaded after the loop (not live in it) and before the counter, so its
    # latency overlaps the partial's store and the atomic
    if FUSE_A:
        # at[j, i] = A[blk, i % b, j % b] when rows i and j are in the same block, else 0
        blk = lane // B_OUT
        r = lane % B_OUT
        first_blk = pid_o * (ROWS_PER_TILE // B_OUT)
        a_off = (first_blk + blk).to(tl.int64)[None, :] * B_OUT * B_OUT + r[None, :] * B_OUT + r[:, None]
        a_ok = (blk[:, None] == blk[None, :]) & row_ok[:, None] & row_ok[None, :]
        at = tl.load(a_ptr + a_off, mask=a_ok, other=0.0)

    # ---- split-K reduction and epilogue, by the last program of the tile
    # every thread's partial is written before the counter moves (bar.sync + release)
    tl.debug_barrier()
    last = True
    counter = cnt_ptr + pid_m * tl.num_programs(0) + pid_o
    if SPLIT_K > 1:
        last = tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        # workspace [m_tiles, SPLIT_K, BLOCK_M, D_OUT] fp32; EPI_M = max(16, BLOCK_M) token rows (tl.dot)
        em = tl.arange(0, EPI_M)
        ws_tile = ws_ptr + pid_m.to(tl.int64) * SPLIT_K * BLOCK_M * D_OUT + em[:, None] * D_OUT + rows[None, :]
        ws_ok = (em[:, None] < BLOCK_M) & row_ok[None, :]
        total = tl.zeros((EPI_M, BLOCK_O), dtype=tl.float32)
        for s in range(SPLIT_K):
            # .cg: read the partials from L2, where the other programs' stores landed
            total += tl.load(ws_tile + s * BLOCK_M * D_OUT, mask=ws_ok, other=0.0, cache_modifier=".cg")
        if SPLIT_K > 1:
            tl.atomic_xchg(counter, 0)
        out = total
        if FUSE_A:
            out = _split_dot(total, at.to(DOT_DTYPE), tl.zeros_like(total), DOT_DTYPE, Z_SPLIT)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        offs_m = m0 + em
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + rows[None, :] * stride_yo
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(em[:, None] < BLOCK_M) & (offs_m < M)[:, None] & row_ok[None, :])
