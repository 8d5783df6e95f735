"""The token cache: written once and reused, keyed by its inputs, never half-written (signals, full disks), checked
on load, shared by two processes."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minigpt import data, token_cache
from minigpt.data import DataError, load_token_splits
from minigpt.tokenizer import ByteTokenizer
from tests.data_helpers import ROOT, Spy, both, cache, cache_files, leftovers, small_bpe, write


def test_cache_is_written_once_then_reused(tmp_path, cache):
    f = write(tmp_path / "a.txt", "some text to cache. " * 30)
    spy = Spy()
    train1, val1, info1 = load_token_splits(str(f), spy, cache_dir=cache)
    assert spy.calls > 0 and info1["cached"] is False
    train2, val2, info2 = load_token_splits(str(f), Spy(refuse=True), cache_dir=cache)
    assert info2["cached"] is True and info2["cache"] == info1["cache"]
    assert both(train2, val2) == both(train1, val1)
    assert cache_files(cache) == sorted([os.path.basename(info1["cache"][0]),
                                   os.path.basename(info1["cache"][0]) + ".json"])


def test_cache_key_changes_with_inputs(tmp_path, cache):
    root = tmp_path / "docs"
    for i in range(4):
        write(root / f"{i}.txt", f"document number {i} " * 10)
    base = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cache"]
    fewer = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache, max_docs=2)[2]["cache"]
    other_tok = load_token_splits(str(root), small_bpe(), cache_dir=cache)[2]["cache"]
    assert len({base[0], fewer[0], other_tok[0]}) == 3
    write(root / "1.txt", "changed, and longer than before " * 10)  # size and time change: a new entry
    _, _, info = load_token_splits(str(root), Spy(), cache_dir=cache)
    assert info["cached"] is False and info["cache"] != base
    assert load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cached"] is True


def test_interrupted_write_leaves_no_partial_cache(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(token_cache, "BATCH_PIECES", 2)
    root = tmp_path / "docs"
    for i in range(10):
        write(root / f"{i:02d}.txt", f"doc {i} " * 20)
    with pytest.raises(token_cache.TokenizingInterrupted, match="interrupted .SIGINT. while tokenizing"):
        load_token_splits(str(root), Spy(fail_after=5), cache_dir=cache)
    assert cache_files(cache) == []
    _, _, info = load_token_splits(str(root), Spy(), cache_dir=cache)
    assert info["n_docs"] == 10 and leftovers(cache) == []
    with open(info["cache"][0] + ".json") as f:
        meta = json.load(f)
    assert meta["n_tokens"] * 2 == os.path.getsize(info["cache"][0])


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "envcache"))
    _, _, info = load_token_splits("stories", ByteTokenizer(), max_docs=20)
    assert info["cache"][0].startswith(str(tmp_path / "envcache"))


def test_uint32_for_large_vocabularies():
    assert token_cache.token_dtype(257) == np.uint16 and token_cache.token_dtype(65536) == np.uint16
    assert token_cache.token_dtype(65537) == np.uint32 and token_cache.token_dtype(100277) == np.uint32


def test_cache_dir_under_a_file_is_one_line(tmp_path):
    blocker = write(tmp_path / "file", "not a folder")
    for where in (blocker, blocker / "sub"):
        with pytest.raises(DataError, match="a file is in the way.* pass another --cache-dir") as e:
            load_token_splits("stories", ByteTokenizer(), max_docs=5, cache_dir=str(where))
        assert "\n" not in str(e.value)


def test_damaged_cache_is_detected_and_tokenized_again(tmp_path, cache, caplog):
    f = write(tmp_path / "a.txt", "words to be cached " * 30)
    train, val, info = load_token_splits(str(f), ByteTokenizer(), cache_dir=cache)
    good = both(train, val)
    path = info["cache"][0]
    with open(path, "r+b") as fh:  # overwrite some ids with 0xFFFF, far outside the 257-id vocabulary
        fh.seek(20)
        fh.write(b"\xff" * 8)
    spy = Spy()
    with caplog.at_level(logging.WARNING):
        train, val, info = load_token_splits(str(f), spy, cache_dir=cache)
    assert spy.calls > 0 and info["cached"] is False and both(train, val) == good
    assert "is damaged (it holds id 65535, the vocabulary has 257)" in caplog.text


def test_cache_and_its_metadata_follow_the_umask(tmp_path, cache):
    old = os.umask(0o022)
    try:
        _, _, info = load_token_splits("stories", ByteTokenizer(), max_docs=5, cache_dir=cache)
    finally:
        os.umask(old)
    for path in (info["cache"][0], info["cache"][0] + ".json"):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path


def test_an_edited_source_replaces_its_old_cache_entry(tmp_path, cache):
    root = tmp_path / "docs"
    for i in range(3):
        write(root / f"{i}.txt", f"document {i} " * 10)
    first = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cache"][0]
    fewer = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache, max_docs=2)[2]["cache"][0]
    write(root / "2.txt", "edited, and longer than it was " * 10)
    edited = load_token_splits(str(root), ByteTokenizer(), cache_dir=cache)[2]["cache"][0]
    entries = {n for n in os.listdir(cache) if n.endswith(".bin")}
    # the old version of the same files is gone; another selection of them (max_docs) is another entry and stays
    assert entries == {os.path.basename(edited), os.path.basename(fewer)} and first != edited


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path, cache):
    import fcntl

    os.makedirs(cache)
    stale, young, locked = (os.path.join(cache, f".e-{n}.bin.x{n}.tmp") for n in ("stale", "young", "locked"))
    for path in (stale, young, locked):
        open(path, "wb").close()
    long_ago = time.time() - 3600
    os.utime(stale, (long_ago, long_ago))
    os.utime(locked, (long_ago, long_ago))
    holder = open(locked, "rb")  # another writer, still alive, holds its lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        load_token_splits("stories", ByteTokenizer(), max_docs=5, cache_dir=cache)
    finally:
        holder.close()
    assert not os.path.exists(stale) and os.path.exists(young) and os.path.exists(locked)


SLOW_TOKENIZING = """
import sys, time
sys.path.insert(0, {root!r})
from minigpt import data, token_cache
from minigpt.tokenizer import ByteTokenizer

class Slow(ByteTokenizer):
    def encode_batch(self, texts):
        print("tokenizing", flush=True)
        time.sleep(0.2)
        return super().encode_batch(texts)

token_cache.BATCH_PIECES = 1
data.get_tokenizer = lambda name: Slow()
sys.exit(data.main([{corpus!r}, "--cache-dir", {cache!r}]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_tokenizing_removes_the_partial_file_and_says_so_in_one_line(tmp_path, cache, sig, code):
    root = tmp_path / "docs"
    for i in range(50):
        write(root / f"{i:02d}.txt", f"document {i} " * 5)
    script = SLOW_TOKENIZING.format(root=str(ROOT), corpus=str(root), cache=cache)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3):  # in the middle of writing the cache
        assert proc.stdout.readline().strip() == "tokenizing"
    assert leftovers(cache), "the temporary file should exist while tokenizing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1].startswith(f"interrupted ({sig.name}) while tokenizing")
    assert "Traceback" not in err
    assert cache_files(cache) == []


class _FullDisk:
    """A file whose writes fail as on a full disk, after ``room`` bytes."""

    def __init__(self, f, room: int, errno_: int):
        self.f, self.room, self.errno = f, room, errno_

    def write(self, b: bytes) -> int:
        if len(b) > self.room:
            raise OSError(self.errno, os.strerror(self.errno))  # as f.write raises it: no file name
        self.room -= len(b)
        return self.f.write(b)


def _disk_fills(monkeypatch, room: int, errno_: int = 28, suffix: str = ".bin") -> None:
    """Make the cache writer's files named ``*suffix`` fail after ``room`` bytes."""
    real = token_cache.atomic_open

    @contextlib.contextmanager
    def atomic_open(path):
        with real(path) as f:
            yield _FullDisk(f, room, errno_) if str(path).endswith(suffix) else f

    monkeypatch.setattr(token_cache, "atomic_open", atomic_open)


@pytest.mark.parametrize("suffix", [".bin", ".json"])
def test_a_full_disk_while_tokenizing_is_one_line_naming_the_folder(tmp_path, cache, monkeypatch, capsys, suffix):
    monkeypatch.setattr(token_cache, "BATCH_PIECES", 2)
    _disk_fills(monkeypatch, room=100, suffix=suffix)
    with pytest.raises(DataError) as e:
        load_token_splits("stories", ByteTokenizer(), max_docs=20, cache_dir=cache)
    message = str(e.value)
    assert message.startswith(f"cannot write the token cache in {cache}: the disk is full — nothing was cached")
    assert "--cache-dir" in message and "MINIGPT_CACHE" in message and "\n" not in message
    assert leftovers(cache) == [] and not any(n.endswith(".bin.json") for n in os.listdir(cache))
    assert data.main(["stories", "--max-docs", "20", "--tokenizer", "bytes", "--cache-dir", cache]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}"
    monkeypatch.undo()  # space again: the next run tokenizes from the start and succeeds
    _, _, info = load_token_splits("stories", ByteTokenizer(), max_docs=20, cache_dir=cache)
    assert info["cached"] is False and info["n_docs"] == 20


def test_a_file_size_limit_while_tokenizing_is_one_line(tmp_path, cache):
    """A real RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing it)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "minigpt.data", "stories", "--max-docs", "200", "--tokenizer",
                             "bytes", "--cache-dir", cache], cwd=ROOT, env=env, preexec_fn=limit,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot write the token cache in {cache}: a file-size limit was reached (see `ulimit -f`)")
    assert leftovers(cache) == [] and cache_files(cache) == []


def _start_slow_tokenizing(tmp_path, cache, n_docs: int) -> tuple[subprocess.Popen, str]:
    root = tmp_path / "docs"
    for i in range(n_docs):
        write(root / f"{i:02d}.txt", f"document {i} " * 5)
    script = SLOW_TOKENIZING.format(root=str(ROOT), corpus=str(root), cache=cache)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "tokenizing"  # it holds the entry's lock now
    return proc, str(root)


def test_a_second_process_waits_for_the_first_then_reads_its_cache(tmp_path, cache, caplog):
    proc, corpus = _start_slow_tokenizing(tmp_path, cache, n_docs=4)
    with caplog.at_level(logging.WARNING):
        train, val, info = load_token_splits(corpus, Spy(refuse=True), cache_dir=cache)  # waits, never tokenizes
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert info["cached"] is True and info["n_docs"] == 4
    assert f"waiting for process {proc.pid}, which is tokenizing the same data into {cache}" in caplog.text


def test_a_waiting_process_tokenizes_itself_when_the_first_one_is_killed(tmp_path, cache):
    import threading

    proc, corpus = _start_slow_tokenizing(tmp_path, cache, n_docs=30)
    spy, result = Spy(), {}
    waiter = threading.Thread(target=lambda: result.update(
        info=load_token_splits(corpus, spy, cache_dir=cache)[2]))
    waiter.start()
    time.sleep(0.5)
    assert spy.calls == 0  # still waiting
    proc.kill()  # kill -9: the kernel drops its lock
    proc.communicate(timeout=60)
    waiter.join(timeout=60)
    assert not waiter.is_alive() and spy.calls > 0 and result["info"]["n_docs"] == 30
