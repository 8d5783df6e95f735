"""Exercise layer_norm_dx (lesson 4 of COURSE.md): LayerNorm's input gradient dx, in a Triton kernel.

Fill in the region between the marked lines of ``_layer_norm_bwd_dx`` below: it must set ``dx`` for a tile of
rows. Check your answer with

    python -m exercises check layer_norm_dx

This file is a smaller copy of one of our kernels: one program handles one tile of BLOCK_M rows and computes only
dx, where the real one walks a whole group of rows in a loop and also sums the partial gradients of the weight and
the bias. The lines you write are the same. When your answer passes, compare it with the real kernel,
``_layer_norm_bwd_dx`` in kernels/layer_norm.py, and with exercises/solutions/layer_norm_dx.py (this file with the
real kernel's lines filled in).

The math
--------
The forward normalizes each row x of width C on its own, then scales and shifts each feature:

    mean = sum(x) / C,   rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),   xhat = (x - mean) * rstd,   y = xhat * w + b

Write g = dy * w, the gradient reaching xhat. Every xhat_j depends on every x_i of its row through mean and rstd;
the chain rule, summed over j, gives

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          (means over the row's C features)

(Lesson 4 derives it, and checks it against autograd in plain PyTorch before any kernel.)

What you have at hand
---------------------
* ``x``, ``dy``: (BLOCK_M, BLOCK_C) float32 tiles, one row of the input per tile row. BLOCK_C is C rounded up to a
  power of two; the lanes past C (and the rows past the last) are masked and hold 0.
* ``w``: the weight, (BLOCK_C,) float32, 0 past C. ``mean``, ``rstd``: (BLOCK_M,) float32, one per row, as the
  forward saved them. ``width``: C.
* Broadcasting: ``mean[:, None]`` is (BLOCK_M, 1), ``w[None, :]`` is (1, BLOCK_C).
* ``tl.sum(t, axis=1)``: the sum of each row of a tile, (BLOCK_M,). It adds the masked lanes too, so only sum
  things that are 0 there: xhat is not (x - mean = -mean on a masked lane), but g is, and so is g * xhat.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-5  # GPT-2's LayerNorm epsilon, as in kernels/definitions.py
# Rows per program: few, so that the checker's inputs span several programs and end in a partial tile (the real
# kernel fills a program with about 4096 elements on a GPU).
BLOCK_M = 4


@triton.jit
def _layer_norm_bwd_dx(
    X,  # pointer to the forward's input rows (M, C), contiguous
    DY,  # pointer to the gradient w.r.t. the output (M, C), same layout
    DX,  # pointer to the gradient w.r.t. the input (M, C), written here
    WEIGHT,  # pointer to the scale w (C,)
    MEAN,  # pointer to the per-row means saved by the forward (M,), float32
    RSTD,  # pointer to the per-row 1/std saved by the forward (M,), float32
    stride,  # elements from one row to the next in X, DY and DX
    n_rows,  # M
    width,  # C
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # next power of two >= C: one tile row holds a whole row
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < width
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(WEIGHT + cols, mask=col_ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    # ---- your code here (exercise layer_norm_dx, lesson 4) ----
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = dy * w[None, :]
    mean_g = tl.sum(g, axis=1) / width  # (BLOCK_M,)
    mean_g_xhat = tl.sum(g * xhat, axis=1) / width
    dx = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
    # ---- end ----
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def layer_norm_dx(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """dx of LayerNorm over the last dim for x (..., C), weight (C,) and the output's gradient dy (..., C).

    float32 or float16; returns dx, x's shape and dtype. The per-row mean and rstd are computed here in float32, as
    the forward kernel would have saved them. The tensors are on a CUDA GPU, or on the CPU with Triton's
    interpreter on (``python -m exercises check`` sees to it).
    """
    C = x.shape[-1]
    x2d = x.reshape(-1, C).contiguous()  # (M, C)
    dy2d = dy.reshape(-1, C).to(x.dtype).contiguous()
    M = x2d.shape[0]
    mean = x2d.float().mean(dim=1)  # (M,)
    rstd = torch.rsqrt(x2d.float().var(dim=1, unbiased=False) + eps)  # (M,)
    dx = torch.empty_like(x2d)
    _layer_norm_bwd_dx[(triton.cdiv(M, BLOCK_M),)](
        x2d, dy2d, dx, weight.contiguous(), mean, rstd, x2d.stride(0), M, C,
        BLOCK_M=BLOCK_M, BLOCK_C=triton.next_power_of_2(C),
    )
    return dx.view(x.shape)
