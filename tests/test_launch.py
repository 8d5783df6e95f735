"""The tile tuner of kernels/launch.py, with a fake timer: what it picks, when it times, what it skips; and the
interpreter's scalar fix (fix_interpreter_scalars), on a kernel whose loop bounds are scalars it computes.

The real timer needs a GPU (tests/test_attention.py runs the tuner there); the choosing logic is plain Python.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

import kernels.launch as launch  # noqa: E402
from kernels.launch import TileTuner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.skipif(not launch.is_interpreting(), reason="tests Triton's CPU interpreter, "
                                       "which is off where CUDA is available")


class FakeGPU:
    """Runs "kernels" by recording them; the timer reads a fixed time per candidate, or raises like Triton."""

    def __init__(self, times):
        self.times = times  # candidate -> ms, or "too big" for one the GPU cannot fit
        self.launched = []
        self.timed = []

    def run(self, candidate):
        self.launched.append(candidate)

    def timer(self, fn):
        fn()
        candidate = self.launched[-1]
        self.timed.append(candidate)
        if self.times[candidate] == "too big":
            raise OutOfResources(232448, 101376, "shared memory")
        return self.times[candidate]


@pytest.fixture
def tuning_on(monkeypatch):
    monkeypatch.setattr(launch, "autotune_enabled", lambda: True)


def test_picks_the_fastest_once_per_key(tuning_on):
    gpu = FakeGPU({"a": 3.0, "b": 1.0, "c": 2.0})
    tuner = TileTuner("k", timer=gpu.timer)
    assert tuner.choose("key1", ("a", "b", "c"), gpu.run) == "b"
    assert gpu.timed == ["a", "b", "c"]
    assert tuner.choose("key1", ("a", "b", "c"), gpu.run) == "b"
    assert gpu.timed == ["a", "b", "c"], "a known key is not timed again"
    gpu.times.update(a=0.5)
    assert tuner.choose("key2", ("a", "b", "c"), gpu.run) == "a", "another key is timed on its own"
    assert len(tuner.report()) == 2 and "chose" in tuner.report()[0]


def test_skips_candidates_the_gpu_cannot_fit(tuning_on):
    gpu = FakeGPU({"a": 3.0, "b": "too big", "c": 2.0})
    assert TileTuner("k", timer=gpu.timer).choose("key", ("a", "b", "c"), gpu.run) == "c"


def test_default_when_nothing_fits(tuning_on):
    gpu = FakeGPU({"a": "too big", "b": "too big"})
    assert TileTuner("k", timer=gpu.timer).choose("key", ("a", "b"), gpu.run) == "a"


def test_default_without_tuning(monkeypatch):
    gpu = FakeGPU({"a": 3.0, "b": 1.0})
    monkeypatch.setenv("MINIGPT_AUTOTUNE", "0")
    assert TileTuner("k", timer=gpu.timer).choose("key", ("a", "b"), gpu.run) == "a"
    monkeypatch.setattr(launch, "autotune_enabled", lambda: True)
    assert TileTuner("k", timer=gpu.timer).choose("key", ("b",), gpu.run) == "b"  # one candidate: nothing to time
    assert gpu.timed == []


def test_autotune_switch(monkeypatch):
    monkeypatch.setattr(launch, "is_interpreting", lambda: False)
    monkeypatch.setenv("MINIGPT_AUTOTUNE", "1")
    assert launch.autotune_enabled()
    monkeypatch.setenv("MINIGPT_AUTOTUNE", "0")
    assert not launch.autotune_enabled()
    monkeypatch.setenv("MINIGPT_AUTOTUNE", "1")
    monkeypatch.setattr(launch, "is_interpreting", lambda: True)
    assert not launch.autotune_enabled(), "the interpreter has its own tiles and nothing to time"


@triton.jit
def _sum_between(X, START, STOP, OUT):
    """OUT[p] = X[START[p]] + ... + X[STOP[p] - 1]: a loop whose bounds are scalars loaded inside the kernel."""
    p = tl.program_id(0)
    total = 0.0
    for i in range(tl.load(START + p), tl.load(STOP + p)):
        total += tl.load(X + i)
    tl.store(OUT + p, total)


@needs_interpreter
def test_interpreter_loops_over_bounds_it_loaded():
    # The interpreter holds those bounds as one-element arrays; a Triton that reads them with int(array) fails
    # under NumPy 2.4 and later unless fix_interpreter_scalars() is in place.
    launch.fix_interpreter_scalars()
    x = torch.arange(10, dtype=torch.float32) ** 2
    start = torch.tensor([0, 3, 7, 5], dtype=torch.int32)
    stop = torch.tensor([10, 4, 9, 5], dtype=torch.int32)
    out = torch.full((4,), float("nan"))
    _sum_between[(4,)](x, start, stop, out)
    expected = torch.stack([x[a:b].sum() for a, b in zip(start.tolist(), stop.tolist())])
    torch.testing.assert_close(out, expected)


@needs_interpreter
def test_a_kernel_op_called_alone_gets_the_scalar_fix():
    # No kernels.get_backend() and no wrapper with input checks: the op straight from torch.ops, as opcheck calls
    # it. A fresh process, since this one has applied the fix already. The LayerNorm backward loops over rows
    # between scalar bounds.
    script = (
        "import torch, torch.nn.functional as F\n"
        "import kernels.layer_norm\n"
        "torch.manual_seed(0)\n"
        "x, w, b, dy = torch.randn(5, 3), torch.randn(3), torch.randn(3), torch.randn(5, 3)\n"
        "_, mean, rstd = torch.ops.minigpt.layer_norm_fwd(x, w, b, 1e-5)\n"
        "dx, _, _ = torch.ops.minigpt.layer_norm_bwd(dy, x, w, mean, rstd, b.dtype)\n"
        # the float64 gradient, and float32 PyTorch's distance from it: ours may be as far as a few times that
        # (three columns: a row's variance can be small, and its rstd large)
        "def grad(t):\n"
        "    out = F.layer_norm(t, (3,), w.to(t.dtype), b.to(t.dtype), 1e-5)\n"
        "    return torch.autograd.grad(out, t, dy.to(t.dtype))[0]\n"
        "exact = grad(x.double().requires_grad_())\n"
        "torch_err = (grad(x.clone().requires_grad_()).double() - exact).abs().max().item()\n"
        "ours_err = (dx.double() - exact).abs().max().item()\n"
        "assert ours_err <= 4 * torch_err + 1e-6 * exact.abs().max().item(), (ours_err, torch_err)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
