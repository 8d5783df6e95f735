"""Packed documents in the tiled mirrors (kernels/tiled.py): the values, and the tiles the kernels visit.

Three kinds of check. The loops with ``doc_ids`` must compute the op: forward and gradients against
``causal_attention_math`` in float64 with the same documents, and autograd through it. The schedule must be safe
and tight: from the (query, key) pairs a query may see (causal and in one document), element by element, every
tile holding such a pair is visited and the visited tiles holding none are counted, for random layouts. And it must
pay: documents of 256 tokens in a window of 4096 leave the forward a small fraction of the causal kernel's tiles,
with the tiles a GPU runs by default. The real kernel is held to the same schedule: keys set to NaN in the tiles
the grid says a program skips must not reach that program's output.
"""
from __future__ import annotations

import importlib.util
import itertools
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are imported, so first

from kernels import tiled  # noqa: E402
from kernels.attention_tiles import GPU_TILES  # noqa: E402
from kernels.definitions import causal_attention_math  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# (B, H, Tq, Tk, D, block_m, block_n): tiles with partial tails, block_m larger and smaller than block_n, Tq < Tk
# with the diagonal across tiles, one-element tiles.
SHAPES = [
    (2, 1, 13, 13, 5, 3, 5),
    (1, 2, 10, 10, 4, 4, 2),
    (1, 1, 7, 19, 3, 4, 8),
    (2, 1, 16, 16, 4, 8, 8),
    (1, 1, 6, 6, 2, 1, 1),
    (1, 1, 1, 9, 4, 16, 8),
]


def ids_from_lengths(lengths) -> np.ndarray:
    """One window's doc_ids, (sum(lengths),): 0, 0, ..., 1, 1, ... for documents of these lengths."""
    return np.repeat(np.arange(len(lengths)), lengths)


def random_lengths(T: int, rng: np.random.Generator) -> list[int]:
    """Random document lengths summing to T: mostly short, some of one token, now and then one long document."""
    cuts = np.sort(rng.choice(np.arange(1, T), size=rng.integers(0, min(T - 1, 6) + 1), replace=False))
    return np.diff(np.concatenate([[0], cuts, [T]])).tolist()


def _inputs(B, H, Tq, Tk, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)


def _doc_ids(B, Tk, seed) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([ids_from_lengths(random_lengths(Tk, rng)) for _ in range(B)]))


# ----------------------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mirror_with_documents_matches_float64_math(shape, dropout_p):
    B, H, Tq, Tk, D, block_m, block_n = shape
    if dropout_p > 0 and block_n % 8:
        block_n = 8  # with dropout the key tile is a multiple of 8, as in the kernel
    for seed in range(3):
        q, k, v, do = _inputs(B, H, Tq, Tk, D, seed)
        doc_ids = _doc_ids(B, Tk, seed)
        keep = None
        if dropout_p > 0:
            keep = torch.from_numpy(np.stack([tiled.dropout_keep_mask(7, bh, Tk, dropout_p, Tq=Tq)
                                              for bh in range(B * H)])).view(B, H, Tq, Tk)
        o, lse = tiled.attention_forward(q, k, v, block_m, block_n, dropout_p=dropout_p, seed=7, doc_ids=doc_ids)
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        exact = causal_attention_math(qs, ks, vs, dropout_p=dropout_p, dropout_mask=keep, doc_ids=doc_ids)
        exact.backward(do)
        torch.testing.assert_close(o, exact.detach(), rtol=0, atol=1e-12)
        grads = tiled.attention_backward(do, q, k, v, o, lse, block_m, block_n, dropout_p=dropout_p, seed=7,
                                         doc_ids=doc_ids)
        for name, got, want in zip(("dq", "dk", "dv"), grads, (qs.grad, ks.grad, vs.grad)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=f"{name}, documents {doc_ids.tolist()}")


def test_one_document_is_the_causal_attention_bit_for_bit():
    q, k, v, do = _inputs(1, 2, 9, 13, 4, seed=3)
    plain = tiled.attention_forward(q, k, v, 4, 2)
    one = tiled.attention_forward(q, k, v, 4, 2, doc_ids=torch.zeros(1, 13, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(plain, one))
    for kernel in tiled.ATTENTION_KERNELS:
        assert (tiled.attention_tile_grid(kernel, 9, 13, 4, 2, doc_ids=np.zeros(13, dtype=int))
                == tiled.attention_tile_grid(kernel, 9, 13, 4, 2)).all()


def test_forward_loop_visits_the_grids_tiles():
    """The trace of attention_forward (one entry per loop step) against attention_tile_grid: the same tiles, the
    causal mask on the same ones."""
    for seed, (B, H, Tq, Tk, D, block_m, block_n) in itertools.product(range(4), SHAPES):
        q, k, v, _ = _inputs(B, H, Tq, Tk, D, seed)
        doc_ids = _doc_ids(B, Tk, seed)
        trace: list[dict] = []
        tiled.attention_forward(q, k, v, block_m, block_n, trace=trace, doc_ids=doc_ids)
        for bh in range(B * H):
            grid = tiled.attention_tile_grid("fwd", Tq, Tk, block_m, block_n, doc_ids=doc_ids[bh // H])
            stepped = np.zeros_like(grid)
            for step in (s for s in trace if s["bh"] == bh):
                stepped[step["start_m"], step["start_n"] // block_n] = 2 if step["on_diagonal"] else 1
            assert ((grid == tiled.TILE_CAUSAL_MASK) == (stepped == 2)).all()
            assert ((grid != tiled.TILE_SKIPPED) == (stepped != 0)).all()


# ----------------------------------------------------------------------------------------------------------------
# The schedule against brute force


def allowed_pairs(Tq: int, doc_ids: np.ndarray) -> np.ndarray:
    """(Tq, Tk) bool: query i (position Tk - Tq + i) may see key j: j <= its position, and in its document."""
    Tk = len(doc_ids)
    pos = np.arange(Tk - Tq, Tk)
    return (np.arange(Tk)[None, :] <= pos[:, None]) & (doc_ids[pos][:, None] == doc_ids[None, :])


def check_against_brute_force(kernel, Tq, Tk, block_m, block_n, doc_ids) -> int:
    """Asserts that ``kernel`` visits every tile holding an allowed pair, and that each visited tile's state says
    the truth about it; returns the number of visited tiles holding no allowed pair (work wasted)."""
    grid = tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n, doc_ids=doc_ids)
    causal = tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n)
    allowed = allowed_pairs(Tq, doc_ids)
    future = np.arange(Tk)[None, :] > np.arange(Tk - Tq, Tk)[:, None]
    wasted = 0
    for i, j in np.ndindex(*grid.shape):
        tile = (slice(i * block_m, (i + 1) * block_m), slice(j * block_n, (j + 1) * block_n))
        where = f"{kernel} tile (query {i}, key {j}) = {grid[i, j]}, documents {doc_ids.tolist()}"
        if allowed[tile].any():
            assert grid[i, j] != tiled.TILE_SKIPPED, f"{where}: it holds an allowed pair but is skipped"
        elif grid[i, j] != tiled.TILE_SKIPPED:
            wasted += 1
        # the band is the causal kernel's band; below it no pair is in the future
        assert (grid[i, j] == tiled.TILE_CAUSAL_MASK) == (causal[i, j] == tiled.TILE_CAUSAL_MASK), where
        if grid[i, j] in (tiled.TILE_NO_MASK, tiled.TILE_DOCUMENT_MASK):
            assert not future[tile].any(), f"{where}: visited without the causal mask but holds a future pair"
        if grid[i, j] == tiled.TILE_NO_MASK:
            assert allowed[tile].all(), f"{where}: no pair masked, but some pair lies in two documents"
        if grid[i, j] == tiled.TILE_DOCUMENT_MASK:
            assert not allowed[tile].all(), f"{where}: said masked by document, but every pair is in one document"
    return wasted


@pytest.mark.parametrize("Tq,Tk,block_m,block_n", [(40, 40, 8, 4), (40, 40, 4, 8), (40, 40, 6, 10), (17, 53, 4, 8),
                                                   (1, 30, 16, 8), (33, 33, 1, 1), (64, 64, 16, 16)])
def test_every_needed_tile_is_visited_and_none_is_wasted(Tq, Tk, block_m, block_n):
    """Random layouts, every kernel. No visited tile is wasted either: what one query tile needs is a run of keys
    (its first row's document start to its last row's position: each key in between is seen by the first row or
    by the row at its own position), and the bounds round that run out to whole tiles and no further; the same
    holds for a key tile's rows (up to the end of its last key's document). A tile is the kernels' unit of work,
    so the only waste left is inside the tiles, where the masks remove pairs."""
    rng = np.random.default_rng(Tq * 1000 + Tk)
    for _ in range(25):
        doc_ids = ids_from_lengths(random_lengths(Tk, rng))
        for kernel in tiled.ATTENTION_KERNELS:
            assert check_against_brute_force(kernel, Tq, Tk, block_m, block_n, doc_ids) == 0


def test_grid_by_hand():
    # documents of 3, 5 and 2 tokens in T = 10, 4-row query tiles, 2-key tiles. Query tile 1 (rows 4-7) starts in
    # document 1 (positions 3-7): first key 3, rounded down to key tile 1 (keys 2-3), whose key 2 is in document 0:
    # masked by document. Query tile 2 (rows 8-9) is document 2 alone: key tiles 0-3 skipped.
    doc_ids = ids_from_lengths([3, 5, 2])
    S, O, C, M = tiled.TILE_SKIPPED, tiled.TILE_NO_MASK, tiled.TILE_CAUSAL_MASK, tiled.TILE_DOCUMENT_MASK
    assert tiled.attention_tile_grid("fwd", 10, 10, 4, 2, doc_ids=doc_ids).tolist() == [
        [C, C, S, S, S],
        [S, M, C, C, S],
        [S, S, S, S, C],
    ]
    # dK/dV, key tile 0 (keys 0-1, document 0, which ends at 3): its band, rows 0-3, and nothing more; key tile 1
    # (keys 2-3; key 3's document ends at 8): rows 4-7 below the band, where key 2 is masked by document
    assert tiled.attention_tile_grid("dkdv", 10, 10, 4, 2, doc_ids=doc_ids).tolist() == [
        [C, C, S, S, S],
        [S, M, C, C, S],
        [S, S, S, S, C],
    ]
    starts, ends = tiled.document_bounds(doc_ids)
    assert starts.tolist() == [0, 0, 0, 3, 3, 3, 3, 3, 8, 8] and ends.tolist() == [3, 3, 3, 8, 8, 8, 8, 8, 10, 10]
    assert [tiled.forward_first_key(m, 10, 10, 4, 2, starts) for m in range(3)] == [0, 2, 8]
    # key tile 4 (keys 8-9): its band's mid is 12, past Tq, and last_row never falls below mid (an empty loop)
    assert [tiled.dkdv_last_row(n, 10, 10, 4, 2, ends) for n in range(5)] == [4, 8, 8, 8, 12]
    assert tiled.tiles_visited("fwd", 10, 10, 4, 2, doc_ids) == 6 < tiled.tiles_visited("fwd", 10, 10, 4, 2) == 11
    # fewer queries than keys: the last 3 of 10 positions; row 0 (position 7) is in document 1 (positions 3-7),
    # rows 1-2 (positions 8-9) in document 2. Key tile 0 (keys 0-3) holds key 3, which row 0 sees: visited by both
    # kernels, masked by document; query tile 1 (row 2) skips key tiles 0 and 1, dK/dV's key tiles 0 and 1 skip it
    assert tiled.attention_tile_grid("dkdv", 3, 10, 2, 4, doc_ids=doc_ids).tolist() == [[M, M, C], [S, S, C]]
    assert tiled.attention_tile_grid("fwd", 3, 10, 2, 4, doc_ids=doc_ids).tolist() == [[M, C, C], [S, S, C]]
    assert tiled.attention_tile_grid("dkdv", 3, 10, 2, 4).tolist() == [[O, O, C], [O, O, C]]


def test_bad_doc_ids_raise():
    with pytest.raises(ValueError, match="must not decrease"):
        tiled.attention_tile_grid("fwd", 4, 4, 2, 2, doc_ids=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        tiled.attention_tile_grid("fwd", 4, 4, 2, 2, doc_ids=[0, 0, 1])
    with pytest.raises(ValueError, match="integers"):
        tiled.document_bounds(np.zeros(4))
    q, k, v, _ = _inputs(1, 1, 4, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"\(1, 4\)"):
        tiled.attention_forward(q, k, v, 2, 2, doc_ids=torch.zeros(1, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# What documents save


def test_documents_of_256_in_4096_leave_a_fraction_of_the_causal_tiles(capsys):
    """The GPU's default tiles (16-bit inputs, D <= 64): the forward with documents of 256 tokens in T = 4096
    visits at most a third of the causal kernel's tiles (in fact about 256 / 4096 of the causal triangle's area,
    plus the diagonal band's tiles and the query tiles that start in the middle of a document)."""
    T, length = 4096, 256
    doc_ids = ids_from_lengths([length] * (T // length))
    ratios = {}
    for kernel in tiled.ATTENTION_KERNELS:
        block_m, block_n = GPU_TILES[("16bit", "D<=64")][kernel][0][:2]
        with_docs = tiled.tiles_visited(kernel, T, T, block_m, block_n, doc_ids)
        causal = tiled.tiles_visited(kernel, T, T, block_m, block_n)
        assert check_against_brute_force(kernel, T, T, block_m, block_n, doc_ids) == 0
        ratios[kernel] = with_docs / causal
        with capsys.disabled():
            print(f"\n{kernel}: tiles ({block_m}, {block_n}), T = {T}, documents of {length}: {with_docs} of the "
                  f"causal kernel's {causal} tiles visited ({with_docs / causal:.3f})", end="")
    assert ratios["fwd"] <= 1 / 3
    assert all(ratio <= 1 / 3 for ratio in ratios.values())


# ----------------------------------------------------------------------------------------------------------------
# The real kernels skip what the grid skips

@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_document_bounds_are_the_kernels():
    from kernels.attention import document_bounds

    doc_ids = _doc_ids(3, 37, seed=4)
    assert (document_bounds(doc_ids).numpy() == tiled.document_bounds(doc_ids.numpy())).all()


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the rows of the other query tiles, which do read the NaN
def test_kernel_never_reads_a_tile_the_grid_skips(monkeypatch):
    """For each query tile in turn, the keys and values of every key tile the grid skips for it are set to NaN: a
    tile the forward kernel visited would turn that query tile's output into NaN (a masked score still multiplies
    its value), and it must stay the float64 truth instead. Likewise for dK/dV, with NaN in the queries and output
    gradients of the query tiles a key tile skips, and for dQ, with NaN keys and values as in the forward."""
    import kernels.attention_tiles
    from kernels.attention import attention_bwd, attention_fwd, document_bounds
    from kernels.attention_tiles import Tiles
    from kernels.launch import is_interpreting

    if not is_interpreting():
        pytest.skip("sets the interpreter's tiles; on a GPU the tuner picks among the GPU's")
    Tq = Tk = 48
    tiles = dict(fwd=(16, 8), dkdv=(8, 16), dq=(16, 8))  # shaped like the GPU's: one side twice the other
    monkeypatch.setattr(kernels.attention_tiles, "INTERPRETER_TILES",
                        {kernel: Tiles(*blocks, 1, 1) for kernel, blocks in tiles.items()})
    doc_ids = torch.from_numpy(ids_from_lengths([5, 19, 1, 11, 12]))[None]
    bounds = document_bounds(doc_ids)
    q, k, v, do = (t.float() for t in _inputs(1, 1, Tq, Tk, 16, seed=2))
    o, lse = attention_fwd(q, k, v, 0.0, 0.25, None, bounds)
    want_o = causal_attention_math(q.double(), k.double(), v.double(), scale=0.25, doc_ids=doc_ids)
    # the gradients of the kernel's own o and lse, in float64 (the mirror's result does not depend on its tiles)
    want = tiled.attention_backward(*(t.double() for t in (do, q, k, v, o, lse)), 8, 8, scale=0.25, doc_ids=doc_ids)

    def poisoned(t, dim_tiles, block):
        t = t.clone()
        for index in dim_tiles:
            t[:, :, index * block:(index + 1) * block] = float("nan")
        return t

    block_m, block_n = tiles["fwd"]
    grid = tiled.attention_tile_grid("fwd", Tq, Tk, block_m, block_n, doc_ids=doc_ids[0])
    for i in range(grid.shape[0]):
        skipped = np.flatnonzero(grid[i] == tiled.TILE_SKIPPED)
        rows = slice(i * block_m, (i + 1) * block_m)
        o_i, _ = attention_fwd(q, poisoned(k, skipped, block_n), poisoned(v, skipped, block_n), 0.0, 0.25, None,
                               bounds)
        torch.testing.assert_close(o_i[:, :, rows].double(), want_o[:, :, rows], rtol=0, atol=1e-5)
        dq_i, _, _ = attention_bwd(do, q, poisoned(k, skipped, block_n), poisoned(v, skipped, block_n), o, lse, 0.0,
                                   0.25, None, bounds)
        torch.testing.assert_close(dq_i[:, :, rows].double(), want[0][:, :, rows], rtol=0, atol=1e-4)
    block_m, block_n = tiles["dkdv"]
    grid = tiled.attention_tile_grid("dkdv", Tq, Tk, block_m, block_n, doc_ids=doc_ids[0])
    for j in range(grid.shape[1]):
        skipped = np.flatnonzero(grid[:, j] == tiled.TILE_SKIPPED)
        keys = slice(j * block_n, (j + 1) * block_n)
        _, dk, dv = attention_bwd(poisoned(do, skipped, block_m), poisoned(q, skipped, block_m), k, v, o, lse, 0.0,
                                  0.25, None, bounds)
        torch.testing.assert_close(dk[:, :, keys].double(), want[1][:, :, keys], rtol=0, atol=1e-4)
        torch.testing.assert_close(dv[:, :, keys].double(), want[2][:, :, keys], rtol=0, atol=1e-4)
