"""Training: ``python -m minigpt.train`` (and ``torchrun --nproc_per_node=N -m minigpt.train`` for several GPUs).

    python -m minigpt.train                                   # no GPU: a tiny model on a subset, a few minutes
    python -m minigpt.train --preset gpt2-124m --kernels triton --compile     # the seed's run, fast, on a GPU

Flow: arguments -> config -> tokenizer -> data (token cache -> windows) -> model (asks its backend for the ops)
-> loss -> AdamW. Every ``--eval-interval`` steps: train/val loss, a sample from a fixed prompt, the checkpoint,
metrics.csv and the loss plot, all written atomically to ``--out-dir``. ``--resume auto`` continues a stopped run
exactly where it stopped: weights, optimizer, LR schedule, loss scaler, data position and random state.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import pretrained
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    is_minigpt_checkpoint,
    load_model_state,
    load_torch,
    save_torch,
)
from .config import PRESETS, ConfigError, GPTConfig, get_preset
from .distributed import (
    abandon_distributed,
    agreed_stop_signal,
    all_reduce_mean,
    finish_distributed,
    init_distributed,
    shutdown_distributed,
)
from .files import check_writable, exclusive_lock, remove_stale_temps
from .generate import check_float_flag, check_prompt
from .metrics import save_loss_plot, write_metrics_csv
from .model import GPTModel, seed_state_dict
from .runtime import (
    check_seed,
    peak_flops,
    resolve_device,
    resolve_dtype,
    rng_state,
    set_rng_state,
)
from .token_windows import WindowSampler
from .train_config import (
    CPU_DEFAULTS,
    CPU_PRESET,
    DTYPE_NAMES,
    TrainConfig,
    cpu_demo_note,
    is_cpu_demo,
    resolve_config,
)

DEFAULTS = TrainConfig()  # the seed notebook's settings (its OTHER_SETTINGS), the flags' defaults
# The lock a run holds on its --out-dir from set-up to exit: one run per folder, or their files would interleave.
OUT_DIR_LOCK = ".minigpt.lock"
# What a run writes into its --out-dir besides checkpoint.pt (and TensorBoard's event files in tb/)
RUN_FILES = ("model.pth", "metrics.csv", "loss.pdf", "loss.png")
TB_EVENTS = "events.out.tfevents.*"  # the names TensorBoard's SummaryWriter gives its files

class _Unset:
    """Marks a flag the command line did not give, while ``GivenFlagsParser`` parses (and only then)."""


class GivenFlagsParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``parse_args`` also records which flags were given, as ``args.given_flags``.

    A resumed run continues its checkpoint's settings unless a flag is given again, and only the command line can
    tell ``--grad-clip 1.0`` (given, with the default's value) from no ``--grad-clip`` at all: the values alone
    cannot. Parsing starts from a namespace where every flag is unset; what the actions set was given, the rest
    gets its default."""

    def parse_known_args(self, args=None, namespace=None):
        flags = [a for a in self._actions if argparse.SUPPRESS not in (a.dest, a.default)]  # not --help
        probe = argparse.Namespace(**{a.dest: _Unset for a in flags})
        ns, rest = super().parse_known_args(args, probe)
        given = set()
        for action in flags:
            if getattr(ns, action.dest) is _Unset:
                setattr(ns, action.dest, action.default)
            else:
                given.add(action.dest)
        if namespace is not None:  # parse into the caller's namespace, as ArgumentParser does
            vars(namespace).update(vars(ns))
            ns = namespace
        ns.given_flags = frozenset(given)
        return ns, rest


def build_parser() -> argparse.ArgumentParser:
    p = GivenFlagsParser(prog="python -m minigpt.train", description="Train a GPT from scratch.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"model size; default: gpt2-124m on a GPU, {CPU_PRESET} on a CPU")
    g.add_argument("--emb-dim", type=int, default=None, help="override the preset's emb_dim")
    g.add_argument("--n-layers", type=int, default=None, help="override the preset's n_layers")
    g.add_argument("--n-heads", type=int, default=None, help="override the preset's n_heads")
    g.add_argument("--context-length", type=int, default=None, help="override the preset's context_length")
    g.add_argument("--drop-rate", type=float, default=None, help="override the preset's drop_rate")
    g.add_argument("--qkv-bias", action="store_true", default=None, help="biases in the query/key/value layers")
    g.add_argument("--init-from", default=None, metavar="NAME|PATH",
                   help="fine-tune GPT-2's weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl (Hugging Face hub) or a "
                        "folder in its format (config.json + model.safetensors); the model's shape is theirs")
    g.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels backend: auto = triton on CUDA when installed, else torch")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="tinystories (default) | stories (generated, offline) | hf:NAME[:CONFIG] | a .txt file, folder "
                        "or glob; --resume reuses the checkpoint's")
    g.add_argument("--text-field", default="text", help="text column of an hf: dataset")
    g.add_argument("--max-docs", type=int, default=None,
                   help=f"use only the first N documents (default: all; CPU demo: {CPU_DEFAULTS['max_docs']})")
    g.add_argument("--tokenizer", default=None, choices=["auto", "gpt2", "bytes"],
                   help="auto (default) = GPT-2 BPE, or bytes when its files cannot be loaded offline; CPU demo: bytes")
    g.add_argument("--train-ratio", type=float, default=0.9, help="train share where the source has no val split")
    g.add_argument("--cache-dir", default=None, help="token cache (default $MINIGPT_CACHE or ~/.cache/minigpt)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"windows per micro-batch per GPU (default {DEFAULTS.batch_size}; CPU demo: "
                        f"{CPU_DEFAULTS['batch_size']})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {DEFAULTS.lr:g}; CPU demo: {CPU_DEFAULTS['lr']:g})")
    g.add_argument("--min-lr", type=float, default=None, help="cosine decay ends here (default lr/10; = lr: constant)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up steps before the cosine decay (default 0; CPU demo: "
                        f"{CPU_DEFAULTS['warmup_steps']})")
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW decay of weight matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision: auto = bf16 on GPUs that have it, else fp32; fp16 uses a GradScaler")
    g.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    g.add_argument("--max-steps", type=int, default=None,
                   help=f"total optimizer steps of the run, resumed parts included (default: epochs decide; "
                        f"CPU demo: {CPU_DEFAULTS['max_steps']})")
    g = p.add_argument_group("run")
    g.add_argument("--eval-interval", type=int, default=None,
                   help=f"steps between evaluations and checkpoints (default 100; CPU demo: "
                        f"{CPU_DEFAULTS['eval_interval']})")
    g.add_argument("--eval-iters", type=int, default=20, help="batches per loss estimate")
    g.add_argument("--sample-prompt", default=DEFAULTS.sample_prompt, help="prompt of the sample printed after each eval")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=int, default=123)
    g.add_argument("--out-dir", default="out")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; auto = OUT_DIR/checkpoint.pt if it exists, else start fresh")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out-dir that holds another run's checkpoint or model.pth (that "
                        "run's files are removed at this run's first save)")
    g.add_argument("--log", default=None, choices=["tensorboard"], help="also log to TensorBoard (OUT_DIR/tb)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per evaluation)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Settings that depend on the machine, and flags that contradict each other


# Every float flag and the values it may take: (low, high, low_open, high_open), as check_float_flag reads them.
FLOAT_FLAG_RANGES = {
    "lr": (0.0, math.inf, True, True),
    "min_lr": (0.0, math.inf, False, True),  # and at most --lr, checked once --lr has its default
    "weight_decay": (0.0, math.inf, False, True),
    "grad_clip": (0.0, math.inf, False, True),  # 0 = off
    "train_ratio": (0.0, 1.0, True, True),  # both splits need tokens
    "drop_rate": (0.0, 1.0, False, True),  # 1 would drop everything (GPTConfig checks its field again)
}


def check_float_flags(args) -> None:
    """Refuse a float flag that is NaN, infinite or out of its range, one line each; flags left unset (None) wait
    for their defaults."""
    for name, (low, high, low_open, high_open) in FLOAT_FLAG_RANGES.items():
        value = getattr(args, name)
        if value is not None:
            check_float_flag(f"--{name.replace('_', '-')}", value, low, high, low_open, high_open)


def check_args(args) -> None:
    """Reject impossible or contradictory flags with one line each (before any work is done)."""
    for name in ("batch_size", "epochs", "eval_interval", "eval_iters", "grad_accum"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "warmup_steps"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.max_docs is not None and args.max_docs < 1:
        raise ConfigError(f"--max-docs must be >= 1, got {args.max_docs}")
    check_float_flags(args)  # again: a resumed run takes the flags it was not given from its checkpoint
    if args.min_lr is not None and args.min_lr > args.lr:
        raise ConfigError(f"--min-lr must be between 0 and --lr ({args.lr}), got {args.min_lr}")
    check_seed(args.seed)


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """An --out-dir that can be a folder: named (an empty one would be the current folder), not a file, and not
    under one."""
    if not str(out_dir).strip():
        raise ConfigError("--out-dir is empty — name a folder (e.g. --out-dir out, or --out-dir . for this one)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file — choose a folder (it is created if missing)")
    parent = next(p for p in out_dir.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--out-dir {out_dir}: {parent} is a file, not a folder — choose another --out-dir")
    if not out_dir.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"--out-dir {out_dir}: no permission to create it in {parent} — choose another --out-dir")


def attention_backend_name(kernels: str, device: torch.device) -> str:
    """Which backend ("torch" or "triton") will run the model's ops on ``device`` for ``--kernels``."""
    from kernels import get_backend

    backend = get_backend(kernels)
    resolved = getattr(backend, "resolved_name", None)
    return resolved(device) if resolved is not None else backend.name


def check_head_dim(cfg: GPTConfig, kernels: str, device: torch.device) -> None:
    """The triton attention kernel holds one head's (BLOCK, head_dim) tiles on chip, up to its MAX_HEAD_DIM: refuse a
    wider head before tokenizing, not at the first forward."""
    if attention_backend_name(kernels, device) != "triton":
        return
    from kernels.attention import MAX_HEAD_DIM

    if cfg.head_dim <= MAX_HEAD_DIM:
        return
    heads = next(n for n in range(cfg.n_heads, cfg.emb_dim + 1)
                 if cfg.emb_dim % n == 0 and cfg.emb_dim // n <= MAX_HEAD_DIM)
    raise ConfigError(f"head dim {cfg.head_dim} (emb_dim {cfg.emb_dim} / {cfg.n_heads} heads) is above the triton "
                      f"attention kernel's limit of {MAX_HEAD_DIM} — use --kernels torch, or for a new model "
                      f"--n-heads {heads} (or another number of heads that divides {cfg.emb_dim})")


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


def divergence_advice(args) -> str:
    """What to change after a NaN or infinite loss, given what this run used."""
    tips = [f"a lower --lr (now {args.lr:g})"]
    tips.append("--warmup-steps 100" if not args.warmup_steps else f"a longer --warmup-steps (now {args.warmup_steps})")
    if not args.grad_clip or args.grad_clip > 1.0:
        tips.append(f"--grad-clip 1.0 (now {args.grad_clip:g}{', off' if not args.grad_clip else ''})")
    if args.dtype == "fp16":
        tips.append("--dtype bf16 where the GPU has it")
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]


def check_compile(args, device: torch.device) -> None:
    if not args.compile:
        return
    if args.kernels == "triton" and device.type != "cuda":
        raise ConfigError("--compile with --kernels triton needs a CUDA GPU (the Triton interpreter cannot be "
                          "compiled) — drop --compile, or use --kernels torch")


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device | str = "cpu"):
    """AdamW with weight decay on the weight matrices of the Linear layers only.

    Biases and LayerNorm scale/shift are offsets and gains, not capacity: decaying them only pulls the model away
    from the identity. The embeddings are excluded too: a row of ``tok_emb`` is updated only when its token occurs,
    but decay would shrink every row at every step, rare tokens toward zero. (nanoGPT decays embeddings; minGPT
    does not. We follow minGPT.)
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and not name.startswith(("tok_emb", "pos_emb"))
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=torch.device(device).type == "cuda")


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Factor of the peak LR at a step: linear warm-up, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps <= warmup_steps:
            return 1.0
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------------------------
# Loss


def calc_loss_batch(input_batch, target_batch, model, device) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch (B, T) -> float32 scalar (the seed's function of the same name).

    The seed computed ``F.cross_entropy(model(x).flatten(0, 1), y.flatten())``, the (B*T, V) logits whole; the
    model's ``targets=`` path gives the same number through the backend's fused linear + cross-entropy, without
    them (minigpt/model.py)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    return model(input_batch, targets=target_batch)


@torch.no_grad()
def calc_loss_loader(data_loader, model, device, num_batches: int | None = None) -> float:
    """Average loss over the first ``num_batches`` batches (the seed's calc_loss_loader)."""
    total, n = 0.0, 0
    for i, (x, y) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        total += calc_loss_batch(x, y, model, device).item()
        n += 1
    return total / n if n else float("nan")


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run. ``fit()`` does the work; ``on_step(trainer)`` (optional) is called after every step.

    ``with trainer:`` around ``setup()`` and ``fit()`` is the run's life: from set-up until the block ends, rank 0
    holds a lock on --out-dir, so that a second run into the same folder stops at once instead of interleaving
    its files with this one's (``train()`` and the command line do this). A bare ``setup()`` takes no lock: it
    serves to inspect a set-up."""

    def __init__(self, config, on_step=None):
        # the settings as given (a TrainConfig, or build_parser()'s Namespace); setup() resolves them
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_namespace(config)
        self.on_step = on_step
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal that stopped the run (the exit status is 128 + it)
        self.pretrained_model: GPTModel | None = None  # --init-from: GPT-2's weights, loaded in setup()
        self.init_from: str | None = None  # and where they came from (recorded in every checkpoint)
        self.out_dir: Path | None = None  # set (and locked) by setup()
        self.resume_from: Path | None = None
        self.resumed_step: int | None = None
        self.locking = False  # set by `with trainer:`
        self.held = contextlib.ExitStack()  # the --out-dir lock, held until the `with` block ends
        self.earlier_run_files: list[Path] = []  # --overwrite: the replaced run's files, removed at the first save
        # What a Ctrl-C or a failed save leaves on disk depends on how far saving got (kept_note)
        self.saves_started = 0
        self.saving = False
        self.saved_step: int | None = None  # the step of this run's checkpoint.pt on disk (rank 0)

    # -- set-up --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from .data import load_token_splits
        from .tokenizer import get_tokenizer, tokenizer_from_name

        args = self.config
        check_float_flags(args)  # the flags alone, before a device, a process group or a checkpoint is opened
        check_prompt(args.sample_prompt, "--sample-prompt")
        self.dist, device_name = init_distributed(args.device)
        self.device = device = resolve_device(device_name)
        resolve_dtype(args.dtype, device)  # refused now if impossible; resolved once --dtype has its final value
        check_compile(args, device)
        check_out_dir(args.out_dir)
        self.out_dir = Path(args.out_dir)
        self._open_out_dir()  # before any file of it is read: another run may be writing there
        self.resume_from = self._resume_path()
        self._refuse_to_overwrite()
        ckpt = load_torch(self.resume_from) if self.resume_from else None
        if ckpt is not None and not is_minigpt_checkpoint(ckpt):
            raise CheckpointError(f"{self.resume_from} is not a training checkpoint (a plain model.pth cannot resume: "
                                  "it has no optimizer state) — pass the run's checkpoint.pt")
        if ckpt is not None:  # model flags may repeat the checkpoint's model, never change it
            check_checkpoint_fields(ckpt, self.resume_from)
            check_resume_flags(args, ckpt, self.resume_from)
        elif args.resume == "auto":
            self.log(f"--resume auto: no checkpoint in {self.out_dir}, starting a fresh run")
        fine_tune = args.init_from is not None and ckpt is None
        if is_cpu_demo(args, device, resuming=ckpt is not None, fine_tune=fine_tune):
            self.log(f"note: {cpu_demo_note(resolve_config(args, device))}")
        self.config = args = resolve_config(args, device, ckpt, fine_tune)  # from here on, the run's settings
        check_args(args)
        self.dtype = {name: dtype for dtype, name in DTYPE_NAMES.items()}[args.dtype]
        preset = args.preset

        torch.manual_seed(args.seed + self.dist.rank)  # ranks draw different dropout masks
        random.seed(args.seed + self.dist.rank)
        if ckpt is not None:  # the checkpoint's model; only its dropout rate may change (nanoGPT's rule too)
            self.tokenizer = tokenizer_from_name(ckpt["tokenizer"])
            self.cfg = GPTConfig.from_any(ckpt["config"])
            self.init_from = ckpt.get("init_from")
            if args.drop_rate is not None and args.drop_rate != self.cfg.drop_rate:
                self.log(f"note: --drop-rate {args.drop_rate:g} replaces the checkpoint's {self.cfg.drop_rate:g}")
                self.cfg = self.cfg.with_overrides(drop_rate=args.drop_rate)
        elif args.init_from is not None:  # GPT-2's weights: their shape, GPT-2's tokenizer
            preset = self._load_pretrained()
        else:
            self.tokenizer = get_tokenizer(args.tokenizer)
            self.cfg = get_preset(preset).with_overrides(
                vocab_size=self.tokenizer.n_vocab, emb_dim=args.emb_dim, n_layers=args.n_layers,
                n_heads=args.n_heads, context_length=args.context_length, drop_rate=args.drop_rate,
                qkv_bias=args.qkv_bias)
        self.preset = preset
        check_head_dim(self.cfg, args.kernels, device)
        # empty: start from end-of-text, as minigpt.generate does (a model needs at least one token to continue)
        self.sample_ids = self.tokenizer.encode(args.sample_prompt) or [self.tokenizer.eot_token]
        # Rank 0 tokenizes into the cache while the others wait, then they all read the same files.
        barrier = torch.distributed.barrier if self.dist.enabled else (lambda: None)
        if not self.dist.is_main:
            barrier()
        self.train_tokens, self.val_tokens, self.data_info = load_token_splits(
            args.data, self.tokenizer, max_docs=args.max_docs, text_field=args.text_field,
            train_ratio=args.train_ratio, cache_dir=args.cache_dir)
        if self.dist.is_main:
            barrier()
        self._build_loaders()

        if self.pretrained_model is not None:
            self.raw_model = self.pretrained_model.train().to(device)  # from_pretrained returns it in eval mode
        else:
            self.raw_model = GPTModel(self.cfg, kernels=args.kernels).to(device)
        self.model = self.raw_model
        if args.compile:
            self.model = torch.compile(self.model)
        self.eval_model = self.model  # evaluation runs outside DDP: ranks evaluate different batches
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = configure_optimizer(self.raw_model, args.lr, args.weight_decay, device)
        min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
        self.lr_factor = lr_lambda(args.warmup_steps, self.total_steps, min_lr / args.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.state = {"step": 0, "epoch": 0, "epoch_windows": 0, "tokens_seen": 0}
        self.rows: list[dict] = []
        if ckpt is not None:
            self._restore(ckpt)
        self.flops_per_token = self.raw_model.flops_per_token(self.cfg.context_length)
        self.peak = peak_flops(device)
        self.tb = self._tensorboard() if args.log == "tensorboard" and self.dist.is_main else None

        backend = getattr(self.raw_model.backend, "resolved_name", lambda d: self.raw_model.kernels)(device)
        cfg = self.cfg
        self.log(f"model: {preset or 'custom'}"
                 + (f" initialised from {self.init_from}" if self.init_from else "")
                 + f" {self.raw_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layers} layers, "
                 f"emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, context {cfg.context_length}; kernels: {backend}; "
                 f"device: {device}; dtype: {str(self.dtype).replace('torch.', '')}"
                 + (f"; {self.dist.world_size} processes" if self.dist.enabled else ""))
        self.log(f"data: {self.data_info['source']} — {self.data_info['train_tokens']:,} train / "
                 f"{self.data_info['val_tokens']:,} val tokens ({self.tokenizer.name} tokenizer, vocab "
                 f"{self.tokenizer.n_vocab}); {self.steps_per_epoch} steps per epoch of {self.tokens_per_step:,} "
                 f"tokens")
        if self.resume_from:
            self.log(f"resumed from {self.resume_from} at step {self.state['step']}")

    def _load_pretrained(self) -> str | None:
        """--init-from: check the flags against the weights' config.json, then load GPT-2's tokenizer and the
        weights (sets tokenizer, cfg, pretrained_model, init_from); returns the preset of the weights' shape."""
        args = self.config
        weights = pretrained.config_from_hf(pretrained.read_hf_config(pretrained.find_folder(args.init_from)),
                                            args.init_from)
        preset = check_init_from_flags(args, weights)
        self.tokenizer = pretrained.gpt2_tokenizer()  # never the byte fallback: GPT-2's ids are BPE ids
        if self.tokenizer.n_vocab != weights.vocab_size:
            raise ConfigError(f"--init-from {args.init_from} has vocab_size {weights.vocab_size}, but GPT-2's "
                              f"tokenizer has {self.tokenizer.n_vocab} tokens — pass a model with GPT-2's "
                              "vocabulary")
        self.pretrained_model = GPTModel.from_pretrained(args.init_from, kernels=args.kernels,
                                                         drop_rate=args.drop_rate,
                                                         context_length=args.context_length)
        self.cfg = self.pretrained_model.cfg
        self.init_from = pretrained.source_name(args.init_from)
        return preset

    def _open_out_dir(self) -> None:
        """Rank 0 creates --out-dir, checks that it can be written and locks it (inside `with trainer:`; the ranks
        share the folder); every rank learns whether that worked, so that none waits for a rank 0 that gave up."""
        error = None
        if self.dist.is_main:
            try:
                self._lock_out_dir()
            except (CheckpointError, ConfigError) as e:  # Busy is a CheckpointError
                error = e
        if self._all_ranks_ok(error is None):
            return
        raise error or ConfigError(f"rank 0 could not open --out-dir {self.out_dir} (its error says why) — fix "
                                   "that and start the run again")

    def _lock_out_dir(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            check_writable(self.out_dir)  # a read-only folder or filesystem: now, not at the first save
        except OSError as e:
            raise ConfigError(f"--out-dir {self.out_dir} cannot be written ({e.strerror or e}) — choose another "
                              "--out-dir, or make this one writable") from None
        if self.locking:
            self.held.enter_context(exclusive_lock(
                self.out_dir / OUT_DIR_LOCK, f"--out-dir {self.out_dir}",
                "another run is writing there: wait for it to end, or choose another --out-dir"))

    def _all_ranks_ok(self, ok: bool) -> bool:
        if not self.dist.enabled:
            return ok
        import torch.distributed as dist

        failed = torch.tensor([0 if ok else 1], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        return failed.item() == 0

    def __enter__(self) -> Trainer:
        self.locking = True
        return self

    def __exit__(self, *exc) -> None:
        self.held.close()  # the run is over, however it ended: release --out-dir

    def _refuse_to_overwrite(self) -> None:
        """A run that does not continue OUT_DIR/checkpoint.pt (a fresh one, or one resumed from elsewhere) would
        replace the files of the run there: refuse unless --overwrite says so. With it, that run's files are
        removed at this run's first save (see save()), not now: a run that fails before it has saved anything
        (bad data, no memory) must not have cost the user the earlier run."""
        existing = self.out_dir / "checkpoint.pt"
        if self.resume_from is not None and existing.exists() and self.resume_from.resolve() == existing.resolve():
            return
        if self.config.overwrite:
            self.earlier_run_files = [p for p in (self.out_dir / n for n in RUN_FILES) if p.exists()]
            self.earlier_run_files += sorted((self.out_dir / "tb").glob(TB_EVENTS))
            return
        if existing.exists():
            raise ConfigError(f"{self.out_dir} already holds a checkpoint at step {checkpoint_step(existing)}: "
                              "--resume auto to continue it, or another --out-dir / --overwrite to start over")
        if (self.out_dir / "model.pth").exists():
            raise ConfigError(f"{self.out_dir} already holds the model.pth of an earlier run: another --out-dir, or "
                              "--overwrite to replace it")

    def _resume_path(self) -> Path | None:
        r = self.config.resume
        if r is None:
            return None
        if r == "auto":
            path = Path(self.config.out_dir) / "checkpoint.pt"
            return path if path.exists() else None
        path = Path(r)
        if not path.exists():
            raise CheckpointError(f"--resume {r}: no such checkpoint — check the path, or use --resume auto")
        return path

    def _build_loaders(self) -> None:
        from torch.utils.data import DataLoader

        from .data import DataError, TokenWindows

        args, ctx, d = self.config, self.cfg.context_length, self.dist
        # stride = context_length: windows do not overlap, as the seed's loaders
        train_windows = TokenWindows(self.train_tokens, ctx, ctx)
        val_windows = TokenWindows(self.val_tokens, ctx, ctx)
        global_batch = args.batch_size * d.world_size * args.grad_accum
        if len(train_windows) < global_batch:
            need = (global_batch - 1) * ctx + ctx + 1
            raise DataError(
                f"the training split has {len(self.train_tokens):,} tokens: {len(train_windows)} windows of "
                f"{ctx}, but one step needs {global_batch} ({need:,} tokens) — use more data (--max-docs), "
                "a smaller --context-length or a smaller --batch-size / --grad-accum")
        if len(val_windows) < 1:
            raise DataError(
                f"the validation split has {len(self.val_tokens):,} tokens, fewer than the {ctx + 1} one window of "
                f"context {ctx} needs — use more data (--max-docs) or a smaller --context-length")
        self.train_sampler = WindowSampler(len(train_windows), args.batch_size, d.world_size, d.rank, shuffle=True,
                                           seed=args.seed, drop_last=True, accum=args.grad_accum)
        # Each DataLoader draws a seed when it is iterated; a private generator keeps that draw out of the global
        # random stream, so dropout masks do not depend on how often loaders were started (exact resume).
        def loader(dataset, **kw):
            return DataLoader(dataset, batch_size=args.batch_size, generator=torch.Generator(), **kw)

        self.train_loader = loader(train_windows, sampler=self.train_sampler)
        # Evaluation reads fixed batches (the same ones every time, so the curve is smooth), shared across ranks.
        eval_n = min(len(train_windows), args.eval_iters * args.batch_size * d.world_size)
        self.train_eval_loader = loader(torch.utils.data.Subset(train_windows, range(eval_n)))
        self.val_loader = loader(val_windows)
        self.steps_per_epoch = len(train_windows) // global_batch
        self.tokens_per_step = global_batch * ctx
        total = self.steps_per_epoch * args.epochs
        self.total_steps = total if args.max_steps is None else min(total, args.max_steps)

    def _restore(self, ckpt: dict) -> None:
        info = ckpt.get("data", {})
        same_size = info.get("train_tokens") == self.data_info["train_tokens"]
        # a checkpoint of an older version records only the sizes; one that records the tokens' fingerprint is
        # compared by content: other text of the same length is other data too
        same_tokens = "fingerprint" not in info or info["fingerprint"] == self.data_fingerprint()
        if info and not (same_size and same_tokens):
            differs = (f"{info.get('train_tokens'):,} train tokens, this run has {self.data_info['train_tokens']:,}"
                       if not same_size else "other tokens (the same number, other text)")
            raise CheckpointError(
                f"--resume: the checkpoint was trained on {info.get('source')} with {differs} — pass the same "
                "--data, --max-docs and --tokenizer as the run that wrote it, or start a fresh run")
        load_model_state(self.raw_model, ckpt["model"], str(self.resume_from))
        self._load_optimizer_state(ckpt)
        self._apply_this_runs_hyperparameters()
        # AdamW's moments in their parameter's memory order (a checkpoint may have saved another; the fused
        # CUDA optimizer walks a parameter and its moments as flat arrays, so the orders must agree)
        for param, state in self.optimizer.state.items():
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
        self.state = dict(ckpt["state"])
        self.resumed_step = self.state["step"]
        self.rows = list(ckpt.get("metrics", []))
        ranks = ckpt.get("rng", [])
        if self.dist.rank < len(ranks):
            set_rng_state(ranks[self.dist.rank], self.device)

    def data_fingerprint(self) -> str:
        """A hash of this run's train and validation token ids, which a resumed run must match. Computed once per
        run: one sequential read of the token cache (about a second per GB)."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.blake2b(digest_size=16)
            for tokens in (self.train_tokens, self.val_tokens):
                h.update(f"{tokens.dtype.str}:{len(tokens)};".encode())
                for start in range(0, len(tokens), 1 << 24):  # 16M ids at a time: bounded memory
                    h.update(np.ascontiguousarray(tokens[start:start + (1 << 24)]).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _apply_this_runs_hyperparameters(self) -> None:
        """After a restore: this run's --lr, --min-lr, --warmup-steps and --weight-decay (the checkpoint's, unless
        given again). The optimizer's and the scheduler's state dicts carry the values they were saved with
        (each group's lr and weight decay, the scheduler's base lr) and would silently keep them; the schedule's
        shape (warm-up, cosine, floor) is this run's already, being a function the state dict does not hold."""
        lr, step = self.config.lr, self.scheduler.last_epoch
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for group, decay in zip(self.optimizer.param_groups, (self.config.weight_decay, 0.0)):
            group["initial_lr"] = lr
            group["lr"] = lr * self.lr_factor(step)  # the rate of the next step, as the scheduler would have set it
            group["weight_decay"] = decay  # configure_optimizer's groups: weight matrices, then the rest
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _load_optimizer_state(self, ckpt: dict) -> None:
        """The optimizer, LR schedule and loss scaler of ``ckpt``, refused in one line when they do not fit the
        model (load_state_dict checks the groups' sizes, not the moments' shapes: those would fail at the first
        step)."""
        fix = "pass the checkpoint.pt this run wrote, or start a fresh run"
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            detail = (str(e).splitlines() or [""])[0]
            raise CheckpointError(f"{self.resume_from}: the optimizer state does not fit the model "
                                  f"({type(e).__name__}: {detail}) — {fix}") from None
        for param, state in self.optimizer.state.items():
            for name, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise CheckpointError(f"{self.resume_from}: the optimizer's {name} has shape {tuple(value.shape)} "
                                          f"for a parameter of shape {tuple(param.shape)} — {fix}")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--log tensorboard needs the tensorboard package — pip install tensorboard") from None
        return SummaryWriter(str(self.out_dir / "tb"))

    # -- output --------------------------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        bar = getattr(self, "bar", None)
        (bar.write if bar is not None and not bar.disable else print)(msg)

    def save(self, final: bool = False) -> None:
        """checkpoint.pt (+ model.pth at the end), metrics.csv, loss plot; rank 0 writes, every rank's RNG kept."""
        rng = [rng_state(self.device)]
        if self.dist.enabled:
            import torch.distributed as dist

            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, rng_state(self.device))
        self.saves_started += 1
        if not self.dist.is_main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(), "tokenizer": self.tokenizer.name, "preset": self.preset,
            "init_from": self.init_from,  # where the weights came from (None: trained from scratch)
            "step": self.state["step"], "state": dict(self.state), "metrics": self.rows, "rng": rng,
            "data": {**{k: v for k, v in self.data_info.items() if isinstance(v, (int, float, str))},
                     "fingerprint": self.data_fingerprint()},
            "args": self.config.record(),  # the settings that ran, by flag name (resume reads them back)
        }
        self.saving = True
        self._remove_earlier_run()
        save_torch(ckpt, self.out_dir / "checkpoint.pt")
        self.saved_step = self.state["step"]
        if final:
            save_torch(seed_state_dict(self.raw_model), self.out_dir / "model.pth")
        if self.rows:
            write_metrics_csv(self.out_dir / "metrics.csv", self.rows)
            save_loss_plot(self.out_dir, self.rows)
        self.saving = False

    def kept_note(self) -> str:
        """What a run that stops now (a failed save, Ctrl-C) leaves behind."""
        if self.saved_step is not None:
            return (f"the last good checkpoint is kept: {self.out_dir / 'checkpoint.pt'} at step {self.saved_step} "
                    "(continue with --resume auto)")
        if getattr(self, "dist", None) is not None and not self.dist.is_main and self.saves_started:
            return f"rank 0 writes {self.out_dir}: its message says what is kept"
        if self.resume_from is not None:
            at = f" (step {self.resumed_step})" if self.resumed_step is not None else ""
            return f"{self.resume_from} is kept as it was{at}"
        return "no checkpoint of this run was written"

    def interrupted_note(self) -> str:
        """The line for a run stopped at once (Ctrl-C): during set-up, while saving, or between saves."""
        if self.saves_started == 0:
            return "interrupted before training started: nothing was written"
        return f"interrupted{' while saving' if self.saving else ''}: {self.kept_note()}"

    def _remove_earlier_run(self) -> None:
        """--overwrite, at the first save: remove the replaced run's model.pth, metrics, plots and TensorBoard
        events before this run's checkpoint.pt replaces theirs (in one rename, last). Whenever this stops, the
        folder holds one run's files: the earlier run's (a subset), or this run's."""
        while self.earlier_run_files:
            self.earlier_run_files[0].unlink(missing_ok=True)
            self.earlier_run_files.pop(0)

    def evaluate(self, grad_norm: float | None, tokens_per_s: float | None) -> None:
        self.eval_model.eval()
        with self._autocast():
            losses = []
            for loader in (self.train_eval_loader, self.val_loader):
                total, count = 0.0, 0
                with torch.no_grad():
                    # eval_iters global batches, each rank its share; weighted by tokens, so that the estimate
                    # is the same for any split of the batch over ranks
                    for i, (x, y) in enumerate(loader):
                        if i >= self.config.eval_iters * self.dist.world_size:
                            break
                        if i % self.dist.world_size == self.dist.rank:
                            total += calc_loss_batch(x, y, self.eval_model, self.device).item() * y.numel()
                            count += y.numel()
                losses.append((total, count))
        self.eval_model.train()
        train_loss, val_loss = all_reduce_mean([l for l, _ in losses], [c for _, c in losses], self.dist, self.device)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise NonFiniteLoss(f"evaluation loss is {train_loss} / {val_loss} at step {self.state['step']}")
        mfu = self._mfu(tokens_per_s)
        row = {"step": self.state["step"], "epoch": self.state["epoch"], "tokens_seen": self.state["tokens_seen"],
               "train_loss": train_loss, "val_loss": val_loss, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
               "elapsed_s": time.time() - self.t0}
        self.rows.append(row)
        self.log(f"step {row['step']:>6} (epoch {row['epoch'] + 1}): train loss {train_loss:.3f}, "
                 f"val loss {val_loss:.3f}")
        if self.tb is not None:
            for k in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if row[k] is not None:
                    self.tb.add_scalar(k, row[k], row["step"])
            self.tb.flush()
        if self.dist.is_main:
            with self._autocast():
                self.log(f"sample: {self.sample()}")
        self.save()

    def sample(self, max_new_tokens: int = 50) -> str:
        """The greedy continuation of --sample-prompt (the seed's sample after each evaluation), on one line."""
        from .generate import generate

        model = self.raw_model
        was_training = model.training
        model.eval()
        idx = torch.tensor([self.sample_ids], dtype=torch.long, device=self.device)  # (1, T)
        out = generate(model, idx, max_new_tokens, self.cfg.context_length, eos_id=self.tokenizer.eot_token)
        model.train(was_training)
        new_text = self.tokenizer.decode(out[0, idx.shape[1]:].tolist())
        return (self.config.sample_prompt + new_text).replace("\n", " ")

    def _mfu(self, tokens_per_s: float | None) -> float | None:
        if not tokens_per_s or self.peak is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak * self.dist.world_size)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- the loop ------------------------------------------------------------------------------------------------

    def train_step(self, micro_batches) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, gradient norm before clipping)."""
        args, model = self.config, self.model
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients in backward(); on all but the last micro-batch that would be wasted work
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else model.no_sync()
            with sync:
                with self._autocast():
                    loss = calc_loss_batch(x, y, model, self.device) / len(micro_batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = total.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"training loss is {loss_value} at step {self.state['step'] + 1}")
        self.scaler.unscale_(self.optimizer)
        max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm).item()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        args, st = self.config, self.state
        if self.resume_from and (st["step"] >= self.total_steps or st["epoch"] >= args.epochs):
            self.log(f"nothing to do: {self.resume_from} is at step {st['step']} (epoch {st['epoch']}) and this run "
                     f"ends at step {self.total_steps} — raise --max-steps or --epochs to train further; "
                     "nothing was written")
            return self._summary(interrupted=False, saved=False)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            remove_stale_temps(self.out_dir)  # left by a run killed while saving (kill -9, a power cut)
        self.t0 = time.time()
        self.bar = tqdm(total=self.total_steps, initial=st["step"], unit="step", dynamic_ncols=True,
                        disable=args.no_progress or not self.dist.is_main)
        old_handlers = self._install_signal_handlers()
        tokens_per_s, grad_norm = None, None
        try:
            if st["step"] == 0 and not self.rows:
                self.evaluate(None, None)
            while st["step"] < self.total_steps and st["epoch"] < args.epochs and not self.stop_requested:
                self.train_sampler.set_epoch(st["epoch"], st["epoch_windows"])
                batches = iter(self.train_loader)
                epoch_done = False
                while st["step"] < self.total_steps and not self.stop_requested:
                    micro = [b for _, b in zip(range(args.grad_accum), batches)]
                    if len(micro) < args.grad_accum:
                        epoch_done = True
                        break
                    t = time.time()
                    loss, grad_norm = self.train_step(micro)
                    st["step"] += 1
                    st["tokens_seen"] += self.tokens_per_step
                    st["epoch_windows"] += self.tokens_per_step // self.cfg.context_length
                    rate = self.tokens_per_step / max(time.time() - t, 1e-9)
                    tokens_per_s = rate if tokens_per_s is None else 0.9 * tokens_per_s + 0.1 * rate
                    mfu = self._mfu(tokens_per_s)
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                         **({"mfu": f"{100 * mfu:.0f}%"} if mfu else {}))
                    if self.on_step is not None:
                        self.on_step(self)
                    if st["step"] % args.eval_interval == 0 or st["step"] == self.total_steps:
                        self.evaluate(grad_norm, tokens_per_s)
                    self._agree_to_stop()
                if epoch_done:
                    st["epoch"] += 1
                    st["epoch_windows"] = 0
            if self.stop_requested:
                self.log(f"stopped at step {st['step']} ({signal.Signals(self.stop_signal).name}): saving "
                         f"{self.out_dir / 'checkpoint.pt'} (continue with --resume auto)")
            self.save(final=True)
            # the other ranks wait here while rank 0 writes, still under the handlers: a second signal to any rank
            # now is "stop at once" too, not a wait in train()'s barrier for a rank that has gone
            finish_distributed()
        except KeyboardInterrupt:  # a second signal: stop now, in the middle of a step
            return self._stop_at_once()
        except RuntimeError as e:
            if not self._lost_a_stopping_rank(e):
                raise
            return self._stop_at_once(lost=e)
        finally:
            self.bar.close()
            self._restore_signal_handlers(old_handlers)
            if self.tb is not None:
                self.tb.close()
        if self.dist.is_main:
            self.log(f"done: {st['step']} steps, {st['tokens_seen']:,} tokens in {time.time() - self.t0:.0f}s; wrote "
                     f"{self.out_dir}/checkpoint.pt, model.pth, metrics.csv, loss.pdf, loss.png")
        return self._summary(interrupted=self.stop_requested, saved=True)

    def _summary(self, interrupted: bool, saved: bool) -> dict:
        return {"steps": self.state["step"], "tokens_seen": self.state["tokens_seen"], "metrics": self.rows,
                "out_dir": str(self.out_dir), "interrupted": interrupted, "saved": saved, "preset": self.preset,
                "config": self.cfg, "signal": self.stop_signal if interrupted else None}

    def _agree_to_stop(self) -> None:
        """After every step, on every rank: stop if any rank has received a signal (see agreed_stop_signal)."""
        agreed = agreed_stop_signal(self.signal_received or 0, self.dist, self.device)
        if agreed:
            self.stop_requested, self.stop_signal = True, agreed

    def _stop_at_once(self, lost: RuntimeError | None = None) -> dict:
        """A second signal, or another rank that stopped at once (``lost``): no save, and no collective either —
        the other ranks may be in the middle of a step and never reach it."""
        abandon_distributed()
        self.stop_requested = True
        self.stop_signal = self.stop_signal or self.signal_received or signal.SIGINT
        # gloo's message: "[file:line] Connection closed by peer [address]. This is typically caused by ..."
        why = "" if lost is None else f"another process left the run ({str(lost).strip().split('. ')[0]}); "
        self.log(why + self.interrupted_note())
        return self._summary(interrupted=True, saved=False)

    def _lost_a_stopping_rank(self, e: RuntimeError) -> bool:
        """Whether a failed collective most likely means another rank stopped at once: only a rank that was asked
        to stop itself (a signal came, to it or to another rank) reads it so; any other error is raised."""
        if isinstance(e, (NonFiniteLoss, torch.cuda.OutOfMemoryError)):
            return False
        return self.dist.enabled and (self.signal_received or self.stop_signal) is not None

    def _install_signal_handlers(self):
        """First Ctrl-C (or SIGTERM from a scheduler): finish the step, save, exit. A second one: stop at once.

        A signal only marks this process; the ranks of a multi-process run stop together, after the first step
        that ends with any of them marked (_agree_to_stop), so one signal to one rank stops them all."""
        # a repeat this soon is the same request delivered twice, not a second one: a terminal sends Ctrl-C to
        # every process of the job and torchrun forwards the signal it got to its workers as well
        same_request_s = 1.0
        self.signal_received: int | None = None
        first_at = 0.0

        def handler(signum, frame):
            nonlocal first_at
            if self.signal_received is None:
                self.signal_received, first_at = signum, time.monotonic()
                self.log("stopping after this step (Ctrl-C again to stop at once)")
            elif time.monotonic() - first_at > same_request_s:
                raise KeyboardInterrupt

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)
        if self.dist.enabled and self.stop_requested and signal.SIGTERM in old:
            # torchrun sends SIGTERM to the other workers as soon as one exits with an error status, as each does
            # here (128 + the signal): a worker that has stopped and is leaving too must not die of it on its way
            # out. SIG_IGN, not a Python handler: the interpreter puts back SIG_DFL for those when it shuts down,
            # and shutting torch down takes long enough for the SIGTERM to land then.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train(config, on_step=None) -> dict:
    """Run training with ``config``: a ``TrainConfig`` (e.g. ``TrainConfig.from_args(["--preset", "tiny"])``) or
    ``build_parser()``'s Namespace, the settings as given; returns a summary dict."""
    return run_trainer(Trainer(config, on_step))


def run_trainer(trainer: Trainer) -> dict:
    """Set up and fit ``trainer``; the --out-dir lock is held from set-up until this returns or raises."""
    try:
        with trainer:
            trainer.setup()
            summary = trainer.fit()
            finish_distributed()  # every rank done before any tears the process group down
        return summary
    except NonFiniteLoss as e:
        out = Path(trainer.config.out_dir) / "checkpoint.pt"  # the resolved settings: set-up has finished
        raise SystemExit(f"error: {e} — the run diverged; the last good checkpoint is kept in {out}; "
                         f"{divergence_advice(trainer.config)}") from None
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("error: the GPU ran out of memory — lower --batch-size (and raise --grad-accum to keep the "
                         "same batch), a smaller --context-length or preset, or --dtype bf16") from None
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    from kernels.cli import run_cli

    args = build_parser().parse_args(argv)
    trainer = Trainer(args)
    # run_cli turns an OSError (a full disk, a file-size limit) into one line that says what is kept on disk, and a
    # closed stdout into a quiet exit; the project's errors and Ctrl-C are handled in _run, which knows the phase.
    status = run_cli(lambda: _run(trainer), kept=trainer.kept_note)
    if status:
        sys.exit(status)


def _run(trainer: Trainer) -> int:
    """The work of ``main``; returns the exit status. The project's errors leave as ``SystemExit("error: ...")``,
    which carries the one line to callers of ``main()`` as well as to the shell."""
    from kernels import BackendUnavailable

    from .data import DataError, TokenizingInterrupted
    from .tokenizer import TokenizerError

    try:
        summary = run_trainer(trainer)
    except TokenizingInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C outside the training loop's own handling (set-up): say what is on disk
        print(trainer.interrupted_note(), file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, BackendUnavailable, DataError, TokenizerError) as e:
        raise SystemExit(f"error: {e}") from None
    # saved or not, an interrupted program exits 128 + the signal, as the shell expects
    return 128 + summary["signal"] if summary["interrupted"] else 0


if __name__ == "__main__":
    main()
