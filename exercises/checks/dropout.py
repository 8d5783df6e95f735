"""The check of exercise dropout_keep_mask (lesson 7)."""
from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import torch

from .compare import Mismatch, Result, record

if TYPE_CHECKING:
    import numpy as np


# Attention's dropout keep mask, drawn from Philox. A mask is right or wrong bit for bit, so it is compared entry by
# entry with the real kernels' mask as kernels/tiled.py rebuilds it in NumPy (``dropout_keep_mask``;
# tests/test_tiled.py matches it with the kernel's own), for several tilings of the same problem. A known mistake is
# recognised when the mask is, in every case where that mistake changes anything, exactly the mask the mistake draws
# (computed here in NumPy).

# (seed, heads, Tq, Tk, p, (block_m, block_n)): the same problem under three tilings (a mask that depends on the
# tiles differs between them), a chunk of queries (Tq < Tk: the last 5 of 45 positions), a decoding step (Tq = 1),
# tiles that end past the last query and key, seeds up to 2^31 - 2 (the largest attention_seed draws)
DROPOUT_CASES = [(1234, 2, 37, 37, 0.25, (16, 16)), (1234, 2, 37, 37, 0.25, (8, 32)),
                 (1234, 2, 37, 37, 0.25, (32, 8)), (7, 3, 5, 45, 0.1, (16, 16)), (2**31 - 2, 2, 1, 19, 0.5, (16, 8)),
                 (99, 1, 24, 50, 0.75, (8, 16))]
DROPOUT_LAYOUTS = {  # which (word, half) each key of a group of 8 takes: the real order and two others
    "real": ((0, 0), (2, 0), (1, 0), (3, 0), (0, 1), (2, 1), (1, 1), (3, 1)),
    "word by word": ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)),
    "low halves first": ((0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)),
}


def _dropout_draws(key: int, rows, cols, counter: Callable, layout) -> "np.ndarray":
    """The 16-bit draw of each (query row, key) of a (Tq, Tk) grid: Philox called with ``key`` and
    ``counter(rows[:, None], cols[None, :])`` (int64), the key's half taken by ``layout`` (key % 8 -> word, half)."""
    import numpy as np

    from kernels.tiled import philox4x32

    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    counters = np.broadcast_to(counter(rows[:, None], cols[None, :]), (len(rows), len(cols)))
    words = np.stack(philox4x32(key, counters))  # (4, Tq, Tk)
    word, half = np.array(layout)[cols % 8].T
    picked = np.take_along_axis(words, np.broadcast_to(word, counters.shape)[None], axis=0)[0]
    return (picked >> (16 * half).astype(np.uint32)) & np.uint32(0xFFFF)


def _dropout_variants(seed: int, bh: int, Tq: int, Tk: int, p: float, block_m: int,
                      block_n: int) -> dict[str, "np.ndarray"]:
    """Known wrong keep masks of the (Tq, Tk) grid of batch-head ``bh``, in NumPy, each with one mistake."""
    import numpy as np

    from kernels.tiled import dropout_threshold

    rows, cols = np.arange(Tq), np.arange(Tk)  # row i is the query at position a = (Tk - Tq) + i
    key, threshold, real = seed + (bh << 32), dropout_threshold(p), DROPOUT_LAYOUTS["real"]

    def counter(a, j):
        return a * Tk + 8 * (j // 8)

    def draws(key=key, counter=counter, layout=real):
        return _dropout_draws(key, rows, cols, lambda i, j: counter(Tk - Tq + i, j), layout)

    def by_position(count):  # count(a, j, i): the counter of the query at position a, row i, on key j
        return lambda a, j: count(a, j, a - (Tk - Tq))

    right = draws()
    return {
        "a counter with the keys counted from the tile's first (first_key left out): the counter takes the key's "
        "position in the whole row, j, so that the mask does not depend on the tiling": draws(
            counter=lambda a, j: a * Tk + 8 * (j % block_n // 8)) >= threshold,
        "a counter with the queries counted from the tile's first (tl.arange where rows belongs): the counter takes "
        "the query's position a, so that the mask does not depend on the tiling": draws(
            counter=by_position(lambda a, j, i: i % block_m * Tk + 8 * (j // 8))) >= threshold,
        "a counter local to the tile (queries and keys counted from its first): every tile draws the same mask": draws(
            counter=by_position(lambda a, j, i: i % block_m * Tk + 8 * (j % block_n // 8))) >= threshold,
        "a counter with the query and the key swapped, 8 (j // 8) * T + a: it is a * T + 8 (j // 8)": draws(
            counter=lambda a, j: 8 * (j // 8) * Tk + a) >= threshold,
        "a key without the (batch, head) index: every head draws the same mask; the key is seed + (bh << 32)":
            draws(key=seed) >= threshold,
        "the key (seed + bh) << 32: + binds tighter than <<, so write seed + (bh << 32)":
            draws(key=(seed + bh) << 32) >= threshold,
        "the key seed + bh: then (seed, bh) and (seed + 1, bh - 1) draw one mask; bh goes to the high word, "
        "seed + (bh << 32)": draws(key=seed + bh) >= threshold,
        "the 16-bit halves given to the 8 keys of a group in another order (w0 low, w0 high, w1 low, ...): the "
        "order is w0 low, w2 low, w1 low, w3 low, w0 high, w2 high, w1 high, w3 high":
            draws(layout=DROPOUT_LAYOUTS["word by word"]) >= threshold,
        "the 16-bit halves given to the 8 keys of a group in another order (w0 low, w1 low, w2 low, ...): the "
        "order is w0 low, w2 low, w1 low, w3 low, w0 high, w2 high, w1 high, w3 high":
            draws(layout=DROPOUT_LAYOUTS["low halves first"]) >= threshold,
        "kept where the draw is below the threshold: that keeps a share p and drops 1 - p; keep draw >= threshold":
            right < threshold,
        "kept where the draw is above the threshold: keep draw >= threshold (a draw equal to it is kept)":
            right > threshold,
        "a threshold p * 2^16 cut to an integer, not rounded: add 0.5 before the cast": right >= int(
            np.float32(p) * np.float32(65536.0)),
        "the 16-bit draw compared with p itself: the threshold is on the draws' scale, round(p * 2^16)":
            right >= np.float32(p),
    }


def _dropout_threshold_cases() -> list[tuple]:
    """Two cases whose p puts the threshold on a draw of the mask: p = d / 2^16 for a draw d of the grid, where
    draw >= threshold and draw > threshold differ; and p = (d + 0.6) / 2^16, whose p * 2^16 rounds to d + 1 but
    is cut to d."""
    seed, heads, Tq, Tk, tiles = 5, 1, 16, 24, (16, 8)
    d = int(_dropout_draws(seed, [7], [11], lambda i, j: (Tk - Tq + i) * Tk + 8 * (j // 8),
                           DROPOUT_LAYOUTS["real"])[0, 0])
    return [(seed, heads, Tq, Tk, d / 65536, tiles), (seed, heads, Tq, Tk, (d + 0.6) / 65536, tiles)]


def _compare_mask(got: torch.Tensor, exact: torch.Tensor, *, case: str,
                  variants: dict[str, torch.Tensor]) -> None:
    """Record (or, outside run_check, raise on) a keep mask that differs from ``exact`` in any entry. The error is
    the share of entries that differ, none allowed; a wrong variant matches when the mask is that variant's."""
    err = (got != exact).double().mean().item() if got.shape == exact.shape else 1.0
    result = Result("keep mask, share wrong", case, torch.bool,
                    "the real kernel's mask (kernels/tiled.py's Philox in NumPy)", err, 0.0)
    if not result.passed:
        result.variants = {name: 0.0 if torch.equal(got, wrong) else math.inf for name, wrong in variants.items()
                           if not torch.equal(wrong, exact)}
    if not record(result) and not result.passed:
        raise Mismatch(f"the keep mask differs from {result.against} in a share {err:.2g} of its entries ({case})")


def check_dropout_keep_mask(module: ModuleType, device: str) -> None:
    import numpy as np

    from kernels.tiled import dropout_keep_mask

    for seed, heads, Tq, Tk, p, (block_m, block_n) in DROPOUT_CASES + _dropout_threshold_cases():
        got = module.dropout_keep_mask(seed, heads, Tq, Tk, p, block_m=block_m, block_n=block_n, device=device)
        exact = np.stack([dropout_keep_mask(seed, bh, Tk, p, Tq=Tq) for bh in range(heads)])
        wrong: dict[str, list] = {}
        for bh in range(heads):
            for name, mask in _dropout_variants(seed, bh, Tq, Tk, p, block_m, block_n).items():
                wrong.setdefault(name, []).append(mask)
        _compare_mask(got.cpu(), torch.from_numpy(exact),
                      case=f"seed {seed}, {heads} head{'s' * (heads > 1)}, (Tq, Tk) = ({Tq}, {Tk}), p = {p:.6g}, "
                           f"tiles {block_m} x {block_n}",
                      variants={name: torch.from_numpy(np.stack(masks)) for name, masks in wrong.items()})
