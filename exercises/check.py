"""The exercises' checker: ``python -m exercises check [name ...] [--solutions]`` (see exercises/README.md).

Each exercise file is loaded afresh and its launcher run on small, awkward shapes against the kind of test its real
kernel passes in tests/: the result is compared with the same computation in float64 (by autograd where there is a
gradient), and it must land within twice the error of PyTorch doing the job in the same dtype, plus a floor of a
few roundings (and, where the real test has one, under a bound per dtype). One line per exercise: PASS, or FAIL
with what differed and by how much; exit code 0 when all pass, 1 otherwise.

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

    def path(self, solution: bool = False) -> Path:
        return HERE / "solutions" / f"{self.name}.py" if solution else HERE / f"{self.name}.py"

    def start_marker(self) -> str:
        return START_MARKER.format(name=self.name, lesson=self.lesson)


# ----------------------------------------------------------------------------------------------------------------
# Comparing with float64


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compare(what: str, got: torch.Tensor, exact: torch.Tensor, other: torch.Tensor, *, against: str, case: str,
             floor: float, bound: float = math.inf) -> None:
    """Raise Mismatch unless ``got`` is as close to ``exact`` (float64) as ``other`` (PyTorch in the same dtype): a
    max abs error at most 2 * other's + ``floor``, and at most ``bound``. The rule of tests/test_gelu.py,
    test_layer_norm.py and test_attention.py."""
    if tuple(got.shape) != tuple(exact.shape):
        raise Mismatch(f"{what} has shape {tuple(got.shape)}, expected {tuple(exact.shape)} ({case})")
    err = (got.double() - exact).abs().max().item()
    allowed = min(2 * (other.double() - exact).abs().max().item() + floor, bound)
    if not err <= allowed:  # `not <=`: a NaN fails too
        raise Mismatch(f"{what} differs from {against} by {err:.2g} (max abs; allowed {allowed:.2g}; {case})")


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
                         floor=torch.finfo(dtype).eps * scale, bound=GELU_TOL[dtype] * scale)


LAYER_NORM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}  # relative to max(|dx|, 1), as tests/test_layer_norm.py
LAYER_NORM_SHAPES = [(3, 7), (37, 48), (1, 1, 1023)]


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
                     bound=LAYER_NORM_TOL[dtype] * scale)


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


def _attention_floor(exact: torch.Tensor) -> float:
    return 8 * torch.finfo(torch.float32).eps * max(1.0, exact.abs().max().item())  # as tests/test_attention.py


def check_attention_forward_inner(module: ModuleType, device: str) -> None:
    from kernels.definitions import causal_attention_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for dtype in (torch.float32, torch.float16):
        for B, H, Tq, Tk, D in ATTENTION_SHAPES:
            q, k, v, _ = _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed=Tq + Tk + D)
            case = f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}"
            o, lse2 = module.attention_forward(q, k, v)
            exact = causal_attention_math(q.double(), k.double(), v.double())
            _compare("out", o, exact, torch_backend.causal_attention(q, k, v), against="float64 math", case=case,
                     floor=_attention_floor(exact))
            exact_lse2 = (torch.logsumexp(_attention_scores(q.double(), k.double()), -1) * LOG2E).view(B * H, Tq)
            torch_lse2 = (torch.logsumexp(_attention_scores(q, k).float(), -1) * LOG2E).view(B * H, Tq)
            _compare("log-sum-exp (base 2)", lse2, exact_lse2, torch_lse2, against="float64 math", case=case,
                     floor=_attention_floor(exact_lse2))


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
            _compare("delta", delta, exact, in_torch, against="float64 sum_j P_ij dP_ij",
                     case=f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}",
                     floor=_attention_floor(exact))


EXERCISES = {e.name: e for e in [
    Exercise("gelu_backward", 3, "kernels/gelu.py", "_gelu_bwd", check_gelu_backward),
    Exercise("layer_norm_dx", 4, "kernels/layer_norm.py", "_layer_norm_bwd_dx", check_layer_norm_dx),
    Exercise("attention_forward_inner", 5, "kernels/attention.py", "_fwd_inner", check_attention_forward_inner),
    Exercise("attention_delta", 6, "kernels/attention.py", "_attention_bwd_preprocess", check_attention_delta),
]}


# ----------------------------------------------------------------------------------------------------------------
# Running them


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


def load(exercise: Exercise, solution: bool = False) -> ModuleType:
    """The exercise (or its solution) file, imported afresh: its kernels are made now, under the current mode."""
    path = exercise.path(solution)
    module_name = f"exercises._loaded_{'solution_' if solution else ''}{exercise.name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton reads a kernel's source through its module
    spec.loader.exec_module(module)
    return module


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def run_check(name: str, solution: bool = False, device: str | None = None) -> tuple[bool, str]:
    """(passed, the one line to print) for the exercise called ``name`` (or its solution)."""
    exercise = EXERCISES[name]
    device = device or prepare_device()
    try:
        module = load(exercise, solution)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow notes from a wrong formula
            exercise.check(module, device)
    except Mismatch as e:
        problem = str(e)
    except Exception as e:  # the learner's code may raise anything: report it on the same one line
        problem = f"running it raised {_one_line(e)}"
    else:
        return True, f"PASS {name} (lesson {exercise.lesson})"
    where = exercise.path(solution).relative_to(HERE.parent)
    fix = f"the solution {where} should pass" if solution else f"fill in the blank in {where}"
    return False, f"FAIL {name} (lesson {exercise.lesson}, COURSE.md): {problem} — {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exercises",
        description="Fill-in-the-blank Triton kernels; see exercises/README.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run exercises against their tests: one PASS/FAIL line each")
    check.add_argument("names", nargs="*", metavar="name",
                       help=f"exercises to check (default: all): {', '.join(EXERCISES)}")
    check.add_argument("--solutions", action="store_true",
                       help="check the filled-in files in exercises/solutions/ instead")
    commands.add_parser("list", help="list the exercises with their lessons and real kernels")
    args = parser.parse_args(argv)

    if args.command == "list":
        return run_cli(lambda: print("\n".join(f"{e.name:<24} lesson {e.lesson}   copies {e.real_function} in "
                                               f"{e.real_file}" for e in EXERCISES.values())))
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
