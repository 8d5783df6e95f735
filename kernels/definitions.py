"""The definition of each op: the formula spelled out with elementary tensor operations.

Each ``*_math`` function computes exactly what the original notebook (and GPT-2) define, with no concern for speed.
The tests evaluate them in float64 to get the "true" answer every backend is measured against; the torch backend
(``kernels/torch_backend.py``) and the Triton kernels are both checked against these.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5  # GPT-2's and the original notebook's LayerNorm epsilon
GELU_APPROXIMATIONS = ("tanh", "none")
REDUCTIONS = ("mean", "sum", "none")  # F.cross_entropy's
IGNORE_INDEX = -100  # F.cross_entropy's default: a target with this value adds nothing to the loss


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
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, future masked) -> dropout -> @ v, materializing the (Tq, Tk) weights.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk. The queries are the LAST Tq positions of the Tk: query i
    sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i (bottom-right alignment: with Tq = Tk it is the
    usual causal mask; with Tq = 1 the one new token of a decoding step sees every key). ``dropout_mask`` (bool,
    (B, H, Tq, Tk), True = keep) replaces the random draw, so a test can apply exactly the mask a kernel used.
    ``doc_ids`` ((B, Tk) integers, the document of each key position; the queries are its last Tq): a query also
    does not see a key of another document.

    Why an id per position and not the documents' start offsets (FlashAttention's varlen ``cu_seqlens``): the ids
    are one dense tensor of the batch's own shape, whatever the number of documents in each window, so every
    backend takes them as they are — this definition and the torch backend compare them (``same_document``), a
    chunk of the last Tq queries reads the same tensor, the trainer builds them on the device from each window's
    end-of-text tokens (``minigpt.token_windows.document_ids``) with no trip to the host, and the Triton kernels turn
    them once per call into each position's document start and end (``kernels.attention.document_bounds``). Offsets
    are ragged (a different count per window): they would need padding, or a list built on the host.
    """
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    attn_scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    attn_scores = attn_scores.masked_fill(future_mask(Tq, Tk, q.device), float("-inf"))
    if doc_ids is not None:
        attn_scores = attn_scores.masked_fill(~same_document(doc_ids, Tq)[:, None], float("-inf"))
    attn_weights = torch.softmax(attn_scores, dim=-1)
    if dropout_mask is not None:
        attn_weights = attn_weights * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        attn_weights = F.dropout(attn_weights, p=dropout_p, training=True)
    return attn_weights @ v  # (B, H, Tq, D)


def future_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j is in the future of query i, i.e. j > (Tk - Tq) + i."""
    return torch.triu(torch.ones(Tq, Tk, dtype=torch.bool, device=device), diagonal=Tk - Tq + 1)


def same_document(doc_ids: torch.Tensor, Tq: int) -> torch.Tensor:
    """(B, Tq, Tk) bool, True where query i (position Tk - Tq + i) and key j are in the same document."""
    Tk = doc_ids.shape[1]
    return doc_ids[:, Tk - Tq:, None] == doc_ids[:, None, :]


def linear_cross_entropy_math(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the logits ``x @ weight.T`` against ``targets``, the logits materialized whole.

    x: (N, C); weight: (V, C) (any strides); targets: (N,) int64 class ids in [0, V), or ``ignore_index`` for a row
    that adds nothing. Row i's loss is ``logsumexp(logits_i) - logits_i[targets_i]``; "none" returns the (N,) rows
    (0 where ignored), "sum" their sum, "mean" the sum over the number of rows NOT ignored (nan when every row is,
    0 / 0, as F.cross_entropy). Computed in float32 (float64 stays float64) whatever the inputs' dtype: a loss summed
    over 50,257 exponentials is where half precision goes wrong first.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = x.to(dtype) @ weight.to(dtype).T  # (N, V): the tensor the chunked path never holds whole
    counted = targets != ignore_index  # (N,) bool
    safe_targets = torch.where(counted, targets, 0)  # an ignored row's target may be any number, e.g. -100
    picked = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (N,) the target's logit
    loss_rows = torch.where(counted, torch.logsumexp(logits, dim=1) - picked, 0.0)  # (N,)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / counted.sum()
