"""What every benchmark shares before and around its rows: the command line's common options and their checks, the
device, and the loop that runs rows one by one so that one failure, a time limit or a signal never loses the rest.

Where the rest lives: ``benchmarks/timing.py`` (the timer, the device's ceilings, the time budget),
``benchmarks/results.py`` (the files a run writes, its tables and figures), ``benchmarks/memory.py`` (peak memory).

Errors.  A user's mistake is a ``BenchmarkError`` (or another ``MinigptError``, e.g. minigpt's ``ConfigError`` from
the device's resolution), raised like any exception; each benchmark's ``main`` runs its work through
``kernels.cli.run_cli(work)``, which prints it as ``error: <what> — <how to fix>`` and exits 1.

torch is imported inside functions so that importing this module does no work.
"""
from __future__ import annotations

import math
import os
import re
import signal
import tempfile
from pathlib import Path

from kernels.errors import MinigptError

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # minigpt.runtime.DTYPES' names: argparse's choices without importing torch
# The recorded results, committed with the code: written only when --out names them, and never by a --quick run.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = Path("benchmark-results")  # in the current folder: a run with no --out replaces no recorded result
SEEDS = range(-2**63, 2**64)  # what torch.manual_seed takes; beyond it, a traceback after the ceilings


class BenchmarkError(MinigptError, ValueError):
    """An option or a file the user must change; the message says what and how."""




# ----------------------------------------------------------------------------------------------------------------
# Device


def benchmark_device(name: str):
    """minigpt's ``resolve_device`` (``auto`` -> cuda when there is a GPU; ``cuda`` without one is a clear error),
    held to the devices the timers know: ``auto`` on a Mac's GPU is the CPU, ``--device mps`` is refused."""
    import torch

    from minigpt.runtime import resolve_device

    device = resolve_device(name)
    if device.type == "mps" and name == "auto":
        return torch.device("cpu")
    if device.type not in ("cuda", "cpu"):
        raise BenchmarkError(f"unsupported device {name!r} — the benchmarks time on cuda or cpu: use auto, cpu or "
                             "cuda")
    return device


def prepare_interpreter(device) -> None:
    """On the CPU the Triton kernels can only run in Triton's interpreter, which must be switched on before the
    kernel modules are imported (``kernels.get_backend('triton')`` does it too when there is no GPU at all; this
    also covers ``--device cpu`` on a machine that has one)."""
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"


def set_threads(device, threads: int | None, quick: bool) -> None:
    """CPU threads for torch: as asked, else 1 in --quick mode on the CPU (a small shared CI machine times one
    thread steadily; several threads there mostly wait for each other), else torch's default."""
    import torch

    if threads is None and quick and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)



def torch_dtype(name: str):
    from minigpt.runtime import DTYPES

    return DTYPES[name]


def device_name(device) -> str:
    """The device's marketing name, lower case, every run of other characters turned into one '-':
    'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; the CPU is 'cpu'."""
    import torch

    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def default_out_dir(device) -> Path:
    """Where a run without --out writes: ``./benchmark-results/<device-name>/``, outside the recorded results."""
    return DEFAULT_OUT / device_name(device)


def check_out_dir(out: Path, names: list[str], flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot take the files ``names``: a file, a folder under a
    file, one of the names taken by a folder, or a place that cannot be written (permissions, read-only disk).
    Nothing is created: the probe file is anonymous and gone at once. ``flag`` names the option in the message."""
    for above in [out, *out.parents]:
        if not above.exists():
            continue
        if not above.is_dir():
            what = "is a file, not a folder" if above == out else f"cannot be made: {above} is a file"
            raise BenchmarkError(f"{flag} {out} {what} — pass a folder (it is created if missing)")
        try:
            tempfile.TemporaryFile(dir=above).close()
        except OSError as e:
            raise BenchmarkError(f"cannot write in {flag} {out}: {e.strerror} (in {above}) — pass a folder you "
                                 "can write") from None
        break
    for name in names:
        if (out / name).is_dir():
            raise BenchmarkError(f"{out / name} is a folder, not a file — move it away, or pass another {flag}")


def results_names(stem: str) -> list[str]:
    """The files a benchmark named ``stem`` writes (``write_results`` and its plot)."""
    return [f"{stem}.json", f"{stem}.csv", f"{stem}.png"]


def check_run_args(args) -> None:
    """Refuse, before any work, values of the options every benchmark takes that would fail late or be ignored."""
    if args.threads is not None and args.threads < 1:
        raise BenchmarkError(f"--threads must be at least 1, got {args.threads} — or leave it out")
    if args.budget_s is not None and not args.budget_s >= 0:  # `not >=`: NaN too, which would never expire
        raise BenchmarkError(f"--budget-s must be 0 or more seconds, got {args.budget_s} — e.g. --budget-s 600")
    if args.seed not in SEEDS:
        raise BenchmarkError(f"--seed {args.seed} does not fit in 64 bits — use a seed from -2**63 to 2**64 - 1")
    name = args.name
    if not name or name in (".", "..") or any(sep and sep in name for sep in (os.sep, os.altsep)):
        raise BenchmarkError(f"--name {name!r} is not a plain file name — give a name without folders (e.g. "
                             "--name kernels-quick); the folder goes in --out")


def check_positive(args, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    """Refuse a number flag (``args.<name>``: a number, a list of them, or None = unset) that is not above 0 (0 is
    let through for ``allow_zero``), NaN or infinite."""
    for name in names:
        value = getattr(args, name)
        zero_ok = name in allow_zero
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if not (math.isfinite(v) and (v >= 0 if zero_ok else v > 0)):
                flag = "--" + name.replace("_", "-")
                raise BenchmarkError(f"{flag} must be {'0 or more' if zero_ok else 'positive'}, got {v} — give a "
                                     f"finite number {'>= 0' if zero_ok else 'above 0'}, or leave it out for the "
                                     "default")


def check_out(args) -> None:
    """Refuse a --quick run whose --out is in the recorded results (``benchmarks/results/``): its tiny sizes would
    replace a full run's numbers."""
    if args.quick and args.out is not None and args.out.resolve().is_relative_to(RESULTS_DIR):
        raise BenchmarkError(f"--quick would replace the recorded results in {args.out} — pass another --out "
                             f"(or drop --out: {DEFAULT_OUT}/<device-name>/)")



def l2_cache_bytes(device) -> int:
    """The GPU's L2 cache size as the device reports it; 0 on the CPU, where inputs are not rotated."""
    import torch

    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def memory_budget(device, fraction: float = 0.6) -> int:
    """Bytes a benchmark row may plan to allocate: a fraction of what is free now (GPU) or available (CPU)."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # ours to reuse
        return int((free + cached) * fraction)
    try:
        with open("/proc/meminfo") as f:
            available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return int(available_kb * 1024 * fraction)
    except (OSError, StopIteration, ValueError):
        return int(4 * 2**30 * fraction)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (NaN when ``a`` has NaNs, so that it never passes an ``err <= tol`` test)."""
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error on either device (CUDA raises its own type, the CPU a RuntimeError)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``Type: first line of the message``; cut to ``limit`` characters when one is given (for a table cell —
    what a results file stores is never cut: the whole line is what tells a failure from another)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    """The whole message of a row's error, every line of it, for the results file's ``error`` column."""
    return f"{type(exc).__name__}: {str(exc).strip()}"


def free_memory(device, collect: bool = False) -> None:
    """Return cached GPU blocks to the driver; ``collect`` also runs the garbage collector (after an error, whose
    traceback can hold tensors in reference cycles) — it takes a fraction of a second with torch's big heap."""
    import gc

    import torch

    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# The command line: the options every benchmark takes, and its opening


def add_run_args(p, what: str) -> None:
    """The options both benchmarks take (``what``: the file stem, for --summarize's help)."""
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions: CI and the CPU")
    p.add_argument("--device", default="auto", help="auto (default), cuda or cpu")
    p.add_argument("--budget-s", type=float, help="start no new row after this many seconds (default: no limit)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 with --quick on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights (default 0)")
    p.add_argument("--out", type=Path, help=f"output folder (default ./{DEFAULT_OUT}/<device-name>/; the recorded "
                   "results in benchmarks/results/ are written only when named here, and never with --quick)")
    p.add_argument("--name", default=what, help=f"the results files' name: NAME.json, .csv, .png (default {what})")
    p.add_argument("--summarize", type=Path, metavar="JSON",
                   help=f"print the summary of a {what}.json written earlier and exit (runs nothing)")


def fill_defaults(args, quick: dict, full: dict) -> None:
    """Set every option left unset (None) to its --quick or full-run default."""
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)



def start_run(args, summarize, quick: dict, full: dict, positive: tuple[str, ...] = (),
              allow_zero: tuple[str, ...] = (), check=None):
    """What every benchmark does before its rows, in this order: ``--summarize JSON`` (print ``summarize`` of it, and
    nothing more to do: returns None); every option left unset to its --quick or full default (``quick``, ``full``);
    the number options ``positive`` above 0 (or 0 and above: ``allow_zero``); the benchmark's own ``check(args)``;
    then ``setup``: the common options, the device, --out. Returns the device."""
    if args.summarize:
        from benchmarks.results import read_results

        print(summarize(read_results(args.summarize)))
        return None
    fill_defaults(args, quick, full)
    check_positive(args, positive, allow_zero)
    if check is not None:
        check(args)
    return setup(args)


def setup(args):
    """The common options' checks, device, --out's check, interpreter switch, threads and the SIGTERM handler: what
    every benchmark does before its rows."""
    check_out(args)
    check_run_args(args)
    device = benchmark_device(args.device)
    check_out_dir(args.out or default_out_dir(device), results_names(args.name))
    stop_on_sigterm()
    prepare_interpreter(device)
    set_threads(device, args.threads, args.quick)
    return device


# ----------------------------------------------------------------------------------------------------------------
# Running rows: a part that fails, runs out of time or is stopped still keeps what it measured


class Terminated(KeyboardInterrupt):
    """Raised on SIGTERM (e.g. from ``timeout``) so a run can write its partial results before it exits."""


def stop_on_sigterm() -> None:
    def handler(signum, frame):
        stop = Terminated(f"received signal {signum}")
        stop.signum = signum  # kernels/cli.py's run_cli exits with 128 + it, as the shell expects
        raise stop

    signal.signal(signal.SIGTERM, handler)


def run_rows(planned: list, run_one, describe, cleanup, save=None) -> tuple[list[dict], str | None]:
    """``run_one(row)`` for each planned row (a dataclass), printing ``describe(row, result)`` after each.

    A row that raises becomes a result with a status (``skipped: out of memory`` or ``failed: <one line>``, the
    whole message in its ``error`` column) and the next row runs; ``cleanup()`` follows every row, then
    ``save(rows)`` (when given: writing the rows so far, so that a run killed outright keeps them). Ctrl-C, or the
    SIGINT / SIGTERM of an outer ``timeout``, ends the loop and keeps the rows measured so far. Returns (rows, why
    the run was interrupted or None).
    """
    from dataclasses import asdict

    rows, interrupted = [], None
    try:
        for row in planned:
            try:
                result = run_one(row)
            except Exception as exc:  # one row's failure (OOM, a compile error) never stops the others
                status = "skipped: out of memory" if is_oom(exc) else f"failed: {one_line(exc)}"
                result = dict(asdict(row), status=status, error=error_text(exc))
            finally:
                cleanup()
            rows.append(result)
            if save is not None:
                save(rows)
            print(f"[{len(rows)}/{len(planned)}] {describe(row, result)}", flush=True)
    except KeyboardInterrupt as exc:
        interrupted = one_line(exc)
        print(f"interrupted ({interrupted}): writing the {len(rows)} rows measured so far", flush=True)
    return rows, interrupted
