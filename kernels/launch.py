"""Launch helpers shared by every Triton kernel: device checks, the interpreter's dtype workaround, block sizes.

Kept in one place so each kernel file reads as its algorithm, not as plumbing.
"""
from __future__ import annotations

import os

import torch

# Triton's CPU interpreter (TRITON_INTERPRET=1) has two known bfloat16 traps (measured with triton 3.9):
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
# covers up to this many elements (LayerNorm: rows x padded width; GELU: elements). Tests lower it (monkeypatch
# ``kernels.launch.INTERPRETER_TILE``) so that small inputs still span several programs and loop steps.
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
