"""The ``layer_norm`` rows of ``python -m benchmarks.kernels``: LayerNorm over the last dim of (M, C) rows, with a
weight and a bias, as the model runs it before attention, before the MLP and at the end.

Contenders: ``triton`` (kernels/layer_norm.py), ``math`` (kernels.definitions.layer_norm_math), ``math_compile``
(the same under torch.compile) and ``pytorch`` (F.layer_norm). Memory-bound: counted in bytes (``layer_norm_bytes``).
"""
from __future__ import annotations

from benchmarks.ops.interface import InputSet, forward_backward, random_leaf, upstream_gradient

NAME = "layer_norm"
CONTENDERS = ("triton", "math", "math_compile", "pytorch")
PASS_STATUS: dict = {}
# Rows of 8192 tokens = batch 8 x context 1024; widths from GPT-2 small (768) to 8192.
SWEEP = dict(rows=8192, widths=(768, 1024, 1600, 2048, 4096, 8192))
QUICK_SWEEP = dict(rows=64, widths=(128, 320))


def cases(quick: bool, options: dict) -> list[tuple]:
    """[(shape, dropout)]: (M, C) for each width (``options['widths']`` replaces the sweep's)."""
    sweep = QUICK_SWEEP if quick else SWEEP
    return [((sweep["rows"], c), 0.0) for c in options.get("widths") or sweep["widths"]]


def family(shape: tuple, dtype: str, dropout: float) -> str:
    return f"{NAME} rows={shape[0]} {dtype}"


def size(shape: tuple) -> int:
    return shape[1]


def set_bytes(shape: tuple, elem: int) -> int:
    """x and dy (the small weight and bias left out)."""
    return 2 * shape[0] * shape[1] * elem


def interpreter_elements(shape: tuple) -> int:
    return shape[0] * shape[1]


def planned_bytes(shape: tuple, elem: int, contender: str, copies: int) -> int:
    """Rough peak of a row: inputs, output and gradients, about 3 input sets."""
    return 3 * set_bytes(shape, elem) * copies


def layer_norm_bytes(rows: int, width: int, elem: int, pass_: str) -> int:
    """Fewest bytes a LayerNorm pass moves; x, y, dy, dx, weight and bias of ``elem`` bytes, mean and rstd fp32.

        forward:   reads x (M*C) + weight, bias (2*C)           writes y (M*C) + mean, rstd (2*M, 4 bytes each)
        backward:  reads x, dy (2*M*C) + weight (C) + mean, rstd (2*M, 4 bytes)   writes dx (M*C) + dw, db (2*C)

    Partial sums of dw/db that an implementation writes and reads back (ours: two fp32 (G, C) arrays) are its own
    choice, not the op's, and are not counted.
    """
    from kernels.costs import layer_norm_bytes as op_bytes

    fwd, bwd = op_bytes(rows, width, elem, elem), op_bytes(rows, width, elem, elem, backward=True)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def counted_work(shape: tuple, elem: int, pass_: str) -> tuple[int | None, float | None]:
    return layer_norm_bytes(*shape, elem, pass_), None


def make_inputs(shape: tuple, dtype, device, copies: int) -> list[InputSet]:
    """x ~ N(0.5, 1) (a shifted mean), weight ~ N(1, 0.01), bias ~ N(0, 0.01): parameters near (1, 0)."""
    C = shape[1]
    return [InputSet([random_leaf(shape, dtype, device, shift=0.5), random_leaf((C,), dtype, device, 0.1, 1.0),
                      random_leaf((C,), dtype, device, 0.1)], upstream_gradient(shape, dtype, device))
            for _ in range(copies)]


def contender_fns(dropout: float, triton_backend, compiled: dict) -> tuple[dict, dict]:
    import torch.nn.functional as F

    from benchmarks.ops.interface import compiled_formula
    from kernels.definitions import EPS, layer_norm_math

    fns = {"math": lambda x, w, b: layer_norm_math(x, w, b, EPS),
           "math_compile": compiled_formula(compiled, (NAME, EPS), layer_norm_math, EPS),
           "pytorch": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, EPS)}
    if triton_backend is not None:
        fns["triton"] = lambda x, w, b: triton_backend.layer_norm(x, w, b, EPS)
    return fns, {}


def selector(shape: tuple, device):
    """All of it: dw and db sum over every row."""
    return lambda t: t


def definition_outputs(inputs: InputSet, select, dropout: float = 0.0):
    from kernels.definitions import EPS, layer_norm_math

    leaves = [select(t.detach()).double().requires_grad_() for t in inputs.tensors]
    return forward_backward(lambda x, w, b: layer_norm_math(x, w, b, EPS), InputSet(leaves, select(inputs.dy).double()))
