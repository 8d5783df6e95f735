"""Launch helpers shared by every Triton kernel: device checks, the interpreter's dtype workaround, block sizes.

Kept in one place so each kernel file reads as its algorithm, not as plumbing.
"""
from __future__ import annotations

import os

import torch

# Triton's CPU interpreter (TRITON_INTERPRET=1) has two known bfloat16 traps (benchmarks/NOTES.md):
#   * tl.dot on bfloat16 operands returns garbage;
#   * an in-kernel float32 -> bfloat16 cast does not round to nearest-even like torch does.
# So under the interpreter a bfloat16 input is run through the kernel as float32 and the result is rounded to
# bfloat16 by torch. On a GPU the kernels see the real bfloat16 tensors and nothing changes.
_INTERPRETER_UPCAST = {torch.bfloat16: torch.float32}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(op: str, t: torch.Tensor) -> None:
    """Raise a clear error for a tensor the kernels cannot take (wrong device or dtype)."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the triton kernels take float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and is_interpreting():
        return
    raise ValueError(
        f"{op}: the triton kernels need a CUDA tensor (got one on {t.device}); on a machine without a GPU set "
        "TRITON_INTERPRET=1 before importing triton (kernels.get_backend('triton') does it) or use the torch backend"
    )


def fix_interpreter_scalars() -> None:
    """Let Triton's interpreter turn a kernel's scalar into a Python int under NumPy 2.4 and later.

    The interpreter holds every scalar of a kernel (``tl.program_id(0)``, a value loaded through a scalar pointer)
    as a one-element NumPy array of shape (1,). A loop ``for i in range(start, stop)`` whose bounds are such scalars
    asks for their ``__index__``, which some Triton releases (3.6 among them) compute as ``int(array)``; NumPy 2.4
    refuses that for any array with a dimension ("only 0-dimensional arrays can be converted to Python scalars"),
    so those kernels fail in the interpreter. The interpreter installs its tensor methods at every launch through
    ``triton.runtime.interpreter._patch_lang_tensor``; we wrap that function so ``__index__`` reads the one element
    instead. Done once; nothing changes where NumPy still converts, or on a GPU (no interpreter).

    Called where the interpreter is chosen: below, when the kernel modules (which all import this one) are imported
    with ``TRITON_INTERPRET=1``, and by ``kernels.get_backend("triton")`` when it switches the interpreter on.
    """
    global _scalars_fixed
    if _scalars_fixed:
        return
    _scalars_fixed = True
    import numpy as np

    try:
        int(np.ones(1))
        return  # this NumPy still converts a one-element array: Triton's own __index__ works
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except ImportError:
        return  # a Triton without the interpreter module: nothing to wrap
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return  # a Triton that installs its tensor methods differently (and, being newer, reads scalars right)

    def patch_tensor_reading_one_element(tensor, scope):
        patch_tensor(tensor, scope)
        # scope.restore() undoes its changes last-in first-out: this one, then Triton's, after the launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_reading_one_element


_scalars_fixed = False

# Triton decides at import whether our kernels are interpreted (it reads TRITON_INTERPRET as they are decorated), so
# the interpreter's fix comes at the same moment: a launcher called directly (torch.ops.minigpt.*) needs it too.
if is_interpreting():
    fix_interpreter_scalars()


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel should compute in for inputs of ``dtype`` (see the interpreter traps above)."""
    if is_interpreting():
        return _INTERPRETER_UPCAST.get(dtype, dtype)
    return dtype


def to_kernel(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernel should see it: contiguous, upcast under the interpreter where needed."""
    return t.to(kernel_dtype(t.dtype)).contiguous()


# Triton's interpreter runs every program of a launch as a Python call: a program costs a few milliseconds of
# Python overhead whatever the size of its tiles, while NumPy handles a tile of tens of thousands of elements in
# microseconds. So under the interpreter the launchers choose tiles far larger than a GPU would use: one program
# covers up to this many elements (LayerNorm: rows x padded width; GELU: elements; the loss: rows x padded
# vocabulary). Tests lower it (monkeypatch ``kernels.launch.INTERPRETER_TILE``) so that small inputs still span
# several programs and loop steps.
INTERPRETER_TILE = 1 << 16


def num_warps_for(elements: int, elem_bytes: int) -> int:
    """Warps for a program whose tiles hold ``elements`` values of ``elem_bytes`` each (a power of two, 1 to 16).

    About 16 bytes per thread per tensor: enough for one 16-byte vector load each, few enough registers to leave
    room for the arithmetic.
    """
    num_warps = min(max(elements * elem_bytes // 512, 1), 16)
    return 1 << (num_warps.bit_length() - 1)  # round down to a power of two


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


# ----------------------------------------------------------------------------------------------------------------
# Choosing tiles by timing them
#
# The best tile sizes of a matmul-heavy kernel depend on the GPU (its shared memory, registers, tensor-core shapes)
# and the compiler's version in ways no table written on one machine gets right for all. So a kernel may offer a
# few candidate tile configurations, the first one a safe default that compiles without register spills everywhere
# (``python -m kernels.compile_check`` checks it), and a TileTuner times each candidate on the real inputs the first
# time a problem of a new class arrives, then reuses the fastest for every later call of that class. Triton's own
# ``triton.autotune`` does the same per kernel; this one is keyed on what the launcher knows (dtype, head dim, a
# size class), so candidate lists can differ per dtype and the key can bucket sizes.
#
# Tuning costs one compile per candidate and a few milliseconds of timing per class, once per process. It is off
# when MINIGPT_AUTOTUNE=0 (the default tiles are used; the test suite does this so that its kernels are the same on
# every run), while a CUDA graph is being captured (timing would synchronize), and under the interpreter.


def autotune_enabled() -> bool:
    return os.environ.get("MINIGPT_AUTOTUNE", "1") != "0" and not is_interpreting()


class TileTuner:
    """Remembers, per problem class, the fastest of a kernel's candidate tile configurations."""

    def __init__(self, name: str, timer=None):
        self.name = name
        self.timer = timer or _median_ms  # timer(fn) -> milliseconds per call of fn
        self.chosen: dict = {}  # key -> the winning candidate
        self.timings: dict = {}  # key -> {candidate: median ms}, for reports

    def choose(self, key, candidates, run):
        """The candidate to use for problems of class ``key``; ``run(candidate)`` launches the kernel with it.

        With one candidate, tuning off, or a CUDA graph being captured, the first candidate (the default).
        Candidates the GPU cannot run (too much shared memory for it: Triton's OutOfResources) are skipped.
        """
        if len(candidates) == 1 or not autotune_enabled():
            return candidates[0]
        if key in self.chosen:
            return self.chosen[key]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return candidates[0]
        from triton.runtime.errors import OutOfResources

        timings = {}
        for candidate in candidates:
            try:
                timings[candidate] = self.timer(lambda: run(candidate))
            except OutOfResources:
                continue
        self.timings[key] = timings
        self.chosen[key] = min(timings, key=timings.get) if timings else candidates[0]
        return self.chosen[key]

    def report(self) -> list[str]:
        """One line per tuned class: the key, the winner and each candidate's time."""
        lines = []
        for key, timings in self.timings.items():
            times = ", ".join(f"{tuple(c)}: {ms:.3f} ms" for c, ms in timings.items())
            lines.append(f"{self.name} {key}: chose {tuple(self.chosen[key])} ({times})")
        return lines


def _median_ms(fn) -> float:
    """Median milliseconds per call of ``fn`` on the GPU: a short triton.testing.do_bench (the first call, which
    compiles, is part of its warm-up)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
