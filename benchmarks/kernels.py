r"""``python -m benchmarks.kernels``: each op, each pass, against the best PyTorch has — checked, then timed.

How fast are our Triton kernels (``kernels/gelu.py``, ``layer_norm.py``, ``attention.py``,
``linear_cross_entropy.py``) at the sizes a GPT uses, against what a user could write or call instead, and how close
do they come to what this device can do at all? For the loss, which exists to save memory, also: how much memory
does each pass need (``benchmarks/memory.py``)?

This module is the harness; each op's setup and contenders are its module in ``benchmarks/ops/`` (what
they write: ``benchmarks/ops/interface.py``). The harness builds the cases, checks, times, counts, writes and plots
for all of them.

Contenders, run in the same process on the same inputs:

    triton        our kernel                                kernels.get_backend("triton")
    math          our readable PyTorch formula              kernels.definitions.*_math
    math_compile  the same formula under torch.compile      dynamic=True: one compile serves every size
    pytorch       the best PyTorch ships                    F.gelu, F.layer_norm, F.scaled_dot_product_attention
                                                            with the flash backend (default dispatch where flash
                                                            cannot run: fp32, or dropout on the CPU; rows say so),
                                                            F.linear_cross_entropy's chunked path for the loss
    chunked       the loss only: our chunked PyTorch        the torch backend's linear_cross_entropy

and for attention over packed documents (``doc_attention``, benchmarks/ops/doc_attention.py), ``triton`` with
doc_ids against ``flex`` (FlexAttention under torch.compile, block mask causal & same-document), ``sdpa_mask``
(F.scaled_dot_product_attention with the dense boolean mask) and ``triton_causal`` (our plain causal kernel: the
speed baseline, checked against the plain causal definition).

Passes: ``fwd`` (inputs require grad, as in training, so what backward needs is saved), ``bwd`` (out.backward(dy)
alone; the forward ran outside the timed region) and ``fwd+bwd``.

Counting.  GELU and LayerNorm are memory-bound: GB/s = the fewest bytes the pass must move (each input read once,
each output written once; formulas below) / median time. Attention: TFLOP/s with a (query, key) pair costing two
D-long dot products (q.k, p.v) at 2 FLOPs per multiply-add, causality keeping half the pairs:
fwd = 4*B*H*T*T*D / 2, bwd = 2.5 * fwd (five matmuls instead of two: S recomputed, dP, dV, dQ, dK; our dQ kernel's
second S and dP are not counted),
fwd+bwd = 3.5 * fwd — the same count for every contender, even those that compute the masked half. Attention over
packed documents counts only the pairs the documents allow (L (L + 1) / 2 per document of L tokens) at the same
FLOPs per pair. The loss:
TFLOP/s of its three matmuls, 2*N*C*V each (logits forward; dX and dW backward). Both are also given as a percentage
of this device's ceilings, measured at the start of the run (``benchmarks/timing.py``). The loss rows also report
``peak_mem_mib``: the most memory the pass needed beyond its inputs.

Checked before timed.  Each contender first runs forward and backward once on the benchmark's own inputs; its output
and every gradient are compared with the formula in float64 (||out - exact|| / ||exact||, a tolerance per dtype). A
contender that fails is reported ``wrong`` and not timed: a fast wrong kernel is not fast. With dropout no two
implementations draw the same mask, so the check is statistical: each result's deviation from the no-dropout float64
result must be within 3x of the deviation float64 dropout itself causes. Large definitions are evaluated on a sample
(two heads of attention, evenly spaced rows of GELU) or in pieces (the loss, chunks of rows). Rows that would not
fit in memory are skipped, and say so.

An op's module may add columns of its own to its rows (``row_fields``; the document rows: the tiles our kernel
visits against the plain causal kernel's) and lines printed at the start of the run and kept in the results
(``notes``): benchmarks/ops/interface.py.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
from dataclasses import dataclass

from benchmarks import common, memory, results, timing
from benchmarks.kernels_report import CONTENDERS, contenders, plot, progress, summarize, table
from benchmarks.ops import MODULES, OPS
from benchmarks.ops.interface import InputSet, forward_backward
from kernels.cli import run_cli

PASSES = ("fwd", "bwd", "fwd+bwd")
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}  # relative error vs float64 that a correct 16-bit formula
#                                                        keeps well under, even evaluated step by step in that dtype
DROPOUT_BAND = 3.0  # a deviation within [d / 3, 3 d], d float64 dropout's own, passes: two draws at T=64
#                     differ by up to ~1.6x; dropout left out (or applied one way only) is off by 10x and more
ROTATE_SETS_MAX = 8  # at most this many copies of the inputs when rotating them past the L2 cache
INTERPRETER_MAX_ELEMENTS = 1 << 18  # larger inputs take minutes in Triton's interpreter: not checked there
TRITON_CONTENDERS = ("triton", "triton_causal")  # our kernels: they need the triton backend, and the interpreter
#                                               only checks them (its times say nothing about a GPU's)
COMPILED_CONTENDERS = ("math_compile", "flex")  # under torch.compile: skipped by --no-compile, and on the CPU with
#                                                --quick (compiling takes longer than the whole quick run)
RATES = ("gbps", "tflops", "pct_bandwidth", "pct_matmul_peak", "triton_speedup")  # columns add_rates() fills
COUNTING = ("GB/s: fewest bytes of the pass / median time; TFLOP/s: causal attention, fwd = 4*B*H*T*T*D/2, "
            "bwd = 2.5*fwd; doc_attention, 4*D per allowed pair (L(L+1)/2 per document of L), bwd = 2.5*fwd; "
            "linear_cross_entropy, 2*N*C*V per matmul: fwd 1, bwd 2, fwd+bwd 3 matmuls; pct_*: of the "
            "ceilings measured at the start; triton_speedup = contender ms / triton ms; peak_mem_mib: peak memory of "
            "the pass beyond what was in use before it (the inputs)")
QUICK = dict(warmup_ms=5.0, rep_ms=20.0)
FULL = dict(warmup_ms=25.0, rep_ms=100.0)


# ----------------------------------------------------------------------------------------------------------------
# What one row measures: the op, its shape, and the work a pass must do


@dataclass(frozen=True)
class Case:
    op: str  # a name in benchmarks.ops.MODULES
    shape: tuple  # (M, C) for gelu and layer_norm, (B, H, T, D) for attention, (B, H, T, D, L) for doc_attention
    #               (L: the documents' length), (N, C, V) for the loss
    dtype: str
    dropout: float = 0.0

    @property
    def spec(self):  # the op's module: its setup and contenders
        return MODULES[self.op]

    @property
    def size(self) -> int:  # the plots' x axis: the width C, or the sequence length T
        return self.spec.size(self.shape)

    @property
    def family(self) -> str:  # a plot line per contender: the op with everything but the swept size fixed
        return self.spec.family(self.shape, self.dtype, self.dropout)

    @property
    def label(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def elem(self) -> int:  # bytes per element of the activations
        return 4 if self.dtype == "fp32" else 2

    @property
    def set_bytes(self) -> int:  # bytes of one input set
        return self.spec.set_bytes(self.shape, self.elem)

    @property
    def interpreter_elements(self) -> int:  # what the Triton interpreter's time grows with
        return self.spec.interpreter_elements(self.shape)

    def counted_work(self, pass_: str) -> tuple[int | None, float | None]:
        """(bytes, FLOPs) of one pass: bytes for the memory-bound ops, FLOPs for attention and the loss."""
        return self.spec.counted_work(self.shape, self.elem, pass_)

    def planned_bytes(self, contender: str, copies: int) -> int:
        """Rough peak memory of one contender's row."""
        return self.spec.planned_bytes(self.shape, self.elem, contender, copies)

    def row_fields(self, contender: str, pass_: str, interpreting: bool) -> dict:
        """The op's own columns of a row (its module's ``row_fields``), or none."""
        if not hasattr(self.spec, "row_fields"):
            return {}
        return self.spec.row_fields(self.shape, self.dtype, contender, pass_, interpreting)


def build_cases(ops, dtypes, dropout: float, quick: bool, widths=None, seq_lens=None, rows=None,
                vocab_size=None, doc_lens=None) -> list[Case]:
    """The sweep in run order: per dtype, the ops in ``OPS``'s order (attention, attention over packed documents,
    the loss, LayerNorm, GELU), the dropout row set (GPT-2 small's heads) right after attention's — when a time
    budget runs out, what is lost is the tail. ``widths`` replaces the widths of LayerNorm, GELU (4x) and the loss;
    ``rows`` and ``vocab_size`` the loss's N and V; ``seq_lens`` both attention ops' T, ``doc_lens`` the documents'
    lengths."""
    options = dict(dropout=dropout, widths=widths, seq_lens=seq_lens, rows=rows, vocab_size=vocab_size,
                   doc_lens=doc_lens)
    return [Case(op, shape, dtype, case_dropout) for dtype in dtypes for op in OPS if op in ops
            for shape, case_dropout in MODULES[op].cases(quick, options)]


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the correctness check


def make_inputs(case: Case, device, copies: int) -> list[InputSet]:
    """Fresh random inputs (never zeros), ``copies`` sets of them."""
    return case.spec.make_inputs(case.shape, common.torch_dtype(case.dtype), device, copies)


def selector(case: Case, device):
    """The part of an output or gradient the float64 definition is evaluated on (the op's ``selector``)."""
    return case.spec.selector(case.shape, device)


def definition_outputs(case: Case, inputs: InputSet, select, dropout: float = 0.0, variant: str | None = None):
    """The formula in float64 on the selected part: (output, gradients); ``variant``: another definition the op's
    module has for a contender (its ``DEFINITIONS``)."""
    if variant is None:
        return case.spec.definition_outputs(inputs, select, dropout)
    return case.spec.definition_outputs(inputs, select, dropout, variant=variant)


def exact_outputs(case: Case, inputs: InputSet, select, variant: str | None = None) -> dict:
    """What ``check`` compares a contender with: the float64 definition's output and gradients and, for a case with
    dropout, how far float64 dropout moves each of them (``dropout_dev``)."""
    out64, grads64 = definition_outputs(case, inputs, select, variant=variant)
    exact = {"out": out64, "grads": grads64}
    if case.dropout:
        drop_out, drop_grads = definition_outputs(case, inputs, select, case.dropout, variant)
        exact["dropout_dev"] = [common.rel_err(a, b) for a, b in zip([drop_out] + drop_grads, [out64] + grads64)]
    return exact


def rotation_copies(case: Case, device) -> int:
    """How many input sets to cycle through so that a run never finds its inputs in the L2 cache: enough to span
    twice the cache when one set is smaller than that (the CPU uses one set)."""
    l2 = common.l2_cache_bytes(device)
    if l2 == 0 or case.set_bytes >= 2 * l2:
        return 1
    return min(ROTATE_SETS_MAX, math.ceil(2 * l2 / case.set_bytes))


def check(case: Case, fn, inputs: InputSet, select, exact) -> tuple[bool, float, str]:
    """Run ``fn`` forward and backward once and compare with ``exact``, the float64 definition's outputs
    (``definition_outputs``; with dropout also their ``dropout_dev``) -> (ok, error, description)."""
    out, grads = forward_backward(fn, inputs)
    got = [select(out)] + [select(g) for g in grads]
    if not case.dropout:
        errors = [common.rel_err(a, b) for a, b in zip(got, [exact["out"]] + exact["grads"])]
        err = max(errors, key=lambda e: e if math.isfinite(e) else math.inf)  # a NaN anywhere is the worst
        tol = TOLERANCE[case.dtype]
        return err <= tol, err, f"rel err {err:.1e} vs float64 (tol {tol:g})"
    # Dropout: compare how far each result moved from the no-dropout result with how far float64 dropout moves it.
    expected = exact["dropout_dev"]
    ratios = [common.rel_err(a, b) / max(e, 1e-30) for a, b, e in zip(got, [exact["out"]] + exact["grads"], expected)]
    worst = max(ratios, key=lambda r: abs(math.log(r)) if r > 0 and math.isfinite(r) else math.inf)
    ok = all(1 / DROPOUT_BAND <= r <= DROPOUT_BAND for r in ratios)
    return ok, worst, f"dropout deviation {worst:.2f}x float64 dropout's (band 1/{DROPOUT_BAND:g}..{DROPOUT_BAND:g})"


def poison_allocator(nbytes: int, device) -> None:
    """Fill freed GPU memory with NaN (the caching allocator hands freed blocks back out), so that a kernel that
    leaves part of its output unwritten shows NaN there, not a previous contender's correct values."""
    if device.type == "cuda" and nbytes > 0:
        import torch

        torch.full((nbytes // 4 + 1,), float("nan"), device=device)




# ----------------------------------------------------------------------------------------------------------------
# Running a case: every contender, checked, then timed pass by pass


class Harness:
    """What every case needs: the device, its ceilings, the settings, the triton backend and the compile cache."""

    def __init__(self, args, device, ceilings):
        self.args, self.device, self.ceilings = args, device, ceilings
        self.budget = timing.Budget(args.budget_s)
        self.compiled: dict = {}
        self.interpreting = device.type == "cpu"
        self.memory_note = memory.prepare(device)  # None: peak memory can be measured here
        self.triton, self.triton_error = None, None
        try:
            import kernels

            self.triton = kernels.get_backend("triton")
        except Exception as exc:  # not installed, or mid-edit: the rows say so, the others still run
            self.triton_error = common.one_line(exc)

    def skip_reason(self, case: Case, name: str, copies: int) -> str | None:
        if self.budget.expired():
            return f"skipped: time budget ({self.args.budget_s:g} s) spent"
        if self.args.contenders and name not in self.args.contenders:
            return "skipped: not in --contenders"
        if name in TRITON_CONTENDERS and self.triton is None:
            return f"failed: {self.triton_error}"
        if hasattr(case.spec, "skip_reason") and (why := case.spec.skip_reason(name, self.device, self.args)):
            return why
        if name in COMPILED_CONTENDERS and self.args.no_compile:
            return "skipped: --no-compile"
        if name in COMPILED_CONTENDERS and self.device.type == "cpu" and self.args.quick:
            return "skipped: torch.compile on the CPU is too slow for --quick"
        if name in TRITON_CONTENDERS and self.interpreting and case.interpreter_elements > INTERPRETER_MAX_ELEMENTS:
            return "not timed (interpreter); not checked: too large for the interpreter"
        need = case.planned_bytes(name, copies)
        have = common.memory_budget(self.device)
        if need > have:
            return f"skipped: needs ~{need / 2**30:.1f} GiB, over the memory budget ({have / 2**30:.1f} GiB)"
        return None


def run_case(case: Case, harness: Harness) -> list[dict]:
    """Rows (one per contender and pass) for one case: every contender checked, then timed pass by pass."""
    import torch

    torch.manual_seed(harness.args.seed)
    copies = rotation_copies(case, harness.device)
    sets = make_inputs(case, harness.device, copies)
    select = selector(case, harness.device)
    exacts = {None: exact_outputs(case, sets[0], select)}  # definition variant -> what the check compares with
    fns, missing = case.spec.contender_fns(case.dropout, harness.triton, harness.compiled)
    rows, ready = [], {}  # ready: the contenders checked correct and to be timed
    for name in contenders(case.op):
        verdict = dict(checked=None, check_error=None, check=None, note=None, copies=copies)
        status = harness.skip_reason(case, name, copies) or missing.get(name)
        fn = fns.get(name)
        if status is None:
            variant = getattr(case.spec, "DEFINITIONS", {}).get(name)
            if variant not in exacts:  # evaluated when a contender first needs it
                exacts[variant] = exact_outputs(case, sets[0], select, variant)
            status, fn = check_contender(case, name, fn, sets[0], select, exacts[variant], verdict, harness)
            if variant is not None and verdict["check"]:
                verdict["check"] += f", against the {variant} definition"
        if status is None:
            ready[name] = fn
        for pass_ in harness.args.passes:
            row = dict(unmeasured_row(case, name, pass_, status or "ok", harness.interpreting), **verdict)
            if status is None and (name, pass_) in case.spec.PASS_STATUS:
                row["status"] = case.spec.PASS_STATUS[name, pass_]
            rows.append(row)
    for pass_ in harness.args.passes:
        todo = {r["contender"]: r for r in rows
                if r["pass"] == pass_ and r["status"] == "ok" and r["contender"] in ready}
        time_rows(todo, ready, sets, pass_, harness)
        for name, row in todo.items():
            if hasattr(case.spec, "pass_peak_bytes") and row["ms"]:
                measure_memory(row, ready[name], sets[0], pass_, harness, case)
    add_rates(rows, harness.ceilings, case.dtype)
    return rows


def time_rows(todo: dict, fns: dict, sets: list[InputSet], pass_: str, harness: Harness) -> None:
    """Fill ``ms`` of each row in ``todo`` (contender -> row): contender after contender, or with --interleave taking
    turns (``timing.time_interleaved``)."""
    for row in todo.values():
        if harness.budget.expired():
            row["status"] = f"skipped: time budget ({harness.args.budget_s:g} s) spent"
    todo = {name: row for name, row in todo.items() if row["status"] == "ok"}
    if harness.args.interleave:
        try:
            times = timing.time_interleaved({name: timing.pass_runner(fns[name], sets, pass_) for name in todo},
                                            harness.args.rounds)
        except Exception as exc:
            status = error_status(exc, harness.device)
            for row in todo.values():
                row["status"] = status
            return
        for name, samples in times.items():
            todo[name].update(ms=statistics.median(samples), round_ms=[round(t, 3) for t in samples])
        return
    for name, row in todo.items():
        try:
            row["ms"] = timing.time_pass(fns[name], sets, pass_, harness.device, harness.args.warmup_ms,
                                         harness.args.rep_ms)
        except Exception as exc:
            row["status"] = error_status(exc, harness.device)


def measure_memory(row: dict, fn, inputs: InputSet, pass_: str, harness: Harness, case: Case) -> None:
    """A row's peak memory beyond its inputs (the op's ``pass_peak_bytes``), after its timed runs: warm."""
    if harness.memory_note:
        row["note"] = "; ".join(filter(None, [row["note"], f"memory {harness.memory_note}"]))
        return
    try:
        row["peak_mem_mib"] = case.spec.pass_peak_bytes(fn, inputs, pass_, harness.device) / 2**20
    except Exception as exc:  # the time stands; the memory says why it is missing
        row["note"] = "; ".join(filter(None, [row["note"], f"memory {error_status(exc, harness.device)}"]))


def check_contender(case, name, fn, inputs, select, exact, verdict: dict, harness: Harness):
    """Check one contender (recording the result in ``verdict``) -> (status, or None to time it; function to time).
    A contender that cannot run as asked may have the op's ``fallback`` checked (and timed) instead."""
    poison_allocator(case.set_bytes, harness.device)
    try:
        try:
            with warnings.catch_warnings(record=True) as caught:  # flash explains at length why it cannot run;
                warnings.simplefilter("always", UserWarning)        # the row says it
                ok, err, note = check(case, fn, inputs, select, exact)
            if getattr(case.spec, "NOTE_WARNINGS", False) and caught:
                verdict["note"] = "warned: " + common.one_line(caught[0].message)
        except Exception as exc:
            fallback = getattr(case.spec, "fallback", None)
            instead = None if common.is_oom(exc) or fallback is None else fallback(name, exc, case.dropout)
            if instead is None:
                raise
            fn, verdict["note"] = instead
            ok, err, note = check(case, fn, inputs, select, exact)
    except Exception as exc:
        return error_status(exc, harness.device), fn
    verdict.update(checked=ok, check_error=err, check=note)
    if not ok:
        return "wrong: " + note, fn
    if name in TRITON_CONTENDERS and harness.interpreting:
        return "not timed (interpreter)", fn
    return None, fn


def error_status(exc: Exception, device) -> str:
    """A row's status for an exception: out of memory is a skip, anything else a failure with the whole message
    (a compiler's error says what went wrong lines below its first; tables show the first line)."""
    common.free_memory(device, collect=True)
    return "skipped: out of memory" if common.is_oom(exc) else f"failed: {common.error_text(exc)}"


def unmeasured_row(case: Case, contender: str, pass_: str, status: str, interpreting: bool = False) -> dict:
    """A row with every column, nothing measured yet (the op's own columns last: ``Case.row_fields``)."""
    nbytes, flops = case.counted_work(pass_)
    return dict(op=case.op, family=case.family, shape=case.label, size=case.size, dtype=case.dtype,
                dropout=case.dropout, contender=contender, **{"pass": pass_}, status=status, ms=None,
                **dict.fromkeys(RATES), bytes=nbytes, flops=flops, peak_mem_mib=None, round_ms=None, checked=None,
                check_error=None, check=None, note=None, copies=None,
                **case.row_fields(contender, pass_, interpreting))


def add_rates(rows: list[dict], ceilings: dict, dtype: str) -> None:
    """GB/s or TFLOP/s, their share of the device's ceilings, and triton's speed-up over each contender."""
    bandwidth = ceilings["bandwidth_gbps"]
    peak = ceilings["matmul_tflops"].get(dtype) or ceilings["matmul_tflops"].get("bf16")
    triton_ms = {r["pass"]: r["ms"] for r in rows if r["contender"] == "triton"}
    for r in rows:
        ms = r["ms"]
        r["gbps"] = r["bytes"] / (ms * 1e-3) / 1e9 if ms and r["bytes"] else None
        r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12 if ms and r["flops"] else None
        r["pct_bandwidth"] = 100 * r["gbps"] / bandwidth if r["gbps"] else None
        r["pct_matmul_peak"] = 100 * r["tflops"] / peak if r["tflops"] and peak else None
        t = triton_ms.get(r["pass"])
        r["triton_speedup"] = ms / t if ms and t else None  # > 1: triton is that many times faster


def op_notes(ops, args) -> dict:
    """op -> the lines its module's ``notes`` gives for this run (ops without notes are left out)."""
    options = dict(seq_lens=args.seq_lens, doc_lens=args.doc_lens)
    return {op: MODULES[op].notes(options, args.dtype) for op in ops if hasattr(MODULES[op], "notes")}


def tuned_attention_tiles() -> list[str]:
    """What the attention kernels' tile tuner chose in this run (kernels/launch.py), one line per problem class."""
    if "kernels.attention" not in sys.modules:  # the triton contenders never ran
        return []
    return sys.modules["kernels.attention"].tuning_report()


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", nargs="+", choices=OPS + ("all",), default=["all"], help="which ops (default all)")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES), help="which passes (default all)")
    p.add_argument("--dtype", nargs="+", choices=common.DTYPE_NAMES, default=["bf16"], help="dtypes (default bf16)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="add an attention row set with this dropout probability (e.g. 0.1; default none)")
    p.add_argument("--widths", type=int, nargs="+",
                   help="widths C instead of the sweep's: LayerNorm's, GELU's (it runs 4C) and the loss's")
    p.add_argument("--rows", type=int, help="the loss's rows N (default 16384 = 16 x 1024; 96 with --quick)")
    p.add_argument("--vocab-size", type=int, help="the loss's vocabulary V (default 50257; 1000 with --quick)")
    p.add_argument("--seq-lens", type=int, nargs="+",
                   help="attention sequence lengths T instead of the sweep's (both attention ops)")
    p.add_argument("--doc-lens", type=int, nargs="+",
                   help="doc_attention: document lengths L instead of the sweep's (128 256 512; 16 32 with --quick): "
                        "each window packs T // L documents of L tokens (and a shorter last one when L does not divide "
                        "T)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, help="only these contenders (default all)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the contenders under torch.compile (math_compile, flex)")
    p.add_argument("--interleave", action="store_true",
                   help="CPU: time the contenders taking turns, --rounds runs each, instead of one after another "
                        "(on a machine shared with other work, every contender then meets the same load on average)")
    p.add_argument("--rounds", type=int, default=5, help="runs of each contender with --interleave (default 5)")
    p.add_argument("--warmup-ms", type=float, help=f"warm-up per timing, ms (default {FULL['warmup_ms']:g}; "
                                                   f"{QUICK['warmup_ms']:g} with --quick)")
    p.add_argument("--rep-ms", type=float, help=f"timed runs per timing, ms (default {FULL['rep_ms']:g}; "
                                                f"{QUICK['rep_ms']:g} with --quick)")
    common.add_run_args(p, "kernels")
    return p


def main(argv: list[str] | None = None) -> int:
    """Check every option, then run; returns the exit status (see kernels/cli.py)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def check_args(args) -> None:
    if not 0.0 <= args.dropout < 1.0:
        raise common.BenchmarkError(f"--dropout must be in [0, 1), got {args.dropout} — e.g. --dropout 0.1")


def run(args) -> int:
    device = common.start_run(args, summarize, QUICK, FULL, check=check_args, allow_zero=("warmup_ms",),
                              positive=("rows", "vocab_size", "rounds", "warmup_ms", "rep_ms", "widths", "seq_lens",
                                        "doc_lens"))
    if device is None:  # --summarize
        return 0
    if args.interleave and device.type == "cuda":
        raise common.BenchmarkError("--interleave is for a CPU shared with other work; a GPU's timer (do_bench) "
                                    "times each contender alone — leave it out")
    memory.prepare(device)  # before the big allocations: see benchmarks/memory.py
    import torch._functorch.config as functorch_config

    # The compiled formula's backward is timed with retain_graph=True (its forward ran once, outside the timed
    # region), which buffer donation forbids; donation saves memory, not time.
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    ops = OPS if "all" in args.op else tuple(o for o in OPS if o in args.op)
    cases = build_cases(ops, args.dtype, args.dropout, args.quick, args.widths, args.seq_lens, args.rows,
                        args.vocab_size, args.doc_lens)
    print(f"benchmarks.kernels: {len(cases)} cases x up to {len(CONTENDERS)} contenders x {len(args.passes)} "
          f"passes on {common.device_name(device)}", flush=True)
    notes = op_notes(ops, args)
    for lines in notes.values():
        print("\n".join(lines), flush=True)
    ceilings = timing.measure_ceilings(device, ["bf16"] + list(args.dtype), quick=args.quick)
    print(f"ceilings: copy {ceilings['bandwidth_gbps']:.0f} GB/s, matmul "
          + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in ceilings["matmul_tflops"].items()), flush=True)
    harness = Harness(args, device, ceilings)
    out = args.out or common.default_out_dir(device)

    def meta(interrupted=None):
        m = results.run_meta(device, ceilings, args, harness.budget, interrupted, COUNTING)
        return dict(m, attention_tiles=tuned_attention_tiles(),
                    memory_method=harness.memory_note or memory.METHOD[device.type], notes=notes)

    save = results.partial_writer(out, args.name, meta)
    rows, interrupted = [], None
    try:
        for i, case in enumerate(cases, 1):
            try:
                if harness.budget.expired():  # no inputs, no float64 outputs: straight to the rows that say so
                    raise TimeoutError(f"time budget ({args.budget_s:g} s) spent")
                case_rows = run_case(case, harness)
            except Exception as exc:  # the inputs or the float64 outputs did not fit: every contender's rows say so
                status = f"skipped: {exc}" if isinstance(exc, TimeoutError) else error_status(exc, device)
                case_rows = [unmeasured_row(case, c, p, status, harness.interpreting) for c in contenders(case.op)
                             for p in args.passes]
            common.free_memory(device)
            rows += case_rows
            save(rows)  # after every case: a run stopped outright keeps what it measured
            print(f"[{i}/{len(cases)}] {case.family} {case.label} ({harness.budget.spent():.0f} s): "
                  f"{progress(case_rows)}", flush=True)
    except KeyboardInterrupt as exc:  # Ctrl-C, or the SIGTERM of an outer `timeout`: keep what was measured
        interrupted = common.one_line(exc)
        print(f"interrupted ({interrupted}): writing the {len(rows)} rows measured so far", flush=True)
    final = meta(interrupted)
    rows, paths = results.finish(out, args.name, rows, final, lambda rows, path: plot(rows, ceilings, path))
    print("\n" + table(rows) + "\n\n" + summarize({"rows": rows, "meta": final}))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
