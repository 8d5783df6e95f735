"""The ``torch`` backend: plain, readable PyTorch (see ``kernels/__init__.py`` for the backend interface).

It uses PyTorch's fused implementation where one computes the very same function as the definition in
``kernels/definitions.py`` (``F.layer_norm``, ``F.gelu``, ``F.scaled_dot_product_attention``) — the fast path beside
the plain one, so a reader sees both — and the tests check that the two agree. The loss has no such PyTorch
function: its fast path is our own chunk loop (``kernels/chunked_loss.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_attention_inputs, check_gelu_approximate, check_layer_norm_inputs, \
    check_linear_cross_entropy_inputs
from .chunked_loss import chunked_linear_cross_entropy, cross_entropy_rows_step
from .definitions import EPS, IGNORE_INDEX, future_mask, same_document


class TorchBackend:
    """PyTorch's own implementations of LayerNorm, GELU and attention, and the chunked loss (each checked
    against its ``*_math`` formula)."""

    name = "torch"

    def layer_norm(self, x, weight, bias, eps: float = EPS):
        check_layer_norm_inputs(x, weight, bias)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def gelu(self, x, approximate: str = "tanh"):
        check_gelu_approximate(approximate)
        return F.gelu(x, approximate=approximate)

    def causal_attention(self, q, k, v, dropout_p: float = 0.0, scale: float | None = None,
                         doc_ids: torch.Tensor | None = None):
        # scaled_dot_product_attention picks a fused kernel (flash / memory-efficient) when one fits and falls back
        # to the plain math otherwise; its dropout acts on the softmax output, as nn.Dropout does in the original
        # notebook.
        check_attention_inputs(q, k, v, dropout_p, doc_ids)
        Tq, Tk = q.shape[-2], k.shape[-2]
        if doc_ids is not None:  # documents: an explicit (B, 1, Tq, Tk) mask, causal and same-document
            allowed = ~future_mask(Tq, Tk, q.device) & same_document(doc_ids, Tq)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], dropout_p=dropout_p,
                                                  scale=scale)
        if Tq == Tk:  # training, and a prompt's first forward
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        if Tq == 1:  # one decoding step: the new token sees every key, nothing to mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        # is_causal=True would align the mask top-left (query i sees keys 0..i); ours is bottom-right
        allowed = ~future_mask(Tq, Tk, q.device)  # (Tq, Tk), True = may attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)

    def linear_cross_entropy(self, x, weight, targets, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        # F.cross_entropy(x @ weight.T, ...) would hold the (N, V) logits and their gradient whole; the chunks
        # hold one (rows, V) slice at a time and give the same numbers (tests/test_linear_cross_entropy.py)
        check_linear_cross_entropy_inputs(x, weight, targets, ignore_index, reduction)
        return chunked_linear_cross_entropy(x, weight, targets, ignore_index, reduction, cross_entropy_rows_step)
