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

import numpy as np
import pytest

from kernels import explain, tiled
from kernels.definitions import future_mask

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
    error = float(re.search(r"^check: max \|O of the tiled loop - O of the float64 math \(.*\)\| = (\S+)$", out,
                            flags=re.M).group(1))
    assert error < 1e-12


def test_attention_prints_the_tiles_each_kernel_visits():
    result = _run("attention", "--T", "10")
    assert result.returncode == 0, result.stderr
    _check_attention_printout(result.stdout, 10, 10, 4, 2)  # the defaults: --block-m 4 --block-n 2


def test_attention_with_fewer_queries_and_dropout(capsys):
    explain.main(["attention", "--T", "12", "--Tq", "5", "--block-m", "2", "--block-n", "8", "--dropout", "0.2"])
    _check_attention_printout(capsys.readouterr().out, 5, 12, 2, 8)


# ----------------------------------------------------------------------------------------------------------------
# Dropout: the keep mask under each forward tile, and the rules it is drawn by


def _keep_from_philox(seed: int, Tq: int, Tk: int, p: float) -> np.ndarray:
    """(Tq, Tk) bool, True = kept, from the sentence of kernels/attention.py's "Dropout" section, one entry at a
    time: key seed (bh = 0), counter a * Tk + 8 * (j // 8), key 8g + r takes the 16 bits PHILOX_KEY_LAYOUT[r] (read
    off the kernel in tests/test_tiled.py), kept when the draw >= round(p * 2^16). Shares no code with the mask
    functions of kernels/tiled.py but philox4x32 itself (checked against tl.randint4x in tests/test_tiled.py)."""
    keep = np.zeros((Tq, Tk), dtype=bool)
    for i in range(Tq):
        a = Tk - Tq + i
        for j in range(Tk):
            words = tiled.philox4x32(seed, [a * Tk + 8 * (j // 8)])
            word, half = tiled.PHILOX_KEY_LAYOUT[j % 8]
            draw = (int(words[word][0]) >> (16 * half)) & 0xFFFF
            keep[i, j] = draw >= round(p * 2**16)
    return keep


KEEP_LINE = re.compile(r"^ {6}row +(\d+) \(a = +(\d+)\)  counters? ([\d, ]+?) +keep ([01. ]+?)  dropped: (.*)$")
STEP_LINE = re.compile(r"^ {4}keys +(\d+)(?:-(\d+))? (masked |no mask)  m_i = ")


def _printed_keep(out: str) -> list[tuple[int, int, list[int], list[int], str, str]]:
    """Every keep line of the printout: (row, a, counters, the step's keys, pattern, dropped)."""
    found, cols = [], None
    for line in out.splitlines():
        if step := STEP_LINE.match(line):
            first, last = int(step.group(1)), int(step.group(2) or step.group(1))
            cols = list(range(first, last + 1))
        elif keep := KEEP_LINE.match(line):
            row, a, counters, pattern, dropped = keep.groups()
            found.append((int(row), int(a), [int(c) for c in counters.split(", ")], cols, pattern, dropped))
    return found


@pytest.mark.parametrize("seed, T, Tq, block_m, block_n, p", [
    (0, 10, 10, 4, 8, 0.25),  # the command of the course: --dropout 0.25, --block-n 8 by default
    (3, 20, 7, 2, 16, 0.5),  # fewer queries than keys, two groups of 8 per tile, a tile cut short
    (11, 9, 9, 3, 8, 0.2),
])
def test_printed_keep_mask_is_the_kernels(seed, T, Tq, block_m, block_n, p, capsys):
    args = ["attention", "--T", str(T), "--Tq", str(Tq), "--block-m", str(block_m), "--dropout", str(p),
            "--seed", str(seed)]
    if block_n != 8:
        args += ["--block-n", str(block_n)]
    assert explain.main(args) == 0
    out = capsys.readouterr().out
    _check_attention_printout(out, Tq, T, block_m, block_n)
    expected = _keep_from_philox(seed, Tq, T, p)
    assert (expected == tiled.dropout_keep_mask(seed, 0, T, p, Tq=Tq)).all()
    lines = _printed_keep(out)
    # one line per row of every forward step's tile
    steps = tiled.attention_tile_grid("fwd", Tq, T, block_m, block_n) > 0
    assert len(lines) == sum(min(block_m, Tq - i * block_m) for i, j in zip(*np.nonzero(steps)))
    seen = np.zeros((Tq, T), dtype=bool)
    for row, a, counters, cols, pattern, dropped in lines:
        assert a == T - Tq + row
        assert counters == sorted({a * T + 8 * (j // 8) for j in cols})  # one Philox call per 8 keys
        marks = pattern.replace(" ", "")
        assert len(marks) == len(cols) and pattern.split(" ") == [marks[n:n + 8] for n in range(0, len(marks), 8)]
        for j, mark in zip(cols, marks):
            want = "." if j > a else "1" if expected[row, j] else "0"
            assert mark == want, f"row {row}, key {j}: printed {mark!r}, the kernel's mask says {want!r}"
            seen[row, j] = True
        assert dropped == (", ".join(str(j) for j, m in zip(cols, marks) if m == "0") or "none")
    assert seen[~future_mask(Tq, T).numpy()].all()  # every weight the forward uses was shown
    assert "0" in "".join(line[4] for line in lines)  # something was dropped: the case shows a dropout


def test_dropout_section_appears_with_dropout_and_not_without():
    with_dropout = _run("attention", "--dropout", "0.25")  # the student's command, as typed
    assert with_dropout.returncode == 0, with_dropout.stderr
    out = with_dropout.stdout
    assert "BLOCK_N=8 keys" in out  # --block-n defaults to 8 with --dropout
    assert "\nDropout p = 0.25, drawn as the kernels draw it" in out
    assert "tl.randint4x(seed + bh * 2^32, a * Tk + 8 * (j // 8))" in out
    assert "BLOCK_M * BLOCK_N / 8 = 4 * 8 / 8 = 4 Philox calls" in out
    assert "A key is kept when its draw >= round(p * 2^16) = 16384" in out
    assert "1 / (1 - p) = 1.33333" in out and "O = acc / l_i / (1 - p)" in out
    order = ", ".join(f"w{word} {'high' if half else 'low'}" for word, half in tiled.PHILOX_KEY_LAYOUT)
    assert order in " ".join(line.strip() for line in out.splitlines())
    assert _printed_keep(out)

    without = _run("attention", "--T", "10", "--block-n", "8")
    assert without.returncode == 0, without.stderr
    for words in ("Dropout", "Philox", "keep ", "dropped", "1 - p"):
        assert words not in without.stdout, words
    assert not _printed_keep(without.stdout)


def test_check_line_says_what_is_compared(capsys):
    explain.main(["attention", "--T", "9", "--dropout", "0.3"])
    out = capsys.readouterr().out
    check = out[out.index("\ncheck: "):].strip().splitlines()
    assert re.fullmatch(r"check: max \|O of the tiled loop - O of the float64 math \(causal mask, the same dropout "
                        r"mask, / \(1 - p\)\)\| = \d\.\d\de-\d\d", check[0])
    words = " ".join(line.strip() for line in check[1:])
    assert words == ("the tiled loop: attention_forward of kernels/tiled.py (the kernel's loop), run in float64 here "
                     "the float64 math: causal_attention_math of kernels/definitions.py, computed whole: "
                     "softmax(q k^T / sqrt(D), future masked) * keep / (1 - p) @ v, keep the Philox mask above "
                     "(dropped weights 0, kept ones / 0.7)")
    assert "softmax(q k^T) v computed whole" not in out

    explain.main(["attention", "--T", "9"])
    out = capsys.readouterr().out
    check = out[out.index("\ncheck: "):].strip().splitlines()
    assert re.fullmatch(r"check: max \|O of the tiled loop - O of the float64 math \(causal mask\)\| = "
                        r"\d\.\d\de-\d\d", check[0])
    assert " ".join(line.strip() for line in check[1:]).endswith(
        "computed whole: softmax(q k^T / sqrt(D), future masked) @ v")


# ----------------------------------------------------------------------------------------------------------------
# Packed documents: the tiles skipped because of them


def _allowed(Tq: int, lengths: list[int]) -> np.ndarray:
    """(Tq, Tk) bool from the lengths alone: query i (position Tk - Tq + i) sees key j when j <= its position and
    both lie in one run of the lengths."""
    doc = np.repeat(np.arange(len(lengths)), lengths)
    Tk = len(doc)
    pos = np.arange(Tk - Tq, Tk)
    return (np.arange(Tk)[None, :] <= pos[:, None]) & (doc[pos][:, None] == doc[None, :])


def _check_document_printout(out: str, lengths: list[int], Tq: int, block_m: int, block_n: int) -> None:
    T = sum(lengths)
    doc_ids = np.repeat(np.arange(len(lengths)), lengths)
    starts, ends = tiled.document_bounds(doc_ids)
    grids = {kernel: tiled.attention_tile_grid(kernel, Tq, T, block_m, block_n, doc_ids)
             for kernel in tiled.ATTENTION_KERNELS}
    causal = {kernel: tiled.attention_tile_grid(kernel, Tq, T, block_m, block_n) for kernel in tiled.ATTENTION_KERNELS}
    printed = _grids(out)
    assert printed == [explain.grid_marks(grids[kernel], causal[kernel]) for kernel in ("fwd", "dkdv", "dq")]
    # the marks against the pairs each tile holds, from the lengths alone
    allowed, future = _allowed(Tq, lengths), future_mask(Tq, T).numpy()
    for marks in printed:
        for i, row in enumerate(marks):
            for j, mark in enumerate(row):
                tile = (slice(i * block_m, (i + 1) * block_m), slice(j * block_n, (j + 1) * block_n))
                assert (mark in "-.") == (not allowed[tile].any()), (i, j, mark)  # skipped iff nothing to see
                if mark == "-":  # skipped because of the documents: the causal kernel would have work there
                    assert not future[tile].all(), (i, j)
    # each program's bounds, as the mirror computes them
    for start_m, (first_key, lo, hi) in enumerate(re.findall(r"^  start_m=\d+ .*\(first_key=(\d+), lo=(\d+), "
                                                             r"hi=(\d+)\)$", out, flags=re.M)):
        assert int(first_key) == tiled.forward_first_key(start_m, Tq, T, block_m, block_n, starts)
        assert (int(lo), int(hi)) == tiled.forward_key_bounds(start_m, Tq, T, block_m, block_n)
    rows = re.findall(r"^  start_n=\d+ .*\(lo=(\d+), mid=(\d+), last_row=(\d+)\)$", out, flags=re.M)
    assert [int(last) for _, _, last in rows] == [tiled.dkdv_last_row(n, Tq, T, block_m, block_n, ends)
                                                   for n in range(-(-T // block_n))]
    counts = re.search(r"^Tiles visited with these documents / without \(tiles_visited\): forward (\d+) / (\d+), "
                       r"dK/dV (\d+) / (\d+), dQ (\d+) / (\d+)$", out, flags=re.M).groups()
    assert [int(c) for c in counts] == [tiled.tiles_visited(kernel, Tq, T, block_m, block_n, docs)
                                        for kernel in tiled.ATTENTION_KERNELS for docs in (doc_ids, None)]
    assert len(re.findall(r"^\s+keys .* m_i = ", out, flags=re.M)) == int((grids["fwd"] != 0).sum())
    error = float(re.search(r"^check: max \|O of the tiled loop - O of the float64 math \(causal mask, documents.*\)"
                            r"\| = (\S+)$", out, flags=re.M).group(1))
    assert error < 1e-12


def test_docs_show_the_tiles_skipped_because_of_them():
    result = _run("attention", "--docs", "3,5,2")  # the course's command: T = 10 from the lengths
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Documents (--docs 3,5,2): 0: positions 0-2, 1: positions 3-7, 2: positions 8-9" in out
    _check_document_printout(out, [3, 5, 2], 10, 4, 2)
    # query tile 1 (rows 4-7) starts in document 1 (positions 3-7): key tile 0 skipped, key tile 1 masked by document
    assert "  start_m=1 (rows 4-7): key tiles skipped 0 | no causal mask 1 | causal mask 2, 3" in out
    assert "-" in "".join(_grids(out)[0][1]) and "m_i = [" in out and "-1e30" in out


@pytest.mark.parametrize("args, lengths, Tq, block_m, block_n", [
    (["--docs", "7,1,12,4", "--T", "24", "--Tq", "17", "--block-m", "4", "--block-n", "8"], [7, 1, 12, 4], 17, 4, 8),
    (["--docs", "5,5,6", "--block-m", "2", "--block-n", "4"], [5, 5, 6], 16, 2, 4),
    (["--docs", "9,3,8", "--block-m", "4", "--dropout", "0.3", "--seed", "2"], [9, 3, 8], 20, 4, 8),
])
def test_docs_with_other_shapes_and_dropout(args, lengths, Tq, block_m, block_n, capsys):
    assert explain.main(["attention", *args]) == 0
    out = capsys.readouterr().out
    _check_document_printout(out, lengths, Tq, block_m, block_n)
    if "--dropout" in args:  # a key of another document is masked whatever its draw: '.'
        doc = np.repeat(np.arange(len(lengths)), lengths)
        lines = _printed_keep(out)
        assert lines
        for row, a, _counters, cols, pattern, _dropped in lines:
            for j, mark in zip(cols, pattern.replace(" ", "")):
                assert (mark == ".") == (j > a or doc[j] != doc[a]), (row, j, mark)


@pytest.mark.parametrize("docs, extra, fix", [
    ("3,x,2", [], "not a whole number"),
    ("3,0,2", [], "at least 1"),
    ("3,-1,2", [], "at least 1"),
    ("2.5,3", [], "not a whole number"),
    ("", [], "empty"),
    ("3,5,2", ["--T", "12"], "sum to T"),
    ("200,100", [], "at most 256"),
])
def test_bad_docs_give_a_one_line_error(docs, extra, fix):
    with pytest.raises(SystemExit) as info:
        explain.main(["attention", "--docs", docs, *extra])
    message = str(info.value.code)
    assert message.startswith("error: --docs") and "—" in message and "\n" not in message and fix in message


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
