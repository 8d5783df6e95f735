"""The edge of every command-line tool of the project: a user's mistake or the machine's refusal is one line.

Each tool's ``main`` runs its work through ``run_cli``. Inside, errors are ordinary exceptions; at this boundary

- the project's own errors (``MinigptError`` and its kinds: a bad flag, a damaged checkpoint, ...) print
  ``error: <message>`` and exit 1 — their messages already say what to do;
- an ``OSError`` (a full disk, a read-only folder, a file-size limit, a missing file) prints what happened to
  which file and what to try, and exits 1;
- standard output closed early (``... | head``) ends the tool quietly with 141 (128 + SIGPIPE, what the shell
  reports for a program the pipe stopped), instead of a ``BrokenPipeError`` traceback; standard output that cannot
  be written (``> /dev/full``) is named as such, since that error carries no file name of its own;
- Ctrl-C prints ``interrupted`` (or what the tool says was kept) and exits 130; an interruption that carries a
  ``signum`` (a SIGTERM a tool turned into an exception) exits 128 + that signal, as the shell expects.

This module is shared by ``kernels``, ``minigpt``, ``benchmarks`` and ``exercises``; it imports nothing of theirs
but ``kernels.errors``.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Callable

from .errors import MinigptError

# What to try after the OSErrors a user can meet; the message always names the file the system named.
OS_ADVICE = {
    errno.ENOSPC: "free some disk space or write somewhere else",
    errno.EDQUOT: "free some of your disk quota or write somewhere else",
    errno.EFBIG: "a file-size limit was reached (see `ulimit -f`): raise it or write smaller files",
    errno.EROFS: "the filesystem is read-only: write to another folder",
    errno.EACCES: "no permission: write to a folder you own, or fix its permissions",
    errno.EPERM: "no permission: write to a folder you own, or fix its permissions",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "that is a folder: pass a file inside it",
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what happened, to which file, and what to try."""
    what = e.strerror or str(e) or type(e).__name__
    where = f": {e.filename}" if e.filename is not None else ""
    advice = OS_ADVICE.get(e.errno)
    return f"{what}{where}" + (f" — {advice}" if advice else "")


class _MarkedStdout:
    """``sys.stdout`` while a tool works: an OSError raised writing it is marked ``from_stdout``. A full disk behind
    ``> out.txt`` and one behind the tool's own files raise the same error, without a file name; the mark is what
    tells "your redirected output" from "the tool's file" apart, and a closed pipe apart from any other."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            e.from_stdout = True
            raise

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as e:
            e.from_stdout = True
            raise

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self._stream, name)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not report the broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (a test's capture)
        pass


def run_cli(body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = (),
            interrupted: str = "interrupted", kept: Callable[[], str | None] | None = None) -> int:
    """Run ``body()``, the tool's work, and turn what escapes it into one line and an exit status (see the module's
    docstring).

    ``errors``: exception types printed as ``error: <message>`` besides ``MinigptError``, which always is.
    ``interrupted``: the line printed on Ctrl-C. ``kept`` (optional): called after an OSError, returns a line saying what was kept (e.g. "the last
    good checkpoint is kept in out/"), or None. Returns ``body()``'s status (None counts as 0); the caller passes it
    to ``sys.exit``.
    """
    real_stdout = sys.stdout
    sys.stdout = _MarkedStdout(real_stdout)
    try:
        status = body()
        sys.stdout.flush()  # a closed or full stdout shows here, inside the boundary, not at exit
        return status or 0
    except KeyboardInterrupt as e:
        _print_err(f"\n{interrupted}")
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    except (MinigptError, *errors) as e:
        _print_err(f"error: {e}")
        return 1
    except OSError as e:
        return _os_error(e, kept)
    finally:
        sys.stdout = real_stdout


def _os_error(e: OSError, kept: Callable[[], str | None] | None) -> int:
    from_stdout = getattr(e, "from_stdout", False)
    if from_stdout and isinstance(e, BrokenPipeError):
        _quiet_stdout()  # the reader stopped reading (``| head``): not an error, nothing to say
        return 141
    if from_stdout:
        _quiet_stdout()  # what is still buffered would fail again at exit
        e = OSError(e.errno, e.strerror, "standard output")  # the name the error lacks
    else:
        _flush_or_quiet()
    note = kept() if kept is not None else None
    _print_err(f"error: {os_error_line(e)}" + (f"; {note}" if note else ""))
    return 1


def _flush_or_quiet() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _quiet_stdout()


def _print_err(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed too: the exit status is all that is left
        pass
