"""The ``gelu`` rows of ``python -m benchmarks.kernels``: GPT-2's tanh GELU on (M, 4C) rows, the MLP's hidden layer.

Contenders: ``triton`` (kernels/gelu.py), ``math`` (kernels.definitions.gelu_math), ``math_compile`` (the same
under torch.compile) and ``pytorch`` (F.gelu(approximate="tanh")). Memory-bound: counted in bytes (``gelu_bytes``).
"""
from __future__ import annotations

import math

from benchmarks.ops import layer_norm
from benchmarks.ops.interface import InputSet, forward_backward, random_leaf, upstream_gradient

NAME = "gelu"
CONTENDERS = ("triton", "math", "math_compile", "pytorch")
PASS_STATUS: dict = {}
APPROXIMATE = "tanh"  # GPT-2's GELU
DEFINITION_ELEMENTS = 1 << 22  # the float64 definition is evaluated on about this many elements (rows sampled evenly)


def cases(quick: bool, options: dict) -> list[tuple]:
    """[(shape, dropout)]: (M, 4C) for each of LayerNorm's widths C — the MLP's hidden layer of the same models."""
    sweep = layer_norm.QUICK_SWEEP if quick else layer_norm.SWEEP
    return [((sweep["rows"], 4 * c), 0.0) for c in options.get("widths") or sweep["widths"]]


def family(shape: tuple, dtype: str, dropout: float) -> str:
    return f"{NAME} rows={shape[0]} {dtype}"


def size(shape: tuple) -> int:
    return shape[1]


def set_bytes(shape: tuple, elem: int) -> int:
    """x and dy."""
    return 2 * math.prod(shape) * elem


def interpreter_elements(shape: tuple) -> int:
    return math.prod(shape)


def planned_bytes(shape: tuple, elem: int, contender: str, copies: int) -> int:
    """Rough peak of a row: inputs, output and gradients, about 3 input sets."""
    return 3 * set_bytes(shape, elem) * copies


def gelu_bytes(numel: int, elem: int, pass_: str) -> int:
    """Fewest bytes a GELU pass moves: forward reads x, writes y (2 n); backward reads x and dy, writes dx (3 n)."""
    from kernels.costs import gelu_bytes as op_bytes

    fwd, bwd = op_bytes(numel, elem), op_bytes(numel, elem, backward=True)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def counted_work(shape: tuple, elem: int, pass_: str) -> tuple[int | None, float | None]:
    return gelu_bytes(math.prod(shape), elem, pass_), None


def make_inputs(shape: tuple, dtype, device, copies: int) -> list[InputSet]:
    """x ~ N(0, 1)."""
    return [InputSet([random_leaf(shape, dtype, device)], upstream_gradient(shape, dtype, device))
            for _ in range(copies)]


def contender_fns(dropout: float, triton_backend, compiled: dict) -> tuple[dict, dict]:
    import torch.nn.functional as F

    from benchmarks.ops.interface import compiled_formula
    from kernels.definitions import gelu_math

    fns = {"math": lambda x: gelu_math(x, APPROXIMATE),
           "math_compile": compiled_formula(compiled, (NAME, APPROXIMATE), gelu_math, APPROXIMATE),
           "pytorch": lambda x: F.gelu(x, approximate=APPROXIMATE)}
    if triton_backend is not None:
        fns["triton"] = lambda x: triton_backend.gelu(x, APPROXIMATE)
    return fns, {}


def selector(shape: tuple, device):
    """Rows sampled evenly, about DEFINITION_ELEMENTS elements in all."""
    import torch

    step = max(1, math.prod(shape) // DEFINITION_ELEMENTS)
    index = torch.arange(0, shape[0], step, device=device)
    return lambda t: t[index]


def definition_outputs(inputs: InputSet, select, dropout: float = 0.0):
    from kernels.definitions import gelu_math

    leaves = [select(t.detach()).double().requires_grad_() for t in inputs.tensors]
    return forward_backward(lambda x: gelu_math(x, APPROXIMATE), InputSet(leaves, select(inputs.dy).double()))
