r"""``python -m minigpt.figures``: lesson 1's picture of attention in a trained model.

    attention_weights.png   one head's attention weights, softmax(q k^T / sqrt(D)) under the causal mask, on a
                            prompt, after lesson 2's training: a row per query token, a column per key token

The figure needs a trained model, and a committed picture must be redrawn the same on every machine. Lesson 2's
training in float32 is not: 60 steps at a learning rate of 5e-3 amplify the last-bit differences between CPUs and
thread counts (the order in which a matmul adds its terms) until single attention weights differ by tenths. So
this command runs lesson 2's training command itself (``LESSON_2_TRAINING``, the flags COURSE.md gives; the
stories are generated, nothing is downloaded), in float64: the same differences start about 10^9 times smaller and stay
far below what a pixel shows. Your own float32 run of lesson 2 learns the same kind of heads, not these exact
weights.

    python -m minigpt.figures                          # trains lesson 2's model (float64, CPU, under a minute),
                                                       # writes docs/figures/attention_weights.png
    python -m minigpt.figures --checkpoint course-run/checkpoint.pt   # your model -> course-run/attention_weights.png
    python -m minigpt.figures --checkpoint course-run/checkpoint.pt --layer 0 --head 3 --prompt "One day, Tim"

tests/test_figures.py trains that model, redraws the figure and compares its pixels with the committed one, as it
does for ``kernels.figures``' figures; it checks that the weights drawn are the model's own (multiplied by the
values and projected, they give ``block.att``'s output) and that the head drawn does what lesson 1 says it does.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from kernels.definitions import future_mask
from kernels.errors import MinigptError
from kernels.figures import DEFAULT_OUT, RC, check_out, new_figure, save_figure

from .model import GPTModel

FIGURE = "attention_weights.png"
# Lesson 2's training command (COURSE.md), flag for flag; tests/test_figures.py checks that the lesson still says so.
LESSON_2_TRAINING = ("--data", "stories", "--tokenizer", "bytes", "--preset", "tiny", "--max-docs", "300",
                     "--max-steps", "60", "--eval-interval", "30", "--eval-iters", "2", "--batch-size", "8",
                     "--lr", "5e-3")
# The prompt, in the style of the stories the model was trained on (each opens with "There once was ...").
PROMPT = "There once was a girl named Nora. She"
# The head drawn: in lesson 2's model (trained in float64), from the prompt's first space on, layer 1's head 1 puts
# nearly all of each query's weight on the spaces before it, the starts of the words so far (COURSE.md says so, and
# tests/test_figures.py checks it).
LAYER, HEAD = 1, 1
LESSON_2_SOURCE = "lesson 2's model (its training command, run in float64)"  # the title's words for that model


class FigureError(MinigptError, ValueError):
    """A --layer, --head or --prompt the model cannot draw (the message says what it can)."""


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Tensors and parameters created inside are ``dtype`` by default; the previous default is restored after."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def one_thread():
    """PyTorch's CPU ops run on one thread inside; the previous number is restored after. The float64 run gives the
    same picture on any number of threads, and on a CPU whose cores are busy with other work, threads that wait
    for each other at every op make the training several times slower than one thread alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_lesson_2_model(out_dir: Path) -> Path:
    """Run lesson 2's training command into ``out_dir`` (fresh, with its own token cache) on the CPU in float64,
    on one thread; returns the checkpoint's path. The run prints what lesson 2's does."""
    from .train import main as train

    with default_dtype(torch.float64), one_thread():
        train([*LESSON_2_TRAINING, "--out-dir", str(out_dir / "run"), "--cache-dir", str(out_dir / "cache"),
               "--device", "cpu", "--kernels", "torch", "--no-progress"])
    return out_dir / "run" / "checkpoint.pt"


def load_model(checkpoint: str | Path):
    """(model in float64, in eval mode, on the CPU with the torch backend; its tokenizer) from a checkpoint."""
    from .generate import load_for_inference

    with default_dtype(torch.float64):  # the parameters are created in float64 and take a float64 file as it is
        return load_for_inference(str(checkpoint), kernels="torch")


def attention_weights(model: GPTModel, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """The attention weights of every head of block ``layer`` for the token ids ``idx`` (B, T): (B, H, T, T),
    row i of a head the weights query i gives keys 0 .. T - 1 (0 for the future ones; each row sums to 1).

    The model's own modules up to the block's attention (embeddings, the earlier blocks, the block's norm1 and its
    W_query and W_key), then the scaled scores, the causal mask and the softmax written out: the backend's
    causal_attention computes the same weights but never returns them."""
    B, T = idx.shape
    att = model.trf_blocks[layer].att
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in model.trf_blocks[:layer]:
            x = block(x)
        x = model.trf_blocks[layer].norm1(x)  # what the block's attention reads
        q = att.W_query(x).view(B, T, att.n_heads, att.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = att.W_key(x).view(B, T, att.n_heads, att.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / att.head_dim ** 0.5  # (B, H, T, T)
        scores = scores.masked_fill(future_mask(T, T, device=idx.device), float("-inf"))
        return torch.softmax(scores, dim=-1)


def token_label(text: str) -> str:
    """A token as an axis label: a space shown as an open box, a newline as a return sign."""
    return text.replace(" ", "\u2423").replace("\n", "\u23ce") or "?"


def check_choice(model: GPTModel, prompt_ids: list[int], layer: int, head: int) -> None:
    """FigureError unless block ``layer``, head ``head`` exist and the prompt fits the context."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise FigureError(f"--layer {layer}: the model has layers 0 .. {cfg.n_layers - 1} — pick one of those")
    if not 0 <= head < cfg.n_heads:
        raise FigureError(f"--head {head}: the model has heads 0 .. {cfg.n_heads - 1} — pick one of those")
    if not 2 <= len(prompt_ids) <= min(cfg.context_length, 64):
        raise FigureError(f"--prompt is {len(prompt_ids)} tokens — give 2 to {min(cfg.context_length, 64)} (a "
                          "figure has a row and a column for each)")


def draw_attention_weights(path: Path, weights: torch.Tensor, labels: list[str], title: str) -> Path:
    """One head's (T, T) weights as a heat map, token labels on both axes, the masked cells grey."""
    import numpy as np

    T = weights.shape[0]
    shown = weights.double().numpy().copy()
    shown[future_mask(T, T).numpy()] = np.nan  # the future: grey, not a weight of 0 coloured like the others
    fig = new_figure(11, 10)
    ax = fig.add_axes((0.1, 0.06, 0.78, 0.78))
    ax.set_facecolor("#d9d9d9")
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.set_xticks(range(T), labels, fontsize=10)
    ax.set_yticks(range(T), labels, fontsize=10)
    ax.set_xlabel("key: the token attended to")
    ax.set_ylabel("query: the token attending")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("attention weight (each row sums to 1; grey: masked, the future)")
    fig.suptitle(title, y=0.985, va="top")
    return save_figure(fig, path)


def render(out: Path, checkpoint: str | Path | None = None, prompt: str = PROMPT, layer: int = LAYER,
           head: int = HEAD) -> Path:
    """Draw ``out``/attention_weights.png from ``checkpoint``, or, without one, from lesson 2's model trained here
    first (in a temporary folder, deleted after); returns the path written."""
    if checkpoint is None:
        with tempfile.TemporaryDirectory(prefix="minigpt-figures-") as scratch:
            return draw(out, train_lesson_2_model(Path(scratch)), LESSON_2_SOURCE, prompt, layer, head)
    return draw(out, checkpoint, str(checkpoint), prompt, layer, head)


def draw(out: Path, checkpoint: str | Path, source: str, prompt: str = PROMPT, layer: int = LAYER,
         head: int = HEAD) -> Path:
    """Draw ``out``/attention_weights.png from ``checkpoint``, named ``source`` in the title."""
    import matplotlib
    import matplotlib.style

    model, tok = load_model(checkpoint)
    ids = tok.encode(prompt)
    check_choice(model, ids, layer, head)
    weights = attention_weights(model, torch.tensor([ids]), layer)[0, head]  # (T, T)
    labels = [token_label(tok.decode([i])) for i in ids]
    title = (f"One head's attention weights: layer {layer}, head {head} of {model.cfg.n_heads}, in {source}\n"
             f"prompt: {prompt!r} ({len(ids)} tokens); row i: how query i splits its attention over keys 0 .. i")
    Path(out).mkdir(parents=True, exist_ok=True)
    with matplotlib.style.context("default"), matplotlib.rc_context(RC):
        return draw_attention_weights(Path(out) / FIGURE, weights, labels, title)


def main(argv: list[str] | None = None) -> int:
    """Check --out, then train (without --checkpoint) and draw; returns the exit status (see kernels/cli.py)."""
    from kernels.cli import run_cli

    parser = argparse.ArgumentParser(
        prog="python -m minigpt.figures",
        description="Draw one head's attention weights in a trained model (lesson 1's figure).")
    parser.add_argument("--checkpoint", help="a checkpoint.pt or model.pth to draw from (default: train lesson 2's "
                                             "model first, in float64, and draw into docs/figures/)")
    parser.add_argument("--out", type=Path, help=f"folder for {FIGURE} (default: {DEFAULT_OUT}, or the "
                                                 "checkpoint's folder with --checkpoint)")
    parser.add_argument("--prompt", default=PROMPT, help=f"the text whose tokens attend (default: {PROMPT!r})")
    parser.add_argument("--layer", type=int, default=LAYER, help=f"the block, from 0 (default: {LAYER})")
    parser.add_argument("--head", type=int, default=HEAD, help=f"the head, from 0 (default: {HEAD})")
    args = parser.parse_args(argv)
    out = args.out or (Path(args.checkpoint).parent if args.checkpoint else DEFAULT_OUT)
    check_out(out, (FIGURE,))

    def draw() -> None:
        path = render(out, args.checkpoint, args.prompt, args.layer, args.head)
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")

    return run_cli(draw)


if __name__ == "__main__":
    sys.exit(main())
