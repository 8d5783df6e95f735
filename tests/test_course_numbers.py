"""The figures COURSE.md's lessons 7, 10 and 11 and README.md's introduction state, each computed here on its own —
from the code (an operation count read off a kernel's source), from the formulas of kernels/costs.py and
kernels/chunked_loss.py, or from Python integers — and then looked for in the text. A sentence that no longer
matches its computation, or a computation that changed under its sentence, fails here.

Where a figure is a measurement (the README's 413 MiB), it is not recomputed: the test checks that the text cites the
figure the README records, and that the sizes the text says make it up come to it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from kernels.chunked_loss import LOGITS_CHUNK_BYTES, default_chunk_rows
from kernels.costs import gelu_bytes

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _flat(text: str) -> str:
    """The text with every run of white space (line breaks of wrapped paragraphs) as one space."""
    return " ".join(text.split())


def _lesson(n: int) -> str:
    """Lesson n of COURSE.md, from its heading to the next "## " heading, flattened."""
    text = (ROOT / "COURSE.md").read_text(encoding="utf-8")
    match = re.search(rf"^## Lesson {n} —.*?(?=^## )", text, re.S | re.M)
    assert match, f"COURSE.md has no lesson {n}"
    return _flat(match.group(0))


def _says(text: str, *phrases: str) -> None:
    missing = [p for p in phrases if p not in text]
    assert not missing, f"the text no longer says {missing}"


# ----------------------------------------------------------------------------------------------------------------
# README.md: how many lessons


def test_readme_counts_the_course_lessons():
    words = {10: "ten", 11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen"}
    lessons = re.findall(r"^## Lesson (\d+) ", (ROOT / "COURSE.md").read_text(encoding="utf-8"), re.M)
    intro = _flat((ROOT / "README.md").read_text(encoding="utf-8").split("\n## ")[0])
    _says(intro, f"[COURSE.md](COURSE.md)**: {words[len(lessons)]} lessons")


# ----------------------------------------------------------------------------------------------------------------
# Lesson 7: the Philox counter's bounds


def _max_counter(T: int) -> int:
    """The largest counter a * T + 8 * (j // 8) over query positions a and keys j below T (Python integers)."""
    return (T - 1) * T + 8 * ((T - 1) // 8)


def test_lesson7_counter_bounds():
    """int32 overflows first at T = 46341 (MAX_DROPOUT_T + 1); the counters stay below 2^32 up to T = 65536. (That
    the kernel's draws are distinct to 2^32 and wrap after it: tests/test_tiled.py, on the kernel.)"""
    from kernels.attention import MAX_DROPOUT_T

    first_past_int32 = next(T for T in range(46000, 47000) if _max_counter(T) >= 2**31)
    last_below_2_32 = max(T for T in range(65000, 66000) if _max_counter(T) < 2**32)
    assert (first_past_int32, last_below_2_32) == (MAX_DROPOUT_T + 1, 65536)
    _says(_lesson(7), f"at T = {first_past_int32} its largest value passes 2^31", f"(T <= {last_below_2_32})",
          f"`MAX_DROPOUT_T` = {MAX_DROPOUT_T}")


# ----------------------------------------------------------------------------------------------------------------
# Lesson 10: GELU's arithmetic intensity, counted from _gelu_fwd


FLOP_CALLS = {"exp2", "exp", "log2", "erf"}  # one operation each, as the lesson counts
OTHER_CALLS = {"abs", "where"}


def _count(node: ast.AST) -> tuple[int, int]:
    """(floating-point operations, other operations) in the code under ``node``: each +, -, *, / and each FLOP call
    one FLOP; each abs, where and comparison one other operation. Calls to kernel helpers are not entered."""
    flops = other = 0
    for n in ast.walk(node):
        if isinstance(n, ast.BinOp):
            assert isinstance(n.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)), ast.dump(n.op)
            flops += 1
        elif isinstance(n, ast.Compare):
            other += 1
        elif isinstance(n, ast.Call):
            name = n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id
            if name in FLOP_CALLS:
                flops += 1
            elif name in OTHER_CALLS:
                other += 1
            else:
                assert name == "_sigmoid_and_complement", f"an operation this count does not know: {name}"
    return flops, other


def _gelu_tanh_forward_ops() -> dict[str, tuple[int, int]]:
    """The operations of _gelu_fwd's tanh form per element, part by part, read off kernels/gelu.py's source."""
    tree = ast.parse((ROOT / "kernels" / "gelu.py").read_text(encoding="utf-8"))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    branch = next(n for n in ast.walk(functions["_gelu_fwd"])
                  if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TANH")
    u_line, sigmoid_line, y_line = branch.body
    assert [t.id for t in u_line.targets] == ["u"] and [t.id for t in y_line.targets] == ["y"]
    # the forward keeps the sigmoid's first result only (s, _ = ...): its complement is dead code, not counted
    (pair,) = sigmoid_line.targets
    assert [e.id for e in pair.elts] == ["s", "_"]
    (argument,) = sigmoid_line.value.args
    helper = functions["_sigmoid_and_complement"]
    *assigns, ret = helper.body
    sigmoid = [sum(c) for c in zip(*(_count(a) for a in assigns), _count(ret.value.elts[0]))]
    return {"u": _count(u_line), "2u": _count(argument), "sigmoid": tuple(sigmoid), "x * s": _count(y_line.value)}


def test_lesson10_gelu_operation_count_and_intensity():
    """12 FLOPs an element (5 for u, 1 for 2u, 5 in the sigmoid, 1 for x * s), 15 with the abs, compare and
    select; over gelu_bytes(1, b) = 2 b bytes: I = 1.5 (float32) and 3 (bf16), 1.9 and 3.8 counting all 15; the
    lesson's ridge 780 TFLOP/s / 4.3 TB/s = 181 FLOPs per byte, 50 to 120 times GELU's I."""
    parts = _gelu_tanh_forward_ops()
    assert parts == {"u": (5, 0), "2u": (1, 0), "sigmoid": (5, 3), "x * s": (1, 0)}
    flops = sum(f for f, _ in parts.values())
    ops = flops + sum(o for _, o in parts.values())
    assert (flops, ops) == (12, 15)

    ridge = 780e12 / 4.3e12
    intensity = {b: flops / gelu_bytes(1, b) for b in (4, 2)}
    intensity_all = {b: ops / gelu_bytes(1, b) for b in (4, 2)}
    assert gelu_bytes(1, 4) == 8 and gelu_bytes(1, 2) == 4
    assert intensity == {4: 1.5, 2: 3.0}
    assert (round(intensity_all[4], 1), round(intensity_all[2], 1)) == (1.9, 3.8)
    assert round(ridge, -1) == 180
    times_below = (ridge / max(intensity_all.values()), ridge / min(intensity.values()))
    assert (round(times_below[0], -1), round(times_below[1], -1)) == (50, 120)

    _says(_lesson(10), "with 4.3 TB/s and 780 TFLOP/s (bf16) the ridge is at about 180 FLOPs per byte",
          f"does {flops} floating-point operations per element",
          "(5 for u, 1 for 2u, a multiply, an exp2, an add, a divide and a multiply in the sigmoid, 1 for x * s)",
          f"{ops} with the sigmoid's abs, compare and select", "2 x 4 bytes per element in float32 and 2 x 2 in bf16",
          f"I = {flops} / 8 = 1.5 in float32 ({ops} / 8, about 1.9", f"{flops} / 4 = 3 in bf16 (about 3.8)",
          "50 to 120 times below the ridge")
    assert "below 1" not in _lesson(10)


# ----------------------------------------------------------------------------------------------------------------
# Lesson 11: what lives at the chunked loss's peak


def test_lesson11_peak_memory_sizes():
    """The sizes the lesson gives for the chunked loss at GPT-2 (C = 768, V = 50,257), float32: a chunk of 640 rows'
    logits (123 MiB, under LOGITS_CHUNK_BYTES = 128 MiB) whatever N; dW = V C 4 = 147 MiB whatever N; dX = N C 4,
    24 MiB at N = 8,192 and 48 MiB at 16 x 1024. dW + dX + two chunks (the torch rows step's logsumexp temporary)
    at N = 8,192 is 417 MiB, within 1% of the 413 MiB the README measured there (cited, not recomputed: the figure
    in README.md and benchmarks/README.md); the backward's 2 (dW + dX) is less. The plain formula's 4,711 MiB is
    the README's too; its logits at batch 16 are 3.3 GB."""
    C, V = 768, 50257
    rows = default_chunk_rows(16 * 1024, V)
    chunk = rows * V * 4
    assert LOGITS_CHUNK_BYTES == 128 * MiB and rows == 640 and chunk <= LOGITS_CHUNK_BYTES
    assert default_chunk_rows(8192, V) == default_chunk_rows(10**6, V) == rows  # whatever the batch
    dW = V * C * 4
    dX = {N: N * C * 4 for N in (8192, 16 * 1024)}
    assert (round(chunk / MiB), round(dW / MiB), dX[8192] / MiB, dX[16384] / MiB) == (123, 147, 24, 48)
    forward_peak = dW + dX[8192] + 2 * chunk
    assert round(forward_peak / MiB) == 417
    measured = 413
    assert abs(forward_peak / MiB - measured) / measured < 0.01
    assert 2 * (dW + dX[8192]) < forward_peak
    _says(_flat((ROOT / "README.md").read_text(encoding="utf-8")), f"{measured} MiB", "4,711 MiB")
    _says(_flat((ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")), f"({measured} against 4711 MiB)")
    assert round(16 * 1024 * V * 4 / 1e9, 1) == 3.3

    _says(_lesson(11), "16,384 x 50,257 floats: 3.3 GB in float32",
          "at most 128 MiB (`LOGITS_CHUNK_BYTES`: 640 rows at V = 50,257, 123 MiB) whatever the batch",
          "dW, (V, C) in float32, 50,257 x 768 x 4 bytes = 147 MiB", "N x C x 4 bytes in float32",
          "24 MiB at N = 8,192 rows, 48 MiB at 16 x 1024", f"The README measures {measured} MiB beyond the inputs",
          "dW + dX + two chunks is 417 MiB", "4,711 MiB for the plain formula")
    assert "the peak is one chunk" not in _lesson(11)
