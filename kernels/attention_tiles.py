"""The tile sizes the attention kernels (kernels/attention.py) launch with, and how one is chosen.

A tile is (BLOCK_M, BLOCK_N, num_warps, num_stages): how many query and key rows a program holds at once, how many
warps run it, and how deep Triton pipelines its loads. Bigger tiles reuse each load more but need more registers
and shared memory; past the chip's registers the compiler spills to local memory and the kernel slows down. The
best choice depends on the GPU and on the compiler's version, so on a GPU each kernel has a short list of
candidates and a TileTuner (kernels/launch.py) times them on the first call of each problem class. Under Triton's
interpreter speed comes from few, large programs instead, so it has tiles of its own.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .launch import TileTuner, is_interpreting, triton_next_power_of_2

MIN_BLOCK_D = 16  # tl.dot needs every tile dimension >= 16; smaller head dims are padded (masked) up to 16


class Tiles(NamedTuple):
    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # key rows per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V (or Q/dO) loads


# (dtype group, head dims) -> candidate tiles for each kernel (BLOCK_M, BLOCK_N, num_warps, num_stages). The first
# candidate of each list is the default: it compiles for sm_80 and sm_90 with no register spills, within shared
# memory, with and without dropout, under the Triton versions we support (`python -m kernels.compile_check`). On a
# GPU the others are timed against it on the first call of each problem class and the fastest is kept (TileTuner
# in kernels/launch.py); they may spill on some chip or with dropout, and then they simply lose.
# 16-bit inputs use tensor cores. The Philox draws of dropout are what limit the tiles most (4 warps at (128, 64)
# spill with dropout, 8 do not). float32 inputs run full-precision ("ieee") FMA dots, rare in practice; their
# registers grow fast with the tile, hence the small tiles and no alternatives. The forward and dQ kernels hold a
# query tile and stream keys (BLOCK_N divides BLOCK_M); dK/dV holds a key tile and streams queries (BLOCK_M divides
# BLOCK_N).
GPU_TILES = {
    ("16bit", "D<=64"): dict(
        fwd=(Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 3), Tiles(64, 64, 4, 3)),
        dkdv=(Tiles(16, 128, 8, 2), Tiles(32, 128, 8, 2), Tiles(32, 64, 8, 1)),
        dq=(Tiles(128, 32, 8, 2), Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 3)),
    ),
    ("16bit", "D=128"): dict(
        fwd=(Tiles(128, 32, 8, 3), Tiles(128, 64, 8, 3), Tiles(64, 64, 4, 3)),
        dkdv=(Tiles(16, 64, 8, 2), Tiles(32, 64, 8, 2), Tiles(16, 128, 8, 2)),
        dq=(Tiles(128, 32, 8, 2), Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 3)),
    ),
    ("fp32", "D<=64"): dict(fwd=(Tiles(32, 16, 8, 2),), dkdv=(Tiles(16, 32, 8, 1),), dq=(Tiles(32, 16, 8, 2),)),
    ("fp32", "D=128"): dict(fwd=(Tiles(32, 16, 8, 2),), dkdv=(Tiles(16, 16, 4, 2),), dq=(Tiles(32, 16, 8, 2),)),
}
PREPROCESS_TILES = Tiles(64, 0, 4, 1)  # the delta pass: BLOCK_M rows of (o, dO) per program
# The interpreter runs each program as Python, milliseconds per program and loop step whatever the tiles, while
# NumPy does a (64, 64) tile in microseconds: so there the tiles are square, T rounded up to a power of two, at most
# 64. Tests set INTERPRETER_TILES to small tiles shaped like the GPU's (one side twice the other), so that short
# sequences also walk several tiles and the diagonal band in several steps.
INTERPRETER_MAX_BLOCK = 64
INTERPRETER_TILES: dict[str, Tiles] | None = None  # None: square tiles from T (above); else this table


def _interpreter_tiles(seq_len: int) -> dict[str, tuple[Tiles, ...]]:
    if INTERPRETER_TILES is not None:
        return {kernel: (tiles,) for kernel, tiles in INTERPRETER_TILES.items()}
    block = min(INTERPRETER_MAX_BLOCK, max(MIN_BLOCK_D, triton_next_power_of_2(seq_len)))  # tl.dot needs >= 16
    tiles = Tiles(block, block, 1, 1)
    return dict(fwd=(tiles,), dkdv=(tiles,), dq=(tiles,))


def tiles_for(dtype: torch.dtype, head_dim: int, seq_len: int,
              interpreting: bool | None = None) -> dict[str, tuple[Tiles, ...]]:
    """Each kernel's candidate tiles for inputs of ``dtype``, ``head_dim`` and sequence length ``seq_len`` (read
    by the interpreter); the first is the default."""
    if is_interpreting() if interpreting is None else interpreting:
        return _interpreter_tiles(seq_len)
    return GPU_TILES[("fp32" if dtype == torch.float32 else "16bit", "D<=64" if head_dim <= 64 else "D=128")]


TUNERS = {kernel: TileTuner(f"attention_{kernel}") for kernel in ("fwd", "dkdv", "dq")}


def choose_tiles(kernel: str, q: torch.Tensor, dropout_p: float, run) -> Tiles:
    """The tiles to launch ``kernel`` with on inputs like ``q`` (B, H, T, D): the default, or the tuner's pick for
    this problem class (device, dtype, D, dropout or not, and T and B * H rounded up to powers of two)."""
    B, H, T, D = q.shape
    candidates = tiles_for(q.dtype, D, T)[kernel]
    key = (str(q.device), q.dtype, D, dropout_p > 0.0, triton_next_power_of_2(T), triton_next_power_of_2(B * H))
    return TUNERS[kernel].choose(key, candidates, run)


def tuning_report() -> list[str]:
    """What the tile tuners chose in this process, one line per kernel and problem class."""
    return [line for tuner in TUNERS.values() for line in tuner.report()]
