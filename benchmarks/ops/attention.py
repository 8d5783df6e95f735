"""The ``attention`` rows of ``python -m benchmarks.kernels``: causal multi-head attention on (B, H, T, D) queries,
keys and values, with and without dropout.

Contenders: ``triton`` (kernels/attention.py, FlashAttention), ``math`` (kernels.definitions.causal_attention_math,
the (T, T) scores whole), ``math_compile`` (the same under torch.compile) and ``pytorch``
(F.scaled_dot_product_attention with the flash backend; the harness falls back to the default dispatch where flash
cannot run — fp32, or dropout on the CPU — and the rows say so).

Counting: TFLOP/s with a (query, key) pair costing two D-long dot products (q.k, p.v) at 2 FLOPs per multiply-add,
causality keeping half the pairs (``attention_flops``).
"""
from __future__ import annotations

import math

from benchmarks.ops.interface import InputSet, forward_backward, random_leaf, upstream_gradient

NAME = "attention"
CONTENDERS = ("triton", "math", "math_compile", "pytorch")
PASS_STATUS: dict = {}
# B=8 with GPT-2 small's heads (12 x 64) and a wider model's (16 x 128); the dropout rows use the first heads.
SWEEP = dict(batch=8, heads=((12, 64), (16, 128)), seq_lens=(256, 512, 1024, 2048, 4096, 8192))
QUICK_SWEEP = dict(batch=1, heads=((2, 32),), seq_lens=(64, 128))
# (T, T) planes the formula materializes — scores, masked scores, weights, dropped weights and the gradient of each:
# ~6 for the plain formula, ~3 once torch.compile fuses the elementwise steps; flash keeps none
SCORE_PLANES = {"math": 6, "math_compile": 3}


def cases(quick: bool, options: dict) -> list[tuple]:
    """[(shape, dropout)]: (B, H, T, D) for each head shape and sequence length (``options['seq_lens']`` replaces the
    sweep's), then, with ``options['dropout']`` > 0, a dropout row set on the first head shape."""
    sweep = QUICK_SWEEP if quick else SWEEP
    seq_lens, B, dropout = options.get("seq_lens") or sweep["seq_lens"], sweep["batch"], options.get("dropout", 0.0)
    H0, D0 = sweep["heads"][0]
    return ([((B, H, T, D), 0.0) for H, D in sweep["heads"] for T in seq_lens]
            + [((B, H0, T, D0), dropout) for T in seq_lens if dropout > 0])


def family(shape: tuple, dtype: str, dropout: float) -> str:
    B, H, _T, D = shape
    return f"{NAME} B{B} H{H} D{D}" + (f" p={dropout:g}" if dropout else "") + f" {dtype}"


def size(shape: tuple) -> int:
    return shape[2]


def set_bytes(shape: tuple, elem: int) -> int:
    """q, k, v and dy."""
    return 4 * math.prod(shape) * elem


def interpreter_elements(shape: tuple) -> int:
    return math.prod(shape)


def planned_bytes(shape: tuple, elem: int, contender: str, copies: int) -> int:
    """Rough peak of a row: inputs, output and gradients (about 3 input sets) and the (T, T) planes."""
    B, H, T, _D = shape
    return (3 * set_bytes(shape, elem) + SCORE_PLANES.get(contender, 0) * B * H * T * T * elem) * copies


def attention_flops(B: int, H: int, T: int, D: int, pass_: str) -> float:
    """Causal attention FLOPs: fwd = 4*B*H*T*T*D/2 (q k^T and p v, half the pairs masked), bwd = 2.5 * fwd."""
    from kernels.costs import causal_attention_flops

    fwd, bwd = causal_attention_flops(B, H, T, D)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def counted_work(shape: tuple, elem: int, pass_: str) -> tuple[int | None, float | None]:
    return None, attention_flops(*shape, pass_)


def make_inputs(shape: tuple, dtype, device, copies: int) -> list[InputSet]:
    """q, k, v ~ N(0, 1)."""
    return [InputSet([random_leaf(shape, dtype, device) for _ in range(3)], upstream_gradient(shape, dtype, device))
            for _ in range(copies)]


def contender_fns(dropout: float, triton_backend, compiled: dict) -> tuple[dict, dict]:
    import torch.nn.functional as F

    from benchmarks.ops.interface import compiled_formula
    from kernels.definitions import causal_attention_math

    def flash(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)

    fns = {"math": lambda q, k, v: causal_attention_math(q, k, v, dropout),
           "math_compile": compiled_formula(compiled, (NAME, dropout), causal_attention_math, dropout),
           "pytorch": flash}
    if triton_backend is not None:
        fns["triton"] = lambda q, k, v: triton_backend.causal_attention(q, k, v, dropout)
    return fns, {}


def fallback(contender: str, exc: Exception, dropout: float):
    """(function, note) for PyTorch's attention where its flash backend cannot run this case (fp32, or dropout on
    the CPU): the default SDPA dispatch; None for any other failure."""
    import functools

    import torch.nn.functional as F

    if contender != "pytorch" or not isinstance(exc, RuntimeError) or "no available kernel" not in str(exc).lower():
        return None
    return (functools.partial(F.scaled_dot_product_attention, dropout_p=dropout, is_causal=True),
            "flash backend unavailable here: default SDPA dispatch")


def selector(shape: tuple, device):
    """The first and last (batch, head) pairs."""
    import torch

    B, H = shape[:2]
    pairs = sorted({(0, 0), (B - 1, H - 1)})
    return lambda t: torch.stack([t[b, h] for b, h in pairs])[None]  # (1, P, T, D)


def definition_outputs(inputs: InputSet, select, dropout: float = 0.0):
    """One head at a time: the (T, T) planes of float64 are large."""
    import torch

    from kernels.definitions import causal_attention_math

    leaves = [select(t.detach()).double() for t in inputs.tensors]
    dy = select(inputs.dy).double()
    outs, grads = [], []
    for p in range(leaves[0].shape[1]):
        head = InputSet([t[:, p:p + 1].clone().requires_grad_() for t in leaves], dy[:, p:p + 1])
        out, g = forward_backward(lambda q, k, v: causal_attention_math(q, k, v, dropout), head)
        outs.append(out)
        grads.append(g)
    return torch.cat(outs, dim=1), [torch.cat(gs, dim=1) for gs in zip(*grads)]
