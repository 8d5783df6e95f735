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


def row_block(width: int, elem_bytes: int = 2) -> tuple[int, int]:
    """(BLOCK, num_warps) for kernels that hold one whole row of ``width`` elements in registers.

    BLOCK is the next power of two (Triton's tiles are powers of two; the tail is masked). Warps grow with the
    row so each thread keeps a handful of elements: 8 per thread is enough to issue 16-byte loads.
    """
    block = triton_next_power_of_2(max(width, 1))
    num_warps = min(max(block * elem_bytes // 512, 1), 16)
    # round down to a power of two
    num_warps = 1 << (num_warps.bit_length() - 1)
    return block, num_warps


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
