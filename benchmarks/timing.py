"""The one timer of the benchmarks, and the device's ceilings it measures first.

Timing.  On CUDA ``triton.testing.do_bench`` reports the median of many runs timed with CUDA events, after a
warm-up and with the L2 cache flushed before each run; without it (or with an unknown signature) the same is done
with CUDA events directly. On the CPU the host clock (``time.perf_counter``) gives the median over a few runs.
Warm-up (and with it Triton's JIT compilation and torch.compile) never enters the numbers. Whole steps (a training
step, a generation) are timed by ``Stopwatch``: CUDA events on a GPU, the host clock on the CPU.

Ceilings.  A throughput means little without the most this device can do, so every run starts by measuring two
numbers on the same device, in the same process, just before its own rows (datasheet figures are not used):

    bandwidth  a large device-to-device copy, dst.copy_(src): bytes read + bytes written = 2 * nbytes per copy
    FLOP/s     a large square matmul a @ b in the dtype asked for (bf16 by default): 2 * N^3 FLOPs per product

Inputs are random, never zeros (a matmul on zeros can run faster than on real data).

torch is imported inside functions so that importing this module does no work.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import statistics
import time

from benchmarks.common import free_memory, torch_dtype

# Sizes of the ceiling measurements: large enough to reach the device's steady state (1 GiB moves far past any
# cache; an 8192^3 matmul keeps every multiprocessor busy), small enough to take a second. Quick mode and the CPU
# use smaller ones.
COPY_BYTES = {"cuda": 1 << 30, "cuda-quick": 1 << 28, "cpu": 1 << 26, "cpu-quick": 1 << 24}
MATMUL_N = {"cuda": 8192, "cuda-quick": 4096, "cpu": 1024, "cpu-quick": 256}


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



class Stopwatch:
    """Times whole regions of work (a training step, a generation): CUDA events on a GPU (the GPU's own clock; the
    regions stay queued, nothing waits between them), the host clock otherwise (``device=None``: always the host
    clock, for wall time such as a warm-up's compile).

        watch = Stopwatch(device)
        with watch.region():
            step()
        watch.ms()  # one time per region, in milliseconds (waits for the GPU first)
    """

    def __init__(self, device=None):
        self.on_gpu = device is not None and device.type == "cuda"
        self.device = device
        self._regions: list = []

    @contextlib.contextmanager
    def region(self):
        if self.on_gpu:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._regions.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._regions.append((time.perf_counter() - t0) * 1e3)

    def ms(self) -> list[float]:
        if not self.on_gpu:
            return list(self._regions)
        import torch

        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in self._regions]


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

