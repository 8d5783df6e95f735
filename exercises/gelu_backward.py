"""Exercise gelu_backward (lesson 3 of COURSE.md): the body of GELU's backward kernel.

Fill in the region between the marked lines of ``_gelu_bwd`` below: it must set ``dydx``, GELU's derivative at x,
for both forms of GELU; the kernel then stores dx = dy * dydx. Check your answer with

    python -m exercises check gelu_backward

This file is a copy of one of our kernels with its middle left out; the math below is all you need. When your
answer passes, compare it with the real kernel, ``_gelu_bwd`` in kernels/gelu.py, and with
exercises/solutions/gelu_backward.py (this file with the real kernel's lines filled in).

The math
--------
GELU has two forms; the forward kernel computes both in float32, the tanh one through a sigmoid:

    tanh (GPT-2):  y = 0.5 x (1 + tanh(u)) = x * s,   s = sigmoid(2u),   u = sqrt(2/pi) * (x + 0.044715 x^3)
    none (exact):  y = x * Phi(x),                    Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))

(1 + tanh(u) = 2 sigmoid(2u) avoids the overflow of tanh written with exponentials). By the product rule, and
with d sigmoid(z)/dz = sigmoid(z) (1 - sigmoid(z)):

    tanh:  dy/dx = s + x * s * (1 - s) * 2 u',   u' = du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 x^2)
    none:  dy/dx = Phi(x) + x * phi(x),          phi(x) = exp(-x^2 / 2) / sqrt(2 pi), the normal density

What you have at hand
---------------------
* ``x`` and ``dy``: float32 blocks of BLOCK elements. Lanes past the end (``mask`` false) hold 0 and are never
  stored, so whatever you compute there is harmless.
* ``TANH``: a compile-time flag, True for the tanh form; branch on it with a plain ``if TANH: ... else: ...``.
* ``_sigmoid_and_complement(z)`` returns (sigmoid(z), 1 - sigmoid(z)), both to full precision. Use its second value
  rather than writing ``1 - s``, which loses every digit where s is close to 1 (large x).
* The constants below: SQRT_2_OVER_PI, GELU_CUBIC, INV_SQRT_2, INV_SQRT_2PI and NEG_HALF_LOG2E, the last because
  Triton computes exp(a) as ``tl.exp2(a * log2(e))``. Write them to the right of a tensor (``x * GELU_CUBIC``, not
  ``GELU_CUBIC * x``): Triton's interpreter fails on a global constant times a tensor the other way round.
* ``tl.erf(t)`` and ``tl.exp2(t)``, elementwise.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))  # the tanh approximation's scale (GPT-2)
GELU_CUBIC = tl.constexpr(0.044715)  # the tanh approximation's cubic coefficient (GPT-2)
NEG_LOG2E = tl.constexpr(-math.log2(math.e))  # exp(-z) = exp2(-log2(e) z)
NEG_HALF_LOG2E = tl.constexpr(-0.5 * math.log2(math.e))  # exp(-x^2/2) = exp2(-log2(e)/2 x^2)
INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))  # Phi(x) = 0.5 (1 + erf(x / sqrt(2)))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))  # the normal density's constant

# Elements per program: small, so that the checker's inputs span several programs and end in a partial one (the
# real kernel uses 1024 on a GPU).
BLOCK = 256


@triton.jit
def _sigmoid_and_complement(z):
    """(sigmoid(z), 1 - sigmoid(z)), from t = exp(-|z|) in (0, 1]: no overflow, no cancellation."""
    t = tl.exp2(tl.abs(z) * NEG_LOG2E)
    big = 1.0 / (1.0 + t)  # sigmoid(|z|), in [0.5, 1)
    small = t * big  # sigmoid(-|z|), in (0, 0.5]
    return tl.where(z >= 0, big, small), tl.where(z >= 0, small, big)


@triton.jit
def _gelu_bwd(
    X,  # pointer to the forward's input, flattened and contiguous
    DY,  # pointer to the gradient of the loss w.r.t. the output
    DX,  # pointer to the gradient w.r.t. the input (written here), X's dtype
    n,  # number of elements
    TANH: tl.constexpr,  # True: GPT-2's tanh approximation; False: the exact erf form
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    # ---- your code here (exercise gelu_backward, lesson 3) ----
    dydx = tl.zeros_like(x)  # placeholder: runs, but wrong. Set dydx = GELU'(x), in both forms (TANH or not)
    # ---- end ----
    tl.store(DX + offs, (dy * dydx).to(DX.dtype.element_ty), mask=mask)


def gelu_backward(x: torch.Tensor, dy: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """dx = dy * GELU'(x) for ``x`` and ``dy`` of one shape, float32 or float16; returns dx, contiguous, x's dtype.

    ``approximate``: "tanh" (GPT-2's form) or "none" (the exact erf form). The tensors are on a CUDA GPU, or on the
    CPU with Triton's interpreter on (``python -m exercises check`` sees to it).
    """
    x = x.contiguous()
    dy = dy.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    _gelu_bwd[(triton.cdiv(n, BLOCK),)](x, dy, dx, n, TANH=approximate == "tanh", BLOCK=BLOCK)
    return dx
