"""Triton's CPU interpreter for a machine without a GPU: switched on, and our already-imported kernels moved to it.

``get_backend("triton")`` calls ``prepare_triton()`` before it imports the kernel modules. This is the one place
that touches Triton's internals (its JIT function classes and the methods of ``tl.tensor``); everywhere else the
kernels are ordinary ``@triton.jit`` functions.
"""
from __future__ import annotations

import os
import sys
import warnings

from . import BackendUnavailable, _cuda_available

_PACKAGE = __package__  # "kernels": its kernel modules are the ones re-wrapped below
_interpreter_warned = False  # the slowness warning is given once a process


def prepare_triton() -> None:
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
    if "triton.language" not in sys.modules and not any(n.startswith(_PACKAGE + ".") for n in sys.modules):
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

    prefixes = ("triton.language", _PACKAGE + ".")
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
