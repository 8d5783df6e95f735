"""``python -m benchmarks.course_times``: how long each step of the course takes, as a reader would run it.

COURSE.md promises that every command it gives runs on a laptop CPU in under a minute, and the tour notebook that
it runs in about a minute with its training cell under half a minute. This times them: every block of COURSE.md
fenced ``bash`` or ``python`` (the ones tests/test_course.py runs, each here the way a reader runs it: a bash block
in a fresh folder, a python block as a script, with an empty token cache), and every code cell of
notebooks/tour.ipynb (run by nbclient in a fresh Jupyter kernel, each cell's time taken from the kernel's own
timestamps). The table prints one line per block or cell, slowest marked; ``--out DIR`` also writes
``course_times.json`` and ``.csv`` there, with the machine they were measured on.

The times depend on the machine and on what else runs on it: measure on idle cores (the JSON records the load
average at the start). Without a GPU the Triton kernels run in Triton's interpreter, as they do for a reader.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BenchmarkError
from benchmarks.results import environment, fmt_num, format_table, write_results
from kernels.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "COURSE.md"
NOTEBOOK = ROOT / "notebooks" / "tour.ipynb"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
RUNNABLE = ("bash", "python")  # fenced ``text`` is shown, not run (the one-time install)
TIMEOUT_S = 900  # a guard against a hang, not a limit the course claims


def course_blocks(path: Path = COURSE) -> list[tuple[str, str, str]]:
    """(lesson, language, code) for every block of COURSE.md a reader is told to run, in order; the lesson is the
    ``## Lesson N`` heading above the block ("intro" before the first)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in BLOCK.finditer(text):
        if match.group(1) in RUNNABLE:
            headings = re.findall(r"^## (Lesson \d+)", text[:match.start()], re.M)
            found.append((headings[-1] if headings else "intro", match.group(1), match.group(2)))
    return found


def block_names(blocks: list[tuple]) -> list[str]:
    """Each block's name, its lesson and its number within the lesson: "Lesson2-1", "Lesson2-2", ..."""
    seen: dict[str, int] = {}
    names = []
    for lesson, *_ in blocks:
        seen[lesson] = seen.get(lesson, 0) + 1
        names.append(f"{lesson.replace(' ', '')}-{seen[lesson]}")
    return names


def reader_env(folder: Path) -> dict:
    """The environment a reader's command runs in: this checkout importable, the token cache in ``folder`` (empty:
    the first tokenization is part of the time), offline, no windows for figures, and Triton's interpreter where
    there is no GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MINIGPT_CACHE"] = str(folder / "token-cache")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["MPLBACKEND"] = "Agg"
    import torch

    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


def block_command(language: str, code: str, folder: Path) -> list[str]:
    """The command that runs a block as a reader would: bash stopping at the first failing command (of a pipe
    too), python as a script written into ``folder``."""
    if language == "bash":
        return ["bash", "-e", "-o", "pipefail", "-c", code]
    script = folder / "block.py"
    script.write_text(code, encoding="utf-8")
    return [sys.executable, str(script)]


def time_course(path: Path = COURSE) -> list[dict]:
    rows = []
    blocks = course_blocks(path)
    for name, (lesson, language, code) in zip(block_names(blocks), blocks):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            start = time.perf_counter()
            proc = subprocess.run(block_command(language, code, folder), cwd=folder, env=reader_env(folder),
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
            seconds = time.perf_counter() - start
        if proc.returncode != 0:
            last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
            raise BenchmarkError(f"COURSE.md {name} ({language}) failed (exit {proc.returncode}): {last} — run "
                                 "`python -m pytest tests/test_course.py` to see why")
        first = next((line for line in code.splitlines() if line.strip() and not line.startswith("#")), "")
        rows.append(dict(where="COURSE.md", block=name, language=language, seconds=round(seconds, 3),
                         first_line=first[:70]))
    return rows


def _stamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def time_notebook(path: Path = NOTEBOOK) -> list[dict]:
    """Each code cell's time in a fresh kernel of this Python, from the kernel's execute_input and execute_reply
    timestamps (nbclient records them); needs nbformat, nbclient and ipykernel (the test extra)."""
    try:
        import nbclient
        import nbformat
    except ImportError as e:
        raise BenchmarkError(f"timing the notebook needs {e.name} — pip install -e '.[test]', or pass "
                             "--only course") from None
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        env_keys = reader_env(Path(tmp))
        saved = {k: os.environ.get(k) for k in env_keys}
        os.environ.update(env_keys)  # the kernel inherits this process's environment
        try:
            client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                             resources={"metadata": {"path": tmp}})
            client.execute()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    rows = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        stamps = cell.metadata.get("execution", {})
        seconds = _stamp(stamps["shell.execute_reply"]) - _stamp(stamps["iopub.execute_input"])
        first = next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
        rows.append(dict(where=path.name, block=f"cell {i}", language="python", seconds=round(seconds, 3),
                         first_line=first[:70]))
    return rows


def summarize(rows: list[dict]) -> str:
    slowest = max(rows, key=lambda r: r["seconds"])
    lines = [[r["where"], r["block"], fmt_num(r["seconds"]), "<- slowest" if r is slowest else "", r["first_line"]]
             for r in rows]
    totals = {}
    for r in rows:
        totals[r["where"]] = totals.get(r["where"], 0.0) + r["seconds"]
    tail = "\n".join(f"total {where}: {seconds:.0f} s" for where, seconds in totals.items())
    return format_table(["file", "block", "seconds", "", "starts with"], lines, right={2}) + "\n" + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.course_times", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["course", "notebook"], help="time only COURSE.md's blocks or the notebook")
    p.add_argument("--out", type=Path, help="also write course_times.json and .csv in this folder")
    args = p.parse_args(argv)

    def work() -> int:
        import torch

        from benchmarks.common import check_out_dir

        if args.out:
            check_out_dir(args.out, ["course_times.json", "course_times.csv"])
        meta = dict(environment=environment(torch.device("cpu")))
        rows = (time_course() if args.only != "notebook" else []) + (time_notebook() if args.only != "course"
                                                                      else [])
        print(summarize(rows))
        if args.out:
            meta["seconds_total"] = round(sum(r["seconds"] for r in rows), 1)
            paths = write_results(args.out, "course_times", rows, meta)
            print("wrote " + ", ".join(str(p) for p in paths))
        return 0

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
