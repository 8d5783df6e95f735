"""The tile sizes the attention kernels (kernels/attention.py) launch with, and how one is chosen.

A tile is (BLOCK_M, BLOCK_N, num_warps, num_stages): how many query and key rows a program holds at once, how many
warps run it, and how deep Triton pipelines its loads. Bigger tiles reuse each load more but need more registers
and shared memory; past the chip's registers the compiler spills to local memory and the kernel slows down. The
best choice depends on the GPU and on the compiler's version, so on a GPU each kernel has a short list of
candidates and a TileTuner (kernels/launch.py) times them on the first call of each problem class. Under Triton's
interpreter speed comes from few, large programs instead, so it has tiles of its own.

A few queries against many keys (a decoding step: Tq = 1, or a short chunk of a prompt) have tiles of their own:
a 128-row query tile would be almost all padding there, so they hold 16 query rows (the smallest tile tl.dot
takes) and stream the keys in longer steps.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .launch import TileTuner, is_interpreting, triton_next_power_of_2

MIN_BLOCK_D = 16  # tl.dot needs every tile dimension >= 16; smaller head dims are padded (masked) up to 16


def block_d(head_dim: int) -> int:
    """The head dim as the kernels tile it: padded to a power of two, at least MIN_BLOCK_D."""
    return max(MIN_BLOCK_D, triton_next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of ``dtype``."""
    # Default tl.dot on float32 is tf32 (10-bit mantissa), worse than torch's float32 attention; "ieee" multiplies
    # at full float32 precision (not exactly: float32 products still round). For 16-bit inputs it is ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


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
# query tile and stream keys (BLOCK_N divides BLOCK_M, so that with Tq == Tk the diagonal band starts on a key
# tile); dK/dV holds a key tile and streams queries (BLOCK_M divides BLOCK_N).
GPU_TILES = {
    ("16bit", "D<=64"): dict(
        fwd=(Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 3), Tiles(64, 64, 4, 3)),
        dkdv=(Tiles(16, 128, 8, 2), Tiles(32, 128, 8, 2), Tiles(32, 64, 8, 1)),
        dq=(Tiles(128, 32, 8, 2), Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 3)),
    ),
    ("16bit", "D=128"): dict(
        fwd=(Tiles(128, 32, 8, 3), Tiles(128, 64, 8, 3), Tiles(64, 64, 4, 3)),
        dkdv=(Tiles(16, 64, 8, 2), Tiles(32, 64, 8, 2), Tiles(16, 128, 8, 2)),
        # dQ at D = 128 holds a (BLOCK_M, 128) tile each of q, dO and the dQ accumulator: with dropout's draws on
        # top, 128 query rows at 8 warps sit at the chip's per-thread register limit (255) on sm_80 and spill with
        # some compiler versions, so the default halves the query tile; the 128-row tile stays a candidate.
        dq=(Tiles(64, 32, 8, 2), Tiles(128, 32, 8, 2), Tiles(64, 32, 4, 3)),
    ),
    ("fp32", "D<=64"): dict(fwd=(Tiles(32, 16, 8, 2),), dkdv=(Tiles(16, 32, 8, 1),), dq=(Tiles(32, 16, 8, 2),)),
    # float32 at D = 128, forward: one stage. With packed documents and dropout, two stages spill on sm_90 under
    # triton 3.6 (16 bytes at the 80 registers it allots them); one stage compiles clean everywhere (89 registers).
    # Float32 attention is the rare path (training runs in bf16); its speed is not measured yet.
    ("fp32", "D=128"): dict(fwd=(Tiles(32, 16, 8, 1),), dkdv=(Tiles(16, 16, 4, 2),), dq=(Tiles(32, 16, 8, 2),)),
}
PREPROCESS_TILES = Tiles(64, 0, 4, 1)  # the delta pass: BLOCK_M rows of (o, dO) per program

# Few queries (Tq <= SMALL_Q_MAX, a decoding step above all): the forward and dQ kernels hold one 16-row query tile
# and stream the keys BLOCK_N at a time. A decoding step reads all of K and V once and does about one FLOP per byte
# read, far below what the tensor cores could use (see "Decoding" in kernels/attention.py): what matters is keeping
# enough K/V loads in flight (the key step times the pipeline's depth), hence long key steps or deep pipelines.
# With one 16-row query tile, a tile's registers are shared by few rows, so most defaults here run 8 warps: the
# same tile spread over twice the threads, which keeps the score tile, dropout's Philox draws and the loads in
# flight clear of spills. The dK/dV kernel already steps through 16 query rows at a time: its tiles stay the usual
# ones. The first candidate is the default, as in GPU_TILES (spill-free everywhere); the others may spill.
SMALL_Q_MAX = 16
SMALL_Q_TILES = {
    # A 128-key step at 4 warps leaves each thread a quarter of the (16, 128) score tile plus the pipelined loads,
    # right at the register budget the compiler gives 4 warps: it spills with some compiler versions. 8 warps
    # halve that share at the same step, and 2 stages keep 256 keys in flight, as many as the candidate
    # (16, 64, 4, 4) does with a shorter step and a deeper pipeline.
    ("16bit", "D<=64"): dict(fwd=(Tiles(16, 128, 8, 2), Tiles(16, 64, 4, 4), Tiles(16, 128, 4, 3)),
                             dq=(Tiles(16, 64, 8, 2),)),
    # At D = 128 (and 80, padded to 128) a 64-key step already fills the registers of 4 or of 8 warps once dropout's
    # draws or the padded head dim's masks join in; 32-key steps at 8 warps stay clear, and 3 stages keep 96 keys
    # of K and V in flight. The 64- and 128-key steps remain candidates for the tuner.
    ("16bit", "D=128"): dict(fwd=(Tiles(16, 32, 8, 3), Tiles(16, 64, 4, 3), Tiles(16, 128, 4, 2)),
                             dq=(Tiles(16, 64, 8, 2),)),
    ("fp32", "D<=64"): dict(fwd=(Tiles(16, 32, 8, 2),), dq=(Tiles(16, 32, 8, 2),)),
    # float32 at D = 128: (16, 32) with dropout is at the register budget of 8 warps; 16-key steps stay clear
    ("fp32", "D=128"): dict(fwd=(Tiles(16, 16, 8, 2),), dq=(Tiles(16, 32, 8, 2),)),
}

# The interpreter runs each program as Python, milliseconds per program and loop step whatever the tiles, while
# NumPy does a (128, 128) tile in microseconds: so there the tiles are as large as the sequence, Tq and Tk each
# rounded up to a power of two between 16 (tl.dot's smallest) and 128 (at the tiny preset's T = 128, one program a
# head where (64, 64) tiles took two). One limit more: the interpreter's tl.dot is NumPy's matmul, and NumPy's BLAS
# (OpenBLAS) splits a product of more than 2^18 multiply-adds across threads; one small product at a time, amid
# the Python of the interpreter, gains nothing from that, and on a machine whose cores are busy with other work each
# split product can wait for a free core (benchmarks/NOTES.md, "The interpreter's step"). So the side a kernel streams
# (the keys of the forward and dQ, the queries of dK/dV) takes steps short enough that BLOCK_M * BLOCK_N * BLOCK_D
# stays within INTERPRETER_MAX_DOT: at T = 128 and D = 32, (128, 64) tiles for the forward and dQ, (64, 128) for
# dK/dV, two loop steps a program. One 16-row query tile for a decoding step. Tests set INTERPRETER_TILES to small
# tiles shaped like the GPU's (one side twice the other), so that short sequences also walk several tiles and the
# diagonal band in several steps.
INTERPRETER_MAX_BLOCK = 128
INTERPRETER_MAX_DOT = 1 << 18  # multiply-adds of one tile product: at most OpenBLAS's one-thread size (64^3)
INTERPRETER_TILES: dict[str, Tiles] | None = None  # None: tiles from Tq, Tk and D (above); else this table


def _interpreter_tiles(head_dim: int, q_len: int, k_len: int) -> dict[str, tuple[Tiles, ...]]:
    if INTERPRETER_TILES is not None:
        return {kernel: (tiles,) for kernel, tiles in INTERPRETER_TILES.items()}
    block_m, block_n = (min(INTERPRETER_MAX_BLOCK, max(MIN_BLOCK_D, triton_next_power_of_2(n))) for n in (q_len, k_len))

    def step(held: int, streamed: int) -> int:  # the streamed side, halved until a tile product fits
        while held * streamed * block_d(head_dim) > INTERPRETER_MAX_DOT and streamed > MIN_BLOCK_D:
            streamed //= 2
        return streamed

    query_tile = Tiles(block_m, step(block_m, block_n), 1, 1)  # holds queries, streams keys
    key_tile = Tiles(step(block_n, block_m), block_n, 1, 1)  # holds keys, streams queries
    return dict(fwd=(query_tile,), dkdv=(key_tile,), dq=(query_tile,))


def preprocess_tiles(head_dim: int, q_len: int, k_len: int, interpreting: bool | None = None) -> Tiles:
    """The delta pass's tile: ``PREPROCESS_TILES`` on a GPU; under the interpreter the forward's query tile, so that
    it runs no more programs than the forward."""
    if is_interpreting() if interpreting is None else interpreting:
        return Tiles(_interpreter_tiles(head_dim, q_len, k_len)["fwd"][0].BLOCK_M, 0, 1, 1)
    return PREPROCESS_TILES


def tiles_for(dtype: torch.dtype, head_dim: int, q_len: int, k_len: int,
              interpreting: bool | None = None) -> dict[str, tuple[Tiles, ...]]:
    """Each kernel's candidate tiles for inputs of ``dtype`` and ``head_dim``, with ``q_len`` queries against
    ``k_len`` keys (Tq <= Tk); the first is the default."""
    if is_interpreting() if interpreting is None else interpreting:
        return _interpreter_tiles(head_dim, q_len, k_len)
    group = ("fp32" if dtype == torch.float32 else "16bit", "D<=64" if head_dim <= 64 else "D=128")
    if q_len <= SMALL_Q_MAX:
        return {**GPU_TILES[group], **SMALL_Q_TILES[group]}
    return GPU_TILES[group]


TUNERS = {kernel: TileTuner(f"attention_{kernel}") for kernel in ("fwd", "dkdv", "dq")}


def choose_tiles(kernel: str, q: torch.Tensor, k_len: int, dropout_p: float, run, documents: bool = False) -> Tiles:
    """The tiles to launch ``kernel`` with on queries like ``q`` (B, H, Tq, D) against ``k_len`` keys: the
    default, or the tuner's pick for this problem class (device, dtype, D, dropout or not, packed documents or not,
    and Tq, Tk and B * H rounded up to powers of two). Documents are a class of their own: a kernel that skips most
    key tiles is a different problem from the one that visits them all, and may want other tiles."""
    B, H, Tq, D = q.shape
    candidates = tiles_for(q.dtype, D, Tq, k_len)[kernel]
    key = (str(q.device), q.dtype, D, dropout_p > 0.0, documents, triton_next_power_of_2(Tq),
           triton_next_power_of_2(k_len), triton_next_power_of_2(B * H))
    return TUNERS[kernel].choose(key, candidates, run)


def tuning_report() -> list[str]:
    """What the tile tuners chose in this process, one line per kernel and problem class."""
    return [line for tuner in TUNERS.values() for line in tuner.report()]
