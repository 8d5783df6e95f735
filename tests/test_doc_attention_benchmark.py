"""The ``doc_attention`` rows of ``python -m benchmarks.kernels`` (benchmarks/ops/doc_attention.py): the quick run
checks every contender it can against float64, the work counted is the pairs the documents allow, and the tiles
reported are the ones that hold such pairs — counted here by brute force, pair by pair, not by the kernels' mirror.
"""
import numpy as np
import pytest
import torch

from benchmarks import kernels as kernel_bench
from benchmarks import run_all
from benchmarks.ops import doc_attention as op
from kernels.attention_tiles import GPU_TILES, tiles_for
from kernels.definitions import causal_attention_math
from tests.test_benchmarks import read_outputs, run_quick


def allowed(T: int, L: int | None) -> np.ndarray:
    """(T, T) bool: query i may see key j — j <= i and, with documents of L tokens (the last one shorter when L
    does not divide T), the same document."""
    i = np.arange(T)
    mask = i[None, :] <= i[:, None]
    if L is not None:
        doc = i // L
        mask &= doc[:, None] == doc[None, :]
    return mask


def tiles_holding_pairs(T: int, L: int | None, block_m: int, block_n: int) -> int:
    """How many (block_m, block_n) tiles of the (T, T) grid hold at least one allowed pair."""
    rows, cols = -(-T // block_m) * block_m, -(-T // block_n) * block_n
    padded = np.zeros((rows, cols), dtype=bool)
    padded[:T, :T] = allowed(T, L)
    return int(padded.reshape(rows // block_m, block_m, cols // block_n, block_n).any(axis=(1, 3)).sum())


def test_quick_run_checks_against_float64_and_reports_tiles(tmp_path):
    proc = run_quick("benchmarks.kernels", "cpu", tmp_path, "--op", "doc_attention")
    data, _ = read_outputs(tmp_path, "kernels")
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"doc_attention"}
    shapes = {tuple(map(int, r["shape"].split("x"))) for r in rows}
    assert {(s[2], s[4]) for s in shapes} == {(64, 16), (64, 32), (128, 16), (128, 32)}
    for r in rows:
        where = f"{r['shape']} {r['contender']} {r['pass']}: {r['status']}"
        B, H, T, D, L = map(int, r["shape"].split("x"))
        per_pair = {"fwd": 4 * D, "bwd": 10 * D, "fwd+bwd": 14 * D}[r["pass"]]
        assert r["flops"] == B * H * allowed(T, L).sum() * per_pair, where
        # the interpreter's tiles, and every kernel of the pass visits exactly the tiles holding allowed pairs
        tiles = tiles_for(torch.bfloat16, D, T, T, interpreting=True)
        kernels = op.KERNELS[r["pass"]]
        assert r["tiles_visited"] == sum(tiles_holding_pairs(T, L, *tiles[k][0][:2]) for k in kernels), where
        assert r["tiles_causal"] == sum(tiles_holding_pairs(T, None, *tiles[k][0][:2]) for k in kernels), where
        assert r["tile_sizes"].endswith("(interpreter)") and r["tiles"].startswith(
            f"{r['tiles_visited']}/{r['tiles_causal']} "), where
        if r["contender"] == "flex":  # no backward on the CPU, and compiling is too slow for --quick anyway
            assert r["status"].startswith("skipped: ") and r["ms"] is None, where
            continue
        assert r["checked"] is True and r["check_error"] < kernel_bench.TOLERANCE["bf16"], where
        # the plain causal kernel computes another function: it is held to the plain causal definition
        assert ("against the causal definition" in r["check"]) == (r["contender"] == "triton_causal"), where
        if r["contender"] == "sdpa_mask":
            assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0, where
        else:
            assert r["status"] == "not timed (interpreter)" and r["ms"] is None, where
    # at T = 128 the interpreter's forward holds all 128 queries in one (128, 64) tile: its first row's document
    # starts at 0, so both key tiles are visited, as by the causal kernel — nothing to skip at this size (the GPU's
    # counts for the full sweep, in the notes, are where the skipping shows)
    assert {r["tiles"] for r in rows if r["pass"] == "fwd" and r["size"] == 128} == {"2/2 (1.000): fwd 2/2"}
    # the full sweep's counts with a GPU's default tiles, printed and kept, whatever the run's own sizes: each line
    # is T, L, then each kernel's "visited/causal (ratio)"
    notes = data["meta"]["notes"]["doc_attention"]
    defaults = {k: GPU_TILES[("16bit", "D<=64")][k][0][:2] for k in ("fwd", "dkdv", "dq")}
    table = {tuple(map(int, line.split()[:2])): line.split()[2::2] for line in notes if line.split()[0].isdigit()}
    assert set(table) == {(T, L) for T in (1024, 4096) for L in (128, 256, 512)}
    for (T, L), cells in table.items():
        assert cells == [f"{tiles_holding_pairs(T, L, *b)}/{tiles_holding_pairs(T, None, *b)}"
                         for b in defaults.values()], (T, L)
    assert all(line in proc.stdout for line in notes)
    summary = kernel_bench.summarize(data)
    assert "triton checked correct in 4 of 4 cases" in summary and all(line in summary for line in notes)
    assert "tiles" in proc.stdout.split("\n\n")[1].splitlines()[0]  # the table's header has the tiles column


@pytest.mark.parametrize("T,L", [(64, 16), (64, 64), (50, 16), (4096, 256)])
def test_counted_flops_are_the_allowed_pairs(T, L):
    """Two D-long dot products per allowed pair forward (q.k and p.v, 2 FLOPs per multiply-add: 4 D), five
    backward (10 D), summed over the pairs a brute-force mask allows; one document is the causal triangle."""
    B, H, D = 2, 3, 8
    pairs = int(allowed(T, L).sum())
    assert op.allowed_pairs(T, L) == pairs
    for pass_, per_pair in (("fwd", 4 * D), ("bwd", 10 * D), ("fwd+bwd", 14 * D)):
        flops = op.counted_work((B, H, T, D, L), 2, pass_)[1]
        assert flops == B * H * pairs * per_pair, pass_
    if L == T:
        assert pairs == T * (T + 1) // 2


def test_documents_of_256_in_4096_visit_at_most_a_third_of_the_causal_tiles():
    """The tiles a row reports for documents of 256 in T = 4096, with a GPU's default tiles (bf16, D = 64), are the
    tiles holding an allowed pair, counted pair by pair; each kernel visits at most a third of the plain causal
    kernel's (the forward 96 of 1056)."""
    T, L, D = 4096, 256, 64
    defaults = {k: GPU_TILES[("16bit", "D<=64")][k][0][:2] for k in ("fwd", "dkdv", "dq")}
    counts = {k: (tiles_holding_pairs(T, L, *blocks), tiles_holding_pairs(T, None, *blocks))
              for k, blocks in defaults.items()}
    # by hand: 32 query tiles of 128 rows; the causal forward visits 2 (i + 1) key tiles of 64 in query tile i,
    # 1056 in all; with documents of 256 a query tile sees its own document only, 2 key tiles when it starts the
    # document and 4 when it is its second half: 16 * (2 + 4) = 96
    assert counts["fwd"] == (96, 1056)
    assert all(visited <= causal / 3 for visited, causal in counts.values()), counts
    for pass_, kernels in op.KERNELS.items():
        fields = op.row_fields((8, 12, T, D, L), "bf16", "triton", pass_, interpreting=False)
        assert fields["tiles_visited"] == sum(counts[k][0] for k in kernels), pass_
        assert fields["tiles_causal"] == sum(counts[k][1] for k in kernels), pass_
        assert fields["tiles_ratio"] <= 1 / 3
        assert "GPU defaults, bf16 D=64" in fields["tile_sizes"]


def test_the_plain_causal_baseline_is_held_to_the_plain_definition():
    """Which definition a contender is checked against matters: plain causal attention passes against the causal
    variant and fails against the documents' definition."""
    import torch.nn.functional as F

    case = kernel_bench.Case("doc_attention", (1, 2, 64, 16, 16), "fp32")
    torch.manual_seed(0)
    inputs = kernel_bench.make_inputs(case, torch.device("cpu"), copies=1)[0]
    select = kernel_bench.selector(case, torch.device("cpu"))
    with_docs = kernel_bench.exact_outputs(case, inputs, select)
    causal = kernel_bench.exact_outputs(case, inputs, select, op.DEFINITIONS["triton_causal"])

    def plain(q, k, v, doc_ids):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    assert kernel_bench.check(case, plain, inputs, select, causal)[0]
    assert not kernel_bench.check(case, plain, inputs, select, with_docs)[0]
    sdpa = kernel_bench.MODULES["doc_attention"].contender_fns(0.0, None, {})[0]["sdpa_mask"]
    assert kernel_bench.check(case, sdpa, inputs, select, with_docs)[0]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_contenders_block_mask_gives_the_documents_attention():
    """FlexAttention with the contender's block mask (here eager, the unfused reference; the row compiles the same
    call), forward only where it has no backward: documents of 24 in T = 64, the last one shorter."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    q, k, v, doc_ids = (t.detach() for t in op.make_inputs((2, 2, 64, 16, 24), torch.float32, "cpu", 1)[0].tensors)
    out = op.flex_contender(None)(q, k, v, doc_ids)
    exact = causal_attention_math(q.double(), k.double(), v.double(), doc_ids=doc_ids)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)


def test_run_all_measures_documents_of_256_in_4096_first(tmp_path):
    parts = {p.name: p for p in run_all.plan("gpu", "python", tmp_path)}
    cmd = parts["doc_attention"].lanes["doc_attention"]
    assert cmd[cmd.index("--op") + 1] == "doc_attention"
    assert cmd[cmd.index("--seq-lens") + 1] == "4096" and cmd[cmd.index("--doc-lens") + 1] == "256"
    dry = {p.name: p for p in run_all.plan("dry-run", "python", tmp_path)}
    assert "--quick" in dry["doc_attention"].lanes["doc_attention"]
