"""LayerNorm in Triton: a forward that reads each row from memory once, and a two-stage backward.

Forward
-------
Each row x of width C (a token's features) is normalized on its own, then scaled and shifted per feature:

    mean = sum(x) / C
    var  = sum((x - mean)^2) / C                  (the biased variance, as GPT-2 and torch use)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * w + b

One program normalizes BLOCK_M rows held whole in registers, each loaded as BLOCK_C = next_power_of_2(C) lanes
(Triton's tiles are powers of two), the lanes past C masked. Narrow rows share a program (768-wide: four a program on a
GPU, sharing the loads of w and b); a wide row gets its own.

One pass over memory, two reductions: the row is read once, then reduced twice in registers, first the mean, then the
variance of x - mean. The one-reduction var = E[x^2] - E[x]^2 subtracts two large, nearly equal numbers when a row's
mean is large against its spread (values near 1000 with spread 1: E[x^2] ~ 1e6, of which float32 keeps about 7 digits,
leaving the variance ~ 1 almost none; tests/test_formulas.py shows it), and the second reduction costs no memory
traffic. mean and rstd are float32, saved (8 bytes a row) for the backward.

Backward, derived
-----------------
Write g = dy * w (the gradient reaching xhat). Since xhat_j = (x_j - mean) * rstd, and both mean and rstd depend on
every x_i of the row, the chain rule gives

    d mean / d x_i = 1/C,        d rstd / d x_i = -rstd^3 (x_i - mean) / C = -rstd^2 xhat_i / C,
    d xhat_j / d x_i = rstd (delta_ij - 1/C) - xhat_j * rstd * xhat_i / C,

and summing g_j * d xhat_j / d x_i over j (the parameters, shared by all rows, sum over the M rows):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          (means over the row's C features)
    dw = sum_rows(dy * xhat),    db = sum_rows(dy)

The two-stage reduction for dw and db
-------------------------------------
One program walking all M rows would leave all but one multiprocessor idle; atomics from M programs into the same C
floats would serialize (and depend on the arrival order). So the rows are cut into G groups:

    stage 1  (G programs)          each program walks its group's consecutive rows, BLOCK_M at a time: writes dx
                                   and accumulates dy * xhat and dy in float32; then writes these partial sums as
                                   one row of two (G, C) float32 buffers.
    stage 2  (C / REDUCE_BLOCK_C)  each program sums a slice of columns over the G rows and writes dw and db.

G is at most twice the multiprocessors (as many programs as fit at once at GPT-2's widths: benchmarks/NOTES.md) and at
most M; rows per group are rounded up to whole BLOCK_M steps, so G = cdiv(M, rows per group) (6 rows into 4 groups: 2
rows each, 3 groups). The partials add 16 * G / (6 * M) to the bf16 traffic, about 9% at M = 8192 on 132
multiprocessors. Deterministic: the same additions in the same order on every run.

Memory traffic
--------------
For M rows of width C, x in dtype of ``xb`` bytes, weight and bias of ``wb`` bytes, G row groups:

    forward:   reads  M*C*xb (x) + 2*C*wb (w, b)               writes M*C*xb (y) + 8*M (mean, rstd)
    backward:  reads  2*M*C*xb (x, dy) + C*wb (w) + 8*M        writes M*C*xb (dx) + 8*G*C (partials)
               stage 2 reads the 8*G*C partials back           writes 2*C*wb (dw, db)

``layer_norm_bytes`` (``kernels/costs.py``) computes these; the benchmark's GB/s leaves out our partials.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import launch
from .launch import (
    check_tensor,
    is_interpreting,
    kernel_dtype,
    num_warps_for,
    to_kernel,
    triton_next_power_of_2,
)
from .checks import check_layer_norm_inputs
from .definitions import EPS

# One row lives in registers, so the width is bounded. Up to 8192 nothing spills (``python -m kernels.compile_check``
# checks it); past that the backward spills registers to local memory — still correct, slower — and at 65536
# lanes each of the 512 threads holds 128 values per row tensor. Wider rows need a kernel that loops over the row.
MAX_WIDTH = 65536
GPU_TILE = 4096  # elements per program on a GPU: narrower rows share a program (768 wide: 4 rows a program)
GROUPS_PER_SM = 2  # row groups per multiprocessor in the backward's stage 1 (see the docstring above)
INTERPRETER_GROUPS = 4  # the interpreter runs programs one after another: few groups, a short stage 2
REDUCE_BLOCK_G = 32  # stage 2 tile: partial rows summed at once ...
REDUCE_BLOCK_C = 64  # ... by columns per program
REDUCE_NUM_WARPS = 4


# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _layer_norm_fwd(
    X,  # pointer to the input rows (M, C), contiguous
    WEIGHT,  # pointer to the scale w (C,)
    BIAS,  # pointer to the shift b (C,)
    Y,  # pointer to the output rows (M, C), X's dtype
    MEAN,  # pointer to the per-row means (M,), float32, saved for the backward
    RSTD,  # pointer to the per-row 1/std (M,), float32, saved for the backward
    stride,  # elements from one row to the next in X and Y
    n_rows,  # M
    width,  # C, the number of features per row
    eps,  # added to the variance before the square root
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # next power of two >= C: one tile row holds a whole row of X
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * stride may pass 2^31
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < width
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * stride + cols[None, :]  # (BLOCK_M, BLOCK_C)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / width  # (BLOCK_M,)
    xc = tl.where(mask, x - mean[:, None], 0.0)  # masked lanes would otherwise add mean^2 to the variance
    var = tl.sum(xc * xc, axis=1) / width
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(WEIGHT + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_dx(
    X,  # pointer to the forward's input rows (M, C), contiguous
    DY,  # pointer to the gradient w.r.t. the output (M, C), same layout
    DX,  # pointer to the gradient w.r.t. the input (M, C), written here
    WEIGHT,  # pointer to the scale w (C,)
    MEAN,  # pointer to the per-row means saved by the forward (M,), float32
    RSTD,  # pointer to the per-row 1/std saved by the forward (M,), float32
    PARTIAL_DW,  # pointer to this stage's partial sums of dy * xhat (G, C), float32
    PARTIAL_DB,  # pointer to this stage's partial sums of dy (G, C), float32
    stride,  # elements from one row to the next in X, DY and DX
    n_rows,  # M
    width,  # C
    rows_per_group,  # consecutive rows each program handles, a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,  # rows per step of the loop
    BLOCK_C: tl.constexpr,  # next power of two >= C: one tile row holds a whole row
):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < width
    # the partial sums stay a (BLOCK_M, BLOCK_C) tile through the loop and are summed over rows once, at the end
    dw = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    row_start = group * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, n_rows)
    for first_row in range(row_start, row_end, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        # w is re-read per step (a cache hit) rather than held across the loop: frees registers for long rows
        w = tl.load(WEIGHT + cols, mask=col_ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        # xhat is not 0 on masked lanes, but it is only ever multiplied by dy or g, which are 0 there
        xhat = (x - mean[:, None]) * rstd[:, None]
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / width  # (BLOCK_M,)
        mean_g_xhat = tl.sum(g * xhat, axis=1) / width
        dx = (g - mean_g[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(PARTIAL_DW + group * width + cols, tl.sum(dw, axis=0), mask=col_ok)
    tl.store(PARTIAL_DB + group * width + cols, tl.sum(db, axis=0), mask=col_ok)


@triton.jit
def _layer_norm_bwd_dwdb(
    PARTIAL_DW,  # pointer to the partial sums of dy * xhat (G, C), float32
    PARTIAL_DB,  # pointer to the partial sums of dy (G, C), float32
    DW,  # pointer to the weight's gradient (C,), written here in the weight's dtype
    DB,  # pointer to the bias's gradient (C,), written here in the bias's dtype
    n_groups,  # G
    width,  # C
    BLOCK_G: tl.constexpr,  # partial rows added per step
    BLOCK_C: tl.constexpr,  # columns per program
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < width
    dw = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        mask = (groups[:, None] < n_groups) & col_mask[None, :]
        offs = groups[:, None] * width + cols[None, :]  # (BLOCK_G, BLOCK_C)
        dw += tl.load(PARTIAL_DW + offs, mask=mask, other=0.0)
        db += tl.load(PARTIAL_DB + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


class RowTile(NamedTuple):
    BLOCK_M: int  # rows per program (forward) or per loop step (backward)
    BLOCK_C: int  # the row width padded to a power of two
    num_warps: int


def row_tile(width: int, elem_bytes: int, rows: int, interpreting: bool | None = None) -> RowTile:
    """The tile for rows of ``width`` elements of ``elem_bytes`` each, when a program has up to ``rows`` rows.

    On a GPU a program holds about ``GPU_TILE`` elements: several narrow rows or one wide row. Under the
    interpreter it holds up to ``launch.INTERPRETER_TILE`` elements (see kernels/launch.py), but never many more
    rows than there are.
    """
    block_c = triton_next_power_of_2(max(width, 1))
    if is_interpreting() if interpreting is None else interpreting:
        block_m = min(max(launch.INTERPRETER_TILE // block_c, 1), triton_next_power_of_2(max(rows, 1)))
    else:
        block_m = max(GPU_TILE // block_c, 1)
    return RowTile(block_m, block_c, num_warps_for(block_m * block_c, elem_bytes))


def backward_tile(tile: RowTile) -> RowTile:
    """The backward's stage-1 tile: the forward's, with at most 8 warps when a program holds several rows.

    The backward keeps x, dy and the two partial-sum tiles live, the forward only x: with several rows a program,
    the forward's 16 warps can spill registers where 8 do not (``python -m kernels.compile_check`` checks it;
    benchmarks/NOTES.md has the counts).
    """
    return tile._replace(num_warps=min(tile.num_warps, 8)) if tile.BLOCK_M > 1 else tile


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_groups(n_rows: int, device: torch.device) -> int:
    """How many row groups the backward's stage 1 uses (see the docstring at the top)."""
    if device.type == "cuda" and not is_interpreting():
        index = device.index if device.index is not None else torch.cuda.current_device()
        groups = GROUPS_PER_SM * _sm_count(index)
    else:
        groups = INTERPRETER_GROUPS
    return max(1, min(groups, n_rows))


def _check_width(width: int) -> None:
    if width > MAX_WIDTH:
        raise ValueError(
            f"layer_norm: the triton kernel holds one row in registers and takes widths up to {MAX_WIDTH}, got "
            f"{width} — use the torch backend for wider rows"
        )


def _layer_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """x2d (M, C) contiguous -> (y (M, C), mean (M,), rstd (M,)); all in the dtypes the kernel sees."""
    M, C = x2d.shape
    y = torch.empty_like(x2d)
    mean = torch.empty(M, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2d.device)
    tile = row_tile(C, x2d.element_size(), M)
    _layer_norm_fwd[(triton.cdiv(M, tile.BLOCK_M),)](
        x2d, weight, bias, y, mean, rstd, x2d.stride(0), M, C, eps,
        BLOCK_M=tile.BLOCK_M, BLOCK_C=tile.BLOCK_C, num_warps=tile.num_warps,
    )
    return y, mean, rstd


def _layer_norm_backward(dy2d, x2d, weight, mean, rstd, weight_dtype, bias_dtype):
    """Stage 1 (dx and partial sums over row groups), then stage 2 (dw, db). Returns dx, dw, db."""
    M, C = x2d.shape
    dx = torch.empty_like(x2d)
    groups = _num_groups(M, x2d.device)
    tile = backward_tile(row_tile(C, x2d.element_size(), triton.cdiv(M, groups)))
    # whole loop steps per group (only the last group may end in a partial step), and no group without rows
    rows_per_group = triton.cdiv(triton.cdiv(M, groups), tile.BLOCK_M) * tile.BLOCK_M
    groups = triton.cdiv(M, rows_per_group)
    partial_dw = torch.empty(groups, C, dtype=torch.float32, device=x2d.device)
    partial_db = torch.empty(groups, C, dtype=torch.float32, device=x2d.device)
    _layer_norm_bwd_dx[(groups,)](
        x2d, dy2d, dx, weight, mean, rstd, partial_dw, partial_db, x2d.stride(0), M, C, rows_per_group,
        BLOCK_M=tile.BLOCK_M, BLOCK_C=tile.BLOCK_C, num_warps=tile.num_warps,
    )
    dw = torch.empty(C, dtype=kernel_dtype(weight_dtype), device=x2d.device)
    db = torch.empty(C, dtype=kernel_dtype(bias_dtype), device=x2d.device)
    _layer_norm_bwd_dwdb[(triton.cdiv(C, REDUCE_BLOCK_C),)](
        partial_dw, partial_db, dw, db, groups, C,
        BLOCK_G=REDUCE_BLOCK_G, BLOCK_C=REDUCE_BLOCK_C, num_warps=REDUCE_NUM_WARPS,
    )
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch op
#
# The launchers are registered as custom operators (torch.library.custom_op), forward and backward each as one op.
# torch.compile then sees each as a single opaque node whose output shapes come from the register_fake functions,
# instead of tracing the launcher (why an opaque op rather than a traced launch or a triton_op: COURSE.md, Lesson
# 8), and autograd is wired to our backward kernels by register_autograd. The forward op returns the per-row mean
# and rstd as extra outputs so that they can be saved for the backward op.


@torch.library.custom_op("minigpt::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): y (..., C) in x's dtype, contiguous; mean and rstd (...,) float32, per row of x."""
    C = x.shape[-1]
    if x.numel() == 0:  # no rows (or no features): nothing to launch
        stats = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), stats, stats.clone()
    x2d = to_kernel(x.reshape(-1, C))  # (M, C) contiguous rows; bfloat16 -> float32 under the interpreter
    y, mean, rstd = _layer_norm_forward(x2d, to_kernel(weight), to_kernel(bias), eps)
    return y.to(x.dtype).view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    stats_shape = x.shape[:-1]
    return (x.new_empty(x.shape), x.new_empty(stats_shape, dtype=torch.float32),
            x.new_empty(stats_shape, dtype=torch.float32))


@torch.library.custom_op("minigpt::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db): dx like x (contiguous), dw in the weight's dtype, db in ``bias_dtype``."""
    C = x.shape[-1]
    if x.numel() == 0:  # no rows: the parameters got no gradient, i.e. zero
        return (torch.zeros(x.shape, dtype=x.dtype, device=x.device), weight.new_zeros(weight.shape),
                weight.new_zeros(weight.shape, dtype=bias_dtype))
    x2d = to_kernel(x.reshape(-1, C))
    dy2d = dy.reshape(-1, C).to(x2d.dtype).contiguous()
    dx, dw, db = _layer_norm_backward(dy2d, x2d, to_kernel(weight), mean.reshape(-1), rstd.reshape(-1),
                                      weight.dtype, bias_dtype)
    return dx.to(x.dtype).view(x.shape), dw.to(weight.dtype), db.to(bias_dtype)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, bias_dtype):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape, dtype=bias_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd, ctx.bias_dtype)
    needs = ctx.needs_input_grad
    return dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (..., C) with ``weight``, ``bias`` (C,); returns (..., C) in x's dtype.

    float32, float16 or bfloat16; the parameters may be float32 while x is 16-bit (autocast), and their gradients
    come back in their own dtype. Statistics and sums are computed in float32. C up to ``MAX_WIDTH``.
    """
    check_layer_norm_inputs(x, weight, bias)
    for t in (x, weight, bias):
        check_tensor("layer_norm", t)
    if not (x.device == weight.device == bias.device):
        raise ValueError(
            f"layer_norm: x, weight and bias must be on one device, got {x.device}, {weight.device}, "
            f"{bias.device} — move the parameters with the model (model.to(device))"
        )
    _check_width(x.shape[-1])
    y, _mean, _rstd = layer_norm_fwd(x, weight, bias, float(eps))
    return y


__all__ = ["MAX_WIDTH", "layer_norm", "layer_norm_bwd", "layer_norm_fwd",
           "row_tile"]
