"""Exercise row_softmax (lesson 5 of COURSE.md): the softmax of a row, its max and sum — first of a row that fits in
one tile, then of a row streamed in tiles with a running (online) max and sum.

Fill in the region between the marked lines of ``_fold_tile`` below: fold one tile of a row's logits into the
row's running max ``m`` and sum ``l``, and return the new pair. Check your answer with

    python -m exercises check row_softmax

The checker runs rows that fit in one tile first (V <= BLOCK_V: your code runs once, with m = -inf and l = 0, on a
masked tile), then rows of several tiles (V > BLOCK_V); a FAIL line says which. Get the one-tile rows right first.

This file is a copy of one of our kernels, the rows step of the loss without the logits (lesson 11), with the body
of its statistics step left out; the rest of the program uses what you compute as the real one does. When your
answer passes, compare it with the real kernel, ``_cross_entropy_rows_step`` in kernels/linear_cross_entropy.py,
and its step ``_fold_tile``, and with exercises/solutions/row_softmax.py (this file with the real lines filled in).

The math
--------
A row of logits z (V of them) has

    lse = log sum_j exp(z_j),    softmax(z)_j = exp(z_j - lse),    loss = lse - z_t   (t: the row's target)

exp overflows float32 past z = 88, so subtract the row's max first: lse = M + log sum_j exp(z_j - M), M = max_j z_j.
The kernel works in base 2, as the GPU does (exp2 is the instruction; exp(a) = 2^(a log2 e)): with s = z * log2(e),

    one tile:   m = max_j s_j,   l = sum_j 2^(s_j - m),    lse2 = m + log2(l)   (= lse * log2 e)

When the row comes in tiles, keep the max and the sum of what you have seen so far; a new tile may raise the max,
and then every term summed so far was taken against too small a max, by the same factor:

    m_new = max(m, max_j s_j),    l = l * 2^(m - m_new) + sum_j 2^(s_j - m_new)

(with m = -inf and l = 0 before the first tile, 2^(-inf) = 0: the one-tile formula is the first step of this one).
After the sweep the kernel takes lse2 = m + log2(l), the loss, and in a second sweep each tile's
g * (2^(s - lse2) - onehot): the softmax, from the finished log-sum-exp.

What you have at hand
---------------------
* ``LOGITS``: a pointer to this row's float32 logits; ``start``: the first column of the tile; ``n_vocab``: V.
* ``m``, ``l``: float32 scalars, the running max (base 2) and sum; return ``m_new, l``.
* ``MASKED``: a compile-time flag, True for the row's last tile, which may run past V (and, when BLOCK_V divides V,
  lies wholly past it): load with ``mask=cols < n_vocab`` and ``other=float("-inf")`` there, which the max ignores
  and 2^(-inf - m) = 0 leaves out of the sum. The other tiles need no mask.
* ``LOG2E`` (log2 e); ``tl.arange(0, BLOCK_V)``; ``tl.max(t, axis=0)``, ``tl.sum(t, axis=0)`` (a tile to a scalar);
  ``tl.maximum(a, b)``; ``tl.math.exp2``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(z) = exp2(z * log2 e)
LN2 = tl.constexpr(math.log(2.0))  # log(y) = log2(y) * ln 2
IGNORE_INDEX = -100  # a target with this value adds nothing to the loss (F.cross_entropy's default)

# Logits a tile: small, so that the checker's rows come both in one tile and in several, with a partial last tile
# (the real kernel uses 1024 on a GPU).
BLOCK_V = 16
NUM_WARPS = 4


@triton.jit
def _fold_tile(LOGITS, start, n_vocab, m, l, BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    """Sweep 1's step: fold the logits [start, start + BLOCK_V) into the row's running base-2 max m and sum l."""
    # ---- your code here (exercise row_softmax, lesson 5) ----
    return m, l  # placeholder: runs, but wrong (the tile is not folded in). Set m_new and l, return them
    # ---- end ----


@triton.jit
def _grad_tile(LOGITS, start, n_vocab, lse2, target, g, ignored, BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    """Sweep 2's step: overwrite the logits [start, start + BLOCK_V) by g * (softmax - onehot(target))."""
    cols = start + tl.arange(0, BLOCK_V)
    if MASKED:  # the last tile
        s = tl.load(LOGITS + cols, mask=cols < n_vocab, other=0.0) * LOG2E
    else:
        s = tl.load(LOGITS + cols) * LOG2E
    p = tl.math.exp2(s - lse2)  # the softmax, from the finished log-sum-exp
    dz = (p - tl.where(cols == target, 1.0, 0.0)) * g
    dz = tl.where(ignored, 0.0, dz)  # exactly 0, whatever g and the logits are
    if MASKED:
        tl.store(LOGITS + cols, dz, mask=cols < n_vocab)
    else:
        tl.store(LOGITS + cols, dz)


@triton.jit
def _cross_entropy_rows_step(
    LOGITS,  # pointer to the float32 logits chunk (n, V); overwritten by the gradient dz when HAS_GRAD
    TARGETS,  # pointer to the target class of each row (n,), int64
    LOSS,  # pointer to the loss of each row (n,), float32, written here
    GRAD_SCALE,  # pointer to the gradient's factor g of each row (n,), float32 (read only when HAS_GRAD)
    stride_row,  # elements from one row of LOGITS to the next
    n_vocab,  # V, the number of classes (logits a row), at least 1
    ignore_index,  # a target equal to this gives loss 0 and a zero gradient row
    HAS_GRAD: tl.constexpr,  # True: the second sweep writes g * (softmax - onehot) over the logits
    BLOCK_V: tl.constexpr,  # logits a tile of the sweeps over the row
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row may pass 2^31
    LOGITS += row * stride_row
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    in_vocab = (target >= 0) & (target < n_vocab)
    # Whole tiles [0, v_full) need no mask; the last tile [v_full, v_full + BLOCK_V) is masked (wholly when BLOCK_V
    # divides V: it then adds nothing and stores nothing)
    v_full = n_vocab // BLOCK_V * BLOCK_V

    # Sweep 1: the running max m and sum l of 2^s over the row, in base 2 (s = z * log2 e)
    m = tl.full((), float("-inf"), dtype=tl.float32)
    l = tl.zeros((), dtype=tl.float32)
    for start in range(0, v_full, BLOCK_V):
        m, l = _fold_tile(LOGITS, tl.multiple_of(start, BLOCK_V), n_vocab, m, l, BLOCK_V, MASKED=False)
    m, l = _fold_tile(LOGITS, v_full, n_vocab, m, l, BLOCK_V, MASKED=True)
    lse2 = m + tl.math.log2(l)  # log2 sum_j 2^(s_j) = lse * log2 e

    # The target's logit: one masked load, never outside the row; NaN for a target outside [0, V)
    target_logit = tl.load(LOGITS + target, mask=in_vocab & ~ignored, other=float("nan"))
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse2 * LN2 - target_logit))

    if HAS_GRAD:  # Sweep 2: the row read again and overwritten by g * (softmax - onehot)
        g = tl.load(GRAD_SCALE + row)
        g = tl.where(in_vocab, g, float("nan"))  # a target outside [0, V): a NaN gradient row (see the top)
        for start in range(0, v_full, BLOCK_V):
            _grad_tile(LOGITS, tl.multiple_of(start, BLOCK_V), n_vocab, lse2, target, g, ignored, BLOCK_V, MASKED=False)
        _grad_tile(LOGITS, v_full, n_vocab, lse2, target, g, ignored, BLOCK_V, MASKED=True)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """The loss of each row of ``logits`` ((n, V) float32, contiguous rows) against ``targets`` ((n,) int64): returns
    the (n,) float32 losses ``logsumexp(logits_i) - logits_i[targets_i]`` and overwrites ``logits`` in place by
    ``grad_scale_i * (softmax(logits_i) - onehot(targets_i))``. On a CUDA GPU, or on the CPU with Triton's
    interpreter on (``python -m exercises check`` sees to it)."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    _cross_entropy_rows_step[(n,)](
        logits, targets.to(torch.int64).contiguous(), loss, grad_scale.to(torch.float32).contiguous(),
        logits.stride(0), V, IGNORE_INDEX, HAS_GRAD=True, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
    )
    return loss
