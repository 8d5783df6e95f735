"""Kernels backends: the four operations a GPT needs besides its other matmuls.

Words, used one way everywhere: the four *ops* are LayerNorm, GELU, causal attention and the loss (the output
head's matmul fused with cross-entropy); a *backend* is an object that implements them (``get_backend(name)``
returns one, ``model.backend`` holds it); a user picks one by name with ``kernels=`` / ``--kernels``, and
``model.kernels`` reports that name; ``kernels`` is also this package, where the backends live. Python functions
say *forward* and *backward* (``tiled.attention_forward``, the launchers ``_gelu_forward`` and
``_layer_norm_backward``); what is compiled or registered keeps the short ``fwd`` / ``bwd`` of FlashAttention's
code: the Triton kernels (``_attention_fwd``, ``_fwd_inner``, ``_layer_norm_bwd_dx``), the custom ops that launch
them (``torch.ops.minigpt.gelu_fwd``), the attention kernels' labels in tile tables, tuners and figures (``"fwd"``,
``"dkdv"``, ``"dq"``) and the benchmarks' passes (``fwd``, ``bwd``, ``fwd+bwd``). A backend is any object with
these methods (shapes are the only contract):

    layer_norm(x, weight, bias, eps=1e-5)        x (..., C), weight/bias (C,) -> (..., C)
    gelu(x, approximate="tanh")                  any shape -> same shape
    causal_attention(q, k, v, dropout_p=0.0, scale=None, doc_ids=None)
                                                 q (B, H, Tq, D), k, v (B, H, Tk, D), Tq <= Tk -> (B, H, Tq, D);
                                                 the queries are the last Tq of the Tk positions (bottom-right
                                                 causal mask: query i sees keys 0 .. Tk - Tq + i); doc_ids (B, Tk)
                                                 non-decreasing integers: a query sees only keys of its own
                                                 document (packed documents)
    linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean")
                                                 x (N, C), weight (V, C) any strides, targets (N,) int64 ->
                                                 F.cross_entropy(x @ weight.T, targets, ...) computed in float32:
                                                 a scalar for "mean" / "sum", (N,) for "none"; "mean" divides by the
                                                 rows whose target is not ignore_index (nan if none is), and no
                                                 backend holds the (N, V) logits whole. A target outside [0, V)
                                                 gives nan, or an error where checking costs no GPU sync
                                                 (``check_linear_cross_entropy_inputs`` in checks.py)

A backend object made elsewhere may leave out ``linear_cross_entropy``: the model then uses the torch backend's.

Backends:

    torch   readable PyTorch (``kernels/torch_backend.py``), checked, as every kernel is, against the
            definitions in ``kernels/definitions.py``
    triton  our Triton kernels (``kernels/attention.py``, ``layer_norm.py``, ``gelu.py``,
            ``linear_cross_entropy.py``); on a machine without a GPU they run in Triton's interpreter, which is
            slow and meant for learning and debugging
    auto    per call: ``triton`` for CUDA tensors when Triton is installed, ``torch`` otherwise

This package knows nothing of minigpt and never imports it.
"""
from __future__ import annotations

import importlib.util

from .errors import MinigptError

__all__ = ["get_backend", "available_backends", "BACKENDS", "BackendUnavailable", "MinigptError"]

BACKENDS = ("auto", "torch", "triton")


class BackendUnavailable(MinigptError, RuntimeError):
    """The requested backend cannot run on this machine (the message says why and what to do)."""


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def available_backends() -> list[str]:
    """Names of the backends this machine can run (``triton`` needs the package; without a GPU it interprets)."""
    names = ["torch"]
    if _triton_installed():
        names.append("triton")
    return names


def get_backend(name: str = "auto"):
    """Return the backend object called ``name`` (one of ``BACKENDS``)."""
    name = (name or "auto").lower()
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend()
    if name == "triton":
        if not _triton_installed():
            raise BackendUnavailable(
                "the triton backend needs the 'triton' package — `pip install triton` (Linux), or use kernels='torch'"
            )
        from .interpreter import prepare_triton

        prepare_triton()
        from .triton_backend import TritonBackend

        return TritonBackend()
    if name == "auto":
        from .auto_backend import AutoBackend

        return AutoBackend()
    raise BackendUnavailable(f"unknown kernels backend {name!r} — choose one of {', '.join(BACKENDS)}")
