r"""The kernels' algorithms as plain PyTorch loops over tiles: the course's bridge.

Read this file beside the kernel it mirrors. ``kernels/definitions.py`` says *what* each op computes, in whole-tensor
PyTorch; the Triton files say *how* a GPU computes it, one program per tile, in a language that is new to most
readers. This file sits in between: every kernel written again as ordinary Python loops over the same tiles, with
the kernel's variable names (``start_m``, ``lo``, ``m_i``, ``l_i``, ``acc``, ``alpha``, ``qk_scale``, ...) and the
kernel's loop bounds, so a reader can step through it in a debugger, print a running max, or change a bound and
watch a test fail. Each function names the kernel it mirrors.

    kernels/attention.py    attention_forward, attention_backward (delta pass, dK/dV, dQ), dropout_keep_mask
    kernels/layer_norm.py   layer_norm_forward, layer_norm_backward (dx, two-stage dW/dB)
    kernels/gelu.py         gelu_forward, gelu_backward

Where a program of the kernel holds a (BLOCK_M, BLOCK_N) tile, the loop here holds the same slice of a tensor; a
tile that runs past the end of the sequence is simply sliced shorter (the kernel masks its loads instead). The
schedule (which tiles each program visits, and which of them need the causal mask) comes from small bound
functions (``forward_key_bounds``, ``dkdv_query_bounds``) that the loops and ``attention_tile_grid`` share, so a
figure drawn from the grid shows exactly what the loops do. Packed documents (``doc_ids``: a query sees only the
keys of its own document) add one bound each, computed from the kernels' form of the documents
(``document_bounds``): ``forward_first_key`` (the forward and dQ skip the key tiles before it) and
``dkdv_last_row`` (dK/dV skips the query rows from it on); ``tiles_visited`` counts what is left.

Arithmetic is in float32 (or float64 for float64 inputs, which the tests use to compare against exact math). The
kernels also keep their statistics and accumulators in float32, but feed 16-bit operands to their matmuls; that
rounding is not reproduced here: this file is about the algorithm, not the last bit.

Dropout is reproduced bit for bit: ``philox4x32`` is Triton's ``tl.randint4x`` in NumPy, and ``dropout_keep_mask``
draws the attention kernels' keep mask from it, so a forward here with the same seed gives the kernel's output.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .definitions import EPS

__all__ = [
    "ATTENTION_KERNELS", "PHILOX_KEY_LAYOUT", "TILE_CAUSAL_MASK", "TILE_DOCUMENT_MASK", "TILE_NO_MASK", "TILE_SKIPPED",
    "attention_backward", "attention_forward", "attention_tile_grid", "dkdv_last_row", "dkdv_query_bounds",
    "document_bounds", "dropout_keep_mask", "dropout_threshold", "forward_first_key", "forward_key_bounds",
    "gelu_backward", "gelu_forward", "layer_norm_backward", "layer_norm_forward", "layer_norm_groups", "philox4x32",
    "tiles_visited",
]

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E), as in kernels/attention.py
LAYER_NORM_GROUPS = 4  # INTERPRETER_GROUPS of kernels/layer_norm.py (on a GPU: 2 per multiprocessor)
ATTENTION_KERNELS = ("fwd", "dkdv", "dq")  # the three tiled attention kernels (the delta pass has no tiles)
# A row whose document starts after a key tile sees none of its keys: _fwd_inner keeps the running max at least
# this, so that exp2(-inf - max) is 0 and not NaN; the first key the row does see replaces it (alpha = 0).
MASKED_ROW_MAX = -1.0e30
# What attention_tile_grid says of each (query tile, key tile) pair
TILE_SKIPPED = 0  # not computed: outside the loop bounds
TILE_NO_MASK = 1  # computed, every pair in it allowed (with documents: all in one document, the mask removes nothing)
TILE_CAUSAL_MASK = 2  # the diagonal band: computed with the causal mask (and the document mask, with documents)
TILE_DOCUMENT_MASK = 3  # below the band, computed with the document mask, which removes some pairs

# ----------------------------------------------------------------------------------------------------------------
# Philox-4x32-10, as triton/language/random.py computes it

PHILOX_KEY_A = 0x9E3779B9  # the key's per-round increments (Weyl sequence: golden ratio, sqrt(3) - 1) ...
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53  # ... and the round multipliers, from Salmon et al. 2011, "Random123"
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10  # triton's N_ROUNDS_DEFAULT
MASK32 = 0xFFFFFFFF

# Which 16 bits of the four words w0..w3 of one Philox call key 8g + r of a group draws, r = 0 .. 7, as
# (word index, half) with half 0 = the low 16 bits, 1 = the high ones. It falls out of _keep_mask in
# kernels/attention.py: tl.join(a, b) stacks along a new LAST axis, so
#   tl.join(w0 & 0xFFFF, w0 >> 16)                    -> [..., half]
#   w01 = tl.join(<that for w0>, <that for w1>)       -> [..., half, word_in_pair]
#   draws = tl.join(w01, w23)                         -> [..., half, word_in_pair, pair]    (word = 2 pair + wip)
# and the row-major reshape to (BLOCK_R, BLOCK_C) numbers the keys r = 4 * half + 2 * word_in_pair + pair.
PHILOX_KEY_LAYOUT = ((0, 0), (2, 0), (1, 0), (3, 0), (0, 1), (2, 1), (1, 1), (3, 1))


def _umulhi(a: int, b: np.ndarray) -> np.ndarray:
    """The high 32 bits of the 64-bit products a * b (tl.math.umulhi); b uint32."""
    return ((np.uint64(a) * b.astype(np.uint64)) >> np.uint64(32)).astype(np.uint32)


def philox4x32(seed: int, counters, n_rounds: int = PHILOX_ROUNDS) -> tuple[np.ndarray, ...]:
    """``tl.randint4x(seed, counters)`` in NumPy: four uint32 arrays shaped like ``counters``.

    ``seed``: a 64-bit integer, the Philox key: its low word is k0, its high word k1 (triton's ``philox`` splits
    it so). ``counters``: non-negative integers below 2^64; the low word is the counter's c0, the high word c1
    (0 for the int32 counters the attention kernels pass), c2 = c3 = 0.
    """
    counters = np.asarray(counters, dtype=np.uint64)
    key = int(seed) % (1 << 64)
    k0, k1 = key & MASK32, key >> 32
    c0 = (counters & np.uint64(MASK32)).astype(np.uint32)
    c1 = (counters >> np.uint64(32)).astype(np.uint32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    for _ in range(n_rounds):
        _c0, _c2 = c0, c2
        c0 = _umulhi(PHILOX_ROUND_B, _c2) ^ c1 ^ np.uint32(k0)
        c2 = _umulhi(PHILOX_ROUND_A, _c0) ^ c3 ^ np.uint32(k1)
        c1 = (np.uint64(PHILOX_ROUND_B) * _c2.astype(np.uint64) & np.uint64(MASK32)).astype(np.uint32)
        c3 = (np.uint64(PHILOX_ROUND_A) * _c0.astype(np.uint64) & np.uint64(MASK32)).astype(np.uint32)
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32  # raise the key
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """round(p * 2^16), computed as the kernel does: in float32 (dropout_p arrives as an fp32 argument), + 0.5,
    truncated to uint32. A draw is kept when it is >= this."""
    return int(np.float32(dropout_p) * np.float32(65536.0) + np.float32(0.5))


def _rng_key(seed: int, bh: int) -> int:
    return int(seed) + (int(bh) << 32)  # (seed, bh) in the key's (low, high) words, as the kernels build it


def _keep_mask(rng_key: int, q_pos: np.ndarray, cols: np.ndarray, Tk: int, dropout_p: float) -> np.ndarray:
    """Mirrors ``_keep_mask`` in kernels/attention.py: (len(q_pos), len(cols)) bool, True where the weight of the
    query at position q_pos[r] on key cols[c] is kept. Each group of 8 keys shares one Philox call."""
    counters = q_pos[:, None].astype(np.int64) * Tk + (8 * (cols // 8))[None, :]  # (R, C); a group of 8 shares one
    words = np.stack(philox4x32(rng_key, counters))  # (4, R, C), each group's words repeated over its 8 keys
    word, half = np.array(PHILOX_KEY_LAYOUT)[cols % 8].T  # (C,) each: which 16 bits each key takes
    picked = np.take_along_axis(words, np.broadcast_to(word, counters.shape)[None], axis=0)[0]  # (R, C)
    draws = (picked >> (16 * half).astype(np.uint32)) & np.uint32(0xFFFF)  # uniform on [0, 2^16)
    return draws >= dropout_threshold(dropout_p)


def dropout_keep_mask(seed: int, bh: int, T: int, dropout_p: float, Tq: int | None = None) -> np.ndarray:
    """The attention kernels' dropout keep mask for batch-head ``bh`` (= b * H + h): bool (Tq, T), True = kept.

    T is the number of keys Tk; row i is the query at position (T - Tq) + i (default Tq = T). Entries in the
    future of a query are drawn too, but no kernel uses them.
    """
    Tq = T if Tq is None else Tq
    q_pos = np.arange(T - Tq, T)
    return _keep_mask(_rng_key(seed, bh), q_pos, np.arange(T), T, dropout_p)


def _tile_keep_mask(seed: int, bh: int, Tk: int, dropout_p: float):
    """keep(q_pos, cols) -> bool tensor (len(q_pos), len(cols)): the mask of batch-head ``bh`` on one tile."""
    def keep(q_pos: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_keep_mask(_rng_key(seed, bh), q_pos.numpy(), cols.numpy(), Tk, dropout_p))
    return keep


# ----------------------------------------------------------------------------------------------------------------
# The attention kernels' schedule: which tiles each program visits


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward_key_bounds(start_m: int, Tq: int, Tk: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(lo, hi) for query tile ``start_m`` of the forward (and of the dQ kernel, which walks the same keys): the key
    tiles [0, lo) lie wholly in the past of every row of the tile and need no mask; the diagonal band [lo, hi) is
    masked. ``first``, the tile's first query position, is rounded down to a key tile so the steps stay aligned."""
    first = (Tk - Tq) + start_m * block_m  # the tile's first query position
    lo = first // block_n * block_n
    hi = min(first + block_m, Tk)
    return lo, hi


def dkdv_query_bounds(start_n: int, Tq: int, Tk: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(lo, mid) for key tile ``start_n`` of the dK/dV kernel: the query rows [lo, min(mid, Tq)) are the diagonal
    band (masked), the rows [mid, Tq) see every key of the tile (no mask), the rows before lo see none of them.

    Query row r sits at position offset + r, offset = Tk - Tq, and sees key j when offset + r >= j: rows before
    first_key - offset see no key of the tile, rows from first_key + block_n - 1 - offset on see all of them. Both
    are rounded (down, up) to whole query tiles, and kept >= 0."""
    offset = Tk - Tq
    first_key = start_n * block_n
    lo = max(first_key - offset, 0) // block_m * block_m
    mid = _cdiv(max(first_key + block_n - 1 - offset, 0), block_m) * block_m
    return lo, mid


def document_bounds(doc_ids) -> np.ndarray:
    """(2, ..., Tk) int64 from ``doc_ids`` (..., Tk) integers, non-decreasing along the last axis (a window's
    documents numbered in order): [0] where the document of each position starts, [1] where it ends (exclusive).
    The kernels' form of the documents (``kernels.attention.document_bounds`` computes the same, as DOC_START and
    DOC_END): a run of equal ids is one document, so each bound is a binary search for the run of an id."""
    ids = np.asarray(doc_ids)
    if ids.ndim == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"document_bounds: doc_ids must be integers, one id per key position, got {ids.dtype} of "
                         f"shape {ids.shape}")
    rows = ids.reshape(-1, ids.shape[-1])
    if (np.diff(rows, axis=-1) < 0).any():
        raise ValueError("document_bounds: doc_ids must not decrease along a row (each document is a run of "
                         "positions, numbered in order) — number a window's documents 0, 1, 2, ... from its start")
    bounds = [[np.searchsorted(row, row, side=side) for row in rows] for side in ("left", "right")]
    return np.array(bounds, dtype=np.int64).reshape(2, *ids.shape)


def forward_first_key(start_m: int, Tq: int, Tk: int, block_m: int, block_n: int, doc_start=None) -> int:
    """The first key query tile ``start_m`` of the forward (and of the dQ kernel) visits: 0 without documents;
    with them (``doc_start``: (Tk,), ``document_bounds(doc_ids)[0]`` of the window) the start of the document of the
    tile's first query, rounded down to a key tile. Document starts never decrease along a window, so no row of the
    tile sees a key before it: the key tiles [0, first_key) are skipped, [first_key, lo) visited without the
    causal mask, each score masked by document."""
    if doc_start is None:
        return 0
    first = (Tk - Tq) + start_m * block_m  # the tile's first query position
    return int(doc_start[first]) // block_n * block_n


def dkdv_last_row(start_n: int, Tq: int, Tk: int, block_m: int, block_n: int, doc_end=None) -> int:
    """The end of the query rows key tile ``start_n`` of the dK/dV kernel visits: Tq without documents; with them
    (``doc_end``: (Tk,), ``document_bounds(doc_ids)[1]`` of the window) the first row past the document of the
    tile's last key, kept >= mid (the diagonal band is always walked) and <= Tq. Document ends never decrease, so
    no query from there on sees a key of the tile: the rows [mid, last_row) are visited without the causal mask,
    each score masked by document, and [last_row, Tq) skipped. Not rounded: the loop steps from mid, a whole
    number of query tiles, and stops at the first step at or past last_row."""
    _, mid = dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
    if doc_end is None:
        return Tq
    last_key = min((start_n + 1) * block_n, Tk) - 1
    return max(mid, min(Tq, int(doc_end[last_key]) - (Tk - Tq)))


def _window_doc_ids(doc_ids, Tk: int) -> np.ndarray | None:
    """One window's doc_ids as an array (Tk,) (int64 when integers; document_bounds refuses anything else), or
    None."""
    if doc_ids is None:
        return None
    ids = np.asarray(doc_ids)
    if ids.shape != (Tk,):
        raise ValueError(f"attention_tile_grid: doc_ids must be one window's ids, shape ({Tk},), got {ids.shape}")
    return ids.astype(np.int64) if ids.dtype.kind in "iu" else ids


def _off_band_state(doc_ids, q_pos, cols) -> int:
    """A tile below the diagonal band, visited: TILE_DOCUMENT_MASK when some of its (query, key) pairs lie in two
    documents (the document mask removes them), else TILE_NO_MASK. Every pair of such a tile is causal."""
    if doc_ids is None or (doc_ids[q_pos][:, None] == doc_ids[cols][None, :]).all():
        return TILE_NO_MASK
    return TILE_DOCUMENT_MASK


def attention_tile_grid(kernel: str, Tq: int, Tk: int, block_m: int, block_n: int, doc_ids=None) -> np.ndarray:
    """Which (query tile, key tile) pairs ``kernel`` ("fwd", "dkdv" or "dq") computes: an int array
    (cdiv(Tq, block_m), cdiv(Tk, block_n)) of TILE_SKIPPED (0, outside the loop bounds), TILE_NO_MASK (1, visited,
    no pair masked), TILE_CAUSAL_MASK (2, the diagonal band, visited with the causal mask) and, with documents only,
    TILE_DOCUMENT_MASK (3, below the band, visited, some pairs masked by document). Rows are always query tiles of
    block_m rows and columns key tiles of block_n keys (in dK/dV a program owns a column, in the others a row).

    ``doc_ids``: one window's documents, (Tk,) integers, non-decreasing. The kernels then mask every visited tile
    by document; 1 and 3 tell apart the tiles where that mask changes nothing and those where it removes pairs."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_tile_grid: kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    ids = _window_doc_ids(doc_ids, Tk)
    doc_start, doc_end = (None, None) if ids is None else document_bounds(ids)
    offset = Tk - Tq
    grid = np.zeros((_cdiv(Tq, block_m), _cdiv(Tk, block_n)), dtype=np.int64)
    if kernel == "dkdv":
        for start_n in range(grid.shape[1]):
            lo, mid = dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
            last_row = dkdv_last_row(start_n, Tq, Tk, block_m, block_n, doc_end)
            cols = np.arange(start_n * block_n, min((start_n + 1) * block_n, Tk))
            for start_m in range(lo, min(mid, Tq), block_m):
                grid[start_m // block_m, start_n] = TILE_CAUSAL_MASK
            for start_m in range(mid, last_row, block_m):
                q_pos = offset + np.arange(start_m, min(start_m + block_m, Tq))
                grid[start_m // block_m, start_n] = _off_band_state(ids, q_pos, cols)
    else:
        for start_m in range(grid.shape[0]):
            lo, hi = forward_key_bounds(start_m, Tq, Tk, block_m, block_n)
            first_key = forward_first_key(start_m, Tq, Tk, block_m, block_n, doc_start)
            q_pos = offset + np.arange(start_m * block_m, min((start_m + 1) * block_m, Tq))
            for start_n in range(first_key, lo, block_n):
                cols = np.arange(start_n, min(start_n + block_n, Tk))
                grid[start_m, start_n // block_n] = _off_band_state(ids, q_pos, cols)
            for start_n in range(lo, hi, block_n):
                grid[start_m, start_n // block_n] = TILE_CAUSAL_MASK
    return grid


def tiles_visited(kernel: str, Tq: int, Tk: int, block_m: int, block_n: int, doc_ids=None) -> int:
    """How many (query tile, key tile) pairs ``kernel`` computes for one window (``doc_ids`` as in
    ``attention_tile_grid``): each is two (BLOCK_M, BLOCK_N, D) matmuls in the forward, four or five in a backward
    kernel, so the count is the kernel's work up to the cost of one tile."""
    return int((attention_tile_grid(kernel, Tq, Tk, block_m, block_n, doc_ids) != TILE_SKIPPED).sum())


# ----------------------------------------------------------------------------------------------------------------
# Attention: forward (mirrors _attention_fwd and _fwd_inner)


def _check_attention(q, k, block_m, block_n, dropout_p):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[2] > k.shape[2]:
        raise ValueError(f"tiled attention: q (B, H, Tq, D) and k, v (B, H, Tk, D) with Tq <= Tk, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    if block_m < 1 or block_n < 1:
        raise ValueError(f"tiled attention: tile sizes must be >= 1, got block_m={block_m}, block_n={block_n}")
    if dropout_p > 0.0 and block_n % 8:
        raise ValueError(f"tiled attention: with dropout block_n must be a multiple of 8 (one Philox call serves 8 "
                         f"keys; the kernel asserts it too), got {block_n}")


def _doc_starts_and_ends(doc_ids, B: int, Tk: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(doc_start, doc_end), each (B, Tk) int64, from ``doc_ids`` (B, Tk); (None, None) without documents."""
    if doc_ids is None:
        return None, None
    if tuple(doc_ids.shape) != (B, Tk):
        raise ValueError(f"tiled attention: doc_ids must be ({B}, {Tk}), one id per key position, got "
                         f"{tuple(doc_ids.shape)}")
    starts, ends = torch.from_numpy(document_bounds(doc_ids.detach().cpu().numpy()))
    return starts, ends


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # float32 like the kernels; float64 stays float64


def _forward_inner(acc, l_i, m_i, q, k, v, q_pos, q_doc_start, lo, hi, Tk, qk_scale, block_n, on_diagonal, keep_fn,
                   trace, program):
    """Mirrors ``_fwd_inner``: fold the key tiles [lo, hi) into the running (acc, l_i, m_i) of one query tile (the
    online softmax). ``q_doc_start``: where each row's document starts (None without documents): keys before it
    are masked."""
    for start_n in range(lo, hi, block_n):
        cols = torch.arange(start_n, min(start_n + block_n, Tk))  # key positions of this tile
        s = (q @ k[cols].T) * qk_scale  # (BLOCK_M, BLOCK_N) scores, base 2
        if on_diagonal:
            s = torch.where(q_pos[:, None] >= cols[None, :], s, float("-inf"))
        if q_doc_start is not None:
            s = torch.where(cols[None, :] >= q_doc_start[:, None], s, float("-inf"))
        m_new = torch.maximum(m_i, s.max(1).values)
        if q_doc_start is not None:  # a row whose document starts after this tile: exp2 must give 0, not NaN
            m_new = torch.clamp(m_new, min=MASKED_ROW_MAX)
        p = torch.exp2(s - m_new[:, None])
        alpha = torch.exp2(m_i - m_new)  # how much the old terms shrink under the new max
        l_i = l_i * alpha + p.sum(1)  # the normalizer sums the undropped weights
        keep = keep_fn(q_pos, cols) if keep_fn is not None else None  # (BLOCK_M, BLOCK_N) bool, True = kept
        if keep is not None:
            p = torch.where(keep, p, 0.0)  # the 1 / (1 - p) factor is applied once, at the end
        acc = acc * alpha[:, None] + p @ v[cols]
        m_i = m_new
        if trace is not None:
            trace.append(dict(program, start_n=start_n, on_diagonal=on_diagonal, m_i=m_i.clone(), l_i=l_i.clone(),
                              q_pos=q_pos.clone(), cols=cols, keep=keep))
    return acc, l_i, m_i


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                      scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                      trace: list | None = None,
                      doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirrors ``_attention_fwd``: causal attention with the online softmax, one query tile at a time.

    q (B, H, Tq, D), k, v (B, H, Tk, D), Tq <= Tk (the queries are the last Tq positions). Returns o (B, H, Tq, D)
    and lse (B * H, Tq), each row's log-sum-exp in base 2 (LSE * log2 e), the layout the kernel saves. Both in
    float32 (float64 for float64 inputs). With ``dropout_p`` > 0 the keep mask is the kernel's for ``seed``.
    ``trace``: a list to append one dict per loop step to (bh, start_m, start_n, on_diagonal, m_i, l_i, and the
    step's query positions q_pos, key positions cols and dropout keep mask keep: None without dropout).
    ``doc_ids``: (B, Tk) integers, non-decreasing along each row, packs documents: a query sees only the keys of its
    own document; each query tile starts at ``forward_first_key`` instead of key 0.
    """
    _check_attention(q, k, block_m, block_n, dropout_p)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    doc_start = _doc_starts_and_ends(doc_ids, B, Tk)[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qk_scale = scale * LOG2E  # so the scores feed exp2 directly
    dtype = _compute_dtype(q)
    q, k, v = (t.detach().to(dtype).reshape(B * H, -1, D) for t in (q, k, v))
    o = torch.empty(B * H, Tq, D, dtype=dtype)
    lse = torch.empty(B * H, Tq, dtype=dtype)
    for bh in range(B * H):  # grid axis 1
        keep_fn = _tile_keep_mask(seed, bh, Tk, dropout_p) if dropout_p > 0.0 else None
        window_start = None if doc_start is None else doc_start[bh // H]  # (Tk,): this window's document starts
        for start_m in range(_cdiv(Tq, block_m)):  # grid axis 0: one program per query tile
            offs_m = torch.arange(start_m * block_m, min((start_m + 1) * block_m, Tq))  # query rows
            q_pos = (Tk - Tq) + offs_m  # their positions among the keys
            q_doc_start = None if window_start is None else window_start[q_pos]
            q_tile = q[bh, offs_m]
            m_i = torch.full((len(offs_m),), float("-inf"), dtype=dtype)
            l_i = torch.zeros(len(offs_m), dtype=dtype)
            acc = torch.zeros(len(offs_m), D, dtype=dtype)
            lo, hi = forward_key_bounds(start_m, Tq, Tk, block_m, block_n)
            first_key = forward_first_key(start_m, Tq, Tk, block_m, block_n, window_start)  # 0 without documents
            program = dict(bh=bh, start_m=start_m)
            # keys [first_key, lo): in the past of every row of this tile, no causal mask (masked by document)
            acc, l_i, m_i = _forward_inner(acc, l_i, m_i, q_tile, k[bh], v[bh], q_pos, q_doc_start, first_key, lo, Tk,
                                           qk_scale, block_n, on_diagonal=False, keep_fn=keep_fn, trace=trace,
                                           program=program)
            # keys [lo, hi): the diagonal band, masked; every row sees key lo, so no row is all -inf
            # (with documents, every row sees at least its own key, and the floor keeps the max finite until it does)
            acc, l_i, m_i = _forward_inner(acc, l_i, m_i, q_tile, k[bh], v[bh], q_pos, q_doc_start, lo, hi, Tk,
                                           qk_scale, block_n, on_diagonal=True, keep_fn=keep_fn, trace=trace,
                                           program=program)
            out_scale = 1.0 / l_i
            if dropout_p > 0.0:
                out_scale = out_scale / (1.0 - dropout_p)  # kept weights are scaled by 1 / (1 - p)
            o[bh, offs_m] = acc * out_scale[:, None]
            lse[bh, offs_m] = m_i + torch.log2(l_i)
    return o.reshape(B, H, Tq, D), lse


# ----------------------------------------------------------------------------------------------------------------
# Attention: backward (mirrors _attention_bwd_preprocess, _attention_bwd_dkdv and _attention_bwd_dq)


def _backward_dkdv_inner(dk, dv, k, v, q, do, lse, delta, key_rows, key_doc_rows, cols, lo, hi, Tq, offset,
                         qk_scale, dropout_scale, block_m, on_diagonal, keep_fn):
    """Mirrors ``_bwd_dkdv_inner``: add the query rows [lo, hi) to one key tile's dK and dV. Tiles are kept
    transposed: (keys, queries). ``key_doc_rows``: the first row past each key's document (None without
    documents): rows from it on are masked."""
    for start_m in range(lo, hi, block_m):
        rows = torch.arange(start_m, min(start_m + block_m, Tq))  # query rows of this tile
        p_t = torch.exp2((k @ q[rows].T) * qk_scale - lse[rows][None, :])  # P^T rebuilt from the saved LSE
        if on_diagonal:
            p_t = torch.where(rows[None, :] >= key_rows[:, None], p_t, 0.0)
        if key_doc_rows is not None:
            p_t = torch.where(rows[None, :] < key_doc_rows[:, None], p_t, 0.0)
        dp_t = v @ do[rows].T  # (dO v^T)^T
        if keep_fn is not None:
            keep_t = keep_fn(offset + rows, cols).T  # the forward's mask, at the rows' positions
            dv = dv + torch.where(keep_t, p_t * dropout_scale, 0.0) @ do[rows]
            dp_t = torch.where(keep_t, dp_t * dropout_scale, 0.0)
        else:
            dv = dv + p_t @ do[rows]
        ds_t = p_t * (dp_t - delta[rows][None, :])
        dk = dk + ds_t @ q[rows]
    return dk, dv


def _backward_dq_inner(dq, q, do, lse, delta, k, v, q_pos, q_doc_start, lo, hi, Tk, qk_scale, dropout_scale, block_n,
                       on_diagonal, keep_fn):
    """Mirrors ``_bwd_dq_inner``: add the key tiles [lo, hi) to one query tile's dQ (``q_doc_start``: where each
    row's document starts, None without documents)."""
    for start_n in range(lo, hi, block_n):
        cols = torch.arange(start_n, min(start_n + block_n, Tk))
        p = torch.exp2((q @ k[cols].T) * qk_scale - lse[:, None])
        if on_diagonal:
            p = torch.where(q_pos[:, None] >= cols[None, :], p, 0.0)
        if q_doc_start is not None:
            p = torch.where(cols[None, :] >= q_doc_start[:, None], p, 0.0)
        dp = do @ v[cols].T
        if keep_fn is not None:
            dp = torch.where(keep_fn(q_pos, cols), dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = dq + ds @ k[cols]
    return dq


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, block_m: int, block_n: int, scale: float | None = None,
                       dropout_p: float = 0.0, seed: int = 0,
                       doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirrors ``attention_bwd``'s three kernels: (dq, dk, dv) for the gradient ``do`` of the forward's output.

    do, q, o (B, H, Tq, D); k, v (B, H, Tk, D); lse (B * H, Tq) in base 2, as ``attention_forward`` returns it.
    ``block_m``, ``block_n``: query and key tile sizes (the dK/dV kernel owns key tiles of block_n and steps
    through query rows block_m at a time; the dQ kernel owns query tiles of block_m and steps through keys).
    ``dropout_p``, ``seed`` and ``doc_ids`` must be the forward's. Returns float32 tensors (float64 for float64
    inputs). With documents dK/dV stops each key tile at ``dkdv_last_row`` and dQ starts at ``forward_first_key``.
    """
    _check_attention(q, k, block_m, block_n, dropout_p)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    doc_start, doc_end = _doc_starts_and_ends(doc_ids, B, Tk)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qk_scale = scale * LOG2E
    dropout_scale = 1.0 / (1.0 - dropout_p)
    dtype = _compute_dtype(q)
    do, q, k, v, o = (t.detach().to(dtype).reshape(B * H, -1, D) for t in (do, q, k, v, o))
    lse = lse.detach().to(dtype).reshape(B * H, Tq)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    offset = Tk - Tq
    for bh in range(B * H):
        keep_fn = _tile_keep_mask(seed, bh, Tk, dropout_p) if dropout_p > 0.0 else None
        # The delta pass (_attention_bwd_preprocess): delta_i = dO_i . O_i = sum_j P_ij dP_ij, for every row at once
        delta = (do[bh] * o[bh]).sum(-1)  # (Tq,)
        window_start, window_end = (None, None) if doc_start is None else (doc_start[bh // H], doc_end[bh // H])

        # dK/dV (_attention_bwd_dkdv): one program per key tile, walking the query rows from the diagonal down
        for start_n in range(_cdiv(Tk, block_n)):
            cols = torch.arange(start_n * block_n, min((start_n + 1) * block_n, Tk))  # key positions
            dk_tile = torch.zeros(len(cols), D, dtype=dtype)
            dv_tile = torch.zeros(len(cols), D, dtype=dtype)
            key_rows = cols - offset  # the first query row that sees each key
            key_doc_rows = None if window_end is None else window_end[cols] - offset  # the first row past its document
            lo, mid = dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
            last_row = dkdv_last_row(start_n, Tq, Tk, block_m, block_n, window_end)  # Tq without documents
            args = (k[bh, cols], v[bh, cols], q[bh], do[bh], lse[bh], delta, key_rows, key_doc_rows, cols)
            # queries [lo, mid): the diagonal band, masked
            dk_tile, dv_tile = _backward_dkdv_inner(dk_tile, dv_tile, *args, lo, min(mid, Tq), Tq, offset, qk_scale,
                                                    dropout_scale, block_m, on_diagonal=True, keep_fn=keep_fn)
            # queries [mid, last_row): all in the future of this key tile, no causal mask (masked by document)
            dk_tile, dv_tile = _backward_dkdv_inner(dk_tile, dv_tile, *args, mid, last_row, Tq, offset, qk_scale,
                                                    dropout_scale, block_m, on_diagonal=False, keep_fn=keep_fn)
            dk[bh, cols] = dk_tile * scale
            dv[bh, cols] = dv_tile

        # dQ (_attention_bwd_dq): one program per query tile, walking the key tiles up to the diagonal
        for start_m in range(_cdiv(Tq, block_m)):
            offs_m = torch.arange(start_m * block_m, min((start_m + 1) * block_m, Tq))
            q_pos = offset + offs_m
            q_doc_start = None if window_start is None else window_start[q_pos]
            dq_tile = torch.zeros(len(offs_m), D, dtype=dtype)
            lo, hi = forward_key_bounds(start_m, Tq, Tk, block_m, block_n)  # the forward's bounds
            first_key = forward_first_key(start_m, Tq, Tk, block_m, block_n, window_start)
            args = (q[bh, offs_m], do[bh, offs_m], lse[bh, offs_m], delta[offs_m], k[bh], v[bh], q_pos, q_doc_start)
            # keys [first_key, lo): no causal mask (masked by document)
            dq_tile = _backward_dq_inner(dq_tile, *args, first_key, lo, Tk, qk_scale, dropout_scale, block_n,
                                         on_diagonal=False, keep_fn=keep_fn)
            # keys [lo, hi): the diagonal band, masked
            dq_tile = _backward_dq_inner(dq_tile, *args, lo, hi, Tk, qk_scale, dropout_scale, block_n, on_diagonal=True,
                                         keep_fn=keep_fn)
            dq[bh, offs_m] = dq_tile * scale
    return dq.reshape(B, H, Tq, D), dk.reshape(B, H, Tk, D), dv.reshape(B, H, Tk, D)


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm (mirrors _layer_norm_fwd, _layer_norm_bwd_dx and _layer_norm_bwd_dwdb)


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS,
                       block_m: int = 4, trace: list | None = None):
    """Mirrors ``_layer_norm_fwd``: one program per tile of ``block_m`` rows. x (..., C), weight, bias (C,).

    Returns (y (..., C), mean (...,), rstd (...,)) in float32 (float64 for float64 inputs). ``trace``: a list to
    append one dict per row tile to (rows, mean, rstd).
    """
    C = x.shape[-1]
    dtype = _compute_dtype(x)
    x2d = x.detach().to(dtype).reshape(-1, C)  # (M, C)
    w, b = weight.detach().to(dtype), bias.detach().to(dtype)
    M = x2d.shape[0]
    y = torch.empty_like(x2d)
    mean = torch.empty(M, dtype=dtype)
    rstd = torch.empty(M, dtype=dtype)
    for pid in range(_cdiv(M, block_m)):
        rows = torch.arange(pid * block_m, min((pid + 1) * block_m, M))
        x_tile = x2d[rows]  # (BLOCK_M, C)
        mean_tile = x_tile.sum(1) / C
        xc = x_tile - mean_tile[:, None]
        var = (xc * xc).sum(1) / C  # the biased variance
        rstd_tile = 1.0 / torch.sqrt(var + eps)
        y[rows] = xc * rstd_tile[:, None] * w[None, :] + b[None, :]
        mean[rows], rstd[rows] = mean_tile, rstd_tile
        if trace is not None:
            trace.append(dict(rows=rows.tolist(), mean=mean_tile.clone(), rstd=rstd_tile.clone()))
    return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def layer_norm_groups(n_rows: int, n_groups: int = LAYER_NORM_GROUPS, block_m: int = 1) -> list[list[int]]:
    """The rows each stage-1 program of the backward owns, as ``_layer_norm_backward`` assigns them: at most
    ``n_groups`` groups (and no more than there are rows) of consecutive rows, each a whole number of
    ``block_m``-row steps except the last, and no group without rows (so there may be fewer groups than asked)."""
    if n_rows <= 0:
        return []
    groups = max(1, min(n_groups, n_rows))
    rows_per_group = _cdiv(_cdiv(n_rows, groups), block_m) * block_m
    groups = _cdiv(n_rows, rows_per_group)
    return [list(range(g * rows_per_group, min((g + 1) * rows_per_group, n_rows))) for g in range(groups)]


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, n_groups: int = LAYER_NORM_GROUPS, block_m: int = 1,
                        trace: list | None = None):
    """Mirrors the backward's two stages: (dx (..., C), dweight (C,), dbias (C,)).

    dy, x (..., C); weight (C,); mean, rstd (...,) as ``layer_norm_forward`` returns them. Stage 1: each row
    group (``layer_norm_groups``) walks its rows ``block_m`` at a time, writes dx and keeps partial sums of
    dy * xhat and dy; stage 2 sums the (G, C) partials over the groups. ``trace``: a list to append one dict per
    group to (group, rows, partial_dw, partial_db).
    """
    C = x.shape[-1]
    dtype = _compute_dtype(x)
    x2d, dy2d = (t.detach().to(dtype).reshape(-1, C) for t in (x, dy))
    w = weight.detach().to(dtype)
    mean, rstd = (t.detach().to(dtype).reshape(-1) for t in (mean, rstd))
    dx = torch.empty_like(x2d)
    groups = layer_norm_groups(x2d.shape[0], n_groups, block_m)
    partial_dw = torch.zeros(len(groups), C, dtype=dtype)  # one row of partial sums per group
    partial_db = torch.zeros(len(groups), C, dtype=dtype)
    # stage 1 (_layer_norm_bwd_dx): one program per group
    for group, group_rows in enumerate(groups):
        for first in range(0, len(group_rows), block_m):
            rows = torch.tensor(group_rows[first:first + block_m])
            xhat = (x2d[rows] - mean[rows][:, None]) * rstd[rows][:, None]
            g = dy2d[rows] * w[None, :]  # the gradient reaching xhat
            mean_g = g.sum(1) / C
            mean_g_xhat = (g * xhat).sum(1) / C
            dx[rows] = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[rows][:, None]
            partial_dw[group] += (dy2d[rows] * xhat).sum(0)
            partial_db[group] += dy2d[rows].sum(0)
        if trace is not None:
            trace.append(dict(group=group, rows=group_rows, partial_dw=partial_dw[group].clone(),
                              partial_db=partial_db[group].clone()))
    # stage 2 (_layer_norm_bwd_dwdb): sum the partials over the groups, column by column
    dweight, dbias = partial_dw.sum(0), partial_db.sum(0)
    return dx.reshape(x.shape), dweight, dbias


# ----------------------------------------------------------------------------------------------------------------
# GELU (mirrors _gelu_fwd and _gelu_bwd)

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # the tanh approximation's scale (GPT-2)
GELU_CUBIC = 0.044715  # the tanh approximation's cubic coefficient (GPT-2)


def _sigmoid_and_complement(z: torch.Tensor):
    """(sigmoid(z), 1 - sigmoid(z)) from t = exp(-|z|) in (0, 1]: no overflow, no cancellation."""
    t = torch.exp(-z.abs())
    big = 1.0 / (1.0 + t)  # sigmoid(|z|)
    small = t * big  # sigmoid(-|z|)
    return torch.where(z >= 0, big, small), torch.where(z >= 0, small, big)


def gelu_forward(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Mirrors ``_gelu_fwd``: ``tanh``: x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); ``none``: x Phi(x)."""
    x = x.detach().to(_compute_dtype(x))
    if approximate == "tanh":
        u = (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI
        s, _ = _sigmoid_and_complement(2.0 * u)
        return x * s  # = 0.5 x (1 + tanh(u)), since 1 + tanh(u) = 2 sigmoid(2u)
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


def gelu_backward(dy: torch.Tensor, x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Mirrors ``_gelu_bwd``: dx = dy * dGELU/dx, recomputed from x alone."""
    x = x.detach().to(_compute_dtype(x))
    dy = dy.detach().to(x.dtype)
    if approximate == "tanh":
        u = (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI
        du = (1.0 + x * x * GELU_CUBIC * 3.0) * SQRT_2_OVER_PI  # du/dx
        s, one_minus_s = _sigmoid_and_complement(2.0 * u)
        dydx = s + x * s * one_minus_s * 2.0 * du  # d sigmoid(z)/dz = sigmoid(z) (1 - sigmoid(z))
    elif approximate == "none":
        cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))  # Phi(x)
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # phi(x)
        dydx = cdf + x * pdf
    else:
        raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return dy * dydx
