"""``python -m kernels.compile_check``: compile every Triton kernel for real GPUs, on a machine without one.

Why
---
Without a GPU the tests run the kernels in Triton's interpreter, which executes the Python body with NumPy and
accepts code the real compiler rejects (a non-power-of-two ``tl.arange``, a ``tl.dot`` on tiles that are too small,
a type mix-up). A kernel that passes every interpreter test can still fail to compile on the GPU, or compile into
something slow: registers spilled to local memory, or more shared memory than the chip has (then it cannot launch).

How
---
``kernels/compile_targets.py`` lists, per kernel file, one dict per (kernel, configuration) the project launches
on a GPU, with the keys

    name          str, e.g. "layer_norm_fwd"
    fn            the @triton.jit function
    signature     {argument name: Triton type string}, e.g. {"X": "*bf16", "n": "i32", "eps": "fp32"}
    constexprs    {NAME: value} for the tl.constexpr arguments
    num_warps, num_stages
    config        (optional) a short label for the table; built from the constexprs when missing
    aligned       (optional) names of integer arguments whose launch value is a multiple of 16 (Triton specializes
                  those at launch, which enables vectorized loads; pointers are always taken as 16-byte aligned,
                  as PyTorch's allocations are)
    spills_allowed  (optional) True for a tile configuration a tuner only tries (see kernels/launch.py): its spills
                  are reported, not failed, since it is correct and simply loses the timing where it spills

For every target and every architecture, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs
the whole pipeline a launch would run: Triton IR -> TritonGPU IR -> LLVM IR -> PTX -> cubin (NVIDIA's ``ptxas``,
shipped with Triton, needs no GPU). From the result:

    registers, spills   per thread, read from the cubin with ``cuobjdump --dump-resource-usage`` (also shipped with
                        Triton): REG is the register count; STACK + LOCAL the bytes of per-thread local memory.
                        A Triton kernel makes no calls and has no local arrays, so any stack frame there is
                        spilled registers (``ptxas -v`` reports the same kernel as "N bytes stack frame, N bytes
                        spill stores")
    shared memory       ``compiled.metadata.shared``, bytes per block, against the chip's limit below

The program prints which Triton it used (spills change between its versions, so CI runs it under each version a
GPU machine may have), a table, and exits non-zero on any compile error, spill (of a default configuration), or
shared memory over the limit. It must run WITHOUT ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit``
returns interpreted functions, which cannot be compiled.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from .cli import run_cli

DEFAULT_ARCHS = (80, 90)
# What --arch takes: two or three digits, major then minor (sm_80, sm_120). Outside this, ptxas knows no such GPU;
# the range is wide on purpose, so a new GPU needs no change here (ptxas itself then says whether it knows it).
ARCHS = range(50, 200)
# Most dynamic shared memory one block may use (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {
    80: 166912,  # A100: 163 KiB
    86: 101376,  # RTX 30xx: 99 KiB
    89: 101376,  # RTX 40xx / L4: 99 KiB
    90: 232448,  # H100: 227 KiB
}


@dataclass
class Result:
    """What compiling one target for one architecture gave."""

    name: str
    config: str
    arch: int
    registers: int | None = None  # per thread
    spills: int | None = None  # bytes of local memory (stack frame) per thread
    shared: int | None = None  # bytes per block
    status: str = "ok"  # "ok", "error", "spills", "spills (alternative)", "shared memory over the limit"
    error: str = ""  # the compiler's message when status is "error"

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "spills (alternative)")


# ----------------------------------------------------------------------------------------------------------------
# Collecting targets


def collect_targets(only: list[str] | None = None, kernels: tuple[str, ...] | None = None) -> list[dict]:
    """The targets of ``kernels/compile_targets.py`` (of the kernel files named in ``kernels``, default all), filtered
    to names containing one of ``only``. Importing the kernel files compiles nothing; one that fails to import is an
    error (it would fail on the GPU too)."""
    from .compile_targets import TARGETS  # imports Triton: after check_args has said whether it is there

    unknown = sorted(set(kernels or ()) - set(TARGETS))
    if unknown:
        raise ValueError(f"no compile targets for {', '.join(unknown)} — choose among {', '.join(TARGETS)}")
    targets = []
    for name, make_targets in TARGETS.items():
        if kernels is not None and name not in kernels:
            continue
        for target in make_targets():
            if only and not any(pattern in target["name"] for pattern in only):
                continue
            targets.append(target)
    return targets


def _config_label(target: dict) -> str:
    if target.get("config"):
        return target["config"]
    constexprs = " ".join(f"{k}={v}" for k, v in target.get("constexprs", {}).items())
    dtypes = sorted({t[1:] for t in target["signature"].values() if t.startswith("*")})
    return f"{'/'.join(dtypes)} {constexprs} w{target['num_warps']} s{target['num_stages']}".strip()


# ----------------------------------------------------------------------------------------------------------------
# Compiling one target


def _cuobjdump() -> str | None:
    """The cuobjdump Triton ships (triton/backends/nvidia/bin), else one on PATH."""
    from triton import knobs

    tool = getattr(getattr(knobs, "nvidia", None), "cuobjdump", None)
    path = getattr(tool, "path", None)
    if path and os.path.exists(path):
        return path
    return shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) per thread of the kernel in ``cubin``, from cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton ships it in triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    return parse_resource_usage(out.stdout)


def parse_resource_usage(text: str) -> tuple[int, int]:
    """Registers and spill bytes (stack + local) from a ``cuobjdump --dump-resource-usage`` listing of one kernel."""
    fields = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, value = item.partition(":")
                if value.isdigit():
                    fields[key] = int(value)
    if "REG" not in fields:
        raise RuntimeError(f"no register count in cuobjdump's output: {text.strip()[:200]!r}")
    return fields["REG"], fields.get("STACK", 0) + fields.get("LOCAL", 0)


def compile_target(target: dict, arch: int) -> Result:
    """Compile ``target`` for compute capability ``arch`` (80 = sm_80) and judge the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(name=target["name"], config=_config_label(target), arch=arch)
    fn = target["fn"]
    constexprs = dict(target.get("constexprs", {}))
    # Constexpr arguments are listed in the signature as "constexpr", as a launch does.
    signature = dict(target["signature"])
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    # What a launch would assume about alignment (see the module docstring).
    aligned = {n for n, t in signature.items() if t.startswith("*")} | set(target.get("aligned", ()))
    # sorted: Triton's cache key includes str(attrs), and a set's order changes from one process to the next
    attrs = {(i,): [["tt.divisibility", 16]] for i in sorted(fn.arg_names.index(n) for n in aligned)}
    options = {"num_warps": target["num_warps"], "num_stages": target["num_stages"]}
    try:
        with warnings.catch_warnings():
            # Triton may announce a future change of its fp-fusion default on every compile; not about our code
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        result.shared = int(compiled.metadata.shared)
        result.registers, result.spills = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # a compile error is a result to report, not a crash of the checker
        result.status = "error"
        result.error = f"{type(e).__name__}: {e}".strip()[:4000]
        return result
    limit = SHARED_MEMORY_LIMIT.get(arch)
    if result.spills:
        result.status = "spills (alternative)" if target.get("spills_allowed") else "spills"
    elif limit is not None and result.shared > limit:
        result.status = f"shared memory over the limit ({limit})"
    return result


# ----------------------------------------------------------------------------------------------------------------
# Compiling many, in parallel


_POOL_TARGETS: list[dict] = []  # read by the forked worker processes (a @triton.jit function does not pickle)


def _compile_by_index(index: int, arch: int) -> Result:
    return compile_target(_POOL_TARGETS[index], arch)


def check_targets(targets: list[dict], archs=DEFAULT_ARCHS, jobs: int | None = None) -> list[Result]:
    """Compile every target for every architecture; one ``Result`` each, in (target, arch) order.

    ``jobs`` worker processes share the work (default: one per CPU core); each compile is mostly single-threaded
    C++ and ``ptxas``, so processes, not threads.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check cannot run under TRITON_INTERPRET=1 (interpreted kernels do not compile)")
    compiles = [(i, arch) for i in range(len(targets)) for arch in archs]  # (target index, architecture)
    jobs = min(jobs or os.cpu_count() or 1, len(compiles))
    if jobs <= 1:
        return [compile_target(targets[i], arch) for i, arch in compiles]
    global _POOL_TARGETS
    _POOL_TARGETS = targets
    try:
        context = multiprocessing.get_context("fork")  # the children inherit _POOL_TARGETS
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_compile_by_index, i, arch) for i, arch in compiles]
            return [f.result() for f in futures]
    finally:
        _POOL_TARGETS = []


def triton_description() -> str:
    """Which Triton compiles, e.g. "triton 3.6.0 (/venv/lib/python3.12/site-packages/triton)": register counts and
    spills change from one Triton version to the next, so a table means little without it."""
    import triton

    return f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})"


def format_table(results: list[Result]) -> str:
    """The results as an aligned text table, one line per (target, arch)."""
    header = ("kernel", "config", "arch", "registers", "spills", "shared memory", "status")
    rows = [header]
    for r in results:
        rows.append((
            r.name, r.config, f"sm_{r.arch}",
            "-" if r.registers is None else str(r.registers),
            "-" if r.spills is None else str(r.spills),
            "-" if r.shared is None else str(r.shared),
            r.status,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_args(args) -> None:
    """Refuse, before any compile, flag values that could only fail every target or be silently ignored."""
    for arch in args.arch:
        if arch not in ARCHS:
            raise SystemExit(f"error: --arch {arch} is not a compute capability — write its two digits together, "
                             f"e.g. 80 for sm_80 (A100) or 90 for sm_90 (H100)")
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1, got {args.jobs} — or leave it out (one per CPU core)")
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("error: compiling the kernels needs Triton — pip install triton (Linux)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: TRITON_INTERPRET=1 is set — interpreted kernels cannot be compiled; run "
                         "`env -u TRITON_INTERPRET python -m kernels.compile_check`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.compile_check",
        description="Compile every Triton kernel for real GPUs (no GPU needed) and report registers, spills and "
        "shared memory; exit non-zero on a compile error, a spill, or shared memory over the limit.",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities to compile for, e.g. 80 90 (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="only kernels whose name contains one of these, e.g. --only gelu layer_norm_fwd")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    check_args(args)
    return run_cli(lambda: _compile_and_report(args))


def _compile_and_report(args) -> int:
    start = time.time()
    compiler = triton_description()
    print(f"compiling with {compiler}", flush=True)
    targets = collect_targets(only=args.only)
    if not targets:
        print("error: no kernels to compile — check --only (names such as gelu_fwd, layer_norm_bwd_dx)",
              file=sys.stderr)
        return 2
    results = check_targets(targets, args.arch, jobs=args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:  # again below the table, where a CI log's reader looks first
        detail = r.error or (f"{r.spills} bytes of spills, {r.registers} registers" if r.spills else
                             f"{r.status}, {r.shared} bytes")
        print(f"\nfailed: {r.name} [{r.config}] sm_{r.arch}: {detail}")
    elapsed = time.time() - start
    print(f"\n{len(results)} compiles ({len(targets)} kernel configurations x {len(args.arch)} architectures) with "
          f"{compiler}, {len(failed)} failed, in {elapsed:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
