"""The benchmarks: both commands run end to end in --quick mode and write what they promise, the checks they make
before timing catch wrong results, and the work they count matches the op's definition.

The commands run in subprocesses: on the CPU the Triton kernels need the interpreter switched on before they are
imported, which must not leak into the other tests' process. On a GPU the quick runs skip torch.compile (minutes of
compiling for tiny shapes); ``bash benchmarks/run_all.sh`` measures it.
"""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks import kernels as kernel_bench
from benchmarks import train as train_bench

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
        assert line["status"] == row["status"]
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

    cases = {(r["family"], r["shape"]) for r in rows}
    assert {r["op"] for r in rows} == {"gelu", "layer_norm", "attention"}
    assert any(r["dropout"] > 0 for r in rows), "the --dropout row set is missing"
    for family, shape in cases:
        present = {(r["contender"], r["pass"]) for r in rows if (r["family"], r["shape"]) == (family, shape)}
        assert present == {(c, p) for c in kernel_bench.CONTENDERS for p in kernel_bench.PASSES}, (family, shape)

    for r in rows:
        where = f"{r['family']} {r['shape']} {r['contender']} {r['pass']}: {r['status']}"
        if r["contender"] == "math_compile":
            assert r["status"].startswith("skipped") and r["ms"] is None, where
            continue
        assert r["checked"] is True, where  # compared with float64 before any timing
        if r["contender"] == "triton" and device == "cpu":
            assert r["status"] == "not timed (interpreter)" and r["ms"] is None, where
            continue
        assert r["status"] == "ok" and r["ms"] > 0, where
        rate = r["tflops"] if r["op"] == "attention" else r["gbps"]
        assert rate > 0 and math.isfinite(rate), where
        if device == "cuda":  # triton is timed too: every other contender gets a speed-up ratio
            assert r["triton_speedup"] > 0, where

    summary = kernel_bench.summarize(data)
    assert f"triton checked correct in {len(cases)} of {len(cases)} cases" in summary
    assert "ceilings" in proc.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_train_quick_writes_a_row_per_backend_and_compile_setting(device, tmp_path):
    extra = ["--compile", "no"] if device == "cuda" else []
    run_quick("benchmarks.train", device, tmp_path, *extra)
    data, _ = read_outputs(tmp_path, "train")
    rows = {(r["backend"], r["compile"]): r for r in data["rows"]}
    compile_modes = ["no"] if device == "cuda" else ["no", "model"]
    assert set(rows) == {(b, c) for b in train_bench.BACKENDS for c in compile_modes}

    torch_row = rows["torch", "no"]
    assert torch_row["status"] == "ok" and torch_row["checked"] is True
    assert torch_row["ms_per_step"] > 0 and torch_row["tokens_per_s"] > 0 and 0 < torch_row["mfu"] < 1
    assert torch_row["tokens_per_s"] == pytest.approx(
        torch_row["batch"] * torch_row["context"] / (torch_row["ms_per_step"] * 1e-3))
    assert math.isfinite(torch_row["first_loss"]) and math.isfinite(torch_row["last_loss"])

    triton_row = rows["triton", "no"]
    assert triton_row["checked"] is True, triton_row["status"]  # logits agree with the torch backend's
    assert math.isfinite(triton_row["first_loss"])  # and a full training step ran
    if device == "cpu":
        assert triton_row["status"] == "not timed (interpreter)" and triton_row["ms_per_step"] is None
        assert all(rows[b, "model"]["status"].startswith("skipped") for b in train_bench.BACKENDS)
    else:
        assert triton_row["status"] == "ok" and triton_row["tokens_per_s"] > 0
    assert "tiny" in train_bench.summarize(data)


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
    out, grads = kernel_bench.reference(case, inputs, select)
    ref = {"out": out, "grads": grads}
    if case.dropout:
        d_out, d_grads = kernel_bench.reference(case, inputs, select, case.dropout)
        ref["dropout_dev"] = [common.rel_err(a, b) for a, b in zip([d_out] + d_grads, [out] + grads)]
    return inputs, select, ref


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_check_passes_pytorch_and_catches_wrong_or_nan_results(dtype):
    import torch.nn.functional as F

    case = kernel_bench.Case("layer_norm", (37, 96), dtype)
    inputs, select, ref = _inputs(case)
    right = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, kernel_bench.EPS)  # noqa: E731
    assert kernel_bench.check(case, right, inputs, select, ref)[0]

    off_by_a_bit = lambda x, w, b: right(x, w, b) * 1.1  # noqa: E731 (output and every gradient 10% off)
    ok, err, _ = kernel_bench.check(case, off_by_a_bit, inputs, select, ref)
    assert not ok and err > kernel_bench.TOLERANCE[dtype]

    def one_nan(x, w, b):
        y = right(x, w, b)
        return y.index_put((torch.tensor([5]), torch.tensor([7])), torch.tensor(float("nan"), dtype=y.dtype))

    assert not kernel_bench.check(case, one_nan, inputs, select, ref)[0]

    def nan_gradient(x, w, b):  # a right output whose x gradient is NaN
        x = x * 1
        x.register_hook(lambda g: torch.full_like(g, float("nan")))
        return right(x, w, b)

    assert not kernel_bench.check(case, nan_gradient, inputs, select, ref)[0]


def test_the_dropout_check_tells_dropout_from_none():
    case = kernel_bench.Case("attention", (1, 2, 64, 16), "fp32", dropout=0.1)
    inputs, select, ref = _inputs(case, seed=1)
    from kernels.reference import causal_attention_math

    with_dropout = lambda q, k, v: causal_attention_math(q, k, v, 0.1)  # noqa: E731 (a fresh mask: same law)
    without = lambda q, k, v: causal_attention_math(q, k, v, 0.0)  # noqa: E731
    assert kernel_bench.check(case, with_dropout, inputs, select, ref)[0]
    assert not kernel_bench.check(case, without, inputs, select, ref)[0]


# ----------------------------------------------------------------------------------------------------------------
# What is counted


def test_the_byte_and_flop_counts_follow_their_definitions():
    # LayerNorm, 2 rows of width 3 in bf16: forward reads x (12 B), w and b (12 B), writes y (12 B) and the fp32
    # mean and rstd (16 B); backward reads x, dy (24 B), w (6 B), mean and rstd (16 B), writes dx (12 B), dw, db (12 B)
    assert kernel_bench.layer_norm_bytes(2, 3, 2, "fwd") == 52
    assert kernel_bench.layer_norm_bytes(2, 3, 2, "bwd") == 70
    assert kernel_bench.layer_norm_bytes(2, 3, 2, "fwd+bwd") == 122
    # GELU on 10 fp32 elements: forward one read and one write, backward two reads and one write
    assert kernel_bench.gelu_bytes(10, 4, "fwd") == 80
    assert kernel_bench.gelu_bytes(10, 4, "bwd") == 120
    # causal attention, B=1, H=2, T=4, D=8: 16 (query, key) pairs per head, 8 of them unmasked (the causal count);
    # two 8-long dot products per pair at 2 FLOPs per multiply-add: 2 * 8 * 2 * 2 * 8 = 512
    assert kernel_bench.attention_flops(1, 2, 4, 8, "fwd") == 512
    assert kernel_bench.attention_flops(1, 2, 4, 8, "bwd") == 2.5 * 512
    assert kernel_bench.attention_flops(1, 2, 4, 8, "fwd+bwd") == 3.5 * 512


def test_the_sweep_and_the_command_lines():
    cases = kernel_bench.build_cases(kernel_bench.OPS, ["bf16"], 0.1, quick=False)
    widths = {c.shape[1] for c in cases if c.op == "layer_norm"}
    assert min(widths) == 768 and max(widths) == 8192
    assert {c.shape[1] for c in cases if c.op == "gelu"} == {4 * w for w in widths}
    attention = [c for c in cases if c.op == "attention"]
    assert {c.shape[2] for c in attention} == {256, 512, 1024, 2048, 4096, 8192}
    assert {(c.shape[1], c.shape[3]) for c in attention} == {(12, 64), (16, 128)}
    assert all(c.shape[0] == 8 for c in attention) and any(c.dropout == 0.1 for c in attention)
    assert common.device_name(torch.device("cpu")) == "cpu"
    for module in (kernel_bench, train_bench):
        assert "--quick" in module.build_parser().format_help()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "run_all.sh")]).returncode == 0


def test_summarize_reports_an_unreadable_results_file_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="cannot read results from .*missing.json.*pass the kernels.json"):
        common.read_results(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a benchmark results file"):
        common.read_results(tmp_path / "list.json")
    (tmp_path / "ok.json").write_text('{"meta": {}, "rows": []}')
    assert common.read_results(tmp_path / "ok.json") == {"meta": {}, "rows": []}
