"""Every formula the kernels' docstrings state, executed: kernels/layer_norm.py, gelu.py, attention.py (and the
tile tables in attention_tiles.py).

A kernel file opens with its algorithm in math (a derivative, a recurrence, a byte or FLOP count, a bound). Those
lines are what a reader learns from, so each is checked here on its own, away from Triton: the formula is written
out in float64 PyTorch exactly as the docstring states it, and compared with something computed independently —
torch.autograd (a gradient, a Jacobian), torch.utils.flop_counter (a FLOP count), plain float64 math (softmax,
log-sum-exp), Python integers (a counter bound), or a count of the tensors a pass touches (memory traffic).
Where a docstring gives a *reason* (float32 cancellation, an overflow), the float32 failure it describes is shown.

No test here runs a kernel (the dropout layout is read off the kernel in tests/test_tiled.py); everything is
float64 arithmetic on small tensors.
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")


import kernels.attention as attention  # noqa: E402
import kernels.gelu as gelu_module  # noqa: E402
from kernels.attention import LOG2E, MAX_DROPOUT_T, causal_attention  # noqa: E402
from kernels.attention_tiles import GPU_TILES, MIN_BLOCK_D  # noqa: E402
from kernels.costs import (attention_decode_bytes, attention_decode_flops, causal_attention_flops,  # noqa: E402
                           gelu_bytes, layer_norm_bytes)
from kernels.definitions import EPS, causal_attention_math, future_mask  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from kernels.layer_norm import GROUPS_PER_SM  # noqa: E402

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _close(actual, expected, rtol=1e-10, atol=1e-12, msg=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)


# ================================================================================================================
# LayerNorm (kernels/layer_norm.py)


def _layer_norm_stats(x: torch.Tensor, eps: float = EPS):
    """mean, rstd and xhat of each row, as the forward defines them (the biased variance of the centred row)."""
    C = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / C
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / C
    rstd = 1.0 / torch.sqrt(var + eps)
    return mean, rstd, (x - mean) * rstd


@pytest.mark.parametrize("shape", [(1, 1, 1023), (3, 7, 256), (2, 5), (6, 1), (4, 3, 768)])
def test_layer_norm_backward_formulas_match_autograd(shape):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; dw = sum_rows(dy * xhat);
    db = sum_rows(dy) — against autograd through F.layer_norm, in float64, on awkward shapes (C = 1: xhat = 0)."""
    C = shape[-1]
    x = 3.0 + 2.0 * _randn(*shape, seed=1)  # a mean and a spread that are not 0 and 1
    w, b = _randn(C, seed=2), _randn(C, seed=3)
    dy = _randn(*shape, seed=4)

    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    F.layer_norm(xr, (C,), wr, br, EPS).backward(dy)

    _mean, rstd, xhat = _layer_norm_stats(x)
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    rows = tuple(range(x.dim() - 1))  # sum over every row (all leading dims)
    _close(dx, xr.grad, msg="dx")
    _close((dy * xhat).sum(rows), wr.grad, msg="dweight")
    _close(dy.sum(rows), br.grad, msg="dbias")


def test_layer_norm_intermediate_derivatives():
    """The chain rule's pieces, each as a full Jacobian over one row:

        d mean / d x_i = 1/C,    d rstd / d x_i = -rstd^3 (x_i - mean) / C = -rstd^2 xhat_i / C,
        d xhat_j / d x_i = rstd (delta_ij - 1/C) - xhat_j * rstd * xhat_i / C
    """
    C = 7
    x = 1.5 + _randn(C, seed=5)  # one row
    mean, rstd, xhat = _layer_norm_stats(x)  # (1,), (1,), (C,)
    jacobian = torch.autograd.functional.jacobian

    _close(jacobian(lambda t: _layer_norm_stats(t)[0], x), torch.full((1, C), 1.0 / C, dtype=F64))
    d_rstd = jacobian(lambda t: _layer_norm_stats(t)[1], x)[0]  # (C,)
    _close(d_rstd, -rstd**3 * (x - mean) / C)
    _close(d_rstd, -rstd**2 * xhat / C)
    d_xhat = jacobian(lambda t: _layer_norm_stats(t)[2], x)  # (C, C): [j, i] = d xhat_j / d x_i
    expected = rstd * (torch.eye(C, dtype=F64) - 1.0 / C) - xhat[:, None] * rstd * xhat[None, :] / C
    _close(d_xhat, expected)


def test_layer_norm_centred_variance_keeps_float32_precision():
    """The forward's reason for two reductions (mean, then the variance of x - mean) over var = E[x^2] - E[x]^2:
    rows near 1000 with spread 1, as the docstring's example. In float32 the one-formula variance subtracts two
    numbers near 1e6 and keeps under two correct digits (worst row), the centred one stays within 1e-5 — both
    measured against the float64 variance of the very same float32 inputs."""
    C = 768
    x = (1000.0 + _randn(64, C, seed=6)).float()
    truth = x.double().var(-1, unbiased=False)
    mean = x.sum(-1, keepdim=True) / C
    centred = ((x - mean) ** 2).sum(-1) / C
    one_formula = (x * x).sum(-1) / C - (x.sum(-1) / C) ** 2
    rel_err = lambda v: ((v.double() - truth).abs() / truth).max().item()  # noqa: E731
    assert rel_err(centred) < 1e-5
    assert rel_err(one_formula) > 1e-2, "E[x^2] - E[x]^2 was expected to lose most digits in float32"


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                              (torch.float32, torch.float32)])
def test_layer_norm_bytes_is_the_tensors_each_pass_touches(x_dtype, w_dtype):
    """layer_norm_bytes against a count of the tensors each pass reads and writes (numel * element size):

        forward:   reads x, w, b                   writes y, mean, rstd
        backward:  reads x, dy, w, mean, rstd      writes dx, partial_dw, partial_db     (stage 1)
                   reads partial_dw, partial_db    writes dw, db                         (stage 2)
    """
    M, C, G = 21, 1000, 4
    x, y, dy, dx = (torch.empty(M, C, dtype=x_dtype) for _ in range(4))
    w, b, dw, db = (torch.empty(C, dtype=w_dtype) for _ in range(4))
    mean, rstd = (torch.empty(M, dtype=torch.float32) for _ in range(2))
    partial_dw, partial_db = (torch.empty(G, C, dtype=torch.float32) for _ in range(2))

    def nbytes(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    forward = nbytes(x, w, b) + nbytes(y, mean, rstd)
    stage1 = nbytes(x, dy, w, mean, rstd) + nbytes(dx, partial_dw, partial_db)
    stage2 = nbytes(partial_dw, partial_db) + nbytes(dw, db)
    xb, wb = x.element_size(), w.element_size()
    assert layer_norm_bytes(M, C, xb, wb) == forward
    assert layer_norm_bytes(M, C, xb, wb, backward=True, groups=G) == stage1 + stage2


def test_layer_norm_partials_overhead_figures():
    """The docstring's overhead of the backward's partial sums: 16 * G / (6 * M) with G = GROUPS_PER_SM * 132 (an
    H100) and M = 8192 rows is "about 9%", and "17%" with four groups per multiprocessor; 6 * M is the bytes per
    column of x, dy and dx in bf16."""
    M, sms = 8192, 132
    assert 6 * M == 3 * 2 * M  # x, dy read and dx written, 2 bytes each, per column
    assert round(100 * 16 * GROUPS_PER_SM * sms / (6 * M)) == 9
    assert round(100 * 16 * 4 * sms / (6 * M)) == 17


# ================================================================================================================
# GELU (kernels/gelu.py)

# The kernel's constants are tl.constexpr wrappers; .value is the Python float the kernel reads.
SQRT_2_OVER_PI = gelu_module.SQRT_2_OVER_PI.value
GELU_CUBIC = gelu_module.GELU_CUBIC.value
NEG_LOG2E = gelu_module.NEG_LOG2E.value
NEG_HALF_LOG2E = gelu_module.NEG_HALF_LOG2E.value
INV_SQRT_2 = gelu_module.INV_SQRT_2.value
INV_SQRT_2PI = gelu_module.INV_SQRT_2PI.value

GELU_X = torch.cat([torch.linspace(-12.0, 12.0, 2401, dtype=F64), torch.tensor([0.0, -30.0, 30.0], dtype=F64)])


def _sigmoid_and_complement(z: torch.Tensor):
    """(sigmoid(z), 1 - sigmoid(z)) from t = exp(-|z|), as the docstring: sigmoid(|z|) = 1 / (1 + t),
    sigmoid(-|z|) = t / (1 + t) — t written, as in the kernel, as exp2(|z| * -log2 e)."""
    t = torch.exp2(z.abs() * NEG_LOG2E)
    big = 1.0 / (1.0 + t)
    small = t * big
    return torch.where(z >= 0, big, small), torch.where(z >= 0, small, big)


def test_gelu_constants():
    assert SQRT_2_OVER_PI == math.sqrt(2 / math.pi) and GELU_CUBIC == 0.044715
    assert math.isclose(NEG_LOG2E, -1 / math.log(2), rel_tol=1e-15)
    assert math.isclose(NEG_HALF_LOG2E, -0.5 / math.log(2), rel_tol=1e-15)
    assert math.isclose(INV_SQRT_2 * math.sqrt(2), 1.0, rel_tol=1e-15)
    assert math.isclose(INV_SQRT_2PI * math.sqrt(2 * math.pi), 1.0, rel_tol=1e-15)


def test_gelu_forward_forms():
    """y = 0.5 x (1 + tanh(u)) = x * sigmoid(2u) (the identity 1 + tanh(u) = 2 sigmoid(2u)), the sigmoid from
    t = exp(-|z|) with its complement, and y = x * Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2)) — against F.gelu."""
    x = GELU_X
    u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3)
    s, one_minus_s = _sigmoid_and_complement(2 * u)
    # full relative precision, also where s -> 1 (exp2 of a scaled argument: a few ulps times |z|)
    _close(s, torch.sigmoid(2 * u), rtol=1e-12, atol=0)
    _close(one_minus_s, torch.sigmoid(-2 * u), rtol=1e-12, atol=0)
    _close(0.5 * x * (1 + torch.tanh(u)), F.gelu(x, approximate="tanh"))
    _close(x * s, F.gelu(x, approximate="tanh"))
    _close(x * 0.5 * (1 + torch.erf(x * INV_SQRT_2)), F.gelu(x, approximate="none"))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_derivatives_match_autograd(approximate):
    """tanh:  dy/dx = s + x s (1 - s) 2 u',  s = sigmoid(2u), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2);
    none:  dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi) (exp written as the kernel's exp2) —
    each against autograd of F.gelu(approximate=...) in float64."""
    x = GELU_X.clone().requires_grad_()
    F.gelu(x, approximate=approximate).sum().backward()
    x, autograd = x.detach(), x.grad
    if approximate == "tanh":
        u = (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI
        du = (1.0 + x * x * GELU_CUBIC * 3.0) * SQRT_2_OVER_PI
        s, one_minus_s = _sigmoid_and_complement(2.0 * u)
        dydx = s + x * s * one_minus_s * 2.0 * du
    else:
        cdf = 0.5 * (1.0 + torch.erf(x * INV_SQRT_2))
        pdf = torch.exp2(x * x * NEG_HALF_LOG2E) * INV_SQRT_2PI
        _close(pdf, torch.exp(-x * x / 2) / math.sqrt(2 * math.pi), rtol=1e-13, atol=0)
        dydx = cdf + x * pdf
    _close(dydx, autograd)


def test_gelu_float32_pitfalls_the_docstring_avoids():
    """The two float32 failures the docstring names, and that the sigmoid form has neither:

    * the literal tanh, (e^u - e^-u) / (e^u + e^-u), is inf / inf = NaN once e^u overflows: |u| > ln(float32 max)
      = 88.72 (the docstring's "|u| > 88");
    * 1 + tanh(u) cancels to exactly 0 for large negative x (here x <= -6), and 1 - s to 0 for large positive x,
      while x * sigmoid(2u) and the complement t / (1 + t) keep float32's full relative precision.

    The exact values come from mpmath at 50 digits: torch's own float64 F.gelu(approximate="tanh") evaluates
    1 + tanh(u) and cancels too, a little later (it returns 0 at x = -8, where GELU is -3.1e-21).
    """
    mpmath = pytest.importorskip("mpmath")

    def gelu_tanh_exact(x: float) -> float:
        with mpmath.workdps(50):
            u = mpmath.sqrt(2 / mpmath.pi) * (x + mpmath.mpf("0.044715") * mpmath.mpf(x) ** 3)
            return float(x * (1 + mpmath.tanh(u)) / 2)


    f32 = torch.float32
    literal_tanh = lambda u: (torch.exp(u) - torch.exp(-u)) / (torch.exp(u) + torch.exp(-u))  # noqa: E731
    assert math.isclose(math.log(torch.finfo(f32).max), 88.72, abs_tol=0.01)
    assert torch.isfinite(literal_tanh(torch.tensor([88.7, -88.7], dtype=f32))).all()
    assert torch.isnan(literal_tanh(torch.tensor([88.8, -88.8], dtype=f32))).all()

    x = torch.tensor([-6.0, -7.0, -8.0], dtype=f32)
    u = (x + x * x * x * GELU_CUBIC) * SQRT_2_OVER_PI
    assert (0.5 * x * (1 + torch.tanh(u)) == 0).all()
    s, _ = _sigmoid_and_complement(2 * u)
    _close((x * s).double(), torch.tensor([gelu_tanh_exact(float(xi)) for xi in x], dtype=F64), rtol=1e-5, atol=0)

    z = torch.tensor([20.0, 30.0], dtype=f32)
    s, one_minus_s = _sigmoid_and_complement(z)
    assert (1 - s == 0).all()
    _close(one_minus_s.double(), torch.sigmoid(-z.double()), rtol=1e-5, atol=0)


@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_gelu_bytes_is_the_tensors_each_pass_touches(elem_bytes):
    """gelu_bytes: the forward reads x and writes y (2 n b), the backward reads x and dy and writes dx (3 n b)."""
    n = 12345
    tensor_bytes = n * elem_bytes
    assert gelu_bytes(n, elem_bytes) == 2 * tensor_bytes
    assert gelu_bytes(n, elem_bytes, backward=True) == 3 * tensor_bytes


# ================================================================================================================
# Attention (kernels/attention.py): the forward's online softmax


def _online_softmax_attention(q, k, v, scale, block_m, block_n, base2=True, keep=None, dropout_p=0.0):
    """One head, the forward of the module docstring, tile by tile in float64: q (Tq, D), k, v (Tk, D).

    Each query tile [r, r + block_m) at positions [a, a + block_m), a = (Tk - Tq) + r, walks the key tiles from 0:
    [0, lo) without a mask, lo = a rounded down to a key tile, then the band [lo, a + block_m) with it — the
    kernel's loop bounds. Per key tile, with S_j the tile's scores:

        m_new = max(m, rowmax(S_j));  alpha = exp(m - m_new);  P~_j = exp(S_j - m_new)
        l = alpha * l + rowsum(P~_j);  acc = alpha * acc + P~_j v_j;  m = m_new

    O = acc / l (/ (1 - p) with dropout, whose kept P~_j enter acc but not l) and LSE = m + log(l). With
    ``base2``, as the kernel: exp2 and log2, the scores scaled by qk_scale = scale * log2 e, so m and the LSE are
    in base 2. Returns (O (Tq, D), LSE (Tq,)) in the base used.
    """
    Tq, Tk = q.shape[0], k.shape[0]
    exp, log, score_scale = (torch.exp2, torch.log2, scale * LOG2E) if base2 else (torch.exp, torch.log, scale)
    out, lse = torch.empty_like(q), torch.empty(Tq, dtype=q.dtype)
    for r in range(0, Tq, block_m):
        rows = torch.arange(r, min(r + block_m, Tq))
        positions = (Tk - Tq) + rows
        first = (Tk - Tq) + r
        lo = first // block_n * block_n
        hi = min(first + block_m, Tk)
        m = torch.full((len(rows),), float("-inf"), dtype=q.dtype)
        l = torch.zeros(len(rows), dtype=q.dtype)  # noqa: E741
        acc = torch.zeros(len(rows), q.shape[1], dtype=q.dtype)
        for start in range(0, hi, block_n):
            cols = torch.arange(start, min(start + block_n, Tk))
            visible = positions[:, None] >= cols[None, :]
            if start < lo:  # "key tiles wholly before r need no mask at all"
                assert visible.all()
            s = (q[rows] @ k[cols].T) * score_scale
            s = s.masked_fill(~visible, float("-inf"))
            m_new = torch.maximum(m, s.max(1).values)
            alpha = exp(m - m_new)
            p = exp(s - m_new[:, None])
            l = alpha * l + p.sum(1)  # noqa: E741
            if keep is not None:
                p = p * keep[rows][:, cols]
            acc = alpha[:, None] * acc + p @ v[cols]
            m = m_new
        out[rows] = acc / l[:, None] / (1.0 - dropout_p)
        lse[rows] = m + log(l)
    return out, lse


# (Tq, Tk, block_m, block_n): the GPU tables' shapes (block_n | block_m, and the reverse), tiles that do not
# divide, a chunk of the last queries (Tq < Tk) and a decoding step (Tq = 1).
SOFTMAX_CASES = [(37, 37, 16, 16), (37, 37, 32, 16), (37, 37, 16, 32), (37, 37, 7, 5), (37, 37, 64, 64),
                 (13, 50, 16, 8), (13, 50, 8, 16), (1, 29, 16, 8), (20, 45, 6, 9)]


@pytest.mark.parametrize("base2", [True, False], ids=["base2", "base_e"])
@pytest.mark.parametrize("Tq, Tk, block_m, block_n", SOFTMAX_CASES)
def test_online_softmax_recurrence_is_softmax(Tq, Tk, block_m, block_n, base2):
    """The recurrence, tile by tile, gives the float64 softmax output and log-sum-exp: O against
    causal_attention_math, LSE against torch.logsumexp of the masked scores (times log2 e in base 2)."""
    D = 8
    q, k, v = _randn(Tq, D, seed=10), _randn(Tk, D, seed=11), _randn(Tk, D, seed=12)
    scale = 1 / math.sqrt(D)
    out, lse = _online_softmax_attention(q, k, v, scale, block_m, block_n, base2=base2)
    _close(out, causal_attention_math(q[None, None], k[None, None], v[None, None])[0, 0])
    scores = (q @ k.T * scale).masked_fill(future_mask(Tq, Tk), float("-inf"))
    _close(lse, torch.logsumexp(scores, -1) * (LOG2E if base2 else 1.0))


@pytest.mark.parametrize("Tq, Tk, block_m, block_n", [(37, 37, 32, 16), (13, 50, 8, 16)])
def test_online_softmax_with_dropout(Tq, Tk, block_m, block_n):
    """With dropout the kept weights enter acc, the undropped ones l (and the LSE), and O is scaled by 1 / (1 - p)
    once at the end: nn.Dropout applied to the softmax output (causal_attention_math with the same mask)."""
    D, p = 8, 0.3
    q, k, v = _randn(Tq, D, seed=13), _randn(Tk, D, seed=14), _randn(Tk, D, seed=15)
    keep = torch.rand(Tq, Tk, generator=_gen(16)) >= p
    out, lse = _online_softmax_attention(q, k, v, 1 / math.sqrt(D), block_m, block_n, keep=keep, dropout_p=p)
    expected = causal_attention_math(q[None, None], k[None, None], v[None, None], dropout_p=p,
                                     dropout_mask=keep[None, None])
    _close(out, expected[0, 0])
    scores = (q @ k.T / math.sqrt(D)).masked_fill(future_mask(Tq, Tk), float("-inf"))
    _close(lse, torch.logsumexp(scores, -1) * LOG2E)  # the dropout mask does not touch the LSE


# ================================================================================================================
# Attention: the backward


@pytest.mark.parametrize("Tq, Tk", [(24, 24), (9, 30)])
def test_attention_backward_formulas_match_autograd(Tq, Tk):
    """With a fixed random keep mask M, p = 0.3, Pd = P * M / (1 - p):

        dV = Pd^T dO;  dP = (dO v^T) * M / (1 - p);  dS = P * (dP - delta), delta_i = sum_j P_ij dP_ij;
        dQ = scale * dS k;  dK = scale * dS^T q

    against autograd of causal_attention_math (with that mask) in float64, for B = 2, H = 3. Also: delta equals
    rowsum(dO * O) with the mask, and P is recomputed exactly from the saved LSE, P = exp(S - LSE), or in the
    kernel's base 2, exp2(q k^T * qk_scale - LSE2) with LSE2 = LSE * log2 e.
    """
    B, H, D, p = 2, 3, 8, 0.3
    scale = 0.7 / math.sqrt(D)  # not the default, so a missing scale would show
    q, k, v = _randn(B, H, Tq, D, seed=20), _randn(B, H, Tk, D, seed=21), _randn(B, H, Tk, D, seed=22)
    d_out = _randn(B, H, Tq, D, seed=23)
    keep = (torch.rand(B, H, Tq, Tk, generator=_gen(24)) >= p).to(F64)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = causal_attention_math(qr, kr, vr, dropout_p=p, scale=scale, dropout_mask=keep.bool())
    out.backward(d_out)
    out = out.detach()

    s = (q @ k.transpose(-2, -1) * scale).masked_fill(future_mask(Tq, Tk), float("-inf"))
    P = torch.softmax(s, -1)
    Pd = P * keep / (1 - p)
    dV = Pd.transpose(-2, -1) @ d_out
    dP = (d_out @ v.transpose(-2, -1)) * keep / (1 - p)
    delta = (P * dP).sum(-1, keepdim=True)
    dS = P * (dP - delta)
    _close(dV, vr.grad, msg="dV")
    _close(scale * dS @ k, qr.grad, msg="dQ")
    _close(scale * dS.transpose(-2, -1) @ q, kr.grad, msg="dK")

    # the identity that makes delta one pass over (T, D) tensors: rowsum(P * dP) == rowsum(dO * O), with dropout
    _close(delta, (d_out * out).sum(-1, keepdim=True), msg="delta")

    # P recomputed from the saved LSE, without a running max
    lse = torch.logsumexp(s, -1, keepdim=True)
    _close(torch.exp(s - lse), P, msg="P = exp(S - LSE)")
    qk_scale = scale * LOG2E
    lse2 = lse * LOG2E
    P2 = torch.exp2(q @ k.transpose(-2, -1) * qk_scale - lse2).masked_fill(future_mask(Tq, Tk), 0.0)
    _close(P2, P, msg="P = exp2(q k^T qk_scale - LSE2)")


# ================================================================================================================
# Attention: counting FLOPs and bytes


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("B, H, T, D", [(2, 3, 24, 8), (1, 2, 33, 16)])
def test_causal_attention_flops_against_flop_counter(B, H, T, D):
    """causal_attention_flops against torch.utils.flop_counter on causal_attention_math.

    What FlopCounterMode counts: 2 * m * n * k per (batched) matmul — only the matmuls (aten.bmm here; softmax,
    masking, scaling and dropout count nothing) — and a matmul counts in full whatever entries the mask makes -inf
    or 0. So on the plain math version:

        forward:  q k^T and P v, each 2 * B*H*T*T*D                       counted = 4 * B*H*T*T*D
        backward: autograd's four matmuls dV = P^T dO, dP = dO v^T,
                  dQ = dS k, dK = dS^T q, each 2 * B*H*T*T*D             counted = 8 * B*H*T*T*D

    and the relation to the causal convention (half of every full matmul, the masked half not done):

        causal forward  = counted forward / 2
        causal backward = (counted backward + one recomputed S = counted forward / 2) / 2   (the five matmuls S,
                          dV, dP, dQ, dK of the docstring; the dQ kernel's second S and dP are not counted)

    Exactly half: the convention counts T*T/2 (query, key) pairs, while T*(T+1)/2 are unmasked — the diagonal's
    T/2 pairs are left out (a 1/T relative difference; checked too).
    """
    q, k, v = (_randn(B, H, T, D, seed=30 + i).requires_grad_() for i in range(3))
    holder = {}

    def forward():
        holder["out"] = causal_attention_math(q, k, v)

    counted_fwd = _counted_flops(forward)
    counted_bwd = _counted_flops(lambda: holder["out"].backward(torch.ones_like(holder["out"])))
    assert counted_fwd == 4 * B * H * T * T * D
    assert counted_bwd == 8 * B * H * T * T * D

    fwd, bwd = causal_attention_flops(B, H, T, D)
    assert fwd == counted_fwd / 2
    assert bwd == (counted_bwd + counted_fwd / 2) / 2 == 2.5 * fwd
    unmasked_pairs = int((~future_mask(T, T)).sum())
    assert unmasked_pairs == T * (T + 1) // 2
    assert fwd == 2 * 2 * B * H * D * (unmasked_pairs - T / 2)


def test_decoding_cost_formulas():
    """A decoding step's cost (attention.py's "Cost", kernels/costs.py; the numbers from benchmarks/NOTES.md): one
    query (Tq = 1) against Tk keys, nothing masked.

        FLOPs = 4 * B * H * Tk * D   (flop_counter on the math version: its count is exact here, no mask)
        bytes = B * H * Tk * D * 2 * elem_size   (K and V, each read once)
        FLOPs / bytes = 2 / elem_size: 1 in 16-bit
    and its numbers: 256 KiB of K and V per head at Tk = 1024, D = 64 in 16-bit; 100 KiB in flight per microsecond
    is "some 100 GB/s".
    """
    B, H, Tk, D = 2, 3, 40, 16
    q = _randn(B, H, 1, D, seed=40)
    k, v = _randn(B, H, Tk, D, seed=41), _randn(B, H, Tk, D, seed=42)
    assert _counted_flops(lambda: causal_attention_math(q, k, v)) == 4 * B * H * Tk * D
    assert attention_decode_flops(B, H, Tk, D) == 4 * B * H * Tk * D
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        kv_bytes = sum(t.to(dtype).numel() * t.to(dtype).element_size() for t in (k, v))
        elem = torch.finfo(dtype).bits // 8
        assert kv_bytes == B * H * Tk * D * 2 * elem
        assert attention_decode_bytes(B, H, Tk, D, elem) == kv_bytes
        assert 4 * B * H * Tk * D / kv_bytes == 2 / elem
    assert 1024 * 64 * 2 * 2 == 256 * 1024
    assert round(100 * 1024 / 1e-6 / 1e9) == 102  # bytes per second, in GB/s



# ================================================================================================================
# Attention: dropout's random numbers


def _max_counter(T: int) -> int:
    """The largest Philox counter a * T + 8 * (j // 8) over query positions a and keys j below T."""
    return (T - 1) * T + 8 * ((T - 1) // 8)


def test_philox_counter_bound():
    """MAX_DROPOUT_T = 46340 is the largest T whose every counter a * T + 8 * (j // 8) (a, j < T) is below 2^31
    (a 32-bit signed integer): exactly at 46340, over it at 46341. Python integers, no overflow. The docstring's
    shorthand Tk * Tk < 2^31 gives the same bound (the largest counter is below T^2). The Philox key seed +
    bh * 2^32 keeps the seed (< 2^31, as the launcher draws it) in the low word and bh in the high one."""
    assert _max_counter(MAX_DROPOUT_T) < 2**31 <= _max_counter(MAX_DROPOUT_T + 1)
    assert all(_max_counter(T) < _max_counter(T + 1) for T in range(1, 100))  # increasing: one crossing
    assert MAX_DROPOUT_T == max(T for T in range(46000, 47000) if _max_counter(T) < 2**31)
    assert MAX_DROPOUT_T == math.isqrt(2**31 - 1)  # T * T < 2^31
    assert all(_max_counter(T) < T * T for T in range(1, 100))
    # COURSE.md, lesson 7: past 2^31 the int32 counter wraps, but tl.randint4x reads its 32 bits as uint32, so the
    # counters stay distinct while they are below 2^32, up to T = 65536 (the kernel's draws past 2^31 and past 2^32:
    # tests/test_tiled.py)
    assert _max_counter(65536) < 2**32 <= _max_counter(65537)
    assert max(T for T in range(65000, 66000) if _max_counter(T) < 2**32) == 65536
    # a chunk (Tq < Tk) counts from positions: the dK/dV kernel's rows r from offset, (offset + r) * Tk + j
    Tk, offset = 50, 30
    assert all((offset + r) * Tk + j == r * Tk + (j + offset * Tk) for r in range(Tk - offset) for j in range(Tk))
    seed, bh = 2**31 - 2, 7
    key = seed + bh * 2**32
    assert (key & 0xFFFFFFFF, key >> 32) == (seed, bh)


@pytest.mark.skipif(not (torch.cuda.is_available() or is_interpreting()), reason="needs the kernels to accept tensors")
def test_launcher_refuses_dropout_past_the_bound(monkeypatch):
    """causal_attention refuses dropout with Tk = MAX_DROPOUT_T + 1 keys, with the fix in its message, and lets
    Tk = MAX_DROPOUT_T through. The check lives in causal_attention itself (not in a function of its own, nor in
    the attention_fwd op below it), so the op is replaced by a stub here: the tensors are tiny (D = 1, one query),
    and no kernel runs."""
    calls = []
    monkeypatch.setattr(attention, "attention_fwd", lambda q, *args: calls.append(args[-1]) or (q, None))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def qkv(Tk):
        return torch.zeros(1, 1, 1, 1, device=device), *(torch.zeros(1, 1, Tk, 1, device=device) for _ in range(2))

    with pytest.raises(ValueError, match=f"Tk <= {MAX_DROPOUT_T}.*dropout_p=0"):
        causal_attention(*qkv(MAX_DROPOUT_T + 1), dropout_p=0.1)
    assert not calls
    causal_attention(*qkv(MAX_DROPOUT_T), dropout_p=0.1)
    causal_attention(*qkv(MAX_DROPOUT_T + 1), dropout_p=0.0)  # without dropout there is no counter to overflow
    assert len(calls) == 2


@pytest.mark.parametrize("p", [0.0, 2**-17, 1.5 * 2**-16, 0.1, 0.25, 1 / 3, 0.5, 0.9, 0.99999, 1 - 2**-18])
def test_dropout_threshold(p):
    """An entry is kept when its 16-bit draw is >= round(p * 2^16), so dropped with probability p to within 2^-17:
    exhaustively over the 2^16 equally likely draws, with the threshold computed as the kernel does (p is a float32
    argument; p * 65536 + 0.5 truncated to an unsigned integer: round half up)."""
    threshold = int(torch.tensor(p, dtype=torch.float32) * 65536.0 + 0.5)
    assert threshold == math.floor(p * 65536 + 0.5)
    draws = torch.arange(2**16)
    p_drop = (draws < threshold).sum().item() / 2**16
    assert abs(p_drop - p) <= 2**-17


def test_philox_key_layout_is_the_docstring_sentence():
    """The module docstring's order of the 16-bit halves over the 8 keys of a group ("w0 low, w2 low, ...") is
    ``tiled.PHILOX_KEY_LAYOUT``, which tests/test_tiled.py reads off the kernel's own ``_keep_mask``: the sentence a
    reader rebuilds the mask from is the kernel's order."""
    from kernels import tiled

    sentence = re.search(r"((?:w[0-3] (?:low|high), ){7}w[0-3] (?:low|high))", attention.__doc__)
    assert sentence, "the Dropout paragraph no longer lists the 8 keys' halves"
    said = tuple((int(word[1]), 0 if half == "low" else 1)
                 for word, half in (item.split() for item in sentence.group(1).split(", ")))
    assert said == tiled.PHILOX_KEY_LAYOUT


# ================================================================================================================
# The tile tables (kernels/attention_tiles.py) the causal loop bounds rely on


def test_gpu_tiles_divide_as_the_loop_bounds_assume():
    """attention_tiles.py: in every GPU tile BLOCK_N divides BLOCK_M for the forward and dQ kernels (so with
    Tq = Tk the diagonal band starts on a key tile), BLOCK_M divides BLOCK_N for dK/dV; every side is >= 16
    (tl.dot) and the key side a multiple of 8 (dropout's groups of 8 keys per Philox call)."""
    for group, kernels_tiles in GPU_TILES.items():
        for kernel, candidates in kernels_tiles.items():
            for t in candidates:
                where = f"{group} {kernel} {t}"
                assert min(t.BLOCK_M, t.BLOCK_N) >= MIN_BLOCK_D and t.BLOCK_N % 8 == 0, where
                if kernel == "dkdv":
                    assert t.BLOCK_N % t.BLOCK_M == 0, where
                else:
                    assert t.BLOCK_M % t.BLOCK_N == 0, where
