"""kernels/cli.py's ``run_cli``, the edge every command-line tool shares: what escapes a tool's work becomes one
line and an exit status. Where the behaviour depends on real file descriptors (a pipe closed by its reader, a full
device, a signal) the tool runs in a child process; the rest runs here."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernels.cli import os_error_line, run_cli

ROOT = Path(__file__).resolve().parents[1]

# A tool that prints N lines through run_cli (then, with "sleep", waits to be interrupted).
TOOL = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from kernels.cli import run_cli

    def body():
        for i in range(int(sys.argv[1])):
            print("line", i)
        if sys.argv[2:] == ["sleep"]:
            print("ready", flush=True)
            time.sleep(60)

    sys.exit(run_cli(body))
""").format(root=str(ROOT))


def _tool(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TOOL, *args], stdout=stdout, stderr=subprocess.PIPE)


def test_a_pipe_closed_by_its_reader_ends_quietly_with_141():
    proc = _tool("200000")  # far more than a pipe holds: the writer meets the closed end
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141
    assert err == b""  # no traceback, no "Exception ignored" at exit


@pytest.mark.parametrize("lines", ["3", "200000"])  # failing at the final flush, and in the middle of the work
def test_a_full_output_device_is_one_line_naming_the_output(lines):
    with open("/dev/full", "w") as full:
        proc = _tool(lines, stdout=full)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.decode().splitlines() == [
        "error: No space left on device: standard output — free some disk space or write somewhere else"]


def test_ctrl_c_is_one_line_and_130():
    proc = _tool("1", "sleep")
    assert proc.stdout.readline() == b"line 0\n" and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.decode().strip() == "interrupted"


def test_an_interruption_carrying_a_signal_exits_128_plus_it(capsys):
    def body():
        stop = KeyboardInterrupt("received signal 15")
        stop.signum = signal.SIGTERM  # a SIGTERM turned into an exception (benchmarks/common.py's Terminated)
        raise stop

    assert run_cli(body, interrupted="interrupted: the rows so far are kept") == 143
    assert capsys.readouterr().err.strip() == "interrupted: the rows so far are kept"


def test_an_os_error_names_the_file_and_what_to_do(tmp_path, capsys):
    missing = tmp_path / "no-such-folder" / "x.txt"
    assert run_cli(lambda: open(missing)) == 1
    assert capsys.readouterr().err == f"error: No such file or directory: {missing} — check the path\n"

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "out/checkpoint.pt")

    assert run_cli(full_disk, kept=lambda: "the last good checkpoint is kept in out/") == 1
    assert capsys.readouterr().err == ("error: No space left on device: out/checkpoint.pt — free some disk space or "
                                       "write somewhere else; the last good checkpoint is kept in out/\n")


def test_a_broken_pipe_that_is_not_the_output_is_an_error(capsys):
    """Only the tool's own standard output closed by its reader is quiet; a pipe to anything else that breaks is
    a failure to report."""
    def body():
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")  # e.g. writing to a child process that died

    assert run_cli(body) == 1
    assert capsys.readouterr().err == "error: Broken pipe\n"


def test_the_tools_own_errors_are_one_line_and_others_pass_through(capsys):
    class ToolError(ValueError):
        pass

    def bad_value():
        raise ToolError("--x must be positive, got -1 — e.g. --x 2")

    assert run_cli(bad_value, errors=(ToolError,)) == 1
    assert capsys.readouterr().err == "error: --x must be positive, got -1 — e.g. --x 2\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not the user's mistake: its traceback is kept
        run_cli(lambda: 1 / 0, errors=(ToolError,))


def test_every_project_error_is_a_minigpt_error_and_one_line(capsys):
    """Every exception class the project defines for a user's problem derives from MinigptError, so every tool's
    run_cli prints it as one line without naming it; the few that are not a user's problem are listed here."""
    import ast
    import importlib

    from kernels.errors import MinigptError

    not_user_errors = {
        "TokenizingInterrupted",  # an interruption: exits 128 + the signal
        "SourceUnavailable",  # caught inside the data pipeline, which falls back to the generated stories
        "Mismatch",  # the exercise checker's verdict, reported by it with its diagnosis
    }
    found = {}
    for folder in ("minigpt", "kernels", "benchmarks", "exercises"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                        getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases):
                    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                    found[node.name] = module
    assert {"ConfigError", "CheckpointError", "DataError", "TokenizerError", "BackendUnavailable",
            "BenchmarkError", "NonFiniteLoss", "PretrainedError"} <= set(found)
    for name, module in found.items():
        if name in not_user_errors:
            continue
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, MinigptError), f"{module}.{name} is not a MinigptError"

    from minigpt.config import ConfigError

    def bad_config():
        raise ConfigError("emb_dim 100 is not divisible by n_heads 3 — pick n_heads dividing emb_dim")

    assert run_cli(bad_config) == 1  # no errors= needed
    assert capsys.readouterr().err == "error: emb_dim 100 is not divisible by n_heads 3 — pick n_heads dividing emb_dim\n"


def test_status_and_stdout_are_given_back(capsys):
    stdout = sys.stdout
    assert run_cli(lambda: print("out") or 3) == 3 and run_cli(lambda: None) == 0
    assert sys.stdout is stdout and capsys.readouterr().out == "out\n"


def test_os_error_line_without_a_file_name_or_advice():
    assert os_error_line(OSError(errno.EIO, "Input/output error")) == "Input/output error"
    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == (
        "Read-only file system: /ro/x — the filesystem is read-only: write to another folder")


def test_a_full_output_still_says_what_was_kept(capsys):
    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    def body():
        sys.stdout.write("a step's progress line")

    real = sys.stdout
    sys.stdout = Full()  # run_cli wraps whatever stdout is when it starts
    try:
        status = run_cli(body, kept=lambda: "the last good checkpoint is kept in out/")
    finally:
        sys.stdout = real
    assert status == 1
    assert capsys.readouterr().err == ("error: No space left on device: standard output — free some disk space or "
                                       "write somewhere else; the last good checkpoint is kept in out/\n")


def test_every_flag_of_every_command_line_is_in_its_readme():
    """README.md documents minigpt.train's and minigpt.generate's flags, benchmarks/README.md the benchmarks'."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    readmes = {"README.md": ("minigpt.train", "minigpt.generate"),
               "benchmarks/README.md": ("benchmarks.kernels", "benchmarks.train", "benchmarks.generate",
                                        "benchmarks.profile")}
    for readme, modules in readmes.items():
        text = (root / readme).read_text(encoding="utf-8")
        for module in modules:
            parser = importlib.import_module(module).build_parser()
            flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
            missing = [f for f in flags if f"`{f}" not in text]
            assert not missing, f"{readme} does not name {module}'s {missing}"


def test_another_package_named_kernels_first_on_the_path_is_named_with_the_fix(tmp_path):
    # Hugging Face's `kernels` (which transformers >= 5.25 installs) takes our top-level package's name: a stand-in for
    # it, first on the path, must give one message that names it and the way out, not a failure deep in an import
    other = tmp_path / "elsewhere" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("def get_kernel(name):\n    pass\n")
    env = {**os.environ, "PYTHONPATH": f"{other.parent}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "minigpt.train", "--help"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and str(other / "__init__.py") in last and "pip uninstall kernels" in last, \
        proc.stderr[-2000:]
    # our own package first: the same command works
    ours = subprocess.run([sys.executable, "-m", "minigpt.train", "--help"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0 and "--kernels" in ours.stdout, ours.stderr[-2000:]
