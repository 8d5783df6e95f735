"""Files a run writes and reads: atomic writes, the temporary files they leave when killed, locks, and a quick
check that a download host answers.

Atomic write = write a temporary file in the same folder, flush, fsync, then ``os.replace`` it over the target. A
crash or Ctrl-C at any moment leaves either the old file or the new one, never a half-written one. Every file of a
run goes through ``atomic_open``: checkpoints (minigpt/checkpoint.py), metrics and plots, token caches.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import urlparse

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["STALE_AFTER_S", "atomic_open", "atomic_write", "can_reach", "check_writable", "exclusive_lock",
           "is_our_temp_name", "remove_stale_temps"]

# ---------------------------------------------------------------------------------------------------------------
# Atomic writes, and the temporary files a killed writer leaves
# ---------------------------------------------------------------------------------------------------------------

# A temporary file is named ".<target>.minigpt-<12 hex digits>.tmp" and its writer holds an exclusive lock on it until
# it is renamed or removed, so an unlocked one is a leftover of a process that died (kill -9, a power cut): see
# remove_stale_temps. The cleanup removes only names of exactly this form: the folder may be the user's, and a
# ".notes.tmp" of theirs is not ours to delete.
TEMP_MARKER = "minigpt-"
TEMP_SUFFIX = ".tmp"
TEMP_RANDOM_HEX = 12  # 48 random bits: two writers beside the same target never pick the same name in practice
STALE_AFTER_S = 10.0  # a temporary file younger than this is never removed (its writer may be about to lock it)

_TEMP_NAME = re.compile(rf"\..+\.{re.escape(TEMP_MARKER)}[0-9a-f]{{{TEMP_RANDOM_HEX}}}{re.escape(TEMP_SUFFIX)}")
# The older form, ".<target>.<random>.tmp" with tempfile.mkstemp's random part (a-z 0-9 _), is removed only when the
# target is a file minigpt writes: a run's checkpoint, weights, metrics and plots, a token cache's ".bin" and its
# ".json". Without a marker, the target's name is what tells ours apart.
_OLD_TEMP_NAME = re.compile(
    r"\.(?:checkpoint\.pt|model\.pth|metrics\.csv|loss\.pdf|loss\.png|.+\.bin|.+\.bin\.json)\.[a-z0-9_]+\.tmp"
)


def is_our_temp_name(name: str) -> bool:
    """Whether ``name`` is one that ``atomic_open`` gives its temporary files (or gave them in the older form)."""
    return bool(_TEMP_NAME.fullmatch(name) or _OLD_TEMP_NAME.fullmatch(name))


_umask_lock = threading.Lock()


def _new_file_mode(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would give: the existing file's, else 0666 minus the umask.
    (``mkstemp`` creates files 0600, and that mode would survive the rename.)"""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        with _umask_lock:  # the umask can only be read by setting it
            umask = os.umask(0o077)
            os.umask(umask)
        return 0o666 & ~umask


def _create_temp(path: Path) -> tuple[int, str]:
    """Create and open a new, empty temporary file beside ``path`` (mode 0600 until ``atomic_open`` sets it);
    returns ``(fd, its path)``. ``O_EXCL`` makes the creation fail rather than open a file that already exists."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # O_BINARY: Windows only
    while True:
        tmp = path.parent / f".{path.name}.{TEMP_MARKER}{secrets.token_hex(TEMP_RANDOM_HEX // 2)}{TEMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o600), str(tmp)
        except FileExistsError:
            continue


def _lock(fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a filesystem without locks: stale files are then kept, never harmed
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike):
    """Open a temporary binary file beside ``path``; on success it is synced and renamed over ``path``, on error
    removed. The one place every file of a run (checkpoints, metrics, plots, token caches) is written through.
    The file gets the permissions ``open()`` would give it (the umask's, or the replaced file's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        _lock(fd)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                os.replace(tmp, path)  # while the file is still open, and so still locked
        if fcntl is None:
            os.replace(tmp, path)  # Windows cannot rename an open file (and has no locks to keep)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name the target
            e.filename = str(path)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files that writers which died left in ``folder`` (see ``atomic_open``); returns their
    names. Only names ``atomic_open`` makes are considered (``is_our_temp_name``); one is stale when no process
    holds its lock and it is older than ``STALE_AFTER_S`` seconds, so a write in progress in another process is
    never touched. Without file locks (Windows) nothing is removed."""
    removed = []
    if fcntl is None:
        return removed
    try:
        names = [n for n in os.listdir(folder) if is_our_temp_name(n)]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < STALE_AFTER_S:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer lives
            os.unlink(path)
            removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a binary file object, then move the result over ``path`` in one step."""
    with atomic_open(path) as f:
        write(f)


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove one temporary file in ``folder``: raises the OSError (read-only filesystem, no permission)
    the first save would meet, before there is work to lose. The file is named as ``atomic_open`` names its own,
    so one left by a crash in between is removed like theirs (``remove_stale_temps``)."""
    fd, tmp = _create_temp(Path(folder) / "write-probe")
    os.close(fd)
    os.unlink(tmp)

# ---------------------------------------------------------------------------------------------------------------
# Locks: one process at a time
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, what: str, advice: str,
                   wait: Callable[[int | None], None] | None = None):
    """Hold an exclusive lock on ``lock_path`` (created if needed, holding the holder's pid) while the block runs.

    Only one process at a time gets it: another one gets ``Busy("<what> is in use by process <pid> — <advice>")``
    (``minigpt.checkpoint.Busy``)
    at once instead of waiting. The kernel drops the lock when its holder dies, however it dies (kill -9 too), so a
    lock file left behind never blocks a later run. Without file locks (Windows, some network filesystems) the
    block runs unguarded.

    ``wait`` (optional) makes a busy lock something to wait for instead: ``wait(pid)`` is called once, to say whom
    the caller waits for, then the call blocks until the holder lets go (or dies). For work a second process can
    reuse, such as a token cache entry the first one is writing.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                if wait is None:
                    from .checkpoint import Busy  # a CheckpointError, so the CLIs report it; checkpoint.py imports us
                    holder = f"process {pid}" if pid else "another process"
                    raise Busy(f"{what} is in use by {holder} — {advice}", pid) from None
                wait(pid)
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder lets go, however it ends
            except OSError:  # a filesystem without locks: run unguarded rather than not at all
                pass
        if _read_pid(fd) != os.getpid():  # the same process locking again writes nothing (its pid is there)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a process about to lock it)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Before a download: does the host answer?
# ---------------------------------------------------------------------------------------------------------------

PROBE_TIMEOUT_S = 3.0  # how long the quick reachability check waits before declaring a host unreachable
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def can_reach(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (name lookup included).

    The connection is tried on a daemon thread because a name lookup cannot be given a timeout; when a proxy is
    configured (HTTPS_PROXY, ALL_PROXY) the direct connection says nothing, so the answer is True.
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0]
