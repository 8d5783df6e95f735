"""Comparing an exercise's result with float64, and saying what went wrong.

A check calls _compare once per case and output. While run_check runs a check, each call is recorded (passed or not)
rather than stopping at the first failure, so that the report can list every failing case in one table and name what
the failures have in common: a NaN, a known wrong variant, or a precision failure."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634  # log2(e): the attention kernels keep log-sum-exps in base 2


class Mismatch(Exception):
    """An exercise's result differs from float64's; the message says what, by how much, on which input."""


NAN_HINT = "NaN in the output: a division by zero or an unmasked load?"
INF_HINT = "inf in the output: an overflow (exp of a large number?) or a division by zero?"
VARIANT_MATCH = 4  # the result "is" a wrong variant when within 4 x the allowed error of it ...
VARIANT_APART = 8  # ... in a case where that variant lies more than 8 x the allowed error from the right answer
PRECISION_RATIO = 30  # a float16 miss of at most 30 x the allowed error, float32 passing: a precision failure


@dataclass
class Result:
    """One comparison: an output (``what``) on one case, its max abs error against float64 and the error allowed."""
    what: str
    case: str
    dtype: torch.dtype  # the input dtype of the case
    against: str
    err: float  # NaN when the output holds a NaN
    allowed: float
    nonfinite: str | None = None  # "NaN" or "inf" when the output holds one (the float64 answer never does)
    variants: dict[str, float] | None = None  # wrong variant -> the result's distance to it / allowed, where it shows

    @property
    def passed(self) -> bool:
        return self.err <= self.allowed  # a NaN fails too


_results: list[Result] | None = None  # the results of the check now running under run_check, else None


@contextmanager
def recording(results: list[Result]):
    """Within the block, every comparison appends its Result to ``results`` instead of raising at the first failure
    (run_check's mode: the report lists every failing case)."""
    global _results
    _results = results
    try:
        yield
    finally:
        _results = None


def record(result: Result) -> bool:
    """Keep ``result`` when a check runs under ``recording`` (True); False outside it: the caller raises Mismatch on
    a failure itself."""
    if _results is None:
        return False
    _results.append(result)
    return True


def failed_so_far() -> bool:
    """Whether a comparison recorded so far failed (False outside ``recording``)."""
    return _results is not None and not all(r.passed for r in _results)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _compare(what: str, got: torch.Tensor, exact: torch.Tensor, other: torch.Tensor, *, against: str, case: str,
             floor: float, bound: float = math.inf, dtype: torch.dtype | None = None,
             variants: dict[str, torch.Tensor] | None = None) -> None:
    """Compare ``got`` with ``exact`` (float64): it must be as close as ``other`` (PyTorch in the same dtype), a
    max abs error at most 2 * other's + ``floor``, and at most ``bound`` (the rule of tests/test_gelu.py,
    test_layer_norm.py and test_attention.py). ``dtype``: the case's input dtype (default: got's). ``variants``:
    known wrong answers (name -> float64 tensor, exact's shape), to recognise a failure as one of them.

    Under run_check the result is recorded; otherwise a failure raises Mismatch."""
    if tuple(got.shape) != tuple(exact.shape):
        raise Mismatch(f"{what} has shape {tuple(got.shape)}, expected {tuple(exact.shape)} ({case})")
    err = _max_abs(got, exact)
    allowed = min(2 * _max_abs(other, exact) + floor, bound)
    result = Result(what, case, dtype or got.dtype, against, err, allowed)
    if not result.passed:
        if torch.isnan(got).any():
            result.nonfinite = "NaN"
        elif torch.isinf(got).any():
            result.nonfinite = "inf"
        result.variants = {name: _max_abs(got, wrong) / allowed for name, wrong in (variants or {}).items()
                           if _max_abs(wrong, exact) > VARIANT_APART * allowed}
    if not record(result) and not result.passed:
        raise Mismatch(f"{what} differs from {against} by {err:.2g} (max abs; allowed {allowed:.2g}; {case})")


def diagnose(results: list[Result]) -> str | None:
    """What the failures among ``results`` have in common, in words: a NaN or inf; else the known wrong variant
    that the result matches in every failure where that variant shows (the closest, if more than one does); else a
    precision failure (float16 misses by a little), or arithmetic in float16 (only float16 misses, by more). None
    when nothing is recognised."""
    failed = [r for r in results if not r.passed]
    for kind, hint in (("NaN", NAN_HINT), ("inf", INF_HINT)):
        if any(r.nonfinite == kind for r in failed):
            return hint
    distances: dict[str, list[float]] = {}  # variant -> the result's distance to it in each failure where it shows
    for r in failed:
        for name, distance in (r.variants or {}).items():
            distances.setdefault(name, []).append(distance)
    matched = sorted((max(d), name) for name, d in distances.items() if max(d) <= VARIANT_MATCH)
    if matched:
        return f"looks like {matched[0][1]}"
    float32 = [r for r in results if r.dtype == torch.float32]
    if float32 and all(r.passed for r in float32) and all(r.err <= PRECISION_RATIO * r.allowed for r in failed):
        worst = max(r.err / r.allowed for r in failed)
        dtypes = " and ".join(sorted({_dtype_name(r.dtype) for r in failed}))
        return (f"a precision failure: the float32 cases pass and the {dtypes} ones miss by at most {worst:.1f}x "
                f"the allowed error — accumulate in float32?")
    if float32 and all(r.passed for r in float32) and all(r.dtype == torch.float16 for r in failed):
        worst = max(r.err / r.allowed for r in failed)
        return (f"looks like arithmetic in float16: the float32 cases pass and the float16 ones miss by up to "
                f"{worst:.0f}x the allowed error — convert the loaded values to float32 (.to(tl.float32)) and "
                "compute and accumulate there")
    return None


def failure_table(results: list[Result]) -> list[str]:
    """The failing results, one row each: output, case (dtype, shape), max error, allowed."""
    failed = [r for r in results if not r.passed]
    rows = [("output", "case", "max error", "allowed")]
    rows += [(r.what, r.case, f"{r.err:.2g}" + (f" ({r.nonfinite})" if r.nonfinite else ""), f"{r.allowed:.2g}")
             for r in failed]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _grad(fn, x: torch.Tensor, dy: torch.Tensor, *args) -> torch.Tensor:
    """d(sum(fn(x, *args) * dy)) / dx by autograd, on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_()
    fn(x, *args).backward(dy)
    return x.grad


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
