"""The exercises' checker: ``python -m exercises check [name ...] [--solutions]`` (see exercises/README.md).

Each exercise file is loaded afresh and its launcher run on small, awkward shapes against the kind of test its real
kernel passes in tests/: the result is compared with the same computation in float64 (by autograd where there is a
gradient), and it must land within twice the error of PyTorch doing the job in the same dtype, plus a floor of a
few roundings (and, where the real test has one, under a bound per dtype). PASS in one line per exercise, or FAIL
with what differed, what the failures look like — a NaN, a known mistake recognised by matching the result with
that mistake computed here in float64, or a precision failure — and a table of every failing case (output, case,
max error, allowed); exit code 0 when all pass, 1 otherwise. This file registers the exercises and runs them; their
checks, one function per exercise, are in exercises/checks/, by kernel.

Without a GPU the kernels run in Triton's interpreter on the CPU: ``kernels.get_backend("triton")`` switches it on,
and re-wraps Triton's own functions if something imported ``triton.language`` before. With a GPU they run there.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from kernels.cli import run_cli

from .checks.attention import (check_attention_delta, check_attention_forward, check_attention_forward_inner,
                               check_attention_tile_bounds)
from .checks.compare import Mismatch, Result, diagnose, failure_table, recording
from .checks.documents import check_document_tile_bounds
from .checks.dropout import check_dropout_keep_mask
from .checks.rows import (check_elementwise_gelu, check_gelu_backward, check_layer_norm_dx, check_layer_norm_forward,
                          check_row_softmax)

HERE = Path(__file__).resolve().parent  # exercises/
START_MARKER = "# ---- your code here (exercise {name}, lesson {lesson}) ----"
END_MARKER = "# ---- end ----"
PLACEHOLDER = "placeholder:"  # in the comment of each blank's placeholder line (exercises/*.py), gone once filled


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
    exercise = EXERCISES[name]
    device = device or prepare_device()
    results: list[Result] = []
    problem = None
    try:
        module = load(exercise, solution, path)
        with warnings.catch_warnings(), recording(results):
            warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow notes from a wrong formula
            exercise.check(module, device)
    except Mismatch as e:
        problem = str(e)
    except Exception as e:  # the learner's code may raise anything: report it on the same line
        problem = f"running it raised {_one_line(e)}"
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

