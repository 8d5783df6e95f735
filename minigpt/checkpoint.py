"""Checkpoints: saved atomically (through minigpt/files.py), loaded with one-line errors that say what to do."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import torch

from kernels.errors import MinigptError

from .files import atomic_write

CHECKPOINT_FORMAT = "minigpt-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(MinigptError, RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model (the message says what to do)."""


class Busy(CheckpointError):
    """Another process holds the lock on a folder or file this one wants to write (``files.exclusive_lock`` raises
    it). A CheckpointError, so that the CLIs, which catch that, report it in one line."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


class _WriteErrors:
    """A binary file that remembers the OSError its ``write`` raised. torch.save reports a failed write (a full disk,
    a file-size limit) as a RuntimeError of its zip writer that no longer says what happened."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_write``; a failed write raises its own OSError (ENOSPC, EFBIG, ...)."""

    def write(f: BinaryIO) -> None:
        recorder = _WriteErrors(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise

    atomic_write(path, write)


def load_torch(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` with one-line errors for a missing or damaged file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no {what} at {path} — check the path, or train one with `python -m minigpt.train`")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder — pass the checkpoint file inside it "
                              f"(e.g. {path / 'checkpoint.pt'})")
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
