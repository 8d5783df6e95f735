"""benchmarks/run_all.py: the plan that fits a GPU loan, and its plumbing run with tiny stand-in commands."""
import json
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import common, results, run_all

PY = sys.executable


def stand_in(code: str) -> list[str]:
    return [PY, "-c", code]


def test_plumbing_lanes_order_logs_failures_timeouts_and_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "GRACE_S", 1)
    out, order = tmp_path / "out", tmp_path / "order.txt"
    out.mkdir()
    note = f"open({str(order)!r}, 'a').write('{{}}\\n')"
    flag = tmp_path / "second-lane-started"
    parts = [
        # lane "one" waits for a file lane "two" makes: run one after the other, it would wait in vain
        run_all.Part("side-by-side", 30, {
            "one": stand_in(f"import time, pathlib\n{note.format('side-by-side')}\n"
                            f"for _ in range(200):\n"
                            f"    if pathlib.Path({str(flag)!r}).exists(): break\n"
                            f"    time.sleep(0.05)\n"
                            f"else: raise SystemExit('the other lane never ran')\nprint('saw the other lane')"),
            "two": stand_in(f"import pathlib; pathlib.Path({str(flag)!r}).touch()"),
        }),
        run_all.Part("fails", 30, {"fails": stand_in(f"{note.format('fails')}\nprint('boom: the reason')\n"
                                                     "raise SystemExit(3)")}),
        # stopped at its limit by SIGINT, it still writes what it measured (as the benchmarks do)
        run_all.Part("slow", 1, {"slow": stand_in(
            f"import json, time\n{note.format('slow')}\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    json.dump({{'meta': {{}}, 'rows': []}}, open({str(out / 'slow.json')!r}, 'w'))\n"
            "    print('interrupted: wrote the rows so far')\n    raise SystemExit(1)")}),
        # deaf to SIGINT: killed after the grace
        run_all.Part("deaf", 1, {"deaf": stand_in(
            f"import signal, time\n{note.format('deaf')}\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "time.sleep(60)")}),
        run_all.Part("after", 30, {"after": stand_in(f"{note.format('after')}\nprint('still ran')")}),
    ]
    archive = tmp_path / "back" / "results.tar.gz"
    archive.parent.mkdir()
    run_all.run(parts, out, "test", PY, archive_to=archive)

    assert order.read_text().split() == ["side-by-side", "fails", "slow", "deaf", "after"]
    status = {p.name: p.status for p in parts}
    assert status == {"side-by-side": "passed", "fails": "failed (exit 3)", "slow": "timed out after 1 s",
                      "deaf": "timed out after 1 s", "after": "passed"}
    assert all(p.wall_s < 10 for p in parts)  # the deaf part was killed, not waited for
    assert (out / "slow.json").exists()  # written on SIGINT
    logs = out / "logs"
    assert "saw the other lane" in (logs / "side-by-side-one.log").read_text()
    assert "interrupted: wrote the rows so far" in (logs / "slow.log").read_text()
    assert (logs / "after.log").read_text().startswith("$ ")  # each log says the command it holds
    summary = (out / "summary.md").read_text()
    for name, s in status.items():
        assert f"| {name} | {s} |" in summary
    assert "boom: the reason" in summary  # the tail of a failed part's log is quoted
    assert (out / "env.txt").read_text().count("\n") > 5
    assert archive.with_name("summary.md").read_text() == summary
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert {"out/summary.md", "out/env.txt", "out/logs/fails.log", "out/slow.json"} <= set(names)


def test_test_lanes_verdicts_come_from_pytest_itself(tmp_path):
    """A real pytest lane on a tiny test file of our own: counts and the failing test's id reach the summary."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_tiny.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    out = tmp_path / "out"
    part = run_all.Part("tests", 60, {"tiny": [PY, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
                                               f"--junitxml={out / 'logs' / 'tests-tiny.xml'}"]})
    run_all.run([part], out, "test", PY)
    assert part.status == "failed (exit 1)"
    summary = (out / "summary.md").read_text()
    assert "tiny: failed (exit 1); 1 passed, 1 failed, 0 errors, 0 skipped" in summary
    # JUnit's class name is the module's dotted path from pytest's rootdir, which depends on where tmp_path lies
    assert re.search(r"^    FAILED (\S+\.)?test_tiny::test_bad$", summary, re.MULTILINE)
    assert "test_ok" not in summary
    # a dry run's lane only collects, and counts what its selection keeps
    part = run_all.Part("tests", 60, {"tiny": [PY, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
                                               "-k", "not bad", "--collect-only"]})
    run_all.run([part], tmp_path / "dry", "test", PY)
    assert "tiny: passed; 1 tests collected" in (tmp_path / "dry" / "summary.md").read_text()


def plan_of(mode, tmp_path):
    return run_all.plan(mode, PY, tmp_path)


def test_the_gpu_plan_fits_seven_minutes_and_puts_what_matters_first(tmp_path):
    parts = plan_of("gpu", tmp_path)
    assert run_all.max_seconds(parts) <= 420
    assert [p.name for p in parts] == ["tests", "attention", "doc_attention", "loss", "norms", "train", "generate",
                                       "profile"]
    for p in parts[1:]:  # each benchmark stops starting rows well before its part's limit
        cmd = p.lanes[p.name]
        budget = float(cmd[cmd.index("--budget-s") + 1])
        assert budget <= p.seconds - 10, p.name
    attention = parts[1].lanes["attention"]
    assert attention[attention.index("--seq-lens") + 1: attention.index("--seq-lens") + 3] == ["1024", "4096"]
    assert "--dropout" in attention
    train = parts[5].lanes["train"]
    modes = train[train.index("--compile") + 1: train.index("--compile") + 3]
    assert modes == ["blocks", "no"]  # the compiled rows before the uncompiled ones
    assert train[train.index("--kernels") + 1] == "triton"
    generate = parts[6].lanes["generate"]
    assert int(generate[generate.index("--repeats") + 1]) >= 3


def test_lanes_cover_every_test_file_once(tmp_path):
    lanes = plan_of("gpu", tmp_path)[0].lanes
    root = run_all.ROOT
    whole_files = [a for name, cmd in lanes.items() if not name.startswith("attention")
                   for a in cmd if a.startswith("tests/")]
    assert len(whole_files) == len(set(whole_files))
    on_disk = {str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")}
    assert set(whole_files) | {"tests/test_attention.py"} == on_disk
    for cmd in lanes.values():
        assert "-x" not in cmd and "not slow" in cmd
        assert any(a.startswith("--basetemp=") for a in cmd)
    temps = [a for cmd in lanes.values() for a in cmd if a.startswith("--basetemp=")]
    assert len(set(temps)) == len(temps)


def test_the_attention_lanes_split_its_tests_without_overlap():
    """The two -k expressions are complements: every attention test runs in exactly one lane."""
    expr_math = run_all.LANES["attention-math"][-1]
    expr_rest = run_all.LANES["attention-rest"][-1]
    assert expr_rest == f"not ({expr_math})"


def test_a_dry_run_is_the_gpu_plan_on_the_cpu(tmp_path):
    gpu, dry = plan_of("gpu", tmp_path), plan_of("dry-run", tmp_path)
    assert [p.name for p in dry] == [p.name for p in gpu]
    assert list(dry[0].lanes) == list(gpu[0].lanes)
    assert all("--collect-only" in cmd for cmd in dry[0].lanes.values())
    assert all("--quick" in p.lanes[p.name] for p in dry[1:])
    assert run_all.max_seconds(dry) <= 600


@dataclass
class Row:
    n: int


def test_run_rows_keeps_each_row_as_it_finishes_and_the_whole_error(tmp_path):
    """A failing row stores its whole message (the table cuts it, the file does not); the rows so far are
    written after every row, atomically."""
    long = "x" * 300
    seen = []

    def run_one(row):
        if row.n == 1:
            raise RuntimeError(f"first line {long}\nsecond line with the cause")
        return {"n": row.n, "status": "ok"}

    def save(rows):
        results.partial_writer(tmp_path, "rows", lambda: {"k": 1})(rows)
        seen.append(len(json.loads((tmp_path / "rows.json").read_text())["rows"]))

    rows, interrupted = common.run_rows([Row(0), Row(1), Row(2)], run_one, lambda row, r: r["status"][:20],
                                        lambda: None, save=save)
    assert interrupted is None and seen == [1, 2, 3]
    assert rows[1]["status"] == f"failed: RuntimeError: first line {long}"
    assert rows[1]["error"].endswith("second line with the cause")
    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["meta"] == {"k": 1, "partial": True}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_run_all_sh_usage_error_is_one_line():
    import subprocess

    done = subprocess.run(["bash", str(run_all.ROOT / "benchmarks" / "run_all.sh")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "usage" in done.stderr and "Traceback" not in done.stderr


def test_an_archive_inside_out_never_holds_itself(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("# summary\n")
    dest = out / "results.tar.gz"
    for _ in range(2):  # the second archive would find the first in OUT
        run_all.archive(out, dest)
    with tarfile.open(dest) as tar:
        assert sorted(tar.getnames()) == ["out", "out/summary.md"]
