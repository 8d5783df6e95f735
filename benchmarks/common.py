"""What both benchmarks share: the device, its measured ceilings, the timer, time limits and the output files.

Ceilings.  A throughput means little without the most this device can do, so every run starts by measuring two
numbers on the same device, in the same process, just before its own rows (datasheet figures are not used):

    bandwidth  a large device-to-device copy, dst.copy_(src): bytes read + bytes written = 2 * nbytes per copy
    FLOP/s     a large square matmul a @ b in the dtype asked for (bf16 by default): 2 * N^3 FLOPs per product

Inputs are random, never zeros (a matmul on zeros can run faster than on real data).

Timing.  On CUDA ``triton.testing.do_bench`` reports the median of many runs timed with CUDA events, after a
warm-up and with the L2 cache flushed before each run; without it (or with an unknown signature) the same is done
with CUDA events directly. On the CPU the host clock (``time.perf_counter``) gives the median over a few runs.
Warm-up (and with it Triton's JIT compilation and torch.compile) never enters the numbers.

torch is imported inside functions so that importing this module does no work.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import inspect
import io
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from minigpt.checkpoint import atomic_open
from minigpt.metrics import csv_cell

DTYPE_NAMES = ("bf16", "fp16", "fp32")
# The recorded results, committed with the code: written only when --out names them, and never by a --quick run.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = Path("benchmark-results")  # in the current folder: a run with no --out replaces no recorded result
SEEDS = range(-2**63, 2**64)  # what torch.manual_seed takes; beyond it, a traceback after the ceilings

# Sizes of the ceiling measurements: large enough to reach the device's steady state (1 GiB moves far past any
# cache; an 8192^3 matmul keeps every multiprocessor busy), small enough to take a second. Quick mode and the CPU
# use smaller ones.
COPY_BYTES = {"cuda": 1 << 30, "cuda-quick": 1 << 28, "cpu": 1 << 26, "cpu-quick": 1 << 24}
MATMUL_N = {"cuda": 8192, "cuda-quick": 4096, "cpu": 1024, "cpu-quick": 256}


# ----------------------------------------------------------------------------------------------------------------
# Device


def resolve_device(name: str):
    """``auto`` -> cuda when there is a GPU, else cpu; ``cuda`` without a GPU is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown device {name!r} — use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible — use --device cpu (or auto)")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"error: unsupported device {name!r} — use auto, cpu or cuda")
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
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


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
            raise SystemExit(f"error: {flag} {out} {what} — pass a folder (it is created if missing)")
        try:
            tempfile.TemporaryFile(dir=above).close()
        except OSError as e:
            raise SystemExit(f"error: cannot write in {flag} {out}: {e.strerror} (in {above}) — pass a folder you "
                             "can write") from None
        break
    for name in names:
        if (out / name).is_dir():
            raise SystemExit(f"error: {out / name} is a folder, not a file — move it away, or pass another {flag}")


def results_names(stem: str) -> list[str]:
    """The files a benchmark named ``stem`` writes (``write_results`` and its plot)."""
    return [f"{stem}.json", f"{stem}.csv", f"{stem}.png"]


def check_run_args(args) -> None:
    """Refuse, before any work, values of the options every benchmark takes that would fail late or be ignored."""
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads must be at least 1, got {args.threads} — or leave it out")
    if args.budget_s is not None and not args.budget_s >= 0:  # `not >=`: NaN too, which would never expire
        raise SystemExit(f"error: --budget-s must be 0 or more seconds, got {args.budget_s} — e.g. --budget-s 600")
    if args.seed not in SEEDS:
        raise SystemExit(f"error: --seed {args.seed} does not fit in 64 bits — use a seed from -2**63 to 2**64 - 1")
    name = args.name
    if not name or name in (".", "..") or any(sep and sep in name for sep in (os.sep, os.altsep)):
        raise SystemExit(f"error: --name {name!r} is not a plain file name — give a name without folders (e.g. "
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
                raise SystemExit(f"error: {flag} must be {'0 or more' if zero_ok else 'positive'}, got {v} — give a "
                                 f"finite number {'>= 0' if zero_ok else 'above 0'}, or leave it out for the default")


def check_out(args) -> None:
    """Refuse a --quick run whose --out is in the recorded results (``benchmarks/results/``): its tiny sizes would
    replace a full run's numbers."""
    if args.quick and args.out is not None and args.out.resolve().is_relative_to(RESULTS_DIR):
        raise SystemExit(f"error: --quick would replace the recorded results in {args.out} — pass another --out "
                         f"(or drop --out: {DEFAULT_OUT}/<device-name>/)")


def environment(device) -> dict:
    """Versions, device and date: what a results table must state next to its numbers."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), l2_bytes=l2_cache_bytes(device))
    else:
        info.update(cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                    load_average_1m=round(os.getloadavg()[0], 2))  # other work on the machine slows the timings
    return info


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
# Timing


def time_ms(fn, device, warmup_ms: float = 25.0, rep_ms: float = 100.0, grad_to_none=None) -> float:
    """Median milliseconds of one call of ``fn`` on ``device`` (warm-up excluded).

    ``grad_to_none``: tensors whose ``.grad`` is reset before every run, so a timed backward never pays for
    accumulating into an old gradient.
    """
    if device.type == "cuda":
        bench = _triton_do_bench()
        if bench is not None:
            return bench(fn, warmup_ms, rep_ms, grad_to_none)
        return _cuda_events_median(fn, warmup_ms, rep_ms, grad_to_none)
    return _host_clock_median(fn, warmup_ms, rep_ms, grad_to_none)


def _triton_do_bench():
    """``do_bench`` asked for the median, whatever spelling this Triton has (``return_mode`` in 3.x, with
    ``quantiles`` as the older way); None when Triton is missing or its signature is unknown."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    params = inspect.signature(do_bench).parameters
    if not {"warmup", "rep", "grad_to_none"} <= params.keys():
        return None
    if "return_mode" in params:
        def bench(fn, warmup_ms, rep_ms, grad_to_none):
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
    elif "quantiles" in params:
        def bench(fn, warmup_ms, rep_ms, grad_to_none):
            result = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5])
            return float(result[0] if isinstance(result, (list, tuple)) else result)
    else:
        return None
    return bench


def _reset_grads(tensors) -> None:
    for t in tensors or ():
        t.grad = None


def _cuda_events_median(fn, warmup_ms, rep_ms, grad_to_none) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(5, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _reset_grads(grad_to_none)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _host_clock_median(fn, warmup_ms, rep_ms, grad_to_none) -> float:
    _reset_grads(grad_to_none)
    fn()  # the first call: allocations, lazy initialisation
    t0 = time.perf_counter()
    _reset_grads(grad_to_none)
    fn()
    estimate = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(min(10, int(warmup_ms / estimate))):
        _reset_grads(grad_to_none)
        fn()
    times = []
    for _ in range(max(3, min(100, int(rep_ms / estimate)))):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_pass(fn, sets, pass_: str, device, warmup_ms: float, rep_ms: float) -> float:
    """Median ms of one pass of ``fn`` over input sets (``.tensors``: leaves requiring grad, ``.dy``: the upstream
    gradient), cycling through them so that rotated copies keep the inputs out of the cache. ``fwd`` times the
    forward as training runs it (saving what backward needs); ``bwd`` times out.backward(dy) alone (the forwards run
    once, outside the timed region, and the graph is kept); ``fwd+bwd`` both. Gradients are reset before every run."""
    run, leaves = pass_runner(fn, sets, pass_)
    return time_ms(run, device, warmup_ms, rep_ms, grad_to_none=leaves)


def time_interleaved(runners: dict, rounds: int) -> dict:
    """The ms of every run of each of several ``pass_runner``s on the CPU, taking turns: after one warm-up call each,
    every round runs each once. On a machine shared with other work, whose load changes during a measurement,
    contenders timed one after another can meet different conditions; taking turns gives each the same ones, on
    average. Returns name -> [ms of round 1, round 2, ...]."""
    for run, leaves in runners.values():
        _reset_grads(leaves)
        run()  # the first call: allocations, lazy initialisation
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (run, leaves) in runners.items():
            _reset_grads(leaves)
            t0 = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def pass_runner(fn, sets, pass_: str):
    """(a function running one pass of ``fn``, the tensors whose gradients to reset before each run): see
    ``time_pass``."""
    leaves = [t for s in sets for t in s.tensors]
    order = itertools.cycle(range(len(sets)))
    if pass_ == "fwd":
        def run():
            fn(*sets[next(order)].tensors)
    elif pass_ == "bwd":
        outs = [fn(*s.tensors) for s in sets]  # the forwards, outside the timed region

        def run():
            i = next(order)
            outs[i].backward(sets[i].dy, retain_graph=True)
    else:
        def run():
            s = sets[next(order)]
            fn(*s.tensors).backward(s.dy)
    return run, leaves


def measure_ceilings(device, matmul_dtypes=("bf16",), quick: bool = False) -> dict:
    """This device's bandwidth (GB/s, from a copy) and matmul rate (TFLOP/s per dtype), measured now."""
    key = device.type + ("-quick" if quick else "")
    rep_ms = 50 if quick else 200
    n = MATMUL_N[key]
    ceilings = {"copy_bytes": COPY_BYTES[key], "matmul_n": n,
                "bandwidth_gbps": 2 * COPY_BYTES[key] / (_copy_ms(COPY_BYTES[key], device, rep_ms) * 1e-3) / 1e9,
                "matmul_tflops": {name: 2 * n**3 / (_matmul_ms(n, name, device, rep_ms) * 1e-3) / 1e12
                                  for name in dict.fromkeys(matmul_dtypes)}}  # bytes read + written; 2 FLOPs/FMA
    free_memory(device)
    return ceilings


def _copy_ms(nbytes: int, device, rep_ms: float) -> float:
    import torch

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, warmup_ms=10, rep_ms=rep_ms)


def _matmul_ms(n: int, dtype: str, device, rep_ms: float) -> float:
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch_dtype(dtype)) for _ in range(2))
    c = torch.empty_like(a)
    return time_ms(lambda: torch.matmul(a, b, out=c), device, warmup_ms=10, rep_ms=rep_ms)


# ----------------------------------------------------------------------------------------------------------------
# Time limits: a part that runs out of time still writes what it measured


class Budget:
    """Seconds a run may spend (None: unlimited); rows after the limit are recorded as skipped, not run."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.seconds is not None and self.spent() > self.seconds


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


def report(out_dir: Path, stem: str, rows: list[dict], meta: dict, plot, summarize) -> None:
    """Write the results (``finish``), print their summary and the files written."""
    rows, paths = finish(out_dir, stem, rows, meta, plot)
    print("\n" + summarize({"rows": rows, "meta": meta}))
    print("wrote " + ", ".join(str(p) for p in paths))


# ----------------------------------------------------------------------------------------------------------------
# Output


def read_results(path: Path) -> dict:
    """A results JSON written by a benchmark (for --summarize); a one-line error when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read results from {path}: {one_line(e)} — pass the kernels.json or "
                         "train.json a benchmark run wrote") from None
    if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
        raise SystemExit(f"error: {path} is not a benchmark results file (no 'rows' and 'meta') — pass the "
                         "kernels.json or train.json a benchmark run wrote")
    return data


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


def setup(args):
    """The common options' checks, device, --out's check, interpreter switch, threads and the SIGTERM handler: what
    every benchmark does before its rows."""
    check_out(args)
    check_run_args(args)
    device = resolve_device(args.device)
    check_out_dir(args.out or default_out_dir(device), results_names(args.name))
    stop_on_sigterm()
    prepare_interpreter(device)
    set_threads(device, args.threads, args.quick)
    return device


def run_meta(device, ceilings: dict, args, budget: Budget, interrupted: str | None, counting: str) -> dict:
    """What the JSON file records besides its rows."""
    return dict(environment=environment(device), ceilings=ceilings, counting=counting, interrupted=interrupted,
                seconds=round(budget.spent(), 1),
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


def finish(out_dir: Path, stem: str, rows: list[dict], meta: dict, plot) -> tuple[list[dict], list[Path]]:
    """Give every row every column, write ``<stem>.json``, ``.csv`` and (``plot(rows, path)``) ``.png``."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in keys} for r in rows]
    paths = write_results(out_dir, stem, rows, meta)
    try:
        png = plot(rows, out_dir / f"{stem}.png") if rows else None
    except Exception as exc:  # a figure is a convenience: the numbers are already written
        print(f"warning: no {stem}.png ({one_line(exc)})", file=sys.stderr)
        png = None
    return rows, paths + ([png] if png else [])


def write_results(out_dir: Path, stem: str, rows: list[dict], meta: dict) -> list[Path]:
    """``<stem>.json`` ({"meta": ..., "rows": [...]}) and ``<stem>.csv`` (one line per row) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    with _naming(json_path), atomic_open(json_path) as f:  # a run killed mid-write leaves the previous file
        f.write((json.dumps({"meta": meta, "rows": rows}, indent=1, default=_jsonable) + "\n").encode())
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(row.get(k)) for k in columns})
    with _naming(csv_path), atomic_open(csv_path) as f:
        f.write(text.getvalue().encode())
    return [json_path, csv_path]


@contextlib.contextmanager
def _naming(path: Path):
    """Give an OSError raised while writing ``path`` that file's name: a failed write (a full disk) names none, and
    the one-line error at the command line should say which file it was."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def partial_writer(out_dir: Path, stem: str, meta):
    """``save(rows)`` for ``run_rows``: the results so far, with ``meta()`` marked partial (the final write
    replaces them)."""
    return lambda rows: write_results(out_dir, stem, rows, dict(meta(), partial=True))


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def format_table(headers: list[str], lines: list[list], right: set[int] | None = None) -> str:
    """A plain fixed-width table; ``right`` holds the indices of right-aligned (numeric) columns."""
    right = right or set()
    cells = [[("" if c is None else str(c)) for c in line] for line in lines]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def fmt(line):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule] + [fmt(line) for line in cells])


def fmt_num(value, digits: int = 3) -> str:
    """A number in a table cell: 3 significant digits, '-' for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot with a file-only backend (no display needed), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
