"""Exercise attention_tile_bounds (lesson 5 of COURSE.md): which key tiles a query tile of the causal attention
forward visits, without the mask and with it.

Fill in the region between the marked lines of ``forward_key_bounds`` below: it must set ``lo`` and ``hi``. It is
plain Python (the kernel computes the same two numbers with the same arithmetic). Check your answer with

    python -m exercises check attention_tile_bounds

When your answer passes, compare it with the real function, ``forward_key_bounds`` in kernels/tiled.py, with the
same lines in the forward kernel ``_attention_fwd`` in kernels/attention.py, and with
exercises/solutions/attention_tile_bounds.py (this file with the real function's lines filled in).

The setting
-----------
Causal attention with Tq queries and Tk >= Tq keys: the queries are the last Tq positions, so query row r sits at
position (Tk - Tq) + r and sees key j exactly when j <= (Tk - Tq) + r (Tq = Tk in training; Tq < Tk for a chunk of
a prompt or a decoding step). One program of the forward owns the query tile of rows [start_m * block_m,
start_m * block_m + block_m) (the last tile may run past Tq: those rows are padding, never stored), and walks the
keys in tiles of block_n, twice:

    keys [0, lo)    every row of the tile sees every one of them: no mask needed (the cheap loop)
    keys [lo, hi)   the diagonal band: some rows see a key, some do not, so the causal mask is applied

and skips the keys from hi on, which no row of the tile sees. The key loops step by block_n from 0 and from lo,
so lo must be a multiple of block_n (a key tile boundary). The check counts, for every (query, key) pair, who sees
what, and requires: nothing a row sees is at or past hi, and hi is the last key seen plus one (no tile loaded for
nothing, no key past Tk); every key before lo is seen by every real row; and the band is as narrow as the tile
boundaries allow: it starts at the key tile that holds the tile's first query position.

What you have at hand
---------------------
* ``start_m``, ``Tq``, ``Tk``, ``block_m``, ``block_n``: Python ints. ``//`` rounds down; ``min``.
"""
from __future__ import annotations


def forward_key_bounds(start_m: int, Tq: int, Tk: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(lo, hi) for query tile ``start_m`` of the forward: the key tiles [0, lo) lie wholly in the past of every row
    of the tile and need no mask; the diagonal band [lo, hi) is masked."""
    # ---- your code here (exercise attention_tile_bounds, lesson 5) ----
    lo, hi = 0, Tk  # placeholder: runs, but wrong (every key tile masked, none skipped). Set lo and hi
    # ---- end ----
    return lo, hi
