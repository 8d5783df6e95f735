"""The ``triton`` backend: our kernels behind the backend interface (see ``kernels/__init__.py``)."""
from __future__ import annotations

from .attention import causal_attention
from .gelu import gelu
from .layer_norm import layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .definitions import EPS, IGNORE_INDEX


class TritonBackend:
    """Triton kernels for LayerNorm, GELU, FlashAttention-style causal attention and the loss (the torch backend's
    chunk loop with a Triton kernel as its per-chunk softmax), forward and backward."""

    name = "triton"

    def layer_norm(self, x, weight, bias, eps: float = EPS):
        return layer_norm(x, weight, bias, eps)

    def gelu(self, x, approximate: str = "tanh"):
        return gelu(x, approximate)

    def causal_attention(self, q, k, v, dropout_p: float = 0.0, scale: float | None = None, doc_ids=None):
        return causal_attention(q, k, v, dropout_p, scale, doc_ids)

    def linear_cross_entropy(self, x, weight, targets, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        return linear_cross_entropy(x, weight, targets, ignore_index, reduction)
