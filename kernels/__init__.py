"""Kernels backends: the four operations a GPT needs besides its other matmuls.

Words, used one way everywhere: the four *ops* are LayerNorm, GELU, causal attention and the loss (the output
head's matmul fused with cross-entropy); a *backend* is an object that implements them (``get_backend(name)``
returns one, ``model.backend`` holds it); a user picks one by name with ``kernels=`` / ``--kernels``, and
``model.kernels`` reports that name; ``kernels`` is also this package, where the backends live. A backend is any
object with these methods (shapes are the only contract):

    layer_norm(x, weight, bias, eps=1e-5)        x (..., C), weight/bias (C,) -> (..., C)
    gelu(x, approximate="tanh")                  any shape -> same shape
    causal_attention(q, k, v, dropout_p=0.0, scale=None)
                                                 q (B, H, Tq, D), k, v (B, H, Tk, D), Tq <= Tk -> (B, H, Tq, D);
                                                 the queries are the last Tq of the Tk positions (bottom-right
                                                 causal mask: query i sees keys 0 .. Tk - Tq + i)
    linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean")
                                                 x (N, C), weight (V, C) any strides, targets (N,) int64 ->
                                                 F.cross_entropy(x @ weight.T, targets, ...) computed in float32:
                                                 a scalar for "mean" / "sum", (N,) for "none"; "mean" divides by the
                                                 rows whose target is not ignore_index (nan if none is), and no
                                                 backend holds the (N, V) logits whole. A target outside [0, V)
                                                 gives nan, or an error where checking costs no GPU sync
                                                 (``check_linear_cross_entropy_inputs`` in reference.py)

A backend object made elsewhere may leave out ``linear_cross_entropy``: the model then uses the torch backend's.

Backends:

    torch   readable PyTorch (``kernels/reference.py``): the definition every kernel is checked against
    triton  our Triton kernels (``kernels/attention.py``, ``layer_norm.py``, ``gelu.py``,
            ``linear_cross_entropy.py``); on a machine without a GPU they run in Triton's interpreter, which is
            slow and meant for learning and debugging
    auto    per call: ``triton`` for CUDA tensors when Triton is installed, ``torch`` otherwise

This package knows nothing of minigpt and never imports it.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

__all__ = ["get_backend", "available_backends", "BACKENDS", "BackendUnavailable"]

BACKENDS = ("auto", "torch", "triton")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine (the message says why and what to do)."""


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


_interpreter_warned = False


def _prepare_triton() -> None:
    """Switch Triton to its CPU interpreter when there is no GPU.

    ``TRITON_INTERPRET=1`` is read when a function is decorated with ``@triton.jit``: our kernels when their modules
    are first imported, and Triton's own helpers (``tl.sum``, ``tl.cdiv``, ``tl.randint4x``, ...) when
    ``triton.language`` is first imported. Setting it here covers our kernels; when ``triton.language`` (or one of
    our kernel modules) was imported earlier — ``torch._dynamo``, ``torch.compile`` and ``transformers`` import it
    — the functions already made for the compiler are re-wrapped for the interpreter. On a GPU nothing changes.
    """
    global _interpreter_warned
    if not _cuda_available() and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("TRITON_INTERPRET") == "1":
        from .launch import fix_interpreter_scalars

        _interpret_loaded_jit_functions()
        fix_interpreter_scalars()
        if not _interpreter_warned:
            _interpreter_warned = True
            warnings.warn(
                "no CUDA GPU: Triton kernels run in Triton's CPU interpreter — correct but very slow, "
                "meant for learning and debugging (use --kernels torch for speed on CPU)",
                stacklevel=3,
            )


def _interpret_loaded_jit_functions() -> None:
    """Replace every compiled-mode ``@triton.jit`` function in the loaded Triton language modules and in this
    package by its interpreted twin, as if ``TRITON_INTERPRET=1`` had been set before they were imported.

    Functions are looked up by name when a kernel calls them (module globals, and methods of ``tl.tensor`` such as
    ``x.sum()``), so swapping those names is enough. Raises BackendUnavailable when this Triton's internals differ
    from what is expected, with the one thing that always works: set the variable before anything imports Triton.
    """
    import sys

    if "triton.language" not in sys.modules and not any(n.startswith(__name__ + ".") for n in sys.modules):
        return  # nothing was imported before the flag: decoration will do the right thing
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        raise BackendUnavailable(_SET_INTERPRET_FIRST + f" ({e})") from None
    twins: dict[int, InterpretedFunction] = {}  # by id: hashing a JITFunction compiles its dependencies' keys

    def twin(fn):
        if id(fn) not in twins:
            twins[id(fn)] = InterpretedFunction(fn.fn)
        return twins[id(fn)]

    prefixes = ("triton.language", __name__ + ".")
    modules = [m for n, m in list(sys.modules.items()) if m is not None and n.startswith(prefixes)]
    try:
        for module in modules:
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    setattr(module, attr, twin(value))
        tensor = tl.core.tensor
        for attr, value in list(vars(tensor).items()):
            if isinstance(value, JITFunction):  # a method such as x.sum(): an interpreted one needs a function
                def method(*args, _fn=twin(value), **kwargs):
                    return _fn(*args, **kwargs)

                setattr(tensor, attr, method)
    except (AttributeError, TypeError) as e:  # a Triton whose internals moved
        raise BackendUnavailable(_SET_INTERPRET_FIRST + f" ({type(e).__name__}: {e})") from None


_SET_INTERPRET_FIRST = (
    "the triton backend without a GPU needs Triton's interpreter, and Triton was imported before it could be "
    "switched on — set TRITON_INTERPRET=1 in the environment before starting Python (or import kernels before "
    "torch._dynamo / transformers), or use kernels='torch'"
)


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
        from .reference import TorchBackend

        return TorchBackend()
    if name == "triton":
        if not _triton_installed():
            raise BackendUnavailable(
                "the triton backend needs the 'triton' package — `pip install triton` (Linux), or use kernels='torch'"
            )
        _prepare_triton()
        from .triton_backend import TritonBackend

        return TritonBackend()
    if name == "auto":
        return AutoBackend()
    raise BackendUnavailable(f"unknown kernels backend {name!r} — choose one of {', '.join(BACKENDS)}")


class AutoBackend:
    """Chooses per call: Triton kernels for CUDA tensors when Triton is installed, plain PyTorch otherwise.

    Deciding at call time (not at construction) means ``model.to("cuda")`` after building the model on the CPU
    still gets the kernels.
    """

    name = "auto"

    def __init__(self) -> None:
        from .reference import TorchBackend

        self._torch = TorchBackend()
        self._triton = None
        self._use_triton = _triton_installed() and _cuda_available()

    def _pick(self, x):
        if self._use_triton and x.is_cuda:
            if self._triton is None:
                self._triton = get_backend("triton")
            return self._triton
        return self._torch

    def layer_norm(self, x, weight, bias, eps: float = 1e-5):
        return self._pick(x).layer_norm(x, weight, bias, eps)

    def gelu(self, x, approximate: str = "tanh"):
        return self._pick(x).gelu(x, approximate)

    def causal_attention(self, q, k, v, dropout_p: float = 0.0, scale: float | None = None):
        return self._pick(q).causal_attention(q, k, v, dropout_p, scale)

    def linear_cross_entropy(self, x, weight, targets, ignore_index: int = -100, reduction: str = "mean"):
        return self._pick(x).linear_cross_entropy(x, weight, targets, ignore_index, reduction)

    def resolved_name(self, device) -> str:
        """Which backend a tensor on ``device`` would get ("triton" or "torch")."""
        import torch

        return "triton" if (self._use_triton and torch.device(device).type == "cuda") else "torch"
