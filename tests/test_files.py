"""The files a run writes: atomic writes, the temporary files a killed writer leaves, locks, the download probe."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from minigpt import files
from minigpt.checkpoint import Busy
from minigpt.files import STALE_AFTER_S, atomic_open, exclusive_lock, is_our_temp_name, remove_stale_temps

# Without file locks (Windows) the cleanup removes nothing and a lock guards nothing: nothing to test there.
needs_locks = pytest.mark.skipif(files.fcntl is None, reason="needs file locks (fcntl)")


def _age(path, seconds=3600.0):
    then = time.time() - seconds
    os.utime(path, (then, then))


@needs_locks
def test_the_cleanup_keeps_a_users_own_tmp_files(tmp_path):
    theirs = [".notes.tmp", ".notes.txt.abcd1234.tmp", ".checkpoint.pt.tmp", "notes.tmp", ".x.minigpt-0123.tmp"]
    for name in theirs:
        (tmp_path / name).write_text("a user's file")
        _age(tmp_path / name)
    assert remove_stale_temps(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == sorted(theirs)


@needs_locks
def test_a_stale_temporary_file_of_ours_is_removed_and_a_live_one_kept(tmp_path):
    target = tmp_path / "checkpoint.pt"
    with atomic_open(target) as f:
        f.write(b"being written")
        (name,) = os.listdir(tmp_path)  # the writer's own name for its temporary file, locked while it writes
        assert is_our_temp_name(name)
        _age(tmp_path / name)
        assert remove_stale_temps(tmp_path) == [] and (tmp_path / name).exists()
    assert os.listdir(tmp_path) == ["checkpoint.pt"]

    # the same name left behind by a writer that died: nobody holds its lock
    (tmp_path / name).write_bytes(b"half a checkpoint")
    young = tmp_path / ".model.pth.minigpt-00000000beef.tmp"
    young.write_bytes(b"its writer may be about to lock it")
    _age(young, STALE_AFTER_S / 2)
    older_form = tmp_path / ".metrics.csv.a1b2_c3d.tmp"  # tempfile.mkstemp's random part
    older_form.write_bytes(b"")
    _age(tmp_path / name)
    _age(older_form)
    assert sorted(remove_stale_temps(tmp_path)) == sorted([name, older_form.name])
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", young.name])
    assert target.read_bytes() == b"being written"


def _hold_lock_in_child(lock_path):
    """A second process that takes the lock and keeps it until its stdin closes; returns it once it holds it."""
    code = ("import sys\nfrom minigpt.files import exclusive_lock\n"
            f"with exclusive_lock({str(lock_path)!r}, 'x', 'y'):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@needs_locks
def test_a_lock_held_by_another_process_is_refused_naming_its_pid(tmp_path):
    lock = tmp_path / ".minigpt.lock"
    child = _hold_lock_in_child(lock)
    try:
        with pytest.raises(Busy) as e:
            with exclusive_lock(lock, f"the out-dir {tmp_path}", "wait for it or pass another --out-dir"):
                pytest.fail("two processes held the same lock")
        assert e.value.pid == child.pid
        assert str(e.value) == (f"the out-dir {tmp_path} is in use by process {child.pid} — wait for it or pass "
                                "another --out-dir")
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    with exclusive_lock(lock, "x", "y"):  # its holder gone, the lock is free again (the file itself stays)
        assert lock.read_text().strip() == str(os.getpid())


@needs_locks
def test_a_lock_whose_holder_was_killed_is_free(tmp_path):
    lock = tmp_path / ".minigpt.lock"
    child = _hold_lock_in_child(lock)
    child.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the lock with the process
    child.wait(timeout=30)
    with exclusive_lock(lock, "x", "y"):
        pass


def test_can_reach_local_ports(monkeypatch):
    for var in files._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert files.can_reach(f"https://127.0.0.1:{port}/x", timeout=2.0)
    start = time.perf_counter()
    assert not files.can_reach(f"https://127.0.0.1:{port}/x", timeout=2.0)  # closed now: refused at once
    assert time.perf_counter() - start < 2.0
