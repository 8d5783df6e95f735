"""The rules of an --out-dir and of resuming: which checkpoint a run continues, what it may not overwrite, and what
a checkpoint must agree with (its fields, the flags given again, the data, the optimizer's shapes).

    OUT_DIR/checkpoint.pt   resumed by --resume auto; another run there needs --overwrite
    --resume PATH           a checkpoint written by minigpt.train; its model flags may be repeated, never changed
    --init-from NAME|PATH   GPT-2's weights: their shape, GPT-2's tokenizer

Every refusal is one line that names the flag or the file and says what to do instead.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import torch

from . import pretrained
from .checkpoint import CheckpointError, is_minigpt_checkpoint, load_torch
from .config import PRESETS, ConfigError, GPTConfig, get_preset
from .distributed import DistInfo, all_ranks_ok
from .files import check_writable, exclusive_lock

# The lock a run holds on its --out-dir from set-up to exit: one run per folder, or their files would interleave.
OUT_DIR_LOCK = ".minigpt.lock"
# What a run writes into its --out-dir besides checkpoint.pt (and TensorBoard's event files in tb/)
RUN_FILES = ("model.pth", "metrics.csv", "loss.pdf", "loss.png")
TB_EVENTS = "events.out.tfevents.*"  # the names TensorBoard's SummaryWriter gives its files


# ---------------------------------------------------------------------------------------------------------------
# The --out-dir: one run at a time; which checkpoint it continues, and which files a fresh run may replace


def open_out_dir(out_dir: Path, info: DistInfo, device, held: contextlib.ExitStack | None) -> None:
    """Rank 0 creates ``out_dir``, checks that it can be written and, given ``held``, locks it until ``held``
    closes (the ranks share the folder); every rank learns whether that worked, so that none waits for a rank 0
    that gave up."""
    error = None
    if info.is_main:
        try:
            _lock_out_dir(out_dir, held)
        except (CheckpointError, ConfigError) as e:  # Busy is a CheckpointError
            error = e
    if all_ranks_ok(error is None, info, device):
        return
    raise error or ConfigError(f"rank 0 could not open --out-dir {out_dir} (its error says why) — fix "
                               "that and start the run again")


def _lock_out_dir(out_dir: Path, held: contextlib.ExitStack | None) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_writable(out_dir)  # a read-only folder or filesystem: now, not at the first save
    except OSError as e:
        raise ConfigError(f"--out-dir {out_dir} cannot be written ({e.strerror or e}) — choose another "
                          "--out-dir, or make this one writable") from None
    if held is not None:
        held.enter_context(exclusive_lock(
            out_dir / OUT_DIR_LOCK, f"--out-dir {out_dir}",
            "another run is writing there: wait for it to end, or choose another --out-dir"))


def resume_path(resume: str | None, out_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume`` names: None for a fresh run (no --resume, or auto with no checkpoint yet)."""
    if resume is None:
        return None
    if resume == "auto":
        path = Path(out_dir) / "checkpoint.pt"
        return path if path.exists() else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint — check the path, or use --resume auto")
    return path


def earlier_run_files(out_dir: Path, resume_from: Path | None, overwrite: bool) -> list[Path]:
    """A run that does not continue OUT_DIR/checkpoint.pt (a fresh one, or one resumed from elsewhere) would
    replace the files of the run there: refuse unless --overwrite says so. With it, returns that run's files, for
    the trainer to remove at this run's first save, not now: a run that fails before it has saved anything (bad
    data, no memory) must not have cost the user the earlier run."""
    existing = out_dir / "checkpoint.pt"
    if resume_from is not None and existing.exists() and resume_from.resolve() == existing.resolve():
        return []
    if overwrite:
        return ([p for p in (out_dir / n for n in RUN_FILES) if p.exists()]
                + sorted((out_dir / "tb").glob(TB_EVENTS)))
    if existing.exists():
        raise ConfigError(f"{out_dir} already holds a checkpoint at step {checkpoint_step(existing)}: "
                          "--resume auto to continue it, or another --out-dir / --overwrite to start over")
    if (out_dir / "model.pth").exists():
        raise ConfigError(f"{out_dir} already holds the model.pth of an earlier run: another --out-dir, or "
                          "--overwrite to replace it")
    return []


# ---------------------------------------------------------------------------------------------------------------
# What a checkpoint holds, and the flags that may not contradict it


def checkpoint_step(path: Path) -> str:
    """The step a checkpoint was saved at, for messages ("?" when it cannot be read)."""
    try:  # mmap: reads the header, not the gigabytes of a large model's weights and optimizer state
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:
        return "?"
    return str(step) if isinstance(step, int) else "?"


# Model flags a resumed run cannot change (the weights have the checkpoint's shapes), as field -> flag.
SHAPE_FLAGS = {"emb_dim": "--emb-dim", "n_layers": "--n-layers", "n_heads": "--n-heads",
               "context_length": "--context-length", "qkv_bias": "--qkv-bias"}


# What a training checkpoint holds (as save() writes it), and the fields of its "state"
CHECKPOINT_FIELDS = {"config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "state": dict, "args": dict,
                     "tokenizer": str}
STATE_FIELDS = ("step", "epoch", "epoch_windows", "tokens_seen")


def check_checkpoint_fields(ckpt: dict, path: Path) -> None:
    """Refuse a checkpoint that lacks a field resuming reads (one written by hand, or by another program), naming
    it, instead of a KeyError halfway through set-up."""
    fix = "pass a checkpoint.pt written by minigpt.train, or start a fresh run"
    for field, kind in CHECKPOINT_FIELDS.items():
        if not isinstance(ckpt.get(field), kind):
            raise CheckpointError(f"{path} has no valid '{field}' entry — {fix}")
    for field in STATE_FIELDS:
        if not isinstance(ckpt["state"].get(field), int):
            raise CheckpointError(f"{path} has no valid 'state.{field}' entry — {fix}")


def load_checkpoint(path: Path) -> dict:
    """The training checkpoint at ``path``, refused in one line when it is a plain model.pth or lacks a field."""
    ckpt = load_torch(path)
    if not is_minigpt_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a training checkpoint (a plain model.pth cannot resume: it has no "
                              "optimizer state) — pass the run's checkpoint.pt")
    check_checkpoint_fields(ckpt, path)
    return ckpt


def check_resume_flags(args, ckpt: dict, path: Path) -> None:
    """Refuse model and tokenizer flags that contradict the checkpoint being resumed, naming the flag."""
    cfg = ckpt["config"]
    fix = "drop it to resume, or start a new run in another --out-dir"
    recorded = ckpt.get("preset")
    if args.preset is not None and args.preset != recorded:
        p = get_preset(args.preset)
        shape_differs = any(getattr(p, f) != cfg.get(f) for f in ("emb_dim", "n_layers", "n_heads",
                                                                  "context_length"))
        if recorded is not None or shape_differs:
            raise ConfigError(f"--preset {args.preset} contradicts {path}, a {recorded or 'differently shaped'} "
                              f"model — {fix}")
    for field, flag in SHAPE_FLAGS.items():
        value = getattr(args, field)
        if value is not None and value != cfg.get(field):
            raise ConfigError(f"{flag} {value} contradicts {path}, trained with {field} {cfg.get(field)} — {fix}")
    if args.tokenizer not in (None, "auto") and args.tokenizer != ckpt.get("tokenizer"):
        raise ConfigError(f"--tokenizer {args.tokenizer} contradicts {path}, trained with the "
                          f"{ckpt.get('tokenizer')} tokenizer — {fix}")
    recorded_init = ckpt.get("init_from")
    if args.init_from is not None and pretrained.source_name(args.init_from) != recorded_init:
        was = f"initialised from {recorded_init}" if recorded_init else "trained from scratch"
        raise ConfigError(f"--init-from {args.init_from} contradicts {path}, {was} — {fix}")


def check_init_from_flags(args, weights: GPTConfig) -> str | None:
    """Refuse model and tokenizer flags that contradict the pretrained weights of ``--init-from`` (whose config is
    ``weights``), naming the flag; ``--drop-rate`` and a shorter ``--context-length`` are allowed. Returns the
    preset with the weights' shape (None when none has it)."""
    source = f"--init-from {args.init_from}"
    fix = "drop it: a pretrained model's shape comes from its weights"
    shape = ("emb_dim", "n_layers", "n_heads", "qkv_bias")
    if args.preset is not None:
        p = get_preset(args.preset)
        differs = [f for f in shape if getattr(p, f) != getattr(weights, f)]
        if differs:
            raise ConfigError(f"--preset {args.preset} contradicts {source}, whose weights have {differs[0]} "
                              f"{getattr(weights, differs[0])} — {fix}")
    for field, flag in SHAPE_FLAGS.items():
        value = getattr(args, field)
        if value is None:
            continue
        if field == "context_length":
            if value > weights.context_length:
                raise ConfigError(f"--context-length {value} is longer than the {weights.context_length} positions "
                                  f"{args.init_from} was trained with — use at most {weights.context_length}")
        elif value != getattr(weights, field):
            raise ConfigError(f"{flag} {value} contradicts {source}, whose weights have {field} "
                              f"{getattr(weights, field)} — {fix}")
    if args.tokenizer not in (None, "auto", "gpt2"):
        raise ConfigError(f"--tokenizer {args.tokenizer} contradicts {source}: GPT-2's weights need GPT-2's "
                          "tokenizer — drop --tokenizer")
    return args.preset or next((name for name, p in PRESETS.items()
                                if all(getattr(p, f) == getattr(weights, f) for f in (*shape, "vocab_size"))), None)


# ---------------------------------------------------------------------------------------------------------------
# What a resumed run must agree with: its data, and the optimizer's shapes


def token_fingerprint(train_tokens, val_tokens) -> str:
    """A hash of a run's train and validation token ids, which a resumed run must match: one sequential read of the
    token cache, at the disk's (or the page cache's) speed."""
    h = hashlib.blake2b(digest_size=16)
    for tokens in (train_tokens, val_tokens):
        h.update(f"{tokens.dtype.str}:{len(tokens)};".encode())
        for start in range(0, len(tokens), 1 << 24):  # 16M ids at a time: bounded memory
            h.update(np.ascontiguousarray(tokens[start:start + (1 << 24)]).tobytes())
    return h.hexdigest()


def check_same_data(info: dict, data_info: dict, fingerprint) -> None:
    """Refuse to resume on other data: ``info`` is what the checkpoint recorded, ``data_info`` this run's data and
    ``fingerprint()`` its token_fingerprint (called only when the checkpoint has one to compare)."""
    same_size = info.get("train_tokens") == data_info["train_tokens"]
    # a checkpoint of an older version records only the sizes; one that records the tokens' fingerprint is
    # compared by content: other text of the same length is other data too
    same_tokens = "fingerprint" not in info or info["fingerprint"] == fingerprint()
    if info and not (same_size and same_tokens):
        differs = (f"{info.get('train_tokens'):,} train tokens, this run has {data_info['train_tokens']:,}"
                   if not same_size else "other tokens (the same number, other text)")
        raise CheckpointError(
            f"--resume: the checkpoint was trained on {info.get('source')} with {differs} — pass the same "
            "--data, --max-docs and --tokenizer as the run that wrote it, or start a fresh run")


def load_optimizer_state(optimizer, scheduler, scaler, ckpt: dict, path: Path) -> None:
    """The optimizer, LR schedule and loss scaler of ``ckpt``, refused in one line when they do not fit the model
    (load_state_dict checks the groups' sizes, not the moments' shapes: those would fail at the first step)."""
    fix = "pass the checkpoint.pt this run wrote, or start a fresh run"
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        detail = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: the optimizer state does not fit the model "
                              f"({type(e).__name__}: {detail}) — {fix}") from None
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(f"{path}: the optimizer's {name} has shape {tuple(value.shape)} "
                                      f"for a parameter of shape {tuple(param.shape)} — {fix}")
