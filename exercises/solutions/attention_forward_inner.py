"""Exercise attention_forward_inner (lesson 5 of COURSE.md): the online softmax at the heart of FlashAttention.

Fill in the region between the marked lines of ``_fwd_inner`` below: it must fold one tile of keys and values into
the query tile's running max ``m_i``, running sum ``l_i`` and unnormalized output ``acc``. Check your answer with

    python -m exercises check attention_forward_inner

This file is a copy of two of our kernels that leaves out dropout and loads v before the update rather than in
its middle; the lines you write are the real ones. When your answer passes, compare it with the real kernels,
``_fwd_inner`` and ``_attention_fwd`` in kernels/attention.py, and with
exercises/solutions/attention_forward_inner.py (this file with the real kernel's lines filled in).

The math
--------
For one (batch, head) the op is O = softmax(scale * q k^T, future masked) v. A program holds BLOCK_M query rows
and streams the keys and values past them, BLOCK_N rows at a time, so a row's softmax max and sum are never known
in full until the end. Keep, per query row, a running max m, a running sum l and an unnormalized output acc (they
start at -inf, 0 and 0), and rescale them whenever the max grows. For each key tile j, with its scores S_j:

    m_new = max(m, rowmax(S_j))
    alpha = exp(m - m_new)                          how much the old terms shrink under the new max
    P~_j  = exp(S_j - m_new)
    l     = alpha * l + rowsum(P~_j)
    acc   = alpha * acc + P~_j v_j
    m     = m_new

The caller then writes O = acc / l and the row's log-sum-exp m + log(l), which the backward needs.

Base 2: the scores ``s`` below are already multiplied by qk_scale = scale * log2(e), so exp(x) of the math is
``tl.math.exp2`` of them (the GPU's native instruction), and m, like the saved log-sum-exp, lives in base 2.
Masked (future) scores are -inf, and exp2(-inf) = 0; every row sees at least one key in its first tile, so m_new
is finite and alpha = exp2(-inf - m_new) = 0 on the first step, as it should be.

What you have at hand
---------------------
* ``s``: (BLOCK_M, BLOCK_N) float32 scores of this tile, base 2, -inf where masked; ``v``: (BLOCK_N, BLOCK_D) values
  in the input dtype.
* ``m_i``, ``l_i``: (BLOCK_M,) float32; ``acc``: (BLOCK_M, BLOCK_D) float32. Reassign all three (the loop carries
  them to the next tile); ``m_i[:, None]`` is (BLOCK_M, 1), for broadcasting against a tile.
* ``tl.max(t, 1)`` and ``tl.sum(t, 1)``: per row; ``tl.maximum(a, b)``: elementwise.
* ``tl.dot(a, b, acc, input_precision=DOT_PRECISION)`` returns acc + a @ b in float32; a and b must share a dtype,
  so cast the weights to the values' with ``p.to(v.dtype)``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
MIN_BLOCK_D = 16  # tl.dot needs every tile dimension >= 16; smaller head dims are padded (masked) up to 16
# Small tiles shaped like a GPU's (BLOCK_N divides BLOCK_M), so that the checker's short sequences walk several
# key tiles and the diagonal band in more than one step.
BLOCK_M = 32  # query rows per program
BLOCK_N = 16  # key rows per loop step


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, q_pos, offs_d, d_ok, lo, hi, Tk, qk_scale,
               BLOCK_N: tl.constexpr, ON_DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the key tiles [lo, hi) into the running (acc, l, m) of one query tile (the online softmax above).
    ``q_pos``: the tile's query positions among the Tk keys."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)  # key positions of this tile
        if ON_DIAGONAL:
            kv_mask = (cols < Tk)[:, None] & d_ok[None, :]  # the diagonal band may run past the last key
        else:
            kv_mask = d_ok[None, :]  # below the diagonal every key exists
        k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if ON_DIAGONAL:
            s = tl.where(q_pos[:, None] >= cols[None, :], s, float("-inf"))
        # ---- your code here (exercise attention_forward_inner, lesson 5) ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        # ---- end ----
    return acc, l_i, m_i


@triton.jit
def _attention_fwd(
    Q, K, V,  # q (B, H, Tq, D), k and v (B, H, Tk, D), last dim contiguous
    O,  # (B, H, Tq, D) output, contiguous
    LSE,  # (B * H, Tq) float32 output: each row's log-sum-exp in base 2 (LSE * log2 e), for the backward
    stride_qb, stride_qh, stride_qt,  # q's strides in elements (batch, head, time)
    stride_kb, stride_kh, stride_kt,  # k's strides
    stride_vb, stride_vh, stride_vt,  # v's strides
    stride_ob, stride_oh, stride_ot,  # o's strides
    H, Tq, Tk,  # number of heads, of queries and of keys (Tq <= Tk: the queries are the last Tq positions)
    qk_scale,  # scale * log2(e), so scores feed exp2 directly
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (full precision), "tf32" otherwise (ignored for 16-bit)
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
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    first = (Tk - Tq) + start_m * BLOCK_M  # the tile's first query position
    lo = first // BLOCK_N * BLOCK_N  # rounded down to a key tile
    # keys [0, lo): in the past of every row of this tile, no mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, q_pos, offs_d, d_ok, 0, lo, Tk,
                               qk_scale, BLOCK_N, ON_DIAGONAL=False, DOT_PRECISION=DOT_PRECISION)
    # keys [lo, first + BLOCK_M): the diagonal band, masked; every row sees key lo, so no row is all -inf
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, q_pos, offs_d, d_ok, lo,
                               tl.minimum(first + BLOCK_M, Tk), Tk, qk_scale, BLOCK_N, ON_DIAGONAL=True,
                               DOT_PRECISION=DOT_PRECISION)

    out_scale = 1.0 / l_i
    acc = acc * out_scale[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention's forward: (o, lse2) for q (B, H, Tq, D) and k, v (B, H, Tk, D), Tq <= Tk, D <= 128.

    float32 or float16. o: (B, H, Tq, D) in q's dtype; lse2: (B * H, Tq) float32, each row's log-sum-exp in base 2.
    The queries are the last Tq of the Tk positions (query i sees keys 0 .. Tk - Tq + i). ``scale`` defaults to
    1 / sqrt(D). The tensors are on a CUDA GPU, or on the CPU with Triton's interpreter on (``python -m exercises
    check`` sees to it).
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if Tq > Tk:
        raise ValueError(f"attention_forward: more queries ({Tq}) than keys ({Tk}) — pass Tq <= Tk")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, Tq), dtype=torch.float32, device=q.device)
    _attention_fwd[(triton.cdiv(Tq, BLOCK_M), B * H)](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], H, Tq, Tk,
        scale * LOG2E, HEAD_DIM=D, BLOCK_D=max(MIN_BLOCK_D, triton.next_power_of_2(D)), BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return o, lse
