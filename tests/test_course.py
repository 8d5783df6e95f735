"""COURSE.md stays true: every command it tells the reader to run is run here, and everything it tells them to read
exists.

Code blocks fenced as ``bash`` or ``python`` are what a reader is told to run, and each one runs here as a reader
would run it (``bash`` blocks in a fresh folder, ``python`` blocks as a script), with the checkout importable and
the token cache in a temporary folder. Blocks fenced ``text`` are shown, not run (the one-time install). Each
``python`` block asserts the claim it demonstrates against an independent computation (autograd, float64 math,
the other code path), so a passing run is the claim checked, not just a program that exits 0.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from benchmarks.course_times import BLOCK, COURSE, ROOT, block_command, block_names, course_blocks, reader_env

BLOCK_TIMEOUT_S = 600  # a guard against a hang, not a timing: a loaded CI machine can take minutes for a lesson


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(lesson, code) for every block fenced as ``lang``; the lesson is the heading above it."""
    return [(lesson, code) for lesson, language, code in course_blocks() if language == lang]


def _ids(blocks):
    return block_names(blocks)


def _run(cmd: list[str], tmp_path: Path, what: str) -> str:
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=reader_env(tmp_path), capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} ran past {BLOCK_TIMEOUT_S} s")
    assert proc.returncode == 0, (f"{what} failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


BASH_BLOCKS = _blocks("bash")
PYTHON_BLOCKS = _blocks("python")


def test_course_has_every_lesson_and_runnable_blocks():
    text = COURSE.read_text(encoding="utf-8")
    lessons = [int(n) for n in re.findall(r"^## Lesson (\d+)", text, re.M)]
    assert lessons == list(range(13)), f"lessons out of order or missing: {lessons}"
    assert BASH_BLOCKS and PYTHON_BLOCKS
    langs = {m.group(1) for m in BLOCK.finditer(text)}
    assert langs <= {"bash", "python", "text"}, f"a block fenced as {langs - {'bash', 'python', 'text'}}: run or not?"


@pytest.mark.parametrize("lesson,code", BASH_BLOCKS, ids=_ids(BASH_BLOCKS))
def test_course_commands_run(lesson, code, tmp_path):
    _run(block_command("bash", code, tmp_path), tmp_path, f"{lesson}: bash block\n{code}")


@pytest.mark.parametrize("lesson,code", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_course_python_runs(lesson, code, tmp_path):
    _run(block_command("python", code, tmp_path), tmp_path, f"{lesson}: python block\n{code}")


# ----------------------------------------------------------------------------------------------------------------
# What to read: files and function names exist


def _read_lines() -> list[str]:
    """The text of every "**Read**" paragraph, and of every "**Then read**" one (the reading after an exercise)."""
    paragraphs = COURSE.read_text(encoding="utf-8").split("\n\n")
    return [p for p in paragraphs if p.startswith(("**Read**", "**Then read**"))]


def test_course_reading_exists():
    missing = []
    for paragraph in _read_lines():
        # "`path` — `name`, `name`; `path2` ..." : names after a path belong to it until the next path
        current = None
        for token in re.findall(r"`([^`]+)`", paragraph):
            if re.fullmatch(r"[\w./-]+\.(py|md|png)", token) or token.endswith("/"):
                current = ROOT / token
                if not current.exists():
                    missing.append(token)
                continue
            name = token.split(".")[-1]
            if current is None or current.suffix != ".py" or not re.fullmatch(r"\w+", name):
                continue
            source = current.read_text(encoding="utf-8") if current.exists() else ""
            if not re.search(rf"\b{name}\b", source):  # a function renamed or removed is gone from the file
                missing.append(f"{current.relative_to(ROOT)}: {token}")
    assert not missing, f"COURSE.md tells the reader to read what does not exist: {missing}"


def test_course_exercises_exist():
    text = COURSE.read_text(encoding="utf-8")
    names = set(re.findall(r"\*\*Exercise `(\w+)`", text))
    assert names == {"gelu_backward", "layer_norm_dx", "attention_forward_inner", "attention_delta",
                     "elementwise_gelu", "row_softmax", "attention_tile_bounds", "layer_norm_forward",
                     "dropout_keep_mask", "attention_forward", "document_tile_bounds"}
    for name in names:
        assert (ROOT / "exercises" / f"{name}.py").exists()
        assert (ROOT / "exercises" / "solutions" / f"{name}.py").exists()


def test_course_links_exist():
    """Every relative link and picture in COURSE.md points at a file of the checkout."""
    targets = re.findall(r"\]\(([^)#\s]+)\)", COURSE.read_text(encoding="utf-8"))
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert targets and not missing, f"COURSE.md links to missing files: {missing}"
