"""The run's record: ``metrics.csv`` (one row per evaluation) and the loss plot (``loss.pdf``, ``loss.png``)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .checkpoint import atomic_write

METRIC_FIELDS = ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s",
                 "mfu", "elapsed_s")


def write_metrics_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite the whole CSV (it is small) atomically, so a crash never leaves half a row."""

    def write(f) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_cell(row.get(k)) for k in METRIC_FIELDS})
        text.flush()
        text.detach()  # leave the binary file open for atomic_open to sync and rename

    atomic_write(path, write)


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def csv_cell(v):
    """A value as a CSV cell: empty for None, 6 significant digits for floats."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def save_loss_plot(out_dir: str | os.PathLike, rows: list[dict]) -> list[Path]:
    """Train and validation loss against tokens seen (the original notebook's plot), as loss.pdf and loss.png.

    Drawn on a bare ``Figure`` with its own Agg canvas, not through pyplot: files only, no display needed, and
    pyplot's global backend is left alone, so plots in a notebook that trains still show inline.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("train_loss") is not None]
    tokens = [r["tokens_seen"] for r in rows]
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(tokens, [r["train_loss"] for r in rows], label="Training loss")
    ax.plot(tokens, [r["val_loss"] for r in rows], linestyle="-.", label="Validation loss")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    if rows:
        top = ax.secondary_xaxis(
            "top", functions=(_interp(tokens, [r["step"] for r in rows]), _interp([r["step"] for r in rows], tokens))
        )
        top.set_xlabel("Step")
    fig.tight_layout()
    out = []
    for ext in ("pdf", "png"):
        path = Path(out_dir) / f"loss.{ext}"
        atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext, dpi=120))
        out.append(path)
    return out


def _interp(xs, ys):
    import numpy as np

    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(xs) < 2 or xs[-1] == xs[0]:
        return lambda v: v
    return lambda v: np.interp(v, xs, ys)
