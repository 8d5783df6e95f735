r"""``python -m kernels.figures``: the course's pictures, drawn from the kernels' own loop bounds and tile tables.

A picture of a tiling drawn by hand goes stale the day a tile size or a loop bound changes. These are drawn by
code from the very functions and tables the kernels run with, so they are redrawn, not re-drawn, when the kernels
change:

    attention_tile_grid.png            the causal tile grid of the forward and of both backward kernels, T = 512,
                                       the default GPU tiles (kernels/attention_tiles.py); which tiles each kernel
                                       skips, visits without a mask, or visits with the causal mask (the diagonal
                                       band), from kernels/tiled.py's ``attention_tile_grid``, which shares its
                                       loop bounds with the tiled mirror of the kernels
    attention_tile_grid_chunk.png      the same for a chunk: the last Tq = 200 queries against Tk = 512 keys, the
                                       diagonal shifted right and falling across tiles
    attention_tile_grid_docs.png       the forward's grid for one window of T = 1024 packed with five documents,
                                       beside the same window as one sequence: the key tiles skipped because no
                                       query of a tile sees them, and those masked by document
    layer_norm_backward_reduction.png  the LayerNorm backward's two-stage reduction of dw and db, in one
                                       configuration a GPU runs (GPT-2 small's 8192 rows of 768 on 132
                                       multiprocessors): rows cut into G groups (``tiled.layer_norm_groups`` with
                                       the launcher's group count and GPU tile), one (G, C) row of partial sums
                                       per group, then column slices of REDUCE_BLOCK_C summed over the G rows
    attention_dropout_philox.png       which 16-bit half of which of the four 32-bit words of one Philox call each
                                       of the 8 keys of a group draws (``tiled.PHILOX_KEY_LAYOUT``, which
                                       tests/test_tiled.py and tests/test_figures.py check against the kernel)
    causal_mask.png                    lesson 1's causal mask for T = 12, element by element, from
                                       kernels/definitions.py's ``future_mask`` (the definition every kernel is
                                       checked against), and what softmax makes of equal scores under it

Lesson 1's other figure, one head's attention weights in a trained model, needs the model, which this package never
imports: ``python -m minigpt.figures`` draws it (minigpt/figures.py).

Regenerate them all with one command:

    python -m kernels.figures              # writes docs/figures/*.png of this checkout, from any directory
    python -m kernels.figures --out DIR

tests/test_figures.py redraws them into a temporary folder and fails, asking for this command, when the committed
PNGs differ. The output is deterministic: matplotlib's default style with pinned fonts (DejaVu Sans, shipped with
matplotlib), sizes and dpi, and the PNG written by Pillow as 256 colours with no metadata (no "Software" stamp, no
date). matplotlib is imported inside the functions: the kernels never need it.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import tiled
from .cli import run_cli
from .attention_tiles import tiles_for
from .definitions import future_mask
from .layer_norm import GPU_TILE, GROUPS_PER_SM, REDUCE_BLOCK_C, REDUCE_BLOCK_G, backward_tile, row_tile

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"
DPI = 100  # with the sizes below: 1100 px wide, about GitHub's page width at 1:1 when scaled to fit
RC = {  # everything a rendering depends on, pinned (on top of matplotlib's default style)
    "font.family": "DejaVu Sans",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 11,
    "figure.titlesize": 13,
    "path.simplify": False,
}

# The tile grid's states (tiled.attention_tile_grid) and their colours: colour-blind-safe blue, orange and green.
SKIPPED, UNMASKED, MASKED, DOCUMENT_MASKED = (tiled.TILE_SKIPPED, tiled.TILE_NO_MASK, tiled.TILE_CAUSAL_MASK,
                                              tiled.TILE_DOCUMENT_MASK)
TILE_COLORS = {SKIPPED: "#eeeeee", UNMASKED: "#4c78a8", MASKED: "#f58518", DOCUMENT_MASKED: "#54a24b"}
TILE_LABELS = {SKIPPED: "skipped by the loop bounds", UNMASKED: "visited, no mask",
               MASKED: "visited with the causal mask (diagonal band)"}
DOCUMENT_TILE_LABELS = {SKIPPED: "skipped: in the future", UNMASKED: "visited, every pair in one document",
                        MASKED: "diagonal band: causal mask (and document mask)",
                        DOCUMENT_MASKED: "visited, some pairs masked by document"}
DOCUMENT_SKIPPED_LABEL = "skipped because of the documents"
DOCUMENT_SKIPPED_HATCH = "////"
DOCUMENT_EDGE = "#7a3b8f"  # purple: apart from the black of the diagonal and of a program's outline
KERNEL_TITLES = {
    "fwd": "forward\none program per query tile (a row)",
    "dkdv": "backward dK / dV\none program per key tile (a column)",
    "dq": "backward dQ\none program per query tile (a row)",
}
# The attention figures: (file name, Tq, Tk). The tiles are the GPU's defaults for 16-bit inputs with D <= 64.
ATTENTION_FIGURES = (("attention_tile_grid.png", 512, 512), ("attention_tile_grid_chunk.png", 200, 512))
ATTENTION_DTYPE, ATTENTION_HEAD_DIM = torch.float16, 64
# The documents figure: one window of T keys packed with documents of these lengths (short and long ones, some
# boundaries inside a query tile, one document shorter than a tile), drawn for the forward kernel.
DOCUMENTS_FIGURE, DOCUMENTS_T, DOCUMENT_LENGTHS = "attention_tile_grid_docs.png", 1024, (180, 330, 90, 250, 174)
DOCUMENTS_PROGRAM = 3  # the query tile outlined: it starts inside a document and skips two key tiles


def document_ids(lengths) -> np.ndarray:
    """One window's doc_ids, (sum(lengths),): 0, 0, ..., 1, 1, ... for documents of these lengths."""
    return np.repeat(np.arange(len(lengths)), lengths)


# ----------------------------------------------------------------------------------------------------------------
# The data each figure draws (also what tests/test_figures.py checks)


def attention_tiles(Tq: int, Tk: int) -> dict[str, tuple[int, int]]:
    """kernel ("fwd", "dkdv", "dq") -> (BLOCK_M, BLOCK_N): the default GPU tiles for Tq queries against Tk keys
    (the first candidate of each list in kernels/attention_tiles.py), for 16-bit inputs with D <= 64."""
    table = tiles_for(ATTENTION_DTYPE, ATTENTION_HEAD_DIM, Tq, Tk, interpreting=False)
    return {kernel: tuple(table[kernel][0][:2]) for kernel in tiled.ATTENTION_KERNELS}


class LayerNormLayout(NamedTuple):
    n_rows: int  # M
    width: int  # C
    multiprocessors: int  # the GPU's, which sets the number of groups
    n_groups: int  # G asked for; len(groups) may be fewer (no group without rows)
    block_m: int  # rows per stage-1 loop step (BLOCK_M)
    block_c: int  # the row width padded to a power of two (BLOCK_C)
    groups: list[list[int]]  # the rows of each group: each stage-1 program's
    reduce_block_c: int  # columns per stage-2 program
    reduce_block_g: int  # partial rows a stage-2 program adds per step


# One configuration a GPU runs: GPT-2 small's LayerNorm over a batch of 8 sequences of 1024 tokens, in bf16, on a
# GPU with 132 multiprocessors (an H100 SXM or an H200).
LAYER_NORM_ROWS, LAYER_NORM_WIDTH, GPU_MULTIPROCESSORS = 8192, 768, 132


def layer_norm_layout(n_rows: int = LAYER_NORM_ROWS, width: int = LAYER_NORM_WIDTH,
                      multiprocessors: int = GPU_MULTIPROCESSORS) -> LayerNormLayout:
    """The backward's stage-1 programs for ``n_rows`` bf16 rows of ``width`` on a GPU with ``multiprocessors``,
    as ``_layer_norm_backward`` launches them there: G = GROUPS_PER_SM per multiprocessor (at most one a row), the
    GPU's tile (``backward_tile(row_tile(...))``), and the rows of each group (``tiled.layer_norm_groups``)."""
    n_groups = max(1, min(GROUPS_PER_SM * multiprocessors, n_rows))
    tile = backward_tile(row_tile(width, 2, -(-n_rows // n_groups), interpreting=False))
    groups = tiled.layer_norm_groups(n_rows, n_groups, tile.BLOCK_M)
    return LayerNormLayout(n_rows, width, multiprocessors, n_groups, tile.BLOCK_M, tile.BLOCK_C, groups,
                           REDUCE_BLOCK_C, REDUCE_BLOCK_G)


def layer_norm_caption(layout: LayerNormLayout) -> str:
    """The figure's caption: which configuration it draws (width, rows per program, groups), and from where."""
    M, C, G = layout.n_rows, layout.width, len(layout.groups)
    rows_per_group = len(layout.groups[0])
    steps = -(-rows_per_group // layout.block_m)
    return (f"One configuration a GPU runs: M = {M} bf16 rows of C = {C} (GPT-2 small, 8 x 1024 tokens) on "
            f"{layout.multiprocessors} multiprocessors (H100, H200):\n"
            f"G = GROUPS_PER_SM x {layout.multiprocessors} = {layout.n_groups} groups asked, {G} used; "
            f"{rows_per_group} rows per program, in {steps} steps of BLOCK_M = {layout.block_m} rows "
            f"(GPU_TILE / BLOCK_C = {GPU_TILE} / {layout.block_c});\n"
            f"stage 2: REDUCE_BLOCK_C = {layout.reduce_block_c} columns per program, REDUCE_BLOCK_G = "
            f"{layout.reduce_block_g} partial rows a step (kernels/layer_norm.py)")


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def new_figure(width: float, height: float):
    """A figure on the Agg canvas, not registered with pyplot (no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a palette PNG: the drawing has a few hundred colours (mostly anti-aliasing shades), and 256
    of them, picked without dithering, look the same at a third of the size of an RGBA file. No metadata (no
    "Software" stamp): the bytes depend on the drawing alone."""
    from PIL import Image

    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def _tile_ticks(ax, n_tiles: int, block: int, extent: int, axis: str) -> None:
    """Tick marks at tile centres labelled with the tile index, at most about 8 labels."""
    step = max(1, -(-n_tiles // 8))
    index = list(range(0, n_tiles, step))
    centres = [min(i * block + block / 2, (i * block + extent) / 2) for i in index]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(centres, [str(i) for i in index])


def _draw_tile_grid(ax, kernel: str, Tq: int, Tk: int, block_m: int, block_n: int, doc_ids=None,
                    title: str | None = None, program: int | None = None) -> None:
    """One kernel's (query tile, key tile) grid, in positions (tiles at their true size), with the causal
    diagonal and one program's tiles outlined (``program``: its tile index, default the middle one). With
    ``doc_ids`` (one window's, (Tk,)), the tiles skipped because of the documents are hatched and each document's
    triangle of (query, key) pairs is outlined."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Polygon, Rectangle

    grid = tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n, doc_ids)
    causal = tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n)
    cells, colors, hatched = [], [], []
    for i, j in np.ndindex(*grid.shape):  # query tile i, key tile j; the last ones may be cut short
        y0, x0 = i * block_m, j * block_n
        cell = Rectangle((x0, y0), min(block_n, Tk - x0), min(block_m, Tq - y0))
        if grid[i, j] == SKIPPED and causal[i, j] != SKIPPED:
            hatched.append(cell)
        else:
            cells.append(cell)
            colors.append(TILE_COLORS[int(grid[i, j])])
    ax.add_collection(PatchCollection(cells, facecolors=colors, edgecolors="white", linewidths=0.6))
    if hatched:
        ax.add_collection(PatchCollection(hatched, facecolors=TILE_COLORS[SKIPPED], edgecolors="#b0b0b0",
                                          linewidths=0.6, hatch=DOCUMENT_SKIPPED_HATCH))
    offset = Tk - Tq  # query row i sits at position offset + i and sees the keys 0 .. offset + i
    ax.plot([offset, Tk], [0, Tq], color="black", linewidth=1.2, linestyle="--")
    if doc_ids is not None:  # document [s, e): the queries at s .. e - 1 see the keys from s to their own position
        starts, ends = tiled.document_bounds(doc_ids)
        for s, e in sorted(set(zip(starts.tolist(), ends.tolist()))):
            corners = [(s, s - offset), (s, e - offset), (e, e - offset)]
            ax.add_patch(Polygon(corners, closed=True, fill=False, edgecolor=DOCUMENT_EDGE, linewidth=1.0))

    # one program, in the middle of the grid: its tiles outlined, an arrow along its walk
    if kernel == "dkdv":
        j = grid.shape[1] // 2 if program is None else program
        rows = [i for i in range(grid.shape[0]) if grid[i, j]]
        x0, width = j * block_n, min(block_n, Tk - j * block_n)
        y0, y1 = rows[0] * block_m, min((rows[-1] + 1) * block_m, Tq)
        ax.add_patch(Rectangle((x0, y0), width, y1 - y0, fill=False, edgecolor="black", linewidth=2.0))
        ax.annotate("", xy=(x0 + width / 2, y1 - 0.04 * Tq), xytext=(x0 + width / 2, y0 + 0.04 * Tq),
                    arrowprops=dict(arrowstyle="->", color="black", linewidth=1.5))
    else:
        i = grid.shape[0] // 2 if program is None else program
        cols = [j for j in range(grid.shape[1]) if grid[i, j]]
        y0, height = i * block_m, min(block_m, Tq - i * block_m)
        x0, x1 = cols[0] * block_n, min((cols[-1] + 1) * block_n, Tk)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, height, fill=False, edgecolor="black", linewidth=2.0))
        ax.annotate("", xy=(x1 - 0.04 * Tk, y0 + height / 2), xytext=(x0 + 0.04 * Tk, y0 + height / 2),
                    arrowprops=dict(arrowstyle="->", color="black", linewidth=1.5))

    visited, masked = int((grid > 0).sum()), int((grid == MASKED).sum())
    if title is None:
        title = f"{KERNEL_TITLES[kernel]}\n{visited} of {grid.size} tiles visited, {masked} masked"
    ax.set_title(title, fontsize=11)
    ax.set_xlim(0, Tk)
    ax.set_ylim(Tq, 0)  # query 0 at the top, as a matrix is printed
    ax.set_aspect("equal")
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    _tile_ticks(ax, grid.shape[1], block_n, Tk, "x")
    _tile_ticks(ax, grid.shape[0], block_m, Tq, "y")
    ax.set_xlabel(f"key tile ({block_n} keys)")
    ax.set_ylabel(f"query tile\n({block_m} queries)")


def draw_attention_tile_grid(path: Path, Tq: int, Tk: int) -> Path:
    """The three kernels' tile grids side by side for Tq queries (the last Tq positions) against Tk keys."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tiles = attention_tiles(Tq, Tk)
    # laid out in inches, bottom to top: legend, the three panels (true aspect: Tq high, Tk wide), their axis
    # labels and titles, the figure's title
    width, panel_w, legend_h, above_h, title_h = 11.0, 2.9, 0.8, 1.2, 0.6
    panel_h = panel_w * Tq / Tk
    height = legend_h + panel_h + above_h + title_h
    fig = new_figure(width, height)
    for n, kernel in enumerate(tiled.ATTENTION_KERNELS):
        left = 0.7 + n * (panel_w + 0.75)
        ax = fig.add_axes((left / width, legend_h / height, panel_w / width, panel_h / height))
        _draw_tile_grid(ax, kernel, Tq, Tk, *tiles[kernel])
    if Tq == Tk:
        what = f"causal attention over T = {Tk} positions"
    else:
        what = f"the last Tq = {Tq} queries against Tk = {Tk} keys"
    where = "" if Tq == Tk else f"query i at position {Tk - Tq} + i; "
    fig.suptitle(f"Which tiles each attention kernel computes: {what}\n{where}default GPU tiles for 16-bit inputs, "
                 f"head dim <= {ATTENTION_HEAD_DIM} (kernels/attention_tiles.py)", y=1 - 0.08 / height, va="top")
    handles = [Patch(facecolor=TILE_COLORS[s], edgecolor="#999999", label=TILE_LABELS[s])
               for s in (SKIPPED, UNMASKED, MASKED)]
    handles += [Line2D([], [], color="black", linestyle="--", label="causal diagonal: key = query position"),
                Patch(facecolor="none", edgecolor="black", linewidth=2.0,
                      label="one program's tiles, walked along the arrow")]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=10)
    return save_figure(fig, path)


def documents_tile_counts(T: int = DOCUMENTS_T, lengths=DOCUMENT_LENGTHS) -> dict[str, tuple[int, int]]:
    """kernel -> (tiles visited with the documents, without them), for the documents figure's window and each
    kernel's default GPU tiles."""
    doc_ids = document_ids(lengths)
    return {kernel: (tiled.tiles_visited(kernel, T, T, *blocks, doc_ids), tiled.tiles_visited(kernel, T, T, *blocks))
            for kernel, blocks in attention_tiles(T, T).items()}


def draw_attention_tile_grid_docs(path: Path, T: int = DOCUMENTS_T, lengths=DOCUMENT_LENGTHS) -> Path:
    """The forward's tile grid for one window of T positions as one sequence (left) and packed with documents of
    ``lengths`` (right), with the default GPU tiles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Polygon

    if sum(lengths) != T:
        raise ValueError(f"draw_attention_tile_grid_docs: the lengths {lengths} must sum to T = {T}")
    block_m, block_n = attention_tiles(T, T)["fwd"]
    doc_ids = document_ids(lengths)
    counts = documents_tile_counts(T, lengths)
    width, panel_w, legend_h, above_h, title_h = 11.0, 4.0, 1.15, 1.25, 0.95
    height = legend_h + panel_w + above_h + title_h
    fig = new_figure(width, height)
    panels = (
        (None, f"one sequence of {T} tokens\n{counts['fwd'][1]} of {{size}} tiles visited"),
        (doc_ids, f"{len(lengths)} documents packed in the window\n{counts['fwd'][0]} of {{size}} tiles visited "
                  f"({counts['fwd'][0] / counts['fwd'][1]:.0%} of the left's)"),
    )
    size = -(-T // block_m) * -(-T // block_n)
    for n, (ids, title) in enumerate(panels):
        left = 1.0 + n * (panel_w + 1.5)
        ax = fig.add_axes((left / width, legend_h / height, panel_w / width, panel_w / height))
        _draw_tile_grid(ax, "fwd", T, T, block_m, block_n, doc_ids=ids, title=title.format(size=size),
                        program=DOCUMENTS_PROGRAM)
    fig.suptitle(f"Packed documents: the forward skips the key tiles no query of its tile can see\n"
                 f"T = {T} in documents of {', '.join(map(str, lengths[:-1]))} and {lengths[-1]} tokens\n"
                 f"default GPU tiles: {block_m} queries x {block_n} keys (16-bit inputs, head dim <= "
                 f"{ATTENTION_HEAD_DIM})", y=1 - 0.08 / height, va="top")
    handles = [Patch(facecolor=TILE_COLORS[s], edgecolor="#999999", label=DOCUMENT_TILE_LABELS[s])
               for s in (UNMASKED, DOCUMENT_MASKED, MASKED, SKIPPED)]
    handles += [Patch(facecolor=TILE_COLORS[SKIPPED], edgecolor="#b0b0b0", hatch=DOCUMENT_SKIPPED_HATCH,
                      label=DOCUMENT_SKIPPED_LABEL),
                Polygon([(0, 0)], closed=True, fill=False, edgecolor=DOCUMENT_EDGE, linewidth=1.0,
                        label="a document: the pairs its queries see"),
                Line2D([], [], color="black", linestyle="--", label="causal diagonal: key = query position"),
                Patch(facecolor="none", edgecolor="black", linewidth=2.0,
                      label="one program's tiles, walked along the arrow")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=10)
    return save_figure(fig, path)


GROUP_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d")


def _shown_groups(n_groups: int, first: int = 3) -> list[int | None]:
    """The groups drawn: the first few and the last, None where the ones between are left out."""
    if n_groups <= first + 1:
        return list(range(n_groups))
    return [*range(first), None, n_groups - 1]


def draw_layer_norm_backward_reduction(path: Path) -> Path:
    """Rows -> G groups (stage 1, one program each) -> (G, C) partials -> column slices summed (stage 2). With
    hundreds of groups only the first three and the last are drawn, at their true size in rows; the ones between
    are a gap."""
    from matplotlib.patches import Rectangle

    layout = layer_norm_layout()
    M, C, block_m = layout.n_rows, layout.width, layout.block_m
    G = len(layout.groups)
    shown = _shown_groups(G)
    rows_per_group = len(layout.groups[0])
    fig = new_figure(11, 7.4)
    ax = fig.add_axes((0.16, 0.07, 0.58, 0.71))
    skip_h, gap, partial_h, out_h = 0.7 * rows_per_group, 0.55 * rows_per_group, 0.2 * rows_per_group, \
        0.25 * rows_per_group
    # the vertical place of each shown group's rows (drawn one unit a row) and of its row of partial sums
    tops, partial_tops, y, py = {}, {}, 0.0, 0.0
    for g in shown:
        if g is None:
            y, py = y + skip_h, py + partial_h
            continue
        tops[g], partial_tops[g] = y, py
        y, py = y + len(layout.groups[g]), py + partial_h
    rows_end = y
    partial_top = rows_end + gap
    partials_end = partial_top + py
    out_top = partials_end + gap

    # stage 1: the rows of x and dy, coloured by group, a thin line between loop steps of block_m rows
    for n, g in enumerate(shown):
        if g is None:
            left_out = f"groups {shown[n - 1] + 1} .. {shown[n + 1] - 1}"
            rows = f"rows {layout.groups[shown[n - 1] + 1][0]} .. {layout.groups[shown[n + 1] - 1][-1]}"
            top = tops[shown[n - 1]] + len(layout.groups[shown[n - 1]])
            ax.text(C / 2, top + skip_h / 2, f"...   {left_out} ({rows}), {rows_per_group} rows each   ...",
                    ha="center", va="center", fontsize=10)
            ax.text(C * 1.02, top + skip_h / 2, f"programs {shown[n - 1] + 1} .. {shown[n + 1] - 1}: alike",
                    ha="left", va="center", fontsize=10)
            ax.text(C / 4, partial_top + partial_tops[shown[n - 1]] + 1.5 * partial_h,
                    f"...   rows {shown[n - 1] + 1} .. {shown[n + 1] - 1}   ...", ha="center", va="center", fontsize=9)
            continue
        rows, top = layout.groups[g], tops[g]
        color = GROUP_COLORS[g % len(GROUP_COLORS)]
        ax.add_patch(Rectangle((0, top), C, len(rows), facecolor=color, alpha=0.55, edgecolor="none"))
        for step in range(block_m, len(rows), block_m):
            ax.plot([0, C], [top + step, top + step], color="white", linewidth=0.8)
        ax.add_patch(Rectangle((0, top), C, len(rows), fill=False, edgecolor="black", linewidth=1.4))
        n_steps = -(-len(rows) // block_m)
        ax.text(C * 1.02, top + len(rows) / 2,
                f"program {g}: rows {rows[0]}-{rows[-1]}\n{n_steps} steps of {block_m} rows",
                va="center", ha="left", fontsize=10)
        # its row of partial sums, and an arrow from the group to it
        y = partial_top + partial_tops[g]
        ax.add_patch(Rectangle((0, y), C, partial_h, facecolor=color, alpha=0.55, edgecolor="white"))
        ax.annotate("", xy=(-0.005 * C, y + partial_h / 2), xytext=(-0.005 * C, top + len(rows) / 2),
                    arrowprops=dict(arrowstyle="->", color=color, linewidth=1.8, shrinkA=0, shrinkB=0,
                                    connectionstyle=f"arc3,rad={0.1 + 0.04 * (len(shown) - n)}"),
                    annotation_clip=False)

    # stage 2: column slices of the partials, one program each; one of them outlined down to its output
    n_slices = -(-C // layout.reduce_block_c)
    for s in range(1, n_slices):
        x = s * layout.reduce_block_c
        ax.plot([x, x], [partial_top, partials_end], color="white", linewidth=0.8)
        ax.plot([x, x], [out_top, out_top + out_h], color="#888888", linewidth=0.5)
    ax.add_patch(Rectangle((0, partial_top), C, partials_end - partial_top, fill=False, edgecolor="black",
                           linewidth=1.4))
    ax.add_patch(Rectangle((0, out_top), C, out_h, facecolor="#dddddd", edgecolor="black", linewidth=1.4))
    chosen = n_slices // 2
    x0 = chosen * layout.reduce_block_c
    for top, h in ((partial_top, partials_end - partial_top), (out_top, out_h)):
        ax.add_patch(Rectangle((x0, top), layout.reduce_block_c, h, fill=False, edgecolor="black", linewidth=2.2))
    ax.annotate("", xy=(x0 + layout.reduce_block_c / 2, out_top),
                xytext=(x0 + layout.reduce_block_c / 2, partials_end),
                arrowprops=dict(arrowstyle="->", color="black", linewidth=1.6))
    ax.text(C * 1.02, (partial_top + partials_end) / 2,
            f"stage 1 writes one row per program:\n({G}, {C}) float32 partial sums,\none array for dw, one for db",
            va="center", ha="left", fontsize=10)
    ax.text(C * 1.02, out_top + out_h / 2,
            f"stage 2: {n_slices} programs, each sums\n{layout.reduce_block_c} columns over the {G} rows,\n"
            f"{layout.reduce_block_g} rows a step (outlined: {chosen})", va="center", ha="left", fontsize=10)

    # labels on the left
    labels = ((rows_end / 2, f"x and dy:\n{M} rows\nof {C}"),
              ((partial_top + partials_end) / 2, f"partial\nsums:\n({G}, {C})"), (out_top + out_h / 2, "dw, db:\n(C,)"))
    for y, label in labels:
        ax.text(-0.1 * C, y, label, va="center", ha="right", fontsize=10.5)
    ax.set_xlim(0, C)
    ax.set_ylim(out_top + out_h + 0.5, -0.5)
    ax.set_yticks([])
    ax.set_xticks(range(0, C + 1, C // 4))
    ax.set_xlabel("column (feature)")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.suptitle("LayerNorm backward: dw = sum over rows of dy * xhat and db = sum over rows of dy, in two stages",
                 y=0.98)
    fig.text(0.5, 0.885, layer_norm_caption(layout), ha="center", va="center", fontsize=10, linespacing=1.5)
    return save_figure(fig, path)


WORD_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2")


def draw_attention_dropout_philox(path: Path) -> Path:
    """The 128 bits of one Philox call (four 32-bit words, each two 16-bit halves) and the 8 keys they serve."""
    from matplotlib.patches import Rectangle

    layout = tiled.PHILOX_KEY_LAYOUT
    fig = new_figure(11, 4.4)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.8))
    cell_w, cell_h, top, bottom = 1.0, 0.8, 3.0, 0.4
    # the 8 halves, in memory order: w0 low, w0 high, w1 low, ...
    for word in range(4):
        for half in range(2):
            x = 2 * word + half
            ax.add_patch(Rectangle((x, top), cell_w, cell_h, facecolor=WORD_COLORS[word],
                                   alpha=0.45 if half else 0.85, edgecolor="white", linewidth=2))
            ax.text(x + 0.5, top + 0.4, f"w{word} {'high' if half else 'low'}\nbits {16 * half}-{16 * half + 15}",
                    ha="center", va="center", fontsize=10)
        ax.add_patch(Rectangle((2 * word, top), 2, cell_h, fill=False, edgecolor="black", linewidth=1.4))
    ax.text(4, top + cell_h + 0.35,
            "one Philox call: tl.randint4x(seed + bh * 2^32, a * Tk + 8g) -> four 32-bit words w0 .. w3",
            ha="center", va="center", fontsize=11)
    # the 8 keys of group g, each joined to the half it draws
    for r, (word, half) in enumerate(layout):
        ax.add_patch(Rectangle((r, bottom), cell_w, cell_h, facecolor=WORD_COLORS[word],
                               alpha=0.45 if half else 0.85, edgecolor="white", linewidth=2))
        ax.text(r + 0.5, bottom + 0.4, f"key 8g+{r}", ha="center", va="center", fontsize=10)
        ax.annotate("", xy=(2 * word + half + 0.5, top), xytext=(r + 0.5, bottom + cell_h),
                    arrowprops=dict(arrowstyle="->", color="#333333", linewidth=1.2))
    ax.add_patch(Rectangle((0, bottom), 8, cell_h, fill=False, edgecolor="black", linewidth=1.4))
    ax.text(4, bottom - 0.3, "the 8 keys 8g .. 8g+7 of query a: key kept when its 16-bit draw >= round(p * 2^16)",
            ha="center", va="center", fontsize=11)
    ax.set_xlim(-0.1, 8.1)
    ax.set_ylim(-0.2, top + cell_h + 0.6)
    ax.axis("off")
    order = ", ".join(f"w{w} {'high' if h else 'low'}" for w, h in layout)
    fig.suptitle(f"Dropout draws 8 keys from one Philox call (kernels/attention.py, _keep_mask)\n"
                 f"keys 0..7 of a group take: {order}", y=0.97)
    return save_figure(fig, path)


CAUSAL_MASK_T = 12  # positions in lesson 1's mask figure: small enough to write a number in every cell
MASKED_COLOR = "#d9d9d9"


def causal_mask_panels(T: int = CAUSAL_MASK_T) -> tuple[torch.Tensor, torch.Tensor]:
    """What the mask figure draws: the (T, T) bool ``future_mask`` (True: key j is in query i's future, its score
    set to -inf) and the softmax, row by row, of all-equal scores with those -inf in place (float64): row i spreads
    its weight evenly over its i + 1 visible keys."""
    masked = future_mask(T, T)
    scores = torch.zeros(T, T, dtype=torch.float64).masked_fill(masked, float("-inf"))
    return masked, torch.softmax(scores, dim=-1)


def _matrix_axes(ax, T: int) -> None:
    """A (T, T) matrix panel: query rows top to bottom, key columns left to right, every position ticked."""
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(T - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")


def draw_causal_mask(path: Path, T: int = CAUSAL_MASK_T) -> Path:
    """Two (T, T) panels: the causal mask (which scores become -inf) and the softmax of equal scores under it."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    masked, weights = causal_mask_panels(T)
    fig = new_figure(11, 6.6)
    left, right = fig.add_axes((0.06, 0.13, 0.4, 0.64)), fig.add_axes((0.56, 0.13, 0.4, 0.64))
    left.imshow(masked.numpy().astype(int), cmap=ListedColormap([TILE_COLORS[UNMASKED], MASKED_COLOR]), vmin=0,
                vmax=1, interpolation="nearest")
    shown = np.where(masked.numpy(), np.nan, weights.numpy())  # the masked cells are left blank (grey)
    right.set_facecolor(MASKED_COLOR)
    right.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    for i, j in np.ndindex(T, T):
        if masked[i, j]:
            left.text(j, i, "\u2212\u221e", ha="center", va="center", fontsize=8, color="#555555")
        else:
            right.text(j, i, "1" if i == 0 else f"1/{i + 1}", ha="center", va="center", fontsize=7.5,
                       color="black" if weights[i, j] > 0.6 else "white")
    for ax in (left, right):
        _matrix_axes(ax, T)
    left.set_title("the causal mask: score (i, j) kept for j <= i,\nset to \u2212\u221e for j > i (the future)",
                   fontsize=11, pad=34)
    right.set_title("softmax of equal scores under the mask:\nrow i spreads its weight 1 over i + 1 keys",
                    fontsize=11, pad=34)
    fig.legend(handles=[Patch(facecolor=TILE_COLORS[UNMASKED], label="kept: key j <= query i"),
                        Patch(facecolor=MASKED_COLOR, edgecolor="#999999",
                              label="masked: \u2212\u221e before softmax, weight 0 after")],
               loc="lower center", ncol=2, frameon=False, fontsize=10)
    fig.suptitle(f"Causal attention over T = {T} positions: query i may look at keys 0 .. i, never ahead\n"
                 f"(kernels/definitions.py, future_mask; masked_fill(-inf) then softmax, as in lesson 1)", y=0.975)
    return save_figure(fig, path)


FIGURES = tuple(name for name, _, _ in ATTENTION_FIGURES) + ("layer_norm_backward_reduction.png",
                                                           "attention_dropout_philox.png", "causal_mask.png",
                                                           DOCUMENTS_FIGURE)


def render_all(out: Path = DEFAULT_OUT) -> list[Path]:
    """Draw every figure into ``out`` (created if missing); returns the paths written, in FIGURES order."""
    import matplotlib
    import matplotlib.style

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with matplotlib.style.context("default"), matplotlib.rc_context(RC):
        paths = [draw_attention_tile_grid(out / name, Tq, Tk) for name, Tq, Tk in ATTENTION_FIGURES]
        paths.append(draw_layer_norm_backward_reduction(out / "layer_norm_backward_reduction.png"))
        paths.append(draw_attention_dropout_philox(out / "attention_dropout_philox.png"))
        paths.append(draw_causal_mask(out / "causal_mask.png"))
        paths.append(draw_attention_tile_grid_docs(out / DOCUMENTS_FIGURE))
    return paths


def check_out(out: Path, names: tuple[str, ...] = FIGURES) -> None:
    """Refuse, before anything is drawn, an --out that cannot take the PNGs ``names``: a file, a folder under a
    file, a figure's name taken by a folder, a folder that cannot be written; and a missing matplotlib or Pillow."""
    missing = [name for name in ("matplotlib", "PIL") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: drawing the figures needs {' and '.join(missing)} — pip install matplotlib pillow")
    for above in [out, *out.parents]:
        if above.exists():
            if not above.is_dir():
                what = "is a file, not a folder" if above == out else f"cannot be made: {above} is a file"
                raise SystemExit(f"error: --out {out} {what} — pass a folder (it is created if missing)")
            break
    taken = [name for name in names if (out / name).exists() and not (out / name).is_file()]
    if taken:
        raise SystemExit(f"error: {out / taken[0]} is a folder, not a figure — move it away or pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # can a file be written there at all (permissions, read-only)
    except OSError as e:
        raise SystemExit(f"error: cannot write in --out {out}: {e.strerror} — pass a folder you can write") from None


def main(argv: list[str] | None = None) -> int:
    """Check --out, then draw every figure; returns the exit status (see kernels/cli.py)."""
    parser = argparse.ArgumentParser(
        prog="python -m kernels.figures",
        description="Draw the course's figures (PNGs) from the kernels' loop bounds and tile tables.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for the PNGs (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    check_out(args.out)

    def draw() -> None:
        for path in render_all(args.out):
            print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")

    return run_cli(draw)


if __name__ == "__main__":
    sys.exit(main())
