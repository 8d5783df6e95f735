r"""``python -m benchmarks.train``: how fast does the whole GPT train, backend by backend, with and without compile?

One row per preset, context length, kernels backend (``torch``: PyTorch's own fused ops; ``triton``: our kernels) and
compile setting. Each row builds the model from the same seed, gives it random tokens (no dataset needed: the
data's values do not change the work), runs a few warm-up steps (torch.compile and Triton's JIT happen there) and
then times full training steps:

    forward (bf16 autocast on a GPU) -> cross-entropy loss -> backward -> AdamW step (fused on CUDA) -> zero grads

with the optimizer ``minigpt.train`` trains with, and dropout as the preset sets it (0.1 for gpt2-124m).

Reported per row: median ms per step, tokens per second (batch * context / step time), MFU — model FLOPs per
token (``model.flops_per_token``: 6 N for the matmuls forward and backward, plus the causal attention term) times
tokens per second, over this device's bf16 matmul rate measured at the start of the run — and the peak memory
PyTorch allocated.

Checked before timed: in eval mode (no dropout) each backend's logits on one batch are compared with the torch
backend's in float32 on the same weights. On a machine without a GPU the triton backend runs in Triton's
interpreter: its rows are checked there (and one training step must give a finite loss) but never timed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import common

BACKENDS = ("torch", "triton")
TOKENS_PER_STEP = 16384  # default batch = this / context: 64 x 256 or 16 x 1024, the same work per step
LR, WEIGHT_DECAY = 3e-4, 0.1  # the values do not change the step's cost; AdamW's work is the same for any
TOLERANCE = {"bf16": 5e-2, "fp32": 1e-3}  # logits' relative error vs the float32 torch backend (at least)
CHECK_BATCH = 2  # sequences in the logits check
# A compiled row is not started with less budget left than this: compiling the whole GPT takes tens of seconds,
# one block (reused by every layer) far less. Estimates, not measurements: a row that overruns is cut by the caller.
COMPILE_RESERVE_S = {"model": 45.0, "blocks": 20.0}
COUNTING = ("MFU = model.flops_per_token(T) * tokens/s / measured matmul FLOP/s; flops_per_token = 6N (N: parameters "
            "without the embeddings) + 6 * n_layers * T * emb_dim (causal attention, forward and backward)")
QUICK = dict(presets=["tiny"], contexts=[64], batch_size=1, warmup_steps=1, steps=3)
FULL = dict(presets=["gpt2-124m"], contexts=[256, 1024], batch_size=None, warmup_steps=3, steps=10)


@dataclass(frozen=True)
class Row:
    preset: str
    context: int
    backend: str
    compile: str  # "no", "model" (torch.compile(model), what minigpt.train --compile does) or "blocks"


def plan(presets, contexts, backends, compile_modes) -> list[Row]:
    """Uncompiled rows first (they take seconds), then compiled ones (compiling takes far longer), longest context
    first within each: if the time budget runs out, what is lost is the tail."""
    rows = []
    for mode in sorted(compile_modes, key=lambda m: m != "no"):
        for preset in presets:
            for context in sorted(contexts, reverse=True):
                rows += [Row(preset, context, backend, mode) for backend in backends]
    return rows


def build_model(row: Row, backend: str, device, seed: int, vocab_size: int | None):
    import torch

    from minigpt import GPTModel, get_preset

    cfg = get_preset(row.preset).with_overrides(context_length=row.context, vocab_size=vocab_size)
    torch.manual_seed(seed)  # the same weights for every backend
    return GPTModel(cfg, kernels=backend).to(device)


def reference_logits(row: Row, args, device, batch):
    """float32 logits of the torch backend in eval mode: what every row's logits are checked against."""
    import torch

    model = build_model(row, "torch", device, args.seed, args.vocab_size).eval()
    with torch.no_grad():
        return model(batch).float()


def check_logits(model, batch, ref, autocast, tol: float) -> tuple[bool, float, str]:
    """Eval-mode logits (no dropout) of ``model`` against ``ref`` -> (ok, relative error, description)."""
    import torch

    model.eval()
    with torch.no_grad(), autocast():
        logits = model(batch).float()
    model.train()
    err = common.rel_err(logits, ref)
    return err <= tol, err, f"logits rel err {err:.1e} vs float32 torch backend (tol {tol:.2g})"


def run_row(row: Row, args, device, ceilings, budget: common.Budget, refs: dict) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F

    from minigpt.train import configure_optimizer

    on_gpu = device.type == "cuda"
    dtype = "bf16" if on_gpu else "fp32"
    batch_size = args.batch_size or max(1, TOKENS_PER_STEP // row.context)
    result = dict(asdict(row), batch=batch_size, tokens_per_step=batch_size * row.context, dtype=dtype,
                  status="ok", check=None, checked=None, check_error=None, ms_per_step=None, tokens_per_s=None,
                  mfu=None, peak_mem_gib=None, warmup_s=None, first_loss=None, last_loss=None)
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

    model = build_model(row, row.backend, device, args.seed, args.vocab_size)
    result["params"] = model.num_params()
    result["flops_per_token"] = model.flops_per_token(row.context)
    vocab = model.cfg.vocab_size
    check_batch = torch.randint(0, vocab, (min(CHECK_BATCH, batch_size), row.context), device=device,
                                generator=torch.Generator(device).manual_seed(args.seed))
    if row.compile == "no":
        key = (row.preset, row.context)
        if key not in refs:
            refs[key] = {"logits": reference_logits(row, args, device, check_batch)}
        # the tolerance, or twice what the torch backend itself gets in this precision (the rule the kernels'
        # tests use), whichever is larger
        tol = max(TOLERANCE[dtype], 2 * refs[key].get("torch_error", 0.0))
        ok, err, note = check_logits(model, check_batch, refs[key]["logits"], autocast, tol)
        if row.backend == "torch":
            refs[key]["torch_error"] = err
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
    batches = [(torch.randint(0, vocab, (batch_size, row.context), device=device),
                torch.randint(0, vocab, (batch_size, row.context), device=device)) for _ in range(2)]

    def step(i: int) -> torch.Tensor:
        inputs, targets = batches[i % len(batches)]
        with autocast():
            logits = step_model(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step(i) for i in range(1 if interpreting else args.warmup_steps)]
    result["first_loss"] = losses[0].item()  # synchronizes: the warm-up is over
    result["warmup_s"] = round(time.perf_counter() - t0, 2)
    if not math.isfinite(result["first_loss"]):
        return dict(result, status=f"failed: loss is {result['first_loss']} in the first step")
    if interpreting:
        return dict(result, status="not timed (interpreter)")
    times = []
    for i in range(args.steps):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(i)
            end.record()
            times.append((start, end))
        else:
            t = time.perf_counter()
            loss = step(i)
            times.append(time.perf_counter() - t)
    result["last_loss"] = loss.item()
    if on_gpu:
        torch.cuda.synchronize(device)
    ms_step = statistics.median([s.elapsed_time(e) for s, e in times] if on_gpu else [t * 1e3 for t in times])
    tokens_per_s = batch_size * row.context / (ms_step * 1e-3)
    peak = ceilings["matmul_tflops"][ceilings["train_dtype"]] * 1e12
    result.update(ms_per_step=ms_step, tokens_per_s=tokens_per_s, mfu=result["flops_per_token"] * tokens_per_s / peak,
                  peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None)
    if not math.isfinite(result["last_loss"]):
        result["status"] = f"failed: loss is {result['last_loss']} after {args.steps} timed steps"
    return result


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def table(rows: list[dict]) -> str:
    headers = ["preset", "context", "batch", "backend", "compile", "ms/step", "tokens/s", "MFU", "peak GiB",
               "warm-up s", "check", "status"]
    lines = [[r["preset"], r["context"], r["batch"], r["backend"], r["compile"], common.fmt_num(r["ms_per_step"]),
              common.fmt_num(r["tokens_per_s"]), f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-",
              common.fmt_num(r["peak_mem_gib"]), common.fmt_num(r["warmup_s"]),
              "-" if r["checked"] is None else ("ok" if r["checked"] else "WRONG"), r["status"][:70]] for r in rows]
    return common.format_table(headers, lines, right={1, 2, 5, 6, 7, 8, 9})


def plot(rows: list[dict], path: Path) -> Path | None:
    """Tokens/s and MFU per row, grouped by context length."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r['preset']}\nT={r['context']}\n{r['backend']}\ncompile={r['compile']}" for r in rows]
    x = list(range(len(rows)))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "mfu", "MFU (vs measured matmul)")):
        values = [(r[key] or 0) * (100 if key == "mfu" else 1) for r in rows]
        bars = ax.bar(x, values, color=["tab:blue" if r["backend"] == "torch" else "tab:orange" for r in rows])
        for bar, r in zip(bars, rows):
            if not r[key]:
                ax.annotate(r["status"].split(":")[0], (bar.get_x() + bar.get_width() / 2, 0), ha="center",
                            va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(title + (" (%)" if key == "mfu" else ""))
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return common.save_figure(fig, path)


def summarize(data: dict) -> str:
    env, ceil = data["meta"]["environment"], data["meta"]["ceilings"]
    peak = common.fmt_num(ceil["matmul_tflops"][ceil["train_dtype"]])
    head = (f"training step on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']}); MFU vs "
            f"measured {ceil['train_dtype']} matmul {peak} TFLOP/s")
    return head + "\n\n" + table(data["rows"])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help="model presets (default gpt2-124m; tiny with --quick)")
    p.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 256 1024; 64 with --quick)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--compile", nargs="+", choices=("no", "model", "blocks"), default=["no", "model"],
                   help="compile settings to run: no, model (torch.compile(model), as minigpt.train --compile), "
                        "blocks (each transformer block compiled: one graph reused n_layers times, far quicker to "
                        "compile); default: no model")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {TOKENS_PER_STEP} tokens / context; "
                                                  "1 with --quick)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; 3 with --quick)")
    common.add_run_args(p, "train")  # --quick: the tiny preset at context 64, batch 1, a few steps
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        print(summarize(common.read_results(args.summarize)))
        return 0
    common.fill_defaults(args, QUICK, FULL)
    for name in ("batch_size", "warmup_steps", "steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {value}")
    args.warmup_steps = max(1, args.warmup_steps)  # the first step is always untimed: it allocates and compiles
    from minigpt import PRESETS

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"error: unknown preset(s) {unknown} — choose from {', '.join(PRESETS)}")
    device = common.setup(args)
    import torch

    train_dtype = "bf16" if device.type == "cuda" else "fp32"  # a CPU trains in float32
    ceilings = dict(common.measure_ceilings(device, [train_dtype], quick=args.quick), train_dtype=train_dtype)
    print(f"benchmarks.train on {common.device_name(device)}; ceilings: copy {ceilings['bandwidth_gbps']:.0f} GB/s, "
          f"{train_dtype} matmul {ceilings['matmul_tflops'][train_dtype]:.1f} TFLOP/s", flush=True)
    budget = common.Budget(args.budget_s)
    refs = {}
    planned = plan(args.presets, args.contexts, args.backends, args.compile)

    def cleanup():
        torch._dynamo.reset()
        common.free_memory(device, collect=True)

    rows, interrupted = common.run_rows(
        planned, lambda row: run_row(row, args, device, ceilings, budget, refs),
        lambda row, r: f"{row.preset} T={row.context} {row.backend} compile={row.compile}: "
                       f"{common.fmt_num(r.get('ms_per_step'))} ms/step, {r['status']}", cleanup)
    meta = common.run_meta(device, ceilings, args, budget, interrupted, COUNTING)
    common.report(args.out or common.default_out_dir(device), "train", rows, meta, plot, summarize)
    return 0

if __name__ == "__main__":
    sys.exit(main())
