"""`python -m kernels.explain`: watch a kernel's schedule on a problem small enough to read.

    python -m kernels.explain attention --T 10                      which tiles each program of the forward, dK/dV
                                                                    and dQ kernels visits, and the forward's running
                                                                    max m and sum l at every step
    python -m kernels.explain attention --T 12 --Tq 5 --block-m 4 --block-n 8
    python -m kernels.explain layer_norm --rows 6 --groups 4        the backward's row groups, each step's statistics

Everything printed comes from ``kernels/tiled.py``, the kernels' loops written in PyTorch, run on small random
inputs with a fixed seed: the tile grids from the very bound functions those loops use, the numbers from running
them. Nothing here needs Triton or a GPU.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from . import tiled
from .cli import run_cli
from .definitions import causal_attention_math, layer_norm_math

MAX_T = 256  # more than this and the grids no longer fit a terminal
MAX_ROWS = 64
MAX_WIDTH = 64
SEEDS = range(-2**63, 2**64)  # what torch.Generator.manual_seed takes
GRID_MARKS = {0: ".", 1: "o", 2: "#"}  # skipped, visited without mask, visited with the causal mask


def _fmt(values: torch.Tensor) -> str:
    return "[" + " ".join(f"{v:7.3f}" for v in values.tolist()) + "]"


def _span(first: int, end: int) -> str:
    """Rows or keys [first, end) for people: "4-7", "9", or "none"."""
    if end <= first:
        return "none"
    return f"{first}" if end - first == 1 else f"{first}-{end - 1}"


def _tiles(first: int, end: int, block: int) -> str:
    """The tiles [first, end) covers, by index."""
    indices = list(range(first // block, math.ceil(end / block))) if end > first else []
    return ", ".join(str(i) for i in indices) if indices else "none"


def _print_grid(grid, block_m: int, block_n: int, Tq: int, Tk: int) -> None:
    print("    query tile \\ key tile " + " ".join(f"{j:>2}" for j in range(grid.shape[1])))
    for i, row in enumerate(grid):
        rows = _span(i * block_m, min((i + 1) * block_m, Tq))
        print(f"    {i:>2} (rows {rows:>7})      " + " ".join(f"{GRID_MARKS[int(c)]:>2}" for c in row))
    counts = [int((grid == value).sum()) for value in (1, 2, 0)]
    print(f"    {counts[0]} tiles without mask, {counts[1]} with the causal mask, {counts[2]} skipped "
          f"(o = no mask, # = masked, . = skipped)")


# ----------------------------------------------------------------------------------------------------------------
# Attention


def explain_attention(T: int, Tq: int, block_m: int, block_n: int, D: int, seed: int, dropout_p: float) -> None:
    Tk, offset = T, T - Tq
    sees = f"0..{offset}+i" if offset else "0..i"
    print(f"Causal attention: Tq={Tq} queries at positions {_span(offset, Tk)} against Tk={Tk} keys; query row i "
          f"sees keys {sees}.")
    print(f"Tiles: BLOCK_M={block_m} query rows, BLOCK_N={block_n} keys (kernels/tiled.py mirrors "
          f"kernels/attention.py).\n")

    print("forward (_attention_fwd): one program per query tile; it walks the key tiles [0, lo) without mask, then")
    print("the diagonal band [lo, hi) with it (forward_key_bounds)")
    for start_m in range(math.ceil(Tq / block_m)):
        lo, hi = tiled.forward_key_bounds(start_m, Tq, Tk, block_m, block_n)
        rows = _span(start_m * block_m, min((start_m + 1) * block_m, Tq))
        print(f"  start_m={start_m} (rows {rows}): no mask: key tiles {_tiles(0, lo, block_n)}; "
              f"masked: key tiles {_tiles(lo, hi, block_n)}   (lo={lo}, hi={hi})")
    _print_grid(tiled.attention_tile_grid("fwd", Tq, Tk, block_m, block_n), block_m, block_n, Tq, Tk)

    print("\ndK/dV (_attention_bwd_dkdv): one program per key tile; it walks the query rows [lo, mid) with the mask,")
    print("then [mid, Tq) without (dkdv_query_bounds)")
    for start_n in range(math.ceil(Tk / block_n)):
        lo, mid = tiled.dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
        keys = _span(start_n * block_n, min((start_n + 1) * block_n, Tk))
        print(f"  start_n={start_n} (keys {keys}): masked: query tiles {_tiles(lo, min(mid, Tq), block_m)}; "
              f"no mask: query tiles {_tiles(mid, Tq, block_m)}   (lo={lo}, mid={mid})")
    _print_grid(tiled.attention_tile_grid("dkdv", Tq, Tk, block_m, block_n), block_m, block_n, Tq, Tk)

    print("\ndQ (_attention_bwd_dq): one program per query tile, the forward's key tiles and bounds")
    _print_grid(tiled.attention_tile_grid("dq", Tq, Tk, block_m, block_n), block_m, block_n, Tq, Tk)

    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n, D, generator=generator, dtype=torch.float64) for n in (Tq, Tk, Tk))
    trace: list[dict] = []
    o, lse = tiled.attention_forward(q, k, v, block_m, block_n, dropout_p=dropout_p, seed=seed, trace=trace)
    print(f"\nThe forward's online softmax on random q, k, v (D={D}, seed {seed}): after each key tile, every row's")
    print("running max m_i and running sum l_i (base 2: scores are scaled by qk_scale = scale * log2 e)")
    program = None
    for step in trace:
        if (step["bh"], step["start_m"]) != program:  # a new program: its header
            program = (step["bh"], step["start_m"])
            rows = _span(step["start_m"] * block_m, min((step["start_m"] + 1) * block_m, Tq))
            print(f"  program start_m={step['start_m']} (rows {rows})")
        cols = _span(step["start_n"], min(step["start_n"] + block_n, Tk))
        kind = "masked " if step["on_diagonal"] else "no mask"
        print(f"    keys {cols:>7} {kind}  m_i = {_fmt(step['m_i'])}  l_i = {_fmt(step['l_i'])}")
    print("  at the end: O = acc / l_i, LSE = m_i + log2(l_i)")
    keep = None
    if dropout_p > 0.0:
        keep = torch.from_numpy(tiled.dropout_keep_mask(seed, 0, Tk, dropout_p, Tq=Tq))[None, None]
    plain = causal_attention_math(q, k, v, dropout_p=dropout_p, dropout_mask=keep)
    print(f"check: max |tiled forward - softmax(q k^T) v computed whole| = {(o - plain).abs().max().item():.2e}")


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm


def explain_layer_norm(rows: int, width: int, groups: int, block_m: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    weight = 1.0 + 0.1 * torch.randn(width, generator=generator, dtype=torch.float64)
    bias = 0.1 * torch.randn(width, generator=generator, dtype=torch.float64)
    dy = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    print(f"LayerNorm of {rows} rows of width C={width} (random, seed {seed}); kernels/tiled.py mirrors "
          f"kernels/layer_norm.py.\n")

    trace: list[dict] = []
    y, mean, rstd = tiled.layer_norm_forward(x, weight, bias, block_m=block_m, trace=trace)
    print(f"forward (_layer_norm_fwd): one program per {block_m} row(s); each row's statistics in one pass")
    for step in trace:
        print(f"  rows {_span(step['rows'][0], step['rows'][-1] + 1):>7}: mean = {_fmt(step['mean'])}  "
              f"rstd = {_fmt(step['rstd'])}")

    row_groups = tiled.layer_norm_groups(rows, groups, block_m)
    print(f"\nbackward stage 1 (_layer_norm_bwd_dx): {groups} groups asked, {len(row_groups)} used, of "
          f"{len(row_groups[0])} consecutive rows")
    print(f"  (rows per group: a whole number of {block_m}-row loop steps; the last group may be shorter, none is "
          f"empty: layer_norm_groups)")
    trace = []
    dx, dweight, dbias = tiled.layer_norm_backward(dy, x, weight, mean, rstd, n_groups=groups, block_m=block_m,
                                                   trace=trace)
    print("  each group writes dx for its rows and one row of partial sums: dw += dy * xhat, db += dy")
    for step in trace:
        label = f"  group {step['group']} (rows {_span(step['rows'][0], step['rows'][-1] + 1)}): "
        print(f"{label}partial dw = {_fmt(step['partial_dw'])}")
        print(f"{' ' * len(label)}partial db = {_fmt(step['partial_db'])}")
    print(f"backward stage 2 (_layer_norm_bwd_dwdb): sum the {len(row_groups)} partial rows, column by column")
    print(f"  dw = {_fmt(dweight)}")
    print(f"  db = {_fmt(dbias)}")

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
    y_exact = layer_norm_math(xs, ws, bs)
    y_exact.backward(dy)
    errors = [(a - b).abs().max().item() for a, b in ((y, y_exact), (dx, xs.grad), (dweight, ws.grad),
                                                       (dbias, bs.grad))]
    print("check against autograd of the plain formula: max |difference| of y, dx, dw, db = "
          + ", ".join(f"{e:.1e}" for e in errors))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _positive(name: str, value: int, most: int | None = None) -> None:
    if value < 1:
        raise SystemExit(f"error: --{name} must be at least 1, got {value} — pass a positive integer")
    if most is not None and value > most:
        raise SystemExit(f"error: --{name} {value} is more than this printout can show — use at most {most}")


def _check_seed(seed: int) -> None:
    if seed not in SEEDS:
        raise SystemExit(f"error: --seed {seed} does not fit in 64 bits — use a seed from -2**63 to 2**64 - 1, "
                         "e.g. --seed 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernels.explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = parser.add_subparsers(dest="op", required=True, metavar="{attention,layer_norm}")
    attention = ops.add_parser("attention", help="tiles visited by the attention kernels, online softmax steps")
    attention.add_argument("--T", type=int, default=10, help="number of keys Tk (default 10)")
    attention.add_argument("--Tq", type=int, default=None,
                           help="number of queries, the last Tq of the T positions (default T)")
    attention.add_argument("--block-m", type=int, default=4, help="query rows per tile, BLOCK_M (default 4)")
    attention.add_argument("--block-n", type=int, default=2, help="keys per tile, BLOCK_N (default 2)")
    attention.add_argument("--D", type=int, default=4, help="head dimension of the random inputs (default 4)")
    attention.add_argument("--dropout", type=float, default=0.0,
                           help="dropout probability, drawn as the kernel draws it (needs --block-n a multiple of 8)")
    attention.add_argument("--seed", type=int, default=0, help="seed of the random inputs and the dropout")
    layer_norm = ops.add_parser("layer_norm", help="the backward's row groups and every step's statistics")
    layer_norm.add_argument("--rows", type=int, default=6, help="number of rows M (default 6)")
    layer_norm.add_argument("--width", type=int, default=5, help="row width C (default 5)")
    layer_norm.add_argument("--groups", type=int, default=4, help="row groups G asked for (default 4, the "
                            "interpreter's; a GPU uses two per multiprocessor)")
    layer_norm.add_argument("--block-m", type=int, default=1, help="rows per program / loop step (default 1)")
    layer_norm.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check every flag, then print; returns the exit status (see kernels/cli.py)."""
    args = build_parser().parse_args(argv)
    torch.set_printoptions(precision=3)
    _check_seed(args.seed)
    if args.op == "attention":
        Tq = args.T if args.Tq is None else args.Tq
        _check_attention_args(args, Tq)
        return run_cli(lambda: explain_attention(args.T, Tq, args.block_m, args.block_n, args.D, args.seed,
                                                 args.dropout))
    _positive("rows", args.rows, MAX_ROWS)
    _positive("width", args.width, MAX_WIDTH)
    _positive("groups", args.groups)
    _positive("block-m", args.block_m, MAX_ROWS)
    return run_cli(lambda: explain_layer_norm(args.rows, args.width, args.groups, args.block_m, args.seed))


def _check_attention_args(args, Tq: int) -> None:
    _positive("T", args.T, MAX_T)
    _positive("Tq", Tq)
    if Tq > args.T:
        raise SystemExit(f"error: --Tq {Tq} is more than --T {args.T} — the queries are the last Tq of the T "
                         f"positions, so Tq <= T")
    _positive("block-m", args.block_m, MAX_T)
    _positive("block-n", args.block_n, MAX_T)
    _positive("D", args.D, 128)
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"error: --dropout must be in [0, 1), got {args.dropout} — e.g. --dropout 0.1")
    if args.dropout > 0.0 and args.block_n % 8:
        raise SystemExit(f"error: dropout draws 8 keys per Philox call, so --block-n must be a multiple of 8, got "
                         f"{args.block_n} — e.g. --block-n 8")


if __name__ == "__main__":
    sys.exit(main())
