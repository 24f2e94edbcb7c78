"""Few-token 2:4 product ``z = x Sᵀ`` read straight from the packed format, with
the output wrapper ``A`` and the bias fused into the epilogue.

Memory-bound regime (1..16 tokens; more tokens run as a grid of 16-token tiles): the time is the bytes of the compressed core
(``d_out·d_in/2`` values + ``d_out·d_in/8`` metadata bytes), so the kernel reads
each value and metadata byte exactly once, keeps no dense copy in memory and
does the arithmetic in fp32 on CUDA cores (up to 8 tokens) or, from 9 tokens,
on tensor cores with the register tile in the weights' dtype (``USE_DOT``):

1. load a ``[BLOCK_O, BLOCK_G, 2]`` tile of kept values (contiguous per row) and
   the matching metadata bytes, decode the two column offsets of every group;
2. place the two values at their offsets inside a ``[BLOCK_O, 4·BLOCK_G]``
   register tile (zeros elsewhere) and multiply-reduce it against the
   ``[BLOCK_M, 4·BLOCK_G]`` activation chunk, which every row shares;
3. epilogue: when a tile spans whole ``A`` blocks (``ROWS_PER_TILE`` a multiple
   of ``B_OUT``), ``y = z · A_tileᵀ`` is computed in registers, the bias added
   and ``y`` stored once in the output dtype; otherwise ``z`` is stored.

Split-K: with few output tiles (``d_out / b_out``, e.g. 32 for 4096 rows with
b = 128) the GPU would idle, so ``SPLIT_K`` programs share a tile, each over a
slice of the groups. Each writes its fp32 partial to a workspace, then bumps the
tile's counter; the last to arrive sums the partials in split order
(deterministic), resets the counter to 0 for the next call, and runs the
epilogue. One launch, no separate reduction kernel.
"""

import triton
import triton.language as tl


@triton.jit
def _epilogue(
    acc,
    pid_o,
    lane,
    rows,
    row_ok,
    offs_m,
    m_ok,
    a_ptr,
    bias_ptr,
    y_ptr,
    ROWS_PER_TILE,
    B_OUT,
    stride_ym,
    stride_yo,
    BLOCK_M: tl.constexpr,
    FUSE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    out = acc
    if FUSE_A:
        # A restricted to this tile: entry (i, j) is A[blk, i % b, j % b] when
        # rows i and j are in the same block, else 0. The tile starts on a block edge.
        blk = lane // B_OUT
        first_blk = pid_o * (ROWS_PER_TILE // B_OUT)
        r = lane % B_OUT
        a_off = (first_blk + blk).to(tl.int64)[:, None] * B_OUT * B_OUT + r[:, None] * B_OUT + r[None, :]
        a_ok = (blk[:, None] == blk[None, :]) & row_ok[:, None] & row_ok[None, :]
        a_tile = tl.load(a_ptr + a_off, mask=a_ok, other=0.0).to(tl.float32)
        if BLOCK_M >= 16:
            # fp32 FMA dot (ieee): no cross-thread reductions, A_tile staged once in shared memory
            out = tl.dot(acc, tl.trans(a_tile), input_precision="ieee")
        else:
            # tl.dot needs 16 rows; per token y_m = A_tile · z_m (<= 8 iterations, unrolled)
            out = tl.zeros_like(acc)
            local_m = tl.arange(0, BLOCK_M)
            for m in tl.static_range(BLOCK_M):
                sel = local_m[:, None] == m
                z_m = tl.sum(tl.where(sel, acc, 0.0), axis=0)
                y_m = tl.sum(a_tile * z_m[None, :], axis=1)
                out += tl.where(sel, y_m[None, :], 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        out += bias[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + rows[None, :] * stride_yo
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


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
    N_GROUPS,
    ROWS_PER_TILE,
    B_OUT,
    GROUPS_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_vo,
    stride_mo,
    stride_ym,
    stride_yo,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_G: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FUSE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    lane = tl.arange(0, BLOCK_O)
    rows = pid_o * ROWS_PER_TILE + lane
    row_ok = (lane < ROWS_PER_TILE) & (rows < D_OUT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    gg = tl.arange(0, BLOCK_G)
    pair = tl.arange(0, 2)
    quad = tl.arange(0, 4)

    g_lo = pid_k * GROUPS_PER_SPLIT
    g_hi = tl.minimum(g_lo + GROUPS_PER_SPLIT, N_GROUPS)
    v_rows = vals_ptr + rows.to(tl.int64)[:, None, None] * stride_vo
    m_rows = meta_ptr + rows.to(tl.int64)[:, None] * stride_mo
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for g0 in range(g_lo, g_hi, BLOCK_G):
        g = g0 + gg
        g_ok = g < g_hi
        # the 2 kept values of each group: contiguous along the row
        v = tl.load(
            v_rows + (2 * g)[None, :, None] + pair[None, None, :],
            mask=row_ok[:, None, None] & g_ok[None, :, None],
            other=0.0,
        ).to(tl.float32)
        v0, v1 = tl.split(v)
        # nibble of group g: low half of byte g // 2 for even g, high half for odd g
        byte = tl.load(m_rows + (g // 2)[None, :], mask=row_ok[:, None] & g_ok[None, :], other=0).to(tl.int32)
        nib = (byte >> ((g % 2) * 4)[None, :]) & 15
        i0 = nib & 3
        i1 = nib >> 2
        # the group's 4 columns in registers: v0 at offset i0, v1 at i1, zeros elsewhere
        w = tl.where(i0[:, :, None] == quad[None, None, :], v0[:, :, None], 0.0)
        w += tl.where(i1[:, :, None] == quad[None, None, :], v1[:, :, None], 0.0)
        w = tl.reshape(w, (BLOCK_O, 4 * BLOCK_G))
        # activations of the chunk's 4·BLOCK_G columns, shared by every row of the tile
        cols = tl.reshape(4 * g[:, None] + quad[None, :], (4 * BLOCK_G,))
        c_ok = tl.reshape(g_ok[:, None] & (quad[None, :] < 4), (4 * BLOCK_G,))
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if USE_DOT:
            # 9..16 tokens: the expanded tile goes through the tensor cores (2x the
            # useful FLOPs, but CUDA cores would be the bottleneck at 16 tokens)
            acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w).to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)

    if SPLIT_K == 1:
        _epilogue(
            acc,
            pid_o,
            lane,
            rows,
            row_ok,
            offs_m,
            m_ok,
            a_ptr,
            bias_ptr,
            y_ptr,
            ROWS_PER_TILE,
            B_OUT,
            stride_ym,
            stride_yo,
            BLOCK_M,
            FUSE_A,
            HAS_BIAS,
        )
    else:
        # workspace [m_tiles, SPLIT_K, BLOCK_M, D_OUT] fp32, counters [m_tiles, n_tiles] int32 (0 between calls)
        local_m = tl.arange(0, BLOCK_M)
        ws_tile = ws_ptr + pid_m * SPLIT_K * BLOCK_M * D_OUT + local_m[:, None] * D_OUT + rows[None, :]
        ws_ok = row_ok[None, :] & (local_m[:, None] < BLOCK_M)
        tl.store(ws_tile + pid_k * BLOCK_M * D_OUT, acc, mask=ws_ok)
        # every thread's partial is written before the counter moves (bar.sync + release)
        tl.debug_barrier()
        counter = cnt_ptr + pid_m * tl.num_programs(0) + pid_o
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
            for s in range(SPLIT_K):
                # .cg: read the partials from L2, where the other programs' stores landed
                total += tl.load(ws_tile + s * BLOCK_M * D_OUT, mask=ws_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
            _epilogue(
                total,
                pid_o,
                lane,
                rows,
                row_ok,
                offs_m,
                m_ok,
                a_ptr,
                bias_ptr,
                y_ptr,
                ROWS_PER_TILE,
                B_OUT,
                stride_ym,
                stride_yo,
                BLOCK_M,
                FUSE_A,
                HAS_BIAS,
            )
