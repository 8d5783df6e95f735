"""Exercise attention_delta (lesson 6 of COURSE.md): the delta pass that starts attention's backward.

Fill in the region between the marked lines of ``_attention_bwd_preprocess`` below: it must set ``delta``, one
number per query row of the tile. Check your answer with

    python -m exercises check attention_delta

This file is a copy of one of our kernels with one line left out. When your answer passes, compare it with the
real kernel, ``_attention_bwd_preprocess`` in kernels/attention.py, and with exercises/solutions/attention_delta.py
(this file with the real kernel's line filled in).

The math
--------
The forward computed P = softmax(S) row by row and O = P v. With dO the gradient reaching O, the backward needs

    dP = dO v^T,    dS = P * (dP - delta),    delta_i = sum_j P_ij dP_ij

(the last two are the softmax's Jacobian applied to dP, row by row). Written like that, delta needs the (T, T)
matrices that FlashAttention never stores. But dP_ij = dO_i . v_j, so

    delta_i = sum_j P_ij (dO_i . v_j) = dO_i . (sum_j P_ij v_j) = dO_i . O_i

and delta = rowsum(dO * O): one small pass over two (T, D) tensors, this kernel, before the two big backward
kernels (the same identity holds with dropout, with the dropped-out weights in both places).

What you have at hand
---------------------
* ``o``, ``do``: (BLOCK_M, BLOCK_D) tiles of O and dO, one query row per tile row, in the input dtype (float32 or
  float16); the lanes past D and the rows past Tq are masked and hold 0. Compute in float32 (``t.to(tl.float32)``):
  a sum of D float16 products in float16 would lose digits.
* ``tl.sum(t, 1)``: the sum of each row of a tile, (BLOCK_M,).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_BLOCK_D = 16  # as the attention kernels pad D, so that the tiles here have the same shape
# Rows per program: few, so that the checker's inputs span several programs and end in a partial tile (the real
# pass uses 64 rows per program on a GPU, PREPROCESS_TILES in kernels/attention_tiles.py, and the forward's query
# tile in the interpreter: preprocess_tiles).
BLOCK_M = 16


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
    # ---- your code here (exercise attention_delta, lesson 6) ----
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    # ---- end ----
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


def attention_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) for the forward's output ``o`` and its gradient ``do``, both (B, H, Tq, D).

    float32 or float16; returns (B * H, Tq) float32, the layout the backward kernels read. The tensors are on a CUDA
    GPU, or on the CPU with Triton's interpreter on (``python -m exercises check`` sees to it).
    """
    B, H, Tq, D = o.shape
    o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (o, do.to(o.dtype)))
    delta = torch.empty((B * H, Tq), dtype=torch.float32, device=o.device)
    _attention_bwd_preprocess[(triton.cdiv(Tq, BLOCK_M), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq,
        HEAD_DIM=D, BLOCK_D=max(MIN_BLOCK_D, triton.next_power_of_2(D)), BLOCK_M=BLOCK_M,
    )
    return delta
