"""Resuming: a flag given again wins over the checkpoint's value, even when it is the default's value; a flag not
given continues the checkpoint's; the optimizer runs with the resumed run's values; other data is refused; a larger
--max-steps rebuilds the cosine over the new total (COURSE.md, Lesson 2)."""
from __future__ import annotations

import math

import pytest
import torch

from minigpt.checkpoint import CheckpointError
from minigpt.optim import lr_lambda
from minigpt.train import Trainer, build_parser, train

BASE = ["--data", "stories", "--max-docs", "300", "--tokenizer", "bytes", "--preset", "tiny", "--n-layers", "1",
        "--emb-dim", "32", "--n-heads", "2", "--context-length", "32", "--batch-size", "4", "--no-progress",
        "--device", "cpu"]

# flag, the first run's value, the parser's default (given again on resume, it must win over the first value)
WITH_DEFAULTS = [
    ("grad_clip", "0.5", "1.0"),
    ("grad_accum", "2", "1"),
    ("seed", "7", "123"),
    ("weight_decay", "0.05", "0.1"),
    ("eval_iters", "3", "20"),
    ("epochs", "3", "20"),
    ("kernels", "torch", "auto"),
]
FIRST_RUN = [v for flag, first, _ in WITH_DEFAULTS for v in (f"--{flag.replace('_', '-')}", first)]


def _args(argv):
    return build_parser().parse_args(BASE + argv)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A two-step run whose resumable flags all differ from the parser's defaults; its out-dir is copied per test."""
    out = tmp_path_factory.mktemp("first") / "out"
    train(_args(FIRST_RUN + ["--max-steps", "2", "--eval-interval", "2", "--lr", "2e-3", "--warmup-steps", "1",
                             "--dtype", "bf16", "--out-dir", str(out)]))
    return out


def _resumed(first_run, tmp_path, *argv) -> Trainer:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    trainer = Trainer(_args(["--resume", "auto", "--out-dir", str(out), *argv]))
    trainer.setup()
    return trainer


def _recorded(trainer: Trainer, name: str):
    """What the checkpoint this trainer writes records for ``name``."""
    trainer.save()
    ckpt = torch.load(trainer.out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return ckpt["args"][name]


def _parsed(flag: str, text: str):
    return getattr(build_parser().parse_args([f"--{flag.replace('_', '-')}", text]), flag)


@pytest.mark.parametrize("flag, first, default", WITH_DEFAULTS, ids=[f for f, _, _ in WITH_DEFAULTS])
def test_a_flag_given_again_with_its_default_value_wins_over_the_checkpoint(first_run, tmp_path, flag, first,
                                                                             default):
    trainer = _resumed(first_run, tmp_path, f"--{flag.replace('_', '-')}", default)
    assert getattr(trainer.config, flag) == _parsed(flag, default) != _parsed(flag, first)
    assert _recorded(trainer, flag) == _parsed(flag, default)


@pytest.mark.parametrize("flag, first, default", WITH_DEFAULTS, ids=[f for f, _, _ in WITH_DEFAULTS])
def test_a_flag_not_given_continues_the_checkpoints_value(first_run, tmp_path, flag, first, default):
    trainer = _resumed(first_run, tmp_path)
    assert getattr(trainer.config, flag) == _parsed(flag, first)
    assert _recorded(trainer, flag) == _parsed(flag, first)


def test_a_resumed_run_keeps_its_dtype_unless_given_again(first_run, tmp_path):
    assert _resumed(first_run, tmp_path / "a").dtype == torch.bfloat16
    assert _resumed(first_run, tmp_path / "b", "--dtype", "auto").dtype == torch.float32  # auto on a CPU: fp32


def test_the_optimizer_runs_with_the_resumed_runs_lr_and_weight_decay(first_run, tmp_path):
    # constant schedule (min-lr = lr, no warm-up): every group's rate is exactly the given one from the first step
    trainer = _resumed(first_run, tmp_path, "--lr", "0.1", "--min-lr", "0.1", "--warmup-steps", "0",
                       "--weight-decay", "0.2")
    decay, no_decay = trainer.optimizer.param_groups
    assert (decay["lr"], no_decay["lr"]) == (0.1, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    assert trainer.scheduler.get_last_lr() == [0.1, 0.1]
    # and without the flags, the first run's schedule goes on: peak 2e-3, floor 2e-4, cosine over 2 steps, at step 2
    kept = _resumed(first_run, tmp_path / "kept")
    assert kept.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert kept.optimizer.param_groups[0]["weight_decay"] == 0.05


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_new_lr_on_resume_is_the_one_the_steps_and_the_metrics_use(tmp_path, kernels):
    common = ["--kernels", kernels, "--eval-iters", "1", "--out-dir", str(tmp_path / "out")]
    train(_args(common + ["--max-steps", "1", "--eval-interval", "1", "--lr", "1e-3"]))
    summary = train(_args(common + ["--resume", "auto", "--max-steps", "3", "--eval-interval", "1", "--lr", "0.01",
                                    "--min-lr", "0.01"]))
    assert [row["lr"] for row in summary["metrics"][-2:]] == [pytest.approx(0.01)] * 2
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["args"]["lr"] == 0.01


def test_resuming_on_other_text_of_the_same_length_is_refused(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    text = "".join(f"Story {i}: the cat sat on the mat and looked at the moon.\n" for i in range(60))
    a.write_text(text)
    b.write_text(text.replace("cat", "dog"))  # the same number of bytes, so the same number of byte tokens
    argv = [a if x == "stories" else x for x in BASE]
    common = ["--kernels", "torch", "--eval-iters", "1", "--out-dir", str(tmp_path / "out")]
    train(build_parser().parse_args([str(x) for x in argv] + common + ["--max-steps", "1", "--eval-interval", "1"]))
    resumed = [str(b) if x == a else str(x) for x in argv] + common + ["--resume", "auto", "--max-steps", "2"]
    with pytest.raises(CheckpointError) as e:
        train(build_parser().parse_args(resumed))
    msg = str(e.value)
    assert "other tokens" in msg and "--data" in msg


def test_resuming_on_the_same_text_is_accepted(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("".join(f"Story {i}: the cat sat on the mat and looked at the moon.\n" for i in range(60)))
    argv = [str(a) if x == "stories" else x for x in BASE]
    common = ["--kernels", "torch", "--eval-iters", "1", "--out-dir", str(tmp_path / "out")]
    train(build_parser().parse_args(argv + common + ["--max-steps", "1", "--eval-interval", "1"]))
    summary = train(build_parser().parse_args(argv + common + ["--resume", "auto", "--max-steps", "2"]))
    assert summary["steps"] == 2


def test_the_parser_records_exactly_the_flags_given():
    args = build_parser().parse_args(["--grad-clip", "1.0", "--lr", "1e-3", "--overwrite"])
    assert args.given_flags == {"grad_clip", "lr", "overwrite"}
    assert args.grad_clip == 1.0 and args.seed == 123 and args.preset is None  # the others keep their defaults


def _cosine(step: int, total: int, peak: float, floor: float) -> float:
    """The schedule written out again (no warm-up): peak at step 0, floor from step ``total`` on."""
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))


def test_extending_a_finished_run_rebuilds_the_cosine_over_the_new_total(tmp_path):
    """COURSE.md, Lesson 2: a run of 6 steps resumed with --max-steps 9 does not continue its schedule: the cosine
    is rebuilt over 9 steps, so the rate jumps from the floor reached at step 6 back up (a warm restart). Resuming
    with --lr and --min-lr both at that floor continues without the jump, at a constant rate."""
    import shutil

    peak, floor = 5e-3, 5e-4  # --lr, and --min-lr's default: a tenth of it
    common = ["--kernels", "torch", "--eval-iters", "1", "--eval-interval", "1", "--lr", str(peak)]
    first = tmp_path / "first"
    train(_args(common + ["--max-steps", "6", "--out-dir", str(first)]))
    shutil.copytree(first, tmp_path / "constant")

    def run(out, *argv):
        """(the rate of the first resumed step, {step: the lr metrics.csv records}) of a run resumed in ``out``."""
        trainer = Trainer(_args(common + ["--resume", "auto", "--max-steps", "9", "--out-dir", str(out), *argv]))
        with trainer:
            trainer.setup()
            first_rate = {group["lr"] for group in trainer.optimizer.param_groups}
            summary = trainer.fit()
        assert len(first_rate) == 1  # both parameter groups, with and without weight decay
        return first_rate.pop(), {row["step"]: row["lr"] for row in summary["metrics"]}

    first_rate, lrs = run(first)
    # a row's lr is the rate of the step after it (the scheduler has already stepped)
    assert [lrs[s] for s in range(7)] == pytest.approx([_cosine(s, 6, peak, floor) for s in range(7)], rel=1e-12)
    assert lrs[6] == pytest.approx(floor)
    assert first_rate == pytest.approx(_cosine(6, 9, peak, floor), rel=1e-12)  # step 7 runs 2/3 of the way down
    assert first_rate > 3 * floor
    assert [lrs[s] for s in range(7, 10)] == pytest.approx([_cosine(s, 9, peak, floor) for s in range(7, 10)],
                                                           rel=1e-12)
    assert lrs[9] == pytest.approx(floor)
    # the lesson's numbers: 60 steps at --lr 5e-3, then --max-steps 90; step 61 runs the cosine at 60/90
    assert lr_lambda(0, 90, 0.1)(60) * peak == pytest.approx(_cosine(60, 90, peak, floor), rel=1e-12)
    assert _cosine(60, 90, peak, floor) == pytest.approx(1.625e-3, rel=1e-12)

    constant_rate, constant = run(tmp_path / "constant", "--lr", str(floor), "--min-lr", str(floor))
    assert constant_rate == pytest.approx(floor, rel=1e-12)
    assert [constant[s] for s in range(6, 10)] == pytest.approx([floor] * 4, rel=1e-12)
