"""A run's settings as one value: ``TrainConfig``, and ``resolve_config``, the one place they are decided.

The command line records which flags were given (``python -m minigpt.train --lr 1e-3`` gives one). Everything
else is filled in by ``resolve_config``, in this order, each rule a few lines below:

1. the defaults (the original notebook's settings);
2. the CPU demo: no GPU, no ``--preset``, not fine-tuning, not resuming -> a tiny model that trains in minutes;
3. fine-tuning (``--init-from``): GPT-2's tokenizer and a small learning rate;
4. resuming: the checkpoint's settings, except the flags given again (they win, whatever their value);
5. the machine: the device and the precision that will actually run.

What comes out is frozen, holds no "unset" markers, and is what the checkpoint records. The checks below it refuse
values no run can use (a negative batch size, --min-lr above --lr, a head too wide for the triton kernel), one line
each with the fix.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .config import ConfigError, GPTConfig
from .generate import check_float_flag
from .runtime import check_seed, resolve_dtype

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the names are the command line's flags (``--grad-clip`` -> ``grad_clip``)."""

    # model (None: the preset's value; the model's shape is decided with its tokenizer, in Trainer.setup)
    preset: str | None = None  # gpt2-124m on a GPU, tiny in the CPU demo; None: a shape no preset has
    emb_dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    context_length: int | None = None
    drop_rate: float | None = None
    qkv_bias: bool | None = None
    init_from: str | None = None  # fine-tune these GPT-2 weights (a hub name or a folder)
    kernels: str = "auto"  # triton on CUDA when installed, else torch
    compile: bool = False
    # data
    data: str = "tinystories"
    text_field: str = "text"
    max_docs: int | None = None  # None: every document
    tokenizer: str = "auto"  # GPT-2's BPE, or bytes when its files cannot be loaded offline
    train_ratio: float = 0.9  # the train share of a source without a validation split
    cache_dir: str | None = None  # None: $MINIGPT_CACHE or ~/.cache/minigpt
    # Attention inside each document of a window (each end-of-text opens a document), in training and evaluation.
    # Off by default, although every data source separates its documents with end-of-text: off, a run trains the
    # original notebook's model (attention across documents) and its losses compare with earlier runs', and a
    # checkpoint written before this setting existed resumes the way it started.
    doc_mask: bool = False
    # optimization
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float | None = None  # where the cosine ends; None: a tenth of lr (of a new --lr too, on resume)
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: off
    dtype: str = "auto"  # resolved to the precision that runs: bf16, fp16 or fp32
    epochs: int = 20
    max_steps: int | None = None  # None: the epochs decide
    # run
    eval_interval: int = 100
    eval_iters: int = 20
    sample_prompt: str = "Once upon a time"
    device: str = "auto"
    seed: int = 123
    out_dir: str = "out"
    resume: str | None = None  # a checkpoint path, or "auto": OUT_DIR/checkpoint.pt when there is one
    overwrite: bool = False
    log: str | None = None  # "tensorboard": also log there
    no_progress: bool = False
    # At this many steps spread over the run (the first and the last among them), the step's loss is computed again
    # by the torch backend on the same batch and weights, and the difference printed: our kernels checked while
    # they train. 0: never.
    compare_torch: int = 0
    # Which of the fields above the user gave (None: every field that differs from its default, for a config
    # built in Python). Not a setting: not compared, not recorded.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_args(cls, argv: list[str]) -> TrainConfig:
        """The settings of ``python -m minigpt.train ARGV``, as given (``resolve_config`` fills in the rest)."""
        from .train import build_parser

        return cls.from_namespace(build_parser().parse_args(argv))

    @classmethod
    def from_namespace(cls, args) -> TrainConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "given"}
        return cls(**values, given=getattr(args, "given_flags", None))

    def given_flags(self) -> frozenset[str]:
        if self.given is not None:
            return self.given
        defaults = TrainConfig()
        return frozenset(f.name for f in fields(self)
                         if f.name != "given" and getattr(self, f.name) != getattr(defaults, f.name))

    def record(self) -> dict:
        """What a checkpoint stores: every setting, by its flag's name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "given"}


DEFAULTS = TrainConfig()

# Step 2. With no GPU and no --preset the run is a CPU demo: the tiny preset with the byte tokenizer (a 257-row
# output layer instead of GPT-2's 50257 makes each token ~16x cheaper), a higher learning rate a model this small
# tolerates, on the first 2000 documents: minutes on 2 cores, with readable samples (README, "CPU demo").
CPU_PRESET = "tiny"
CPU_DEFAULTS = dict(lr=5e-3, batch_size=16, warmup_steps=50, eval_interval=250, tokenizer="bytes", max_docs=2000,
                    max_steps=1000)
# Step 2b. The same demo with --kernels triton: without a GPU our kernels run in Triton's interpreter, a Python loop
# over every program instance, about 2 s a step even for this smaller model (the tiny preset's step takes ~35 s
# there). So the model, the windows and the run shrink to what the interpreter trains in about three minutes on 2
# cores, and a few steps' losses are checked against the torch backend's on the same batch (--compare-torch).
INTERPRETER_DEFAULTS = dict(emb_dim=64, n_layers=2, n_heads=2, context_length=128, batch_size=8, lr=1e-2,
                            warmup_steps=10, max_steps=100, eval_interval=50, eval_iters=2, compare_torch=3)
# Step 3. Fine-tuning GPT-2 (--init-from): its weights already sit in a good minimum, and the from-scratch rate
# (close to GPT-2's own pre-training peak, 6e-4) would throw much of that away in the first steps. 3e-5 is nanoGPT's
# fine-tuning rate (config/finetune_shakespeare.py). GPT-2's ids are BPE ids: never the byte fallback.
FINETUNE_DEFAULTS = dict(lr=3e-5, tokenizer="gpt2")
# Step 4. What a resumed run takes from its checkpoint unless given again (the model's shape is the checkpoint's
# too, but that comes with its weights; flags contradicting it are refused in resume.check_resume_flags).
RESUMED_FLAGS = ("data", "max_docs", "text_field", "train_ratio", "tokenizer", "batch_size", "grad_accum", "lr",
                 "min_lr", "warmup_steps", "weight_decay", "grad_clip", "dtype", "epochs", "max_steps",
                 "eval_interval", "eval_iters", "seed", "kernels", "doc_mask")


def resolve_config(given: TrainConfig, device: torch.device, checkpoint: dict | None = None,
                   fine_tune: bool = False) -> TrainConfig:
    """The run's finished settings, from the flags as ``given`` and what the run found: the ``device`` it runs on,
    the ``checkpoint`` it resumes (None: a fresh run) and whether it fine-tunes GPT-2 (``--init-from``, fresh).
    Pure: reads nothing, changes nothing."""
    told = given.given_flags()
    # Step 1: the defaults, for every flag not given
    values = {f.name: getattr(given if f.name in told else DEFAULTS, f.name) for f in fields(TrainConfig)
              if f.name != "given"}

    def default(name, value):  # a rule's value for a flag the user did not give
        if name not in told:
            values[name] = value

    resuming = checkpoint is not None
    if is_cpu_demo(given, device, resuming, fine_tune):
        for name, value in {**CPU_DEFAULTS, **(INTERPRETER_DEFAULTS if given.kernels == "triton" else {})}.items():
            default(name, value)
        default("preset", CPU_PRESET)
    elif fine_tune and not resuming:
        for name, value in FINETUNE_DEFAULTS.items():
            default(name, value)
    elif not resuming and not fine_tune:
        default("preset", "gpt2-124m")
    if resuming:
        recorded = checkpoint.get("args", {})
        for name in RESUMED_FLAGS:
            if name in recorded:
                default(name, recorded[name])
        values["preset"] = checkpoint.get("preset") or values["preset"]
    # Step 5: the precision that runs here (an impossible one, fp16 on a CPU, is refused with its fix)
    values["dtype"] = DTYPE_NAMES[resolve_dtype(values["dtype"], device)]
    return TrainConfig(**values, given=told)


def is_cpu_demo(given: TrainConfig, device: torch.device, resuming: bool, fine_tune: bool) -> bool:
    """No GPU, no --preset, a fresh run from scratch: the CPU demo's settings (resuming one keeps its own)."""
    return (device.type != "cuda" and "preset" not in given.given_flags() and not resuming and not fine_tune)


def cpu_demo_note(config: TrainConfig) -> str:
    if config.kernels == "triton":
        return (f"no GPU and no --preset: our Triton kernels in the interpreter — a small model ({config.n_layers} "
                f"layers x {config.emb_dim}, context {config.context_length}), {config.max_steps} steps of "
                f"{config.batch_size} windows, the loss checked against the torch backend's at "
                f"{config.compare_torch} of them (about 3 minutes on 2 cores); --kernels torch for the full CPU demo")
    return (f"no GPU and no --preset: a CPU demo — preset '{CPU_PRESET}', {config.tokenizer} tokenizer, the first "
            f"{config.max_docs} documents, {config.max_steps} steps at lr {config.lr:g} (minutes on 2 cores); pass "
            "--preset gpt2-124m for the original notebook's run")


# ---------------------------------------------------------------------------------------------------------------
# The values a setting may take, and what the machine allows: checked before any work is done


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
    if args.compare_torch < 0:
        raise ConfigError(f"--compare-torch must be >= 0 (the number of steps to check), got {args.compare_torch}")
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

def check_compile(args, device: torch.device) -> None:
    if not args.compile:
        return
    if args.kernels == "triton" and device.type != "cuda":
        raise ConfigError("--compile with --kernels triton needs a CUDA GPU (the Triton interpreter cannot be "
                          "compiled) — drop --compile, or use --kernels torch")
