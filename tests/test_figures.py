"""The course's figures (kernels/figures.py -> docs/figures/*.png): current, small, and drawing the kernels' truth.

The committed PNGs must be what ``python -m kernels.figures`` draws now: they are redrawn into a temporary folder
and compared pixel by pixel (decoded images, not bytes, so a different PNG encoder version does not matter). The
data behind them must be right independently of the drawing: every tile grid drawn is checked against a brute-force
causal mask and the LayerNorm groups against the GPU launcher's arithmetic. (The Philox layout it draws,
``tiled.PHILOX_KEY_LAYOUT``, is read off the kernel in tests/test_tiled.py.)
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("matplotlib")
pytest.importorskip("triton")

import kernels.layer_norm as layer_norm  # noqa: E402
from kernels import figures, tiled  # noqa: E402
from kernels.definitions import future_mask  # noqa: E402
from minigpt import figures as model_figures  # noqa: E402

REGENERATE = "python -m kernels.figures"
MAX_BYTES = 100 * 1024
# Pixels allowed to differ by more than 0.1 (of the 0..1 range) in some channel: a few anti-aliased edge pixels if
# a font rasterizer version differs, far fewer than a changed tile (hundreds of pixels) or a changed label.
MAX_DIFFERING_PIXELS = 30


@pytest.fixture(scope="module")
def redrawn(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return {path.name: path for path in figures.render_all(out)}


def test_committed_figures_are_current(redrawn):
    import matplotlib.image

    committed = figures.DEFAULT_OUT
    drawn = set(redrawn) | {model_figures.FIGURE}  # that one is redrawn by test_committed_attention_figure_is_current
    stale = sorted(set(p.name for p in committed.glob("*.png")) - drawn)
    assert not stale, f"{committed} has figures no code draws: {stale} — delete them, or run `{REGENERATE}`"
    for name, path in redrawn.items():
        old = committed / name
        assert old.exists(), f"{old} is missing — run `{REGENERATE}` and commit docs/figures/"
        new_pixels, old_pixels = (matplotlib.image.imread(p)[..., :3] for p in (path, old))
        assert new_pixels.shape == old_pixels.shape, (
            f"{name}: the committed figure is {old_pixels.shape[:2]} pixels, the code draws "
            f"{new_pixels.shape[:2]} — run `{REGENERATE}` and commit docs/figures/")
        differing = int((np.abs(new_pixels - old_pixels).max(-1) > 0.1).sum())
        assert differing <= MAX_DIFFERING_PIXELS, (
            f"{name}: {differing} pixels differ from what the code draws now — run `{REGENERATE}` and commit "
            f"docs/figures/")


def test_figures_are_small(redrawn):
    for name, path in redrawn.items():
        assert path.stat().st_size < MAX_BYTES, f"{name}: {path.stat().st_size} bytes"
        assert (figures.DEFAULT_OUT / name).stat().st_size < MAX_BYTES, name


def test_drawing_is_deterministic(redrawn, tmp_path):
    """Two drawings in one process give the same bytes (no timestamps, no version stamps, no random layout)."""
    name, Tq, Tk = figures.ATTENTION_FIGURES[0]
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(figures.RC):
        again = figures.draw_attention_tile_grid(tmp_path / name, Tq, Tk)
    assert again.read_bytes() == redrawn[name].read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# The data drawn


def _grid_cases():
    """(kernel, Tq, Tk, block_m, block_n): every grid the figures draw, then awkward ones (tiles that do not
    divide T or each other, a chunk whose diagonal falls across tiles, one query)."""
    for _name, Tq, Tk in figures.ATTENTION_FIGURES:
        for kernel, (block_m, block_n) in figures.attention_tiles(Tq, Tk).items():
            yield kernel, Tq, Tk, block_m, block_n
    for kernel, (Tq, Tk, block_m, block_n) in itertools.product(
            tiled.ATTENTION_KERNELS, [(100, 100, 32, 16), (100, 100, 16, 32), (37, 90, 16, 32), (50, 77, 12, 20),
                                      (1, 40, 16, 8), (40, 40, 64, 64)]):
        yield kernel, Tq, Tk, block_m, block_n


@pytest.mark.parametrize("kernel, Tq, Tk, block_m, block_n", list(_grid_cases()))
def test_tile_grid_agrees_with_brute_force_causality(kernel, Tq, Tk, block_m, block_n):
    """From the (Tq, Tk) causal mask, element by element: every (query, key) pair with key <= the query's position
    lies in a visited tile; no visited tile is wholly in the future; a tile visited without the mask has no future
    pair in it (skipping the mask there must be safe)."""
    grid = tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n)
    n_q, n_k = -(-Tq // block_m), -(-Tk // block_n)
    assert grid.shape == (n_q, n_k) and set(np.unique(grid)) <= {0, 1, 2}
    visible = ~future_mask(Tq, Tk).numpy()  # (Tq, Tk): query i sees key j
    for i, j in itertools.product(range(n_q), range(n_k)):
        tile = visible[i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
        where = f"{kernel} tile (query {i}, key {j}) = {grid[i, j]}"
        if tile.any():
            assert grid[i, j] != 0, f"{where}: it holds a visible pair but is skipped"
        else:
            assert grid[i, j] == 0, f"{where}: wholly in the future but visited"
        if grid[i, j] == 1:
            assert tile.all(), f"{where}: visited without the mask but holds a future pair"


def test_documents_figure_draws_the_kernels_schedule():
    """The documents figure: a window its lengths fill, the GPU's forward tiles, and a grid that agrees with the
    (query, key) pairs the documents allow, pair by pair (tests/test_document_tiles.py's brute force); every state
    of its legend appears in it."""
    from tests.test_document_tiles import check_against_brute_force

    T, lengths = figures.DOCUMENTS_T, figures.DOCUMENT_LENGTHS
    assert sum(lengths) == T and min(lengths) > 0
    doc_ids = figures.document_ids(lengths)
    assert doc_ids.tolist() == [n for n, length in enumerate(lengths) for _ in range(length)]
    for kernel, (block_m, block_n) in figures.attention_tiles(T, T).items():
        assert check_against_brute_force(kernel, T, T, block_m, block_n, doc_ids) == 0
    block_m, block_n = figures.attention_tiles(T, T)["fwd"]
    grid = tiled.attention_tile_grid("fwd", T, T, block_m, block_n, doc_ids)
    causal = tiled.attention_tile_grid("fwd", T, T, block_m, block_n)
    assert set(np.unique(grid)) == set(figures.DOCUMENT_TILE_LABELS)
    assert ((grid == figures.SKIPPED) & (causal != figures.SKIPPED)).any()  # some tiles hatched
    program = figures.DOCUMENTS_PROGRAM
    assert grid[program, 0] == figures.SKIPPED != causal[program, 0]  # the outlined program skips tiles
    visited, without = figures.documents_tile_counts()["fwd"]
    assert (visited, without) == (int((grid != 0).sum()), int((causal != 0).sum())) and visited < without / 2


class _RecordLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call, runs nothing."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_drawn_layer_norm_groups_are_the_launchers(monkeypatch):
    """The figure's configuration is one a GPU runs: its row groups, rows per program and step size are the ones
    _layer_norm_backward launches stage 1 with for the figure's shape (bf16 rows) on a CUDA device with the
    figure's number of multiprocessors, the group count from the launcher's own _num_groups. The launch is
    recorded, not run."""
    layout = figures.layer_norm_layout()
    dx_kernel, dwdb_kernel = _RecordLaunch(), _RecordLaunch()
    num_groups = layer_norm._num_groups
    monkeypatch.setattr(layer_norm, "_layer_norm_bwd_dx", dx_kernel)
    monkeypatch.setattr(layer_norm, "_layer_norm_bwd_dwdb", dwdb_kernel)
    monkeypatch.setattr(layer_norm, "is_interpreting", lambda: False)  # the GPU's tiles and group count
    monkeypatch.setattr(layer_norm, "_sm_count", lambda index: layout.multiprocessors)
    monkeypatch.setattr(layer_norm, "_num_groups", lambda n_rows, device: num_groups(n_rows, torch.device("cuda", 0)))
    M, C = layout.n_rows, layout.width
    x = torch.zeros(M, C, dtype=torch.bfloat16)
    w = torch.ones(C, dtype=torch.bfloat16)
    stats = torch.zeros(M, dtype=torch.float32)
    layer_norm._layer_norm_backward(x, x, w, stats, stats, torch.bfloat16, torch.bfloat16)

    (grid, args, kwargs), = dx_kernel.calls
    n_groups, rows_per_group = grid[0], args[11]
    launched = [list(range(g * rows_per_group, min((g + 1) * rows_per_group, M))) for g in range(n_groups)]
    assert layout.groups == launched
    assert (layout.block_m, layout.block_c) == (kwargs["BLOCK_M"], kwargs["BLOCK_C"])
    assert layout.n_groups == num_groups(M, torch.device("cuda", 0))  # G asked for, before the rounding
    (grid, args, kwargs), = dwdb_kernel.calls
    assert grid[0] == -(-C // layout.reduce_block_c) and kwargs["BLOCK_C"] == layout.reduce_block_c
    assert args[4] == len(layout.groups) and kwargs["BLOCK_G"] == layout.reduce_block_g


def test_layer_norm_figure_says_which_configuration_it_draws():
    """The caption names the width, the rows per program and the groups drawn, and they are the GPU's tile for that
    width (row_tile, not the interpreter's) and GROUPS_PER_SM groups per multiprocessor — not the interpreter's
    INTERPRETER_GROUPS."""
    layout = figures.layer_norm_layout()
    tile = layer_norm.backward_tile(layer_norm.row_tile(layout.width, 2, len(layout.groups[0]), interpreting=False))
    assert (layout.width, tile.BLOCK_M, tile.BLOCK_C) == (768, 4, 1024)  # GPT-2 small's width: 4 rows a step
    assert layout.block_m == tile.BLOCK_M
    assert layout.n_groups == layer_norm.GROUPS_PER_SM * layout.multiprocessors != layer_norm.INTERPRETER_GROUPS
    caption = figures.layer_norm_caption(layout)
    rows_per_program = len(layout.groups[0])
    for words in (f"M = {layout.n_rows} bf16 rows of C = {layout.width}", f"on {layout.multiprocessors} "
                  f"multiprocessors", f"{layout.n_groups} groups asked, {len(layout.groups)} used",
                  f"{rows_per_program} rows per program, in {rows_per_program // tile.BLOCK_M} steps of BLOCK_M = "
                  f"{tile.BLOCK_M} rows", f"REDUCE_BLOCK_C = {layer_norm.REDUCE_BLOCK_C} columns per program"):
        assert words in caption.replace("\n", " "), words
    assert "INTERPRETER" not in caption


def _never_draw(*args, **kwargs):
    raise AssertionError("a figure was drawn although --out had to be refused first")


def test_an_out_that_cannot_take_the_figures_is_refused_before_drawing(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "render_all", _never_draw)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    taken = tmp_path / "taken"
    (taken / figures.FIGURES[0]).mkdir(parents=True)
    for out, message in ((a_file, f"error: --out {a_file} is a file, not a folder — pass a folder"),
                         (a_file / "sub", f"error: --out {a_file / 'sub'} cannot be made: {a_file} is a file — "),
                         (taken, f"error: {taken / figures.FIGURES[0]} is a folder, not a figure — ")):
        with pytest.raises(SystemExit) as info:
            figures.main(["--out", str(out)])
        assert str(info.value.code).startswith(message) and "\n" not in str(info.value.code)


def test_an_out_that_cannot_be_written_is_refused_before_drawing(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "render_all", _never_draw)

    def read_only(dir):
        raise OSError(30, "Read-only file system", str(dir))

    monkeypatch.setattr(figures.tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit, match=r"cannot write in --out .*: Read-only file system — pass a folder you can"):
        figures.main(["--out", str(tmp_path / "figures")])


def test_a_write_failing_while_drawing_is_one_line(tmp_path, monkeypatch, capsys):
    def full_disk(out):
        raise OSError(28, "No space left on device", str(out / figures.FIGURES[0]))

    monkeypatch.setattr(figures, "render_all", full_disk)
    assert figures.main(["--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: No space left on device: {tmp_path / figures.FIGURES[0]} — free some "
                                       "disk space or write somewhere else\n")


# ----------------------------------------------------------------------------------------------------------------
# Lesson 1's figures: the causal mask (kernels.figures) and one head's attention in a trained model (minigpt.figures)


def test_causal_mask_figure_draws_the_mask_and_its_softmax():
    """The mask drawn is "key j after query i", pair by pair, and softmax of equal scores under it gives row i the
    weight 1 / (i + 1) on each of its i + 1 keys."""
    T = figures.CAUSAL_MASK_T
    masked, weights = figures.causal_mask_panels(T)
    for i, j in itertools.product(range(T), range(T)):
        assert bool(masked[i, j]) == (j > i)
        assert float(weights[i, j]) == pytest.approx(0.0 if j > i else 1.0 / (i + 1), abs=1e-15)


def _small_model(seed: int = 0):
    from minigpt import GPTConfig, GPTModel

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)
    return GPTModel(cfg, kernels="torch").double().eval()


def test_drawn_attention_weights_are_the_models():
    """The weights the figure draws, multiplied by the block's own values, merged and projected, are what the
    block's attention module outputs (the backend's causal_attention, which never returns the weights); each row
    sums to 1 and nothing of the future is weighted."""
    model = _small_model()
    idx = torch.randint(0, 257, (2, 11), generator=torch.Generator().manual_seed(1))
    B, T = idx.shape
    for layer in range(model.cfg.n_layers):
        weights = model_figures.attention_weights(model, idx, layer)  # (B, H, T, T)
        block = model.trf_blocks[layer]
        with torch.no_grad():
            x = model.tok_emb(idx) + model.pos_emb(torch.arange(T))
            for earlier in model.trf_blocks[:layer]:
                x = earlier(x)
            x = block.norm1(x)
            v = block.att.W_value(x).view(B, T, 4, 8).transpose(1, 2)  # (B, H, T, D)
            mine = block.att.out_proj((weights @ v).transpose(1, 2).reshape(B, T, 32))
            theirs = block.att(x)
        assert torch.allclose(mine, theirs, atol=1e-12), layer
        assert torch.allclose(weights.sum(-1), torch.ones(B, 4, T, dtype=torch.float64), atol=1e-12)
        assert (weights[..., future_mask(T, T)] == 0).all()


def test_attention_figure_refuses_a_layer_or_head_the_model_lacks(tmp_path):
    model = _small_model()
    for layer, head, ids, message in ((3, 0, [1, 2], "--layer 3: the model has layers 0 .. 2"),
                                      (0, -1, [1, 2], "--head -1: the model has heads 0 .. 3"),
                                      (0, 0, [1], "--prompt is 1 tokens — give 2 to 16"),
                                      (0, 0, [1] * 17, "--prompt is 17 tokens — give 2 to 16")):
        with pytest.raises(model_figures.FigureError, match=message):
            model_figures.check_choice(model, ids, layer, head)


def test_attention_figure_trains_with_lesson_2s_command():
    """The figure's model is lesson 2's: the flags it trains with are the ones COURSE.md's lesson 2 gives."""
    import re
    import shlex
    from pathlib import Path

    course = (Path(__file__).resolve().parents[1] / "COURSE.md").read_text(encoding="utf-8")
    lesson_2 = course[course.index("## Lesson 2"):course.index("## Lesson 3")]
    command = re.search(r"^python -m minigpt\.train (.*)$", lesson_2.replace("\\\n", " "), re.M)
    flags = shlex.split(command.group(1))
    out = flags.index("--out-dir")
    del flags[out:out + 2]
    assert tuple(flag for flag in flags if flag != "--no-progress") == model_figures.LESSON_2_TRAINING


@pytest.fixture(scope="module")
def lesson_2_model(tmp_path_factory):
    """The checkpoint of lesson 2's training command, run as ``python -m minigpt.figures`` runs it (float64, CPU)."""
    return model_figures.train_lesson_2_model(tmp_path_factory.mktemp("lesson-2-model"))


@pytest.mark.slow  # the fixture runs lesson 2's training, in float64
def test_committed_attention_figure_is_current(lesson_2_model, tmp_path):
    """Pixel for pixel, as the kernels' figures: the training runs in float64, where the last-bit differences
    between machines and thread counts (which change the float32 run's weights by tenths) stay invisible."""
    import matplotlib.image

    redrawn = model_figures.draw(tmp_path, lesson_2_model, model_figures.LESSON_2_SOURCE)
    old = figures.DEFAULT_OUT / model_figures.FIGURE
    regenerate = "python -m minigpt.figures"
    assert old.exists(), f"{old} is missing — run `{regenerate}` and commit docs/figures/"
    new_pixels, old_pixels = (matplotlib.image.imread(p)[..., :3] for p in (redrawn, old))
    assert new_pixels.shape == old_pixels.shape, f"run `{regenerate}` and commit docs/figures/"
    differing = int((np.abs(new_pixels - old_pixels).max(-1) > 0.1).sum())
    assert differing <= MAX_DIFFERING_PIXELS, (f"{differing} pixels differ from what the code draws now — run "
                                               f"`{regenerate}` and commit docs/figures/")
    assert redrawn.stat().st_size < MAX_BYTES and old.stat().st_size < MAX_BYTES


@pytest.mark.slow  # the fixture runs lesson 2's training, in float64
def test_attention_figure_without_a_checkpoint_trains_lesson_2s_model(lesson_2_model, tmp_path, monkeypatch):
    """``python -m minigpt.figures`` with no --checkpoint draws what the test above compares: lesson 2's model,
    trained first (here the training is the fixture's, handed over instead of run again)."""
    trained_in = []

    def train(scratch):
        trained_in.append(scratch)
        return lesson_2_model

    monkeypatch.setattr(model_figures, "train_lesson_2_model", train)
    drawn = model_figures.render(tmp_path / "a")
    assert len(trained_in) == 1 and not trained_in[0].exists()  # trained in a temporary folder, removed after
    again = model_figures.draw(tmp_path / "b", lesson_2_model, model_figures.LESSON_2_SOURCE)
    assert drawn.read_bytes() == again.read_bytes()


@pytest.mark.slow  # the fixture runs lesson 2's training, in float64
def test_the_head_drawn_attends_to_the_spaces_as_lesson_1_says(lesson_2_model):
    """COURSE.md: in the head drawn, from the prompt's first space on, nearly all of each query's weight goes to the
    spaces before it."""
    model, tok = model_figures.load_model(lesson_2_model)
    ids = tok.encode(model_figures.PROMPT)
    weights = model_figures.attention_weights(model, torch.tensor([ids]), model_figures.LAYER)[0, model_figures.HEAD]
    spaces = torch.tensor([i == ord(" ") for i in ids])
    on_spaces = weights[ids.index(ord(" ")):, spaces].sum(-1)  # per query from the first space on
    assert (on_spaces > 0.8).all(), on_spaces
