"""The training run: ``Trainer`` sets a run up, trains, evaluates, saves, and stops cleanly on a signal.

    trainer = Trainer(TrainConfig.from_args(["--preset", "tiny", "--max-steps", "100"]))
    with trainer:          # holds the --out-dir lock
        trainer.setup()    # device -> out-dir and checkpoint -> settings -> tokenizer -> data -> model -> AdamW
        trainer.fit()      # the loop: train_step, every --eval-interval steps evaluate() and save()

Set-up reads top to bottom as named steps (``setup``); the rules it applies live elsewhere: the settings in
train_config.py, the out-dir and resume rules in resume.py, the loss, optimizer and schedule in optim.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from pathlib import Path

import torch

from kernels.errors import MinigptError

from . import pretrained
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_model_state, save_torch
from .config import ConfigError, GPTConfig, get_preset
from .distributed import (
    abandon_distributed,
    all_reduce_mean,
    init_distributed,
    wait_for_all_ranks,
)
from .files import remove_stale_temps
from .generate import check_prompt
from .metrics import save_loss_plot, write_metrics_csv
from .model import GPTModel, notebook_state_dict
from .optim import (
    calc_loss_batch,
    calc_loss_loader,
    configure_optimizer,
    lr_lambda,
    match_moment_layout,
    optimizer_step,
    set_hyperparameters,
)
from .resume import (
    check_init_from_flags,
    check_resume_flags,
    check_same_data,
    earlier_run_files,
    load_checkpoint,
    load_optimizer_state,
    open_out_dir,
    resume_path,
    token_fingerprint,
)
from .runtime import cpu_threads, peak_flops, resolve_device, resolve_dtype, rng_state, set_rng_state
from .stopping import StopRequests
from .token_windows import training_loaders
from .train_config import (
    DTYPE_NAMES,
    TrainConfig,
    check_args,
    check_compile,
    check_float_flags,
    check_head_dim,
    check_out_dir,
    cpu_demo_note,
    is_cpu_demo,
    resolve_config,
)


class NonFiniteLoss(MinigptError, RuntimeError):
    """A NaN or infinite loss: the run has diverged (train.py's run_trainer adds what to change)."""


class GPUOutOfMemory(MinigptError, RuntimeError):
    """The GPU ran out of memory while training; the message says what to make smaller."""


class Trainer:
    """One training run. ``fit()`` does the work; ``on_step(trainer)`` (optional) is called after every step.

    ``with trainer:`` around ``setup()`` and ``fit()`` is the run's life: from set-up until the block ends, rank 0
    holds a lock on --out-dir, so that a second run into the same folder stops at once instead of interleaving
    its files with this one's (``train()`` and the command line do this). A bare ``setup()`` takes no lock: it
    serves to inspect a set-up."""

    def __init__(self, config, on_step=None):
        # Given: the settings as given (a TrainConfig, or build_parser()'s Namespace), which setup() resolves into
        # the run's settings; and a callback after every step
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_namespace(config)
        self.on_step = on_step

        # Where the run lives (_open_run): --out-dir, locked inside `with trainer:`, and the checkpoint it resumes
        self.out_dir: Path | None = None
        self.resume_from: Path | None = None  # None: a fresh run
        self.resumed_step: int | None = None
        self.locking = False  # set by `with trainer:`
        self.held = contextlib.ExitStack()  # the --out-dir lock, held until the `with` block ends
        self.earlier_run_files: list[Path] = []  # --overwrite: the replaced run's files, removed at the first save

        # What the loop reads, built once by setup()'s steps: dist, device, dtype (_start_distributed); tokenizer,
        # cfg, preset, doc_eot (_build_tokenizer_and_model_config); the loaders and step counts (_build_data);
        # raw_model, model, eval_model (_build_model); optimizer, scheduler, scaler (_build_optimizer)
        self.pretrained_model: GPTModel | None = None  # --init-from: GPT-2's weights
        self.init_from: str | None = None  # and where they came from (recorded in every checkpoint)

        # What the run writes as it goes: its position (step, epoch, windows into the epoch, tokens seen), the
        # metrics rows, and how far saving got (what a Ctrl-C or a failed save leaves on disk: kept_note)
        self.state: dict = {}  # set by _restore
        self.rows: list[dict] = []
        self.saves_started = 0
        self.saving = False
        self.saved_step: int | None = None  # the step of this run's checkpoint.pt on disk (rank 0)

        # How it stops: the signals received, and the one the run stops on (stopping.py)
        self.stop = StopRequests(self.log)

    # -- set-up --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything ``fit()`` needs, in the order each step depends on the ones before it."""
        check_float_flags(self.config)  # the flags alone, before a device, a process group or a checkpoint is opened
        check_prompt(self.config.sample_prompt, "--sample-prompt")
        self._start_distributed()
        ckpt = self._open_run()
        self._resolve(ckpt)
        self._seed()
        self._build_tokenizer_and_model_config(ckpt)
        self._build_data()
        self._build_model()
        self._build_optimizer()
        self._restore(ckpt)
        self._start_reporting()

    def _start_distributed(self) -> None:
        """Join the process group (torchrun) or run alone, and pick this process's device; a --dtype or --compile
        this device cannot run is refused now."""
        args = self.config
        self.dist, device_name = init_distributed(args.device)
        self.device = resolve_device(device_name)
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.dist.enabled else 1
        self.cpu_threads = cpu_threads(ranks_here) if self.device.type == "cpu" else None
        resolve_dtype(args.dtype, self.device)  # refused now if impossible; resolved once --dtype has its final value
        check_compile(args, self.device)

    def _open_run(self) -> dict | None:
        """Lock --out-dir, find the checkpoint to resume and refuse to overwrite another run's files; returns the
        checkpoint (None: a fresh run)."""
        args = self.config
        check_out_dir(args.out_dir)
        self.out_dir = Path(args.out_dir)
        # before any file of it is read: another run may be writing there (locked inside `with trainer:` only)
        open_out_dir(self.out_dir, self.dist, self.device, self.held if self.locking else None)
        self.resume_from = resume_path(args.resume, args.out_dir)
        self.earlier_run_files = earlier_run_files(self.out_dir, self.resume_from, args.overwrite)
        if self.resume_from is None:
            if args.resume == "auto":
                self.log(f"--resume auto: no checkpoint in {self.out_dir}, starting a fresh run")
            return None
        ckpt = load_checkpoint(self.resume_from)
        check_resume_flags(args, ckpt, self.resume_from)  # model flags may repeat the checkpoint's, never change it
        return ckpt

    def _resolve(self, ckpt: dict | None) -> None:
        """The run's settings: the flags as given, completed by resolve_config (train_config.py)."""
        args = self.config
        fine_tune = args.init_from is not None and ckpt is None
        if is_cpu_demo(args, self.device, resuming=ckpt is not None, fine_tune=fine_tune):
            self.log(f"note: {cpu_demo_note(resolve_config(args, self.device))}")
        self.config = resolve_config(args, self.device, ckpt, fine_tune)  # from here on, the run's settings
        check_args(self.config)
        self.dtype = {name: dtype for dtype, name in DTYPE_NAMES.items()}[self.config.dtype]

    def _seed(self) -> None:
        """Seed the random streams; ranks draw different dropout masks."""
        torch.manual_seed(self.config.seed + self.dist.rank)
        random.seed(self.config.seed + self.dist.rank)

    def _build_tokenizer_and_model_config(self, ckpt: dict | None) -> None:
        """The tokenizer and the model's GPTConfig: the checkpoint's, GPT-2's (--init-from), or the preset's with
        the flags' overrides."""
        from .tokenizer import get_tokenizer, tokenizer_from_name

        args = self.config
        self.preset = args.preset
        if ckpt is not None:  # the checkpoint's model; only its dropout rate may change (nanoGPT's rule too)
            self.tokenizer = tokenizer_from_name(ckpt["tokenizer"])
            self.cfg = GPTConfig.from_any(ckpt["config"])
            self.init_from = ckpt.get("init_from")
            if args.drop_rate is not None and args.drop_rate != self.cfg.drop_rate:
                self.log(f"note: --drop-rate {args.drop_rate:g} replaces the checkpoint's {self.cfg.drop_rate:g}")
                self.cfg = self.cfg.with_overrides(drop_rate=args.drop_rate)
        elif args.init_from is not None:  # GPT-2's weights: their shape, GPT-2's tokenizer
            self.preset = self._load_pretrained()
        else:
            self.tokenizer = get_tokenizer(args.tokenizer)
            self.cfg = get_preset(args.preset).with_overrides(
                vocab_size=self.tokenizer.n_vocab, emb_dim=args.emb_dim, n_layers=args.n_layers,
                n_heads=args.n_heads, context_length=args.context_length, drop_rate=args.drop_rate,
                qkv_bias=args.qkv_bias)
        check_head_dim(self.cfg, args.kernels, self.device)
        # --doc-mask: the id each document ends with, from which every batch's document ids are counted (the loss
        # functions' eot_token); None: attention crosses documents
        self.doc_eot = self.tokenizer.eot_token if args.doc_mask else None
        # empty: start from end-of-text, as minigpt.generate does (a model needs at least one token to continue)
        self.sample_ids = self.tokenizer.encode(args.sample_prompt) or [self.tokenizer.eot_token]

    def _build_data(self) -> None:
        """The token splits (rank 0 tokenizes into the cache while the others wait, then they all read the same
        files) and the loaders over their windows."""
        from . import data

        args = self.config
        barrier = torch.distributed.barrier if self.dist.enabled else (lambda: None)
        if not self.dist.is_main:
            barrier()
        self.train_tokens, self.val_tokens, self.data_info = data.load_token_splits(
            args.data, self.tokenizer, max_docs=args.max_docs, text_field=args.text_field,
            train_ratio=args.train_ratio, cache_dir=args.cache_dir)
        if self.dist.is_main:
            barrier()
        loaders = training_loaders(self.train_tokens, self.val_tokens, self.cfg.context_length, args.batch_size,
                                   args.grad_accum, args.eval_iters, self.dist.world_size, self.dist.rank, args.seed)
        self.train_loader, self.train_sampler = loaders.train, loaders.sampler
        self.train_eval_loader, self.val_loader = loaders.train_eval, loaders.val
        self.steps_per_epoch, self.tokens_per_step = loaders.steps_per_epoch, loaders.tokens_per_step
        total = self.steps_per_epoch * args.epochs
        self.total_steps = total if args.max_steps is None else min(total, args.max_steps)

    def _build_model(self) -> None:
        """The model on its device: ``raw_model`` (what is saved), ``model`` (compiled and wrapped in DDP: what
        trains) and ``eval_model`` (compiled, outside DDP: ranks evaluate different batches)."""
        if self.pretrained_model is not None:
            self.raw_model = self.pretrained_model.train().to(self.device)  # from_pretrained returns it in eval mode
        else:
            self.raw_model = GPTModel(self.cfg, kernels=self.config.kernels).to(self.device)
        self.model = self.raw_model
        if self.config.compile:
            self.model = torch.compile(self.model)
        self.eval_model = self.model
        self.compare_at, self.torch_twin, self.compared = self._comparison_steps(), None, []
        if self.compare_at:  # the same architecture on PyTorch's own ops: our kernels' losses checked against it
            self.torch_twin = GPTModel(self.cfg, kernels="torch").to(self.device).eval()
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _comparison_steps(self) -> set[int]:
        """The steps --compare-torch checks: N spread evenly from the first step to the last."""
        n, last = min(self.config.compare_torch, self.total_steps), self.total_steps
        if n == 0:
            return set()
        return {1 + round(i * (last - 1) / max(n - 1, 1)) for i in range(n)}

    def _build_optimizer(self) -> None:
        """AdamW, the warm-up + cosine schedule (min_lr defaults to a tenth of lr) and the fp16 loss scaler."""
        args = self.config
        self.optimizer = configure_optimizer(self.raw_model, args.lr, args.weight_decay, self.device)
        min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
        self.lr_factor = lr_lambda(args.warmup_steps, self.total_steps, min_lr / args.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def _restore(self, ckpt: dict | None) -> None:
        """Where the run starts: step 0, or exactly where ``ckpt`` stopped (weights, optimizer, schedule, scaler,
        data position, metrics and every rank's random state), on the same data and with this run's
        hyperparameters."""
        self.state = {"step": 0, "epoch": 0, "epoch_windows": 0, "tokens_seen": 0}
        self.rows: list[dict] = []
        if ckpt is None:
            return
        check_same_data(ckpt.get("data", {}), self.data_info, self.data_fingerprint)
        load_model_state(self.raw_model, ckpt["model"], str(self.resume_from))
        load_optimizer_state(self.optimizer, self.scheduler, self.scaler, ckpt, self.resume_from)
        # this run's --lr, --min-lr, --warmup-steps and --weight-decay (the checkpoint's, unless given again)
        set_hyperparameters(self.optimizer, self.scheduler, self.config.lr, self.config.weight_decay, self.lr_factor)
        match_moment_layout(self.optimizer)
        self.state = dict(ckpt["state"])
        self.resumed_step = self.state["step"]
        self.rows = list(ckpt.get("metrics", []))
        ranks = ckpt.get("rng", [])
        if self.dist.rank < len(ranks):
            set_rng_state(ranks[self.dist.rank], self.device)

    def _start_reporting(self) -> None:
        """What evaluations report (MFU's FLOPs and the device's peak, TensorBoard), and the set-up in two lines."""
        self.flops_per_token = self.raw_model.flops_per_token(self.cfg.context_length)
        self.peak = peak_flops(self.device)
        self.tb = self._tensorboard() if self.config.log == "tensorboard" and self.dist.is_main else None
        backend = getattr(self.raw_model.backend, "resolved_name", lambda d: self.raw_model.kernels)(self.device)
        self.backend_name = backend
        cfg = self.cfg
        self.log(f"model: {self.preset or 'custom'}"
                 + (f" initialised from {self.init_from}" if self.init_from else "")
                 + f" {self.raw_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layers} layers, "
                 f"emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, context {cfg.context_length}; kernels: {backend}; "
                 f"device: {self.device}" + (f" ({self.cpu_threads} thread{'s' if self.cpu_threads > 1 else ''})" if self.cpu_threads else "")
                 + f"; dtype: {str(self.dtype).replace('torch.', '')}"
                 + (f"; {self.dist.world_size} processes" if self.dist.enabled else ""))
        self.log(f"data: {self.data_info['source']} — {self.data_info['train_tokens']:,} train / "
                 f"{self.data_info['val_tokens']:,} val tokens ({self.tokenizer.name} tokenizer, vocab "
                 f"{self.tokenizer.n_vocab}); {self.steps_per_epoch} steps per epoch of {self.tokens_per_step:,} "
                 f"tokens"
                 + ("; attention masked to each document (--doc-mask: each end-of-text opens a document)"
                    if self.doc_eot is not None else ""))
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

    def __enter__(self) -> Trainer:
        self.locking = True
        return self

    def __exit__(self, *exc) -> None:
        self.held.close()  # the run is over, however it ended: release --out-dir

    def data_fingerprint(self) -> str:
        """This run's token_fingerprint (resume.py), computed once per run."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = token_fingerprint(self.train_tokens, self.val_tokens)
        return self._fingerprint

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
            save_torch(notebook_state_dict(self.raw_model), self.out_dir / "model.pth")
        if self.rows:
            write_metrics_csv(self.out_dir / "metrics.csv", self.rows)
        if len(self.rows) >= 2:  # a line needs two evaluations (and drawing the first costs ~0.5 s of start-up)
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
        """Train and val loss (``--eval-iters`` batches each, over every rank), then a metrics row, a sample and
        a checkpoint."""
        self.eval_model.eval()
        sums = []
        with self._autocast():
            for loader in (self.train_eval_loader, self.val_loader):
                # eval_iters global batches, each rank its share; weighted by tokens, so that the estimate is the
                # same for any split of the batch over ranks
                sums.append(calc_loss_loader(loader, self.eval_model, self.device, self.config.eval_iters,
                                             rank=self.dist.rank, world_size=self.dist.world_size,
                                             token_weighted=True, as_sum=True, eot_token=self.doc_eot))
        self.eval_model.train()
        train_loss, val_loss = all_reduce_mean([s for s, _ in sums], [n for _, n in sums], self.dist, self.device)
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
        """The greedy continuation of --sample-prompt (the original notebook's sample after each evaluation), on one
        line."""
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
                    loss = calc_loss_batch(x, y, model, self.device, self.doc_eot) / len(micro_batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = total.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"training loss is {loss_value} at step {self.state['step'] + 1}")
        if self.state["step"] + 1 in self.compare_at:
            self._compare_with_torch(micro_batches, loss_value)
        grad_norm = optimizer_step(self.optimizer, self.raw_model.parameters(), args.grad_clip, self.scaler,
                                   self.scheduler)
        return loss_value, grad_norm.item()

    @torch.no_grad()
    def _compare_with_torch(self, micro_batches, loss_value: float) -> None:
        """--compare-torch: this step's loss again, by the torch backend on the same batch and the same weights (the
        optimizer has not stepped yet), and the difference logged. Dropout draws different masks in the two
        backends, so with dropout on the check is skipped and says so."""
        step = self.state["step"] + 1
        if self.cfg.drop_rate > 0:
            self.log(f"step {step}: --compare-torch skipped: dropout ({self.cfg.drop_rate:g}) draws different masks "
                     "in the two backends")
            return
        self.torch_twin.load_state_dict(self.raw_model.state_dict())
        with self._autocast():
            theirs = sum(calc_loss_batch(x, y, self.torch_twin, self.device, self.doc_eot).item()
                         for x, y in micro_batches) / len(micro_batches)
        self.compared.append((step, abs(loss_value - theirs)))
        self.log(f"step {step}: loss {loss_value:.6f} with the {self.backend_name} backend, {theirs:.6f} with the "
                 f"torch backend on the same batch and weights (difference {abs(loss_value - theirs):.1e})")

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
        self.stop.install()
        tokens_per_s, grad_norm = None, None
        try:
            if st["step"] == 0 and not self.rows:
                self.evaluate(None, None)
            while st["step"] < self.total_steps and st["epoch"] < args.epochs and not self.stop.requested:
                self.train_sampler.set_epoch(st["epoch"], st["epoch_windows"])
                batches = iter(self.train_loader)
                epoch_done = False
                while st["step"] < self.total_steps and not self.stop.requested:
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
                    # the postfix without a redraw of its own: update() redraws, at most every 0.1 s
                    self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False,
                                         **({"mfu": f"{100 * mfu:.0f}%"} if mfu else {}))
                    self.bar.update(1)
                    if self.on_step is not None:
                        self.on_step(self)
                    if st["step"] % args.eval_interval == 0 or st["step"] == self.total_steps:
                        self.evaluate(grad_norm, tokens_per_s)
                    self.stop.agree(self.dist, self.device)
                if epoch_done:
                    st["epoch"] += 1
                    st["epoch_windows"] = 0
            if self.stop.requested:
                self.log(f"stopped at step {st['step']} ({signal.Signals(self.stop.signal).name}): saving "
                         f"{self.out_dir / 'checkpoint.pt'} (continue with --resume auto)")
            self.save(final=True)
            # the other ranks wait here while rank 0 writes, still under the handlers: a second signal to any rank
            # now is "stop at once" too, not a wait in train()'s barrier for a rank that has gone
            wait_for_all_ranks()
        except KeyboardInterrupt:  # a second signal: stop now, in the middle of a step
            return self._stop_at_once()
        except RuntimeError as e:
            if not self.stop.lost_a_stopping_rank(e, self.dist):
                raise
            return self._stop_at_once(lost=e)
        finally:
            self.bar.close()
            self.stop.restore(self.dist)
            if self.tb is not None:
                self.tb.close()
        if self.compared:
            steps, worst = [s for s, _ in self.compared], max(d for _, d in self.compared)
            self.log(f"--compare-torch: at steps {', '.join(map(str, steps))} the loss with the {self.backend_name} "
                     f"backend and with the torch backend differed by at most {worst:.1e}")
        if self.dist.is_main:
            self.log(f"done: {st['step']} steps, {st['tokens_seen']:,} tokens in {time.time() - self.t0:.0f}s; wrote "
                     f"{self.out_dir}/checkpoint.pt, model.pth, metrics.csv, loss.pdf, loss.png")
        return self._summary(interrupted=self.stop.requested, saved=True)

    def _summary(self, interrupted: bool, saved: bool) -> dict:
        return {"steps": self.state["step"], "tokens_seen": self.state["tokens_seen"], "metrics": self.rows,
                "out_dir": str(self.out_dir), "interrupted": interrupted, "saved": saved, "preset": self.preset,
                "config": self.cfg, "signal": self.stop.signal if interrupted else None,
                "compared_with_torch": list(getattr(self, "compared", []))}  # --compare-torch: (step, |difference|)

    def _stop_at_once(self, lost: RuntimeError | None = None) -> dict:
        """A second signal, or another rank that stopped at once (``lost``): no save, and no collective either —
        the other ranks may be in the middle of a step and never reach it."""
        abandon_distributed()
        self.stop.stop_now()
        # gloo's message: "[file:line] Connection closed by peer [address]. This is typically caused by ..."
        why = "" if lost is None else f"another process left the run ({str(lost).strip().split('. ')[0]}); "
        self.log(why + self.interrupted_note())
        return self._summary(interrupted=True, saved=False)
