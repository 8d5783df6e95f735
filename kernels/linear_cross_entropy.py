r"""The language model's loss without its logits: a linear layer and cross-entropy, in chunks of rows.

The op
------
Each of N hidden states x_i (width C) becomes V logits, one per vocabulary entry, scored against the next token t_i:

    z_i    = W x_i                                  (V,)  the logits,  W: (V, C)
    lse_i  = log sum_j exp(z_ij)                          the row's log-sum-exp
    loss_i = lse_i - z_{i, t_i}                           = -log softmax(z_i)[t_i]
    loss   = sum_i loss_i / N_valid   ("mean"),    sum_i loss_i   ("sum"),    (loss_i)_i   ("none")

A row whose target equals ``ignore_index`` (padding) has loss 0 and no gradient; N_valid counts the other rows, as
in F.cross_entropy. With g_i the gradient reaching loss_i (1 / N_valid for "mean", 1 for "sum", the upstream
gradient's row i for "none", 0 for an ignored row):

    dz_i = g_i * (softmax(z_i) - onehot(t_i))             (V,)   since d lse_i / d z_ij = softmax(z_i)_j
    dX   = dZ W                                           (N, C)
    dW   = dZ^T X = sum_i dz_i x_i^T                      (V, C) a sum over every row

Why not ``F.cross_entropy(x @ W.T, t)``
---------------------------------------
The (N, V) logits are big (3.3 GB in float32 for GPT-2 small at 16 x 1024 tokens, against 154 MB for W), and
autograd keeps more of that size alive. So the rows go in chunks of n, one (n, V) buffer alive at a time:

    1. Z_c = X_c W^T                         the chunk's float32 logits (n, V), a matmul (cuBLAS on a GPU)
    2. ``rows_step``                          each row's loss, and Z_c overwritten IN PLACE by dZ_c
    3. dX_c = dZ_c W,   dW += dZ_c^T X_c     two more matmuls; dW summed chunk after chunk, without atomics

The loop (``chunked_loss.loss_and_grads_in_chunks``) is shared with the torch backend. "mean" and "sum" get their
gradients in the forward (upstream gradient 1), which the backward only scales; "none" reruns the loop in the
backward with the upstream rows as the g_i. The Triton kernel here is the ``rows_step`` alone
(``cross_entropy_rows_step``, the plain step's namesake): 3 passes over a chunk against the plain step's ~12, the
matmuls left to cuBLAS (why: benchmarks/NOTES.md, "The loss's kernel").

The rows kernel
---------------
One program per row of the chunk (rows share no loads), streaming its row in BLOCK_V tiles, twice:

    sweep 1 (statistics)   an online max m and sum l, in base 2 (exp2 is what the GPU computes), as in attention:
                               s = z * log2(e),   m_new = max(m, max(s_tile)),
                               l = l * 2^(m - m_new) + sum(2^(s_tile - m_new))
                           then lse2 = m + log2(l) and loss = lse2 * ln(2) - z[t] (z[t]: one scalar load)
    sweep 2 (gradient)     only when a gradient is asked for: each tile overwritten in place by
                               g * (2^(s - lse2) - [j == t])  =  g * (softmax - onehot)

Each sweep runs over the whole tiles unmasked, then over one masked last tile, so the whole tiles' loads vectorize.

Under Triton's CPU interpreter a program costs milliseconds of Python whatever its tiles hold (kernels/launch.py),
so one program a row is the slow choice there: 2048 rows of the CPU demo's 257 logits are 2048 programs. When
whole rows fit in the interpreter's tile, a second kernel, ``_cross_entropy_row_block``, takes BLOCK_ROWS of them
a program as one (BLOCK_ROWS, BLOCK_V) tile: the same two steps, the statistics and the gradient, each done on the
whole tile at once instead of in a loop. It is the launcher's choice only under the interpreter; a GPU keeps one
program a row.

Targets. An ignored row gets loss 0 and a gradient row of exact zeros (set, not multiplied: with every row ignored,
"mean" passes g = 1/0 = inf). A target outside [0, V) other than ``ignore_index`` is a bug in the data: the kernel's
masked load gives NaN there, so that row's loss, its gradient and the "mean" or "sum" are NaN, every backend's
contract (``chunked_loss.cross_entropy_rows_step``); ``check_linear_cross_entropy_inputs`` raises where it can.

Memory traffic
--------------
For one row of V float32 logits (int64 targets, one float32 g a row):

    statistics:  reads 4 V (the row) + 4 (the target's logit) + 8 (the target)     writes 4 (the loss)
    gradient:    reads 4 V (the row again) + 4 (g)                                 writes 4 V (dz, in place)

so 12 V + 20 bytes a row with the gradient, 4 V + 16 without (``rows_step_bytes`` in ``kernels/costs.py``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch
from .launch import check_tensor, is_interpreting, triton_next_power_of_2
from .checks import check_linear_cross_entropy_inputs
from .chunked_loss import autocast_inputs, loss_and_grads_in_chunks
from .definitions import IGNORE_INDEX

__all__ = ["cross_entropy_rows_step", "linear_cross_entropy", "linear_cross_entropy_bwd",
           "linear_cross_entropy_fwd", "linear_cross_entropy_loss"]

LOG2E = tl.constexpr(math.log2(math.e))  # exp(z) = exp2(z * log2 e)
LN2 = tl.constexpr(math.log(2.0))  # log(y) = log2(y) * ln 2

# On a GPU: 1024 float32 logits a tile over 4 warps, 8 a thread (two 16-byte loads): few registers a program, so
# many programs share a multiprocessor and a chunk's rows run in one wave (benchmarks/NOTES.md has the counts).
BLOCK_V = 1024
NUM_WARPS = 4


# ----------------------------------------------------------------------------------------------------------------
# The kernel


@triton.jit
def _fold_tile(LOGITS, start, n_vocab, m, l, BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    """Sweep 1's step: fold the logits [start, start + BLOCK_V) into the row's running base-2 max m and sum l."""
    cols = start + tl.arange(0, BLOCK_V)
    if MASKED:  # the last tile: lanes past V hold -inf, whose 2^(-inf - m) = 0 adds nothing, and max ignores them
        s = tl.load(LOGITS + cols, mask=cols < n_vocab, other=float("-inf")) * LOG2E
    else:
        s = tl.load(LOGITS + cols) * LOG2E
    m_new = tl.maximum(m, tl.max(s, axis=0))
    l = l * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(s - m_new), axis=0)
    return m_new, l


@triton.jit
def _grad_tile(LOGITS, start, n_vocab, lse2, target, g, ignored, BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    """Sweep 2's step: overwrite the logits [start, start + BLOCK_V) by g * (softmax - onehot(target))."""
    cols = start + tl.arange(0, BLOCK_V)
    if MASKED:  # the last tile
        s = tl.load(LOGITS + cols, mask=cols < n_vocab, other=0.0) * LOG2E
    else:
        s = tl.load(LOGITS + cols) * LOG2E
    p = tl.math.exp2(s - lse2)  # the softmax, from the finished log-sum-exp
    dz = (p - tl.where(cols == target, 1.0, 0.0)) * g
    dz = tl.where(ignored, 0.0, dz)  # exactly 0, whatever g and the logits are
    if MASKED:
        tl.store(LOGITS + cols, dz, mask=cols < n_vocab)
    else:
        tl.store(LOGITS + cols, dz)


@triton.jit
def _cross_entropy_rows_step(
    LOGITS,  # pointer to the float32 logits chunk (n, V); overwritten by the gradient dz when HAS_GRAD
    TARGETS,  # pointer to the target class of each row (n,), int64
    LOSS,  # pointer to the loss of each row (n,), float32, written here
    GRAD_SCALE,  # pointer to the gradient's factor g of each row (n,), float32 (read only when HAS_GRAD)
    stride_row,  # elements from one row of LOGITS to the next
    n_vocab,  # V, the number of classes (logits a row), at least 1
    ignore_index,  # a target equal to this gives loss 0 and a zero gradient row
    HAS_GRAD: tl.constexpr,  # True: the second sweep writes g * (softmax - onehot) over the logits
    BLOCK_V: tl.constexpr,  # logits a tile of the sweeps over the row
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row may pass 2^31
    LOGITS += row * stride_row
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    in_vocab = (target >= 0) & (target < n_vocab)
    # Whole tiles [0, v_full) need no mask; the last tile [v_full, v_full + BLOCK_V) is masked (wholly when BLOCK_V
    # divides V: it then adds nothing and stores nothing)
    v_full = n_vocab // BLOCK_V * BLOCK_V

    # Sweep 1: the running max m and sum l of 2^s over the row, in base 2 (s = z * log2 e)
    m = tl.full((), float("-inf"), dtype=tl.float32)
    l = tl.zeros((), dtype=tl.float32)
    for start in range(0, v_full, BLOCK_V):
        m, l = _fold_tile(LOGITS, tl.multiple_of(start, BLOCK_V), n_vocab, m, l, BLOCK_V, MASKED=False)
    m, l = _fold_tile(LOGITS, v_full, n_vocab, m, l, BLOCK_V, MASKED=True)
    lse2 = m + tl.math.log2(l)  # log2 sum_j 2^(s_j) = lse * log2 e

    # The target's logit: one masked load, never outside the row; NaN for a target outside [0, V)
    target_logit = tl.load(LOGITS + target, mask=in_vocab & ~ignored, other=float("nan"))
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse2 * LN2 - target_logit))

    if HAS_GRAD:  # Sweep 2: the row read again and overwritten by g * (softmax - onehot)
        g = tl.load(GRAD_SCALE + row)
        g = tl.where(in_vocab, g, float("nan"))  # a target outside [0, V): a NaN gradient row (see the top)
        for start in range(0, v_full, BLOCK_V):
            _grad_tile(LOGITS, tl.multiple_of(start, BLOCK_V), n_vocab, lse2, target, g, ignored, BLOCK_V, MASKED=False)
        _grad_tile(LOGITS, v_full, n_vocab, lse2, target, g, ignored, BLOCK_V, MASKED=True)


@triton.jit
def _cross_entropy_row_block(
    LOGITS,  # pointer to the float32 logits chunk (n, V); overwritten by the gradient dz when HAS_GRAD
    TARGETS,  # pointer to the target class of each row (n,), int64
    LOSS,  # pointer to the loss of each row (n,), float32, written here
    GRAD_SCALE,  # pointer to the gradient's factor g of each row (n,), float32 (read only when HAS_GRAD)
    stride_row,  # elements from one row of LOGITS to the next
    n_rows,  # n, the rows of the chunk
    n_vocab,  # V, the number of classes (logits a row), at least 1 and at most BLOCK_V
    ignore_index,  # a target equal to this gives loss 0 and a zero gradient row
    HAS_GRAD: tl.constexpr,  # True: write g * (softmax - onehot) over the logits
    BLOCK_ROWS: tl.constexpr,  # rows a program
    BLOCK_V: tl.constexpr,  # a power of two >= V: one tile row holds a whole row of logits
):
    """``_cross_entropy_rows_step`` for BLOCK_ROWS whole rows a program, the interpreter's choice (see the top)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # int64, as in the row kernel
    row_ok = rows < n_rows
    # The last program's rows past n repeat row n - 1: every lane then computes on real logits (no -inf - -inf),
    # and nothing of theirs is stored
    rows = tl.minimum(rows, n_rows - 1)
    cols = tl.arange(0, BLOCK_V)
    col_ok = cols < n_vocab
    offs = rows[:, None] * stride_row + cols[None, :]  # (BLOCK_ROWS, BLOCK_V)
    target = tl.load(TARGETS + rows)  # (BLOCK_ROWS,)
    ignored = target == ignore_index
    in_vocab = (target >= 0) & (target < n_vocab)

    # The statistics, each row's whole at once (sweep 1 in one step): lanes past V hold -inf and add 2^(-inf) = 0
    s = tl.load(LOGITS + offs, mask=col_ok[None, :], other=float("-inf")) * LOG2E
    m = tl.max(s, axis=1)
    lse2 = m + tl.math.log2(tl.sum(tl.math.exp2(s - m[:, None]), axis=1))  # (BLOCK_ROWS,)
    target_logit = tl.load(LOGITS + rows * stride_row + target, mask=in_vocab & ~ignored, other=float("nan"))
    tl.store(LOSS + rows, tl.where(ignored, 0.0, lse2 * LN2 - target_logit), mask=row_ok)

    if HAS_GRAD:  # the gradient from the tile still held (sweep 2 without reading the logits again)
        g = tl.load(GRAD_SCALE + rows)
        g = tl.where(in_vocab, g, float("nan"))  # a target outside [0, V): a NaN gradient row (see the top)
        p = tl.math.exp2(s - lse2[:, None])  # the softmax
        dz = (p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * g[:, None]
        dz = tl.where(ignored[:, None], 0.0, dz)  # exactly 0, whatever g and the logits are
        tl.store(LOGITS + offs, dz, mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# The launcher: the chunk loop's rows_step


def _block_v(n_vocab: int) -> int:
    """Logits a tile: ``BLOCK_V`` on a GPU; under the interpreter, where every loop step costs Python calls, up to
    ``launch.INTERPRETER_TILE`` (a whole row in one step for any vocabulary a test uses)."""
    if is_interpreting():
        return min(launch.INTERPRETER_TILE, triton_next_power_of_2(n_vocab))
    return BLOCK_V


def rows_per_program(n_rows: int, n_vocab: int, interpreting: bool | None = None) -> int:
    """Rows of logits a program takes: 1 on a GPU (``_cross_entropy_rows_step``). Under the interpreter, as many
    whole rows as fit in ``launch.INTERPRETER_TILE`` logits (each padded to a power of two), but not many more than
    there are; above 1 the launch is ``_cross_entropy_row_block``'s."""
    if not (is_interpreting() if interpreting is None else interpreting):
        return 1
    fit = launch.INTERPRETER_TILE // triton_next_power_of_2(n_vocab)
    return max(1, min(fit, triton_next_power_of_2(n_rows)))


def cross_entropy_rows_step(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            grad_scale: torch.Tensor | None) -> torch.Tensor:
    """The chunk loop's ``rows_step`` (contract: ``chunked_loss.cross_entropy_rows_step``), as one Triton kernel.

    logits: (n, V) float32 with contiguous rows (any row stride); targets: (n,) int64; grad_scale: None or (n,),
    one factor a row. Returns the (n,) float32 loss rows ``logsumexp(logits_i) - logits_i[targets_i]``: 0 where the
    target is ``ignore_index``, NaN where it is outside [0, V). With ``grad_scale``, ``logits`` is overwritten by
    ``grad_scale_i * (softmax(logits_i) - onehot(targets_i))``: zero rows for ignored targets, NaN rows for targets
    outside [0, V). Nothing outside the rows is read or written.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.shape[1] == 0 or (
            logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"cross_entropy_rows_step: logits must be (n, V >= 1) float32 with contiguous rows, got "
                         f"{tuple(logits.shape)} {logits.dtype} with strides {logits.stride()} (float64 inputs: "
                         "use the torch backend)")
    n, V = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"cross_entropy_rows_step: targets must be ({n},), one per row, got {tuple(targets.shape)}")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    if grad_scale is not None:
        if grad_scale.numel() != n:
            raise ValueError(f"cross_entropy_rows_step: grad_scale must be ({n},), one factor a row, got "
                             f"{tuple(grad_scale.shape)}")
        grad_scale = grad_scale.to(torch.float32).reshape(n).contiguous()
    targets = targets.to(torch.int64).contiguous()
    grad_or_unread = loss if grad_scale is None else grad_scale
    block_rows = rows_per_program(n, V)
    if block_rows == 1:
        _cross_entropy_rows_step[(n,)](
            logits, targets, loss, grad_or_unread, logits.stride(0), V, ignore_index,
            HAS_GRAD=grad_scale is not None, BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
        )
    else:  # the interpreter: several whole rows a program
        _cross_entropy_row_block[(triton.cdiv(n, block_rows),)](
            logits, targets, loss, grad_or_unread, logits.stride(0), n, V, ignore_index,
            HAS_GRAD=grad_scale is not None, BLOCK_ROWS=block_rows, BLOCK_V=triton_next_power_of_2(V),
            num_warps=NUM_WARPS,
        )
    return loss


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch op
#
# The loop and its kernel are registered as custom operators (torch.library.custom_op): torch.compile then sees
# each as one opaque node, with output shapes from its register_fake function, instead of tracing the chunk loop
# and the launches (why: COURSE.md, Lesson 8). Three ops, because the gradients are made at two different times
# (see the top of this file):
#
#   minigpt::linear_cross_entropy_fwd    "mean" / "sum" with gradients: (loss, grad_x, grad_weight), the gradients
#                                        of the loss itself; its backward multiplies them by the upstream gradient
#   minigpt::linear_cross_entropy_loss   the loss alone (evaluation, and "none"); its backward is the next op
#   minigpt::linear_cross_entropy_bwd    (grad_x, grad_weight) for an upstream gradient, the logits made again
#
# Inside the ops autocast is off: ``linear_cross_entropy`` casts x and weight to autocast's dtype first (as an
# nn.Linear under autocast would, a cast autograd sees), and the loop picks every dtype itself.


def _loss_like(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """An empty tensor shaped and typed as the loss: (N,) for "none", a scalar otherwise; float32."""
    return x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=torch.promote_types(x.dtype, torch.float32))


@torch.library.custom_op("minigpt::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_weight) for reduction "mean" or "sum": the float32 scalar loss and its gradients (for an
    upstream gradient of 1), grad_x (N, C) in x's dtype and grad_weight (V, C) in weight's dtype and strides."""
    if reduction == "none":
        raise ValueError("linear_cross_entropy_fwd: reduction 'none' has no gradients in the forward — use "
                         "linear_cross_entropy_loss")
    with torch.autocast(x.device.type, enabled=False):
        return loss_and_grads_in_chunks(x, weight, targets, ignore_index, reduction, cross_entropy_rows_step,
                                        need_grads=True)


@linear_cross_entropy_fwd.register_fake
def _(x, weight, targets, ignore_index, reduction):
    return _loss_like(x, reduction), x.new_empty(x.shape), torch.empty_like(weight)


def _save_grads_setup_context(ctx, inputs, output):
    _loss, grad_x, grad_weight = output
    ctx.save_for_backward(grad_x, grad_weight)
    ctx.mark_non_differentiable(grad_x, grad_weight)


def _scale_saved_grads_backward(ctx, grad_loss, _grad_grad_x, _grad_grad_weight):
    grad_x, grad_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    return (grad_x * grad_loss if needs[0] else None, grad_weight * grad_loss if needs[1] else None,
            None, None, None)


linear_cross_entropy_fwd.register_autograd(_scale_saved_grads_backward, setup_context=_save_grads_setup_context)


@torch.library.custom_op("minigpt::linear_cross_entropy_loss", mutates_args=())
def linear_cross_entropy_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                              reduction: str) -> torch.Tensor:
    """The loss alone: float32, (N,) for reduction "none", a scalar for "mean" and "sum"."""
    with torch.autocast(x.device.type, enabled=False):
        loss, _, _ = loss_and_grads_in_chunks(x, weight, targets, ignore_index, reduction, cross_entropy_rows_step,
                                              need_grads=False)
    return loss


@linear_cross_entropy_loss.register_fake
def _(x, weight, targets, ignore_index, reduction):
    return _loss_like(x, reduction)


@torch.library.custom_op("minigpt::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight) for the upstream gradient ``grad_loss`` of the loss (the loss's shape), the logits made
    again chunk by chunk: grad_x (N, C) in x's dtype, grad_weight (V, C) in weight's dtype and strides."""
    with torch.autocast(x.device.type, enabled=False):
        if reduction == "none":
            _, grad_x, grad_weight = loss_and_grads_in_chunks(
                x, weight, targets, ignore_index, reduction, cross_entropy_rows_step, need_grads=True,
                grad_output=grad_loss)
            return grad_x, grad_weight
        _, grad_x, grad_weight = loss_and_grads_in_chunks(x, weight, targets, ignore_index, reduction,
                                                          cross_entropy_rows_step, need_grads=True)
    return grad_x.mul_(grad_loss), grad_weight.mul_(grad_loss)


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, x, weight, targets, ignore_index, reduction):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _loss_setup_context(ctx, inputs, output):
    x, weight, targets, ctx.ignore_index, ctx.reduction = inputs
    ctx.save_for_backward(x, weight, targets)


def _loss_backward(ctx, grad_loss):
    x, weight, targets = ctx.saved_tensors
    grad_x, grad_weight = linear_cross_entropy_bwd(grad_loss, x, weight, targets, ctx.ignore_index, ctx.reduction)
    needs = ctx.needs_input_grad
    return grad_x if needs[0] else None, grad_weight if needs[1] else None, None, None, None


linear_cross_entropy_loss.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(x @ weight.T, targets, ignore_index=..., reduction=...)`` without the (N, V) logits.

    x: (N, C) float32, float16 or bfloat16, any strides; weight: (V, C), x's dtype, any strides (the model's is
    stored input-major); targets: (N,) int64 class ids in [0, V), or ``ignore_index``. Returns the loss in float32:
    a scalar for "mean" (over the rows not ignored) and "sum", (N,) for "none". Differentiable in x and weight.
    Under torch.autocast, x and weight are cast to autocast's dtype first, as an nn.Linear's would be. On a machine
    without a GPU it needs Triton's interpreter (``TRITON_INTERPRET=1`` before import; ``kernels.get_backend
    ("triton")`` sets it).
    """
    check_linear_cross_entropy_inputs(x, weight, targets, ignore_index, reduction)
    for t in (x, weight):
        check_tensor("linear_cross_entropy", t)
    x, weight = autocast_inputs(x, weight)
    if reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        loss, _grad_x, _grad_weight = linear_cross_entropy_fwd(x, weight, targets, ignore_index, reduction)
        return loss
    return linear_cross_entropy_loss(x, weight, targets, ignore_index, reduction)
