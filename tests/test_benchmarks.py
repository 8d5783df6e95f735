"""The benchmarks: every command runs end to end in --quick mode and writes what it promises, the checks they make
before timing catch wrong results, the work they count matches the op's definition, memory is measured as said, and
the profile's groups account for the step.

The commands run in subprocesses: on the CPU the Triton kernels need the interpreter switched on before they are
imported, which must not leak into the other tests' process. On a GPU the quick runs skip torch.compile (minutes of
compiling for tiny shapes); ``bash benchmarks/run_all.sh`` measures it.
"""
import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common, results, timing
from benchmarks import kernels as kernel_bench
from benchmarks import profile as profile_bench
from benchmarks import train as train_bench
from benchmarks.ops import attention as attention_op
from benchmarks.ops import gelu as gelu_op
from benchmarks.ops import layer_norm as layer_norm_op
from benchmarks.ops import linear_cross_entropy as loss_op
from kernels.definitions import EPS

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_quick(module: str, device: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                      os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # the benchmark decides from --device
    cmd = [sys.executable, "-m", module, "--quick", "--device", device, "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def read_outputs(out: Path, stem: str) -> tuple[dict, list[dict]]:
    """The JSON and the CSV a run wrote; they must agree on the rows."""
    data = json.loads((out / f"{stem}.json").read_text())
    with open(out / f"{stem}.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(data["rows"]) > 0
    for row, line in zip(data["rows"], csv_rows):
        assert set(line) == set(row)
        assert line.get("status") == row.get("status")
    assert (out / f"{stem}.png").stat().st_size > 0
    return data, csv_rows


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_quick_checks_every_contender_and_times_the_ones_it_may(device, tmp_path):
    extra = ["--dropout", "0.1"] + (["--no-compile"] if device == "cuda" else [])
    proc = run_quick("benchmarks.kernels", device, tmp_path, *extra)
    data, _ = read_outputs(tmp_path, "kernels")
    rows = data["rows"]
    ceilings = data["meta"]["ceilings"]
    assert ceilings["bandwidth_gbps"] > 0 and ceilings["matmul_tflops"]["bf16"] > 0

    cases = {(r["op"], r["family"], r["shape"]) for r in rows}
    assert {r["op"] for r in rows} == {"gelu", "layer_norm", "linear_cross_entropy", "attention", "doc_attention"}
    assert any(r["dropout"] > 0 for r in rows), "the --dropout row set is missing"
    for op, family, shape in cases:
        present = {(r["contender"], r["pass"]) for r in rows if (r["family"], r["shape"]) == (family, shape)}
        assert present == {(c, p) for c in kernel_bench.contenders(op) for p in kernel_bench.PASSES}, (family, shape)

    has_pytorch_loss = loss_op.pytorch_loss() is not None  # F.linear_cross_entropy: only in newer torch
    for r in rows:
        where = f"{r['family']} {r['shape']} {r['contender']} {r['pass']}: {r['status']}"
        if r["contender"] in ("math_compile", "flex"):  # under torch.compile: skipped on the CPU's quick run
            assert r["status"].startswith("skipped") and r["ms"] is None, where  # and with --no-compile
            continue
        if r["op"] == "linear_cross_entropy" and r["contender"] == "pytorch" and not has_pytorch_loss:
            assert r["status"] == loss_op.PYTORCH_MISSING.format(version=torch.__version__), where
            assert r["ms"] is None and r["checked"] is not True, where
            continue
        assert r["checked"] is True, where  # compared with float64 before any timing
        if r["contender"] in ("triton", "triton_causal") and device == "cpu":
            assert r["status"] == "not timed (interpreter)" and r["ms"] is None, where
            continue
        if (r["contender"], r["pass"]) in loss_op.PASS_STATUS and r["op"] == "linear_cross_entropy":
            assert r["status"] == loss_op.PASS_STATUS[r["contender"], r["pass"]], where
            continue
        assert r["status"] == "ok" and r["ms"] > 0, where
        rate = r["gbps"] if r["op"] in ("gelu", "layer_norm") else r["tflops"]
        assert rate > 0 and math.isfinite(rate), where
        if device == "cuda":  # triton is timed too: every other contender gets a speed-up ratio
            assert r["triton_speedup"] > 0, where
        if r["op"] == "linear_cross_entropy":  # the loss's rows say how much memory each pass took
            assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0, where
        else:
            assert r["peak_mem_mib"] is None, where
    # the plain formula holds the (N, V) float32 logits at once: its fwd+bwd peak is at least that large
    for r in rows:
        if r["op"] == "linear_cross_entropy" and r["contender"] == "math" and r["pass"] == "fwd+bwd":
            N, _C, V = map(int, r["shape"].split("x"))
            assert r["peak_mem_mib"] * 2**20 >= N * V * 4, r

    summary = kernel_bench.summarize(data)
    assert f"triton checked correct in {len(cases)} of {len(cases)} cases" in summary
    assert "peak memory beyond the inputs" in summary
    assert "ceilings" in proc.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_train_quick_writes_a_row_per_backend_compile_setting_and_loss(device, tmp_path):
    # a small memory budget keeps the largest-batch search's steps short (the tiny model at context 64)
    # (the trainer-overhead measurement has its own tests: tests/test_overhead.py)
    extra = (["--memory-budget-gib", "0.45", "--overhead-steps", "0", "--startup-runs", "0"]
             + (["--compile", "no"] if device == "cuda" else []))
    run_quick("benchmarks.train", device, tmp_path, *extra)
    data, _ = read_outputs(tmp_path, "train")
    rows = {(r["backend"], r["compile"], r["loss"]): r for r in data["rows"]}
    compile_modes = ["no"] if device == "cuda" else ["no", "model"]
    assert set(rows) == {(b, c, loss) for b in train_bench.BACKENDS for c in compile_modes
                         for loss in train_bench.LOSSES}

    for loss in train_bench.LOSSES:
        torch_row = rows["torch", "no", loss]
        assert torch_row["status"] == "ok" and torch_row["checked"] is True, torch_row["status"]
        assert torch_row["ms_per_step"] > 0 and torch_row["tokens_per_s"] > 0 and 0 < torch_row["mfu"] < 1
        assert torch_row["tokens_per_s"] == pytest.approx(
            torch_row["batch"] * torch_row["context"] / (torch_row["ms_per_step"] * 1e-3))
        assert math.isfinite(torch_row["first_loss"]) and math.isfinite(torch_row["last_loss"])
        # every timed step's peak is recorded; the row reports the largest
        assert len(torch_row["step_peak_gib"]) == 3 and torch_row["peak_mem_gib"] > 0
        assert torch_row["peak_mem_gib"] == pytest.approx(max(torch_row["step_peak_gib"]), abs=1e-3)
        # the largest batch within the budget was confirmed by a step, and one more sequence was over it
        assert torch_row["max_batch"] >= 1 and torch_row["max_batch_peak_gib"] <= 0.45, torch_row["max_batch_note"]
        assert torch_row["max_batch_note"].endswith("(measured)"), torch_row["max_batch_note"]
        assert torch_row["mem_per_seq_mib"] > 0
    fused, plain = rows["torch", "no", "fused"], rows["torch", "no", "plain"]
    assert "fused loss rel err" in fused["check"]  # the fused loss was checked against F.cross_entropy's
    # what the fused loss is for: without the (B*T, 50257) logits more sequences fit in the same memory
    assert fused["max_batch"] > plain["max_batch"]

    for loss in train_bench.LOSSES:
        triton_row = rows["triton", "no", loss]
        assert triton_row["checked"] is True, triton_row["status"]  # logits (and loss) agree with the torch backend
        assert math.isfinite(triton_row["first_loss"])  # and a full training step ran
        if device == "cpu":
            assert triton_row["status"] == "not timed (interpreter)" and triton_row["ms_per_step"] is None
            assert all(rows[b, "model", loss]["status"].startswith("skipped") for b in train_bench.BACKENDS)
        else:
            assert triton_row["status"] == "ok" and triton_row["tokens_per_s"] > 0
    assert "tiny" in train_bench.summarize(data)


def test_the_largest_batch_search_finds_the_limit_of_a_known_memory_curve():
    gib = 2**30

    def bent(b):  # a fused loss's shape: a chunk buffer that grows with the batch up to 10 sequences, then stays
        return 0.25 * gib + min(b, 10) * 0.01 * gib + b * 0.005 * gib

    def out_of_memory_above_50(b):  # a straight line, and a device that runs out above 50 sequences
        return math.inf if b > 50 else 0.1 * gib + b * 0.02 * gib

    for curve, budget in ((bent, 0.5 * gib), (bent, 0.26 * gib), (out_of_memory_above_50, 10 * gib)):
        measured = []
        found = train_bench.largest_batch(lambda b: measured.append(b) or curve(b), 1, curve(1), budget)
        truth = max((b for b in range(1, 200) if curve(b) <= budget), default=0)
        assert (found["max_batch"] or 0) == truth, (curve.__name__, budget, found, measured)
        assert len(measured) <= 2 + train_bench.FIT_TRIES


def test_profile_quick_splits_the_step_into_groups_that_add_up(tmp_path):
    run_quick("benchmarks.profile", "cpu", tmp_path)
    data, _ = read_outputs(tmp_path, "profile")
    for loss in profile_bench.LOSSES:
        by = {r["group"]: r for r in data["rows"] if r["loss"] == loss}
        assert set(by) == set(profile_bench.GROUPS) | {profile_bench.OUTSIDE, "step"}
        step = by["step"]["ms_per_step"]
        grouped = sum(by[g]["ms_per_step"] for g in profile_bench.GROUPS)
        # the ops' own times cover the step, up to the Python between them
        assert 0.7 * step <= grouped <= 1.02 * step, (loss, grouped, step)
        for group in ("matmuls", "attention", "LayerNorm", "GELU", "loss", "optimizer"):
            assert by[group]["ms_per_step"] > 0, (loss, group)  # every part of the model was found
        assert "aten::mm" in by["matmuls"]["top_ops"]
    assert "LayerNorm" in profile_bench.summarize(data)


def test_a_failing_profile_leaves_the_other_and_says_why(tmp_path, monkeypatch):
    """One loss's profile raising (a kernel that fails on some GPU, say) is recorded with its whole message; the
    other loss is still profiled and written."""
    real = profile_bench.profile_loss

    def profile_loss(loss, args, device):
        if loss == "plain":
            raise RuntimeError("the plain loss broke\nand this line says where")
        return real(loss, args, device)

    monkeypatch.setattr(profile_bench, "profile_loss", profile_loss)
    threads, on_term = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:  # in this process: the torch backend on the CPU needs no interpreter
        assert profile_bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "p"]) == 0
    finally:  # what the benchmark's setup changed for its own process
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, on_term)
    data = json.loads((tmp_path / "p.json").read_text())
    assert {r["loss"] for r in data["rows"]} == {"fused"}
    assert data["meta"]["errors"] == {"plain": "RuntimeError: the plain loss broke\nand this line says where"}
    assert "plain: failed: RuntimeError: the plain loss broke" in profile_bench.summarize(data)


@pytest.mark.parametrize("chain, group", [
    (["aten::addmm", "aten::linear"], "matmuls"),
    (["aten::copy_", "aten::addmm", "aten::linear"], "matmuls"),
    (["autograd::engine::evaluate_function: AddmmBackward0"], "matmuls"),
    (["aten::mm", "LinearCrossEntropy", "minigpt.linear_cross_entropy"], "matmuls"),  # the head's matmul, fused
    (["aten::exp_", "LinearCrossEntropy", "minigpt.linear_cross_entropy"], "loss"),
    (["aten::mul", "autograd::engine::evaluate_function: LinearCrossEntropyBackward"], "loss"),
    (["minigpt::linear_cross_entropy_fwd"], "loss"),
    (["aten::copy_", "aten::_to_copy", "aten::to", "minigpt.loss"], "loss"),
    (["aten::_log_softmax_backward_data"], "loss"),
    (["aten::bmm", "aten::_scaled_dot_product_attention_math", "minigpt.causal_attention"], "attention"),
    (["aten::bmm", "autograd::engine::evaluate_function: BmmBackward0",  # a backward node, then its forward op
      "aten::bmm", "aten::matmul", "aten::_scaled_dot_product_attention_math", "minigpt.causal_attention"],
     "attention"),
    (["aten::mm", "autograd::engine::evaluate_function: AddmmBackward0", "aten::addmm", "aten::linear"], "matmuls"),
    (["minigpt::attention_bwd"], "attention"),
    (["aten::native_layer_norm", "aten::layer_norm", "minigpt.layer_norm"], "LayerNorm"),
    (["aten::gelu_backward", "autograd::engine::evaluate_function: GeluBackward0"], "GELU"),
    (["aten::sqrt", "Optimizer.step#AdamW.step", "minigpt.optimizer"], "optimizer"),
    (["aten::_fused_adamw_"], "optimizer"),
    (["aten::embedding_dense_backward"], "rest"),
    (["aten::add"], "rest"),
])
def test_profile_groups_ops_by_what_they_sit_in(chain, group):
    assert profile_bench.classify(chain) == group


def test_the_peak_memory_meter_sees_an_allocation_of_known_size():
    # in a subprocess: the meter changes malloc's settings for the whole process
    code = ("import torch; from benchmarks import memory; d = torch.device('cpu'); assert memory.prepare(d) is None; "
            "x = torch.ones(1);\n"
            "with memory.PeakMemory(d) as m:\n    t = torch.ones(16 * 2**20); del t\n"
            "with memory.PeakMemory(d) as again:\n    t = torch.ones(16 * 2**20); del t\n"
            "print(m.bytes, again.bytes)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # 64 MiB of float32, freed inside the block: counted, and counted again. Linux updates a process's resident
    # size in batches of pages per thread, so the count is good to about a MiB.
    for peak in map(int, proc.stdout.split()):
        assert 63 * 2**20 <= peak < 72 * 2**20, peak


@pytest.mark.parametrize("device", DEVICES)
def test_generate_quick_times_each_contender_and_checks_their_tokens(device, tmp_path):
    from benchmarks import generate as generate_bench

    run_quick("benchmarks.generate", device, tmp_path, "--kernels", "torch")
    data, _ = read_outputs(tmp_path, "generate")
    rows = {(r["batch"], r["contender"]): r for r in data["rows"]}
    has_transformers = importlib.util.find_spec("transformers") is not None
    assert set(rows) == {(b, c) for b in (1, 2) for c in generate_bench.CONTENDERS}
    for (batch, contender), r in rows.items():
        if contender == "transformers" and not has_transformers:
            assert r["status"] == "skipped: transformers is not installed (pip install transformers)"
            continue
        assert r["status"] == "ok", r["status"]
        assert r["tokens_per_s"] == pytest.approx(batch * 24 / r["seconds"])
        if contender != "no cache" and device == "cpu":  # float32: greedy tokens identical to the uncached loop's
            assert r["same_tokens"] is True
    one = rows[1, "cache"]
    assert one["floor_ms"] > 0 and one["floor_ratio"] == pytest.approx(one["ms_per_token"] / one["floor_ms"])
    assert one["speedup_vs_no_cache"] == pytest.approx(one["tokens_per_s"] / rows[1, "no cache"]["tokens_per_s"])
    assert "24 new tokens" in generate_bench.summarize(data)


def test_a_spent_time_budget_skips_rows_but_still_writes_the_files(tmp_path):
    run_quick("benchmarks.kernels", "cpu", tmp_path, "--op", "gelu", "--budget-s", "0")
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["rows"] and all(r["status"].startswith("skipped: time budget") for r in data["rows"])


# ----------------------------------------------------------------------------------------------------------------
# The check before timing: a wrong result is caught, a right one passes


def _inputs(case, seed=0):
    torch.manual_seed(seed)
    inputs = kernel_bench.make_inputs(case, torch.device("cpu"), copies=1)[0]
    select = kernel_bench.selector(case, torch.device("cpu"))
    out, grads = kernel_bench.definition_outputs(case, inputs, select)
    exact = {"out": out, "grads": grads}
    if case.dropout:
        d_out, d_grads = kernel_bench.definition_outputs(case, inputs, select, case.dropout)
        exact["dropout_dev"] = [common.rel_err(a, b) for a, b in zip([d_out] + d_grads, [out] + grads)]
    return inputs, select, exact


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_check_passes_pytorch_and_catches_wrong_or_nan_results(dtype):
    import torch.nn.functional as F

    case = kernel_bench.Case("layer_norm", (37, 96), dtype)
    inputs, select, exact = _inputs(case)
    right = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, EPS)  # noqa: E731
    assert kernel_bench.check(case, right, inputs, select, exact)[0]

    off_by_a_bit = lambda x, w, b: right(x, w, b) * 1.1  # noqa: E731 (output and every gradient 10% off)
    ok, err, _ = kernel_bench.check(case, off_by_a_bit, inputs, select, exact)
    assert not ok and err > kernel_bench.TOLERANCE[dtype]

    def one_nan(x, w, b):
        y = right(x, w, b)
        return y.index_put((torch.tensor([5]), torch.tensor([7])), torch.tensor(float("nan"), dtype=y.dtype))

    assert not kernel_bench.check(case, one_nan, inputs, select, exact)[0]

    def nan_gradient(x, w, b):  # a right output whose x gradient is NaN
        x = x * 1
        x.register_hook(lambda g: torch.full_like(g, float("nan")))
        return right(x, w, b)

    assert not kernel_bench.check(case, nan_gradient, inputs, select, exact)[0]


def test_the_dropout_check_tells_dropout_from_none():
    case = kernel_bench.Case("attention", (1, 2, 64, 16), "fp32", dropout=0.1)
    inputs, select, exact = _inputs(case, seed=1)
    from kernels.definitions import causal_attention_math

    with_dropout = lambda q, k, v: causal_attention_math(q, k, v, 0.1)  # noqa: E731 (a fresh mask: same law)
    without = lambda q, k, v: causal_attention_math(q, k, v, 0.0)  # noqa: E731
    assert kernel_bench.check(case, with_dropout, inputs, select, exact)[0]
    assert not kernel_bench.check(case, without, inputs, select, exact)[0]


# ----------------------------------------------------------------------------------------------------------------
# What is counted


def test_the_byte_and_flop_counts_follow_their_definitions():
    # LayerNorm, 2 rows of width 3 in bf16: forward reads x (12 B), w and b (12 B), writes y (12 B) and the fp32
    # mean and rstd (16 B); backward reads x, dy (24 B), w (6 B), mean and rstd (16 B), writes dx (12 B), dw, db (12 B)
    assert layer_norm_op.layer_norm_bytes(2, 3, 2, "fwd") == 52
    assert layer_norm_op.layer_norm_bytes(2, 3, 2, "bwd") == 70
    assert layer_norm_op.layer_norm_bytes(2, 3, 2, "fwd+bwd") == 122
    # GELU on 10 fp32 elements: forward one read and one write, backward two reads and one write
    assert gelu_op.gelu_bytes(10, 4, "fwd") == 80
    assert gelu_op.gelu_bytes(10, 4, "bwd") == 120
    # causal attention, B=1, H=2, T=4, D=8: 16 (query, key) pairs per head, 8 of them unmasked (the causal count);
    # two 8-long dot products per pair at 2 FLOPs per multiply-add: 2 * 8 * 2 * 2 * 8 = 512
    assert attention_op.attention_flops(1, 2, 4, 8, "fwd") == 512
    assert attention_op.attention_flops(1, 2, 4, 8, "bwd") == 2.5 * 512
    assert attention_op.attention_flops(1, 2, 4, 8, "fwd+bwd") == 3.5 * 512
    # the loss, N=2 rows, C=3, V=5: logits are 2 x 5 dot products of length 3 (2 * 3 * 5 multiply-adds, 60 FLOPs);
    # the backward's dX and dW are two more products of that size
    assert loss_op.flops(2, 3, 5, "fwd") == 60
    assert loss_op.flops(2, 3, 5, "bwd") == 120
    assert loss_op.flops(2, 3, 5, "fwd+bwd") == 180


def test_the_sweep_and_the_command_lines():
    cases = kernel_bench.build_cases(kernel_bench.OPS, ["bf16"], 0.1, quick=False)
    widths = {c.shape[1] for c in cases if c.op == "layer_norm"}
    assert min(widths) == 768 and max(widths) == 8192
    assert {c.shape[1] for c in cases if c.op == "gelu"} == {4 * w for w in widths}
    assert {c.shape for c in cases if c.op == "linear_cross_entropy"} == {(16384, 768, 50257), (16384, 1600, 50257)}
    attention = [c for c in cases if c.op == "attention"]
    assert {c.shape[2] for c in attention} == {256, 512, 1024, 2048, 4096, 8192}
    assert {(c.shape[1], c.shape[3]) for c in attention} == {(12, 64), (16, 128)}
    assert all(c.shape[0] == 8 for c in attention) and any(c.dropout == 0.1 for c in attention)
    # documents of 128, 256 and 512 tokens in windows of 1024 and 4096, the attention sweep's first heads
    docs = [c for c in cases if c.op == "doc_attention"]
    assert {(c.shape[2], c.shape[4]) for c in docs} == {(T, L) for T in (1024, 4096) for L in (128, 256, 512)}
    assert {c.shape[:2] + c.shape[3:4] for c in docs} == {(8, 12, 64)} and all(c.dropout == 0 for c in docs)
    # run order: attention (with its dropout rows) first, then attention over packed documents, the loss, LayerNorm,
    # GELU — a budget cuts the tail
    order = list(dict.fromkeys(c.op for c in cases))
    assert order == ["attention", "doc_attention", "linear_cross_entropy", "layer_norm", "gelu"]
    assert [c.op for c in cases[:len(attention)]] == ["attention"] * len(attention)
    assert common.device_name(torch.device("cpu")) == "cpu"
    for module in (kernel_bench, train_bench, profile_bench):
        assert "--quick" in module.build_parser().format_help()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "run_all.sh")]).returncode == 0


def test_summarize_reports_an_unreadable_results_file_in_one_line(tmp_path):
    with pytest.raises(common.BenchmarkError, match="cannot read results from .*missing.json.*pass the kernels.json"):
        results.read_results(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(common.BenchmarkError, match="not a benchmark results file"):
        results.read_results(tmp_path / "list.json")
    (tmp_path / "ok.json").write_text('{"meta": {}, "rows": []}')
    assert results.read_results(tmp_path / "ok.json") == {"meta": {}, "rows": []}


# ----------------------------------------------------------------------------------------------------------------
# Where the files go: ./benchmark-results/<device>/ unless --out names a folder; a --quick run never replaces the
# recorded results in benchmarks/results/


def _recorded_files() -> dict:
    return {p: p.stat().st_mtime_ns for p in common.RESULTS_DIR.rglob("*") if p.is_file()}


def test_a_run_without_out_writes_in_the_current_folder_and_leaves_the_recorded_results(tmp_path):
    before = _recorded_files()
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                      os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--quick", "--device", "cpu", "--op", "gelu", "--budget-s", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "benchmark-results" / "cpu" / "kernels.json").is_file()
    assert _recorded_files() == before


@pytest.mark.parametrize("inside", ["cpu", ".", "cpu/../new-device"])
def test_a_quick_run_into_the_recorded_results_is_refused_in_one_line(inside, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = Path("benchmarks", "results", inside)  # relative to the repository, as a user in it would type it
    assert kernel_bench.main(["--quick", "--device", "cpu", "--op", "gelu", "--budget-s", "0", "--out", str(out),
                              "--name", "refused"]) == 1
    msg = capsys.readouterr().err
    assert msg.startswith("error: --quick would replace the recorded results") and "--out" in msg
    assert msg.count("\n") == 1 and not list(common.RESULTS_DIR.rglob("refused.*"))


def test_the_recorded_results_are_written_when_out_names_them_without_quick(tmp_path):
    from argparse import Namespace

    full = Namespace(quick=False, out=common.RESULTS_DIR / "cpu")
    common.check_out(full)  # a full run is how they are recorded
    elsewhere = Namespace(quick=True, out=tmp_path / "results" / "cpu")
    common.check_out(elsewhere)  # a folder of the same name elsewhere is the user's
    assert common.default_out_dir(torch.device("cpu")).resolve() == (Path.cwd() / "benchmark-results" / "cpu")


# ----------------------------------------------------------------------------------------------------------------
# Every bad option value and every output folder that cannot take the results is refused before any work; what
# fails later is one line


class WorkStarted(BaseException):
    """Raised where a benchmark's work would begin: no benchmark catches it."""


@pytest.fixture
def no_work(monkeypatch):
    def started(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(timing, "measure_ceilings", started)
    monkeypatch.setattr(profile_bench, "profile_loss", started)  # the profile measures no ceilings


@pytest.fixture
def refusal(capsys):
    def refused(module, args: list[str]) -> str:
        """The one line a benchmark's main prints when it refuses ``args`` (exit status 1)."""
        assert module.main(["--quick", "--device", "cpu", *args]) == 1
        message = capsys.readouterr().err
        assert message.startswith("error: ") and message.count("\n") == 1
        return message.rstrip("\n")

    return refused


@pytest.mark.parametrize("module", [kernel_bench, train_bench, profile_bench], ids=["kernels", "train", "profile"])
def test_an_out_that_is_a_file_is_refused_before_any_work(module, tmp_path, no_work, refusal):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert refusal(module, ["--out", str(a_file)]).startswith(f"error: --out {a_file} is a file, not a folder — ")
    assert refusal(module, ["--out", str(a_file / "sub")]).startswith(
        f"error: --out {a_file / 'sub'} cannot be made: {a_file} is a file — ")


def test_a_results_name_taken_by_a_folder_is_refused_before_any_work(tmp_path, no_work, refusal):
    (tmp_path / "gelu.csv").mkdir()
    message = refusal(kernel_bench, ["--op", "gelu", "--out", str(tmp_path), "--name", "gelu"])
    assert message.startswith(f"error: {tmp_path / 'gelu.csv'} is a folder, not a file — ")


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, no_work, monkeypatch, refusal):
    def read_only(dir):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(common.tempfile, "TemporaryFile", read_only)
    message = refusal(kernel_bench, ["--out", str(tmp_path / "new")])
    assert message == (f"error: cannot write in --out {tmp_path / 'new'}: Read-only file system (in {tmp_path}) — "
                       "pass a folder you can write")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("module, args, message", [
    (kernel_bench, ["--name", "a/b"], "--name 'a/b' is not a plain file name"),
    (kernel_bench, ["--name", ""], "--name '' is not a plain file name"),
    (kernel_bench, ["--budget-s", "nan"], "--budget-s must be 0 or more seconds, got nan"),
    (kernel_bench, ["--budget-s", "-1"], "--budget-s must be 0 or more seconds, got -1.0"),
    (kernel_bench, ["--threads", "0"], "--threads must be at least 1, got 0"),
    (kernel_bench, ["--seed", str(2**64)], f"--seed {2**64} does not fit in 64 bits"),
    (kernel_bench, ["--rep-ms", "nan"], "--rep-ms must be positive, got nan"),
    (kernel_bench, ["--warmup-ms", "-1"], "--warmup-ms must be 0 or more, got -1.0"),
    (kernel_bench, ["--widths", "64", "0"], "--widths must be positive, got 0"),
    (kernel_bench, ["--seq-lens", "0"], "--seq-lens must be positive, got 0"),
    (kernel_bench, ["--doc-lens", "256", "-1"], "--doc-lens must be positive, got -1"),
    (train_bench, ["--context-lengths", "0"], "--context-lengths must be positive, got 0"),
    (train_bench, ["--memory-budget-gib", "nan"], "--memory-budget-gib must be positive, got nan"),
    (train_bench, ["--vocab-size", "0"], "--vocab-size must be positive, got 0"),
    (profile_bench, ["--threads", "-2"], "--threads must be at least 1, got -2"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_option_values_are_refused_before_any_work(module, args, message, tmp_path, no_work, refusal):
    assert refusal(module, [*args, "--out", str(tmp_path)]).startswith(f"error: {message}")


def test_good_option_values_get_to_the_work(tmp_path, no_work):
    for module, args in ((train_bench, ["--memory-budget-gib", "0.5", "--no-max-batch"]),
                         (kernel_bench, ["--warmup-ms", "0", "--budget-s", "0", "--seed", str(-2**63)])):
        with pytest.raises(WorkStarted):
            module.main(["--quick", "--device", "cpu", "--out", str(tmp_path), *args])


def test_a_failed_write_names_its_file_in_one_line(tmp_path, monkeypatch, capsys):
    import contextlib

    from kernels.cli import run_cli

    class Full:
        def write(self, b):
            raise OSError(28, "No space left on device")  # as a file object raises it: no file name

    monkeypatch.setattr(results, "atomic_open", lambda path: contextlib.nullcontext(Full()))
    assert run_cli(lambda: results.write_results(tmp_path, "kernels", [{"a": 1}], {})) == 1
    json_path = tmp_path / "kernels.json"
    assert capsys.readouterr().err == (f"error: No space left on device: {json_path} — free some disk space or write "
                                       "somewhere else\n")


def test_sigterm_before_the_rows_exits_143_in_one_line(tmp_path, monkeypatch, capsys):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it while the ceilings are measured

    monkeypatch.setattr(timing, "measure_ceilings", terminated)
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert kernel_bench.main(["--quick", "--device", "cpu", "--op", "gelu", "--out", str(tmp_path)]) == 143
    finally:
        signal.signal(signal.SIGTERM, old)
    assert capsys.readouterr().err.strip() == "interrupted"


def test_run_all_refuses_an_out_that_is_a_file_before_removing_anything(tmp_path, capsys):
    from benchmarks import run_all

    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    assert run_all.main([str(a_file)]) == 1
    assert capsys.readouterr().err.startswith(f"error: OUT {a_file} is a file, not a folder — ")
    assert run_all.main([str(tmp_path / "out"), "--archive", str(a_file / "results.tar.gz")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --archive's folder {a_file} is a file, not a folder — ")
    assert a_file.read_text() == "kept" and not (tmp_path / "out").exists()
