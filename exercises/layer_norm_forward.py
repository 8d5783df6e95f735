"""Exercise layer_norm_forward (lesson 4 of COURSE.md): LayerNorm's forward kernel from zero, and its launcher's grid.

Write the whole body of ``_layer_norm_fwd`` below — which rows this program owns, the column offsets and the mask,
the load, the mean and the variance of each row, rstd, the normalised and scaled output, the stores of y and of the
mean and rstd that the backward needs — and, in the launcher ``_layer_norm_forward``, the grid: how many programs
to launch. Both lie in the one region between the marked lines (the launcher's other lines are given in it). Check
your answer with

    python -m exercises check layer_norm_forward

This file is a copy of one of our kernels with its body left out. When your answer passes, compare it with the
real kernel, ``_layer_norm_fwd`` in kernels/layer_norm.py, and its launcher ``_layer_norm_forward``, and with
exercises/solutions/layer_norm_forward.py (this file with the real kernel's lines filled in).

The math
--------
Each row x of width C (a token's C features) is normalised on its own, then scaled and shifted per feature:

    mean = sum(x) / C
    var  = sum((x - mean)^2) / C          the biased variance (divide by C, not C - 1), as GPT-2 and torch use
    rstd = 1 / sqrt(var + eps)
    y    = (x - mean) * rstd * w + b

Compute all of it in float32, whatever the storage dtype, and reduce twice: first the mean, then the variance of
x - mean (the one-reduction var = E[x^2] - E[x]^2 loses its digits to cancellation when a row's mean is large
against its spread). Besides y, store each row's mean and rstd (float32): the backward reads them instead of
computing them again.

The model
---------
One program owns BLOCK_M consecutive rows, ``tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)``, each held
whole as one row of a (BLOCK_M, BLOCK_C) tile. Triton's tiles are powers of two, rows are not: BLOCK_C is C rounded
up to a power of two, and the lanes at C and past (``cols >= width``) are padding, like the rows past the last
(``rows >= n_rows``) in the last program. A load of the tile takes the mask of both, ``row_ok[:, None] &
col_ok[None, :]``, and ``other=0.0`` for the masked lanes; the stores take the same masks.

Mind the padding in the two reductions: ``tl.sum`` adds every lane of the tile, the padded ones too. Loaded as 0,
they add nothing to sum(x), but divide by the real width C, not by BLOCK_C. And x - mean is -mean on a padded lane:
set it to 0 there (``tl.where(mask, ..., 0.0)``) before squaring, or each padded lane adds mean^2 to the variance.

Make the row numbers int64 (``tl.program_id(0).to(tl.int64)``): rows * stride may pass 2^31 in a large tensor.
The launcher must start enough programs to cover all M rows, and no more than one partial one:
``triton.cdiv(a, b)`` is ceil(a / b) on integers.

What you have at hand
---------------------
* ``X``, ``Y``: pointers to the input and output rows (M, C) (same dtype, row after row, ``stride`` elements
  apart); ``WEIGHT``, ``BIAS``: pointers to w and b (C,); ``MEAN``, ``RSTD``: pointers to the (M,) float32 outputs.
  ``X + offs`` with offs a (BLOCK_M, BLOCK_C) tile of offsets is a tile of pointers.
* ``n_rows`` (M), ``width`` (C), ``eps``; the compile-time ``BLOCK_M`` and ``BLOCK_C``.
* ``tl.sum(t, axis=1)``: the sum of each row of a tile, (BLOCK_M,). Broadcasting: ``mean[:, None]`` is
  (BLOCK_M, 1), ``w[None, :]`` is (1, BLOCK_C). ``tl.sqrt``, ``tl.where(cond, a, b)``.
* Store y with ``y.to(Y.dtype.element_ty)``: Y may be float16. mean and rstd are float32 already.
* In the launcher: ``x2d`` (M, C), contiguous; ``y``, ``mean``, ``rstd`` (made for you); ``tile``, from
  ``row_tile``: ``tile.BLOCK_M`` rows per program, ``tile.BLOCK_C`` and ``tile.num_warps``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

EPS = 1e-5  # GPT-2's LayerNorm epsilon, as in kernels/definitions.py
# Rows per program: few, so that the checker's inputs span several programs and end in a partial one (the real
# launcher fills a program with about 4096 elements on a GPU).
BLOCK_M = 4
NUM_WARPS = 4


class RowTile(NamedTuple):
    BLOCK_M: int  # rows per program
    BLOCK_C: int  # the row width padded to a power of two
    num_warps: int


def row_tile(width: int, elem_bytes: int, rows: int) -> RowTile:
    """The tile for rows of ``width`` elements (the real one picks the rows per program by device and width; here
    always BLOCK_M)."""
    return RowTile(BLOCK_M, triton.next_power_of_2(width), NUM_WARPS)


@triton.jit
def _layer_norm_fwd(
    X,  # pointer to the input rows (M, C), contiguous
    WEIGHT,  # pointer to the scale w (C,)
    BIAS,  # pointer to the shift b (C,)
    Y,  # pointer to the output rows (M, C), X's dtype
    MEAN,  # pointer to the per-row means (M,), float32, saved for the backward
    RSTD,  # pointer to the per-row 1/std (M,), float32, saved for the backward
    stride,  # elements from one row to the next in X and Y
    n_rows,  # M
    width,  # C, the number of features per row
    eps,  # added to the variance before the square root
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # next power of two >= C: one tile row holds a whole row of X
):
    # ---- your code here (exercise layer_norm_forward, lesson 4) ----
    pass  # placeholder: runs, but wrong (Y, MEAN and RSTD are left as they were). Write the kernel, then the grid


def _layer_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """x2d (M, C) contiguous -> (y (M, C), mean (M,), rstd (M,)); all in the dtypes the kernel sees."""
    M, C = x2d.shape
    y = torch.empty_like(x2d)
    mean = torch.empty(M, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2d.device)
    tile = row_tile(C, x2d.element_size(), M)
    _layer_norm_fwd[(1,)](  # placeholder grid: one program
        x2d, weight, bias, y, mean, rstd, x2d.stride(0), M, C, eps,
        BLOCK_M=tile.BLOCK_M, BLOCK_C=tile.BLOCK_C, num_warps=tile.num_warps,
    )
    # ---- end ----
    return y, mean, rstd


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x`` (..., C) with ``weight`` and ``bias`` (C,), all float32 or all float16.

    Returns (y, mean, rstd): y like x (contiguous), mean and rstd (...,) float32, one per row. The tensors are on a
    CUDA GPU, or on the CPU with Triton's interpreter on (``python -m exercises check`` sees to it).
    """
    C = x.shape[-1]
    y, mean, rstd = _layer_norm_forward(x.reshape(-1, C).contiguous(), weight.contiguous(), bias.contiguous(), eps)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
