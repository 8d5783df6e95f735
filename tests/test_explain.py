"""`python -m kernels.explain`: it runs, prints the schedule of kernels/tiled.py, and refuses bad input in one line.

The printout is for people, so it is not compared with a recorded text: the tests check that the tile grids it
draws are the ones ``attention_tile_grid`` computes, and that the numbers it checks against plain math are small.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import explain, tiled

ROOT = Path(__file__).resolve().parents[1]
MARKS = explain.GRID_MARKS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernels.explain", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _grids(text: str) -> list[list[str]]:
    """The tile grids of the printout, each as its rows of marks."""
    grids, current = [], None
    for line in text.splitlines():
        if "query tile \\ key tile" in line:
            current = []
            grids.append(current)
        elif current is not None and re.match(r"\s+\d+ \(rows", line):
            current.append("".join(line.split(")", 1)[1].split()))
        else:
            current = None
    return grids


def _expected(kernel, Tq, Tk, block_m, block_n) -> list[str]:
    grid = tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n)
    return ["".join(MARKS[int(c)] for c in row) for row in grid]


def _check_attention_printout(out: str, Tq: int, Tk: int, block_m: int, block_n: int) -> None:
    assert "tiles" in out and "m_i" in out and "l_i" in out
    assert _grids(out) == [_expected(kernel, Tq, Tk, block_m, block_n) for kernel in ("fwd", "dkdv", "dq")]
    # one line of running statistics per forward loop step
    steps = int((tiled.attention_tile_grid("fwd", Tq, Tk, block_m, block_n) > 0).sum())
    assert len(re.findall(r"^\s+keys .* m_i = ", out, flags=re.M)) == steps
    error = float(re.search(r"computed whole\| = (\S+)", out).group(1))
    assert error < 1e-12


def test_attention_prints_the_tiles_each_kernel_visits():
    result = _run("attention", "--T", "10")
    assert result.returncode == 0, result.stderr
    _check_attention_printout(result.stdout, 10, 10, 4, 2)  # the defaults: --block-m 4 --block-n 2


def test_attention_with_fewer_queries_and_dropout(capsys):
    explain.main(["attention", "--T", "12", "--Tq", "5", "--block-m", "2", "--block-n", "8", "--dropout", "0.2"])
    _check_attention_printout(capsys.readouterr().out, 5, 12, 2, 8)


def test_layer_norm_prints_groups_and_steps():
    result = _run("layer_norm", "--rows", "9", "--width", "3", "--groups", "4", "--block-m", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    groups = tiled.layer_norm_groups(9, 4, block_m=2)  # [[0..3], [4..7], [8]]
    assert f"{len(groups)} used" in out
    for g, rows in enumerate(groups):
        label = f"{rows[0]}-{rows[-1]}" if len(rows) > 1 else f"{rows[0]}"
        assert f"group {g} (rows {label}): partial dw" in out
    errors = re.search(r"dx, dw, db = (.*)$", out, flags=re.M).group(1).split(", ")
    assert len(errors) == 4 and all(float(e) < 1e-12 for e in errors)


@pytest.mark.parametrize("args", [
    ("attention", "--T", "0"),
    ("attention", "--T", "8", "--Tq", "9"),
    ("attention", "--block-n", "4", "--dropout", "0.1"),
    ("attention", "--dropout", "1.5"),
    ("layer_norm", "--groups", "0"),
    ("layer_norm", "--rows", "100000"),
])
def test_bad_arguments_give_a_one_line_error(args, capsys):
    with pytest.raises(SystemExit) as info:
        explain.main(list(args))
    message = str(info.value.code)
    assert message.startswith("error: ") and "—" in message and "\n" not in message


def test_bad_arguments_exit_without_a_traceback(capsys):
    result = _run("attention", "--Tq", "20")  # from the shell: our check, exit status 1, one line on stderr
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: --Tq 20")
    with pytest.raises(SystemExit) as info:  # argparse's own checks: exit status 2, usage then the error
        explain.main(["attention", "--T", "ten"])
    assert info.value.code == 2 and "invalid int value" in capsys.readouterr().err.strip().splitlines()[-1]


def test_help_and_no_work_at_import(capsys):
    with pytest.raises(SystemExit) as info:
        explain.main(["attention", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--block-m" in out and "--Tq" in out
    importlib.reload(explain)
    assert capsys.readouterr() == ("", "")


def test_output_closed_early_ends_quietly():
    """`python -m kernels.explain attention --T 50 | head -1`: no BrokenPipeError traceback, the status a pipe's
    reader stopping gives (141), nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "kernels.explain", "attention", "--T", "50"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"Causal attention: Tq=50")
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b""


def test_output_to_a_full_device_is_one_line():
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "kernels.explain", "layer_norm"], cwd=ROOT, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: No space left on device: standard output — free some disk "
                                          "space or write somewhere else"]


def test_a_seed_beyond_64_bits_is_refused_in_one_line():
    for op in ("attention", "layer_norm"):
        with pytest.raises(SystemExit) as info:
            explain.main([op, "--seed", str(2**64)])
        assert str(info.value.code).startswith(f"error: --seed {2**64} does not fit in 64 bits — ")
    assert explain.main(["layer_norm", "--rows", "2", "--width", "2", "--seed", str(2**64 - 1)]) == 0
