"""`python -m kernels.explain`: watch a kernel's schedule on a problem small enough to read.

    python -m kernels.explain attention --T 10                      which tiles each program of the forward, dK/dV
                                                                    and dQ kernels visits, and the forward's running
                                                                    max m and sum l at every step
    python -m kernels.explain attention --T 12 --Tq 5 --block-m 4 --block-n 8
    python -m kernels.explain attention --dropout 0.25              and under each key tile, every row's kept and
                                                                    dropped keys, with the Philox counters that
                                                                    drew them (bit for bit the kernel's mask)
    python -m kernels.explain attention --docs 3,5,2                packed documents of 3, 5 and 2 tokens (T = 10):
                                                                    the tiles each program skips because no query
                                                                    of its tile sees their keys, and the tiles
                                                                    visited with and without documents
    python -m kernels.explain layer_norm --rows 6 --groups 4        the backward's row groups, each step's statistics

Everything printed comes from ``kernels/tiled.py``, the kernels' loops written in PyTorch, run on small random
inputs with a fixed seed: the tile grids from the very bound functions those loops use, the numbers from running
them. Nothing here needs Triton or a GPU.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap

import numpy as np
import torch

from . import tiled
from .cli import run_cli
from .definitions import causal_attention_math, layer_norm_math

MAX_T = 256  # more than this and the grids no longer fit a terminal
DEFAULT_T = 10
WIDTH = 118  # the prose is wrapped to this
MAX_ROWS = 64
MAX_WIDTH = 64
SEEDS = range(-2**63, 2**64)  # what torch.Generator.manual_seed takes
# tiled.attention_tile_grid's states: skipped, visited without mask, with the causal mask, with the document mask
GRID_MARKS = {tiled.TILE_SKIPPED: ".", tiled.TILE_NO_MASK: "o", tiled.TILE_CAUSAL_MASK: "#",
              tiled.TILE_DOCUMENT_MASK: "d"}
DOCUMENT_SKIPPED_MARK = "-"  # skipped because of the documents: the causal kernel visits it


def _fmt(values: torch.Tensor) -> str:
    # a row that has seen no key of its document yet holds the kernel's floor for the running max, not -inf
    return "[" + " ".join("  -1e30" if v == tiled.MASKED_ROW_MAX else f"{v:7.3f}" for v in values.tolist()) + "]"


def _span(first: int, end: int) -> str:
    """Rows or keys [first, end) for people: "4-7", "9", or "none"."""
    if end <= first:
        return "none"
    return f"{first}" if end - first == 1 else f"{first}-{end - 1}"


def _tiles(first: int, end: int, block: int) -> str:
    """The tiles [first, end) covers, by index."""
    indices = list(range(first // block, math.ceil(end / block))) if end > first else []
    return ", ".join(str(i) for i in indices) if indices else "none"


def grid_marks(grid: np.ndarray, causal: np.ndarray | None = None) -> list[str]:
    """The printed rows of a tile grid: GRID_MARKS, and DOCUMENT_SKIPPED_MARK where a grid with documents skips a
    tile the ``causal`` grid (the same kernel without documents) visits."""
    rows = []
    for i, row in enumerate(grid):
        marks = [GRID_MARKS[int(c)] for c in row]
        if causal is not None:
            marks = [DOCUMENT_SKIPPED_MARK if m == "." and causal[i, j] else m for j, m in enumerate(marks)]
        rows.append(marks)
    return ["".join(marks) for marks in rows]


def _print_grid(grid, block_m: int, block_n: int, Tq: int, Tk: int, causal=None) -> None:
    print("    query tile \\ key tile " + " ".join(f"{j:>2}" for j in range(grid.shape[1])))
    for i, marks in enumerate(grid_marks(grid, causal)):
        rows = _span(i * block_m, min((i + 1) * block_m, Tq))
        print(f"    {i:>2} (rows {rows:>7})      " + " ".join(f"{m:>2}" for m in marks))
    if causal is None:
        counts = [int((grid == value).sum()) for value in (1, 2, 0)]
        print(f"    {counts[0]} tiles without mask, {counts[1]} with the causal mask, {counts[2]} skipped "
              f"(o = no mask, # = masked, . = skipped)")
        return
    visited, visited_causal = int((grid != tiled.TILE_SKIPPED).sum()), int((causal != tiled.TILE_SKIPPED).sum())
    counts = [int((grid == value).sum()) for value in (tiled.TILE_NO_MASK, tiled.TILE_DOCUMENT_MASK,
                                                       tiled.TILE_CAUSAL_MASK)]
    print(f"    visited: {counts[0]} with nothing masked (o), {counts[1]} with pairs masked by document (d), "
          f"{counts[2]} on the diagonal band (#);")
    print(f"    skipped: {visited_causal - visited} because of the documents (-), {grid.size - visited_causal} in the "
          f"future (.). {visited} of {grid.size} visited, {visited_causal} without documents")


# ----------------------------------------------------------------------------------------------------------------
# Attention


def explain_attention(T: int, Tq: int, block_m: int, block_n: int, D: int, seed: int, dropout_p: float,
                      docs: list[int] | None = None) -> None:
    Tk, offset = T, T - Tq
    sees = f"0..{offset}+i" if offset else "0..i"
    print(f"Causal attention: Tq={Tq} queries at positions {_span(offset, Tk)} against Tk={Tk} keys; query row i "
          f"sees keys {sees}.")
    doc_ids = doc_start = doc_end = None
    if docs is not None:
        doc_ids = np.repeat(np.arange(len(docs)), docs)  # (Tk,): 0, 0, ..., 1, 1, ...
        doc_start, doc_end = tiled.document_bounds(doc_ids)
        ends = np.cumsum(docs)
        layout = ", ".join(f"{n}: positions {_span(end - length, end)}" for n, (length, end) in
                           enumerate(zip(docs, ends)))
        print("\n".join(_wrap(f"Documents (--docs {','.join(map(str, docs))}): {layout}; a query sees only the keys "
                              f"of its own document.", "", "  ")))
    print(f"Tiles: BLOCK_M={block_m} query rows, BLOCK_N={block_n} keys (kernels/tiled.py mirrors "
          f"kernels/attention.py).\n")
    causal = {kernel: tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n)
              for kernel in tiled.ATTENTION_KERNELS}
    grids = {kernel: tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n, doc_ids)
             for kernel in tiled.ATTENTION_KERNELS}
    shown = (lambda kernel: causal[kernel]) if docs is not None else (lambda kernel: None)

    if docs is None:
        print("forward (_attention_fwd): one program per query tile; it walks the key tiles [0, lo) without mask, "
              "then")
        print("the diagonal band [lo, hi) with it (forward_key_bounds)")
    else:
        for line in _wrap("forward (_attention_fwd): one program per query tile. No row of the tile sees a key before "
                          "first_key, the start of its first row's document rounded down to a key tile "
                          "(forward_first_key): the key tiles [0, first_key) are skipped; it walks [first_key, lo) "
                          "without the causal mask, then the diagonal band [lo, hi) with it (forward_key_bounds); "
                          "every score it computes is masked by document.", "", ""):
            print(line)
    for start_m in range(math.ceil(Tq / block_m)):
        lo, hi = tiled.forward_key_bounds(start_m, Tq, Tk, block_m, block_n)
        first_key = tiled.forward_first_key(start_m, Tq, Tk, block_m, block_n, doc_start)
        rows = _span(start_m * block_m, min((start_m + 1) * block_m, Tq))
        if docs is None:
            print(f"  start_m={start_m} (rows {rows}): no mask: key tiles {_tiles(0, lo, block_n)}; "
                  f"masked: key tiles {_tiles(lo, hi, block_n)}   (lo={lo}, hi={hi})")
        else:
            print(f"  start_m={start_m} (rows {rows}): key tiles skipped {_tiles(0, first_key, block_n)} | no causal "
                  f"mask {_tiles(first_key, lo, block_n)} | causal mask {_tiles(lo, hi, block_n)}  "
                  f"(first_key={first_key}, lo={lo}, hi={hi})")
    _print_grid(grids["fwd"], block_m, block_n, Tq, Tk, shown("fwd"))

    if docs is None:
        print("\ndK/dV (_attention_bwd_dkdv): one program per key tile; it walks the query rows [lo, mid) with the "
              "mask,")
        print("then [mid, Tq) without (dkdv_query_bounds)")
    else:
        print()
        for line in _wrap("dK/dV (_attention_bwd_dkdv): one program per key tile. No query from last_row on sees a "
                          "key of the tile: last_row is the end of the document of the tile's last key, at least mid "
                          "(dkdv_last_row). It walks the query rows [lo, mid) with the causal mask, then [mid, "
                          "last_row) without (dkdv_query_bounds); the rows from last_row on are skipped; every score "
                          "it computes is masked by document.", "", ""):
            print(line)
    for start_n in range(math.ceil(Tk / block_n)):
        lo, mid = tiled.dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
        last_row = tiled.dkdv_last_row(start_n, Tq, Tk, block_m, block_n, doc_end)
        keys = _span(start_n * block_n, min((start_n + 1) * block_n, Tk))
        if docs is None:
            print(f"  start_n={start_n} (keys {keys}): masked: query tiles {_tiles(lo, min(mid, Tq), block_m)}; "
                  f"no mask: query tiles {_tiles(mid, Tq, block_m)}   (lo={lo}, mid={mid})")
        else:
            skipped_from = math.ceil(max(last_row, mid) / block_m) * block_m  # the loop's first step not taken
            print(f"  start_n={start_n} (keys {keys}): query tiles: causal mask {_tiles(lo, min(mid, Tq), block_m)} | "
                  f"no causal mask {_tiles(mid, last_row, block_m)} | skipped {_tiles(skipped_from, Tq, block_m)}  "
                  f"(lo={lo}, mid={mid}, last_row={last_row})")
    _print_grid(grids["dkdv"], block_m, block_n, Tq, Tk, shown("dkdv"))

    print("\ndQ (_attention_bwd_dq): one program per query tile, the forward's key tiles and bounds")
    _print_grid(grids["dq"], block_m, block_n, Tq, Tk, shown("dq"))
    if docs is not None:
        print("\nTiles visited with these documents / without (tiles_visited): " + ", ".join(
            f"{name} {int((grids[kernel] != 0).sum())} / {int((causal[kernel] != 0).sum())}"
            for kernel, name in zip(tiled.ATTENTION_KERNELS, ("forward", "dK/dV", "dQ"))))

    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n, D, generator=generator, dtype=torch.float64) for n in (Tq, Tk, Tk))
    batch_ids = None if doc_ids is None else torch.from_numpy(doc_ids)[None]  # (1, Tk)
    trace: list[dict] = []
    o, lse = tiled.attention_forward(q, k, v, block_m, block_n, dropout_p=dropout_p, seed=seed, trace=trace,
                                     doc_ids=batch_ids)
    if dropout_p > 0.0:
        _explain_dropout(Tq, Tk, block_m, block_n, seed, dropout_p)
    print(f"\nThe forward's online softmax on random q, k, v (D={D}, seed {seed}): after each key tile, every row's")
    print("running max m_i and running sum l_i (base 2: scores are scaled by qk_scale = scale * log2 e)")
    if docs is not None:
        print("(m_i = -1e30: the row has seen no key of its document yet; the kernel keeps its max at least that,")
        print("so that exp2 of the masked scores gives 0, not NaN)")
    if dropout_p > 0.0:
        hidden = "future or another document" if docs is not None else "future"
        print(f"and under it each row's keep mask on that tile (1 = kept, 0 = dropped, . = {hidden}, masked anyway)")
    program = None
    for step in trace:
        if (step["bh"], step["start_m"]) != program:  # a new program: its header
            program = (step["bh"], step["start_m"])
            rows = _span(step["start_m"] * block_m, min((step["start_m"] + 1) * block_m, Tq))
            print(f"  program start_m={step['start_m']} (rows {rows})")
        cols = _span(step["start_n"], min(step["start_n"] + block_n, Tk))
        kind = "masked " if step["on_diagonal"] else "no mask"
        print(f"    keys {cols:>7} {kind}  m_i = {_fmt(step['m_i'])}  l_i = {_fmt(step['l_i'])}")
        if step["keep"] is not None:
            _print_keep(step, Tq, Tk, doc_ids)
    if dropout_p > 0.0:
        print(f"  at the end: O = acc / l_i / (1 - p) = acc / l_i * {1.0 / (1.0 - dropout_p):.6g} (the kept weights "
              f"rescaled),")
        print("              LSE = m_i + log2(l_i) (l_i summed the weights before dropout)")
    else:
        print("  at the end: O = acc / l_i, LSE = m_i + log2(l_i)")
    keep = None
    if dropout_p > 0.0:
        keep = torch.from_numpy(tiled.dropout_keep_mask(seed, 0, Tk, dropout_p, Tq=Tq))[None, None]
    plain = causal_attention_math(q, k, v, dropout_p=dropout_p, dropout_mask=keep, doc_ids=batch_ids)
    what = "causal mask" if docs is None else "causal mask, documents"
    if dropout_p > 0.0:
        what += ", the same dropout mask, / (1 - p)"
    print(f"check: max |O of the tiled loop - O of the float64 math ({what})| = "
          f"{(o - plain).abs().max().item():.2e}")
    for line in _check_lines(dropout_p, docs is not None):
        print(line)


def _check_lines(dropout_p: float, documents: bool = False) -> list[str]:
    """What the check compares, under its line: the tiled loop against the whole-matrix float64 math."""
    math_words = "softmax(q k^T / sqrt(D), future masked)"
    if documents:
        math_words = "softmax(q k^T / sqrt(D), future and other documents masked)"
    if dropout_p > 0.0:
        math_words += (f" * keep / (1 - p) @ v, keep the Philox mask above (dropped weights 0, kept ones "
                       f"/ {1.0 - dropout_p:.6g})")
    else:
        math_words += " @ v"
    return ["  the tiled loop: attention_forward of kernels/tiled.py (the kernel's loop), run in float64 here",
            *_wrap(f"the float64 math: causal_attention_math of kernels/definitions.py, computed whole: {math_words}",
                   "  ", "    ")]


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, width=WIDTH, initial_indent=first, subsequent_indent=rest)


def _explain_dropout(Tq: int, Tk: int, block_m: int, block_n: int, seed: int, dropout_p: float) -> None:
    """The rules the keep mask is drawn by: the Philox key and counter, the 8 keys a call serves, the threshold,
    the calls a tile takes and the rescale (the "Dropout" section of kernels/attention.py's docstring)."""
    layout = ", ".join(f"w{word} {'high' if half else 'low'}" for word, half in tiled.PHILOX_KEY_LAYOUT)
    calls = block_m * block_n // 8
    position = f"{Tk - Tq} + i" if Tk > Tq else "i"
    print(f"\nDropout p = {dropout_p:g}, drawn as the kernels draw it (kernels/attention.py, \"Dropout\"; "
          f"kernels/tiled.py rebuilds")
    print("the mask bit for bit). The weight of query row i, at position a, on key j takes 16 bits of one Philox call")
    print(f"  tl.randint4x(seed + bh * 2^32, a * Tk + 8 * (j // 8))   here: a = {position}, "
          f"Tk = {Tk}, seed {seed}, bh = 0")
    paragraphs = [
        f"One call's four 32-bit words serve the 8 keys 8g .. 8g+7 of a group, 16 bits each, in the order {layout}. "
        f"A key is kept when its draw >= round(p * 2^16) = {tiled.dropout_threshold(dropout_p)}: dropped with "
        f"probability p to within 2^-17.",
        f"One call per row per 8 keys: a BLOCK_M x BLOCK_N tile takes BLOCK_M * BLOCK_N / 8 = {block_m} * {block_n}"
        f" / 8 = {calls} Philox call{'s' if calls != 1 else ''}, in the forward and again in each backward kernel "
        f"(the mask is redrawn, never stored).",
        f"A dropped weight is left out of acc only: l_i still sums every weight (so does the LSE), and O is "
        f"rescaled once, at the end, by 1 / (1 - p) = {1.0 / (1.0 - dropout_p):.6g}.",
    ]
    for paragraph in paragraphs:
        print("\n".join(_wrap(paragraph, "  ", "    ")))


def _print_keep(step: dict, Tq: int, Tk: int, doc_ids: np.ndarray | None = None) -> None:
    """One line per row of a forward step's tile: its position a, its Philox counters (one per 8 keys), which keys
    it keeps and which it drops. Keys in the row's future (or, with ``doc_ids``, in another document) are masked
    whatever the draw: shown as '.'."""
    cols = step["cols"].tolist()
    groups = sorted({8 * (j // 8) for j in cols})
    label = "counter" if len(groups) == 1 else "counters"
    lines = []
    for a, keep in zip(step["q_pos"].tolist(), step["keep"].tolist()):
        counters = ", ".join(str(a * Tk + g) for g in groups)
        marks = ["." if j > a or (doc_ids is not None and doc_ids[j] != doc_ids[a]) else "1" if kept else "0"
                 for j, kept in zip(cols, keep)]
        pattern = " ".join("".join(marks[n:n + 8]) for n in range(0, len(marks), 8))
        dropped = ", ".join(str(j) for j, mark in zip(cols, marks) if mark == "0") or "none"
        lines.append((a, counters, pattern, dropped))
    row_w, pos_w = len(str(Tq - 1)), len(str(Tk - 1))
    counters_w = max(len(counters) for _, counters, _, _ in lines)
    for a, counters, pattern, dropped in lines:
        print(f"      row {a - (Tk - Tq):>{row_w}} (a = {a:>{pos_w}})  {label} {counters:<{counters_w}}  "
              f"keep {pattern}  dropped: {dropped}")


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
    attention.add_argument("--T", type=int, default=None,
                           help="number of keys Tk (default 10, or the sum of the --docs lengths)")
    attention.add_argument("--Tq", type=int, default=None,
                           help="number of queries, the last Tq of the T positions (default T)")
    attention.add_argument("--block-m", type=int, default=4, help="query rows per tile, BLOCK_M (default 4)")
    attention.add_argument("--block-n", type=int, default=None,
                           help="keys per tile, BLOCK_N (default 2; 8 with --dropout)")
    attention.add_argument("--D", type=int, default=4, help="head dimension of the random inputs (default 4)")
    attention.add_argument("--dropout", type=float, default=0.0,
                           help="dropout probability, drawn as the kernel draws it; prints each row's kept and "
                           "dropped keys (needs --block-n a multiple of 8)")
    attention.add_argument("--seed", type=int, default=0, help="seed of the random inputs and the dropout")
    attention.add_argument("--docs", default=None, metavar="LENGTHS",
                           help="packed documents: their lengths in order, e.g. 3,5,2 (they sum to T); shows the "
                           "tiles each program skips because of them")
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
        docs = None if args.docs is None else parse_docs(args.docs, args.T)
        if args.T is None:
            args.T = DEFAULT_T if docs is None else sum(docs)
        Tq = args.T if args.Tq is None else args.Tq
        if args.block_n is None:
            args.block_n = 8 if args.dropout > 0.0 else 2  # dropout draws 8 keys per Philox call
        _check_attention_args(args, Tq)
        return run_cli(lambda: explain_attention(args.T, Tq, args.block_m, args.block_n, args.D, args.seed,
                                                 args.dropout, docs))
    _positive("rows", args.rows, MAX_ROWS)
    _positive("width", args.width, MAX_WIDTH)
    _positive("groups", args.groups)
    _positive("block-m", args.block_m, MAX_ROWS)
    return run_cli(lambda: explain_layer_norm(args.rows, args.width, args.groups, args.block_m, args.seed))


def parse_docs(text: str, T: int | None) -> list[int]:
    """--docs "3,5,2" -> [3, 5, 2]: positive integers, summing to T when --T is given (else T is their sum)."""
    example = "e.g. --docs 3,5,2 for documents of 3, 5 and 2 tokens"
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise SystemExit(f"error: --docs is empty — give the documents' lengths separated by commas, {example}")
    lengths = []
    for part in parts:
        try:
            lengths.append(int(part))
        except ValueError:
            raise SystemExit(f"error: --docs {text}: {part!r} is not a whole number — give the documents' lengths "
                             f"as integers separated by commas, {example}") from None
    if min(lengths) < 1:
        raise SystemExit(f"error: --docs {text}: a document has {min(lengths)} tokens — every length must be at "
                         f"least 1, {example}")
    if T is None and sum(lengths) > MAX_T:
        raise SystemExit(f"error: --docs {text} covers {sum(lengths)} positions, more than this printout can show — "
                         f"use lengths summing to at most {MAX_T}")
    if T is not None and sum(lengths) != T:
        raise SystemExit(f"error: --docs {text} covers {sum(lengths)} positions but --T is {T} — make the lengths "
                         f"sum to T, or leave --T out (it defaults to their sum)")
    return lengths


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
