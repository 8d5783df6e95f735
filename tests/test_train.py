import csv
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minigpt.train import build_parser, lr_lambda, main, train
from tests.original_notebook import NotebookGPTModel

ROOT = Path(__file__).resolve().parents[1]

# A model and data small enough that a step takes milliseconds on a CPU.
TINY = ["--data", "stories", "--max-docs", "300", "--tokenizer", "bytes", "--preset", "tiny", "--n-layers", "1",
        "--emb-dim", "32", "--n-heads", "2", "--context-length", "32", "--batch-size", "4", "--eval-iters", "2",
        "--no-progress", "--device", "cpu", "--kernels", "torch"]


def run_train(tmp_path, *extra, on_step=None, out="out"):
    args = build_parser().parse_args(TINY + ["--out-dir", str(tmp_path / out), *extra])
    return train(args, on_step=on_step)


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_lowers_the_loss_and_writes_every_output(tmp_path):
    summary = run_train(tmp_path, "--max-steps", "60", "--eval-interval", "20", "--lr", "3e-3")
    out = tmp_path / "out"
    for name in ("checkpoint.pt", "model.pth", "metrics.csv", "loss.pdf", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 20, 40, 60]
    first, last = float(rows[0]["val_loss"]), float(rows[-1]["val_loss"])
    assert abs(first - torch.log(torch.tensor(257.0)).item()) < 0.5  # untrained: about ln(vocab)
    assert last < first - 1.0
    assert summary["steps"] == 60
    # the final model.pth is the original notebook's format: it loads strictly into the original notebook's model
    cfg = summary["config"].to_dict()
    NotebookGPTModel(cfg).load_state_dict(torch.load(out / "model.pth", weights_only=True))
    # and the checkpoint holds everything a resume needs
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "config", "tokenizer", "rng", "state"} <= set(ckpt)
    assert ckpt["tokenizer"] == "bytes" and ckpt["step"] == 60


@pytest.mark.parametrize("extra, match", [
    (["--emb-dim", "30", "--n-heads", "4"], "divisible by n_heads"),
    (["--data", "/no/such/place.txt"], "no such file"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--dtype", "fp16"], "fp16 needs a CUDA GPU"),
    (["--compile", "--kernels", "triton"], "--compile with --kernels triton"),
    (["--resume", "/no/such/checkpoint.pt"], "no such checkpoint"),
    (["--min-lr", "1.0"], "--min-lr"),
    (["--context-length", "100000", "--max-docs", "5"], "tokens"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 2**63 - 1"),
    (["--seed", "-1"], "--seed must be between 0"),
    (["--data", ""], "--data is empty"),
])
def test_bad_input_is_one_line_that_names_the_fix(tmp_path, extra, match):
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path / "out"), *extra])
    msg = str(e.value)
    assert msg.startswith("error:") and match in msg and "\n" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--lr", "0"),
    ("--min-lr", "nan"), ("--min-lr", "-1e-4"),
    ("--weight-decay", "nan"), ("--weight-decay", "inf"), ("--weight-decay", "-0.1"),
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--grad-clip", "-1"),
    ("--train-ratio", "nan"), ("--train-ratio", "1"), ("--train-ratio", "0"),
])
def test_a_float_flag_that_is_not_finite_or_out_of_range_is_refused_before_any_work(tmp_path, flag, value):
    # --max-steps 2: a value that slipped through would train briefly and not raise; FLAG=VALUE, or argparse would
    # take -inf or -1e-4 for a flag
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--max-steps", "2", f"{flag}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"error: {flag} must be ") and msg.endswith(f", got {float(value)}") and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # no out dir, no token cache (conftest puts it under tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf", "1", "-0.1"])
def test_a_drop_rate_outside_0_1_is_refused_before_any_data(tmp_path, value):
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--max-steps", "2", f"--drop-rate={value}"])
    msg = str(e.value)
    assert msg == f"error: --drop-rate must be in [0, 1), got {float(value)}"
    assert list(tmp_path.iterdir()) == []


def test_a_float_flag_error_from_the_command_line_is_one_line_without_a_traceback(tmp_path):
    env = dict(os.environ, MINIGPT_CACHE=str(tmp_path / "token-cache"))
    r = subprocess.run([sys.executable, "-m", "minigpt.train", *TINY, "--out-dir", str(tmp_path / "out"),
                        "--grad-clip", "nan"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.splitlines() == ["error: --grad-clip must be a finite number >= 0, got nan"]
    assert list(tmp_path.iterdir()) == []


def test_cuda_device_without_gpu(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        main(TINY + ["--out-dir", str(tmp_path), "--device", "cuda"])


def test_too_short_corpus_says_how_many_tokens_are_needed(tmp_path):
    (tmp_path / "short.txt").write_text("A very short story.")
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--data", str(tmp_path / "short.txt")])
    assert "tokens" in str(e.value) and "needs" in str(e.value)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import minigpt.trainer as T  # the module whose train_step calls calc_loss_batch

    real = T.calc_loss_batch
    steps = {"n": 0}

    def poisoned(x, y, model, device, eot_token=None):
        loss = real(x, y, model, device, eot_token)
        if model.training:
            steps["n"] += 1
            if steps["n"] == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(T, "calc_loss_batch", poisoned)
    with pytest.raises(T.NonFiniteLoss) as e:  # a MinigptError: the command line prints its message as one line
        run_train(tmp_path, "--max-steps", "10", "--eval-interval", "2")
    assert "diverged" in str(e.value) and "training loss is nan at step 5" in str(e.value)
    assert "a lower --lr (now 0.0005)" in str(e.value)
    assert "--grad-clip" not in str(e.value)  # it is already 1.0 (the default): no advice to set it
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4  # the evaluation at step 4 was the last good one
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _interrupt_at(step):
    def on_step(trainer):
        if trainer.state["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
    return on_step


def test_ctrl_c_finishes_the_step_saves_and_exits_cleanly(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    summary = run_train(tmp_path, "--max-steps", "10", "--eval-interval", "4", on_step=_interrupt_at(3))
    assert summary["interrupted"] and summary["saved"] and summary["steps"] == 3
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_continues_exactly(tmp_path, accum):
    # drop_rate > 0 so the dropout RNG must be restored too; few windows so the run crosses epoch boundaries
    common = ["--max-steps", "9", "--eval-interval", "3", "--drop-rate", "0.1", "--max-docs", "2",
              "--grad-accum", str(accum), "--warmup-steps", "2"]
    straight = run_train(tmp_path, *common, out="a")
    first = run_train(tmp_path, *common, on_step=_interrupt_at(5), out="b")
    assert first["steps"] == 5
    resumed = run_train(tmp_path, *common, "--resume", "auto", out="b")
    assert resumed["steps"] == 9
    assert straight["config"].drop_rate == 0.1
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["state"]["epoch"] >= 1  # the data really wrapped into a second epoch
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise: same batches, masks, LR, order of sums
    assert read_metrics(tmp_path / "a" / "metrics.csv") == [
        {**r, "elapsed_s": ra["elapsed_s"], "tokens_per_s": ra["tokens_per_s"]}
        for r, ra in zip(read_metrics(tmp_path / "b" / "metrics.csv"), read_metrics(tmp_path / "a" / "metrics.csv"))
    ]


def test_max_steps_is_the_total_of_the_run(tmp_path):
    run_train(tmp_path, "--max-steps", "4", "--eval-interval", "2")
    summary = run_train(tmp_path, "--max-steps", "8", "--eval-interval", "2", "--resume", "auto")
    assert summary["steps"] == 8
    assert [r["step"] for r in summary["metrics"]] == [0, 2, 4, 6, 8]


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    summary = run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2", "--resume", "auto")
    assert summary["steps"] == 2


def test_resume_refuses_other_data(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2")
    with pytest.raises(SystemExit, match="same --data"):
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--max-steps", "4", "--resume", "auto",
                     "--max-docs", "200"])


def test_lr_schedule_by_hand():
    f = lr_lambda(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(9) - 0.55) < 1e-12 and abs(f(14) - 0.1) < 1e-12 and f(100) == f(14)


def test_weight_decay_only_on_linear_weight_matrices():
    from minigpt import GPTModel
    from minigpt.train import configure_optimizer

    model = GPTModel(dict(vocab_size=11, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0,
                          qkv_bias=True), kernels="torch")
    opt = configure_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    expected = {n for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n}
    assert decayed == expected and "out_head.weight" in decayed and "tok_emb.weight" not in decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            main(TINY + ["--out-dir", str(tmp_path), "--log", "tensorboard", "--max-steps", "1"])
    else:
        run_train(tmp_path, "--max-steps", "2", "--eval-interval", "1", "--log", "tensorboard")
        assert any((tmp_path / "out" / "tb").iterdir())


KILLER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from minigpt.checkpoint import save_torch
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        save_torch({{"step": i, "w": torch.full((2_000_000,), float(i))}}, path)
        print(i, flush=True)
""")


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    path = tmp_path / "checkpoint.pt"
    for delay_lines in (1, 3, 6):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(delay_lines):  # let it finish a few saves, then kill it in the middle of the next one
            proc.stdout.readline()
        proc.kill()
        proc.wait()
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["step"] >= delay_lines and torch.all(ckpt["w"] == ckpt["step"])


def _torchrun(tmp_path, nproc, *extra, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "minigpt.train", *TINY, "--out-dir", str(tmp_path / out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(tmp_path / out / "metrics.csv")


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_with_twice_the_batch(tmp_path):
    common = ["--max-steps", "6", "--eval-interval", "3", "--max-docs", "200"]
    two = _torchrun(tmp_path, 2, *common, "--batch-size", "2", out="two")
    one = run_train(tmp_path, *common, "--batch-size", "4", out="one")["metrics"]
    assert [int(r["step"]) for r in two] == [r["step"] for r in one] == [0, 3, 6]
    for r2, r1 in zip(two, one):
        assert abs(float(r2["train_loss"]) - r1["train_loss"]) < 1e-4
        assert abs(float(r2["val_loss"]) - r1["val_loss"]) < 1e-4
    # a checkpoint written by the 2-rank run resumes on one process
    resumed = run_train(tmp_path, *common[2:], "--max-steps", "8", "--batch-size", "4", "--resume",
                        str(tmp_path / "two" / "checkpoint.pt"), out="two")
    assert resumed["steps"] == 8


# A process that was a torchrun worker (the flag init_distributed sets), with a teardown step that would show.
AS_A_WORKER = """
import atexit, sys
import minigpt.distributed as d
d._joined_a_group = True
atexit.register(lambda: print("teardown ran", flush=True))
"""


def _python(code, tmp_path):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)


def test_a_worker_ends_with_its_status_its_output_flushed_and_no_teardown(tmp_path):
    # what the interpreter's teardown would do is skipped (it once aborted a finished worker), not what was printed
    proc = _python(AS_A_WORKER + "sys.stdout.write('kept'); sys.stderr.write('also kept'); d.end_process(143)",
                   tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (143, "kept", "also kept")
    # a process that never joined a group ends as any program does: its status, its teardown
    plain = _python("import atexit, minigpt.distributed as d; atexit.register(lambda: print('teardown ran')); "
                    "d.end_process(3)", tmp_path)
    assert (plain.returncode, plain.stdout) == (3, "teardown ran\n")


def test_a_workers_error_is_one_line_and_status_1(tmp_path):
    args = TINY + ["--resume", str(tmp_path / "missing.pt"), "--out-dir", str(tmp_path / "out")]
    proc = _python(AS_A_WORKER + f"import minigpt.train as T; T.main({args!r})", tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --resume") and "teardown" not in proc.stdout


def test_calc_loss_batch_is_the_notebooks_loss_without_the_logits():
    import torch.nn.functional as F

    from minigpt import GPTModel
    from minigpt.train import calc_loss_batch, calc_loss_loader

    torch.manual_seed(0)
    model = GPTModel(dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                          qkv_bias=False), kernels="torch").double()
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    loss = calc_loss_batch(x, y, model, "cpu")
    assert "targets" in calls[0]  # the model's fused loss, not logits then F.cross_entropy
    torch.testing.assert_close(loss, F.cross_entropy(model(x).flatten(0, 1), y.flatten()), rtol=1e-12, atol=1e-12)
    assert calc_loss_loader([(x, y), (x, y)], model, "cpu") == pytest.approx(loss.item(), rel=1e-12)


def test_calc_loss_loader_shared_by_ranks_and_weighted_by_tokens():
    """The original notebook's mean of batch losses by default; for evaluation, the batches shared out over ranks and
    each counted by its tokens: the ranks' sums add up to the one-process token-weighted mean, whatever the split."""
    from minigpt import GPTModel
    from minigpt.optim import calc_loss_batch, calc_loss_loader

    torch.manual_seed(0)
    model = GPTModel(dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                          qkv_bias=False), kernels="torch").double()
    batches = [(torch.randint(0, 64, (b, 16)), torch.randint(0, 64, (b, 16))) for b in (3, 3, 3, 1, 3)]
    losses = [calc_loss_batch(x, y, model, "cpu").item() for x, y in batches]
    tokens = [y.numel() for _, y in batches]
    # the original notebook's behaviour: every batch counts as one, num_batches caps how many are read
    assert calc_loss_loader(batches, model, "cpu") == pytest.approx(sum(losses) / 5, rel=1e-12)
    assert calc_loss_loader(batches, model, "cpu", 2) == pytest.approx(sum(losses[:2]) / 2, rel=1e-12)
    weighted = sum(l * n for l, n in zip(losses, tokens)) / sum(tokens)
    assert calc_loss_loader(batches, model, "cpu", token_weighted=True) == pytest.approx(weighted, rel=1e-12)
    for world_size in (1, 2, 3):
        sums = [calc_loss_loader(batches, model, "cpu", rank=r, world_size=world_size, token_weighted=True,
                                 as_sum=True) for r in range(world_size)]
        assert sum(s for s, _ in sums) / sum(n for _, n in sums) == pytest.approx(weighted, rel=1e-12)
    # num_batches counts per rank: 2 batches each of 2 ranks read the first 4, rank 1 takes the 2nd and the 4th
    total, count = calc_loss_loader(batches, model, "cpu", 2, rank=1, world_size=2, token_weighted=True, as_sum=True)
    assert count == tokens[1] + tokens[3]
    assert total == pytest.approx(losses[1] * tokens[1] + losses[3] * tokens[3], rel=1e-12)
    # a rank with no batch adds nothing (not NaN) to the sum over ranks; alone, its mean is NaN
    assert calc_loss_loader(batches[:1], model, "cpu", rank=1, world_size=2, as_sum=True) == (0.0, 0)
    assert math.isnan(calc_loss_loader(batches[:1], model, "cpu", rank=1, world_size=2))


@pytest.mark.slow
def test_compiled_model_matches_eager():
    from minigpt import GPTModel

    torch.manual_seed(0)
    model = GPTModel(dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                          qkv_bias=False), kernels="torch")
    idx = torch.randint(0, 64, (2, 16))
    eager = model(idx)
    compiled = torch.compile(model)(idx)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_loss_and_gradients_match_eager():
    # the chunked loss is an autograd.Function with a Python loop: it must trace as one graph (no data-dependent
    # branch: the CPU target check steps aside under compile) and give eager's numbers
    from minigpt import GPTModel

    torch.manual_seed(0)
    model = GPTModel(dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                          qkv_bias=False), kernels="torch")
    idx, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    params = list(model.parameters())
    eager = model(idx, targets=y)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(model, fullgraph=True)(idx, targets=y)
    compiled_grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Nothing lost, nothing silently ignored


def test_a_fresh_run_refuses_to_replace_a_checkpoint(tmp_path):
    run_train(tmp_path, "--max-steps", "4", "--eval-interval", "2")
    path = tmp_path / "out" / "checkpoint.pt"
    before = path.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--max-steps", "2"])
    assert str(e.value) == (f"error: {tmp_path / 'out'} already holds a checkpoint at step 4: --resume auto to "
                            "continue it, or another --out-dir / --overwrite to start over")
    # resuming ANOTHER run's checkpoint into this folder would replace it too
    run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2", out="other")
    with pytest.raises(SystemExit, match="already holds a checkpoint at step 4"):
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--resume", str(tmp_path / "other" / "checkpoint.pt")])
    assert path.read_bytes() == before
    summary = run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2", "--overwrite")
    assert summary["steps"] == 2 and torch.load(path, weights_only=True)["step"] == 2


@pytest.mark.parametrize("flag", [["--preset", "small"], ["--context-length", "16"], ["--n-layers", "2"],
                                  ["--n-heads", "4"], ["--emb-dim", "64"], ["--qkv-bias"], ["--tokenizer", "gpt2"]])
def test_resume_refuses_a_flag_that_contradicts_the_checkpoint(tmp_path, flag):
    run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2")
    path = tmp_path / "out" / "checkpoint.pt"
    before = path.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--max-steps", "4", "--resume", "auto", *flag])
    msg = str(e.value)
    assert msg.startswith(f"error: {flag[0]}") and "contradicts" in msg and "\n" not in msg
    assert path.read_bytes() == before


def test_resume_without_model_flags_describes_the_checkpoints_model(tmp_path, capsys):
    run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2", "--drop-rate", "0.1")
    bare = ["--data", "stories", "--max-docs", "300", "--no-progress", "--device", "cpu", "--kernels", "torch",
            "--out-dir", str(tmp_path / "out"), "--resume", "auto", "--max-steps", "4", "--drop-rate", "0.3"]
    summary = train(build_parser().parse_args(bare))
    log = capsys.readouterr().out
    assert summary["steps"] == 4 and summary["preset"] == "tiny"
    assert "model: tiny " in log and "1 layers, emb_dim 32, 2 heads, context 32" in log
    assert "--drop-rate 0.3 replaces the checkpoint's 0.1" in log
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["preset"] == "tiny" and ckpt["tokenizer"] == "bytes"
    assert ckpt["config"] == {**summary["config"].to_dict(), "drop_rate": 0.3} and ckpt["config"]["n_layers"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU demo is what a machine without a GPU gets")
def test_resume_auto_with_nothing_to_resume_is_exactly_a_fresh_run(tmp_path):
    from minigpt.train import Trainer

    settings = []
    for extra in ([], ["--resume", "auto"]):
        args = build_parser().parse_args(["--data", "stories", "--device", "cpu", "--kernels", "torch",
                                          "--no-progress", "--out-dir", str(tmp_path / "fresh"), *extra])
        trainer = Trainer(args)
        trainer.setup()
        settings.append((trainer.preset, trainer.cfg,
                         {k: v for k, v in trainer.config.record().items() if k != "resume"}))
    assert settings[0] == settings[1]
    assert settings[0][0] == "tiny" and settings[0][2]["max_steps"] == 1000  # the CPU demo, not gpt2-124m


def test_resume_with_nothing_left_to_do_writes_nothing(tmp_path, capsys):
    run_train(tmp_path, "--max-steps", "4", "--eval-interval", "2")
    out = tmp_path / "out"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}
    summary = run_train(tmp_path, "--max-steps", "2", "--resume", "auto")
    assert summary["steps"] == 4 and not summary["saved"]
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()} == before


def test_sigterm_saves_then_exits_143(tmp_path, monkeypatch):
    import minigpt.train as T

    real = T.Trainer.train_step

    def step_then_term(self, micro):
        result = real(self, micro)
        if self.state["step"] == 2:  # the step being done is the 3rd
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(T.Trainer, "train_step", step_then_term)
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path / "out"), "--max-steps", "10", "--eval-interval", "5"])
    assert e.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["step"] == 3


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2")
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "model.pth", "metrics.csv", "loss.png", "loss.pdf"):
        assert oct((tmp_path / "out" / name).stat().st_mode & 0o777) == oct(0o644), name


@pytest.mark.parametrize("make", ["file", "under-a-file"])
def test_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path, make):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" if make == "file" else tmp_path / "f" / "run"
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(out), "--max-steps", "1"])
    assert str(e.value).startswith(f"error: --out-dir {out}") and "\n" not in str(e.value)


def test_divergence_advice_names_only_what_would_change():
    from minigpt.train import divergence_advice

    args = build_parser().parse_args(["--lr", "1e-3", "--grad-clip", "0", "--warmup-steps", "10"])
    advice = divergence_advice(args)
    assert advice == "try a lower --lr (now 0.001), a longer --warmup-steps (now 10) or --grad-clip 1.0 (now 0, off)"


def test_a_temporary_file_left_by_a_killed_save_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / ".checkpoint.pt.k1ll3d.tmp"  # as atomic_open names it; its writer is gone (no lock held)
    leftover.write_bytes(b"half a checkpoint")
    os.utime(leftover, (1e9, 1e9))
    run_train(tmp_path, "--max-steps", "2", "--eval-interval", "2")
    assert not leftover.exists() and (out / "checkpoint.pt").exists()


def test_resume_from_a_checkpoint_saved_in_another_memory_order_continues_exactly(tmp_path):
    common = ["--max-steps", "6", "--eval-interval", "3", "--drop-rate", "0.1"]
    run_train(tmp_path, *common, on_step=_interrupt_at(3), out="a")
    path = tmp_path / "a" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    # every tensor contiguous, as nn.Linear (and minigpt before its weights were stored input-major) saves them
    ckpt["model"] = {k: v.contiguous() for k, v in ckpt["model"].items()}
    for state in ckpt["optimizer"]["state"].values():
        for k, v in state.items():
            state[k] = v.contiguous() if torch.is_tensor(v) else v
    (tmp_path / "b").mkdir()
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    from minigpt.train import Trainer

    trainer = Trainer(build_parser().parse_args(TINY + ["--out-dir", str(tmp_path / "b"), *common, "--resume",
                                                        "auto"]))
    trainer.setup()  # the moments are restored in their parameter's memory order (the fused AdamW needs it)
    moments = [(p, v) for p, st in trainer.optimizer.state.items() for v in st.values() if v.shape == p.shape]
    assert moments and all(v.stride() == p.stride() for p, v in moments)
    for out in ("a", "b"):
        run_train(tmp_path, *common, "--resume", "auto", out=out)
    a, b = (torch.load(tmp_path / o / "checkpoint.pt", weights_only=True) for o in ("a", "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
