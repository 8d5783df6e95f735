"""The kernel exercises (exercises/): the checker passes every solution and fails every blank, with one line that
names the exercise and its lesson; and the solutions cannot drift from the real kernels they copy.

Without a GPU the exercises run in Triton's interpreter, on shapes small enough to take a few seconds in all.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from exercises.check import EXERCISES, main, prepare_device, run_check, split_at_markers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(EXERCISES)


@pytest.fixture(scope="module")
def device() -> str:
    return prepare_device()


# ----------------------------------------------------------------------------------------------------------------
# The checker, both ways


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes(name, device):
    passed, line = run_check(name, solution=True, device=device)
    assert passed, line
    assert line == f"PASS {name} (lesson {EXERCISES[name].lesson})"


@pytest.mark.parametrize("name", NAMES)
def test_blank_fails_naming_the_exercise_and_lesson(name, device):
    passed, report = run_check(name, solution=False, device=device)
    assert not passed
    line, *table = report.splitlines()  # the headline, then what the failures look like and a table of them
    assert line.startswith(f"FAIL {name} (lesson {EXERCISES[name].lesson}, COURSE.md): "), line
    assert " differs from " in line, line  # the placeholder runs: the check fails on the numbers, not on an error
    assert line.endswith(f" — fill in the blank in exercises/{name}.py"), line
    # the tensor exercises list their failing cases in a table; the tile bounds name their first wrong case in
    # the headline (a brute-force count over the pairs, not an error to tabulate)
    assert (table or "brute-force count" in line) and all(row.startswith("  ") for row in table), report


def test_cli_checks_every_exercise_in_a_fresh_process():
    """`python -m exercises check` on the blanks: four FAIL lines, exit code 1; the checker switches Triton's
    interpreter on by itself when there is no GPU (TRITON_INTERPRET is not set here)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "exercises", "check"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("  ")]  # headlines, not tables
    assert [line.split(" (")[0] for line in lines] == [f"FAIL {name}" for name in NAMES], result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_exit_code_zero_when_the_named_exercises_pass(capsys, device):
    assert main(["check", "--solutions", "attention_delta"]) == 0
    assert capsys.readouterr().out == "PASS attention_delta (lesson 6)\n"


def test_unknown_exercise_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "gelu_forward"])
    assert exit_info.value.code == 2
    assert "unknown exercise 'gelu_forward' — choose from gelu_backward" in capsys.readouterr().err


def test_ctrl_c_while_checking_is_one_line_and_130(capsys, device, monkeypatch):
    import exercises.check

    def interrupted(*args):
        raise KeyboardInterrupt  # the interpreter can take a while on a learner's slow kernel

    monkeypatch.setattr(exercises.check, "run_check", interrupted)
    assert main(["check", "gelu_backward"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_list_to_a_full_device_is_one_line():
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "exercises", "list"], cwd=ROOT, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: No space left on device: standard output — free some disk "
                                          "space or write somewhere else"]


# ----------------------------------------------------------------------------------------------------------------
# No drift: the solutions are the real kernels' lines, and the exercises differ from them only in the blank


def _real_function_lines(path: Path, function: str) -> list[tuple[str, str]]:
    """(line, line without its trailing comment) for each line of the top-level function ``function`` in ``path``,
    its decorators included, leading whitespace stripped."""
    source = path.read_text()
    lines = source.splitlines()
    comment_at = {}  # line number -> column of its comment
    with path.open() as f:
        for token in tokenize.generate_tokens(f.readline):
            if token.type == tokenize.COMMENT:
                comment_at[token.start[0]] = token.start[1]
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == function), None)
    assert node is not None, f"{path.relative_to(ROOT)} has no function {function}: update exercises/check.py"
    return [(lines[i - 1].strip(), lines[i - 1][:comment_at.get(i, len(lines[i - 1]))].strip())
            for i in range(min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno + 1)]


@pytest.mark.parametrize("name", NAMES)
def test_solution_lines_are_the_real_kernels(name):
    """Each line of the filled region appears, in order, in the real kernel function (leading whitespace aside; a
    trailing comment may be left out, not changed). A region that spans several functions (``also_copies``: a
    kernel written from zero with its launcher's grid) takes each line from one of them, in order within each."""
    exercise = EXERCISES[name]
    _, region, _ = split_at_markers(exercise.path(solution=True).read_text(), exercise)
    wanted = [line.strip() for line in region.splitlines() if line.strip()]
    assert wanted, f"the solution of {name} fills in nothing"
    functions = (exercise.real_function, *exercise.also_copies)
    real = {function: _real_function_lines(ROOT / exercise.real_file, function) for function in functions}
    position = dict.fromkeys(functions, 0)  # per function: where the next line may be found
    for line in wanted:
        found = next(((function, i) for function in functions for i in range(position[function], len(real[function]))
                      if line in real[function][i]), None)
        assert found is not None, (
            f"exercises/solutions/{name}.py: {line!r} is not in {' or '.join(functions)} in {exercise.real_file} "
            f"(after the lines before it) — copy the real kernel's line into the solution")
        position[found[0]] = found[1] + 1


@pytest.mark.parametrize("name", NAMES)
def test_exercise_and_solution_differ_only_in_the_blank(name):
    exercise = EXERCISES[name]
    blank = split_at_markers(exercise.path().read_text(), exercise)
    solution = split_at_markers(exercise.path(solution=True).read_text(), exercise)
    assert blank[0] == solution[0], f"exercises/{name}.py and its solution differ before the blank"
    assert blank[2] == solution[2], f"exercises/{name}.py and its solution differ after the blank"
    assert blank[1].strip() and blank[1] != solution[1], f"exercises/{name}.py has no placeholder in its blank"


@pytest.mark.parametrize("name", NAMES)
def test_docstring_points_to_the_lesson_and_the_real_kernel(name):
    exercise = EXERCISES[name]
    docstring = ast.get_docstring(ast.parse(exercise.path().read_text()))
    assert f"lesson {exercise.lesson} of COURSE.md" in docstring
    assert exercise.real_function in docstring and exercise.real_file in docstring


# ----------------------------------------------------------------------------------------------------------------
# The ramp: listed in the course's order, and the plain-Python exercise's check is not fooled by a bound one off


def test_list_shows_the_exercises_in_the_order_of_the_course():
    """`python -m exercises list`: by lesson, and within a lesson in the order of the markers in COURSE.md."""
    result = subprocess.run([sys.executable, "-m", "exercises", "list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert sorted(listed) == sorted(NAMES)
    course = (ROOT / "COURSE.md").read_text(encoding="utf-8")
    at = [(EXERCISES[name].lesson, course.index(f"**Exercise `{name}`.**")) for name in listed]
    assert at == sorted(at), result.stdout


def _true_bounds(start_m, Tq, Tk, block_m, block_n):
    first = (Tk - Tq) + start_m * block_m
    return first // block_n * block_n, min(first + block_m, Tk)


@pytest.mark.parametrize("variant", [
    lambda lo, hi, first, block_m, block_n, Tk: (lo, hi - 1),  # the last row's own key left out
    lambda lo, hi, first, block_m, block_n, Tk: (lo, hi + 1),  # one key past the last any row sees
    lambda lo, hi, first, block_m, block_n, Tk: (lo, first + block_m),  # no min with Tk: past the end
    lambda lo, hi, first, block_m, block_n, Tk: (lo + block_n, hi),  # rounded up: keys that need the mask
    lambda lo, hi, first, block_m, block_n, Tk: (max(lo - block_n, 0), hi),  # a key tile masked for nothing
    lambda lo, hi, first, block_m, block_n, Tk: (first, hi),  # not rounded to a key tile
], ids=["hi-1", "hi+1", "hi-unclamped", "lo-up", "lo-tile-early", "lo-unaligned"])
def test_tile_bounds_check_fails_a_bound_one_off(variant):
    from exercises.checks.attention import check_attention_tile_bounds
    from exercises.checks.compare import Mismatch

    def bounds(start_m, Tq, Tk, block_m, block_n):
        lo, hi = _true_bounds(start_m, Tq, Tk, block_m, block_n)
        return variant(lo, hi, (Tk - Tq) + start_m * block_m, block_m, block_n, Tk)

    check_attention_tile_bounds(type("Module", (), {"forward_key_bounds": staticmethod(_true_bounds)}), "cpu")
    with pytest.raises(Mismatch, match="differs from what a brute-force count"):
        check_attention_tile_bounds(type("Module", (), {"forward_key_bounds": staticmethod(bounds)}), "cpu")


# ----------------------------------------------------------------------------------------------------------------
# document_tile_bounds: the brute-force count it checks against, and a bound one off


def test_document_tile_count_gives_the_real_functions_numbers():
    """The check's brute-force count over every (query, key) pair gives, on every case it runs, exactly the numbers
    of the real forward_first_key and dkdv_last_row (kernels/tiled.py, whose brute-force test against the grid is
    tests/test_document_tiles.py); and the cases hold what the exercise's docstring promises."""
    from exercises.checks.documents import _document_tile_cases, _document_tile_truth, _ids_and_bounds
    from kernels.tiled import dkdv_last_row, document_bounds, forward_first_key

    cases = _document_tile_cases()
    for Tq, Tk, block_m, block_n, lengths in cases:
        ids, doc_start, doc_end = _ids_and_bounds(Tk, lengths)
        assert (document_bounds(ids) == [doc_start, doc_end]).all()
        truth = _document_tile_truth(Tq, Tk, block_m, block_n, ids)
        assert truth["first_key"] == [forward_first_key(m, Tq, Tk, block_m, block_n, doc_start)
                                      for m in range(-(-Tq // block_m))], (Tq, Tk, block_m, block_n, lengths)
        assert truth["last_row"] == [dkdv_last_row(n, Tq, Tk, block_m, block_n, doc_end)
                                     for n in range(-(-Tk // block_n))], (Tq, Tk, block_m, block_n, lengths)
    assert any(Tq < Tk for Tq, Tk, *_ in cases) and any(Tq == 1 for Tq, *_ in cases)
    assert any(len(lengths) == 1 for *_, lengths in cases) and any(1 in lengths for *_, lengths in cases)
    assert any(len(lengths) > 1 and all(n % block_n == 0 for n in lengths[:-1])
               for _, _, _, block_n, lengths in cases)  # documents that end on key tile boundaries
    assert len({case[:4] for case in cases}) > 10  # shapes and tiles of many kinds


@pytest.mark.parametrize("function, change", [
    ("forward_first_key", lambda value, block_n: value + 1),  # not a tile boundary
    ("forward_first_key", lambda value, block_n: value + block_n),  # skips keys its rows see
    ("forward_first_key", lambda value, block_n: max(value - block_n, 0)),  # one key tile for nothing
    ("dkdv_last_row", lambda value, block_n: value - 1),
    ("dkdv_last_row", lambda value, block_n: value + 1),
], ids=["first-unaligned", "first-late", "first-early", "last-1", "last+1"])
def test_document_tile_check_fails_a_bound_one_off(function, change):
    """A bound one off in a single tile of the real functions fails the check, wherever a case lets it show."""
    import kernels.tiled
    from exercises.checks.compare import Mismatch
    from exercises.checks.documents import check_document_tile_bounds

    real = {name: getattr(kernels.tiled, name) for name in ("forward_first_key", "dkdv_last_row")}
    check_document_tile_bounds(type("Module", (), {k: staticmethod(f) for k, f in real.items()}), "cpu")

    def off(tile, Tq, Tk, block_m, block_n, bounds):
        value = real[function](tile, Tq, Tk, block_m, block_n, bounds)
        return change(value, block_n) if tile == 1 else value  # the second tile of each case only

    with pytest.raises(Mismatch, match="differs from the bounds a brute-force count over every"):
        check_document_tile_bounds(type("Module", (), {**{k: staticmethod(f) for k, f in real.items()},
                                                       function: staticmethod(off)}), "cpu")


# ----------------------------------------------------------------------------------------------------------------
# layer_norm_forward and dropout_keep_mask: what their checks stand on


def test_layer_norm_forward_inputs_have_nan_past_their_end():
    """The check hands the exercise a view at the head of a buffer of NaN: the launcher's reshape and contiguous
    keep it (no copy), so a load without its mask reads the NaN."""
    from exercises.checks.rows import _nan_past_the_end

    x = torch.arange(6.0).view(2, 3)
    head = _nan_past_the_end(x, 4)
    assert torch.equal(head, x) and head.reshape(-1, 3).contiguous().data_ptr() == head.data_ptr()
    tail = torch.as_strided(head, (4,), (1,), storage_offset=6)
    assert tail.isnan().all()


def test_dropout_check_draws_as_the_numpy_mirror():
    """The wrong masks are built from the same draws as the reference: with the real key, counter and order, the
    check's NumPy draws give kernels/tiled.py's mask; and its two threshold cases put the threshold on a draw, so
    that > for >= and a threshold cut instead of rounded each change an entry."""
    import numpy as np

    from exercises.checks.dropout import DROPOUT_LAYOUTS, _dropout_draws, _dropout_threshold_cases, _dropout_variants
    from kernels.tiled import dropout_keep_mask, dropout_threshold

    seed, bh, Tq, Tk, p = 1234, 1, 5, 45, 0.1
    draws = _dropout_draws(seed + (bh << 32), np.arange(Tq), np.arange(Tk),
                           lambda i, j: (Tk - Tq + i) * Tk + 8 * (j // 8), DROPOUT_LAYOUTS["real"])
    assert np.array_equal(draws >= dropout_threshold(p), dropout_keep_mask(seed, bh, Tk, p, Tq=Tq))
    (seed, _, Tq, Tk, p_equal, tiles), (_, _, _, _, p_cut, _) = _dropout_threshold_cases()
    for p, name in ((p_equal, "kept where the draw is above"), (p_cut, "a threshold p * 2^16 cut")):
        exact = dropout_keep_mask(seed, 0, Tk, p, Tq=Tq)
        wrong = next(mask for key, mask in _dropout_variants(seed, 0, Tq, Tk, p, *tiles).items()
                     if key.startswith(name))
        assert (wrong != exact).sum() >= 1, name
