"""The exercises' checker: ``python -m exercises check [name ...] [--solutions]`` (see exercises/README.md).

Each exercise file is loaded afresh and its launcher run on small, awkward shapes against the kind of test its real
kernel passes in tests/: the result is compared with the same computation in float64 (by autograd where there is a
gradient), and it must land within twice the error of PyTorch doing the job in the same dtype, plus a floor of a
few roundings (and, where the real test has one, under a bound per dtype). PASS in one line per exercise, or FAIL
with what differed, what the failures look like — a NaN, a known mistake recognised by matching the result with
that mistake computed here in float64, or a precision failure — and a table of every failing case (output, case,
max error, allowed); exit code 0 when all pass, 1 otherwise.

Without a GPU the kernels run in Triton's interpreter on the CPU: ``kernels.get_backend("triton")`` switches it on,
and re-wraps Triton's own functions if something imported ``triton.language`` before. With a GPU they run there.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from kernels.cli import run_cli

HERE = Path(__file__).resolve().parent  # exercises/
START_MARKER = "# ---- your code here (exercise {name}, lesson {lesson}) ----"
END_MARKER = "# ---- end ----"
LOG2E = 1.4426950408889634  # log2(e): the attention kernels keep log-sum-exps in base 2


class Mismatch(Exception):
    """An exercise's result differs from float64's; the message says what, by how much, on which input."""


@dataclass(frozen=True)
class Exercise:
    name: str  # the stem of exercises/<name>.py and exercises/solutions/<name>.py
    lesson: int  # the lesson of COURSE.md that teaches it
    real_file: str  # the real kernel it copies: this file of the repository ...
    real_function: str  # ... and this function in it
    check: Callable[[ModuleType, str], None]  # check(module, device): raises Mismatch when the result is wrong
    # Further functions of real_file whose lines the blank also copies, when it spans more than one function (a
    # kernel written from zero together with its launcher's grid): each line of the solution's region is one of
    # real_function's or of these, in order within each function (tests/test_exercises.py)
    also_copies: tuple[str, ...] = ()

    def path(self, solution: bool = False) -> Path:
        return HERE / "solutions" / f"{self.name}.py" if solution else HERE / f"{self.name}.py"

    def start_marker(self) -> str:
        return START_MARKER.format(name=self.name, lesson=self.lesson)


# ----------------------------------------------------------------------------------------------------------------
# Comparing with float64, and saying what went wrong
#
# A check calls _compare once per case and output. While run_check runs a check, each call is recorded (passed or
# not) rather than stopping at the first failure, so that the report can list every failing case in one table and
# name what the failures have in common: a NaN, a known wrong variant, or a precision failure.

PLACEHOLDER = "placeholder:"  # in the comment of each blank's placeholder line (exercises/*.py), gone once filled
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
    if _results is not None:
        _results.append(result)
    elif not result.passed:
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


# ----------------------------------------------------------------------------------------------------------------
# The checks, one per exercise: the inputs and tolerances of the real kernel's tests, on shapes the interpreter
# runs in a moment (a partial last block or tile, widths and head dims that are not powers of two)

GELU_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # relative to max(|dx|, 1), as in tests/test_gelu.py
GELU_SHAPES = [(7,), (1, 1, 1023), (3, 7, 256)]


def _gelu_backward_variants(x: torch.Tensor, dy: torch.Tensor, approximate: str) -> dict[str, torch.Tensor]:
    """Known wrong answers for dx = dy * GELU'(x), in float64."""
    from kernels.definitions import gelu_math

    other = "none" if approximate == "tanh" else "tanh"
    if approximate == "tanh":
        u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x ** 2)
        s = torch.sigmoid(2 * u)  # 0.5 (1 + tanh(u))
        first, missing_factor = s, s + x * s * (1 - s) * du
        factor = "a factor 2 in the second term: d/du sigmoid(2u) = 2 sigmoid(2u) (1 - sigmoid(2u))"
    else:
        first = 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # Phi(x)
        missing_factor = first + x * torch.exp(-x * x / 2)
        factor = "the 1/sqrt(2 pi) of the normal density phi(x)"
    form = {"tanh": "tanh", "none": "erf"}
    return {
        f"the derivative of the other GELU form ({form[other]} where {form[approximate]} was asked): "
        f"check which branch is TANH": _grad(gelu_math, x, dy, other),
        "GELU(x) itself, not its derivative": dy * gelu_math(x, approximate),
        "the first term of the product rule alone: d/dx [x Phi(x)] = Phi(x) + x Phi'(x)": dy * first,
        f"the derivative without {factor}": dy * missing_factor,
    }


def check_gelu_backward(module: ModuleType, device: str) -> None:
    from kernels.definitions import gelu_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for dtype in (torch.float32, torch.float16):
        for approximate in ("tanh", "none"):
            for shape in GELU_SHAPES:
                g = _generator(sum(shape))
                x = (3 * torch.randn(shape, generator=g)).to(device, dtype)  # both tails and the bend near 0
                dy = torch.randn(shape, generator=g).to(device, dtype)
                dx = module.gelu_backward(x, dy, approximate)
                exact = _grad(gelu_math, x.double(), dy.double(), approximate)
                scale = max(exact.abs().max().item(), 1.0)
                _compare("dx", dx, exact, _grad(torch_backend.gelu, x, dy, approximate), against="autograd",
                         case=f"approximate={approximate!r}, {_dtype_name(dtype)}, shape {shape}",
                         floor=torch.finfo(dtype).eps * scale, bound=GELU_TOL[dtype] * scale,
                         variants=_gelu_backward_variants(x.double(), dy.double(), approximate))


LAYER_NORM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}  # relative to max(|dx|, 1), as tests/test_layer_norm.py
LAYER_NORM_SHAPES = [(3, 7), (37, 48), (1, 1, 1023)]


def _layer_norm_dx_variants(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, eps: float,
                            block_c: int) -> dict[str, torch.Tensor]:
    """Known wrong answers for LayerNorm's dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w, in float64."""
    width = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    g = dy * w

    def dx(g, sum_g, sum_g_xhat, n):
        return (g - sum_g / n - xhat * sum_g_xhat / n) * rstd

    sum_g, sum_g_xhat = g.sum(-1, keepdim=True), (g * xhat).sum(-1, keepdim=True)
    return {
        "dx without the mean terms (g * rstd alone): the row means of g and of g * xhat come from every x": g * rstd,
        "dx without the mean of g": dx(g, 0, sum_g_xhat, width),
        "dx without the mean of g * xhat": dx(g, sum_g, 0, width),
        "the row sums divided by the block size BLOCK_C where the row has `width` elements":
            dx(g, sum_g, sum_g_xhat, block_c),
        "g = dy without the weight w": dx(dy, dy.sum(-1, keepdim=True), (dy * xhat).sum(-1, keepdim=True), width),
    }


def check_layer_norm_dx(module: ModuleType, device: str) -> None:
    from kernels.definitions import EPS, layer_norm_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for dtype in (torch.float32, torch.float16):
        for shape in LAYER_NORM_SHAPES:
            g = _generator(shape[-1])
            C = shape[-1]
            x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)  # off-centre, not unit scale
            w = (1 + 0.5 * torch.randn(C, generator=g)).to(device, dtype)
            b = (0.5 * torch.randn(C, generator=g)).to(device, dtype)
            dy = torch.randn(shape, generator=g).to(device, dtype)
            dx = module.layer_norm_dx(x, w, dy, EPS)
            exact = _grad(layer_norm_math, x.double(), dy.double(), w.double(), b.double(), EPS)
            scale = max(exact.abs().max().item(), 1.0)
            _compare("dx", dx, exact, _grad(torch_backend.layer_norm, x, dy, w, b, EPS), against="autograd",
                     case=f"{_dtype_name(dtype)}, shape {shape}", floor=torch.finfo(dtype).eps * scale,
                     bound=LAYER_NORM_TOL[dtype] * scale,
                     variants=_layer_norm_dx_variants(x.double(), w.double(), dy.double(), EPS,
                                                      block_c=1 << (C - 1).bit_length()))


# ----------------------------------------------------------------------------------------------------------------
# Exercise layer_norm_forward (lesson 4): the forward kernel from zero, with its launcher's grid
#
# y, mean and rstd against float64 (y by the formula of kernels/definitions.py; mean and rstd, which the kernel keeps
# in float32, against PyTorch's own statistics in float32, torch.native_layer_norm's). Each input is the head of a
# buffer whose tail holds NaN, as memory past a tensor may: a load without a mask reads it and shows as a NaN.

# (shape, spread of x): widths that BLOCK_C pads (7, 100, GPT-2's 768, 1000) and one it does not (64), rows that
# end in a partial program; x off-centre (mean 0.5), so that padded lanes counted in a sum show; and rows of small
# spread (variance 0.01), where the place of eps shows
LAYER_NORM_FORWARD_CASES = [((3, 7), 2.0), ((2, 5, 100), 2.0), ((2, 768), 2.0), ((3, 1000), 2.0), ((5, 64), 2.0),
                            ((6, 24), 0.1)]
# Rows of one feature (variance 0: rstd = 1 / sqrt(eps)), run once the cases above pass, since a wrong variance
# is named there better than by the NaN that a division by C - 1 = 0 makes here
LAYER_NORM_FORWARD_LAST_CASES = [((5, 1), 2.0)]


def _nan_past_the_end(x: torch.Tensor, tail: int) -> torch.Tensor:
    """``x``'s values, contiguous, at the head of a buffer whose next ``tail`` elements are NaN."""
    buffer = torch.full((x.numel() + tail,), float("nan"), dtype=x.dtype, device=x.device)
    buffer[:x.numel()] = x.flatten()
    return buffer[:x.numel()].view(x.shape)


def _layer_norm_forward_variants(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                                 block_c: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Known wrong answers (y, mean, rstd) of LayerNorm's forward, in float64."""
    width = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    sum_sq = ((x - mean) ** 2).sum(-1, keepdim=True)

    def forward(mean, var, rstd=None, w=w, b=b):
        rstd = torch.rsqrt(var + eps) if rstd is None else rstd
        return (x - mean) * rstd * w + b, mean[..., 0], rstd[..., 0]

    block_mean = x.sum(-1, keepdim=True) / block_c
    var = sum_sq / width
    return {
        "the row sums divided by the block size BLOCK_C where the row has `width` elements (mean and variance)":
            forward(block_mean, ((x - block_mean) ** 2).sum(-1, keepdim=True) / block_c),
        "a variance with the padded lanes in it: x - mean is -mean there, so zero it (tl.where(mask, ..., 0.0)) "
        "before squaring": forward(mean, (sum_sq + (block_c - width) * mean ** 2) / width),
        "a variance without the mean subtracted, sum(x^2) / C: it is sum((x - mean)^2) / C":
            forward(mean, (x * x).sum(-1, keepdim=True) / width),
        "the unbiased variance, divided by C - 1: LayerNorm's is the biased one, divided by C":
            forward(mean, sum_sq / (width - 1)),
        "eps outside the square root: rstd = 1 / sqrt(var + eps)": forward(mean, var, 1 / (var.sqrt() + eps)),
        "y without the bias b: y = xhat * w + b": forward(mean, var, b=0.0),
        "y without the weight w: y = xhat * w + b": forward(mean, var, w=1.0),
    }


def check_layer_norm_forward(module: ModuleType, device: str) -> None:
    from kernels.definitions import EPS, layer_norm_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for cases in (LAYER_NORM_FORWARD_CASES, LAYER_NORM_FORWARD_LAST_CASES):
        if cases is LAYER_NORM_FORWARD_LAST_CASES and _results is not None and not all(r.passed for r in _results):
            return
        for dtype in (torch.float32, torch.float16):
            for shape, spread in cases:
                g = _generator(sum(shape))
                C = shape[-1]
                block_c = 1 << (C - 1).bit_length()
                x = (torch.randn(shape, generator=g) * spread + 0.5).to(device, dtype)
                w = (1 + 0.5 * torch.randn(C, generator=g)).to(device, dtype)
                b = (0.5 * torch.randn(C, generator=g)).to(device, dtype)
                y, mean, rstd = module.layer_norm_forward(_nan_past_the_end(x, module.BLOCK_M * block_c), w, b, EPS)
                x64, w64, b64 = x.double(), w.double(), b.double()
                exact = (layer_norm_math(x64, w64, b64, EPS), x64.mean(-1),
                         torch.rsqrt(x64.var(-1, unbiased=False) + EPS))
                _, torch_mean, torch_rstd = torch.native_layer_norm(x.float(), (C,), w.float(), b.float(), EPS)
                in_torch = (torch_backend.layer_norm(x, w, b, EPS), torch_mean.view(shape[:-1]),
                            torch_rstd.view(shape[:-1]))
                wrong = _layer_norm_forward_variants(x64, w64, b64, EPS, block_c)
                case = f"{_dtype_name(dtype)}, shape {shape}" + (f", x spread {spread}" if spread != 2.0 else "")
                for i, (what, got, stored) in enumerate((("y", y, dtype), ("mean", mean, torch.float32),
                                                         ("rstd", rstd, torch.float32))):
                    scale = max(exact[i].abs().max().item(), 1.0)
                    _compare(what, got, exact[i], in_torch[i], against="float64 math", case=case,
                             floor=torch.finfo(stored).eps * scale, bound=LAYER_NORM_TOL[stored] * scale, dtype=dtype,
                             variants={name: outputs[i] for name, outputs in wrong.items()})


# (B, H, Tq, Tk, D): several query and key tiles with partial tails, padded head dims, a chunk of queries (Tq < Tk)
# whose diagonal falls across key tiles, and a decoding step (Tq = 1)
ATTENTION_SHAPES = [(1, 2, 37, 37, 24), (2, 1, 33, 33, 16), (1, 1, 5, 21, 16), (1, 2, 1, 19, 32)]


def _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed):
    g = _generator(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H, Tk, D, generator=g).to(device, dtype) for _ in range(2))
    do = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    return q, k, v, do


def _attention_scores(q, k):
    """scale * q k^T with the future masked (-inf), in q's dtype: (B, H, Tq, Tk)."""
    from kernels.definitions import future_mask

    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.masked_fill(future_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))


def _attention_floor(exact: torch.Tensor, stored: torch.dtype = torch.float32) -> float:
    """A few float32 roundings, as tests/test_attention.py, plus, for an output stored in a 16-bit dtype, one
    rounding of that dtype at the output's magnitude: the kernel rounds p to that dtype for tl.dot and its float32
    result once on the store, so it may land on the other neighbour of a value that PyTorch rounds to the nearer
    one, and 2 x PyTorch's error alone (half a rounding each) leaves it no room."""
    magnitude = exact.abs().max().item()
    storage = torch.finfo(stored).eps * magnitude if stored != torch.float32 else 0.0
    return 8 * torch.finfo(torch.float32).eps * max(1.0, magnitude) + storage


def _online_softmax(q, k, v, block_n: int, *, natural_exp=False, rescale_acc=True, rescale_l=True):
    """(out, lse2) of the forward's online softmax run tile by tile (key tiles of ``block_n``), in float64, with
    the kernel's mistakes on demand: ``natural_exp``, exp where the base-2 scores s want exp2; no ``rescale_acc`` or
    ``rescale_l``, acc or l not multiplied by alpha, so each tile's terms stay relative to the max of their step."""
    s = _attention_scores(q, k) * LOG2E  # the kernel's s: (B, H, Tq, Tk), base 2, -inf in the future
    Tk = s.shape[-1]
    tiles = -(-Tk // block_n)
    s = torch.nn.functional.pad(s, (0, tiles * block_n - Tk), value=float("-inf")).unflatten(-1, (tiles, block_n))
    m_step = s.amax(-1).cummax(-1).values  # m_i after each tile; finite (key 0 is in every row's first tile)
    m_last = m_step[..., -1:].expand_as(m_step)
    exp = torch.exp if natural_exp else torch.exp2

    def weights(rescaled):  # (B, H, Tq, Tk): each key's term as it sits in acc or l at the end
        return exp(s - (m_last if rescaled else m_step)[..., None]).flatten(-2)[..., :Tk]

    acc, l = weights(rescale_acc) @ v, weights(rescale_l).sum(-1)
    return acc / l[..., None], (m_last[..., 0] + torch.log2(l)).flatten(0, 1)


ONLINE_SOFTMAX_MISTAKES = {  # the update's wrong variants, named: _online_softmax's options for each
    "natural exp where the kernel works in base 2: did you fold log2(e) into the scale? s is already "
    "scale * log2(e) * q k^T, so use tl.math.exp2": dict(natural_exp=True),
    "a missing alpha rescale: multiply both l_i and acc by alpha = exp2(m_i - m_new) before adding the new "
    "tile": dict(rescale_acc=False, rescale_l=False),
    "a missing alpha rescale of acc (l_i is rescaled)": dict(rescale_acc=False),
    "a missing alpha rescale of l_i (acc is rescaled)": dict(rescale_l=False),
}


def check_attention_forward_inner(module: ModuleType, device: str) -> None:
    from kernels.definitions import causal_attention_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    mistakes = ONLINE_SOFTMAX_MISTAKES
    for dtype in (torch.float32, torch.float16):
        for B, H, Tq, Tk, D in ATTENTION_SHAPES:
            q, k, v, _ = _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed=Tq + Tk + D)
            case = f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}"
            o, lse2 = module.attention_forward(q, k, v)
            exact = causal_attention_math(q.double(), k.double(), v.double())
            wrong = {name: _online_softmax(q.double(), k.double(), v.double(), module.BLOCK_N, **how)
                     for name, how in mistakes.items()}
            _compare("out", o, exact, torch_backend.causal_attention(q, k, v), against="float64 math", case=case,
                     floor=_attention_floor(exact, dtype), dtype=dtype,
                     variants={name: out for name, (out, _) in wrong.items()})
            exact_lse2 = (torch.logsumexp(_attention_scores(q.double(), k.double()), -1) * LOG2E).view(B * H, Tq)
            torch_lse2 = (torch.logsumexp(_attention_scores(q, k).float(), -1) * LOG2E).view(B * H, Tq)
            _compare("log-sum-exp (base 2)", lse2, exact_lse2, torch_lse2, against="float64 math", case=case,
                     floor=_attention_floor(exact_lse2), dtype=dtype,
                     variants={name: lse for name, (_, lse) in wrong.items()})


def _forward_walk(q, k, v, block_m: int, block_n: int, *, band_end=None, band_mask=True):
    """(out, lse2, acc) of the forward kernel's walk over key tiles, in float64, key by key: the query tile of rows
    [start_m * block_m, ...) visits the key tiles [0, lo) unmasked and the tiles from lo up to hi masked (keys past
    Tk load as zeros; scores of keys in a row's future are -inf), with the kernel's mistakes on demand: ``band_end``
    (first, Tk) -> hi in place of min(first + block_m, Tk); no ``band_mask``, the band's scores not masked, so a
    row sees its future and the zero keys past Tk (score 0, value 0). acc: the unnormalized output."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    padded = -(-Tk // block_n) * block_n
    k, v = (torch.nn.functional.pad(t, (0, 0, 0, padded - Tk)) for t in (k, v))
    s = (q @ k.transpose(-2, -1)) * (LOG2E / math.sqrt(q.shape[-1]))  # the kernel's s: base 2
    seen = torch.zeros(Tq, padded, dtype=torch.bool)  # [row, key]: the key's score is in the row's softmax
    for start_m in range(-(-Tq // block_m)):
        rows = torch.arange(start_m * block_m, min(start_m * block_m + block_m, Tq))
        first = (Tk - Tq) + start_m * block_m
        lo = first // block_n * block_n
        hi = band_end(first, Tk) if band_end else min(first + block_m, Tk)
        end = lo + max(0, -(-(hi - lo) // block_n)) * block_n  # the band's tiles: range(lo, hi, block_n)
        cols = torch.arange(lo, end)
        seen[rows, :lo] = True
        seen[rows[:, None], cols] = (Tk - Tq + rows[:, None] >= cols) if band_mask else True
    s = s.masked_fill(~seen.to(s.device), float("-inf"))
    m = s.amax(-1)
    weights = torch.exp2(s - m[..., None])
    l = weights.sum(-1)
    acc = weights @ v
    return acc / l[..., None], (m + torch.log2(l)).flatten(0, 1), acc


def _forward_variants(q, k, v, block_m: int, block_n: int) -> tuple[dict, dict]:
    """Known wrong answers of the whole forward, in float64: (name -> out, name -> lse2)."""
    outs, lses = {}, {}
    for name, how in ONLINE_SOFTMAX_MISTAKES.items():
        outs[name], lses[name] = _online_softmax(q, k, v, block_n, **how)
    walks = {
        "the diagonal band one key short: the band is [lo, min(first + BLOCK_M, Tk)), the end exclusive, so that "
        "the last row sees its own key": dict(band_end=lambda first, Tk: min(first + block_m, Tk - 1)),
        "no causal mask on the diagonal band: there the rows see keys in their future (and the zeros loaded past "
        "Tk); mask the scores with tl.where(q_pos[:, None] >= cols[None, :], s, float(\"-inf\"))":
            dict(band_mask=False),
    }
    for name, how in walks.items():
        outs[name], lses[name], _ = _forward_walk(q, k, v, block_m, block_n, **how)
    _, lse2, acc = _forward_walk(q, k, v, block_m, block_n)
    outs["O = acc without the final division by l_i: the output is acc / l_i"] = acc
    m, l = _online_max_and_sum(q, k)
    lses["the log-sum-exp in natural log: the kernel keeps it in base 2, m_i + log2(l_i), as the backward reads "
         "it"] = lse2 * math.log(2)
    lses["m_i + ln(l_i): m_i is in base 2, so take the log of l_i in base 2 too (tl.math.log2)"] = m + torch.log(l)
    return outs, lses


def _online_max_and_sum(q, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max m (base 2) and sum l = sum_j 2^(s_j - m) as the kernel ends with them: (B * H, Tq) each."""
    s = _attention_scores(q, k) * LOG2E
    m = s.amax(-1)
    return m.flatten(0, 1), torch.exp2(s - m[..., None]).sum(-1).flatten(0, 1)


def check_attention_forward(module: ModuleType, device: str) -> None:
    from kernels.definitions import causal_attention_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    tiles = module.TILES
    for dtype in (torch.float32, torch.float16):
        for B, H, Tq, Tk, D in ATTENTION_SHAPES:
            q, k, v, _ = _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed=Tq + Tk + D)
            case = f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}"
            o, lse2 = module.attention_forward(q, k, v)
            q64, k64, v64 = q.double(), k.double(), v.double()
            exact = causal_attention_math(q64, k64, v64)
            outs, lses = _forward_variants(q64.cpu(), k64.cpu(), v64.cpu(), tiles.BLOCK_M, tiles.BLOCK_N)
            _compare("out", o, exact, torch_backend.causal_attention(q, k, v), against="float64 math", case=case,
                     floor=_attention_floor(exact, dtype), dtype=dtype, variants=outs)
            exact_lse2 = (torch.logsumexp(_attention_scores(q64, k64), -1) * LOG2E).view(B * H, Tq)
            torch_lse2 = (torch.logsumexp(_attention_scores(q, k).float(), -1) * LOG2E).view(B * H, Tq)
            _compare("log-sum-exp (base 2)", lse2, exact_lse2, torch_lse2, against="float64 math", case=case,
                     floor=_attention_floor(exact_lse2), dtype=dtype, variants=lses)


def check_attention_delta(module: ModuleType, device: str) -> None:
    for dtype in (torch.float32, torch.float16):
        for B, H, Tq, Tk, D in ATTENTION_SHAPES:
            q, k, v, do = _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed=Tq + Tk + D)
            # The definition, in float64: delta_i = sum_j P_ij dP_ij with dP = dO v^T.
            p = torch.softmax(_attention_scores(q.double(), k.double()), dim=-1)  # (B, H, Tq, Tk)
            dp = do.double() @ v.double().transpose(-2, -1)
            exact = (p * dp).sum(-1).view(B * H, Tq)
            o = (p @ v.double()).to(dtype)  # the forward's output, rounded to the dtype as a kernel would store it
            delta = module.attention_delta(o, do)
            in_torch = (o.float() * do.float()).sum(-1).view(B * H, Tq)
            o64, do64 = o.double(), do.double()
            wrong = {
                "the row sums of dO alone: delta is rowsum(dO * O), the product first": do64.sum(-1),
                "the row sums of O alone: delta is rowsum(dO * O), the product first": o64.sum(-1),
                "a row mean, not a row sum: delta = rowsum(dO * O), no division by D": (o64 * do64).mean(-1),
            }
            _compare("delta", delta, exact, in_torch, against="float64 sum_j P_ij dP_ij",
                     case=f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}",
                     floor=_attention_floor(exact), dtype=dtype,
                     variants={name: t.view(B * H, Tq) for name, t in wrong.items()})


# ----------------------------------------------------------------------------------------------------------------
# Exercise dropout_keep_mask (lesson 7): attention's dropout keep mask, drawn from Philox
#
# A mask is right or wrong bit for bit, so it is compared entry by entry with the real kernels' mask as
# kernels/tiled.py rebuilds it in NumPy (``dropout_keep_mask``; tests/test_tiled.py matches it with the kernel's
# own), for several tilings of the same problem. A known mistake is recognised when the mask is, in every case
# where that mistake changes anything, exactly the mask the mistake draws (computed here in NumPy).

# (seed, heads, Tq, Tk, p, (block_m, block_n)): the same problem under three tilings (a mask that depends on the
# tiles differs between them), a chunk of queries (Tq < Tk: the last 5 of 45 positions), a decoding step (Tq = 1),
# tiles that end past the last query and key, seeds up to 2^31 - 2 (the largest attention_seed draws)
DROPOUT_CASES = [(1234, 2, 37, 37, 0.25, (16, 16)), (1234, 2, 37, 37, 0.25, (8, 32)),
                 (1234, 2, 37, 37, 0.25, (32, 8)), (7, 3, 5, 45, 0.1, (16, 16)), (2**31 - 2, 2, 1, 19, 0.5, (16, 8)),
                 (99, 1, 24, 50, 0.75, (8, 16))]
DROPOUT_LAYOUTS = {  # which (word, half) each key of a group of 8 takes: the real order and two others
    "real": ((0, 0), (2, 0), (1, 0), (3, 0), (0, 1), (2, 1), (1, 1), (3, 1)),
    "word by word": ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)),
    "low halves first": ((0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)),
}


def _dropout_draws(key: int, rows, cols, counter: Callable, layout) -> "np.ndarray":
    """The 16-bit draw of each (query row, key) of a (Tq, Tk) grid: Philox called with ``key`` and
    ``counter(rows[:, None], cols[None, :])`` (int64), the key's half taken by ``layout`` (key % 8 -> word, half)."""
    import numpy as np

    from kernels.tiled import philox4x32

    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    counters = np.broadcast_to(counter(rows[:, None], cols[None, :]), (len(rows), len(cols)))
    words = np.stack(philox4x32(key, counters))  # (4, Tq, Tk)
    word, half = np.array(layout)[cols % 8].T
    picked = np.take_along_axis(words, np.broadcast_to(word, counters.shape)[None], axis=0)[0]
    return (picked >> (16 * half).astype(np.uint32)) & np.uint32(0xFFFF)


def _dropout_variants(seed: int, bh: int, Tq: int, Tk: int, p: float, block_m: int,
                      block_n: int) -> dict[str, "np.ndarray"]:
    """Known wrong keep masks of the (Tq, Tk) grid of batch-head ``bh``, in NumPy, each with one mistake."""
    import numpy as np

    from kernels.tiled import dropout_threshold

    rows, cols = np.arange(Tq), np.arange(Tk)  # row i is the query at position a = (Tk - Tq) + i
    key, threshold, real = seed + (bh << 32), dropout_threshold(p), DROPOUT_LAYOUTS["real"]

    def counter(a, j):
        return a * Tk + 8 * (j // 8)

    def draws(key=key, counter=counter, layout=real):
        return _dropout_draws(key, rows, cols, lambda i, j: counter(Tk - Tq + i, j), layout)

    def by_position(count):  # count(a, j, i): the counter of the query at position a, row i, on key j
        return lambda a, j: count(a, j, a - (Tk - Tq))

    right = draws()
    return {
        "a counter with the keys counted from the tile's first (first_key left out): the counter takes the key's "
        "position in the whole row, j, so that the mask does not depend on the tiling": draws(
            counter=lambda a, j: a * Tk + 8 * (j % block_n // 8)) >= threshold,
        "a counter with the queries counted from the tile's first (tl.arange where rows belongs): the counter takes "
        "the query's position a, so that the mask does not depend on the tiling": draws(
            counter=by_position(lambda a, j, i: i % block_m * Tk + 8 * (j // 8))) >= threshold,
        "a counter local to the tile (queries and keys counted from its first): every tile draws the same mask": draws(
            counter=by_position(lambda a, j, i: i % block_m * Tk + 8 * (j % block_n // 8))) >= threshold,
        "a counter with the query and the key swapped, 8 (j // 8) * T + a: it is a * T + 8 (j // 8)": draws(
            counter=lambda a, j: 8 * (j // 8) * Tk + a) >= threshold,
        "a key without the (batch, head) index: every head draws the same mask; the key is seed + (bh << 32)":
            draws(key=seed) >= threshold,
        "the key (seed + bh) << 32: + binds tighter than <<, so write seed + (bh << 32)":
            draws(key=(seed + bh) << 32) >= threshold,
        "the key seed + bh: then (seed, bh) and (seed + 1, bh - 1) draw one mask; bh goes to the high word, "
        "seed + (bh << 32)": draws(key=seed + bh) >= threshold,
        "the 16-bit halves given to the 8 keys of a group in another order (w0 low, w0 high, w1 low, ...): the "
        "order is w0 low, w2 low, w1 low, w3 low, w0 high, w2 high, w1 high, w3 high":
            draws(layout=DROPOUT_LAYOUTS["word by word"]) >= threshold,
        "the 16-bit halves given to the 8 keys of a group in another order (w0 low, w1 low, w2 low, ...): the "
        "order is w0 low, w2 low, w1 low, w3 low, w0 high, w2 high, w1 high, w3 high":
            draws(layout=DROPOUT_LAYOUTS["low halves first"]) >= threshold,
        "kept where the draw is below the threshold: that keeps a share p and drops 1 - p; keep draw >= threshold":
            right < threshold,
        "kept where the draw is above the threshold: keep draw >= threshold (a draw equal to it is kept)":
            right > threshold,
        "a threshold p * 2^16 cut to an integer, not rounded: add 0.5 before the cast": right >= int(
            np.float32(p) * np.float32(65536.0)),
        "the 16-bit draw compared with p itself: the threshold is on the draws' scale, round(p * 2^16)":
            right >= np.float32(p),
    }


def _dropout_threshold_cases() -> list[tuple]:
    """Two cases whose p puts the threshold on a draw of the mask: p = d / 2^16 for a draw d of the grid, where
    draw >= threshold and draw > threshold differ; and p = (d + 0.6) / 2^16, whose p * 2^16 rounds to d + 1 but
    is cut to d."""
    seed, heads, Tq, Tk, tiles = 5, 1, 16, 24, (16, 8)
    d = int(_dropout_draws(seed, [7], [11], lambda i, j: (Tk - Tq + i) * Tk + 8 * (j // 8),
                           DROPOUT_LAYOUTS["real"])[0, 0])
    return [(seed, heads, Tq, Tk, d / 65536, tiles), (seed, heads, Tq, Tk, (d + 0.6) / 65536, tiles)]


def _compare_mask(got: torch.Tensor, exact: torch.Tensor, *, case: str,
                  variants: dict[str, torch.Tensor]) -> None:
    """Record (or, outside run_check, raise on) a keep mask that differs from ``exact`` in any entry. The error is
    the share of entries that differ, none allowed; a wrong variant matches when the mask is that variant's."""
    err = (got != exact).double().mean().item() if got.shape == exact.shape else 1.0
    result = Result("keep mask, share wrong", case, torch.bool,
                    "the real kernel's mask (kernels/tiled.py's Philox in NumPy)", err, 0.0)
    if not result.passed:
        result.variants = {name: 0.0 if torch.equal(got, wrong) else math.inf for name, wrong in variants.items()
                           if not torch.equal(wrong, exact)}
    if _results is not None:
        _results.append(result)
    elif not result.passed:
        raise Mismatch(f"the keep mask differs from {result.against} in a share {err:.2g} of its entries ({case})")


def check_dropout_keep_mask(module: ModuleType, device: str) -> None:
    import numpy as np

    from kernels.tiled import dropout_keep_mask

    for seed, heads, Tq, Tk, p, (block_m, block_n) in DROPOUT_CASES + _dropout_threshold_cases():
        got = module.dropout_keep_mask(seed, heads, Tq, Tk, p, block_m=block_m, block_n=block_n, device=device)
        exact = np.stack([dropout_keep_mask(seed, bh, Tk, p, Tq=Tq) for bh in range(heads)])
        wrong: dict[str, list] = {}
        for bh in range(heads):
            for name, mask in _dropout_variants(seed, bh, Tq, Tk, p, block_m, block_n).items():
                wrong.setdefault(name, []).append(mask)
        _compare_mask(got.cpu(), torch.from_numpy(exact),
                      case=f"seed {seed}, {heads} head{'s' * (heads > 1)}, (Tq, Tk) = ({Tq}, {Tk}), p = {p:.6g}, "
                           f"tiles {block_m} x {block_n}",
                      variants={name: torch.from_numpy(np.stack(masks)) for name, masks in wrong.items()})


def check_elementwise_gelu(module: ModuleType, device: str) -> None:
    from kernels.definitions import gelu_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for dtype in (torch.float32, torch.float16):
        for approximate in ("tanh", "none"):
            for shape in GELU_SHAPES:
                x = (3 * torch.randn(shape, generator=_generator(sum(shape)))).to(device, dtype)
                y = module.gelu_forward(x, approximate)
                exact = gelu_math(x.double(), approximate)
                scale = max(exact.abs().max().item(), 1.0)
                _compare("y", y, exact, torch_backend.gelu(x, approximate), against="float64 math",
                         case=f"approximate={approximate!r}, {_dtype_name(dtype)}, shape {shape}",
                         floor=torch.finfo(dtype).eps * scale, bound=GELU_TOL[dtype] * scale)


# (rows, V): rows that fit in one tile of the exercise's BLOCK_V = 16 (a partial one, and one exactly full), then rows
# of several tiles with a partial last one; the rows' logits are shifted far apart (exp of an unshifted row overflows)
ROW_SOFTMAX_CASES = [(3, 5), (3, 16), (3, 37), (3, 100)]


def check_row_softmax(module: ModuleType, device: str) -> None:
    for rows, V in ROW_SOFTMAX_CASES:
        g = _generator(V)
        z = 4 * torch.randn(rows, V, generator=g) + torch.tensor([0.0, 90.0, -90.0])[:rows, None]
        targets = torch.randint(0, V, (rows,), generator=g)
        grad_scale = torch.rand(rows, generator=g) + 0.5
        logits = z.clone().to(device)
        loss = module.cross_entropy_rows(logits, targets.to(device), grad_scale.to(device))
        onehot = torch.nn.functional.one_hot(targets, V)
        zd = z.double()
        exact_loss = torch.logsumexp(zd, -1) - zd.gather(1, targets[:, None])[:, 0]
        exact_grad = grad_scale.double()[:, None] * (torch.softmax(zd, -1) - onehot)
        torch_loss = torch.logsumexp(z, -1) - z.gather(1, targets[:, None])[:, 0]
        torch_grad = grad_scale[:, None] * (torch.softmax(z, -1) - onehot)
        tiles = math.ceil(V / module.BLOCK_V)
        case = (f"float32, (rows, V) = {(rows, V)}, BLOCK_V = {module.BLOCK_V}: "
                f"{'one tile a row' if tiles == 1 else f'{tiles} tiles a row'}")
        # the floor: a few roundings of the exponent s = z log2(e), each an error of |s| eps in 2^s
        conditioning = 4 * torch.finfo(torch.float32).eps * max(1.0, z.abs().max().item())
        _compare("loss (log-sum-exp - the target's logit)", loss, exact_loss, torch_loss, against="float64 math",
                 case=case, floor=conditioning)  # lse's error: |s| eps, absolute
        _compare("softmax - onehot (times g)", logits, exact_grad, torch_grad, against="float64 math", case=case,
                 floor=conditioning * max(1.0, exact_grad.abs().max().item()))


# (Tq, Tk, block_m, block_n): tiles of queries wider and narrower than the key tiles, partial last tiles, fewer
# queries than keys with the diagonal falling inside a key tile and on its boundary, a decoding step (Tq = 1)
TILE_BOUNDS_CASES = [(37, 37, 16, 8), (37, 37, 8, 16), (33, 33, 16, 16), (5, 21, 16, 16), (1, 19, 16, 8),
                     (20, 50, 16, 32), (17, 40, 4, 8), (24, 31, 8, 8), (16, 64, 16, 16), (3, 3, 16, 16)]


def check_attention_tile_bounds(module: ModuleType, device: str) -> None:
    """Against a brute-force count over every (query, key) pair: row r of the queries (position Tk - Tq + r) sees
    key j when j <= Tk - Tq + r. The bounds must be tile-aligned, leave out no key a row sees, load none that no row
    sees, mask none that every row sees unless it shares a key tile with one that needs the mask."""
    for Tq, Tk, block_m, block_n in TILE_BOUNDS_CASES:
        for start_m in range(math.ceil(Tq / block_m)):
            rows = range(start_m * block_m, min(start_m * block_m + block_m, Tq))  # the tile's real rows
            seen = [[j <= Tk - Tq + r for j in range(Tk)] for r in rows]  # seen[row][key]
            by_all = [j for j in range(Tk) if all(s[j] for s in seen)]
            by_any = [j for j in range(Tk) if any(s[j] for s in seen)]
            got = module.forward_key_bounds(start_m, Tq, Tk, block_m, block_n)
            case = f"query tile {start_m}, (Tq, Tk, block_m, block_n) = {(Tq, Tk, block_m, block_n)}"
            problem = None
            if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(b, int) for b in got)):
                problem = f"{got!r} is not a pair of ints"
            else:
                lo, hi = got
                if lo % block_n or not 0 <= lo <= hi:
                    problem = f"lo = {lo} is not a key tile boundary (a multiple of block_n) in [0, hi]"
                elif lo > len(by_all):  # by_all is the keys [0, len(by_all))
                    problem = (f"key {len(by_all)} is before lo but not seen by every row: it needs the mask "
                               f"({len(by_all)} keys are seen by every row)")
                elif hi < by_any[-1] + 1:
                    problem = f"key {by_any[-1]} is seen by a row of the tile but lies at or past hi"
                elif hi > by_any[-1] + 1:
                    problem = f"hi is past key {by_any[-1]}, the last one any row sees: tiles loaded for nothing"
                elif lo // block_n < (len(by_all) - 1) // block_n:  # the tile's first row sees keys [0, len)
                    problem = (f"the band starts {(len(by_all) - 1) // block_n - lo // block_n} key tile(s) early: "
                               f"keys [{lo}, {lo + block_n}) are seen by every row, no mask needed")
            if problem:
                raise Mismatch(f"(lo, hi) = {got!r} differs from what a brute-force count over every (query, key) "
                               f"pair allows: {problem} ({case})")


# ----------------------------------------------------------------------------------------------------------------
# Exercise document_tile_bounds (lesson 12): with packed documents, the first key a query tile visits and the end of
# the query rows a key tile visits
#
# Against a brute-force count over every (query, key) pair of windows packed with documents: row r (position
# Tk - Tq + r) sees key j when j <= Tk - Tq + r and both lie in one document. From that count alone: a query tile's
# first_key is the first key any of its rows sees, rounded down to a key tile (the loop steps by block_n); a key
# tile's last_row is one past the last row that sees any of its keys, at least mid (lesson 6's band, walked
# anyway). Every number is compared for every tile; a case's row in the table says what its first wrong tile does.

# (Tq, Tk, block_m, block_n, document lengths), by hand: kernels.explain's example; one document (the bounds
# without documents); documents of one token; documents that end on tile boundaries; a chunk of queries whose
# first document began before it; a decoding step. Random windows follow (_document_tile_cases).
DOCUMENT_TILE_CASES = [(10, 10, 4, 2, (3, 5, 2)), (37, 37, 16, 8, (37,)), (37, 37, 8, 16, (1, 1, 1, 1, 1, 32)),
                       (32, 32, 8, 8, (8, 16, 8)), (5, 21, 16, 16, (9, 12)), (24, 50, 8, 16, (30, 3, 17)),
                       (1, 19, 16, 8, (4, 15))]
DOCUMENT_TILE_RANDOM = 10  # random windows: 2 to 64 keys, up to 6 documents, tiles of 2 to 16, Tq = Tk every other


def _document_tile_cases() -> list[tuple[int, int, int, int, tuple[int, ...]]]:
    import numpy as np

    rng = np.random.default_rng(12)
    cases = list(DOCUMENT_TILE_CASES)
    for i in range(DOCUMENT_TILE_RANDOM):
        Tk = int(rng.integers(2, 65))
        Tq = Tk if i % 2 == 0 else int(rng.integers(1, Tk + 1))
        block_m, block_n = (int(b) for b in rng.choice([2, 4, 8, 16], size=2))
        cuts = np.sort(rng.choice(np.arange(1, Tk), size=min(int(rng.integers(0, 6)), Tk - 1), replace=False))
        cases.append((Tq, Tk, block_m, block_n, tuple(int(n) for n in np.diff([0, *cuts, Tk]))))
    return cases


def _ids_and_bounds(Tk: int, lengths: tuple[int, ...]):
    """(ids, doc_start, doc_end) of a window of documents of ``lengths``, each (Tk,) int64, counted out here."""
    import numpy as np

    ids = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum([0, *lengths[:-1]])
    ends = np.cumsum(lengths)
    assert len(ids) == Tk, (Tk, lengths)
    return ids, starts[ids].astype(np.int64), ends[ids].astype(np.int64)


def _document_tile_truth(Tq: int, Tk: int, block_m: int, block_n: int, ids) -> dict[str, list]:
    """What the brute-force count allows, per tile: "first_key" (query tiles) and "last_row" (key tiles), and the
    unrounded "first_seen" and "rows_end" they come from."""
    import numpy as np

    from kernels.tiled import dkdv_query_bounds

    offset = Tk - Tq
    rows, keys = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
    sees = (keys <= offset + rows) & (ids[offset + rows] == ids[keys])  # (Tq, Tk): row r sees key j
    truth: dict[str, list] = {"first_key": [], "first_seen": [], "last_row": [], "rows_end": [], "mid": []}
    for start_m in range(math.ceil(Tq / block_m)):
        first_seen = int(np.argmax(sees[start_m * block_m:(start_m + 1) * block_m].any(0)))  # every row sees itself
        truth["first_seen"].append(first_seen)
        truth["first_key"].append(first_seen // block_n * block_n)
    for start_n in range(math.ceil(Tk / block_n)):
        seeing = np.flatnonzero(sees[:, start_n * block_n:(start_n + 1) * block_n].any(1))
        rows_end = int(seeing[-1]) + 1 if len(seeing) else 0
        _, mid = dkdv_query_bounds(start_n, Tq, Tk, block_m, block_n)
        truth["rows_end"].append(rows_end)
        truth["mid"].append(mid)
        truth["last_row"].append(max(mid, rows_end))
    return truth


DOCUMENTS_IGNORED = ("the documents ignored (first_key 0, last_row Tq: every tile walked as without documents): "
                     "use doc_start and doc_end")


def _first_key_variants(Tq, Tk, block_m, block_n, doc_start) -> dict[str, Callable[[int], int]]:
    """Known wrong forward_first_key, each with one mistake: name -> start_m -> first_key."""
    def first(m):
        return (Tk - Tq) + m * block_m

    return {
        "first_key not rounded down to a key tile: the loop steps by block_n from it, so it must be a key tile's "
        "first key (doc_start // block_n * block_n)": lambda m: int(doc_start[first(m)]),
        "first_key rounded up to a key tile: round down (//), or the rows lose the keys of the tile that holds "
        "their document's start": lambda m: -(-int(doc_start[first(m)]) // block_n) * block_n,
        "first_key as a key tile's number (doc_start // block_n): the loop wants a key, // block_n * block_n":
            lambda m: int(doc_start[first(m)]) // block_n,
        "the document of the tile's last row, not its first: document starts never decrease, so the first row's "
        "document starts earliest, and its keys are seen too":
            lambda m: int(doc_start[min(first(m) + block_m, Tk) - 1]) // block_n * block_n,
        "the tile's first row without the offset Tk - Tq: query row r sits at position (Tk - Tq) + r":
            lambda m: int(doc_start[m * block_m]) // block_n * block_n,
        "the tile's own first position rounded down (lesson 5's lo), not its document's start: the rows also see "
        "the keys of their document before the diagonal band": lambda m: first(m) // block_n * block_n,
        DOCUMENTS_IGNORED: lambda m: 0,
    }


def _last_row_variants(Tq, Tk, block_m, block_n, doc_end) -> dict[str, Callable[[int], int]]:
    """Known wrong dkdv_last_row, each with one mistake: name -> start_n -> last_row."""
    from kernels.tiled import dkdv_query_bounds

    offset = Tk - Tq

    def mid(n):
        return dkdv_query_bounds(n, Tq, Tk, block_m, block_n)[1]

    def last_key(n):
        return min((n + 1) * block_n, Tk) - 1

    def clamped(n, end):  # the kernel's clamps around a row number
        return max(mid(n), min(Tq, end))

    return {
        "one row short at the document's end: doc_end is already exclusive (the first position past the "
        "document), so last_row is doc_end - (Tk - Tq), no - 1":
            lambda n: clamped(n, int(doc_end[last_key(n)]) - 1 - offset),
        "one row past the document's end: doc_end is exclusive (the first position past the document), so "
        "last_row is doc_end - (Tk - Tq), no + 1": lambda n: clamped(n, int(doc_end[last_key(n)]) + 1 - offset),
        "the document of the tile's first key, not its last: document ends never decrease, so the last key's "
        "document ends last, and its rows see the tile": lambda n: clamped(n, int(doc_end[n * block_n]) - offset),
        "doc_end used as a row without the offset Tk - Tq: it is a position, and row r sits at position "
        "(Tk - Tq) + r": lambda n: clamped(n, int(doc_end[last_key(n)])),
        "last_row not kept at least mid: the band [lo, mid) is walked anyway, so the kernel's last_row is "
        "max(mid, ...)": lambda n: min(Tq, int(doc_end[last_key(n)]) - offset),
        "last_row rounded up to a whole query tile: the loop stops at its first step at or past last_row, so the "
        "kernel's is not rounded": lambda n: clamped(n, -(-(int(doc_end[last_key(n)]) - offset) // block_m) * block_m),
        DOCUMENTS_IGNORED: lambda n: Tq,
    }


def _first_key_problem(start_m: int, got: int, truth: dict, block_n: int) -> str:
    """What query tile ``start_m`` does wrong with first_key ``got``, in words."""
    first_seen, right = truth["first_seen"][start_m], truth["first_key"][start_m]
    if got > first_seen:
        return f"query tile {start_m} skips key {first_seen}, seen by one of its rows"
    if got % block_n:
        return f"query tile {start_m} starts at key {got}, not a key tile boundary (a multiple of {block_n})"
    return f"query tile {start_m} visits keys [{got}, {right}), seen by none of its rows"


def _last_row_problem(start_n: int, got: int, truth: dict, Tq: int, block_m: int) -> str:
    """What key tile ``start_n`` does wrong with last_row ``got``, in words."""
    mid, rows_end, right = truth["mid"][start_n], truth["rows_end"][start_n], truth["last_row"][start_n]

    def covered(last_row):  # the end of the query tiles the kernel's two loops visit
        return mid if last_row <= mid else mid + -(-(last_row - mid) // block_m) * block_m

    if covered(got) < rows_end:
        return f"key tile {start_n} stops before row {covered(got)}, which sees one of its keys"
    if covered(got) > covered(right) and got > Tq:
        return f"key tile {start_n}: last_row {got} is past Tq = {Tq}, in query tiles that do not exist"
    if covered(got) > covered(right):
        return f"key tile {start_n} visits rows [{covered(right)}, {min(covered(got), Tq)}), which see none of its keys"
    return f"key tile {start_n}: last_row {got}, the kernel's {right} (the same query tiles, not the same number)"


def _bound_value(function: str, value) -> int:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise Mismatch(f"{function} returned {value!r}, not an int: a key or row number (// divides to an int)")
    return int(value)


def check_document_tile_bounds(module: ModuleType, device: str) -> None:
    """Both functions on every tile of every case, against the brute-force count; each (case, function) one row of
    the report, its error the largest distance (in keys or rows) from the count's number over the tiles."""
    for Tq, Tk, block_m, block_n, lengths in _document_tile_cases():
        ids, doc_start, doc_end = _ids_and_bounds(Tk, lengths)
        truth = _document_tile_truth(Tq, Tk, block_m, block_n, ids)
        shape = f"Tq {Tq}, Tk {Tk}, tiles {block_m} x {block_n}, documents {'+'.join(map(str, lengths))}"
        outputs = [
            ("first_key (forward, dQ)", "first_key", "forward_first_key",
             lambda m: module.forward_first_key(m, Tq, Tk, block_m, block_n, doc_start.copy()),
             _first_key_variants(Tq, Tk, block_m, block_n, doc_start),
             lambda m, got: _first_key_problem(m, got, truth, block_n)),
            ("last_row (dK/dV)", "last_row", "dkdv_last_row",
             lambda n: module.dkdv_last_row(n, Tq, Tk, block_m, block_n, doc_end.copy()),
             _last_row_variants(Tq, Tk, block_m, block_n, doc_end),
             lambda n, got: _last_row_problem(n, got, truth, Tq, block_m)),
        ]
        for what, key, function, call, variants, problem in outputs:
            right = truth[key]
            got = [_bound_value(function, call(tile)) for tile in range(len(right))]
            wrong = [tile for tile in range(len(right)) if got[tile] != right[tile]]
            err = max(abs(g - r) for g, r in zip(got, right))
            result = Result(what, shape + (f": {problem(wrong[0], got[wrong[0]])}" if wrong else ""), torch.int64,
                            "the bounds a brute-force count over every (query, key) pair gives", float(err), 0.0)
            if wrong:
                answers = {name: [f(tile) for tile in range(len(right))] for name, f in variants.items()}
                result.variants = {name: 0.0 if answer == got else math.inf for name, answer in answers.items()
                                   if answer != right}
            if _results is not None:
                _results.append(result)
            elif wrong:
                raise Mismatch(f"{what} differs from {result.against}: {result.case}")


EXERCISES = {e.name: e for e in [
    Exercise("gelu_backward", 3, "kernels/gelu.py", "_gelu_bwd", check_gelu_backward),
    Exercise("layer_norm_dx", 4, "kernels/layer_norm.py", "_layer_norm_bwd_dx", check_layer_norm_dx),
    Exercise("layer_norm_forward", 4, "kernels/layer_norm.py", "_layer_norm_fwd", check_layer_norm_forward,
             also_copies=("_layer_norm_forward",)),
    Exercise("attention_forward_inner", 5, "kernels/attention.py", "_fwd_inner", check_attention_forward_inner),
    Exercise("attention_forward", 5, "kernels/attention.py", "_attention_fwd", check_attention_forward,
             also_copies=("_fwd_inner", "attention_fwd")),
    Exercise("attention_delta", 6, "kernels/attention.py", "_attention_bwd_preprocess", check_attention_delta),
    Exercise("dropout_keep_mask", 7, "kernels/attention.py", "_keep_mask", check_dropout_keep_mask,
             also_copies=("_attention_fwd",)),
    Exercise("elementwise_gelu", 3, "kernels/gelu.py", "_gelu_fwd", check_elementwise_gelu,
             also_copies=("_gelu_forward",)),
    Exercise("attention_tile_bounds", 5, "kernels/tiled.py", "forward_key_bounds", check_attention_tile_bounds),
    Exercise("row_softmax", 5, "kernels/linear_cross_entropy.py", "_cross_entropy_rows_step", check_row_softmax,
             also_copies=("_fold_tile",)),
    Exercise("document_tile_bounds", 12, "kernels/tiled.py", "forward_first_key", check_document_tile_bounds,
             also_copies=("dkdv_last_row",)),
]}


# ----------------------------------------------------------------------------------------------------------------
# Running them


def course_order() -> list[Exercise]:
    """The exercises in the order COURSE.md gives them: by lesson, and within a lesson by where its
    ``**Exercise `name`.**`` marker stands (the registry's order where COURSE.md or a marker is missing)."""
    course = HERE.parent / "COURSE.md"
    text = course.read_text(encoding="utf-8") if course.is_file() else ""
    exercises = list(EXERCISES.values())

    def key(exercise: Exercise) -> tuple[int, int, int]:
        at = text.find(f"**Exercise `{exercise.name}`.**")
        return exercise.lesson, at if at >= 0 else len(text), exercises.index(exercise)

    return sorted(exercises, key=key)



def split_at_markers(text: str, exercise: Exercise) -> tuple[str, str, str]:
    """(before, region, after) of an exercise or solution file's text: the region is the lines between the start
    marker's line and the end marker's line, both markers in ``before`` and ``after``. Raises ValueError when the
    markers are not there once each, in order."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == exercise.start_marker()]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_MARKER]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"exercise {exercise.name}: expected one line {exercise.start_marker()!r} and after it one "
                         f"line {END_MARKER!r}, found {len(starts)} and {len(ends)}")
    start, end = starts[0], ends[0]
    return "".join(lines[:start + 1]), "".join(lines[start + 1:end]), "".join(lines[end:])


def prepare_device() -> str:
    """Where the exercises run: "cuda" on a GPU Triton compiles for, else "cpu" under Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("error: the exercises need Triton — `pip install triton` (Linux)")
    import kernels

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "cuda"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its note that the interpreter is slow: expected here
            kernels.get_backend("triton")  # switches the interpreter on, before any exercise is loaded
    except kernels.BackendUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    return "cpu"


def load(exercise: Exercise, solution: bool = False, path: Path | None = None) -> ModuleType:
    """The exercise (or its solution, or the file at ``path``: a copy of either) imported afresh: its kernels are
    made now, under the current mode."""
    kind = "file_" if path is not None else "solution_" if solution else ""
    path = exercise.path(solution) if path is None else Path(path)
    module_name = f"exercises._loaded_{kind}{exercise.name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton reads a kernel's source through its module
    spec.loader.exec_module(module)
    return module


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def blank_is_filled(exercise: Exercise, path: Path) -> bool:
    """False while the placeholder line is still between the file's markers (or the markers are gone)."""
    try:
        _, region, _ = split_at_markers(path.read_text(), exercise)
    except (OSError, ValueError):
        return False
    return PLACEHOLDER not in region


def run_check(name: str, solution: bool = False, device: str | None = None,
              path: Path | None = None) -> tuple[bool, str]:
    """(passed, the report to print) for the exercise called ``name``: its file, its solution, or the file at
    ``path``. PASS is one line; FAIL is a line naming the exercise, what went wrong and what to do, then what the
    failures look like (a NaN, a known mistake, a precision failure) and a table of every failing case."""
    global _results
    exercise = EXERCISES[name]
    device = device or prepare_device()
    results: list[Result] = []
    problem = None
    _results = results
    try:
        module = load(exercise, solution, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow notes from a wrong formula
            exercise.check(module, device)
    except Mismatch as e:
        problem = str(e)
    except Exception as e:  # the learner's code may raise anything: report it on the same line
        problem = f"running it raised {_one_line(e)}"
    finally:
        _results = None
    failed = [r for r in results if not r.passed]
    if problem is None and not failed:
        return True, f"PASS {name} (lesson {exercise.lesson})"
    if problem is None:
        outputs = ", ".join(dict.fromkeys(r.what for r in failed))
        problem = (f"the result differs from {failed[0].against} in {len(failed)} of {len(results)} comparisons "
                   f"({outputs})")
    path = exercise.path(solution) if path is None else Path(path)
    where = path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path
    if solution:
        fix = f"the solution {where} should pass"
    elif not (filled := blank_is_filled(exercise, path)):
        fix = f"fill in the blank in {where}"
    else:
        fix = f"check your lines between the markers in {where} against the math in its docstring"
    report = [f"FAIL {name} (lesson {exercise.lesson}, COURSE.md): {problem} — {fix}"]
    if failed:
        diagnosis = diagnose(results) if solution or filled else None  # a placeholder's output means nothing
        report += ([f"  {diagnosis}"] if diagnosis else []) + failure_table(results)
    return False, "\n".join(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exercises",
        description="Fill-in-the-blank Triton kernels; see exercises/README.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run exercises against their tests: PASS, or FAIL and what failed")
    check.add_argument("names", nargs="*", metavar="name",
                       help=f"exercises to check (default: all): {', '.join(EXERCISES)}")
    check.add_argument("--solutions", action="store_true",
                       help="check the filled-in files in exercises/solutions/ instead")
    commands.add_parser("list", help="list the exercises with their lessons and real kernels")
    args = parser.parse_args(argv)

    if args.command == "list":
        return run_cli(lambda: print("\n".join(f"{e.name:<24} lesson {e.lesson:<2}  copies "
                                               f"{', '.join((e.real_function, *e.also_copies))} in {e.real_file}"
                                               for e in course_order())))
    unknown = [name for name in args.names if name not in EXERCISES]
    if unknown:
        parser.error(f"unknown exercise {unknown[0]!r} — choose from {', '.join(EXERCISES)}")
    device = prepare_device()

    def check_all() -> int:
        all_passed = True
        for name in args.names or EXERCISES:
            passed, line = run_check(name, args.solutions, device)
            print(line, flush=True)
            all_passed &= passed
        return 0 if all_passed else 1

    return run_cli(check_all)
