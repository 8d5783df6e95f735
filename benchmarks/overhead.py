r"""What the trainer and the streaming generator cost beyond the model: each timed against the shortest correct loop
doing the same work, in one fresh process (not the benchmark's own), taking turns.

Training (``trainer_overhead``, printed by ``python -m benchmarks.train``). The CPU demo's run — the tiny preset,
the byte tokenizer, 16 windows of 128 tokens a step, the generated stories, its learning rate and warm-up — made
twice from the same seed:

    trainer     ``minigpt.train``'s Trainer, as ``python -m minigpt.train`` runs it: its data loader, the step with
                the loss read back, gradient clipping, AdamW, the schedule, the progress bar and its postfix, the
                stop-signal check, the evaluation test
    bare loop   the shortest correct loop: a batch of random windows sliced from the same training tokens
                (nanoGPT's ``get_batch``), ``model(x, targets=y)``, backward, clipping, AdamW, the schedule, zero grad

Taking turns: the Trainer calls back after each of its steps (``on_step``), and the callback runs one bare step. So
the Trainer's step i is the time from the end of the callback before it to the start of the callback after it, and
both meet the same machine, step by step. The overhead is (median trainer step - median bare step) / median bare
step; evaluations are outside it (the first comes before the loop, the last after the last callback), as they are
work a run asks for, not per-step cost.

Start-up: ``python -m minigpt.train`` with the same flags in a fresh process, from the moment it is launched to
the start of its first training step (imports, settings, tokenizer, token cache, model, AdamW, the first evaluation
with its sample and save), the median of ``--startup-runs`` runs after one that fills the token cache; each phase's
seconds come from the child's clock. Against it, the bare loop's start-up: import torch, build the model and AdamW,
slice a batch — the floor any loop in a fresh process pays.

Generation (``streaming_overhead``, printed by ``python -m benchmarks.generate``): ``minigpt.generate``'s streaming
loop (``generate_tokens``: a prefill, then one decoding step per token through the KV cache, the choice of the next
token, the end-of-text check) against the same steps written bare (``prefill``, ``decode_one``, argmax), greedy,
per token, taking turns generation by generation.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The CPU demo's settings (minigpt.train_config's CPU_DEFAULTS and CPU_PRESET), every one given, so that the run is
# the same on any device; --data stories: the generated corpus, which needs no network
DEMO_FLAGS = ["--preset", "tiny", "--tokenizer", "bytes", "--data", "stories", "--max-docs", "2000",
              "--batch-size", "16", "--lr", "5e-3", "--warmup-steps", "50", "--kernels", "torch"]
STARTUP_MARK = "minigpt-startup:"  # the start-up child's line with its timings
OVERHEAD_MARK = "minigpt-overhead:"  # the overhead child's


def demo_flags(out_dir: Path, steps: int, device: str, cache_dir: Path) -> list[str]:
    """minigpt.train's flags for ``steps`` steps of the demo into ``out_dir``: evaluation only at the first and the
    last step (--eval-interval = steps), the token cache in ``cache_dir``."""
    return DEMO_FLAGS + ["--max-steps", str(steps), "--eval-interval", str(steps), "--out-dir", str(out_dir),
                         "--device", device, "--cache-dir", str(cache_dir), "--overwrite"]


class TakingTurns:
    """The Trainer's ``on_step``: after each Trainer step, one bare step; records both steps' milliseconds."""

    def __init__(self, bare_step, sync):
        self.bare_step, self.sync = bare_step, sync
        self.trainer_ms: list[float] = []
        self.bare_ms: list[float] = []
        self.resumed: float | None = None  # when the Trainer got control back, after the last callback

    def __call__(self, trainer) -> None:
        self.sync()
        now = time.perf_counter()
        if self.resumed is not None:  # the first Trainer step, timed from nowhere, is its warm-up
            self.trainer_ms.append((now - self.resumed) * 1e3)
        self.bare_step()
        self.sync()
        done = time.perf_counter()
        self.bare_ms.append((done - now) * 1e3)
        self.resumed = time.perf_counter()


def bare_training_step(trainer):
    """The shortest correct training loop's step, on a model built like the Trainer's (same config, same seed, same
    backend) with the same AdamW groups and schedule, reading random windows of the Trainer's training tokens."""
    import numpy as np
    import torch

    from minigpt.model import GPTModel
    from minigpt.optim import configure_optimizer, lr_lambda

    args, cfg, device = trainer.config, trainer.cfg, trainer.device
    torch.manual_seed(args.seed)
    model = GPTModel(cfg, kernels=args.kernels).to(device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, trainer.total_steps, 0.1))
    tokens = torch.from_numpy(np.array(trainer.train_tokens, dtype=np.int64))  # read into memory once
    T, B = cfg.context_length, args.batch_size
    autocast = (torch.autocast(device.type, dtype=trainer.dtype) if trainer.dtype != torch.float32
                else contextlib.nullcontext())

    def step():
        starts = torch.randint(len(tokens) - T - 1, (B,)).tolist()
        x = torch.stack([tokens[s:s + T] for s in starts]).to(device)
        y = torch.stack([tokens[s + 1:s + T + 1] for s in starts]).to(device)
        with autocast:
            loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    step.model = model
    return step


def trainer_overhead(steps: int, device, workdir: Path) -> dict:
    """The Trainer and the bare loop for ``steps`` steps each, taking turns; their per-step medians and the
    overhead in %. The Trainer's output (log lines, progress bar) goes to /dev/null: its cost is kept, its text
    not printed."""
    import torch

    from minigpt.train import run_trainer
    from minigpt.train_config import TrainConfig
    from minigpt.trainer import Trainer

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    turns = {}

    class Timed(Trainer):
        def fit(self):  # the bare model is built after set-up, from the Trainer's own settings and tokens
            turns["on_step"] = self.on_step = TakingTurns(bare_training_step(self), sync)
            return super().fit()

    config = TrainConfig.from_args(demo_flags(workdir / "run", steps, device.type, workdir / "cache"))
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        run_trainer(Timed(config))
    on_step = turns["on_step"]
    trainer_ms, bare_ms = on_step.trainer_ms, on_step.bare_ms[1:]  # the bare loop's first step: its warm-up
    t, b = statistics.median(trainer_ms), statistics.median(bare_ms)
    return dict(steps=steps, threads=torch.get_num_threads(), trainer_ms=t, bare_ms=b,
                overhead_pct=100 * (t - b) / b, trainer_iqr_ms=_iqr(trainer_ms), bare_iqr_ms=_iqr(bare_ms),
                trainer_fastest_ms=min(trainer_ms), bare_fastest_ms=min(bare_ms))


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return [q[0], q[2]]


# ----------------------------------------------------------------------------------------------------------------
# Start-up, in fresh processes


def startup(runs: int, device, workdir: Path, timeout_s: float = 300.0) -> dict:
    """Seconds from launch to the first step: ``python -m minigpt.train`` (the demo's flags, one step) ``runs`` times
    after one untimed run that fills the token cache, and the bare loop's floor as many times; medians, with the
    Trainer's phases from its median run."""
    launch = [sys.executable, "-c", "import benchmarks.overhead as o; o.startup_child()"]
    flags = demo_flags(workdir / "startup", 1, device.type, workdir / "cache")
    _child(launch + ["trainer"] + flags, timeout_s)  # fills the cache
    trainer = sorted((_child(launch + ["trainer"] + flags, timeout_s) for _ in range(runs)),
                     key=lambda r: r["first_step_s"])
    bare = sorted(_child(launch + ["bare", device.type], timeout_s)["first_step_s"] for _ in range(runs))
    median_run = trainer[(len(trainer) - 1) // 2]
    return dict(runs=runs, trainer_s=median_run["first_step_s"], bare_s=bare[(len(bare) - 1) // 2],
                trainer_phases_s=median_run["phases_s"], trainer_all_s=[r["first_step_s"] for r in trainer])


def _child_env() -> dict:
    """The children's environment: this one, with the checkout importable (PYTHONPATH) wherever they start."""
    root = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, MPLBACKEND=os.environ.get("MPLBACKEND", "Agg"),
                PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def _child(cmd: list[str], timeout_s: float) -> dict:
    launched = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith(STARTUP_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"start-up run failed ({' '.join(cmd[3:6])}...): {(proc.stderr or proc.stdout)[-500:]}")
    result = json.loads(lines[-1][len(STARTUP_MARK):])
    result["first_step_s"] = result.pop("first_step_at") - launched
    return result


# The Trainer's set-up steps, in setup()'s order, named as the report names them
PHASES = {"_start_distributed": "settings", "_open_run": "settings", "_resolve": "settings",
          "_build_tokenizer_and_model_config": "tokenizer", "_build_data": "data", "_build_model": "model",
          "_build_optimizer": "optimizer", "_restore": "settings", "_start_reporting": "settings"}


def startup_child() -> None:
    """In a fresh process: ``trainer FLAGS...`` runs minigpt.train's command line with the phases timed, ``bare
    DEVICE`` the bare loop's set-up; prints one line, STARTUP_MARK + JSON, with the wall-clock time of the first
    step's start."""
    started = time.perf_counter()
    which, rest = sys.argv[1], sys.argv[2:]
    if which == "bare":
        import torch

        from minigpt.config import get_preset
        from minigpt.model import GPTModel
        from minigpt.optim import configure_optimizer

        device = torch.device(rest[0])
        model = GPTModel(get_preset("tiny").with_overrides(vocab_size=257), kernels="torch").to(device)
        optimizer = configure_optimizer(model, 5e-3, 0.1, device)
        tokens = torch.randint(257, (1_000_000,))
        x = torch.stack([tokens[s:s + 128] for s in range(0, 16 * 128, 128)]).to(device)
        print(STARTUP_MARK + json.dumps({"first_step_at": time.time(), "phases_s": {}}), flush=True)
        model(x, targets=x).backward()
        optimizer.step()
        return

    from minigpt import train as cli

    phases, marks = {"imports": time.perf_counter() - started}, {}

    def timed(name, label):
        def run(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return getattr(cli.Trainer, name)(self, *args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
        return run

    class Timed(cli.Trainer):
        def evaluate(self, *args, **kwargs):
            if "first_step_at" in marks:
                return cli.Trainer.evaluate(self, *args, **kwargs)
            t = time.perf_counter()
            cli.Trainer.evaluate(self, *args, **kwargs)
            phases["first evaluation"] = time.perf_counter() - t - phases.get("sample", 0) - phases.get("save", 0)

        def train_step(self, micro_batches):
            if "first_step_at" not in marks:
                marks["first_step_at"] = time.time()
                phases["between"] = time.perf_counter() - started - sum(phases.values())
                marks["phases"] = dict(phases)  # later evaluations' samples and saves are not start-up
            return cli.Trainer.train_step(self, micro_batches)

    for name, label in {**PHASES, "sample": "sample", "save": "save"}.items():
        setattr(Timed, name, timed(name, label))
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        cli.run_trainer(Timed(cli.build_parser().parse_args(rest)))
    print(STARTUP_MARK + json.dumps({"first_step_at": marks["first_step_at"],
                                     "phases_s": {k: round(v, 3) for k, v in marks["phases"].items()}}), flush=True)


def measure_training(steps: int, startup_runs: int, device, timeout_s: float = 1800.0) -> dict:
    """Both measurements in a scratch folder (the runs' files and their token cache are not kept), each in fresh
    processes: the Trainer and the bare loop must meet the machine as ``python -m minigpt.train`` does, not the
    state a benchmark leaves behind (benchmarks.train's memory measurement sets glibc's malloc to map every large
    buffer on its own, which makes each step's allocations system calls). The child takes this process's torch
    thread count."""
    import torch

    with tempfile.TemporaryDirectory(prefix="minigpt-overhead-") as tmp:
        result = {}
        if steps:
            cmd = [sys.executable, "-c", "import benchmarks.overhead as o; o.overhead_child()", str(steps),
                   device.type, str(torch.get_num_threads()), tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env())
            lines = [line for line in proc.stdout.splitlines() if line.startswith(OVERHEAD_MARK)]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"the overhead run failed: {(proc.stderr or proc.stdout)[-500:]}")
            result = json.loads(lines[-1][len(OVERHEAD_MARK):])
        if startup_runs:
            result["startup"] = startup(startup_runs, device, Path(tmp))
    return result


def overhead_child() -> None:
    """In a fresh process: ``STEPS DEVICE THREADS WORKDIR`` -> trainer_overhead, printed as OVERHEAD_MARK + JSON."""
    import torch

    steps, device, threads, workdir = sys.argv[1:5]
    torch.set_num_threads(int(threads))
    result = trainer_overhead(int(steps), torch.device(device), Path(workdir))
    print(OVERHEAD_MARK + json.dumps(result), flush=True)


def training_table(o: dict) -> str:
    """The two rows and the verdicts, as benchmarks.train prints them."""
    from benchmarks.results import fmt_num, format_table

    if "trainer_ms" not in o:  # start-up only
        return _startup_line(o["startup"])
    lines = [["trainer (minigpt.train)", fmt_num(o["trainer_ms"]), fmt_num(o["trainer_fastest_ms"]),
              "-".join(fmt_num(v) for v in o["trainer_iqr_ms"])],
             ["bare loop", fmt_num(o["bare_ms"]), fmt_num(o["bare_fastest_ms"]),
              "-".join(fmt_num(v) for v in o["bare_iqr_ms"])]]
    text = (f"trainer overhead: the CPU demo's step (tiny, 16 x 128 bytes), {o['steps']} steps each, taking turns, "
            f"{o['threads']} thread{'s' if o['threads'] > 1 else ''}\n\n"
            + format_table(["loop", "median ms/step", "fastest", "middle half"], lines, right={1, 2})
            + f"\n\noverhead per step: {o['overhead_pct']:+.1f}% (target <= 3%)")
    return text + ("\n" + _startup_line(o["startup"]) if o.get("startup") else "")


def _startup_line(s: dict) -> str:
    phases = ", ".join(f"{k} {v:.2f}" for k, v in s["trainer_phases_s"].items())
    return (f"start-up to the first step (warm token cache, median of {s['runs']}): trainer {s['trainer_s']:.2f} s "
            f"(target <= 3 s; {phases}), bare loop {s['bare_s']:.2f} s")


# ----------------------------------------------------------------------------------------------------------------
# Generation


def streaming_overhead(model, prompt, new_tokens: int, rounds: int, device) -> dict:
    """Per-token milliseconds of ``minigpt.generate.generate_tokens`` read token by token as a stream is (each id
    brought to the host: ``int()``), and of the bare loop over the same calls, greedy, batch 1, taking turns
    generation by generation after one warm-up each. ``new_tokens`` stays within the context (no re-prefill)."""
    import torch

    from minigpt.generate import decode_one, generate_tokens, prefill
    from minigpt.model import KVCache

    context = model.cfg.context_length
    new_tokens = min(new_tokens, context - prompt.shape[1])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def stream():
        return [int(t) for t in generate_tokens(model, prompt, new_tokens, context)]

    @torch.no_grad()
    def bare():
        cache = KVCache(model.cfg, batch_size=1, max_len=context)
        logits, pos, ids = prefill(model, prompt, cache), prompt.shape[1], []
        for i in range(new_tokens):
            token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
            ids.append(int(token))
            if i + 1 < new_tokens:
                logits = decode_one(model, token, cache, pos)
                pos += 1
        return ids

    runs = {"stream": stream, "bare": bare}
    outputs = {name: fn() for name, fn in runs.items()}  # the warm-up, and the check: the same tokens
    ms = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ms[name].append((time.perf_counter() - t) * 1e3 / new_tokens)
    s, b = statistics.median(ms["stream"]), statistics.median(ms["bare"])
    return dict(new_tokens=new_tokens, rounds=rounds, stream_ms_per_token=s, bare_ms_per_token=b,
                overhead_pct=100 * (s - b) / b, same_tokens=outputs["stream"] == outputs["bare"],
                tokens=outputs["stream"])


def streaming_line(o: dict) -> str:
    return (f"streaming overhead (batch 1, {o['new_tokens']} tokens, median of {o['rounds']} generations taking "
            f"turns): generate_tokens {o['stream_ms_per_token']:.3f} ms/token, bare loop "
            f"{o['bare_ms_per_token']:.3f} ms/token: {o['overhead_pct']:+.1f}%"
            + ("" if o["same_tokens"] else " — THE TOKENS DIFFER"))
