"""The ``auto`` backend: the Triton kernels for CUDA tensors when Triton is installed, plain PyTorch otherwise."""
from __future__ import annotations

import torch

from . import _cuda_available, _triton_installed, get_backend
from .definitions import EPS, IGNORE_INDEX
from .torch_backend import TorchBackend


class AutoBackend:
    """Chooses per call: Triton kernels for CUDA tensors when Triton is installed, plain PyTorch otherwise.

    Deciding at call time (not at construction) means ``model.to("cuda")`` after building the model on the CPU
    still gets the kernels.
    """

    name = "auto"

    def __init__(self) -> None:
        self._torch = TorchBackend()
        self._triton = None
        self._use_triton = _triton_installed() and _cuda_available()

    def _pick(self, x):
        if self._use_triton and x.is_cuda:
            if self._triton is None:
                self._triton = get_backend("triton")
            return self._triton
        return self._torch

    def layer_norm(self, x, weight, bias, eps: float = EPS):
        return self._pick(x).layer_norm(x, weight, bias, eps)

    def gelu(self, x, approximate: str = "tanh"):
        return self._pick(x).gelu(x, approximate)

    def causal_attention(self, q, k, v, dropout_p: float = 0.0, scale: float | None = None, doc_ids=None):
        return self._pick(q).causal_attention(q, k, v, dropout_p, scale, doc_ids)

    def linear_cross_entropy(self, x, weight, targets, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        return self._pick(x).linear_cross_entropy(x, weight, targets, ignore_index, reduction)

    def resolved_name(self, device) -> str:
        """Which backend a tensor on ``device`` would get ("triton" or "torch")."""
        return "triton" if (self._use_triton and torch.device(device).type == "cuda") else "torch"
