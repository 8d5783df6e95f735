"""Saving and loading: every file is written atomically, and every load failure says what to do.

Atomic write = write a temporary file in the same folder, flush, fsync, then ``os.replace`` it over the target. A
crash or Ctrl-C at any moment leaves either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

CHECKPOINT_FORMAT = "minigpt-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model (the message says what to do)."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike):
    """Open a temporary binary file beside ``path``; on success it is synced and renamed over ``path``, on error
    removed. The one place every file of a run (checkpoints, metrics, plots, token caches) is written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a binary file object, then move the result over ``path`` in one step."""
    with atomic_open(path) as f:
        write(f)


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` with one-line errors for a missing or damaged file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no {what} at {path} — check the path, or train one with `python -m minigpt.train`")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder — pass the checkpoint file inside it (e.g. {path / 'checkpoint.pt'})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickle of a foreign class, ...
        raise CheckpointError(
            f"{path} is not a readable {what} (truncated or not a PyTorch file?: {type(e).__name__}) — "
            "use an earlier checkpoint or train again"
        ) from None


def is_minigpt_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_model_state(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """``model.load_state_dict(state_dict)`` (strict) with a readable message when the shapes or keys differ."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:3]
        detail = "; ".join(first) if first else str(e).splitlines()[0]
        raise CheckpointError(
            f"{source} does not match the model configuration ({detail}) — pass the --preset / model flags it "
            "was trained with"
        ) from None
