"""benchmarks/overhead.py: the trainer and the streaming generator against bare loops. What is tested is what the
measurements stand on — the bare loops do the same work as the real ones (same weights, same tokens), the steps are
attributed to the right loop, the start-up phases happen between launch and the first step — never a timing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import overhead

ROOT = Path(__file__).resolve().parents[1]


def test_taking_turns_gives_each_loop_its_own_time(monkeypatch):
    """A fake clock: each Trainer step lasts 5 units, each bare step 3. The callback must give the Trainer the time
    from the end of one callback to the start of the next, and the bare loop the time inside the callback."""
    clock = {"now": 0.0}
    monkeypatch.setattr(overhead.time, "perf_counter", lambda: clock["now"])

    def bare_step():
        clock["now"] += 3.0

    turns = overhead.TakingTurns(bare_step, sync=lambda: None)
    for _ in range(4):
        clock["now"] += 5.0  # a Trainer step
        turns(trainer=None)
    assert turns.trainer_ms == [5000.0] * 3  # the first Trainer step has no start mark: it is the warm-up
    assert turns.bare_ms == [3000.0] * 4


def _trainer(tmp_path, steps=3):
    from minigpt.train_config import TrainConfig
    from minigpt.trainer import Trainer

    trainer = Trainer(TrainConfig.from_args(overhead.demo_flags(tmp_path / "run", steps, "cpu", tmp_path / "cache")))
    trainer.setup()
    return trainer


def test_the_bare_loop_trains_the_trainers_model_from_the_same_weights(tmp_path):
    trainer = _trainer(tmp_path)
    step = overhead.bare_training_step(trainer)
    bare_model = step.model
    theirs, ours = trainer.raw_model.state_dict(), bare_model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)  # same seed, same config: the same model
    assert trainer.cfg.vocab_size == 257 and trainer.cfg.context_length == 128 and trainer.config.batch_size == 16

    x = torch.tensor(trainer.train_tokens[:129].tolist())[None]  # (1, 129): a window and its targets
    before = bare_model(x[:, :-1], targets=x[:, 1:]).item()
    for _ in range(3):
        step()
    after = bare_model(x[:, :-1], targets=x[:, 1:]).item()
    assert after < before  # its steps train (at lr 5e-3 three AdamW steps lower the loss of the training tokens)


def test_trainer_overhead_runs_the_real_trainer_and_times_every_step_but_the_first(tmp_path):
    result = overhead.trainer_overhead(5, torch.device("cpu"), tmp_path)
    assert result["steps"] == 5 and result["threads"] == torch.get_num_threads()
    assert result["trainer_ms"] > 0 and result["bare_ms"] > 0
    assert result["overhead_pct"] == pytest.approx(100 * (result["trainer_ms"] - result["bare_ms"]) / result["bare_ms"])
    # the Trainer's run was a real one: its checkpoint at the last step, evaluated at the first and the last
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 5 and [r["step"] for r in ckpt["metrics"]] == [0, 5]
    assert "trainer overhead" in overhead.training_table(result)


def test_the_startup_child_reports_phases_that_happen_between_launch_and_the_first_step(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    flags = overhead.demo_flags(tmp_path / "run", 1, "cpu", tmp_path / "cache")
    for which, args in (("trainer", flags), ("bare", ["cpu"])):
        proc = subprocess.run([sys.executable, "-c", "import benchmarks.overhead as o; o.startup_child()", which,
                               *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith(overhead.STARTUP_MARK)][-1]
        report = json.loads(line[len(overhead.STARTUP_MARK):])
        assert report["first_step_at"] > 0
        if which == "trainer":
            phases = report["phases_s"]
            assert {"imports", "settings", "tokenizer", "data", "model", "optimizer", "first evaluation", "sample",
                    "save", "between"} <= set(phases)
            assert all(v >= 0 for v in phases.values())
            # the child wrote its run: the first evaluation's checkpoint at step 0, then the one-step run's end
            assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 1


def test_startup_takes_the_median_of_its_runs_and_counts_from_launch(tmp_path, monkeypatch):
    calls = []

    def fake_child(cmd, timeout_s):
        calls.append(cmd)
        n = len(calls)
        return {"first_step_s": float(n), "phases_s": {"data": 0.1 * n}}

    monkeypatch.setattr(overhead, "_child", fake_child)
    result = overhead.startup(3, torch.device("cpu"), tmp_path)
    # one run to fill the cache, three timed trainer runs (2, 3, 4 s), three bare runs (5, 6, 7 s)
    assert len(calls) == 7 and all("trainer" in c for c in calls[:4]) and all("bare" in c for c in calls[4:])
    assert result["trainer_s"] == 3.0 and result["bare_s"] == 6.0
    assert result["trainer_phases_s"] == {"data": pytest.approx(0.3)}  # the phases of the median run


def test_streaming_overhead_compares_loops_that_write_the_same_tokens():
    from minigpt import GPTModel
    from minigpt.config import GPTConfig
    from minigpt.generate import generate

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                               qkv_bias=True), kernels="torch").eval()
    prompt = torch.randint(0, 97, (1, 5))
    result = overhead.streaming_overhead(model, prompt, 40, rounds=2, device=torch.device("cpu"))
    assert result["new_tokens"] == 27  # held within the context: 32 - 5
    assert result["same_tokens"] is True
    assert result["stream_ms_per_token"] > 0 and result["bare_ms_per_token"] > 0
    assert "generate_tokens" in overhead.streaming_line(result)
    assert result["tokens"] == generate(model, prompt, 27, 32)[0, 5:].tolist()  # and they are generate()'s


def test_benchmarks_train_quick_prints_the_bare_loop_row_and_the_overhead(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                      os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.train", "--quick", "--device", "cpu", "--out", str(tmp_path),
           "--kernels", "torch", "--compile", "no", "--loss", "fused", "--no-max-batch", "--overhead-steps", "4",
           "--startup-runs", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bare loop" in proc.stdout and "overhead per step:" in proc.stdout
    data = json.loads((tmp_path / "train.json").read_text())
    measured = data["meta"]["trainer_overhead"]
    assert measured["steps"] == 4 and "startup" not in measured

    from benchmarks import train as train_bench

    assert "overhead per step:" in train_bench.summarize(data)  # --summarize prints it again from the file
