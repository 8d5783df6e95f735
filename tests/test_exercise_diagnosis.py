"""The checker teaches (exercises/check.py): a known wrong answer, written into a copy of an exercise's solution,
is named in the report; a NaN and a precision failure are named as such; every failing case is listed in one table;
and "fill in the blank" shows only while the blank's placeholder is still there.

Each test writes its lines between the markers of a copy of the solution file and checks that copy. Without a GPU
the kernels run in Triton's interpreter, on the checker's small shapes (about a second per check).
"""
from __future__ import annotations

import os
import textwrap

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from exercises.check import EXERCISES, prepare_device, run_check, split_at_markers  # noqa: E402
from exercises.checks.compare import NAN_HINT  # noqa: E402


@pytest.fixture(scope="module")
def device() -> str:
    return prepare_device()


def check_with(tmp_path, device, name: str, lines: str) -> tuple[bool, str]:
    """Check the solution of ``name`` with ``lines`` (dedented; indented like the solution's) in its blank."""
    exercise = EXERCISES[name]
    before, region, after = split_at_markers(exercise.path(solution=True).read_text(), exercise)
    first = next(line for line in region.splitlines() if line.strip())
    indent = first[:len(first) - len(first.lstrip())]
    path = tmp_path / f"{name}.py"
    path.write_text(before + textwrap.indent(textwrap.dedent(lines).strip() + "\n", indent) + after)
    return run_check(name, device=device, path=path)


def assert_diagnosed(report: str, diagnosis: str) -> None:
    headline, *rest = report.splitlines()
    assert headline.startswith("FAIL "), report
    assert rest and rest[0].strip().startswith(diagnosis), report


# ----------------------------------------------------------------------------------------------------------------
# Known wrong variants, each named

ATTENTION_SOLUTION = """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    m_i = m_new
"""

VARIANTS = [
    ("attention_forward_inner", "natural exp", "looks like natural exp where the kernel works in base 2: did you "
     "fold log2(e) into the scale?", ATTENTION_SOLUTION.replace("tl.math.exp2", "tl.exp")),
    ("attention_forward_inner", "no alpha", "looks like a missing alpha rescale: multiply both l_i and acc",
     ATTENTION_SOLUTION.replace("l_i * alpha", "l_i").replace("acc * alpha[:, None]", "acc")),
    ("attention_forward_inner", "no alpha on acc", "looks like a missing alpha rescale of acc",
     ATTENTION_SOLUTION.replace("acc * alpha[:, None]", "acc")),
    ("gelu_backward", "the other form", "looks like the derivative of the other GELU form (erf where tanh was "
     "asked)", """
        cdf = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2))
        pdf = tl.exp2(x * x * NEG_HALF_LOG2E) * INV_SQRT_2PI
        dydx = cdf + x * pdf
     """),
    ("gelu_backward", "a missing factor 2", "looks like the derivative without a factor 2 in the second term", """
        if TANH:
            u = (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI
            du = (1.0 + x * x * GELU_CUBIC * 3.0) * SQRT_2_OVER_PI
            s, one_minus_s = _sigmoid_and_complement(2.0 * u)
            dydx = s + x * s * one_minus_s * du
        else:
            cdf = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2))
            pdf = tl.exp2(x * x * NEG_HALF_LOG2E) * INV_SQRT_2PI
            dydx = cdf + x * pdf
     """),
    ("gelu_backward", "Phi alone", "looks like the first term of the product rule alone", """
        if TANH:
            s, one_minus_s = _sigmoid_and_complement(2.0 * (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI)
            dydx = s
        else:
            dydx = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2))
     """),
    ("layer_norm_dx", "no mean terms", "looks like dx without the mean terms", """
        dx = dy * w[None, :] * rstd[:, None]
     """),
    ("layer_norm_dx", "block size for width", "looks like the row sums divided by the block size BLOCK_C", """
        xhat = (x - mean[:, None]) * rstd[:, None]
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / BLOCK_C
        mean_g_xhat = tl.sum(g * xhat, axis=1) / BLOCK_C
        dx = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
     """),
    ("attention_delta", "rowsum of dO", "looks like the row sums of dO alone", """
        delta = tl.sum(do.to(tl.float32), 1)
     """),
    ("attention_delta", "rowsum of O", "looks like the row sums of O alone", """
        delta = tl.sum(o.to(tl.float32), 1)
     """),
    ("attention_delta", "a mean", "looks like a row mean, not a row sum", """
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) / HEAD_DIM
     """),
]


@pytest.mark.parametrize("name, variant, diagnosis, lines", VARIANTS, ids=[f"{v[0]}: {v[1]}" for v in VARIANTS])
def test_a_known_wrong_variant_is_named(tmp_path, device, name, variant, diagnosis, lines):
    passed, report = check_with(tmp_path, device, name, lines)
    assert not passed
    assert_diagnosed(report, diagnosis)


@pytest.mark.parametrize("name", sorted({variant[0] for variant in VARIANTS}))
def test_the_solution_written_into_a_copy_passes(tmp_path, device, name):
    _, region, _ = split_at_markers(EXERCISES[name].path(solution=True).read_text(), EXERCISES[name])
    assert check_with(tmp_path, device, name, region) == (True, f"PASS {name} (lesson {EXERCISES[name].lesson})")


# ----------------------------------------------------------------------------------------------------------------
# NaN, precision, the table, the hint


def test_a_nan_is_named(tmp_path, device):
    """The tile's own max where the running max belongs: a row whose keys in this tile are all in the future
    takes exp2(-inf - (-inf)) = NaN."""
    lines = ATTENTION_SOLUTION.replace("p = tl.math.exp2(s - m_new[:, None])",
                                       "p = tl.math.exp2(s - tl.max(s, 1)[:, None])")
    passed, report = check_with(tmp_path, device, "attention_forward_inner", lines)
    assert not passed
    assert_diagnosed(report, NAN_HINT)
    assert "nan (NaN)" in report


def test_a_precision_failure_is_named(tmp_path, device):
    """delta rounded to the input dtype before the store: exact enough in float32, not in float16."""
    passed, report = check_with(tmp_path, device, "attention_delta", """
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1).to(o.dtype)
    """)
    assert not passed
    assert_diagnosed(report, "a precision failure: the float32 cases pass and the float16 ones miss by at most")
    assert report.splitlines()[1].endswith("accumulate in float32?"), report
    assert "float32," not in report, report  # the table lists the float16 cases only


def test_every_failing_case_is_in_one_table_and_only_those(tmp_path, device):
    """The erf form for both: the float32 tanh cases fail, all three listed with max error and allowed; the erf
    ones pass, and so do the float16 tanh ones (the two forms differ by less than float16's bound)."""
    passed, report = check_with(tmp_path, device, "gelu_backward", """
        dydx = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2)) + x * tl.exp2(x * x * NEG_HALF_LOG2E) * INV_SQRT_2PI
    """)
    assert not passed
    headline, diagnosis, header, *rows = report.splitlines()
    assert "in 3 of 12 comparisons (dx)" in headline
    assert header.split() == ["output", "case", "max", "error", "allowed"]
    assert len(rows) == 3 and all("approximate='tanh', float32" in row for row in rows), report
    for row in rows:
        error, allowed = (float(cell) for cell in row.split()[-2:])
        assert error > allowed


def test_fill_in_the_blank_only_while_the_placeholder_is_there(tmp_path, device):
    passed, report = run_check("attention_delta", device=device)  # the blank as shipped
    assert not passed and report.splitlines()[0].endswith(" — fill in the blank in exercises/attention_delta.py")
    passed, report = check_with(tmp_path, device, "attention_delta", "delta = tl.sum(do.to(tl.float32), 1)")
    assert not passed
    assert "fill in the blank" not in report
    where = tmp_path / "attention_delta.py"
    assert report.splitlines()[0].endswith(f" — check your lines between the markers in {where} against the math in "
                                           "its docstring"), report


# ----------------------------------------------------------------------------------------------------------------
# layer_norm_forward, dropout_keep_mask, attention_forward and document_tile_bounds: each known wrong variant,
# written into a copy of the solution by editing its lines (a blank may span a kernel and its launcher), is named


def check_edited(tmp_path, device, name: str, edits: list[tuple[str, str]]) -> tuple[bool, str]:
    """Check the solution of ``name`` with each (old, new) of ``edits`` replaced in its region; each old must be
    there, so that no edit is vacuous."""
    exercise = EXERCISES[name]
    before, region, after = split_at_markers(exercise.path(solution=True).read_text(), exercise)
    for old, new in edits:
        assert old in region, f"{old!r} is not in the solution of {name}"
        region = region.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(before + region + after)
    return run_check(name, device=device, path=path)


LAYER_NORM_FORWARD_VARIANTS = [
    ("block size for width", "looks like the row sums divided by the block size BLOCK_C",
     [("/ width", "/ BLOCK_C")]),
    ("padding in the variance", "looks like a variance with the padded lanes in it",
     [("xc = tl.where(mask, x - mean[:, None], 0.0)", "xc = x - mean[:, None]")]),
    ("variance without the mean", "looks like a variance without the mean subtracted",
     [("var = tl.sum(xc * xc, axis=1) / width", "var = tl.sum(x * x, axis=1) / width")]),
    ("unbiased variance", "looks like the unbiased variance, divided by C - 1",
     [("var = tl.sum(xc * xc, axis=1) / width", "var = tl.sum(xc * xc, axis=1) / (width - 1)")]),
    ("eps outside the root", "looks like eps outside the square root",
     [("rstd = 1.0 / tl.sqrt(var + eps)", "rstd = 1.0 / (tl.sqrt(var) + eps)")]),
    ("no bias", "looks like y without the bias b", [(" + b[None, :]", "")]),
    ("no weight", "looks like y without the weight w", [(" * w[None, :]", "")]),
    ("arithmetic in float16", "looks like arithmetic in float16: the float32 cases pass and the float16 ones miss",
     [("x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)", "x = tl.load(X + offs, mask=mask, other=0.0)")]),
    ("unmasked load", NAN_HINT,  # the memory past the input holds NaN in the check
     [("x = tl.load(X + offs, mask=mask, other=0.0)", "x = tl.load(X + offs)")]),
]


@pytest.mark.parametrize("variant, diagnosis, edits", LAYER_NORM_FORWARD_VARIANTS,
                         ids=[v[0] for v in LAYER_NORM_FORWARD_VARIANTS])
def test_a_known_wrong_layer_norm_forward_is_named(tmp_path, device, variant, diagnosis, edits):
    passed, report = check_edited(tmp_path, device, "layer_norm_forward", edits)
    assert not passed
    assert_diagnosed(report, diagnosis)


FORWARD_VARIANTS = [
    ("natural exp", "looks like natural exp where the kernel works in base 2: did you fold log2(e) into the scale?",
     [("tl.math.exp2(s - m_new[:, None])", "tl.exp(s - m_new[:, None])"),
      ("tl.math.exp2(m_i - m_new)", "tl.exp(m_i - m_new)")]),
    ("no rescale of acc", "looks like a missing alpha rescale of acc",
     [("acc = acc * alpha[:, None]", "acc = acc")]),
    ("band one key short", "looks like the diagonal band one key short",
     [("tl.minimum(first + BLOCK_M, Tk), Tk,", "tl.minimum(first + BLOCK_M, Tk - 1), Tk,")]),
    ("no causal mask", "looks like no causal mask on the diagonal band",
     [('s = tl.where(q_pos[:, None] >= cols[None, :], s, float("-inf"))', "s = s")]),
    ("lse in natural log", "looks like the log-sum-exp in natural log",
     [("m_i + tl.math.log2(l_i)", "(m_i + tl.math.log2(l_i)) * 0.6931471805599453")]),
    ("lse mixing bases", "looks like m_i + ln(l_i)", [("m_i + tl.math.log2(l_i)", "m_i + tl.log(l_i)")]),
    ("no division by l", "looks like O = acc without the final division by l_i",
     [("acc = acc * out_scale[:, None]", "acc = acc")]),
]


@pytest.mark.parametrize("variant, diagnosis, edits", FORWARD_VARIANTS, ids=[v[0] for v in FORWARD_VARIANTS])
def test_a_known_mistake_of_the_whole_forward_is_named(tmp_path, device, variant, diagnosis, edits):
    passed, report = check_edited(tmp_path, device, "attention_forward", edits)
    assert not passed
    assert_diagnosed(report, diagnosis)


def test_layer_norm_forward_runs_rows_of_one_feature_once_the_others_pass(tmp_path, device, monkeypatch):
    """The unbiased variance divides by C - 1 = 0 on rows of one feature: named by the other rows, which fail, and
    not run there; run alone, those rows give the NaN, and only they are listed."""
    import exercises.checks.rows

    edits = [("var = tl.sum(xc * xc, axis=1) / width", "var = tl.sum(xc * xc, axis=1) / (width - 1)")]
    passed, report = check_edited(tmp_path, device, "layer_norm_forward", edits)
    assert not passed and "shape (5, 1)" not in report, report
    monkeypatch.setattr(exercises.checks.rows, "LAYER_NORM_FORWARD_CASES", [])
    passed, report = check_edited(tmp_path, device, "layer_norm_forward", edits)
    assert not passed
    assert_diagnosed(report, NAN_HINT)
    rows = report.splitlines()[3:]
    assert rows and all("shape (5, 1)" in row for row in rows), report


DROPOUT_VARIANTS = [
    ("keys counted from the tile", "looks like a counter with the keys counted from the tile's first",
     [("groups = first_key + 8 * tl.arange", "groups = 8 * tl.arange")]),
    ("queries counted from the tile", "looks like a counter with the queries counted from the tile's first",
     [("rows[:, None] * T", "tl.arange(0, BLOCK_R)[:, None] * T")]),
    ("counter local to the tile", "looks like a counter local to the tile",
     [("rows[:, None] * T", "tl.arange(0, BLOCK_R)[:, None] * T"),
      ("groups = first_key + 8 * tl.arange", "groups = 8 * tl.arange")]),
    ("query and key swapped", "looks like a counter with the query and the key swapped",
     [("rows[:, None] * T + groups[None, :]", "rows[:, None] + groups[None, :] * T")]),
    ("no head in the key", "looks like a key without the (batch, head) index",
     [("seed.to(tl.int64) + (bh.to(tl.int64) << 32)", "seed.to(tl.int64)")]),
    ("precedence of <<", "looks like the key (seed + bh) << 32",
     [("seed.to(tl.int64) + (bh.to(tl.int64) << 32)", "seed.to(tl.int64) + bh.to(tl.int64) << 32")]),
    ("seed + bh", "looks like the key seed + bh",
     [("seed.to(tl.int64) + (bh.to(tl.int64) << 32)", "seed.to(tl.int64) + bh.to(tl.int64)")]),
    ("halves word by word", "looks like the 16-bit halves given to the 8 keys of a group in another order (w0 low, "
     "w0 high", [("draws = tl.join(w01, w23)", "draws = tl.join(tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), "
                  "tl.join(w1 & 0xFFFF, w3 & 0xFFFF)), tl.join(tl.join(w0 >> 16, w2 >> 16), "
                  "tl.join(w1 >> 16, w3 >> 16)))")]),
    ("low halves first", "looks like the 16-bit halves given to the 8 keys of a group in another order (w0 low, "
     "w1 low", [("draws = tl.join(w01, w23)", "draws = tl.join(tl.join(tl.join(w0 & 0xFFFF, w0 >> 16), "
                 "tl.join(w2 & 0xFFFF, w2 >> 16)), tl.join(tl.join(w1 & 0xFFFF, w1 >> 16), "
                 "tl.join(w3 & 0xFFFF, w3 >> 16)))")]),
    ("kept below", "looks like kept where the draw is below the threshold", [(">= threshold", "< threshold")]),
    ("kept above", "looks like kept where the draw is above the threshold", [(">= threshold", "> threshold")]),
    ("threshold cut", "looks like a threshold p * 2^16 cut to an integer, not rounded",
     [("dropout_p * 65536.0 + 0.5", "dropout_p * 65536.0")]),
    ("compared with p", "looks like the 16-bit draw compared with p itself",
     [(">= threshold", ">= dropout_p")]),
]


@pytest.mark.parametrize("variant, diagnosis, edits", DROPOUT_VARIANTS, ids=[v[0] for v in DROPOUT_VARIANTS])
def test_a_known_wrong_dropout_keep_mask_is_named(tmp_path, device, variant, diagnosis, edits):
    passed, report = check_edited(tmp_path, device, "dropout_keep_mask", edits)
    assert not passed
    assert_diagnosed(report, diagnosis)


FIRST_KEY = "return int(doc_start[first]) // block_n * block_n"
LAST_ROW = "return max(mid, min(Tq, int(doc_end[last_key]) - (Tk - Tq)))"
DOCUMENT_TILE_VARIANTS = [
    ("first key not rounded", "looks like first_key not rounded down to a key tile",
     [(FIRST_KEY, "return int(doc_start[first])")]),
    ("first key rounded up", "looks like first_key rounded up to a key tile",
     [(FIRST_KEY, "return -(-int(doc_start[first]) // block_n) * block_n")]),
    ("a key tile's number", "looks like first_key as a key tile's number",
     [(FIRST_KEY, "return int(doc_start[first]) // block_n")]),
    ("the last row's document", "looks like the document of the tile's last row, not its first",
     [(FIRST_KEY, "return int(doc_start[min(first + block_m, Tk) - 1]) // block_n * block_n")]),
    ("rows without the offset", "looks like the tile's first row without the offset Tk - Tq",
     [("first = (Tk - Tq) + start_m * block_m", "first = start_m * block_m")]),
    ("the causal lo", "looks like the tile's own first position rounded down (lesson 5's lo)",
     [(FIRST_KEY, "return first // block_n * block_n")]),
    ("documents ignored", "looks like the documents ignored", [(FIRST_KEY, "return 0"), (LAST_ROW, "return Tq")]),
    ("one row short", "looks like one row short at the document's end",
     [(LAST_ROW, "return max(mid, min(Tq, int(doc_end[last_key]) - 1 - (Tk - Tq)))")]),
    ("one row past", "looks like one row past the document's end",
     [(LAST_ROW, "return max(mid, min(Tq, int(doc_end[last_key]) + 1 - (Tk - Tq)))")]),
    ("the first key's document", "looks like the document of the tile's first key, not its last",
     [("last_key = min((start_n + 1) * block_n, Tk) - 1", "last_key = start_n * block_n")]),
    ("doc_end without the offset", "looks like doc_end used as a row without the offset Tk - Tq",
     [(LAST_ROW, "return max(mid, min(Tq, int(doc_end[last_key])))")]),
    ("not kept at least mid", "looks like last_row not kept at least mid",
     [(LAST_ROW, "return min(Tq, int(doc_end[last_key]) - (Tk - Tq))")]),
    ("last row rounded up", "looks like last_row rounded up to a whole query tile",
     [(LAST_ROW, "return max(mid, min(Tq, -(-(int(doc_end[last_key]) - (Tk - Tq)) // block_m) * block_m))")]),
]


@pytest.mark.parametrize("variant, diagnosis, edits", DOCUMENT_TILE_VARIANTS,
                         ids=[v[0] for v in DOCUMENT_TILE_VARIANTS])
def test_a_known_wrong_document_tile_bound_is_named(tmp_path, device, variant, diagnosis, edits):
    passed, report = check_edited(tmp_path, device, "document_tile_bounds", edits)
    assert not passed
    assert_diagnosed(report, diagnosis)


def test_a_wrong_document_tile_bound_says_what_its_tile_does(tmp_path, device):
    """Each failing case's row names its first wrong tile and what the bound does there: the forward's tile that
    skips a key its rows see, the dK/dV tile that stops before a row that sees it; a float is refused as such."""
    passed, report = check_edited(tmp_path, device, "document_tile_bounds",
                                  [(FIRST_KEY, "return int(doc_start[first]) // block_n * block_n + block_n"),
                                   (LAST_ROW, "return mid")])
    assert not passed
    rows = report.splitlines()[2:]
    assert any(row.lstrip().startswith("first_key (forward, dQ)") and "skips key" in row for row in rows), report
    assert any(row.lstrip().startswith("last_row (dK/dV)") and "stops before row" in row for row in rows), report
    passed, report = check_edited(tmp_path, device, "document_tile_bounds",
                                  [(FIRST_KEY, "return doc_start[first] / block_n * block_n")])
    assert not passed and "forward_first_key returned" in report and "not an int" in report, report


@pytest.mark.parametrize("name", ["layer_norm_forward", "dropout_keep_mask", "attention_forward",
                                  "document_tile_bounds"])
def test_the_solution_copied_unedited_passes(tmp_path, device, name):
    assert check_edited(tmp_path, device, name, []) == (True, f"PASS {name} (lesson {EXERCISES[name].lesson})")
