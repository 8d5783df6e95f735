"""Nothing silently wrong, nothing lost: one run per --out-dir, every check before the first step, one run's files
in the folder, and one line (never a traceback) when saving fails or a run is interrupted."""
from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minigpt.train as T
import minigpt.trainer
from minigpt.train import build_parser, main, train

ROOT = Path(__file__).resolve().parents[1]

# A model and data small enough that a step takes milliseconds on a CPU (as in test_train.py).
TINY = ["--data", "stories", "--max-docs", "300", "--tokenizer", "bytes", "--preset", "tiny", "--n-layers", "1",
        "--emb-dim", "32", "--n-heads", "2", "--context-length", "32", "--batch-size", "4", "--eval-iters", "2",
        "--no-progress", "--device", "cpu", "--kernels", "torch"]


def run_train(out, *extra, on_step=None):
    return train(build_parser().parse_args(TINY + ["--out-dir", str(out), *extra]), on_step=on_step)


def run_main(out, *extra):
    """main() with TINY and ``--out-dir out``; returns the SystemExit it ends with (None: it returned)."""
    try:
        main(TINY + ["--out-dir", str(out), *extra])
    except SystemExit as e:
        return e
    return None


def one_line_error(e) -> str:
    assert e is not None and isinstance(e.code, str), e
    assert e.code.startswith("error: ") and "\n" not in e.code
    return e.code


def last_line(err: str) -> str:
    """The last line a run printed to stderr (the token cache's progress bar comes before it); no traceback."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def run_files(out) -> dict:
    """Every file of a run in ``out`` (its lock aside), with its bytes."""
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != T.OUT_DIR_LOCK}


def step_of(path) -> int:
    return torch.load(path, weights_only=True)["step"]


def count_steps(monkeypatch) -> list:
    """Record every training step the code under test takes."""
    steps, real = [], T.Trainer.train_step

    def counted(self, micro):
        steps.append(self.state["step"] + 1)
        return real(self, micro)

    monkeypatch.setattr(T.Trainer, "train_step", counted)
    return steps


def env_for(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "MINIGPT_CACHE": str(tmp_path / "token-cache")}


# ---------------------------------------------------------------------------------------------------------------
# One run per --out-dir


def test_a_second_run_into_the_same_out_dir_stops_at_once_naming_the_first(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "minigpt.train", *TINY, "--out-dir", str(out), "--epochs", "1000",
                              "--max-steps", "1000000", "--eval-interval", "1000000"],
                             cwd=ROOT, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists():  # its step-0 evaluation is saved: it is training now
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.1)
        theirs = (out / "checkpoint.pt").read_bytes()
        e = run_main(out, "--resume", "auto", "--max-steps", "2")
        assert one_line_error(e) == (f"error: --out-dir {out} is in use by process {first.pid} — another run is "
                                     "writing there: wait for it to end, or choose another --out-dir")
        assert (out / "checkpoint.pt").read_bytes() == theirs
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: it finishes its step, saves and exits 130
        first.wait(timeout=120)
    assert first.returncode == 130
    assert (out / "model.pth").exists() and step_of(out / "checkpoint.pt") >= 0  # it saved at the end
    # its lock went with it: the folder is free for the next run
    assert run_train(out, "--resume", "auto", "--max-steps", str(step_of(out / "checkpoint.pt") + 1))["saved"]


@pytest.mark.slow
def test_in_a_two_process_run_rank_0_holds_the_lock_and_both_ranks_stop(tmp_path):
    from minigpt.files import exclusive_lock

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minigpt.train", *TINY, "--out-dir", str(out), "--max-steps", "2"]
    with exclusive_lock(out / T.OUT_DIR_LOCK, "the test's folder", "wait"):  # another run holds it
        r = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"error: --out-dir {out} is in use by process {os.getpid()}" in r.stderr
    assert "error: rank 0 could not open --out-dir" in r.stderr  # rank 1 learned it too, and did not hang
    assert not (out / "checkpoint.pt").exists()
    # the same command with the folder free trains (rank 1 does not lock what rank 0 holds)
    r = subprocess.run(cmd, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert step_of(out / "checkpoint.pt") == 2


# ---------------------------------------------------------------------------------------------------------------
# Everything checkable is checked before training


def _read_only_filesystem(monkeypatch, folder):
    """Opening a file under ``folder`` for writing fails as on a filesystem mounted read-only."""
    real_open = os.open
    folder = str(folder)

    def fake_open(path, flags, *args, **kwargs):
        if str(path).startswith(folder) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize("how", ["read-only filesystem", "read-only folder"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_any_step(tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    run_train(out, "--max-steps", "2", "--eval-interval", "2")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    steps = count_steps(monkeypatch)
    if how == "read-only filesystem":
        _read_only_filesystem(monkeypatch, out)
    elif os.geteuid() == 0:
        pytest.skip("root writes into a folder whatever its mode")
    else:
        out.chmod(0o555)
    try:
        e = run_main(out, "--resume", "auto", "--max-steps", "6", "--eval-interval", "2")
    finally:
        out.chmod(0o755)
    msg = one_line_error(e)
    assert msg.startswith(f"error: --out-dir {out} cannot be written (") and "choose another --out-dir" in msg
    assert steps == []  # refused before the first step, not at the first save
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _last_sample(text: str) -> str:
    return [line for line in text.splitlines() if line.startswith("sample: ")][-1][len("sample: "):]


def test_an_empty_sample_prompt_starts_from_end_of_text_as_generate_does(tmp_path, capsys):
    from minigpt.generate import generate, load_for_inference

    out = tmp_path / "out"
    run_train(out, "--max-steps", "2", "--eval-interval", "2", "--sample-prompt", "")
    sample = _last_sample(capsys.readouterr().out)
    # the model of the last evaluation, continued from end-of-text alone, as `generate --prompt ''` starts
    model, tok = load_for_inference(str(out / "checkpoint.pt"), kernels="torch")
    ids = generate(model, torch.tensor([[tok.eot_token]]), 50, model.cfg.context_length, eos_id=tok.eot_token)
    assert sample == tok.decode(ids[0, 1:].tolist()).replace("\n", " ")


def test_a_sample_prompt_that_is_not_utf8_is_refused_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minigpt.train", *TINY, "--out-dir", str(tmp_path / "out"),
                        "--sample-prompt", b"Once \xff"],  # what the shell passes for $'Once \xff'
                       cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["error: --sample-prompt is not valid UTF-8 (byte 0xff at character 6) — pass it "
                                     "as UTF-8 text (is the terminal or the file it came from in another encoding?), "
                                     "or '' to start from end-of-text"]
    assert list(tmp_path.iterdir()) == []  # no out dir, no token cache


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_a_head_dim_above_the_triton_kernels_limit_is_refused_before_tokenizing(tmp_path, kernels):
    from kernels.attention import MAX_HEAD_DIM

    wide = ["--emb-dim", str(2 * (MAX_HEAD_DIM + 1)), "--n-heads", "2", "--kernels", kernels]  # head dim 129
    e = run_main(tmp_path / "out", "--max-steps", "1", "--eval-iters", "1", *wide)
    if kernels == "torch":  # the torch backend has no such limit: the same model trains
        assert e is None and step_of(tmp_path / "out" / "checkpoint.pt") == 1
        return
    msg = one_line_error(e)
    assert f"head dim {MAX_HEAD_DIM + 1} " in msg and f"limit of {MAX_HEAD_DIM}" in msg
    assert "--kernels torch" in msg and "--n-heads 3" in msg  # 258 / 3 = 86 fits; 258 / 2 does not
    assert not (tmp_path / "token-cache").exists()  # before tokenizing


def test_the_head_dim_check_takes_the_limit_itself():
    from kernels.attention import MAX_HEAD_DIM
    from minigpt.config import GPTConfig

    at_limit = GPTConfig(vocab_size=257, context_length=8, emb_dim=2 * MAX_HEAD_DIM, n_heads=2, n_layers=1)
    T.check_head_dim(at_limit, "triton", torch.device("cpu"))  # MAX_HEAD_DIM itself is allowed
    with pytest.raises(T.ConfigError):
        T.check_head_dim(at_limit.with_overrides(emb_dim=2 * MAX_HEAD_DIM + 2), "triton", torch.device("cpu"))


def test_lr_nan_is_refused_before_tokenizing(tmp_path):
    e = run_main(tmp_path / "out", "--lr", "nan")
    assert one_line_error(e) == "error: --lr must be a finite number > 0, got nan"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# --overwrite: the folder holds one run's files, whenever the new run stops


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(trainer):
        if trainer.state["step"] == step:
            raise Crash  # the process dies here (an exception stands for kill -9 / power cut: nothing after runs)
    return on_step


def _earlier_run(out):
    run_train(out, "--max-steps", "4", "--eval-interval", "2")
    (out / "tb").mkdir()
    (out / "tb" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"the earlier run's TensorBoard log")
    return run_files(out)


def test_overwrite_then_a_crash_leaves_only_the_new_runs_files(tmp_path):
    out = tmp_path / "out"
    _earlier_run(out)
    with pytest.raises(Crash):
        run_train(out, "--max-steps", "8", "--eval-interval", "2", "--seed", "7", "--overwrite", on_step=_crash_at(3))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["seed"] == 7 and ckpt["step"] == 2  # the new run's
    assert [r["step"] for r in ckpt["metrics"]] == [0, 2]
    from minigpt.metrics import read_metrics_csv

    assert [int(r["step"]) for r in read_metrics_csv(out / "metrics.csv")] == [0, 2]
    assert not (out / "model.pth").exists()  # the earlier run's final weights are gone, not left beside these
    assert list((out / "tb").iterdir()) == []


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_something_to_save(tmp_path):
    out = tmp_path / "out"
    before = _earlier_run(out)
    e = run_main(out, "--overwrite", "--data", str(tmp_path / "no-such-file.txt"))
    assert one_line_error(e)
    assert run_files(out) == before


def test_a_fresh_run_refuses_to_replace_an_earlier_runs_model_pth(tmp_path):
    out = tmp_path / "out"
    run_train(out, "--max-steps", "2", "--eval-interval", "2")
    (out / "checkpoint.pt").unlink()  # model.pth alone: still an earlier run's work
    weights = (out / "model.pth").read_bytes()
    e = run_main(out, "--max-steps", "2")
    assert one_line_error(e) == (f"error: {out} already holds the model.pth of an earlier run: another --out-dir, or "
                                 "--overwrite to replace it")
    assert (out / "model.pth").read_bytes() == weights


# ---------------------------------------------------------------------------------------------------------------
# Saving fails: one line that says what happened and what is kept


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_a_full_disk_while_saving_is_one_line_that_says_what_was_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_fdopen, real_save = os.fdopen, T.Trainer.save
    disk = {"full": False}
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k)) if disk["full"]
                        else real_fdopen(*a, **k))

    def save_then_fill_the_disk(self, final=False):
        real_save(self, final)
        disk["full"] = True

    monkeypatch.setattr(T.Trainer, "save", save_then_fill_the_disk)
    e = run_main(out, "--max-steps", "6", "--eval-interval", "2")
    assert e is not None and e.code == 1
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"error: {os.strerror(errno.ENOSPC)}: {out / 'checkpoint.pt'} — ") and "disk space" in line
    assert line.endswith(f"; the last good checkpoint is kept: {out / 'checkpoint.pt'} at step 0 (continue with "
                         "--resume auto)")
    assert step_of(out / "checkpoint.pt") == 0
    # no temporary file left (and no loss plot yet: one evaluation draws no line)
    assert sorted(p.name for p in out.iterdir()) == [".minigpt.lock", "checkpoint.pt", "metrics.csv"]


def _file_size_limit(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_file_size_limit_while_saving_is_one_line_that_says_what_was_kept(tmp_path):
    out = tmp_path / "out"
    run_train(out, "--max-steps", "2", "--eval-interval", "2")
    ckpt = out / "checkpoint.pt"
    size, before = ckpt.stat().st_size, ckpt.read_bytes()
    r = subprocess.run([sys.executable, "-m", "minigpt.train", *TINY, "--out-dir", str(out), "--resume", "auto",
                        "--max-steps", "4", "--eval-interval", "2"], cwd=ROOT, env=env_for(tmp_path),
                       capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(size // 2))
    assert r.returncode == 1
    line = last_line(r.stderr)
    assert line.startswith(f"error: {os.strerror(errno.EFBIG)}: {ckpt} — ") and "ulimit -f" in line
    assert line.endswith(f"; {ckpt} is kept as it was (step 2)")
    assert ckpt.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# A hand-made checkpoint given to --resume


def _damage(ckpt, how):
    if how == "no state.step":
        del ckpt["state"]["step"]
    elif how.startswith("no "):
        del ckpt[how[3:]]
    elif how == "moment of the wrong shape":
        state = next(iter(ckpt["optimizer"]["state"].values()))
        state["exp_avg"] = torch.zeros(3, 5)
    elif how == "weight of the wrong shape":
        name = next(iter(ckpt["model"]))
        ckpt["model"][name] = torch.zeros(3, 5)


@pytest.mark.parametrize("how, match", [
    ("no config", "no valid 'config' entry"), ("no args", "no valid 'args' entry"),
    ("no optimizer", "no valid 'optimizer' entry"), ("no state", "no valid 'state' entry"),
    ("no scheduler", "no valid 'scheduler' entry"), ("no state.step", "no valid 'state.step' entry"),
    ("moment of the wrong shape", "the optimizer's exp_avg has shape (3, 5)"),
    ("weight of the wrong shape", "does not match the model configuration"),
])
def test_a_hand_made_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch, how, match):
    run_train(tmp_path / "good", "--max-steps", "2", "--eval-interval", "2")
    ckpt = torch.load(tmp_path / "good" / "checkpoint.pt", weights_only=True)
    _damage(ckpt, how)
    path = tmp_path / "made.pt"
    torch.save(ckpt, path)
    steps = count_steps(monkeypatch)
    msg = one_line_error(run_main(tmp_path / "out", "--resume", str(path), "--max-steps", "4"))
    assert msg.startswith(f"error: {path}") and match in msg
    assert steps == []


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: the message says what is on disk


def test_ctrl_c_during_the_final_save_says_the_checkpoint_is_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = minigpt.trainer.save_torch  # the name Trainer.save calls

    def ctrl_c_before_model_pth(obj, path):
        if Path(path).name == "model.pth":
            raise KeyboardInterrupt  # the final save: checkpoint.pt is written, model.pth is next
        real(obj, path)

    monkeypatch.setattr(minigpt.trainer, "save_torch", ctrl_c_before_model_pth)
    e = run_main(out, "--max-steps", "4", "--eval-interval", "2")
    assert e is not None and e.code == 130
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and "nothing was written" not in printed.out + printed.err
    assert (f"interrupted while saving: the last good checkpoint is kept: {out / 'checkpoint.pt'} at step "
            f"{step_of(out / 'checkpoint.pt')} (continue with --resume auto)") in (printed.out + printed.err)
    assert step_of(out / "checkpoint.pt") == 4


def test_ctrl_c_while_setting_up_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    import minigpt.data

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minigpt.data, "load_token_splits", ctrl_c)
    e = run_main(tmp_path / "out", "--max-steps", "2")
    assert e is not None and e.code == 130
    assert last_line(capsys.readouterr().err) == "interrupted before training started: nothing was written"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".minigpt.lock"]
