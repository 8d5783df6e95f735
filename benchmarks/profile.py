r"""``python -m benchmarks.profile``: where does a training step's time go?

One training step of the GPT — the step ``benchmarks.train`` times: forward (bf16 autocast on a GPU), loss,
backward, AdamW, zero grads — run under ``torch.profiler``, its time split by op into seven groups:

    matmuls     aten::mm / addmm / bmm / matmul / linear, and their backward nodes (AddmmBackward0, ...)
    attention   our custom ops (minigpt::attention_*) and PyTorch's aten::scaled_dot_product_attention family,
                with everything inside them
    LayerNorm   layer_norm (aten::native_layer_norm, its backward, minigpt::layer_norm_*)
    GELU        gelu (aten::gelu, gelu_backward, minigpt::gelu_*)
    loss        cross_entropy, log_softmax, nll_loss, logsumexp, and our linear_cross_entropy (its custom ops, its
                autograd node, and the chunked PyTorch path's steps) — except the matmuls inside it, which are
                matmuls: the output head's three products are the same work with the plain loss and the fused one
    optimizer   everything inside optimizer.step() and zero_grad() (the _foreach_* ops, or CUDA's fused AdamW)
    rest        every other op: embeddings, dropout, residual adds, copies, views

How an op is assigned: the profiler records ops nested (aten::linear calls aten::addmm, which calls aten::copy_),
and each op's *self* time — its own, without the ops it called — is counted once, in one group, chosen from the op
and the ops it sits inside: (1) inside the optimizer -> optimizer; (2) inside attention -> attention (attention's
own matmuls are attention); (3) a matmul, or inside one -> matmuls; (4) otherwise the nearest of loss, LayerNorm,
GELU, looking at the op itself first and then outwards; (5) otherwise rest. To make (4) independent of how a backend
writes its ops, the model runs with its backend's four ops wrapped in profiler labels (``minigpt.layer_norm``,
``minigpt.gelu``, ``minigpt.causal_attention``, ``minigpt.linear_cross_entropy``), and the plain loss in
``minigpt.loss``. The backward runs outside those labels: each backward node is traced to the forward op that made
it (``forward_creators``, by the profiler's sequence numbers), and the node and everything inside it are looked at
as if they sat inside that op — so the backward of attention's math fallback (BmmBackward0 and so on) is attention,
and a backward matmul is a matmul.

Times: on the CPU the ops' self CPU time, which adds up to the step's wall time up to what runs outside any op
(Python between the ops), reported as ``outside ops``; on a GPU the time of the GPU kernels each op launched, against
the step's GPU time (CUDA events), ``outside ops`` then being the time the GPU waited (launch gaps). The profiler
slows a step: the step's time without it is reported too.

Two profiles by default, the loss computed ``plain`` (the logits whole, then F.cross_entropy) and ``fused``
(``model(idx, targets=...)``, the backend's linear_cross_entropy): the table puts them side by side.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from benchmarks import common, results, timing
from kernels.cli import run_cli

GROUPS = ("matmuls", "attention", "LayerNorm", "GELU", "loss", "optimizer", "rest")
OUTSIDE = "outside ops"  # step time in no op: Python between ops on the CPU, GPU idle time on a GPU
LOSSES = ("plain", "fused")
BACKEND_OPS = ("layer_norm", "gelu", "causal_attention", "linear_cross_entropy")
TOKENS_PER_STEP = 16384  # as benchmarks.train: a GPU step is 16 x 1024 tokens by default
TOP_OPS = 5  # ops listed per group (the JSON and CSV), so a reader can see what a group holds
QUICK = dict(preset="tiny", context_length=64, batch_size=2, warmup_steps=1, steps=2)
FULL = dict(preset="gpt2-124m", context_length=1024, batch_size=None, warmup_steps=2, steps=3)

# Patterns on lower-case op names (see the top). Backward nodes read "autograd::engine::evaluate_function:
# AddmmBackward0" and also appear as "AddmmBackward0".
NODE = "autograd::engine::evaluate_function"  # the profiler's name of a backward node's event, before ": XBackward0"
OPTIMIZER = re.compile(r"optimizer|_foreach_|fused_adam")
ATTENTION = re.compile(r"attention")
MATMUL = re.compile(r"^aten::(mm|addmm_?|bmm|baddbmm|matmul|linear|addmv|mv|dot|_addmm_activation)$"
                     r"|(^|[\s:])(addmm|mm|bmm|baddbmm|linear|matmul|addmv|mv)backward\d*$")
NEAREST = (("loss", re.compile(r"cross_?entropy|log_?softmax|nll_?loss|logsumexp|minigpt\.loss")),
           ("LayerNorm", re.compile(r"layer_?norm")),
           ("GELU", re.compile(r"gelu")))


def classify(chain: list[str]) -> str:
    """The group of an op, from the names of the op and the ops it sits inside (innermost first)."""
    names = [n.lower() for n in chain]
    if any(OPTIMIZER.search(n) for n in names):
        return "optimizer"
    if any(ATTENTION.search(n) for n in names):
        return "attention"
    if any(MATMUL.search(n) for n in names):
        return "matmuls"
    for name in names:
        for group, pattern in NEAREST:
            if pattern.search(name):
                return group
    return "rest"


def chain_of(event, creators: dict | None = None) -> list[str]:
    """The event's name and its ancestors', innermost first. In the backward, the chain goes on from the autograd
    node (``autograd::engine::evaluate_function: XBackward0``) to the forward op that made the node, found in
    ``creators`` (``forward_creators``): a node is counted with its forward op."""
    names = []
    while event is not None:
        names.append(event.name)
        if creators and event.name.startswith(NODE) and event.sequence_nr in creators:
            return names + chain_of(creators[event.sequence_nr])
        event = event.cpu_parent
    return names


def forward_creators(events) -> dict:
    """sequence number -> the forward op that made the autograd node with that number.

    The profiler stamps each op with autograd's sequence counter, which only a node's creation advances: the ops
    stamped with a number are those that ran up to that node's creation, the last to start being the one that made
    it (or an op inside it). That is how PyTorch's own profiler pairs a backward node with its forward op; here it
    sends, e.g., the backward of attention's math fallback (BmmBackward0, SafeSoftmaxBackward0) to attention."""
    creators = {}
    for event in events:
        if event.sequence_nr < 0 or any(name.startswith(NODE) for name in chain_of(event)):
            continue
        best = creators.get(event.sequence_nr)
        if best is None or event.time_range.start >= best.time_range.start:
            creators[event.sequence_nr] = event
    return creators


class LabelledBackend:
    """Another kernels backend's ops, each run inside a profiler label ``minigpt.<op>`` (a backend object, as
    ``GPTModel(kernels=...)`` takes; an op the wrapped backend lacks stays missing, so the model falls back as it
    would)."""

    def __init__(self, inner):
        from torch.profiler import record_function

        self.name = inner.name
        for op in BACKEND_OPS:
            fn = getattr(inner, op, None)
            if fn is not None:
                setattr(self, op, _labelled(fn, f"minigpt.{op}", record_function))


def _labelled(fn, label: str, record_function):
    def run(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return run


# ----------------------------------------------------------------------------------------------------------------
# One profile


def profile_loss(loss: str, args, device) -> list[dict]:
    """Profile ``args.steps`` training steps with ``loss`` -> one row per group (ms per step, share of the step,
    its top ops), then ``outside ops`` and ``step``."""
    import contextlib

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import kernels
    from minigpt import GPTModel, get_preset
    from minigpt.optim import configure_optimizer

    from benchmarks.train import LR, WEIGHT_DECAY, make_step

    on_gpu = device.type == "cuda"
    cfg = get_preset(args.preset).with_overrides(context_length=args.context_length, vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    model = GPTModel(cfg, kernels=LabelledBackend(kernels.get_backend(args.kernels))).to(device)
    optimizer = configure_optimizer(model, LR, WEIGHT_DECAY, device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    step = make_step(model, optimizer, loss, autocast)
    batch = tuple(torch.randint(0, cfg.vocab_size, (args.batch_size, args.context_length), device=device)
                  for _ in range(2))
    for _ in range(args.warmup_steps):  # allocations, optimizer state, Triton's JIT and tile tuning
        step(*batch)
    unprofiled_ms = statistics.median(_timed_steps(step, batch, 1, device) for _ in range(args.steps))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step_ms = _timed_steps(step, batch, args.steps, device)
    per_group = dict.fromkeys(GROUPS, 0.0)  # microseconds over all profiled steps
    ops: dict[tuple[str, str], float] = {}
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]  # kernels count through their op
    creators = forward_creators(events)
    for event in events:
        us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if us <= 0:
            continue
        group = classify(chain_of(event, creators))
        per_group[group] += us
        ops[group, event.name] = ops.get((group, event.name), 0.0) + us
    rows = []
    for group in GROUPS:
        ms = per_group[group] / 1e3 / args.steps
        top = sorted(((name, us) for (g, name), us in ops.items() if g == group), key=lambda kv: -kv[1])[:TOP_OPS]
        rows.append(dict(loss=loss, group=group, ms_per_step=ms, pct_of_step=100 * ms / step_ms,
                         top_ops="; ".join(f"{name} {us / 1e3 / args.steps:.3g} ms" for name, us in top)))
    grouped = sum(r["ms_per_step"] for r in rows)
    rows.append(dict(loss=loss, group=OUTSIDE, ms_per_step=step_ms - grouped, pct_of_step=100 * (1 - grouped / step_ms),
                     top_ops=""))
    rows.append(dict(loss=loss, group="step", ms_per_step=step_ms, pct_of_step=100.0,
                     top_ops=f"without the profiler: {unprofiled_ms:.4g} ms"))
    return rows


def _timed_steps(step, batch, n: int, device) -> float:
    """Milliseconds per step over ``n`` steps: the GPU's time (CUDA events) on a GPU, wall time on the CPU."""
    watch = timing.Stopwatch(device)
    with watch.region():
        for _ in range(n):
            step(*batch)
    return watch.ms()[0] / n


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def table(rows: list[dict]) -> str:
    """One line per group, a column pair (ms per step, share) per loss."""
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    by = {(r["loss"], r["group"]): r for r in rows}
    lines = []
    for group in list(GROUPS) + [OUTSIDE, "step"]:
        line = [group]
        for loss in losses:
            r = by.get((loss, group))
            line += [results.fmt_num(r["ms_per_step"]) if r else "-", f"{r['pct_of_step']:.1f}%" if r else "-"]
        lines.append(line)
    headers = ["group"] + [h for loss in losses for h in (f"{loss} ms", f"{loss} %")]
    return results.format_table(headers, lines, right=set(range(1, len(headers))))


def plot(rows: list[dict], path: Path) -> Path | None:
    """Milliseconds per step by group, a bar per loss."""
    plt = results.pyplot()
    if plt is None:
        return None
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    groups = list(GROUPS) + [OUTSIDE]
    by = {(r["loss"], r["group"]): r["ms_per_step"] for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(1, len(losses))
    for i, loss in enumerate(losses):
        xs = [g + (i - (len(losses) - 1) / 2) * width for g in range(len(groups))]
        values = [max(0.0, by.get((loss, group), 0.0)) for group in groups]
        bars = ax.bar(xs, values, width, label=f"{loss} loss: step {results.fmt_num(by.get((loss, 'step')))} ms")
        for bar, value in zip(bars, values):
            ax.annotate(results.fmt_num(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("ms per step")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return results.save_figure(fig, path)


def summarize(data: dict) -> str:
    meta = data["meta"]
    env, run = meta["environment"], meta["run"]
    head = (f"training step by op on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']}): "
            f"{run['preset']}, batch {run['batch_size']} x context {run['context']}, {run['backend']} backend, "
            f"{run['dtype']}; {run['steps']} profiled steps after {run['warmup_steps']} warm-up")
    failed = [f"{loss}: failed: {text.splitlines()[0]}" for loss, text in meta.get("errors", {}).items()]
    return "\n".join([head, "", table(data["rows"]) if data["rows"] else "no profile finished", *failed])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="model preset (default gpt2-124m; tiny with --quick)")
    p.add_argument("--context-length", type=int, help="context length (default 1024; 64 with --quick)")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {TOKENS_PER_STEP} tokens / context "
                                                  "on a GPU, 1 on the CPU; 2 with --quick)")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                   help="kernels backend (default auto: triton on a GPU, torch on the CPU)")
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES), help="losses to profile (default both)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 2; 1 with --quick)")
    p.add_argument("--steps", type=int, help="profiled steps (default 3; 2 with --quick)")
    common.add_run_args(p, "profile")
    return p


def main(argv: list[str] | None = None) -> int:
    """Check every option, then run; returns the exit status (see kernels/cli.py)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def check_args(args) -> None:
    from minigpt import PRESETS

    if args.preset not in PRESETS:
        raise common.BenchmarkError(f"unknown preset {args.preset!r} — choose from {', '.join(PRESETS)}")


def run(args) -> int:
    device = common.start_run(args, summarize, QUICK, FULL, check=check_args, allow_zero=("warmup_steps",),
                              positive=("context_length", "batch_size", "steps", "warmup_steps", "vocab_size"))
    if device is None:  # --summarize
        return 0
    on_gpu = device.type == "cuda"
    if args.kernels == "auto":
        args.kernels = "triton" if on_gpu else "torch"
    if args.kernels == "triton" and not on_gpu:
        raise common.BenchmarkError("without a GPU the triton backend runs in Triton's interpreter, whose time says "
                                    "nothing about the kernels — use --kernels torch")
    if args.batch_size is None:
        args.batch_size = max(1, TOKENS_PER_STEP // args.context_length) if on_gpu else 1
    budget = timing.Budget(args.budget_s)
    print(f"benchmarks.profile on {common.device_name(device)}: {args.preset}, batch {args.batch_size} x context "
          f"{args.context_length}, {args.kernels} backend, losses {' '.join(args.loss)}", flush=True)
    counting = ("ms per step of each group: the self time of its ops (CPU) or of the GPU kernels they launched (GPU), "
                "summed over the profiled steps / steps")
    errors = {}  # loss -> the whole message of a profile that failed: the other loss's profile still runs

    def meta(interrupted=None):
        return dict(results.run_meta(device, {}, args, budget, interrupted, counting), errors=errors,
                    run=dict(preset=args.preset, context=args.context_length, batch_size=args.batch_size,
                             backend=args.kernels, dtype="bf16 autocast" if on_gpu else "fp32", steps=args.steps,
                             warmup_steps=args.warmup_steps))

    out = args.out or common.default_out_dir(device)
    rows, interrupted = [], None
    try:
        for loss in args.loss:
            if budget.expired():
                print(f"{loss}: skipped, time budget ({args.budget_s:g} s) spent", flush=True)
                continue
            try:
                profiled = profile_loss(loss, args, device)
            except Exception as exc:
                errors[loss] = common.error_text(exc)
                print(f"{loss}: failed: {common.one_line(exc)}", flush=True)
                continue
            finally:
                common.free_memory(device, collect=True)
            rows += profiled
            results.write_results(out, args.name, rows, dict(meta(), partial=True))  # kept if the run is killed
            print(f"{loss}: step {results.fmt_num(profiled[-1]['ms_per_step'])} ms ({budget.spent():.0f} s)",
                  flush=True)
    except KeyboardInterrupt as exc:  # Ctrl-C, or the SIGTERM of an outer `timeout`: keep what was measured
        interrupted = common.one_line(exc)
        print(f"interrupted ({interrupted}): writing what was profiled", flush=True)
    results.report(out, args.name, rows, meta(interrupted), plot, summarize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
