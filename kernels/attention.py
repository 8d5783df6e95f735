r"""Causal self-attention as one fused Triton kernel, FlashAttention-2 style: forward, backward and dropout.

The op.  For one (batch, head) pair, with q, k, v of shape (T, D) and a scale (default 1/sqrt(D)):

    S = scale * q k^T                    (T, T) scores; entries above the diagonal (j > i, the future) are -inf
    P = softmax(S) row by row            (T, T) attention weights
    O = dropout(P) v                     (T, D) with dropout(P) = P * M / (1 - p), M_ij ~ Bernoulli(1 - p)

More generally q holds the last Tq of the Tk positions (Tq = 1 decodes one token): query row i sits at position
a_i = (Tk - Tq) + i and sees keys 0 .. a_i; below, T means Tq = Tk. No (T, T) matrix is ever stored: each program
keeps BLOCK_M query rows in registers and streams the keys and values past them BLOCK_N at a time.

Online softmax (forward).  The keys arrive one tile at a time: keep a running max m, sum l and unnormalized output
acc, rescaled whenever the max grows. For key tile j, with the tile's scores S_j:

    m_new = max(m, rowmax(S_j))
    alpha = exp(m - m_new)                          how much the old terms shrink under the new max
    P~_j  = exp(S_j - m_new)
    l     = alpha * l + rowsum(P~_j)
    acc   = alpha * acc + P~_j v_j,     m = m_new

and at the end O = acc / l and LSE = m + log(l). Statistics and accumulators are float32; P~_j (and dS in the backward)
is rounded to the 16-bit input dtype for the tensor cores, the main difference from float32 math (the tests' per-dtype
tolerances allow for it). exp is exp2 with log2(e) folded into the scale (qk_scale = scale * log2 e): m and the saved
LSE stay in base 2, as converting would only add rounding.

Causality in tiles.  A query tile [r, r + BLOCK_M) needs the keys [0, r + BLOCK_M): key tiles above the diagonal are
skipped by the loop bounds (half the work), those wholly before r need no mask, and only the diagonal band, in a loop
of its own, compares positions. With Tq < Tk the band starts at a = (Tk - Tq) + r, rounded down to a key tile; the
inner loops are the same code for every offset. Packed documents (DOCS) bound the loops too: a query tile starts at
its first row's document start, a key tile ends at its last key's document end; visited scores are masked by both.

Backward.  With dO = dL/dO, and Pd = P * M / (1 - p) the dropped-out weights:

    dV  = Pd^T dO
    dP  = (dO v^T) * M / (1 - p)                     the gradient reaching P passes the same dropout
    dS  = P * (dP - delta),  delta_i = sum_j P_ij dP_ij        (softmax's Jacobian, row by row)
    dQ  = scale * dS k,      dK = scale * dS^T q

delta is cheap: sum_j P_ij dP_ij = sum_j Pd_ij (dO_i . v_j) = dO_i . O_i, one pass over (T, D) tensors, with or
without dropout. P is recomputed from q, k and the saved LSE, P = exp(S - LSE), not stored. Three kernels: the delta
pass; dK/dV (a program owns a key tile, walks the query tiles from the diagonal down); dQ (a program owns a query
tile, walks the key tiles up to the diagonal). No atomics, deterministic, at the price of S and dP twice.

Dropout.  The keep mask is drawn in the kernels with Philox: tl.randint4x(key, counter) is a pure function, so the
backward regenerates the forward's mask and nothing is stored. Entry (i, j) of head bh uses the key seed + bh * 2^32
(64 bits: bh in the high word) and the counter a * Tk + 8 * (j // 8), a the query's position; the call's four 32-bit
words serve 8 keys, 16 bits each: keys 8g + 0 .. 8g + 7 take, in order,

    w0 low, w2 low, w1 low, w3 low, w0 high, w2 high, w1 high, w3 high       (low / high: the 16-bit halves)

the order _keep_mask's tl.join gives (``kernels/tiled.py`` rebuilds the mask from this sentence; its test matches
the kernel bit for bit). Positions, not row numbers: a chunk's rows (Tq < Tk) draw what they draw in the whole
problem; counters fit an int32 while Tk <= 46340 = MAX_DROPOUT_T. Kept: a draw >= round(p * 2^16) (dropped with
probability p to within 2^-17), scaled by 1 / (1 - p); l and the LSE use the undropped P, as nn.Dropout on the
softmax output. The seed comes from torch's default CPU generator: torch.manual_seed reproduces a run.

Cost.  Forward FLOPs = 2 * 2 * B * H * T * T * D / 2, the backward's five matmuls 2.5x that; decoding (Tq = 1) is
memory-bound: 16-row query tiles, one program a head (``kernels/costs.py``; benchmarks/NOTES.md).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_tiles import Tiles, block_d, choose_tiles, dot_precision, preprocess_tiles, tuning_report
from .checks import check_attention_inputs
from .launch import check_tensor, kernel_dtype

__all__ = ["attention_bwd", "attention_fwd", "causal_attention", "MAX_HEAD_DIM", "Tiles", "tuning_report"]

MAX_HEAD_DIM = 128  # one (BLOCK, 128) tile of q, k, v and the accumulators must fit in registers / shared memory
MAX_DROPOUT_T = 46340  # the Philox counter a * Tk + 8 * (j // 8) is an int32: below 2^31 for every a, j < Tk
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


# ----------------------------------------------------------------------------------------------------------------
# Dropout's mask


@triton.jit
def _keep_mask(rng_key, rows, first_key, T, dropout_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R, BLOCK_C) booleans, True where the weight of the query at position ``rows[r]`` on key
    ``first_key + c`` is kept (T: the number of keys, Tk).

    ``first_key`` is a multiple of 8 and BLOCK_C of 8: each group of 8 keys shares one Philox call (see "Dropout").
    The counter is rows[r] * T + first_key + 8 * (c // 8); a caller holding query rows r counted from position
    ``offset`` passes first_key + offset * T instead, since (offset + r) * T + j = r * T + (j + offset * T).
    """
    tl.static_assert(BLOCK_C % 8 == 0, "dropout draws 8 keys per Philox call: the key tile must be a multiple of 8")
    groups = first_key + 8 * tl.arange(0, BLOCK_C // 8)  # the first key of each group of 8
    w0, w1, w2, w3 = tl.randint4x(rng_key, rows[:, None] * T + groups[None, :])  # (BLOCK_R, BLOCK_C // 8) uint32
    # tl.join stacks two tensors along a new LAST axis, held by one thread, so each Philox call is made once and its
    # bits spread in registers. Three joins give (BLOCK_R, BLOCK_C // 8, half, word_in_pair, pair) — half: low 0 /
    # high 1; word = 2 * pair + word_in_pair — and the row-major reshape below numbers the 8 keys of a group
    # r = 4 * half + 2 * word_in_pair + pair: w0 low, w2 low, w1 low, w3 low, w0 high, w2 high, w1 high, w3 high.
    w01 = tl.join(tl.join(w0 & 0xFFFF, w0 >> 16), tl.join(w1 & 0xFFFF, w1 >> 16))
    w23 = tl.join(tl.join(w2 & 0xFFFF, w2 >> 16), tl.join(w3 & 0xFFFF, w3 >> 16))
    draws = tl.join(w01, w23)  # uniform on [0, 2^16)
    threshold = tl.cast(dropout_p * 65536.0 + 0.5, tl.uint32)  # round(p * 2^16): P(draw < threshold) = p to 2^-17
    return tl.reshape(draws, (BLOCK_R, BLOCK_C)) >= threshold  # row-major: key = group's first + r


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, q_pos, DOC_START, offs_d, d_ok, lo, hi, Tk, qk_scale,
               dropout_p, rng_key, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr, IN_DOCUMENT: tl.constexpr):
    """Fold the key tiles [lo, hi) into the running (acc, l, m) of one query tile (the online softmax above).
    ``q_pos``: the tile's query positions among the Tk keys. IN_DOCUMENT: keys before the start of a row's
    document (``DOC_START``, this window's) are masked."""
    if IN_DOCUMENT:
        q_doc_start = tl.load(DOC_START + q_pos, mask=q_pos < Tk, other=0)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)  # key positions of this tile
        if ON_DIAGONAL:
            kv_mask = (cols < Tk)[:, None] & d_ok[None, :]  # the diagonal band may run past the last key
        else:
            kv_mask = d_ok[None, :]  # below the diagonal every key exists
        k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if ON_DIAGONAL:
            s = tl.where(q_pos[:, None] >= cols[None, :], s, float("-inf"))
        if IN_DOCUMENT:
            s = tl.where(cols[None, :] >= q_doc_start[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if IN_DOCUMENT:  # a row whose document starts after this tile: a finite max, so that exp2 gives 0, not NaN
            m_new = tl.maximum(m_new, -1.0e30)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer sums the undropped weights
        if DROPOUT:
            keep = _keep_mask(rng_key, q_pos, start_n, Tk, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)  # the 1 / (1 - p) factor is applied once, at the end
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])
def _attention_fwd(
    Q, K, V,  # q (B, H, Tq, D), k and v (B, H, Tk, D), last dim contiguous
    O,  # (B, H, Tq, D) output, contiguous
    LSE,  # (B * H, Tq) float32 output: each row's log-sum-exp in base 2 (LSE * log2 e), for the backward
    DOC_START,  # (B, Tk) int32: where the document of each position starts (read when DOCS)
    stride_qb, stride_qh, stride_qt,  # q's strides in elements (batch, head, time)
    stride_kb, stride_kh, stride_kt,  # k's strides
    stride_vb, stride_vh, stride_vt,  # v's strides
    stride_ob, stride_oh, stride_ot,  # o's strides
    H, Tq, Tk,  # number of heads, of queries and of keys (Tq <= Tk: the queries are the last Tq positions)
    qk_scale,  # scale * log2(e), so scores feed exp2 directly
    dropout_p,  # probability of dropping an attention weight (used when DROPOUT)
    seed,  # Philox seed for the dropout mask (used when DROPOUT)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    DROPOUT: tl.constexpr,  # dropout_p > 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (full precision), "tf32" otherwise (ignored for 16-bit)
    DOCS: tl.constexpr,  # packed documents: a query sees only the keys of its own document
):
    start_m = tl.program_id(0)  # which query tile
    bh = tl.program_id(1)  # which (batch, head)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * Tq

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
    q_pos = (Tk - Tq) + offs_m  # their positions among the keys
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # constant true (and compiled away) when D is a power of two >= 16
    row_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rng_key = seed.to(tl.int64) + (bh.to(tl.int64) << 32)  # Philox key: (seed, bh) in (low, high) words

    first = (Tk - Tq) + start_m * BLOCK_M  # the tile's first query position
    lo = first // BLOCK_N * BLOCK_N  # rounded down to a key tile (first itself when Tq == Tk and BLOCK_N | BLOCK_M)
    first_key = 0  # keys before it are seen by no row of this tile
    if DOCS:
        # Document starts never decrease along a window: the tile's first row has the earliest, and no row sees a
        # key before it. The tiles from there are masked by document (one comparison a score, cheap next to the
        # two products), and those before it skipped.
        DOC_START += b * Tk
        first_key = tl.load(DOC_START + first) // BLOCK_N * BLOCK_N
    # keys [first_key, lo): in the past of every row of this tile, no causal mask (masked by document with them)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, q_pos, DOC_START, offs_d, d_ok,
                               first_key, lo, Tk, qk_scale, dropout_p, rng_key, BLOCK_M, BLOCK_N, DROPOUT,
                               DOT_PRECISION, ON_DIAGONAL=False, IN_DOCUMENT=DOCS)
    # keys [lo, first + BLOCK_M): the diagonal band, masked; every row sees key lo, so no row is all -inf
    # (with documents, every row sees at least its own key, and _fwd_inner keeps the max finite until it does)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, q_pos, DOC_START, offs_d, d_ok, lo,
                               tl.minimum(first + BLOCK_M, Tk), Tk, qk_scale, dropout_p, rng_key, BLOCK_M, BLOCK_N,
                               DROPOUT, DOT_PRECISION, ON_DIAGONAL=True, IN_DOCUMENT=DOCS)

    out_scale = 1.0 / l_i
    if DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)  # kept weights are scaled by 1 / (1 - p)
    acc = acc * out_scale[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention_bwd_preprocess(
    O, DO,  # (B, H, Tq, D) forward output and its gradient, last dim contiguous
    DELTA,  # (B * H, Tq) float32 output: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot,  # o's strides
    stride_dob, stride_doh, stride_dot,  # dO's strides
    H, Tq,  # number of heads, of query rows
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows per program
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, key_rows, key_doc_rows, mask_key, offs_d,
                    d_ok, lo, hi, Tq, Tk, qk_scale, dropout_p, dropout_scale, rng_key, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ON_DIAGONAL: tl.constexpr, IN_DOCUMENT: tl.constexpr):
    """Add the query rows [lo, hi) to one key tile's dK and dV. Tiles are kept transposed: (keys, queries).
    ``key_rows``: the first query row that sees each key of the tile; ``key_doc_rows``: the first row past each
    key's document (read when IN_DOCUMENT: rows from it on are masked); ``mask_key``: the tile's first key plus
    (Tk - Tq) * Tk, for _keep_mask on rows counted from the first query."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)  # query rows of this tile
        row_ok = rows < Tq  # the last query tile may run past Tq (below the diagonal too)
        q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # a missing row gets LSE = +inf, so its weights are exp2(-inf) = 0 and it adds nothing
        lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if ON_DIAGONAL:
            p_t = tl.where(rows[None, :] >= key_rows[:, None], p_t, 0.0)
        if IN_DOCUMENT:
            p_t = tl.where(rows[None, :] < key_doc_rows[:, None], p_t, 0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO v^T)^T
        if DROPOUT:
            keep_t = tl.trans(_keep_mask(rng_key, rows, mask_key, Tk, dropout_p, BLOCK_M, BLOCK_N))  # the forward's
            dv = tl.dot(tl.where(keep_t, p_t * dropout_scale, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_dkdv(
    Q, K, V,  # q (B, H, Tq, D), k and v (B, H, Tk, D): the forward's inputs, last dim contiguous
    DO,  # (B, H, Tq, D) gradient of the output, last dim contiguous
    LSE, DELTA,  # (B * H, Tq) float32: the forward's base-2 log-sum-exp and rowsum(dO * O)
    DK, DV,  # (B, H, Tk, D) outputs, contiguous
    DOC_END,  # (B, Tk) int32: where the document of each position ends, exclusive (read when DOCS)
    stride_qb, stride_qh, stride_qt,  # q's strides
    stride_kb, stride_kh, stride_kt,  # k's strides
    stride_vb, stride_vh, stride_vt,  # v's strides
    stride_dob, stride_doh, stride_dot,  # dO's strides
    stride_gb, stride_gh, stride_gt,  # dK's and dV's strides (the same layout)
    H, Tq, Tk,  # number of heads, of queries and of keys
    sm_scale,  # the softmax scale (dK = scale * dS^T q)
    qk_scale,  # sm_scale * log2(e)
    dropout_p,  # dropout probability (used when DROPOUT)
    seed,  # the forward's Philox seed (used when DROPOUT)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key rows per program
    DROPOUT: tl.constexpr,  # dropout_p > 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, "tf32" otherwise
    DOCS: tl.constexpr,  # packed documents: a query sees only the keys of its own document
):
    start_n = tl.program_id(0)  # which key tile
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_gb + h * stride_gh
    DV += b * stride_gb + h * stride_gh
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < Tk)[:, None] & d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    rng_key = seed.to(tl.int64) + (bh.to(tl.int64) << 32)
    dropout_scale = 1.0 / (1.0 - dropout_p)

    # Query row r sits at position offset + r and sees key j when offset + r >= j: rows before first_key - offset
    # see no key of this tile, rows from first_key + BLOCK_N - 1 - offset on see all of them. Both bounds are
    # rounded (down, up) to whole query tiles; when Tq == Tk they are first_key and first_key + BLOCK_N.
    offset = Tk - Tq
    first_key = start_n * BLOCK_N
    lo = tl.maximum(first_key - offset, 0) // BLOCK_M * BLOCK_M
    mid = (tl.maximum(first_key + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    key_rows = offs_n - offset  # the first query row that sees each key
    mask_key = first_key + offset * Tk  # _keep_mask's counters for rows counted from the first query
    key_doc_rows = key_rows  # no documents: nothing read, nothing masked by it
    last_row = Tq  # rows from here on see no key of the tile
    if DOCS:
        # A query sees a key of its past while it is in the key's document, which ends at DOC_END: the rows from
        # the end of the tile's last key's document on see none of its keys, and are skipped.
        DOC_END += b * Tk
        key_doc_rows = tl.load(DOC_END + offs_n, mask=offs_n < Tk, other=0) - offset
        last_row = tl.maximum(mid, tl.minimum(Tq, tl.load(DOC_END + tl.minimum(first_key + BLOCK_N, Tk) - 1) - offset))
    # queries [lo, mid): the diagonal band, masked
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, key_rows, key_doc_rows, mask_key,
                             offs_d, d_ok, lo, tl.minimum(mid, Tq), Tq, Tk, qk_scale, dropout_p, dropout_scale,
                             rng_key, BLOCK_M, BLOCK_N, DROPOUT, DOT_PRECISION, ON_DIAGONAL=True, IN_DOCUMENT=DOCS)
    # queries [mid, last_row): all in the future of this key tile, no causal mask (masked by document with them)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, key_rows, key_doc_rows, mask_key,
                             offs_d, d_ok, mid, last_row, Tq, Tk, qk_scale, dropout_p, dropout_scale, rng_key,
                             BLOCK_M, BLOCK_N, DROPOUT, DOT_PRECISION, ON_DIAGONAL=False, IN_DOCUMENT=DOCS)
    tl.store(DK + offs_n[:, None] * stride_gt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_gt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, q_pos, DOC_START, offs_d, d_ok, lo, hi, Tk,
                  qk_scale, dropout_p, dropout_scale, rng_key, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr,
                  IN_DOCUMENT: tl.constexpr):
    """Add the key tiles [lo, hi) to one query tile's dQ (``q_pos``: its query positions among the keys;
    ``DOC_START``: this window's document starts, read when IN_DOCUMENT)."""
    if IN_DOCUMENT:
        q_doc_start = tl.load(DOC_START + q_pos, mask=q_pos < Tk, other=0)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        if ON_DIAGONAL:
            kv_mask = (cols < Tk)[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if ON_DIAGONAL:
            p = tl.where(q_pos[:, None] >= cols[None, :], p, 0.0)
        if IN_DOCUMENT:
            p = tl.where(cols[None, :] >= q_doc_start[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _keep_mask(rng_key, q_pos, start_n, Tk, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _attention_bwd_dq(
    Q, K, V,  # q (B, H, Tq, D), k and v (B, H, Tk, D): the forward's inputs, last dim contiguous
    DO,  # (B, H, Tq, D) gradient of the output, last dim contiguous
    LSE, DELTA,  # (B * H, Tq) float32: the forward's base-2 log-sum-exp and rowsum(dO * O)
    DQ,  # (B, H, Tq, D) output, contiguous
    DOC_START,  # (B, Tk) int32: where the document of each position starts (read when DOCS)
    stride_qb, stride_qh, stride_qt,  # q's strides
    stride_kb, stride_kh, stride_kt,  # k's strides
    stride_vb, stride_vh, stride_vt,  # v's strides
    stride_dob, stride_doh, stride_dot,  # dO's strides
    stride_gb, stride_gh, stride_gt,  # dQ's strides
    H, Tq, Tk,  # number of heads, of queries and of keys
    sm_scale,  # the softmax scale (dQ = scale * dS k)
    qk_scale,  # sm_scale * log2(e)
    dropout_p,  # dropout probability (used when DROPOUT)
    seed,  # the forward's Philox seed (used when DROPOUT)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    DROPOUT: tl.constexpr,  # dropout_p > 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, "tf32" otherwise
    DOCS: tl.constexpr,  # packed documents: a query sees only the keys of its own document
):
    start_m = tl.program_id(0)  # which query tile
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_gb + h * stride_gh
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
    q_pos = (Tk - Tq) + offs_m  # their positions among the keys
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Tq
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rng_key = seed.to(tl.int64) + (bh.to(tl.int64) << 32)
    dropout_scale = 1.0 / (1.0 - dropout_p)

    first = (Tk - Tq) + start_m * BLOCK_M  # the tile's first query position
    lo = first // BLOCK_N * BLOCK_N  # as in the forward
    first_key = 0  # keys before it are seen by no row of this tile
    if DOCS:  # the forward's bound: the first row's document start, rounded down to a key tile
        DOC_START += b * Tk
        first_key = tl.load(DOC_START + first) // BLOCK_N * BLOCK_N
    # keys [first_key, lo): no causal mask (masked by document with them)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, q_pos, DOC_START, offs_d, d_ok, first_key,
                       lo, Tk, qk_scale, dropout_p, dropout_scale, rng_key, BLOCK_M, BLOCK_N, DROPOUT, DOT_PRECISION,
                       ON_DIAGONAL=False, IN_DOCUMENT=DOCS)
    # keys [lo, first + BLOCK_M): the diagonal band, masked
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, q_pos, DOC_START, offs_d, d_ok, lo,
                       tl.minimum(first + BLOCK_M, Tk), Tk, qk_scale, dropout_p, dropout_scale, rng_key, BLOCK_M,
                       BLOCK_N, DROPOUT, DOT_PRECISION, ON_DIAGONAL=True, IN_DOCUMENT=DOCS)
    tl.store(DQ + offs_m[:, None] * stride_gt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch op: the launchers, registered as custom operators
#
# Each launcher is a custom op (torch.library.custom_op): torch.compile sees one opaque node whose output shapes
# come from register_fake, instead of tracing the launcher, whose tile tuner times real launches (why not a traced
# launch or a triton_op: COURSE.md, Lesson 8), and register_autograd wires autograd to the backward op. The
# forward op also returns the LSE, for the backward.
#
# The dropout seed goes to both ops, so the backward regenerates the forward's mask. A Python int drawn at trace
# time would be frozen into a compiled graph, so the seed is a one-element int64 CPU tensor from torch's default
# generator (no GPU sync), read with .item() inside the ops, where the compiler does not look. The draw is a custom
# op too, attention_seed: inductor would lower torch.randint to a C++ kernel with its own generator, while an opaque
# op runs as it is, so a compiled call draws the very seed eager mode draws. It takes the attention's inputs, unread,
# because the compiler merges calls of one op on equal inputs: calls on different tensors are different draws.


def _as_kernel_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the kernel's dtype; strides are passed to the kernels, so only a strided last dim is copied."""
    t = t.to(kernel_dtype(t.dtype))
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@torch.library.custom_op("minigpt::attention_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def attention_seed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A new dropout seed for the attention of q, k, v (which are not read): an int64 tensor of one element on the
    CPU, in [0, 2^31 - 1), drawn from torch's default CPU generator."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device="cpu")


@attention_seed.register_fake
def _(q, k, v):
    return q.new_empty((1,), dtype=torch.int64, device="cpu")


def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())  # no seed without dropout: the kernels do not read it then


def _no_documents(q: torch.Tensor) -> torch.Tensor:
    """What the kernels get for DOC_START / DOC_END without documents: never read, but an int32 pointer, the type
    kernels/compile_targets.py compiles them with."""
    return torch.empty(1, dtype=torch.int32, device=q.device)


def document_bounds(doc_ids: torch.Tensor) -> torch.Tensor:
    """(2, B, Tk) int32 from ``doc_ids`` (B, Tk), non-decreasing along each row: [0] where the document of each
    position starts, [1] where it ends (exclusive) — the kernels' form of the documents, computed once a call."""
    ids = doc_ids.contiguous()
    return torch.stack([torch.searchsorted(ids, ids, side=side) for side in ("left", "right")]).to(torch.int32)


@torch.library.custom_op("minigpt::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float,
                  seed: torch.Tensor | None,
                  doc_bounds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse2) for q (B, H, Tq, D) and k, v (B, H, Tk, D): o (B, H, Tq, D) in q's dtype, contiguous; lse2
    (B * H, Tq) float32, each row's log-sum-exp in base 2 (LSE * log2 e). ``seed``: the dropout's Philox seed, an
    int64 tensor of one element on the CPU (attention_seed's), or None when dropout_p is 0. ``doc_bounds``:
    document_bounds(doc_ids), or None without documents."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if q.numel() == 0:  # Tq == 0 or B * H == 0: nothing to launch
        return q.new_empty((B, H, Tq, D)), q.new_zeros((B * H, Tq), dtype=torch.float32)
    out_dtype, (q, k, v) = q.dtype, (_as_kernel_input(t) for t in (q, k, v))
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, Tq), dtype=torch.float32, device=q.device)
    doc_start = _no_documents(q) if doc_bounds is None else doc_bounds[0]

    def run(tiles: Tiles):
        _attention_fwd[(triton.cdiv(Tq, tiles.BLOCK_M), B * H)](
            q, k, v, o, lse, doc_start, *_strides(q), *_strides(k), *_strides(v), *_strides(o), H, Tq, Tk,
            scale * LOG2E, dropout_p,
            _seed_value(seed), HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N,
            DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(q.dtype), DOCS=doc_bounds is not None,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )

    run(choose_tiles("fwd", q, Tk, dropout_p, run, documents=doc_bounds is not None))
    return o.to(out_dtype), lse  # the cast is a no-op except for bfloat16 under the interpreter


@attention_fwd.register_fake
def _(q, k, v, dropout_p, scale, seed, doc_bounds=None):
    B, H, Tq, D = q.shape
    return q.new_empty((B, H, Tq, D)), q.new_empty((B * H, Tq), dtype=torch.float32)


@torch.library.custom_op("minigpt::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, dropout_p: float, scale: float, seed: torch.Tensor | None,
                  doc_bounds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the gradient ``do`` of the forward's output ``o``: the delta pass, then the dK/dV and the
    dQ kernels. dq (B, H, Tq, D) and dk, dv (B, H, Tk, D), in q's dtype, contiguous."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if q.numel() == 0:  # no query: no gradient reaches k or v either
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    out_dtype, (q, k, v, o, do) = q.dtype, (_as_kernel_input(t) for t in (q, k, v, o, do))
    delta = torch.empty_like(lse)
    pre = preprocess_tiles(D, Tq, Tk)
    _attention_bwd_preprocess[(triton.cdiv(Tq, pre.BLOCK_M), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Tq, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=pre.BLOCK_M,
        num_warps=pre.num_warps, num_stages=pre.num_stages,
    )
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    dk, dv = (torch.empty((B, H, Tk, D), dtype=q.dtype, device=q.device) for _ in range(2))
    common = dict(HEAD_DIM=D, BLOCK_D=block_d(D), DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(q.dtype),
                  DOCS=doc_bounds is not None)
    doc_start, doc_end = (_no_documents(q),) * 2 if doc_bounds is None else doc_bounds
    inputs = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    rest = (H, Tq, Tk, scale, scale * LOG2E, dropout_p, _seed_value(seed))

    def run_dkdv(t: Tiles):
        _attention_bwd_dkdv[(triton.cdiv(Tk, t.BLOCK_N), B * H)](
            q, k, v, do, lse, delta, dk, dv, doc_end, *inputs, *_strides(dk), *rest, BLOCK_M=t.BLOCK_M,
            BLOCK_N=t.BLOCK_N,
            **common, num_warps=t.num_warps, num_stages=t.num_stages,
        )

    def run_dq(t: Tiles):
        _attention_bwd_dq[(triton.cdiv(Tq, t.BLOCK_M), B * H)](
            q, k, v, do, lse, delta, dq, doc_start, *inputs, *_strides(dq), *rest, BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N,
            **common, num_warps=t.num_warps, num_stages=t.num_stages,
        )

    run_dkdv(choose_tiles("dkdv", q, Tk, dropout_p, run_dkdv, documents=doc_bounds is not None))
    run_dq(choose_tiles("dq", q, Tk, dropout_p, run_dq, documents=doc_bounds is not None))
    return dq.to(out_dtype), dk.to(out_dtype), dv.to(out_dtype)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, dropout_p, scale, seed, doc_bounds=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.dropout_p, ctx.scale, seed, doc_bounds = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed, doc_bounds)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed, doc_bounds = ctx.saved_tensors
    return *attention_bwd(do, q, k, v, o, lse, ctx.dropout_p, ctx.scale, seed, doc_bounds), None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     scale: float | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal scaled-dot-product attention with dropout on the weights, fused in Triton (forward and backward).

    q: (B, H, Tq, D), k, v: (B, H, Tk, D) with Tq <= Tk, one dtype among float32 / float16 / bfloat16, on a CUDA
    device (or on the CPU under TRITON_INTERPRET=1), any strides; D <= 128. The queries are the last Tq of the Tk
    positions (query i sees keys 0 .. Tk - Tq + i; Tq == Tk is ordinary causal attention, Tq == 1 a decoding step).
    Returns (B, H, Tq, D) in the input dtype. ``scale`` defaults to 1 / sqrt(D). Dropout (``dropout_p`` in [0, 1))
    acts on the softmax output like nn.Dropout, with its seed drawn from torch's default generator; the rows of a
    chunk (Tq < Tk) get the mask the same rows of the whole (Tk, Tk) problem get with the same seed.

    ``doc_ids`` ((B, Tk) integers, non-decreasing along each row: the document of each key position) packs
    documents: a query sees only the keys of its own document, and the kernels skip the key tiles no query of a
    tile can see. Dropout keeps the mask it draws without documents, restricted to each document.
    """
    check_attention_inputs(q, k, v, dropout_p, doc_ids)
    for t in (q, k, v):
        check_tensor("causal_attention", t)
    Tk, D = k.shape[-2], q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"causal_attention: head dim D={D} exceeds the triton kernel's limit of {MAX_HEAD_DIM} — "
                         f"use more heads with D <= {MAX_HEAD_DIM}, or the torch backend")
    if dropout_p > 0.0 and Tk > MAX_DROPOUT_T:
        raise ValueError(f"causal_attention: dropout in the triton kernel supports Tk <= {MAX_DROPOUT_T} keys (its "
                         f"random-number counter a * Tk + 8 * (j // 8) is a 32-bit integer), got Tk={Tk} — use "
                         "dropout_p=0 or the torch backend")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    # a new seed from torch's default CPU generator (see "The PyTorch op" above); no draw without dropout
    seed = attention_seed(q, k, v) if dropout_p > 0.0 else None
    doc_bounds = None if doc_ids is None else document_bounds(doc_ids)
    out, _lse = attention_fwd(q, k, v, float(dropout_p), float(scale), seed, doc_bounds)
    return out
