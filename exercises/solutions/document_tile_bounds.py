"""Exercise document_tile_bounds (lesson 12 of COURSE.md): with packed documents, where a query tile's walk over
the keys may start, and where a key tile's walk over the queries may stop.

Two small functions, each two lines of arithmetic, in the one region between the marked lines below: the end of
``forward_first_key`` (the first key a query tile of the forward, and of the dQ kernel, visits) and the end of
``dkdv_last_row`` (the end of the query rows a key tile of the dK/dV kernel visits). The lines of ``dkdv_last_row``
that come before its blank are given in the region. Both are asked for, not one: they are the same idea seen from
the two sides of the tile grid — a tile reaches only as far as the documents it holds — and the differences
between them are the lesson (the forward bound comes from the tile's FIRST query, the backward one from the tile's
LAST key; one is rounded to a whole tile and the other is not; one is clamped to the band the kernel always walks).
It is plain Python: the kernels compute the same numbers with the same arithmetic. Check your answer with

    python -m exercises check document_tile_bounds

When your answer passes, compare it with the real functions, ``forward_first_key`` and ``dkdv_last_row`` in
kernels/tiled.py, with the same lines in the kernels ``_attention_fwd``, ``_attention_bwd_dq`` and
``_attention_bwd_dkdv`` of kernels/attention.py, and with exercises/solutions/document_tile_bounds.py (this file
with the real functions' lines filled in).

The setting
-----------
Causal attention with Tq queries and Tk >= Tq keys: query row r sits at position (Tk - Tq) + r. One window of Tk
positions is packed with documents, numbered 0, 1, 2, ... in order; query row r sees key j exactly when
j <= (Tk - Tq) + r and both positions lie in the same document. The documents reach you in the kernels' form
(``document_bounds`` of kernels/tiled.py): two int arrays of Tk entries,

    doc_start[p]   the first position of the document of position p
    doc_end[p]     the first position PAST the document of position p (exclusive)

Neither ever decreases along the window: a later position is in the same document or a later one.

forward_first_key.  The program of query tile ``start_m`` owns the rows [start_m * block_m, start_m * block_m +
block_m) (the last tile may run past Tq: those rows are padding). Without documents it walks the key tiles from
key 0; with them it starts at ``first_key`` and skips every key before it, so no row of the tile may see a key
before first_key. The loop steps by block_n from first_key, so first_key must be a key tile boundary (a multiple
of block_n), and the latest one that skips nothing a row sees: a key tile that holds one key some row sees is
visited (its other keys are masked by document).

dkdv_last_row.  The program of key tile ``start_n`` owns the keys [start_n * block_n, start_n * block_n + block_n)
(the last tile may run past Tk). ``dkdv_query_bounds`` (lesson 6) gives (lo, mid): the rows [lo, mid) are the
diagonal band, always walked, and without documents the rows from mid to Tq follow, one query tile at a time. With
documents the walk stops at ``last_row``: the first row that sees no key of the tile, and after which no row does.
Return it as a row number, not rounded: the loop ``for start_m in range(mid, last_row, block_m)`` visits every
query tile that starts before it, so a query tile that holds one row seeing the tile's keys is visited whole.
Keep it at most Tq, then at least mid: the band is walked anyway, and mid, a whole number of query tiles, may pass
Tq in the last one (the kernel's number is then mid).

The check builds many windows of random documents (a document of one token, documents that end on a tile
boundary, fewer queries than keys, a decoding step), counts for every (query, key) pair who sees what, and compares
your two numbers for every tile with the ones that count allows; it names a mistake it recognises.

What you have at hand
---------------------
* ``start_m``, ``start_n``, ``Tq``, ``Tk``, ``block_m``, ``block_n``: Python ints. ``//`` rounds down; ``min``,
  ``max``.
* ``doc_start``, ``doc_end``: NumPy arrays of Tk int64 (index them with a position; ``int(...)`` makes a Python int).
"""
from __future__ import annotations

from kernels.tiled import dkdv_query_bounds  # lesson 6: (lo, mid), the diagonal band of a key tile


def forward_first_key(start_m: int, Tq: int, Tk: int, block_m: int, block_n: int, doc_start=None) -> int:
    """The first key query tile ``start_m`` of the forward (and of the dQ kernel) visits: 0 without documents;
    with them, from ``doc_start`` (Tk,), the first key tile that holds a key some row of the tile sees."""
    if doc_start is None:
        return 0
    # ---- your code here (exercise document_tile_bounds, lesson 12) ----
    first = (Tk - Tq) + start_m * block_m  # the tile's first query position
    return int(doc_start[first]) // block_n * block_n


def dkdv_last_row(start_n: int, Tq: int, Tk: int, block_m: int, block_n: int, doc_end=None) -> int:
    _, mid = dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
    if doc_end is None:
        return Tq
    last_key = min((start_n + 1) * block_n, Tk) - 1
    return max(mid, min(Tq, int(doc_end[last_key]) - (Tk - Tq)))
    # ---- end ----
