"""``python -m kernels.compile_check``: it compiles real kernels for sm_80/sm_90 without a GPU, and it catches
what the interpreter lets through (a compile error, spilled registers).

Compiling needs Triton's real ``@triton.jit``, not the interpreter; other test modules switch the interpreter on
for this whole process, so every compile here runs in a child process started without ``TRITON_INTERPRET``.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from kernels.compile_check import collect_targets, parse_resource_usage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_compiles_a_subset_and_prints_the_table():
    proc = _run(["-m", "kernels.compile_check", "--arch", "80", "90", "--only", "gelu_fwd", "layer_norm_bwd_dwdb"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("kernel"))
    for column in ("config", "arch", "registers", "spills", "shared memory", "status"):
        assert column in header
    rows = [line.split() for line in lines if line.startswith(("gelu_fwd", "layer_norm_bwd_dwdb"))]
    # gelu_fwd: 2 approximations x 3 dtypes; layer_norm_bwd_dwdb: 3 parameter dtypes; each for 2 architectures
    assert len(rows) == (6 + 3) * 2
    assert {row[-1] for row in rows} == {"ok"}
    assert {"sm_80", "sm_90"} <= {cell for row in rows for cell in row}
    assert "compiles" in lines[-1] and " s" in lines[-1]  # the total time
    # which Triton compiled, before the table and in the summary: register counts depend on its version
    assert lines[0].startswith(f"compiling with triton {triton.__version__} (")
    assert f"with triton {triton.__version__} (" in lines[-1]


def test_refuses_to_run_under_the_interpreter():
    proc = _run(["-m", "kernels.compile_check", "--only", "gelu_fwd"], env_extra={"TRITON_INTERPRET": "1"})
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr


BROKEN_SCRIPT = '''
import json, sys
sys.path.insert(0, {root!r})
import triton
import triton.language as tl
from kernels.compile_check import check_targets
from kernels.compile_targets import layer_norm_targets


@triton.jit
def _fine(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs) * 2.0)


@triton.jit
def _tile_not_power_of_two(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # the interpreter runs this for BLOCK=1000; the compiler refuses
    tl.store(X + offs, tl.load(X + offs) * 2.0)


def target(name, fn, block):
    return dict(name=name, fn=fn, signature={{"X": "*fp32"}}, constexprs={{"BLOCK": block}}, num_warps=4, num_stages=1)


# the LayerNorm backward with a 16384-wide row: 32 floats per thread per tensor cannot stay in registers
wide = next(t for t in layer_norm_targets() if t["name"] == "layer_norm_bwd_dx" and "x=fp32" in t["config"])
wide = dict(wide, name="too_wide", constexprs={{"BLOCK_M": 1, "BLOCK_C": 16384}}, config="BLOCK=1x16384")
targets = [target("fine", _fine, 1024), target("broken", _tile_not_power_of_two, 1000), wide]
results = check_targets(targets, archs=[90], jobs=1)
print(json.dumps([dict(name=r.name, status=r.status, error=r.error, spills=r.spills) for r in results]))
'''


def test_reports_a_kernel_the_compiler_rejects_and_spills(tmp_path):
    script = tmp_path / "broken_kernels.py"  # @triton.jit reads the source, so the kernels live in a file
    script.write_text(textwrap.dedent(BROKEN_SCRIPT.format(root=str(ROOT))))
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert results["fine"]["status"] == "ok"
    assert results["broken"]["status"] == "error"
    assert "power of 2" in results["broken"]["error"]
    assert results["too_wide"]["status"] == "spills" and results["too_wide"]["spills"] > 0


SPILL_EXIT_SCRIPT = '''
import json, sys
sys.path.insert(0, {root!r})
from kernels import compile_check
from kernels.compile_targets import layer_norm_targets

# the LayerNorm backward with a 16384-wide row spills (see the test above), as a default and as an alternative
wide = next(t for t in layer_norm_targets() if t["name"] == "layer_norm_bwd_dx" and "x=fp32" in t["config"])
wide = dict(wide, name="too_wide", constexprs={{"BLOCK_M": 1, "BLOCK_C": 16384}}, config="BLOCK=1x16384")
codes = {{}}
for allowed in (False, True):
    compile_check.collect_targets = lambda only=None, t=dict(wide, spills_allowed=allowed): [t]
    codes["alternative" if allowed else "default"] = compile_check.main(["--arch", "90", "--jobs", "1"])
print(json.dumps(codes))
'''


def test_exit_status_fails_a_spilling_default_only(tmp_path):
    """CI relies on the exit status: non-zero when a default configuration spills, zero when only a tuner's
    alternative does; the failing row is named again below the table."""
    script = tmp_path / "spill_exit.py"
    script.write_text(textwrap.dedent(SPILL_EXIT_SCRIPT.format(root=str(ROOT))))
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"default": 1, "alternative": 0}
    assert sum(line.startswith("failed: too_wide [BLOCK=1x16384] sm_90: ") for line in lines) == 1
    assert any("spills (alternative)" in line for line in lines)


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _k:
  REG:128 STACK:144 SHARED:1024 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert parse_resource_usage(text) == (128, 144)
    with pytest.raises(RuntimeError, match="no register count"):
        parse_resource_usage("garbage")


def test_unknown_kernel_files_are_refused():
    with pytest.raises(ValueError, match="no compile targets for no_such_kernel"):
        collect_targets(kernels=("no_such_kernel",))


def test_targets_cover_every_kernel_file_in_order():
    names = [t["name"] for t in collect_targets()]
    firsts = [next(i for i, n in enumerate(names) if n.startswith(stem))
              for stem in ("attention", "layer_norm", "gelu", "linear_cross_entropy")]
    assert firsts == sorted(firsts)


@pytest.mark.parametrize("kernel", ["layer_norm", "gelu", "linear_cross_entropy"])
def test_targets_are_well_formed(kernel):
    """Every target names real arguments of its kernel, so a renamed argument fails here, not in CI's compile."""
    targets = collect_targets(kernels=(kernel,))
    assert targets
    for t in targets:
        assert {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} <= t.keys()
        names = set(t["signature"]) | set(t["constexprs"])
        assert names == set(t["fn"].arg_names), t["name"]
        for ty in t["signature"].values():
            assert ty in {"i32", "i64", "fp32"} or ty.lstrip("*") in {"fp32", "fp16", "bf16", "i64"}, ty


@pytest.mark.parametrize("args, message", [
    (["--arch", "8"], "error: --arch 8 is not a compute capability — write its two digits together, e.g. 80"),
    (["--arch", "80", "900"], "error: --arch 900 is not a compute capability"),
    (["--jobs", "0"], "error: --jobs must be at least 1, got 0 — "),
    (["--jobs", "-2"], "error: --jobs must be at least 1, got -2 — "),
])
def test_bad_flag_values_are_refused_before_any_compile(args, message, monkeypatch):
    from kernels import compile_check

    def never(*args, **kwargs):
        raise AssertionError("compiling started although a flag had to be refused first")

    monkeypatch.setattr(compile_check, "collect_targets", never)
    with pytest.raises(SystemExit) as info:
        compile_check.main(args)
    assert str(info.value.code).startswith(message) and "\n" not in str(info.value.code)


def test_output_closed_early_ends_quietly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "kernels.compile_check", "--arch", "80", "--only", "gelu_fwd",
                             "--jobs", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"compiling with triton")
    proc.stdout.close()  # `| head -1`: the table that follows meets a closed pipe
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and b"Traceback" not in err and b"Exception ignored" not in err
