"""Peak memory of a piece of work: how much more memory it needed, at its worst moment, than was in use before it.

    GPU  torch.cuda.max_memory_allocated, its counter reset when the work starts, minus torch.cuda.memory_allocated
         at that moment: the bytes of tensors PyTorch's allocator handed out (not its cache, not the CUDA context).
         The allocator counts on the host, when an op asks for memory, so reading the counters needs no
         synchronization: work queued on the GPU stays queued.

    CPU  PyTorch has no allocator statistics for the CPU, so the process's own: Linux keeps the peak resident set
         size (VmHWM in /proc/self/status) and resets it to the current size when "5" is written to
         /proc/self/clear_refs. The peak is VmHWM after the work minus VmRSS when it started.

Two things would make the CPU number lie, and both are dealt with. (1) glibc's malloc keeps freed memory for reuse
instead of returning it, and it raises its "big enough to map separately" threshold as a program frees big blocks,
so a freed tensor's pages could stay resident and a later allocation reuse them without the peak growing.
``prepare_cpu`` fixes the threshold at 128 KiB (``mallopt``): every buffer above it is its own mapping, returned to
the system when freed, so the resident size follows the live tensors. (2) Code and lazily built tables are paged in
the first time an op runs: measure after a warm-up run. What remains in the CPU number besides tensors is real
memory too (a BLAS library's scratch space, thread stacks), a few MiB; smaller tensors than 128 KiB may reuse freed
heap memory, and Linux updates the resident size in batches of pages per thread, so the CPU number is good to about
a MiB: coarse below a few MiB.

torch is imported inside functions so that importing this module does no work.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

MMAP_THRESHOLD = 128 * 1024  # glibc's own default before it starts adapting it: the bytes above which a buffer is
#                               mapped on its own (and unmapped when freed)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's <malloc.h>
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")

METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the pass (reset at its start) minus torch.cuda.memory_allocated "
            "at its start: tensor bytes, not the allocator's cache",
    "cpu": "the process's peak resident set during the pass (VmHWM, reset at its start through "
           "/proc/self/clear_refs) minus its resident set at the start; glibc malloc set to map every buffer over "
           "128 KiB on its own, so freed tensors leave the resident set",
}

_cpu_ready: str | None = None  # None: not tried yet; "": ready; otherwise why the CPU cannot be measured


def prepare(device) -> str | None:
    """Get ready to measure on ``device``; None when it can, else why not (one line, for a row's note)."""
    if device.type == "cuda":
        return None
    return prepare_cpu()


def prepare_cpu() -> str | None:
    """Make the resident set follow the live tensors (glibc's mallopt, see the top) and check that its peak can be
    reset. Call it before the big allocations. None when ready, else why the CPU's peak cannot be measured here."""
    global _cpu_ready
    if _cpu_ready is None:
        _cpu_ready = _try_prepare_cpu()
    return _cpu_ready or None


def _try_prepare_cpu() -> str:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not measured: needs glibc's malloc (mallopt), which this system lacks"
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)):
        return "not measured: glibc refused the mallopt settings"
    try:
        _status_bytes("VmRSS")
        CLEAR_REFS.write_text("5")
    except (OSError, StopIteration, ValueError) as exc:
        return f"not measured: cannot reset the peak resident set ({type(exc).__name__}: /proc/self/clear_refs)"
    return ""


def _status_bytes(key: str) -> int:
    """A size from /proc/self/status ("VmRSS:   123 kB") in bytes."""
    with open(STATUS) as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def current_bytes(device) -> int:
    """Memory in use now: tensor bytes on a GPU, the resident set on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_bytes("VmRSS")


def reset_peak(device) -> None:
    """Start a new peak from what is in use now."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        CLEAR_REFS.write_text("5")


def peak_bytes(device) -> int:
    """The most in use since the last ``reset_peak``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


class PeakMemory:
    """``with PeakMemory(device) as m: work()`` -> ``m.bytes``: the peak during the block minus what was in use when
    it started (or minus ``baseline``, a ``current_bytes`` taken earlier: e.g. before a forward whose saved tensors
    the measured backward then holds). Call ``prepare(device)`` once first."""

    def __init__(self, device, baseline: int | None = None):
        self.device, self.baseline, self.bytes = device, baseline, None

    def __enter__(self) -> "PeakMemory":
        if self.baseline is None:
            self.baseline = current_bytes(self.device)
        reset_peak(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = max(0, peak_bytes(self.device) - self.baseline)
