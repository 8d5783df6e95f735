r"""``python -m benchmarks.train``: how fast does the whole GPT train, backend by backend, with and without compile,
and how much memory does a step take with the fused loss and without?

One row per preset, context length, kernels backend (``torch``: PyTorch's own fused ops; ``triton``: our kernels),
compile setting and loss. Each row builds the model from the same seed, gives it random tokens (no dataset needed:
the data's values do not change the work), runs a few warm-up steps (torch.compile and Triton's JIT happen there)
and then times full training steps:

    forward (bf16 autocast on a GPU) -> loss -> backward -> clip -> AdamW step (fused) -> LR -> zero grads

with the optimizer ``minigpt.train`` trains with, and dropout as the preset sets it (0.1 for gpt2-124m). The loss
(``--loss``): ``plain``, the logits whole then F.cross_entropy in float32 (how minigpt trained before the fused op);
``fused``, ``model(idx, targets=targets)``, the backend's linear_cross_entropy, which never holds the logits.

Reported per row: median ms per step, tokens per second (batch * context / step time), MFU — model FLOPs per
token (``model.flops_per_token``: 6 N for the matmuls forward and backward, plus the causal attention term) times
tokens per second, over this device's bf16 matmul rate measured at the start of the run — and memory:

    peak_mem_gib   the most memory a timed step needed, over what was in use before the row built its model (so:
                   weights, gradients, optimizer state, batch, activations): torch.cuda.max_memory_allocated on a
                   GPU, the process's peak resident set on the CPU (``benchmarks/memory.py`` says how)
    max_batch      the largest batch whose step peak stays within ``--memory-budget-gib``: the peak is measured at
                   two batch sizes, a straight line through them (weights and optimizer state fixed, activations
                   per sequence) predicts the limit, and steps at the prediction and one above it confirm it
                   (eager rows only: a compiled model would recompile for every batch size)

Checked before timed: in eval mode (no dropout) each backend's logits on one batch are compared with the torch
backend's in float32 on the same weights, and on the ``fused`` rows its loss with the float32 cross-entropy of those
logits. On a machine without a GPU the triton backend runs in Triton's interpreter: its rows are checked there (and
one training step must give a finite loss) but never timed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import common, memory, results, timing
from benchmarks import overhead as trainer_overhead
from kernels.cli import run_cli

BACKENDS = ("torch", "triton")
LOSSES = ("plain", "fused")
TOKENS_PER_STEP = 16384  # default batch = this / context: 64 x 256 or 16 x 1024, the same work per step
LR, WEIGHT_DECAY = 3e-4, 0.1  # the values do not change the step's cost; AdamW's work is the same for any
TOLERANCE = {"bf16": 5e-2, "fp32": 1e-3}  # logits' relative error vs the float32 torch backend (at least)
CHECK_BATCH = 2  # sequences in the logits check
# A compiled row is not started with less budget left than this: compiling the whole GPT takes tens of seconds,
# one block (reused by every layer) far less. Estimates, not measurements: a row that overruns is cut by the caller.
COMPILE_RESERVE_S = {"model": 45.0, "blocks": 20.0}
COUNTING = ("MFU = model.flops_per_token(T) * tokens/s / measured matmul FLOP/s; flops_per_token = 6N (N: parameters "
            "without the embeddings) + 6 * n_layers * T * emb_dim (causal attention, forward and backward)")
QUICK = dict(presets=["tiny"], context_lengths=[64], batch_size=1, warmup_steps=1, steps=3, overhead_steps=60,
             startup_runs=2)
FULL = dict(presets=["gpt2-124m"], context_lengths=[256, 1024], batch_size=None, warmup_steps=3, steps=10,
            overhead_steps=200, startup_runs=3)
GPU_BUDGET_FRACTION = 0.9  # default memory budget on a GPU: this share of its memory (the rest: the CUDA context,
#                            the allocator's cache and fragmentation, which max_memory_allocated does not count)
CPU_BUDGET_GIB = 2.0  # default memory budget on the CPU: small, so that the steps at the largest batch stay short
FIT_TRIES = 12  # steps the largest-batch search may take after its first two: a line needs about two, halving an
#                interval (a device out of memory below the budget) about log2 of its width


@dataclass(frozen=True)
class Row:
    preset: str
    context: int  # the context length (the results' column name)
    backend: str  # the kernels backend: torch or triton
    compile: str  # "no", "model" (torch.compile(model), what minigpt.train --compile does) or "blocks"
    loss: str = "plain"  # "plain" (logits, then F.cross_entropy) or "fused" (model(idx, targets=...))


def plan(presets, context_lengths, backends, compile_modes, losses=("plain",)) -> list[Row]:
    """Rows in the order the options give the compile modes, backends and losses (the default puts the uncompiled
    rows, which take seconds, before the compiled ones, which take tens), longest context first: if the time
    budget runs out, what is lost is the tail — so name first what matters most."""
    rows = []
    for mode in compile_modes:
        for preset in presets:
            for context_length in sorted(context_lengths, reverse=True):
                rows += [Row(preset, context_length, backend, mode, loss) for backend in backends for loss in losses]
    return rows


def make_step(step_model, optimizer, loss: str, autocast):
    """One training step on a batch -> the loss (detached): forward and loss under ``autocast``, backward, then
    ``minigpt.optim.optimizer_step`` as the Trainer calls it (gradient clipping at minigpt.train's default, AdamW,
    the warm-up + cosine schedule, gradients set to None). Unlike the Trainer's step it reads no value back from
    the GPU, so steps queue as they would in a loop that logs rarely. The loss and the optimizer are labelled for
    the profiler (``benchmarks.profile``); a label costs a few microseconds."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import record_function

    from minigpt.optim import lr_lambda, optimizer_step
    from minigpt.train_config import TrainConfig

    defaults = TrainConfig()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(defaults.warmup_steps, 10**9, 0.1))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast():
            if loss == "fused":
                out = step_model(inputs, targets=targets)  # the backend's linear_cross_entropy inside
            else:
                logits = step_model(inputs)  # (B, T, V)
                with record_function("minigpt.loss"):
                    out = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        out.backward()
        with record_function("minigpt.optimizer"):
            optimizer_step(optimizer, parameters, defaults.grad_clip, scheduler=scheduler)
        return out.detach()

    return step


def build_model(row: Row, backend: str, device, seed: int, vocab_size: int | None):
    import torch

    from minigpt import GPTModel

    torch.manual_seed(seed)  # the same weights for every backend
    return GPTModel(row_config(row, vocab_size), kernels=backend).to(device)


def row_config(row: Row, vocab_size: int | None):
    from minigpt import get_preset

    return get_preset(row.preset).with_overrides(context_length=row.context, vocab_size=vocab_size)


def torch_backend_outputs(row: Row, args, device, batch, targets) -> dict:
    """float32 logits of the torch backend in eval mode, and their cross-entropy: what every row is checked against.
    Kept on the CPU, so that they are not in a GPU row's memory."""
    import torch
    import torch.nn.functional as F

    model = build_model(row, "torch", device, args.seed, args.vocab_size).eval()
    with torch.no_grad():
        logits = model(batch).float()  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return {"logits": logits.cpu(), "loss": loss.cpu()}


def check_outputs(model, loss: str, batch, targets, expected: dict, autocast, tol: float) -> tuple[bool, float, str]:
    """Eval-mode logits (no dropout) of ``model`` against ``expected``, the torch backend's (``torch_backend_outputs``),
    and for the fused loss its loss against their cross-entropy -> (ok, largest relative error, description)."""
    import torch

    model.eval()
    with torch.no_grad(), autocast():
        errors = {"logits": common.rel_err(model(batch).float().cpu(), expected["logits"])}
        if loss == "fused":
            errors["fused loss"] = common.rel_err(model(batch, targets=targets).float().cpu(), expected["loss"])
    model.train()
    err = max(errors.values(), key=lambda e: e if math.isfinite(e) else math.inf)  # NaN is the worst
    described = ", ".join(f"{name} rel err {e:.1e}" for name, e in errors.items())
    return err <= tol, err, f"{described} vs float32 torch backend (tol {tol:.2g})"


def run_row(row: Row, args, device, ceilings, budget: timing.Budget, expected_by_shape: dict) -> dict:
    import contextlib

    import torch

    from minigpt.optim import configure_optimizer

    on_gpu = device.type == "cuda"
    dtype = "bf16" if on_gpu else "fp32"
    batch_size = args.batch_size or max(1, TOKENS_PER_STEP // row.context)
    result = dict(asdict(row), batch=batch_size, tokens_per_step=batch_size * row.context, dtype=dtype,
                  status="ok", check=None, checked=None, check_error=None, ms_per_step=None, tokens_per_s=None,
                  mfu=None, peak_mem_gib=None, step_peak_gib=None, max_batch=None, max_batch_peak_gib=None,
                  mem_per_seq_mib=None, mem_fixed_gib=None, max_batch_note=None, warmup_s=None, first_loss=None,
                  last_loss=None)
    interpreting = row.backend == "triton" and not on_gpu
    if budget.expired():
        return dict(result, status=f"skipped: time budget ({args.budget_s:g} s) spent")
    reserve = COMPILE_RESERVE_S.get(row.compile, 0.0)
    if budget.seconds is not None and budget.seconds - budget.spent() < reserve:
        return dict(result, status=f"skipped: time budget (compiling needs ~{reserve:.0f} s, "
                                   f"{budget.seconds - budget.spent():.0f} s left)")
    if row.compile != "no" and not on_gpu and (args.quick or interpreting):
        return dict(result, status="skipped: torch.compile on the CPU is too slow for --quick" if args.quick
                    else "skipped: the Triton interpreter cannot be compiled")

    if interpreting and not args.quick:
        return dict(result, status="not timed (interpreter); not checked: too large for the interpreter (--quick "
                                   "checks a tiny model)")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    vocab = row_config(row, args.vocab_size).vocab_size
    generator = torch.Generator(device).manual_seed(args.seed)
    check_batch, check_targets = (torch.randint(0, vocab, (min(CHECK_BATCH, batch_size), row.context), device=device,
                                                generator=generator) for _ in range(2))
    key = (row.preset, row.context)
    if row.compile == "no" and key not in expected_by_shape:
        expected_by_shape[key] = torch_backend_outputs(row, args, device, check_batch, check_targets)

    common.free_memory(device, collect=True)
    baseline = memory.current_bytes(device)  # the row's memory is everything above this
    model = build_model(row, row.backend, device, args.seed, args.vocab_size)
    result["params"] = model.num_params()
    result["flops_per_token"] = model.flops_per_token(row.context)
    if row.compile == "no":
        # the tolerance, or twice what the torch backend itself gets in this precision (the rule the kernels'
        # tests use), whichever is larger
        tol = max(TOLERANCE[dtype], 2 * expected_by_shape[key].get("torch_error", 0.0))
        ok, err, note = check_outputs(model, row.loss, check_batch, check_targets, expected_by_shape[key], autocast,
                                      tol)
        if row.backend == "torch" and row.loss == "plain":
            expected_by_shape[key]["torch_error"] = err
        result.update(checked=ok, check_error=err, check=note)
        if not ok:
            return dict(result, status="wrong: " + note)
    else:
        result["check"] = "logits checked in the uncompiled row; here: finite loss"
    if row.compile == "model":
        step_model = torch.compile(model)
    else:
        step_model = model
        if row.compile == "blocks":  # regional compilation: one graph for the block, reused by all n_layers
            for block in model.trf_blocks:
                block.compile()
    optimizer = configure_optimizer(model, LR, WEIGHT_DECAY, device)
    step = make_step(step_model, optimizer, row.loss, autocast)
    batches = [random_batch(batch_size, row.context, vocab, device) for _ in range(2)]

    warmup = timing.Stopwatch()  # wall time: compiling happens on the host
    with warmup.region():
        losses = [step(*batches[i % 2]) for i in range(1 if interpreting else args.warmup_steps)]
        result["first_loss"] = losses[0].item()  # synchronizes: the warm-up is over
    result["warmup_s"] = round(warmup.ms()[0] / 1e3, 2)
    if not math.isfinite(result["first_loss"]):
        return dict(result, status=f"failed: loss is {result['first_loss']} in the first step")
    if interpreting:
        return dict(result, status="not timed (interpreter)")
    watch, peaks = timing.Stopwatch(device), []
    for i in range(args.steps):
        memory.reset_peak(device)  # the allocator counts on the host: no synchronization, the steps stay queued
        with watch.region():
            loss = step(*batches[i % 2])
        peaks.append(memory.peak_bytes(device) - baseline)
    result["last_loss"] = loss.item()
    ms_step = statistics.median(watch.ms())
    tokens_per_s = batch_size * row.context / (ms_step * 1e-3)
    peak = ceilings["matmul_tflops"][ceilings["train_dtype"]] * 1e12
    result.update(ms_per_step=ms_step, tokens_per_s=tokens_per_s, mfu=result["flops_per_token"] * tokens_per_s / peak,
                  step_peak_gib=[round(p / 2**30, 4) for p in peaks])
    if not args.memory_note:
        result["peak_mem_gib"] = max(peaks) / 2**30
    if not math.isfinite(result["last_loss"]):
        return dict(result, status=f"failed: loss is {result['last_loss']} after {args.steps} timed steps")
    if row.compile == "no" and args.max_batch and not args.memory_note:
        def measure(b: int) -> float:
            return step_peak(step, lambda: optimizer.zero_grad(set_to_none=True), b, row.context, vocab, device,
                             baseline)

        result.update(largest_batch(measure, batch_size, max(peaks), args.memory_budget_gib * 2**30))
    elif row.compile != "no":
        result["max_batch_note"] = "not searched: a compiled model recompiles for each batch size"
    return result


def random_batch(batch_size: int, context: int, vocab: int, device):
    """Random (inputs, targets), (B, T) each: the data's values do not change the work."""
    import torch

    return tuple(torch.randint(0, vocab, (batch_size, context), device=device) for _ in range(2))


def step_peak(step, zero_grad, batch_size: int, context: int, vocab: int, device, baseline: int) -> float:
    """Peak bytes above ``baseline`` of one training step at ``batch_size``; inf when it runs out of memory (the
    gradients a broken-off step left are dropped with ``zero_grad``)."""
    common.free_memory(device, collect=True)
    try:
        batch = random_batch(batch_size, context, vocab, device)
        memory.reset_peak(device)
        step(*batch).item()
        return float(memory.peak_bytes(device) - baseline)
    except Exception as exc:
        if not common.is_oom(exc):
            raise
        zero_grad()
        return math.inf
    finally:
        common.free_memory(device, collect=True)


def largest_batch(measure, batch: int, peak: float, budget: float) -> dict:
    """The largest batch whose step peak ``measure(b)`` (bytes) stays within ``budget`` bytes.

    Memory grows about in a straight line with the batch: weights, gradients and optimizer state are fixed,
    activations (and the logits, with the plain loss) are per sequence. The peak at ``batch`` is known; one more
    measurement at a larger batch gives the line, the line predicts the limit, and steps at the prediction and next
    to it confirm it — refitting on the latest measurements, until a batch that fits sits next to one that does
    not.
    """
    points = {batch: peak}
    for trial in (batch + max(batch, 4), batch + 1):  # the second only if the first ran out of memory
        points[trial] = measure(trial)
        if math.isfinite(points[trial]):
            break

    def bracket():  # (the largest batch known to fit or 0, the smallest known not to or None)
        fits = [b for b, p in points.items() if p <= budget]
        return max(fits, default=0), min((b for b, p in points.items() if p > budget), default=None)

    for _ in range(FIT_TRIES):
        lo, hi = bracket()
        if hi is not None and hi <= lo + 1:
            break
        fixed, per_seq = _line(points)
        guess = math.floor((budget - fixed) / per_seq) if per_seq > 0 else None
        if hi is None:  # no upper end yet: follow the line, at least one further (doubling if it is flat)
            guess = max(lo + 1, guess if guess is not None else 2 * lo)
        elif guess is None or not lo < guess < hi:  # the line points outside what is known (e.g. out of memory
            guess = (lo + hi) // 2                   # below the budget): halve the interval instead
        points[guess] = measure(guess)
    lo, hi = bracket()
    fixed, per_seq = _line(points)
    if not lo:
        note = "no batch fits the budget"
    elif hi is not None and hi <= lo + 1:
        note = f"{lo} fits, {hi} does not" + (" (out of memory)" if math.isinf(points[hi]) else "") + " (measured)"
    else:
        note = f"at least {lo}: the search stopped before a batch over the budget was next to it"
    return dict(max_batch=lo or None, max_batch_peak_gib=points[lo] / 2**30 if lo else None,
                mem_per_seq_mib=per_seq / 2**20, mem_fixed_gib=fixed / 2**30, max_batch_note=note)


def _line(points: dict) -> tuple[float, float]:
    """(fixed bytes, bytes per sequence): the line through the two largest batches measured without running out of
    memory — the local slope, which is what matters near the limit (a fused loss's chunk buffer grows with the batch
    only until it holds a whole chunk, so its memory bends before it runs straight)."""
    finite = sorted((b, p) for b, p in points.items() if math.isfinite(p))
    if len(finite) < 2:
        return (finite[0][1] if finite else 0.0), 0.0
    (b0, p0), (b1, p1) = finite[-2:]
    per_seq = (p1 - p0) / (b1 - b0)
    return p1 - per_seq * b1, per_seq


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def table(rows: list[dict]) -> str:
    headers = ["preset", "context", "batch", "backend", "compile", "loss", "ms/step", "tokens/s", "MFU", "peak GiB",
               "max batch", "MiB/seq", "warm-up s", "check", "status"]
    lines = [[r["preset"], r["context"], r["batch"], r["backend"], r["compile"], r.get("loss", "plain"),
              results.fmt_num(r["ms_per_step"]), results.fmt_num(r["tokens_per_s"]),
              f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-", results.fmt_num(r["peak_mem_gib"]),
              _max_batch_cell(r), results.fmt_num(r.get("mem_per_seq_mib")), results.fmt_num(r["warmup_s"]),
              "-" if r["checked"] is None else ("ok" if r["checked"] else "WRONG"),
              r["status"].splitlines()[0][:70]] for r in rows]
    return results.format_table(headers, lines, right={1, 2, 6, 7, 8, 9, 10, 11, 12})


def _max_batch_cell(r: dict) -> str:
    if not r.get("max_batch"):
        return "-"
    return f"{r['max_batch']}" + ("" if "(measured)" in (r.get("max_batch_note") or "") else "+")


def plot(rows: list[dict], path: Path) -> Path | None:
    """Tokens/s, MFU and peak memory per step (with the largest batch in the budget on top) per row."""
    plt = results.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    labels = [f"{r['preset']}\nT={r['context']}\n{r['backend']}\ncompile={r['compile']}\n{r.get('loss', 'plain')}"
              for r in rows]
    colors = {("torch", "plain"): "tab:blue", ("torch", "fused"): "tab:cyan", ("triton", "plain"): "tab:orange",
              ("triton", "fused"): "tab:red"}
    x = list(range(len(rows)))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "mfu", "MFU (vs measured matmul, %)"),
                           (axes[2], "peak_mem_gib", "peak memory per step, GiB (max batch in the budget on top)")):
        values = [(r.get(key) or 0) * (100 if key == "mfu" else 1) for r in rows]
        bars = ax.bar(x, values, color=[colors.get((r["backend"], r.get("loss", "plain")), "grey") for r in rows])
        for bar, r in zip(bars, rows):
            if not r.get(key):
                ax.annotate(r["status"].split(":")[0], (bar.get_x() + bar.get_width() / 2, 0), ha="center",
                            va="bottom", fontsize=7, rotation=90)
            elif key == "peak_mem_gib" and r.get("max_batch"):
                ax.annotate(f"max {_max_batch_cell(r)}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return results.save_figure(fig, path)


def summarize(data: dict) -> str:
    meta = data["meta"]
    env, ceil = meta["environment"], meta["ceilings"]
    peak = results.fmt_num(ceil["matmul_tflops"][ceil["train_dtype"]])
    head = (f"training step on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']}); MFU vs "
            f"measured {ceil['train_dtype']} matmul {peak} TFLOP/s")
    budget = meta.get("args", {}).get("memory_budget_gib")
    tail = (f"peak GiB: a step's peak memory above what was in use before the row built its model "
            f"({meta.get('memory_method', 'see benchmarks/memory.py')}); max batch: the largest batch whose step peak "
            f"stays within {results.fmt_num(budget)} GiB (+: at least); MiB/seq: the memory one more sequence costs"
            if budget else "")
    overhead = meta.get("trainer_overhead")
    return (head + "\n\n" + table(data["rows"]) + ("\n\n" + tail if tail else "")
            + ("\n\n" + trainer_overhead.training_table(overhead) if overhead else ""))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help="model presets (default gpt2-124m; tiny with --quick)")
    p.add_argument("--context-lengths", type=int, nargs="+",
                   help="context lengths (default 256 1024; 64 with --quick)")
    p.add_argument("--kernels", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="kernels backends (default torch triton)")
    p.add_argument("--compile", nargs="+", choices=("no", "model", "blocks"), default=["no", "model"],
                   help="compile settings to run: no, model (torch.compile(model), as minigpt.train --compile), "
                        "blocks (each transformer block compiled: one graph reused n_layers times, far quicker to "
                        "compile); run in the order given; default: no model")
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES),
                   help="plain (logits, then F.cross_entropy), fused (model(idx, targets=...): the backend's "
                        "linear_cross_entropy); default both")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {TOKENS_PER_STEP} tokens / context; "
                                                  "1 with --quick)")
    p.add_argument("--memory-budget-gib", type=float,
                   help=f"the budget of the largest-batch search (default {100 * GPU_BUDGET_FRACTION:.0f}%% of the "
                        f"GPU's memory; {CPU_BUDGET_GIB:g} GiB on the CPU)")
    p.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                   help="skip the largest-batch search (it runs a few more steps per uncompiled row)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; 3 with --quick)")
    p.add_argument("--overhead-steps", type=int,
                   help="steps of the trainer-overhead measurement: minigpt.train's Trainer and a bare loop taking "
                        "turns on the CPU demo's run (benchmarks/overhead.py); default 200, 60 with --quick; 0 skips "
                        "it")
    p.add_argument("--startup-runs", type=int,
                   help="fresh processes timed from launch to the first training step, for the trainer and the bare "
                        "loop (after one that fills the token cache); default 3, 2 with --quick; 0 skips them")
    common.add_run_args(p, "train")  # --quick: the tiny preset at context 64, batch 1, a few steps
    return p


def main(argv: list[str] | None = None) -> int:
    """Check every option, then run; returns the exit status (see kernels/cli.py)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def check_args(args) -> None:
    from minigpt import PRESETS

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        raise common.BenchmarkError(f"unknown preset(s) {unknown} — choose from {', '.join(PRESETS)}")


def run(args) -> int:
    device = common.start_run(args, summarize, QUICK, FULL, check=check_args,
                              positive=("batch_size", "warmup_steps", "steps", "context_lengths", "vocab_size",
                                        "memory_budget_gib", "overhead_steps", "startup_runs"),
                              allow_zero=("warmup_steps", "overhead_steps", "startup_runs"))
    if device is None:  # --summarize
        return 0
    args.warmup_steps = max(1, args.warmup_steps)  # the first step is always untimed: it allocates and compiles
    args.memory_note = memory.prepare(device)  # before the big allocations: see benchmarks/memory.py
    import torch

    if args.memory_budget_gib is None:
        args.memory_budget_gib = (round(GPU_BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory
                                        / 2**30, 1) if device.type == "cuda" else CPU_BUDGET_GIB)
    available = common.memory_budget(device, fraction=0.8) / 2**30
    if device.type == "cpu" and args.max_batch and args.memory_budget_gib > available:
        # a GPU says "out of memory" and the search steps back; a CPU's system ends the whole process instead
        raise common.BenchmarkError(f"--memory-budget-gib {args.memory_budget_gib:g} is over 80% of the memory this "
                                    f"machine has available ({available:.1f} GiB) — use a smaller budget, or "
                                    "--no-max-batch")

    train_dtype = "bf16" if device.type == "cuda" else "fp32"  # a CPU trains in float32
    ceilings = dict(timing.measure_ceilings(device, [train_dtype], quick=args.quick), train_dtype=train_dtype)
    print(f"benchmarks.train on {common.device_name(device)}; ceilings: copy {ceilings['bandwidth_gbps']:.0f} GB/s, "
          f"{train_dtype} matmul {ceilings['matmul_tflops'][train_dtype]:.1f} TFLOP/s", flush=True)
    budget = timing.Budget(args.budget_s)
    expected_by_shape = {}  # (preset, context) -> the torch backend's outputs, computed once
    planned = plan(args.presets, args.context_lengths, args.kernels, args.compile, args.loss)
    out = args.out or common.default_out_dir(device)
    overhead = None  # the trainer's overhead: measured after the rows, which the time budget goes to first

    def meta(interrupted=None):
        m = results.run_meta(device, ceilings, args, budget, interrupted, COUNTING)
        return dict(m, memory_method=args.memory_note or memory.METHOD[device.type], trainer_overhead=overhead)

    def cleanup():
        torch._dynamo.reset()
        common.free_memory(device, collect=True)

    rows, interrupted = common.run_rows(
        planned, lambda row: run_row(row, args, device, ceilings, budget, expected_by_shape),
        lambda row, r: f"{row.preset} T={row.context} {row.backend} compile={row.compile} loss={row.loss}: "
                       f"{results.fmt_num(r.get('ms_per_step'))} ms/step, "
                       f"peak {results.fmt_num(r.get('peak_mem_gib'))} "
                       f"GiB, max batch {_max_batch_cell(r)}, {r['status']}", cleanup,
        save=results.partial_writer(out, args.name, meta))
    if (args.overhead_steps or args.startup_runs) and not interrupted and not budget.expired():
        print(f"trainer overhead: {args.overhead_steps} steps of minigpt.train's Trainer and of a bare loop, taking "
              f"turns; {args.startup_runs} start-ups of each", flush=True)
        overhead = trainer_overhead.measure_training(args.overhead_steps, args.startup_runs, device)
        print(trainer_overhead.training_table(overhead), flush=True)

    results.report(out, args.name, rows, meta(interrupted), plot, summarize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
