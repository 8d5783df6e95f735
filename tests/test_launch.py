"""The tile tuner of kernels/launch.py, with a fake timer: what it picks, when it times, what it skips.

The real timer needs a GPU (tests/test_attention.py runs the tuner there); the choosing logic is plain Python.
"""
import pytest

pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402

import kernels.launch as launch  # noqa: E402
from kernels.launch import TileTuner  # noqa: E402


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
