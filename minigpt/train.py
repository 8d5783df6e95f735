"""Training: ``python -m minigpt.train`` (and ``torchrun --nproc_per_node=N -m minigpt.train`` for several GPUs).

    python -m minigpt.train                                   # no GPU: a tiny model on a subset, a few minutes
    python -m minigpt.train --preset gpt2-124m --kernels triton --compile     # the original notebook's run, fast, on a
    GPU

Flow: arguments -> config -> tokenizer -> data (token cache -> windows) -> model (asks its backend for the ops)
-> loss -> AdamW. Every ``--eval-interval`` steps: train/val loss, a sample from a fixed prompt, the checkpoint,
metrics.csv and the loss plot, all written atomically to ``--out-dir``. ``--resume auto`` continues a stopped run
exactly where it stopped: weights, optimizer, LR schedule, loss scaler, data position and random state.

This module is the command line: the flags (``build_parser``), ``train()`` and ``main``. The run itself is
``Trainer`` (trainer.py); its settings and their checks are in train_config.py, the out-dir and resume rules in
resume.py, the loss, AdamW and the LR schedule in optim.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kernels.errors import MinigptError

from .config import PRESETS, ConfigError
from .distributed import end_process, shutdown_distributed, wait_for_all_ranks, was_a_worker
from .optim import calc_loss_batch, calc_loss_loader, configure_optimizer, lr_lambda
from .resume import OUT_DIR_LOCK
from .train_config import CPU_DEFAULTS, CPU_PRESET, TrainConfig, check_head_dim
from .trainer import GPUOutOfMemory, NonFiniteLoss, Trainer

# What ``from minigpt.train import ...`` gives: the command line's own names, and the training API a reader of the
# original notebook looks for here (the loss functions, AdamW and the schedule live in optim.py, the run in trainer.py)
__all__ = ["GivenFlagsParser", "build_parser", "train", "run_trainer", "main", "divergence_advice", "Trainer",
           "TrainConfig", "NonFiniteLoss", "GPUOutOfMemory", "ConfigError", "calc_loss_batch", "calc_loss_loader",
           "configure_optimizer", "lr_lambda", "check_head_dim", "OUT_DIR_LOCK"]

DEFAULTS = TrainConfig()  # the original notebook's settings (its OTHER_SETTINGS), the flags' defaults


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
    g.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=DEFAULTS.doc_mask,
                   help="attention only inside each document of a window (each end-of-text opens a document), in "
                        "training and evaluation; --resume reuses the checkpoint's")
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
    g.add_argument("--sample-prompt", default=DEFAULTS.sample_prompt,
                   help="prompt of the sample printed after each eval")
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
    g.add_argument("--compare-torch", type=int, default=DEFAULTS.compare_torch, metavar="N",
                   help="at N steps spread over the run, compute the step's loss again with the torch backend on the "
                        "same batch and weights and print the difference (default 0: never)")
    return p


def divergence_advice(args) -> str:
    """What to change after a NaN or infinite loss, given what this run used."""
    tips = [f"a lower --lr (now {args.lr:g})"]
    tips.append("--warmup-steps 100" if not args.warmup_steps else f"a longer --warmup-steps (now {args.warmup_steps})")
    if not args.grad_clip or args.grad_clip > 1.0:
        tips.append(f"--grad-clip 1.0 (now {args.grad_clip:g}{', off' if not args.grad_clip else ''})")
    if args.dtype == "fp16":
        tips.append("--dtype bf16 where the GPU has it")
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]


def train(config, on_step=None) -> dict:
    """Run training with ``config``: a ``TrainConfig`` (e.g. ``TrainConfig.from_args(["--preset", "tiny"])``) or
    ``build_parser()``'s Namespace, the settings as given; returns a summary dict."""
    return run_trainer(Trainer(config, on_step))


def run_trainer(trainer: Trainer) -> dict:
    """Set up and fit ``trainer``; the --out-dir lock is held from set-up until this returns or raises. A user's
    problem leaves as a ``MinigptError`` whose message says what to do (a diverged run: what to change)."""
    try:
        with trainer:
            trainer.setup()
            summary = trainer.fit()
            wait_for_all_ranks()  # every rank done before any tears the process group down
        return summary
    except NonFiniteLoss as e:
        out = Path(trainer.config.out_dir) / "checkpoint.pt"  # the resolved settings: set-up has finished
        raise NonFiniteLoss(f"{e} — the run diverged; the last good checkpoint is kept in {out}; "
                            f"{divergence_advice(trainer.config)}") from None
    except torch.cuda.OutOfMemoryError:
        raise GPUOutOfMemory("the GPU ran out of memory — lower --batch-size (and raise --grad-accum to keep the "
                             "same batch), a smaller --context-length or preset, or --dtype bf16") from None
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    from kernels.cli import run_cli

    args = build_parser().parse_args(argv)
    trainer = Trainer(args)
    # run_cli turns an OSError (a full disk, a file-size limit) into one line that says what is kept on disk, and a
    # closed stdout into a quiet exit; the project's errors and Ctrl-C are handled in _run, which knows the phase.
    try:
        status = run_cli(lambda: _run(trainer), kept=trainer.kept_note)
    except SystemExit as e:  # the project's errors, "error: ...": a torchrun worker prints it and ends as below
        if not (was_a_worker() and isinstance(e.code, str)):
            raise
        print(e.code, file=sys.stderr)
        status = 1
    end_process(status)  # a torchrun worker ends at once: see end_process


def _run(trainer: Trainer) -> int:
    """The work of ``main``; returns the exit status. The project's errors leave as ``SystemExit("error: ...")``,
    which carries the one line to callers of ``main()`` as well as to the shell."""
    from .data import TokenizingInterrupted

    try:
        summary = run_trainer(trainer)
    except TokenizingInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C outside the training loop's own handling (set-up): say what is on disk
        print(trainer.interrupted_note(), file=sys.stderr)
        return 130
    except MinigptError as e:
        raise SystemExit(f"error: {e}") from None
    # saved or not, an interrupted program exits 128 + the signal, as the shell expects
    return 128 + summary["signal"] if summary["interrupted"] else 0


if __name__ == "__main__":
    main()
