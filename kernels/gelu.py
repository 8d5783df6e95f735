"""GELU in Triton: one elementwise kernel forward, one backward.

The function
------------
GELU weighs its input by how likely a standard normal variable is to be smaller than it:

    exact ("none"):   y = x * Phi(x),   Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))
    GPT-2 ("tanh"):   y = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

Computing the tanh form safely
------------------------------
Written literally, ``tanh(u)`` needs care: ``(e^u - e^-u) / (e^u + e^-u)`` overflows to inf/inf = NaN once
|u| > 88 in float32, and ``1 + tanh(u)`` loses every digit to cancellation for large negative x. Both go away
with the identity ``1 + tanh(u) = 2 * sigmoid(2u)``:

    y = x * sigmoid(2u)

and the sigmoid is itself taken from t = exp(-|z|), which lies in (0, 1] and so never overflows:

    sigmoid(|z|) = 1 / (1 + t),    sigmoid(-|z|) = t / (1 + t)

This gives both sigmoid(z) and 1 - sigmoid(z) (the backward needs it) to full relative precision without a
subtraction; ``1 - s`` computed by subtraction would cancel for large x, where s -> 1. Only ``exp`` is needed,
which Triton has on every version (written as ``exp2`` of a scaled argument, which is what the hardware computes).

The backward, with s = sigmoid(2u) and u' = du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2):

    tanh:  dy/dx = s + x * s * (1 - s) * 2u'           (since d sigmoid(z)/dz = sigmoid(z) (1 - sigmoid(z)))
    none:  dy/dx = Phi(x) + x * phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

The backward recomputes everything from x, so the forward saves only its input, not its output.

Work and memory traffic
-----------------------
Every program handles BLOCK consecutive elements of the flattened tensor and computes in float32 whatever the
storage dtype. GELU does a handful of flops per element, so it is bound by memory traffic, for n elements of
``b`` bytes each:

    forward:   reads n*b (x),          writes n*b (y)    -> 2 n b bytes
    backward:  reads 2 n b (x and dy), writes n*b (dx)   -> 3 n b bytes

``gelu_bytes`` in ``kernels/costs.py`` computes these; the benchmark divides them by the measured time to get GB/s.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch
from .launch import check_tensor, is_interpreting, to_kernel, triton_next_power_of_2
from .checks import check_gelu_approximate

# Constants of the formulas, as tl.constexpr so the kernels can read them (Triton only lets a kernel see globals
# marked constexpr). Inside the kernels they stand to the right of a tensor (``x * C``, not ``C * x``): Triton's
# interpreter has failed on a global constexpr times a tensor, and the other way round works everywhere.
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))  # the tanh approximation's scale (GPT-2)
GELU_CUBIC = tl.constexpr(0.044715)  # the tanh approximation's cubic coefficient (GPT-2)
NEG_LOG2E = tl.constexpr(-math.log2(math.e))  # exp(-z) = exp2(-log2(e) z)
NEG_HALF_LOG2E = tl.constexpr(-0.5 * math.log2(math.e))  # exp(-x^2/2) = exp2(-log2(e)/2 x^2)
INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))  # Phi(x) = 0.5 (1 + erf(x / sqrt(2)))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))  # the normal density's constant

# On a GPU, one program per BLOCK elements: 1024 elements over 4 warps is 8 per thread, i.e. one 16-byte load per
# thread in 16-bit dtypes and two in float32 — enough in flight to saturate memory bandwidth. Under the interpreter
# a program covers up to launch.INTERPRETER_TILE elements instead (see kernels/launch.py).
BLOCK = 1024
NUM_WARPS = 4


# ----------------------------------------------------------------------------------------------------------------
# Kernels


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
    if TANH:
        u = (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI
        du = (1.0 + x * x * GELU_CUBIC * 3.0) * SQRT_2_OVER_PI  # du/dx
        s, one_minus_s = _sigmoid_and_complement(2.0 * u)
        dydx = s + x * s * one_minus_s * 2.0 * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2))  # Phi(x)
        pdf = tl.exp2(x * x * NEG_HALF_LOG2E) * INV_SQRT_2PI  # phi(x)
        dydx = cdf + x * pdf
    tl.store(DX + offs, (dy * dydx).to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _block(n: int) -> int:
    """Elements per program for a tensor of ``n`` elements."""
    if is_interpreting():
        return min(launch.INTERPRETER_TILE, triton_next_power_of_2(n))
    return BLOCK


def _gelu_forward(x: torch.Tensor, tanh: bool) -> torch.Tensor:
    """x (kernel-ready: contiguous, in the kernel's dtype) -> y, same shape and dtype."""
    y = torch.empty_like(x)
    block = _block(x.numel())
    _gelu_fwd[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), TANH=tanh, BLOCK=block, num_warps=NUM_WARPS)
    return y


def _gelu_backward(x: torch.Tensor, dy: torch.Tensor, tanh: bool) -> torch.Tensor:
    """x, dy (kernel-ready, same shape) -> dx."""
    dx = torch.empty_like(x)
    block = _block(x.numel())
    _gelu_bwd[(triton.cdiv(x.numel(), block),)](x, dy, dx, x.numel(), TANH=tanh, BLOCK=block, num_warps=NUM_WARPS)
    return dx


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch op
#
# The launchers are registered as custom operators (torch.library.custom_op), forward and backward each as one op.
# torch.compile then sees each as a single opaque node whose output shape comes from the register_fake function,
# instead of tracing the launcher (why an opaque op rather than a traced launch or a triton_op: COURSE.md, Lesson 8),
# and autograd is wired to our backward kernel by register_autograd.


@torch.library.custom_op("minigpt::gelu_fwd", mutates_args=())
def gelu_fwd(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU of x: same shape and dtype, contiguous."""
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    xk = to_kernel(x)  # contiguous (and float32 for bfloat16 under the interpreter)
    return _gelu_forward(xk, approximate == "tanh").to(x.dtype)


@gelu_fwd.register_fake
def _(x, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("minigpt::gelu_bwd", mutates_args=())
def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """dx = dy * GELU'(x): x's shape and dtype, contiguous."""
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    xk = to_kernel(x)
    return _gelu_backward(xk, dy.to(xk.dtype).contiguous(), approximate == "tanh").to(x.dtype)


@gelu_bwd.register_fake
def _(dy, x, approximate):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)  # only the input: the backward recomputes from x
    ctx.approximate = approximate


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return gelu_bwd(dy, x, ctx.approximate), None


gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU of ``x`` (any shape; float32, float16 or bfloat16), same shape and dtype; ``approximate``: tanh | none.

    Computes in float32. Differentiable (Triton backward). On a machine without a GPU it needs Triton's interpreter
    (``TRITON_INTERPRET=1`` before import; ``kernels.get_backend("triton")`` sets it).
    """
    check_gelu_approximate(approximate)
    check_tensor("gelu", x)
    return gelu_fwd(x, approximate)


__all__ = ["gelu", "gelu_bwd", "gelu_fwd"]
