r"""``bash benchmarks/run_all.sh OUT``: every result a GPU can give us, in one command that fits a short loan.

A GPU machine comes to this project rarely and briefly — minutes at a time, start-up included, with no network and
nothing installable — so this one command turns about seven minutes of it into everything we want to know, and
leaves room in the window to fix a mistake and run it again:

    env            OUT/env.txt: python, torch, triton, numpy, the GPU, the C compilers, CPU count, optional packages
    tests          the suite, non-slow, in parallel lanes (one pytest process each, side by side)
    attention      benchmarks.kernels --op attention: the headline, fwd and fwd+bwd, T 1024 and 4096, D 64 and 128,
                   with and without dropout
    doc_attention  benchmarks.kernels --op doc_attention: attention over packed documents, T 4096, documents of 256
                   first (the case the kernel's target is set at), then 128 and 512; ours against FlexAttention,
                   SDPA with a dense mask and our plain causal kernel
    loss           benchmarks.kernels --op linear_cross_entropy
    norms          benchmarks.kernels --op layer_norm gelu
    train          benchmarks.train: torch.compile'd rows first (our custom ops under inductor), the triton backend
                   first
    generate       benchmarks.generate: tuning done in the warm-up, three timed repeats
    profile        benchmarks.profile: a training step's time by op

in that order, most valuable first: correctness, then the kernels by how much of a GPT's time they are, then the
whole model. Each part runs under its own time limit; at the limit it gets SIGINT (pytest then prints its summary,
a benchmark writes the rows it measured), and SIGKILL ``GRACE_S`` later. A part that fails or runs out of time is
recorded and the next one starts. Every part's full output is kept in ``OUT/logs/PART.log``; the benchmarks write
their results as each row finishes; ``OUT/summary.md`` is rewritten after every part, so whatever stops this command
leaves the parts done so far readable. With ``--archive FILE`` a ``.tar.gz`` of OUT is rewritten after every part
too (the GPU machine returns a handful of files, not a folder tree).

Modes: ``gpu`` (a CUDA device is present), ``cpu`` (none: the suite in full and the benchmarks' ``--quick`` modes,
with CPU-sized limits) and ``--dry-run`` (the GPU plan's parts, lanes and order on a CPU in under ten minutes: each
test lane only collects its tests, and the benchmarks run ``--quick``). Nothing is installed; it needs no network.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 5  # between a part's SIGINT and its SIGKILL: enough to write results, short enough to count in the plan
LOG_TAIL = 20  # lines of a part's log quoted in the summary when it did not pass (the whole log is in OUT/logs)

# The suite's lanes: each is one pytest process, run side by side with the others (so they need no pytest-xdist;
# where it is installed each lane also spreads its tests over a few workers). The CUDA-relevant tests come in
# lanes of similar length; "rest" is every file no other lane names.
LANES = {
    "attention-math": ["tests/test_attention.py", "-k", "float64 or dropout"],
    "attention-rest": ["tests/test_attention.py", "-k", "not (float64 or dropout)"],
    "kernels": ["tests/test_gelu.py", "tests/test_layer_norm.py", "tests/test_formulas.py", "tests/test_tiled.py",
                "tests/test_launch.py", "tests/test_compile_check.py"],
    "loss-ops": ["tests/test_linear_cross_entropy.py", "tests/test_linear_cross_entropy_triton.py",
                 "tests/test_custom_ops.py"],
    "model": ["tests/test_model.py", "tests/test_model_kernels.py", "tests/test_generate.py",
              "tests/test_pretrained.py", "tests/test_train.py", "tests/test_benchmarks.py"],
}
XDIST_WORKERS = 2  # per lane, on a GPU machine with pytest-xdist: 6 lanes x 2 workers fit its 16 cores


@dataclass
class Part:
    """One step of the plan: its lanes (one command each, run side by side) and its time limit in seconds."""

    name: str
    seconds: int
    lanes: dict[str, list[str]]
    results: str | None = None  # the stem of the results file a benchmark writes (OUT/<stem>.json), if any
    status: str = "not run"
    wall_s: float = 0.0
    lane_status: dict[str, str] = field(default_factory=dict)

    def log_name(self, lane: str) -> str:
        """``PART.log`` for a part's only lane of its own name, ``PART-LANE.log`` for one of several."""
        return f"{self.name}.log" if lane == self.name else f"{self.name}-{lane}.log"


# ----------------------------------------------------------------------------------------------------------------
# The plans


def test_lanes(py: str, out: Path, collect_only: bool, workers: int) -> dict[str, list[str]]:
    """Every lane's pytest command. Each writes a JUnit XML next to its log, which the summary reads."""
    named = {arg for args in LANES.values() for arg in args if arg.startswith("tests/")}
    rest = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if str(p.relative_to(ROOT)) not in named)
    base_temp = Path(tempfile.mkdtemp(prefix="run_all-pytest-"))
    lanes = {}
    for name, args in {**LANES, "rest": rest}.items():
        cmd = [py, "-m", "pytest", *args, "-q", "-rfE", "--durations=15", "-m", "not slow", "-p", "no:cacheprovider",
               f"--basetemp={base_temp / name}", f"--junitxml={out / 'logs' / f'tests-{name}.xml'}"]
        if collect_only:
            cmd.append("--collect-only")
        elif workers > 1:
            cmd += ["-n", str(workers)]
        lanes[name] = cmd
    return lanes


def plan(mode: str, py: str, out: Path) -> list[Part]:
    """The parts in run order, with their limits and the benchmarks' own budgets (when a benchmark stops starting
    new rows, so that the row in progress and the writing of its files end before the part's limit).

    The GPU plan's seconds: each part's limit plus GRACE_S, and env.txt's probes, add up to at most 420 s
    (``max_seconds``; 420 as set), so the whole command ends within seven minutes by its own clock and a
    fifteen-minute loan holds the machine's start-up, one run and one rerun. Shared by value: the tests 100 s (the
    lanes run side by side; compiling each Triton kernel configuration on first use is most of it), attention 55 s
    (the headline: its tile tuner compiles each candidate once), attention over packed documents 50 s (every
    contender of a case is checked before any is timed, and the first check of FlexAttention compiles its forward
    and backward: one sequence length, so that happens once), the whole model's training 65 s (a compiled row
    spends much of its share compiling the model), and 20-25 s for each of the loss, the norms, generation and the
    profile."""
    bench = [py, "-m"]
    if mode == "gpu":
        # (part, limit s, command): each benchmark's --budget-s leaves its longest row time to finish
        benchmarks = [
            ("attention", 55, bench + ["benchmarks.kernels", "--op", "attention", "--seq-lens", "1024", "4096",
                                       "--passes", "fwd", "fwd+bwd", "--dropout", "0.1", "--contenders", "triton",
                                       "pytorch", "math_compile", "--warmup-ms", "10", "--rep-ms", "40",
                                       "--budget-s", "40"]),
            # documents of 256 in T = 4096 first: the case the document kernel's target is set at
            ("doc_attention", 50, bench + ["benchmarks.kernels", "--op", "doc_attention", "--seq-lens", "4096",
                                           "--doc-lens", "256", "128", "512", "--passes", "fwd", "fwd+bwd",
                                           "--warmup-ms", "10", "--rep-ms", "40", "--budget-s", "38"]),
            ("loss", 25, bench + ["benchmarks.kernels", "--op", "linear_cross_entropy", "--warmup-ms", "10",
                                  "--rep-ms", "40", "--budget-s", "14"]),
            ("norms", 20, bench + ["benchmarks.kernels", "--op", "layer_norm", "gelu", "--warmup-ms", "10",
                                   "--rep-ms", "40", "--budget-s", "10"]),
            # compiled rows first, the triton backend first, the fused loss first: GPT-2 small at context 1024;
            # no largest-batch search (a memory question, answered at other sizes by benchmarks.train alone)
            ("train", 65, bench + ["benchmarks.train", "--presets", "gpt2-124m", "--context-lengths", "1024",
                                   "--compile", "blocks", "no", "--kernels", "triton", "torch",
                                   "--loss", "fused", "plain", "--no-max-batch", "--budget-s", "40",
                                   "--overhead-steps", "0", "--startup-runs", "0"]),
            ("generate", 25, bench + ["benchmarks.generate", "--repeats", "3", "--budget-s", "14",
                                      "--stream-rounds", "0"]),
            ("profile", 20, bench + ["benchmarks.profile", "--budget-s", "9"]),
        ]
        tests = Part("tests", 100, test_lanes(py, out, False, XDIST_WORKERS if _has_xdist() else 1))
    else:
        # The same parts on a CPU: the benchmarks' --quick modes; a dry run only collects each lane's tests
        dry = mode == "dry-run"
        quick = ["--quick", "--device", "cpu"]
        benchmarks = [
            ("attention", 60, bench + ["benchmarks.kernels", "--op", "attention", "--dropout", "0.1", *quick]),
            ("doc_attention", 60, bench + ["benchmarks.kernels", "--op", "doc_attention", *quick]),
            ("loss", 60, bench + ["benchmarks.kernels", "--op", "linear_cross_entropy", *quick]),
            ("norms", 60, bench + ["benchmarks.kernels", "--op", "layer_norm", "gelu", *quick]),
            ("train", 90, bench + ["benchmarks.train", "--compile", "no", "--no-max-batch", *quick]),
            ("generate", 60, bench + ["benchmarks.generate", *quick]),
            ("profile", 60, bench + ["benchmarks.profile", *quick]),
        ]
        tests = Part("tests", 60 if dry else 900, test_lanes(py, out, dry, 1))
    parts = [tests]
    for name, seconds, cmd in benchmarks:
        stem = name if name in ("train", "generate", "profile") else f"kernels_{name}"
        parts.append(Part(name, seconds, {name: cmd + ["--out", str(out), "--name", stem]}, results=stem))
    return parts


ENV_PROBE_S = 20  # env.txt's probes together, at most (importing torch on a cold machine takes seconds)


def max_seconds(parts: list[Part]) -> int:
    """The longest the plan can take: every part to its limit and its kill grace, and the environment probes."""
    return ENV_PROBE_S + sum(p.seconds + GRACE_S for p in parts)


def _has_xdist() -> bool:
    return importlib.util.find_spec("xdist") is not None


# ----------------------------------------------------------------------------------------------------------------
# Running a part


def run_part(part: Part, logs: Path, env: dict) -> None:
    """Start every lane of ``part``, wait for all of them up to the part's limit, then stop what is left."""
    start = time.monotonic()
    procs = {}
    for lane, cmd in part.lanes.items():
        log = open(logs / part.log_name(lane), "w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # a session of its own: the signals reach the lane's children too (pytest-xdist's workers, compile workers)
        procs[lane] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log)
    deadline = start + part.seconds
    timed_out = set()
    for lane, (proc, _log) in procs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            timed_out.add(lane)
    for lane in timed_out:  # all at once: SIGINT, a grace, then SIGKILL for what still runs
        _signal(procs[lane][0], signal.SIGINT)
    for lane in timed_out:
        proc = procs[lane][0]
        try:
            proc.wait(timeout=max(start + part.seconds + GRACE_S - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait()
    for lane, (proc, log) in procs.items():
        log.close()
        rc = proc.returncode
        part.lane_status[lane] = (f"timed out after {part.seconds} s" if lane in timed_out
                                  else "passed" if rc == 0 else f"failed (exit {rc})")
    bad = [f"{lane}: {s}" if len(procs) > 1 else s for lane, s in part.lane_status.items() if s != "passed"]
    part.status = "passed" if not bad else "; ".join(bad)
    part.wall_s = time.monotonic() - start


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # it ended in the meantime
        pass


# ----------------------------------------------------------------------------------------------------------------
# The environment, the summary, the archive


def write_env(path: Path, py: str) -> None:
    """OUT/env.txt: what the results were measured with. Probes only: installs nothing, needs no network."""
    probe = (
        "import importlib, os, platform\n"
        "print('python', platform.python_version(), platform.machine())\n"
        "print('cpus', os.cpu_count())\n"
        "for name in ('torch', 'triton', 'numpy', 'pytest', 'xdist', 'matplotlib', 'transformers', 'tiktoken',"
        " 'safetensors', 'datasets'):\n"
        "    try:\n"
        "        m = importlib.import_module(name)\n"
        "        print(name, getattr(m, '__version__', 'imports'))\n"
        "    except Exception as e:\n"
        "        print(name, 'missing:', type(e).__name__, str(e).splitlines()[0] if str(e) else '')\n"
        "import torch\n"
        "print('cuda', torch.version.cuda, 'available' if torch.cuda.is_available() else 'not available')\n"
        "if torch.cuda.is_available():\n"
        "    print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())\n"
    )
    lines = [f"date {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", f"python executable {py}"]
    lines += _run_probe([py, "-c", probe], ENV_PROBE_S - 5)
    lines += _run_probe(["nvidia-smi", "-L"], 5) if shutil.which("nvidia-smi") else ["nvidia-smi: not found"]
    for tool in ("gcc", "g++", "cc", "c++"):
        lines.append(f"which {tool}: {shutil.which(tool) or 'not found'}")
    lines.append(f"git commit {_git_commit()}")
    path.write_text("\n".join(lines) + "\n")


def _run_probe(cmd: list[str], seconds: float) -> list[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds, cwd=ROOT)
        return (done.stdout + done.stderr).strip().splitlines() or [f"{cmd[0]}: no output (exit {done.returncode})"]
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"{' '.join(cmd[:2])}: {type(e).__name__}: {e}"]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def lane_verdict(xml_path: Path, log_path: Path) -> tuple[str, list[str]]:
    """A test lane's counts and its failing tests' ids, read from the JUnit XML pytest wrote (a lane that only
    collected its tests: the count its log gives)."""
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    collected = re.findall(r"^(\d+)(?:/\d+)? tests? collected", log, re.MULTILINE)  # "62/94 tests collected (32
    #                                                                              deselected)" after -k or -m
    if "--collect-only" in log.partition("\n")[0]:
        return (f"{collected[-1]} tests collected" if collected else "nothing collected"), []
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return "no JUnit XML (the lane did not finish)", []
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "empty JUnit XML", []
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return (f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped "
            f"in {float(suite.get('time', 0)):.0f} s"), failing


def summary(parts: list[Part], out: Path, mode: str, elapsed: float) -> str:
    lines = [f"# run_all summary ({mode} mode, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
             f"{elapsed:.0f} s)", ""]
    env = out / "env.txt"
    if env.exists():
        lines += ["```", *env.read_text().splitlines(), "```", ""]
    lines += ["| part | result | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.status} | {p.wall_s:.0f} | {p.seconds} |" for p in parts]
    for p in parts:
        if p.status == "not run":
            continue
        lines += ["", f"## {p.name}", "```"]
        if p.name == "tests":
            for lane in p.lanes:
                counts, failing = lane_verdict(out / "logs" / f"tests-{lane}.xml", out / "logs" / p.log_name(lane))
                lines.append(f"{lane}: {p.lane_status.get(lane, 'not run')}; {counts}")
                lines += [f"    FAILED {t}" for t in failing]
        elif p.results:
            lines.append(_benchmark_summary(p, out))
        if p.status != "passed":
            for lane in p.lanes:
                log = out / "logs" / p.log_name(lane)
                tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:] if log.exists() else []
                lines += [f"-- {p.name} {lane}: the last lines of {log.relative_to(out)}:", *tail]
        lines.append("```")
    return "\n".join(lines) + "\n"


def _benchmark_summary(part: Part, out: Path) -> str:
    """The benchmark's own condensed table, from the results it wrote (imported here: no process to start)."""
    path = out / f"{part.results}.json"
    if not path.exists():
        return f"no {path.name} was written"
    module = "kernels" if part.results.startswith("kernels") else part.results
    try:
        from benchmarks import results

        summarize = importlib.import_module(f"benchmarks.{module}").summarize
        return summarize(results.read_results(path))
    except Exception as e:  # a summary is a convenience: the results and the log are there
        return f"{path.name} could not be summarized: {type(e).__name__}: {e}"


def write_atomic(path: Path, text: str) -> None:
    from minigpt.files import atomic_open  # the project's one writer: temp file, fsync, rename

    with atomic_open(path) as f:
        f.write(text.encode())


def archive(out: Path, dest: Path) -> None:
    """``dest``: a .tar.gz of everything in ``out``, replaced atomically (a reader never sees half of one)."""
    from minigpt.files import atomic_open

    with atomic_open(dest) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        # temp files (ours: *.tmp) and an archive written inside OUT (its earlier self) stay out
        tar.add(out, arcname=out.name, filter=lambda info: None if Path(info.name).name == dest.name or
                info.name.endswith(".tmp") else info)


# ----------------------------------------------------------------------------------------------------------------


def remove_stale(out: Path, parts: list[Part]) -> None:
    """Delete what an earlier run left in ``out`` under this plan's names: its results never pass for ours."""
    shutil.rmtree(out / "logs", ignore_errors=True)
    names = ["summary.md", "env.txt"] + [f"{p.results}.{ext}" for p in parts if p.results for ext in
                                          ("json", "csv", "png")]
    for name in names:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def run(parts: list[Part], out: Path, mode: str, py: str, archive_to: Path | None = None) -> list[Part]:
    """Run ``parts`` in order, keeping env.txt, the logs, summary.md (and the archive) current after each."""
    start = time.monotonic()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")

    def save():
        text = summary(parts, out, mode, time.monotonic() - start)
        write_atomic(out / "summary.md", text)
        if archive_to is not None:
            if archive_to.parent != out:  # the summary beside the archive too: readable without unpacking
                write_atomic(archive_to.with_name("summary.md"), text)
            archive(out, archive_to)
        return text

    write_env(out / "env.txt", py)
    save()
    for part in parts:
        print(f"== {part.name} (limit {part.seconds} s, {len(part.lanes)} lane(s)) at {time.monotonic() - start:.0f} s",
              flush=True)
        run_part(part, logs, env)
        print(f"   {part.status} in {part.wall_s:.0f} s", flush=True)
        save()
    print(save())
    return parts


def main(argv: list[str] | None = None) -> int:
    """Check the options, then run every part; returns the exit status (see kernels/cli.py)."""
    p = argparse.ArgumentParser(prog="bash benchmarks/run_all.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder for env.txt, summary.md, logs/ and every results file")
    p.add_argument("--dry-run", action="store_true",
                   help="the GPU plan on a CPU: lanes only collect their tests, benchmarks run --quick (<10 min)")
    p.add_argument("--archive", type=Path, metavar="FILE",
                   help="also keep FILE (a .tar.gz of OUT) and summary.md beside it current after every part")
    args = p.parse_args(argv)
    from kernels.cli import run_cli

    return run_cli(lambda: run_plan(args))


def run_plan(args) -> int:
    from benchmarks import common

    # A file where a folder should be is refused now, not as a traceback when the first file is removed or written.
    common.check_out_dir(args.out, ["summary.md", "env.txt"], flag="OUT")
    if args.archive is not None:
        common.check_out_dir(args.archive.parent, [args.archive.name], flag="--archive's folder")
    py = sys.executable
    import torch  # only to choose the mode: every part runs in its own process

    mode = "dry-run" if args.dry_run else "gpu" if torch.cuda.is_available() else "cpu"
    out = args.out.resolve()
    parts = plan(mode, py, out)
    remove_stale(out, parts)
    print(f"run_all: {mode} mode, {len(parts)} parts, at most {max_seconds(parts)} s; results in {out}", flush=True)
    run(parts, out, mode, py, args.archive.resolve() if args.archive else None)
    print(f"files in {out}: {' '.join(sorted(str(f.relative_to(out)) for f in out.rglob('*') if f.is_file()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
