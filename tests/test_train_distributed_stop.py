"""Stopping a 2-process run (torchrun, gloo on the CPU) with signals, as a scheduler, a container stop or Ctrl-C do.

Every rank must stop after the same step, the run must save once, every rank must exit 128 + the signal within a
bounded time, and the checkpoint must resume — whether the signal reaches both workers, or only one of them.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import ROOT, TINY, run_train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")

BOUND_S = 60  # "does not hang": far above a stop that works (seconds), far below gloo's own timeout (30 minutes)
# A run that would go on for hours, evaluated (and saved) only at step 0: any later save is the stop's final save.
ENDLESS = ["--max-steps", "1000000", "--eval-interval", "1000000", "--batch-size", "2"]

# A worker whose every step first sleeps: a second signal then finds the ranks in the middle of a step.
SLOW_STEPS = """
import sys, time
import minigpt.train as T

real = T.Trainer.train_step


def slow_step(self, micro):
    time.sleep(5)
    return real(self, micro)


T.Trainer.train_step = slow_step
T.main(sys.argv[1:])
"""


def _children(pid):
    """Process ids whose parent is ``pid`` (from /proc/*/stat: no psutil, no pgrep)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name, in (), may hold spaces
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


class Torchrun:
    """``torchrun --nproc_per_node 2 <worker> TINY ... --out-dir OUT`` in a session of its own, output to a file."""

    def __init__(self, tmp_path, *extra, script=None):
        self.out = tmp_path / "out"
        self.log_path = tmp_path / "torchrun.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        worker = ["-m", "minigpt.train"] if script is None else [str(script)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
               *TINY, *ENDLESS, "--out-dir", str(self.out), *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)

    def output(self):
        return self.log_path.read_text(errors="replace")

    def workers_training(self):
        """{rank: pid} once both workers exist and rank 0 has written the step-0 checkpoint (the loop and its
        signal handlers are in place on every rank then: rank 1 took part in that save)."""
        deadline = time.monotonic() + 240  # imports, tokenizing and the first evaluation on a busy machine
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()[-3000:]
            ranks = {_rank_of(p): p for p in _children(self.proc.pid)}
            if {0, 1} <= set(ranks) and (self.out / "checkpoint.pt").exists():
                return {r: ranks[r] for r in (0, 1)}
            time.sleep(0.2)
        pytest.fail("the run did not reach its first step:\n" + self.output()[-3000:])

    def wait(self):
        """torchrun's exit status, once it and its workers have ended; fails if that takes longer than BOUND_S."""
        try:
            return self.proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {BOUND_S}s after the signal (hung):\n" + self.output()[-3000:])

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def torchrun(tmp_path):
    runs = []

    def start(*extra, script=None):
        runs.append(Torchrun(tmp_path, *extra, script=script))
        return runs[-1]

    yield start
    for run in runs:  # a hung run must not outlive its test
        run.kill()


def worker_exit_codes(output):
    """{rank: exit status} of the workers that failed, from torchrun's failure report. A worker's status is seen only
    by torchrun, its parent; torchrun itself exits 1 whenever any worker fails."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", output)
    return {int(rank): int(code) for rank, code in found}


def check_stopped_and_saved(run, tmp_path, status):
    """Both workers exited ``status``, torchrun reported the failure, and the run saved once more than step 0: its
    final save (model.pth is written by no other) — which --resume auto continues."""
    rc = run.wait()
    out = run.output()
    assert rc != 0, out[-3000:]
    assert worker_exit_codes(out) == {0: status, 1: status}, out[-3000:]
    assert (run.out / "model.pth").exists(), out[-3000:]
    step = torch.load(run.out / "checkpoint.pt", weights_only=True)["step"]
    assert step > 0
    # one process with the 2-rank run's global batch (2 ranks x 2) continues where the run stopped
    resumed = run_train(tmp_path, "--resume", "auto", "--max-steps", str(step + 2), "--eval-interval", "1000",
                        "--batch-size", "4")
    assert resumed["steps"] == step + 2 and resumed["metrics"][0]["step"] == 0  # the stopped run's rows kept


def test_sigterm_to_every_worker_stops_all_saves_once_and_exits_143(torchrun, tmp_path):
    run = torchrun()
    workers = run.workers_training()
    for pid in workers.values():
        os.kill(pid, signal.SIGTERM)
    check_stopped_and_saved(run, tmp_path, 128 + signal.SIGTERM)


@pytest.mark.parametrize("rank", [1, 0])
def test_sigterm_to_one_worker_stops_every_worker(torchrun, tmp_path, rank):
    run = torchrun()
    os.kill(run.workers_training()[rank], signal.SIGTERM)
    check_stopped_and_saved(run, tmp_path, 128 + signal.SIGTERM)


def test_a_second_signal_to_one_worker_stops_it_at_once_and_the_others_do_not_wait_for_it(torchrun, tmp_path):
    # the worker that gets both signals leaves in the middle of a step; the other one must not wait for it in a
    # collective it never reaches. torchrun then sends SIGTERM to that other worker (one of its workers failed),
    # which stops it too. No final save: the step-0 checkpoint is what is kept.
    script = tmp_path / "slow_steps.py"
    script.write_text(SLOW_STEPS)
    run = torchrun(script=script)
    pid = run.workers_training()[1]
    os.kill(pid, signal.SIGTERM)
    time.sleep(2)  # more than the moment within which a repeat counts as the same request
    os.kill(pid, signal.SIGTERM)
    rc = run.wait()
    out = run.output()
    assert rc != 0 and worker_exit_codes(out) == {0: 143, 1: 143}, out[-3000:]
    assert torch.load(run.out / "checkpoint.pt", weights_only=True)["step"] == 0
    assert not (run.out / "model.pth").exists()
