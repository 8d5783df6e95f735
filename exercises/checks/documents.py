"""The check of exercise document_tile_bounds (lesson 12)."""
from __future__ import annotations

import math
from types import ModuleType
from typing import Callable

import torch

from .compare import Mismatch, Result, record


# With packed documents, the first key a query tile visits and the end of the query rows a key tile visits, against a
# brute-force count over every (query, key) pair of windows packed with documents: row r (position Tk - Tq + r) sees
# key j when j <= Tk - Tq + r and both lie in one document. From that count alone: a query tile's first_key is the
# first key any of its rows sees, rounded down to a key tile (the loop steps by block_n); a key tile's last_row is one
# past the last row that sees any of its keys, at least mid (lesson 6's band, walked anyway). Every number is compared
# for every tile; a case's row in the table says what its first wrong tile does.

# (Tq, Tk, block_m, block_n, document lengths), by hand: kernels.explain's example; one document (the bounds
# without documents); documents of one token; documents that end on tile boundaries; a chunk of queries whose
# first document began before it; a decoding step. Random windows follow (_document_tile_cases).
DOCUMENT_TILE_CASES = [(10, 10, 4, 2, (3, 5, 2)), (37, 37, 16, 8, (37,)), (37, 37, 8, 16, (1, 1, 1, 1, 1, 32)),
                       (32, 32, 8, 8, (8, 16, 8)), (5, 21, 16, 16, (9, 12)), (24, 50, 8, 16, (30, 3, 17)),
                       (1, 19, 16, 8, (4, 15))]
DOCUMENT_TILE_RANDOM = 10  # random windows: 2 to 64 keys, up to 6 documents, tiles of 2 to 16, Tq = Tk every other


def _document_tile_cases() -> list[tuple[int, int, int, int, tuple[int, ...]]]:
    import numpy as np

    rng = np.random.default_rng(12)
    cases = list(DOCUMENT_TILE_CASES)
    for i in range(DOCUMENT_TILE_RANDOM):
        Tk = int(rng.integers(2, 65))
        Tq = Tk if i % 2 == 0 else int(rng.integers(1, Tk + 1))
        block_m, block_n = (int(b) for b in rng.choice([2, 4, 8, 16], size=2))
        cuts = np.sort(rng.choice(np.arange(1, Tk), size=min(int(rng.integers(0, 6)), Tk - 1), replace=False))
        cases.append((Tq, Tk, block_m, block_n, tuple(int(n) for n in np.diff([0, *cuts, Tk]))))
    return cases


def _ids_and_bounds(Tk: int, lengths: tuple[int, ...]):
    """(ids, doc_start, doc_end) of a window of documents of ``lengths``, each (Tk,) int64, counted out here."""
    import numpy as np

    ids = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum([0, *lengths[:-1]])
    ends = np.cumsum(lengths)
    assert len(ids) == Tk, (Tk, lengths)
    return ids, starts[ids].astype(np.int64), ends[ids].astype(np.int64)


def _document_tile_truth(Tq: int, Tk: int, block_m: int, block_n: int, ids) -> dict[str, list]:
    """What the brute-force count allows, per tile: "first_key" (query tiles) and "last_row" (key tiles), and the
    unrounded "first_seen" and "rows_end" they come from."""
    import numpy as np

    from kernels.tiled import dkdv_query_bounds

    offset = Tk - Tq
    rows, keys = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
    sees = (keys <= offset + rows) & (ids[offset + rows] == ids[keys])  # (Tq, Tk): row r sees key j
    truth: dict[str, list] = {"first_key": [], "first_seen": [], "last_row": [], "rows_end": [], "mid": []}
    for start_m in range(math.ceil(Tq / block_m)):
        first_seen = int(np.argmax(sees[start_m * block_m:(start_m + 1) * block_m].any(0)))  # every row sees itself
        truth["first_seen"].append(first_seen)
        truth["first_key"].append(first_seen // block_n * block_n)
    for start_n in range(math.ceil(Tk / block_n)):
        seeing = np.flatnonzero(sees[:, start_n * block_n:(start_n + 1) * block_n].any(1))
        rows_end = int(seeing[-1]) + 1 if len(seeing) else 0
        _, mid = dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
        truth["rows_end"].append(rows_end)
        truth["mid"].append(mid)
        truth["last_row"].append(max(mid, rows_end))
    return truth


DOCUMENTS_IGNORED = ("the documents ignored (first_key 0, last_row Tq: every tile walked as without documents): "
                     "use doc_start and doc_end")


def _first_key_variants(Tq, Tk, block_m, block_n, doc_start) -> dict[str, Callable[[int], int]]:
    """Known wrong forward_first_key, each with one mistake: name -> start_m -> first_key."""
    def first(m):
        return (Tk - Tq) + m * block_m

    return {
        "first_key not rounded down to a key tile: the loop steps by block_n from it, so it must be a key tile's "
        "first key (doc_start // block_n * block_n)": lambda m: int(doc_start[first(m)]),
        "first_key rounded up to a key tile: round down (//), or the rows lose the keys of the tile that holds "
        "their document's start": lambda m: -(-int(doc_start[first(m)]) // block_n) * block_n,
        "first_key as a key tile's number (doc_start // block_n): the loop wants a key, // block_n * block_n":
            lambda m: int(doc_start[first(m)]) // block_n,
        "the document of the tile's last row, not its first: document starts never decrease, so the first row's "
        "document starts earliest, and its keys are seen too":
            lambda m: int(doc_start[min(first(m) + block_m, Tk) - 1]) // block_n * block_n,
        "the tile's first row without the offset Tk - Tq: query row r sits at position (Tk - Tq) + r":
            lambda m: int(doc_start[m * block_m]) // block_n * block_n,
        "the tile's own first position rounded down (lesson 5's lo), not its document's start: the rows also see "
        "the keys of their document before the diagonal band": lambda m: first(m) // block_n * block_n,
        DOCUMENTS_IGNORED: lambda m: 0,
    }


def _last_row_variants(Tq, Tk, block_m, block_n, doc_end) -> dict[str, Callable[[int], int]]:
    """Known wrong dkdv_last_row, each with one mistake: name -> start_n -> last_row."""
    from kernels.tiled import dkdv_query_bounds

    offset = Tk - Tq

    def mid(n):
        return dkdv_query_bounds(n, Tq, Tk, block_m, block_n)[1]

    def last_key(n):
        return min((n + 1) * block_n, Tk) - 1

    def clamped(n, end):  # the kernel's clamps around a row number
        return max(mid(n), min(Tq, end))

    return {
        "one row short at the document's end: doc_end is already exclusive (the first position past the "
        "document), so last_row is doc_end - (Tk - Tq), no - 1":
            lambda n: clamped(n, int(doc_end[last_key(n)]) - 1 - offset),
        "one row past the document's end: doc_end is exclusive (the first position past the document), so "
        "last_row is doc_end - (Tk - Tq), no + 1": lambda n: clamped(n, int(doc_end[last_key(n)]) + 1 - offset),
        "the document of the tile's first key, not its last: document ends never decrease, so the last key's "
        "document ends last, and its rows see the tile": lambda n: clamped(n, int(doc_end[n * block_n]) - offset),
        "doc_end used as a row without the offset Tk - Tq: it is a position, and row r sits at position "
        "(Tk - Tq) + r": lambda n: clamped(n, int(doc_end[last_key(n)])),
        "last_row not kept at least mid: the band [lo, mid) is walked anyway, so the kernel's last_row is "
        "max(mid, ...)": lambda n: min(Tq, int(doc_end[last_key(n)]) - offset),
        "last_row rounded up to a whole query tile: the loop stops at its first step at or past last_row, so the "
        "kernel's is not rounded": lambda n: clamped(n, -(-(int(doc_end[last_key(n)]) - offset) // block_m) * block_m),
        DOCUMENTS_IGNORED: lambda n: Tq,
    }


def _first_key_problem(start_m: int, got: int, truth: dict, block_n: int) -> str:
    """What query tile ``start_m`` does wrong with first_key ``got``, in words."""
    first_seen, right = truth["first_seen"][start_m], truth["first_key"][start_m]
    if got > first_seen:
        return f"query tile {start_m} skips key {first_seen}, seen by one of its rows"
    if got % block_n:
        return f"query tile {start_m} starts at key {got}, not a key tile boundary (a multiple of {block_n})"
    return f"query tile {start_m} visits keys [{got}, {right}), seen by none of its rows"


def _last_row_problem(start_n: int, got: int, truth: dict, Tq: int, block_m: int) -> str:
    """What key tile ``start_n`` does wrong with last_row ``got``, in words."""
    mid, rows_end, right = truth["mid"][start_n], truth["rows_end"][start_n], truth["last_row"][start_n]

    def covered(last_row):  # the end of the query tiles the kernel's two loops visit
        return mid if last_row <= mid else mid + -(-(last_row - mid) // block_m) * block_m

    if covered(got) < rows_end:
        return f"key tile {start_n} stops before row {covered(got)}, which sees one of its keys"
    if covered(got) > covered(right) and got > Tq:
        return f"key tile {start_n}: last_row {got} is past Tq = {Tq}, in query tiles that do not exist"
    if covered(got) > covered(right):
        return f"key tile {start_n} visits rows [{covered(right)}, {min(covered(got), Tq)}), which see none of its keys"
    return f"key tile {start_n}: last_row {got}, the kernel's {right} (the same query tiles, not the same number)"


def _bound_value(function: str, value) -> int:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise Mismatch(f"{function} returned {value!r}, not an int: a key or row number (// divides to an int)")
    return int(value)


def check_document_tile_bounds(module: ModuleType, device: str) -> None:
    """Both functions on every tile of every case, against the brute-force count; each (case, function) one row of
    the report, its error the largest distance (in keys or rows) from the count's number over the tiles."""
    for Tq, Tk, block_m, block_n, lengths in _document_tile_cases():
        ids, doc_start, doc_end = _ids_and_bounds(Tk, lengths)
        truth = _document_tile_truth(Tq, Tk, block_m, block_n, ids)
        shape = f"Tq {Tq}, Tk {Tk}, tiles {block_m} x {block_n}, documents {'+'.join(map(str, lengths))}"
        outputs = [
            ("first_key (forward, dQ)", "first_key", "forward_first_key",
             lambda m: module.forward_first_key(m, Tq, Tk, block_m, block_n, doc_start.copy()),
             _first_key_variants(Tq, Tk, block_m, block_n, doc_start),
             lambda m, got: _first_key_problem(m, got, truth, block_n)),
            ("last_row (dK/dV)", "last_row", "dkdv_last_row",
             lambda n: module.dkdv_last_row(n, Tq, Tk, block_m, block_n, doc_end.copy()),
             _last_row_variants(Tq, Tk, block_m, block_n, doc_end),
             lambda n, got: _last_row_problem(n, got, truth, Tq, block_m)),
        ]
        for what, key, function, call, variants, problem in outputs:
            right = truth[key]
            got = [_bound_value(function, call(tile)) for tile in range(len(right))]
            wrong = [tile for tile in range(len(right)) if got[tile] != right[tile]]
            err = max(abs(g - r) for g, r in zip(got, right))
            result = Result(what, shape + (f": {problem(wrong[0], got[wrong[0]])}" if wrong else ""), torch.int64,
                            "the bounds a brute-force count over every (query, key) pair gives", float(err), 0.0)
            if wrong:
                answers = {name: [f(tile) for tile in range(len(right))] for name, f in variants.items()}
                result.variants = {name: 0.0 if answer == got else math.inf for name, answer in answers.items()
                                   if answer != right}
            if not record(result) and wrong:
                raise Mismatch(f"{what} differs from {result.against}: {result.case}")
