"""Exercise elementwise_gelu (lesson 3 of COURSE.md): GELU's forward kernel from zero, and its launcher's grid.

Write the whole body of ``_gelu_fwd`` below — which elements this program owns, the mask for the last program,
the load, GELU in both forms, the store — and, in the launcher ``_gelu_forward``, the grid: how many programs to
launch. Both lie in the one region between the marked lines (the launcher's other lines are given in it). Check
your answer with

    python -m exercises check elementwise_gelu

This file is a copy of one of our kernels with its body left out. When your answer passes, compare it with the
real kernel, ``_gelu_fwd`` in kernels/gelu.py, and its launcher ``_gelu_forward``, and with
exercises/solutions/elementwise_gelu.py (this file with the real kernel's lines filled in).

The math
--------
GELU has two forms; compute either in float32, whatever the storage dtype:

    tanh (GPT-2):  y = 0.5 x (1 + tanh(u)) = x * sigmoid(2u),   u = sqrt(2/pi) * (x + 0.044715 x^3)
    none (exact):  y = x * Phi(x),                              Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))

(1 + tanh(u) = 2 sigmoid(2u): the sigmoid form never overflows, where tanh written with exponentials does).

The model
---------
A grid of programs runs the kernel; program number ``tl.program_id(0)`` owns the BLOCK consecutive elements
starting at program_id * BLOCK of the flattened tensor, ``tl.arange(0, BLOCK)`` being the lanes 0 .. BLOCK-1. n is
not a multiple of BLOCK in general: the last program's lanes at n and past must neither load nor store, so every
``tl.load`` and ``tl.store`` takes ``mask=offs < n`` (and a load an ``other=`` value for the masked lanes). Make the
offsets int64 (``tl.program_id(0).to(tl.int64)``): a tensor may hold more than 2^31 elements. The launcher must
start enough programs to cover all n elements, and no more than one partial one: ``triton.cdiv(a, b)`` is
ceil(a / b) on integers.

What you have at hand
---------------------
* ``X``, ``Y``: pointers to the input and the output (same dtype, flat, contiguous); ``n``, the number of elements;
  ``X + offs`` is a block of pointers. Store with ``y.to(Y.dtype.element_ty)``: Y may be float16.
* ``TANH``: a compile-time flag, True for the tanh form; branch on it with a plain ``if TANH: ... else: ...``.
* ``_sigmoid_and_complement(z)`` returns (sigmoid(z), 1 - sigmoid(z)); you need the first.
* The constants SQRT_2_OVER_PI, GELU_CUBIC and INV_SQRT_2. Write them to the right of a tensor (``x * GELU_CUBIC``,
  not ``GELU_CUBIC * x``): Triton's interpreter fails on a global constant times a tensor the other way round.
* ``tl.erf(t)``, elementwise.
* In the launcher: ``x`` (flat in memory, contiguous), ``y`` (the output, made for you), ``block`` (elements per
  program, from ``_block``) and ``x.numel()``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))  # the tanh approximation's scale (GPT-2)
GELU_CUBIC = tl.constexpr(0.044715)  # the tanh approximation's cubic coefficient (GPT-2)
NEG_LOG2E = tl.constexpr(-math.log2(math.e))  # exp(-z) = exp2(-log2(e) z)
INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))  # Phi(x) = 0.5 (1 + erf(x / sqrt(2)))

# Elements per program: small, so that the checker's inputs span several programs and end in a partial one (the
# real kernel uses 1024 on a GPU).
BLOCK = 256
NUM_WARPS = 4


def _block(n: int) -> int:
    """Elements per program for a tensor of ``n`` elements (the real one picks by device; here always BLOCK)."""
    return BLOCK


@triton.jit
def _sigmoid_and_complement(z):
    """(sigmoid(z), 1 - sigmoid(z)), from t = exp(-|z|) in (0, 1]: no overflow, no cancellation."""
    t = tl.exp2(tl.abs(z) * NEG_LOG2E)
    big = 1.0 / (1.0 + t)  # sigmoid(|z|), in [0.5, 1)
    small = t * big  # sigmoid(-|z|), in (0, 0.5]
    return tl.where(z >= 0, big, small), tl.where(z >= 0, small, big)


@triton.jit
def _gelu_fwd(
    X,  # pointer to the input, flattened and contiguous
    Y,  # pointer to the output, same dtype and length as X
    n,  # number of elements
    TANH: tl.constexpr,  # True: GPT-2's tanh approximation; False: the exact erf form
    BLOCK: tl.constexpr,  # elements per program
):
    # ---- your code here (exercise elementwise_gelu, lesson 3) ----
    # int64 offsets: a tensor may hold more than 2^31 elements
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        u = (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI
        s, _ = _sigmoid_and_complement(2.0 * u)
        y = x * s
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * INV_SQRT_2))  # x * Phi(x)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _gelu_forward(x: torch.Tensor, tanh: bool) -> torch.Tensor:
    """x (kernel-ready: contiguous, in the kernel's dtype) -> y, same shape and dtype."""
    y = torch.empty_like(x)
    block = _block(x.numel())
    _gelu_fwd[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), TANH=tanh, BLOCK=block, num_warps=NUM_WARPS)
    # ---- end ----
    return y


def gelu_forward(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU(x) for ``x`` float32 or float16, of any shape; returns y, contiguous, x's dtype and shape.

    ``approximate``: "tanh" (GPT-2's form) or "none" (the exact erf form). The tensor is on a CUDA GPU, or on the
    CPU with Triton's interpreter on (``python -m exercises check`` sees to it).
    """
    return _gelu_forward(x.contiguous(), approximate == "tanh")
