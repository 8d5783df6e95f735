"""What each op costs: the FLOPs and bytes a pass must spend, the counts a benchmark divides by its times.

Each count is derived in the docstring of the kernel it describes ("Cost" and "Decoding" in attention.py, "Work and
memory traffic" in gelu.py, "Memory traffic" in layer_norm.py and linear_cross_entropy.py); here they are written
once, as plain arithmetic with no Triton or torch, so the benchmarks, the tests and the course all use these same
functions. Counting conventions: 2 FLOPs per multiply-add; bytes are what a pass reads and writes in memory,
each tensor once.
"""
from __future__ import annotations

__all__ = ["attention_decode_bytes", "attention_decode_flops", "causal_attention_flops", "gelu_bytes",
           "layer_norm_bytes", "linear_cross_entropy_flops", "rows_step_bytes"]


def causal_attention_flops(B: int, H: int, T: int, D: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of causal attention over T = Tq = Tk positions.

    Forward: two matmuls (q k^T and P v) over the (query, key) pairs the mask keeps, with the pairs counted as
    T * T / 2 (exactly T (T + 1) / 2: the convention leaves out the T / 2 diagonal pairs' share, under 0.1% at
    T = 1024): 2 * 2 * B * H * T * T * D / 2. Backward: five such matmuls (S recomputed, dP, dV, dQ, dK), 2.5 times
    the forward.
    """
    forward = 2.0 * 2.0 * B * H * T * T * D / 2.0
    return forward, 2.5 * forward


def attention_decode_flops(B: int, H: int, Tk: int, D: int) -> float:
    """FLOPs of one decoding step (Tq = 1 against Tk cached keys): q k^T and P v, one D-long dot product each per
    key."""
    return 4.0 * B * H * Tk * D


def attention_decode_bytes(B: int, H: int, Tk: int, D: int, elem_bytes: int) -> int:
    """Bytes one decoding step must read: every cached key and value once (q and o add only 2 * D values a head)."""
    return B * H * Tk * D * 2 * elem_bytes


def gelu_bytes(numel: int, elem_bytes: int, backward: bool = False) -> int:
    """Bytes one GELU pass moves: the forward reads x and writes y (2 n b); the backward reads x and dy, writes dx
    (3 n b)."""
    return (3 if backward else 2) * numel * elem_bytes


def layer_norm_bytes(rows: int, width: int, x_bytes: int, w_bytes: int, backward: bool = False,
                     groups: int = 0) -> int:
    """Bytes one LayerNorm pass moves, for ``rows`` rows of ``width``; x, y, dy, dx of ``x_bytes`` each, the weight,
    bias and their gradients of ``w_bytes``, mean and rstd float32.

    ``groups`` is the backward's number of row groups G: our kernel's partial sums of dw and db add 16 * G * C bytes
    (written, read back). They are an implementation's choice, not the op's: the benchmarks count ``groups=0``.
    """
    rows_bytes = rows * width * x_bytes
    if not backward:
        return 2 * rows_bytes + 2 * width * w_bytes + 8 * rows
    return 3 * rows_bytes + width * w_bytes + 8 * rows + 16 * groups * width + 2 * width * w_bytes


def linear_cross_entropy_flops(rows: int, width: int, vocab: int) -> tuple[float, float]:
    """(forward, backward) matmul FLOPs of the loss: the logits 2 N C V; dX = dZ W and dW = dZ^T X, 2 N C V each.
    The softmax's ~10 N V are left out (under 1% at C = 768)."""
    one = 2.0 * rows * width * vocab
    return one, 2 * one


def rows_step_bytes(rows: int, vocab: int, grad: bool = True) -> int:
    """Bytes the loss's rows kernel moves for ``rows`` rows of ``vocab`` float32 logits: 12 V + 20 a row with the
    gradient sweep, 4 V + 16 without."""
    return rows * (12 * vocab + 20 if grad else 4 * vocab + 16)
