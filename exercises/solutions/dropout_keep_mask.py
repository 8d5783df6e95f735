"""Exercise dropout_keep_mask (lesson 7 of COURSE.md): attention's dropout keep mask, drawn from Philox in a kernel.

Write the body of ``_keep_mask`` below, between the marked lines: from the seed and the (batch, head) index, the
Philox key; from the positions of a tile's queries and keys, each entry's counter; the draws, and which entries
are kept. Check your answer with

    python -m exercises check dropout_keep_mask

This file is a smaller copy of the attention kernels' dropout: ``_keep_mask`` in kernels/attention.py receives
the Philox key ready made (the forward and the two backward kernels build it once per program, in
``_attention_fwd``'s way); here it receives the seed and the (batch, head) index and builds the key itself, in
your first line. The kernel below it, given, calls it for one tile of a (Tq, Tk) grid and stores the mask. When
your answer passes, compare it with the real ``_keep_mask`` in kernels/attention.py and the line of
``_attention_fwd`` that builds the key, and with exercises/solutions/dropout_keep_mask.py (this file with the real
kernels' lines filled in).

The math
--------
Dropout on the attention weights drops each weight P_ij with probability p and scales the kept ones by 1 / (1 - p)
(the forward applies that factor once, to the output, after its loop: not your job here). The backward needs the
forward's mask again, and storing a bit per (query, key) pair would cost T^2 bits per head. So the mask is drawn
from a counter-based generator, Philox: ``tl.randint4x(key, counter)`` is a pure function, four uint32 words for
each (64-bit key, counter) pair, and any program can redraw any entry at any time.

* The key: the seed in the low 32 bits, the (batch, head) index bh in the high 32 (``bh << 32``, in int64), so
  that every head draws a different mask from the same counters.
* The counter of entry (query at position a, key j): a * T + 8 * (j // 8), T the number of keys. One Philox call
  serves 8 keys, so the 8 keys of a group share a counter; a is the query's position among the keys, and j the
  key's, in the whole problem, not in the tile: the mask must not depend on how the kernel tiles it.
* The draws: each of the four words gives two 16-bit halves, ``w & 0xFFFF`` (low) and ``w >> 16`` (high), each
  uniform on [0, 2^16). Keys 8g + 0 .. 8g + 7 of a group take, in this order,

      w0 low, w2 low, w1 low, w3 low, w0 high, w2 high, w1 high, w3 high

  (an order that falls out of how the real kernel spreads the words with ``tl.join``; any code that gives each key
  its half passes).
* Keep where draw >= threshold, threshold = round(p * 2^16) = ``tl.cast(dropout_p * 65536.0 + 0.5, tl.uint32)``:
  a draw falls below it with probability p (to within 2^-17).

What you have at hand
---------------------
* ``seed`` (an integer below 2^31) and ``bh``: scalars. ``.to(tl.int64)`` widens a scalar.
* ``rows``: (BLOCK_R,) the positions of the tile's queries among the keys (the caller has turned query row i into
  position (Tk - Tq) + i: with Tq < Tk the queries are the last Tq positions). ``first_key``: the position of the
  tile's first key, a multiple of 8; the tile's keys are first_key .. first_key + BLOCK_C - 1. ``T``: Tk.
  ``dropout_p``: p, a float. Lanes past the last query or key are drawn too; the caller does not store them.
* ``tl.arange(0, n)``; broadcasting, ``rows[:, None]`` is (BLOCK_R, 1) and ``g[None, :]`` is (1, n).
* ``tl.randint4x(key, counters)``: four uint32 tiles, counters' shape. ``tl.join(a, b)`` stacks two tiles of one
  shape along a new last axis of size 2; ``tl.reshape(t, shape)`` reads t's elements in row-major order.
* Return a (BLOCK_R, BLOCK_C) tile of booleans, True where the weight is kept.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes: small, so that the checker's grids have several tiles each way and partial ones at the edges (the
# real kernels use 16 to 128 on a GPU); the check runs other tilings too. BLOCK_N must be a multiple of 8.
BLOCK_M = 16
BLOCK_N = 16


@triton.jit
def _keep_mask(seed, bh, rows, first_key, T, dropout_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R, BLOCK_C) booleans, True where the weight of the query at position ``rows[r]`` on key
    ``first_key + c`` is kept, for the (batch, head) ``bh`` and the ``seed`` (T: the number of keys, Tk)."""
    tl.static_assert(BLOCK_C % 8 == 0, "dropout draws 8 keys per Philox call: the key tile must be a multiple of 8")
    # ---- your code here (exercise dropout_keep_mask, lesson 7) ----
    rng_key = seed.to(tl.int64) + (bh.to(tl.int64) << 32)  # Philox key: (seed, bh) in (low, high) words
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
    # ---- end ----


@triton.jit(do_not_specialize=["seed"])
def _dropout_tile(
    KEEP,  # pointer to the mask (n_heads, Tq, Tk), int8, written here: 1 = kept
    seed,  # the Philox seed
    Tq, Tk,  # number of queries and of keys (Tq <= Tk: the queries are the last Tq positions)
    dropout_p,  # probability of dropping a weight
    BLOCK_M: tl.constexpr,  # query rows per tile
    BLOCK_N: tl.constexpr,  # keys per tile, a multiple of 8
):
    start_m = tl.program_id(0)  # which query tile
    start_n = tl.program_id(1) * BLOCK_N  # the tile's first key
    bh = tl.program_id(2)  # which (batch, head)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
    q_pos = (Tk - Tq) + offs_m  # their positions among the keys
    cols = start_n + tl.arange(0, BLOCK_N)  # key positions of this tile
    keep = _keep_mask(seed, bh, q_pos, start_n, Tk, dropout_p, BLOCK_M, BLOCK_N)
    out = KEEP + bh.to(tl.int64) * Tq * Tk + offs_m[:, None] * Tk + cols[None, :]
    tl.store(out, keep.to(tl.int8), mask=(offs_m < Tq)[:, None] & (cols < Tk)[None, :])


def dropout_keep_mask(seed: int, n_heads: int, Tq: int, Tk: int, dropout_p: float, block_m: int = BLOCK_M,
                      block_n: int = BLOCK_N, device: str = "cpu") -> torch.Tensor:
    """The keep mask of ``n_heads`` (batch, head) pairs for ``Tq`` queries, the last of ``Tk`` positions: bool
    (n_heads, Tq, Tk), True = kept, drawn tile by tile (``block_m`` queries by ``block_n`` keys). On a CUDA GPU, or
    on the CPU with Triton's interpreter on (``python -m exercises check`` sees to it)."""
    keep = torch.empty(n_heads, Tq, Tk, dtype=torch.int8, device=device)
    grid = (triton.cdiv(Tq, block_m), triton.cdiv(Tk, block_n), n_heads)
    _dropout_tile[grid](keep, seed, Tq, Tk, dropout_p, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool()
