"""The ``torch`` backend: plain, readable PyTorch.

This file is the definition of the three ops. Each is written twice:

* ``*_math``: the formula spelled out with elementary tensor operations, exactly as the seed notebook (and
  GPT-2) define it. Tests evaluate these in float64 to get the "true" answer every backend is measured against.
* ``TorchBackend``: what the model calls. It uses PyTorch's fused implementation where one computes the very
  same function (``F.layer_norm``, ``F.gelu``, ``F.scaled_dot_product_attention``) — the fast path beside the
  plain one, so a reader sees both — and the tests check that the two agree.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5  # GPT-2's and the seed's LayerNorm epsilon
GELU_APPROXIMATIONS = ("tanh", "none")


# ----------------------------------------------------------------------------------------------------------------
# The formulas


def layer_norm_math(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    norm_x = (x - mean) / torch.sqrt(var + eps)
    return weight * norm_x + bias


def gelu_math(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU. ``tanh``: GPT-2's approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); ``none``: x Phi(x)."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(f"gelu: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def causal_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, future masked) -> dropout -> @ v, materializing the (Tq, Tk) weights.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk. The queries are the LAST Tq positions of the Tk: query i
    sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i (bottom-right alignment: with Tq = Tk it is the
    usual causal mask; with Tq = 1 the one new token of a decoding step sees every key). ``dropout_mask`` (bool,
    (B, H, Tq, Tk), True = keep) replaces the random draw, so a test can apply exactly the mask a kernel used.
    """
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    attn_scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    attn_scores = attn_scores.masked_fill(future_mask(Tq, Tk, q.device), float("-inf"))
    attn_weights = torch.softmax(attn_scores, dim=-1)
    if dropout_mask is not None:
        attn_weights = attn_weights * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        attn_weights = F.dropout(attn_weights, p=dropout_p, training=True)
    return attn_weights @ v  # (B, H, Tq, D)


def future_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j is in the future of query i, i.e. j > (Tk - Tq) + i."""
    return torch.triu(torch.ones(Tq, Tk, dtype=torch.bool, device=device), diagonal=Tk - Tq + 1)


# ----------------------------------------------------------------------------------------------------------------
# Input checks shared by every backend (a user's mistake gets a message, not a shape error deep inside)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"causal_attention: q, k, v must be (B, H, T, D), got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    Tq, Tk = q.shape[2], k.shape[2]
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or Tq > Tk:
        raise ValueError(
            f"causal_attention: q (B, H, Tq, D) and k, v (B, H, Tk, D) with Tq <= Tk, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"causal_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"causal_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_attention: dropout_p must be in [0, 1), got {dropout_p}")


def check_layer_norm_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    C = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(
            f"layer_norm: x (..., C) needs weight and bias of shape (C,), got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )


def check_gelu_approximate(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


# ----------------------------------------------------------------------------------------------------------------
# The backend


class TorchBackend:
    """PyTorch's own implementations of the three ops (checked against the ``*_math`` formulas above)."""

    name = "torch"

    def layer_norm(self, x, weight, bias, eps: float = EPS):
        check_layer_norm_inputs(x, weight, bias)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def gelu(self, x, approximate: str = "tanh"):
        check_gelu_approximate(approximate)
        return F.gelu(x, approximate=approximate)

    def causal_attention(self, q, k, v, dropout_p: float = 0.0, scale: float | None = None):
        # scaled_dot_product_attention picks a fused kernel (flash / memory-efficient) when one fits and falls back
        # to the plain math otherwise; its dropout acts on the softmax output, as nn.Dropout does in the seed.
        check_attention_inputs(q, k, v, dropout_p)
        Tq, Tk = q.shape[-2], k.shape[-2]
        if Tq == Tk:  # training, and a prompt's first forward
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        if Tq == 1:  # one decoding step: the new token sees every key, nothing to mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        # is_causal=True would align the mask top-left (query i sees keys 0..i); ours is bottom-right
        allowed = ~future_mask(Tq, Tk, q.device)  # (Tq, Tk), True = may attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
