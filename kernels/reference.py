"""The ``torch`` backend: plain, readable PyTorch.

This file is the definition of the four ops. Each is written twice:

* ``*_math``: the formula spelled out with elementary tensor operations, exactly as the seed notebook (and
  GPT-2) define it. Tests evaluate these in float64 to get the "true" answer every backend is measured against.
* ``TorchBackend``: what the model calls. It uses PyTorch's fused implementation where one computes the very
  same function (``F.layer_norm``, ``F.gelu``, ``F.scaled_dot_product_attention``) — the fast path beside the
  plain one, so a reader sees both — and the tests check that the two agree.

The fourth op, the loss, is different: PyTorch has no fused "matmul + cross-entropy", and the plain formula is what
this op exists to avoid (at GPT-2's vocabulary the logits outweigh every other activation). So its fast path here is
our own: ``linear_cross_entropy_chunks``, the loss in chunks of rows, in plain PyTorch — and the loop the Triton
backend runs too, with a Triton kernel in place of the per-chunk softmax step.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

EPS = 1e-5  # GPT-2's and the seed's LayerNorm epsilon
GELU_APPROXIMATIONS = ("tanh", "none")
REDUCTIONS = ("mean", "sum", "none")  # F.cross_entropy's
IGNORE_INDEX = -100  # F.cross_entropy's default: a target with this value adds nothing to the loss


# ----------------------------------------------------------------------------------------------------------------
# The formulas


def layer_norm_math(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    norm_x = (x - mean) / torch.sqrt(var + eps)
    return weight * norm_x + bias


def gelu_math(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU. ``tanh``: GPT-2's approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); ``none``: x Phi(x)."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(f"gelu: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def causal_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, future masked) -> dropout -> @ v, materializing the (Tq, Tk) weights.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk. The queries are the LAST Tq positions of the Tk: query i
    sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i (bottom-right alignment: with Tq = Tk it is the
    usual causal mask; with Tq = 1 the one new token of a decoding step sees every key). ``dropout_mask`` (bool,
    (B, H, Tq, Tk), True = keep) replaces the random draw, so a test can apply exactly the mask a kernel used.
    """
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    attn_scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    attn_scores = attn_scores.masked_fill(future_mask(Tq, Tk, q.device), float("-inf"))
    attn_weights = torch.softmax(attn_scores, dim=-1)
    if dropout_mask is not None:
        attn_weights = attn_weights * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        attn_weights = F.dropout(attn_weights, p=dropout_p, training=True)
    return attn_weights @ v  # (B, H, Tq, D)


def future_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j is in the future of query i, i.e. j > (Tk - Tq) + i."""
    return torch.triu(torch.ones(Tq, Tk, dtype=torch.bool, device=device), diagonal=Tk - Tq + 1)


def linear_cross_entropy_math(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the logits ``x @ weight.T`` against ``targets``, the logits materialized whole.

    x: (N, C); weight: (V, C) (any strides); targets: (N,) int64 class ids in [0, V), or ``ignore_index`` for a row
    that adds nothing. Row i's loss is ``logsumexp(logits_i) - logits_i[targets_i]``; "none" returns the (N,) rows
    (0 where ignored), "sum" their sum, "mean" the sum over the number of rows NOT ignored (nan when every row is,
    0 / 0, as F.cross_entropy). Computed in float32 (float64 stays float64) whatever the inputs' dtype: a loss summed
    over 50,257 exponentials is where half precision goes wrong first.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = x.to(dtype) @ weight.to(dtype).T  # (N, V): the tensor the chunked path never holds whole
    counted = targets != ignore_index  # (N,) bool
    safe_targets = torch.where(counted, targets, 0)  # an ignored row's target may be any number, e.g. -100
    picked = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (N,) the target's logit
    loss_rows = torch.where(counted, torch.logsumexp(logits, dim=1) - picked, 0.0)  # (N,)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / counted.sum()


# ----------------------------------------------------------------------------------------------------------------
# Input checks shared by every backend (a user's mistake gets a message, not a shape error deep inside)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"causal_attention: q, k, v must be (B, H, T, D), got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    Tq, Tk = q.shape[2], k.shape[2]
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or Tq > Tk:
        raise ValueError(
            f"causal_attention: q (B, H, Tq, D) and k, v (B, H, Tk, D) with Tq <= Tk, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"causal_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"causal_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_attention: dropout_p must be in [0, 1), got {dropout_p}")


def check_layer_norm_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    C = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(
            f"layer_norm: x (..., C) needs weight and bias of shape (C,), got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )


def check_gelu_approximate(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


DEBUG_CHECKS_ENV = "MINIGPT_DEBUG_CHECKS"  # "1": also run the checks that cost a GPU sync


def check_linear_cross_entropy_inputs(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> None:
    """One-line errors for inputs ``linear_cross_entropy`` cannot take (shapes, dtypes, devices, ``reduction``).

    A target outside [0, V) that is not ``ignore_index`` is found here when looking costs no GPU sync: on CPU
    tensors (outside torch.compile), or everywhere when the environment sets MINIGPT_DEBUG_CHECKS=1. Otherwise it
    is not an error but a nan: every backend masks the target's gather, so no kernel reads outside the row, and
    gives such a row a nan loss and a nan gradient row — hence a nan "mean" or "sum", which the training loop's
    non-finite check reports.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: x must be (N, C) and weight (V, C), got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)} — flatten the batch first, e.g. x.flatten(0, 1)")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight (V, C) must have x's width C = {x.shape[1]}, got weight "
                         f"{tuple(weight.shape)} — pass the Linear layer's weight as stored, (out, in), not its "
                         "transpose")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: targets must be int64 class ids, got {targets.dtype} — pass the "
                        "token ids (targets.long()), not probabilities")
    if targets.dtype != torch.int64:
        raise TypeError(f"linear_cross_entropy: targets must be int64, got {targets.dtype} — use targets.long()")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets must be (N,) = ({x.shape[0]},), one per row of x, got "
                         f"{tuple(targets.shape)} — flatten them as x, e.g. targets.flatten()")
    if not x.is_floating_point():
        raise TypeError(f"linear_cross_entropy: x must be floating point, got {x.dtype}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"linear_cross_entropy: x and weight must share a dtype, got {x.dtype} and {weight.dtype} "
                        "— cast one, or run under torch.autocast")
    if not (x.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: x, weight and targets are on different devices ({x.device}, "
                         f"{weight.device}, {targets.device}) — move them to one")
    if torch.compiler.is_compiling():
        return  # looking at the values is a branch on data, which torch.compile cannot put in a graph
    if targets.device.type == "cpu" or os.environ.get(DEBUG_CHECKS_ENV) == "1":
        V = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"linear_cross_entropy: target {int(targets[row])} (row {row}) is outside the "
                             f"vocabulary [0, {V}) and is not ignore_index = {ignore_index} — check the "
                             "tokenizer's vocabulary size against the model's")


# ----------------------------------------------------------------------------------------------------------------
# The loss without the logits: rows in chunks
#
# At GPT-2's size the output head turns N = 16 x 1024 rows of C = 768 features into N x V = 16,384 x 50,257 logits:
# 3.3 GB in float32, more than every other activation together, and the plain formula holds them (and their
# gradient) whole. But each row's loss needs only its own logits, and the gradients are sums over rows:
#
#     dlogits = grad_scale * (softmax(logits) - onehot(targets))     (n, V), zero for ignored rows
#     dx      = dlogits @ weight                                     (n, V) @ (V, C) -> (n, C), this chunk's rows
#     dweight += dlogits.T @ x_chunk                                 (V, n) @ (n, C) -> (V, C), summed over chunks
#
# So the rows go through in chunks of n: a chunk's logits are made, turned IN PLACE into their gradient, used for
# dx and dweight, and freed before the next chunk's. Peak memory: one (n, V) chunk, not (N, V).
#
# When the loss is reduced ("mean", "sum") it is the last op of the graph, so the gradient reaching it is one
# number g, and d(loss)/d(logits) is g times the dlogits above: the forward computes dx and dweight while the
# logits are at hand, and the backward only multiplies them by g. No recomputation: the matmul work is the plain
# formula's three products (logits, dx, dweight). For "none" each row has its own upstream gradient, unknown until
# the backward, which therefore makes each chunk's logits again.

LOGITS_CHUNK_BYTES = 128 * 2**20  # a chunk's float32 logits stay under this
"""Why 128 MiB: at GPT-2's V = 50,257 it makes chunks of 640 rows (667 rounded down to whole 64-row tiles), 26 chunks
for 16 x 1024 tokens, holding 128 MiB instead of the 3.3 GB of full float32 logits. Each chunk reads the whole
weight three times (logits, dx, dweight: 6 V C bytes in bf16) and does 6 n V C FLOPs with it, n FLOPs per weight
byte: at 640 rows about twice the ~300 FLOPs per byte below which an H100-class GPU in bf16 waits for memory
(Liger-Kernel's rule, rows ~ N C / V, gives 256 rows here: less memory, and weight reads that cost about as much as
the math). A small vocabulary (the 257 bytes of the CPU demo) gets all its rows in one chunk: no loop, no extra
reads.
"""
CHUNK_ROW_MULTIPLE = 64  # whole tiles of a GPU matmul (its kernels tile rows by 64 or 128)


def default_chunk_rows(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk so that a chunk's float32 logits, (rows, V), take at most ``LOGITS_CHUNK_BYTES``."""
    rows = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))
    if rows > CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, n_rows))


def cross_entropy_rows_step(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor | None
) -> torch.Tensor:
    """The per-chunk softmax step of ``linear_cross_entropy_chunks``, in plain PyTorch (the Triton backend's is a
    kernel with the same contract, in ``kernels/linear_cross_entropy.py``).

    logits: (n, V) float32 (float64 for float64 inputs), contiguous, owned by the step. targets: (n,) int64.
    grad_scale: None, or a contiguous (n,) tensor of logits' dtype, one factor per row.
    Returns the (n,) loss rows ``logsumexp(logits_i) - logits_i[targets_i]`` in logits' dtype, 0 for rows whose
    target is ``ignore_index``. With ``grad_scale``, it also overwrites ``logits`` with their gradient
    ``grad_scale_i * (softmax(logits_i) - onehot(targets_i))``, rows of ignored targets all 0 (set, not
    multiplied: with every row ignored "mean" passes grad_scale = 1/0 = inf, and inf * 0 would be nan). A target
    outside [0, V) that is not ignored gets a nan loss and a nan gradient row; nothing is read outside the row.
    """
    V = logits.shape[1]
    counted = targets != ignore_index  # (n,)
    in_vocab = (targets >= 0) & (targets < V)
    safe_targets = torch.where(in_vocab, targets, 0)  # the gather never reads outside the row
    lse = torch.logsumexp(logits, dim=1)  # (n,)
    picked = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (n,)
    loss_rows = torch.where(in_vocab, lse - picked, float("nan"))
    loss_rows = torch.where(counted, loss_rows, 0.0)
    if grad_scale is not None:
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: exp(logit - logsumexp)
        onehot = (counted & in_vocab).to(logits.dtype)[:, None]  # (n, 1): 1 where a target column gets -1
        probs.scatter_add_(1, safe_targets[:, None], -onehot)
        row_scale = torch.where(in_vocab, grad_scale, float("nan"))
        probs.mul_(torch.where(counted, row_scale, 0.0)[:, None])
    return loss_rows


def _mm_float32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` in ``acc``'s dtype (float32 or float64), or ``acc += a @ b`` in place, for inputs of any dtype.

    float32/float64 inputs: the plain product. float16/bfloat16: a GPU's matmul accumulates in float32 and can write
    float32 (``out_dtype``, CUDA only), so the inputs are never widened. Elsewhere (CPU) the product comes out in the
    inputs' dtype and is widened after — for the logits, the precision they had from an nn.Linear under autocast;
    for a sum into ``acc``, the inputs are widened first, so the sum over chunks is float32's.
    """
    wide = torch.promote_types(a.dtype, torch.float32)
    if a.dtype == wide:
        return a @ b if acc is None else acc.addmm_(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=wide) if acc is None else torch.addmm(acc, a, b, out_dtype=wide, out=acc)
    return (a @ b).to(wide) if acc is None else acc.addmm_(a.to(wide), b.to(wide))


def linear_cross_entropy_chunks(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    rows_step,
    need_grads: bool,
    chunk_rows: int | None = None,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss of ``linear_cross_entropy_math`` and, with ``need_grads``, its gradients, never holding more than
    ``chunk_rows`` rows of logits. No autograd here: this is the loop that ``LinearCrossEntropy`` (below) runs in its
    forward and backward, for every backend.

    x: (N, C); weight: (V, C), any strides (nothing copies it; the model's is stored input-major, see
    ``input_major`` in minigpt/model.py); both of one dtype (float32, float16, bfloat16 or float64). targets: (N,)
    int64. ``chunk_rows``: rows per chunk, default ``default_chunk_rows(N, V)``.

    ``rows_step(logits, targets, ignore_index, grad_scale) -> loss_rows`` is the per-chunk softmax (contract:
    ``cross_entropy_rows_step``, the plain PyTorch one). It gets each chunk's logits (n, V), computed in float32
    (float64 for float64 inputs) into a fresh contiguous tensor it may overwrite, the chunk's (n,) targets, and a
    (n,) ``grad_scale`` of the logits' dtype — or None when no gradient is wanted; it returns the (n,) loss rows and,
    given ``grad_scale``, leaves the logits' gradient in their place.

    Returns ``(loss, grad_x, grad_weight)``:
      loss         float32 (float64 for float64 inputs): a scalar for "mean" / "sum", (N,) rows for "none"
      grad_x       (N, C) in x's dtype, or None without ``need_grads``
      grad_weight  (V, C) in weight's dtype with weight's strides (summed over chunks in float32), or None
    The gradients are those of the loss itself (upstream gradient 1) for "mean" and "sum"; for "none" they need
    ``grad_output`` (N,), the upstream gradient of each row's loss, and are those of ``sum(grad_output * loss)``.
    """
    N, V = x.shape[0], weight.shape[0]
    if need_grads and reduction == "none" and grad_output is None:
        raise ValueError("linear_cross_entropy_chunks: reduction 'none' needs grad_output (N,) to give gradients")
    wide = torch.promote_types(x.dtype, torch.float32)  # the logits' dtype, and the loss's
    rows = chunk_rows or default_chunk_rows(N, V)
    counted = targets != ignore_index  # (N,)
    if not need_grads:
        scale = None
    elif reduction == "none":
        scale = grad_output.to(wide).contiguous()  # (N,)
    elif reduction == "mean":
        scale = torch.ones(N, dtype=wide, device=x.device) / counted.sum()  # 1 / (rows counted), without a sync
    else:
        scale = torch.ones(N, dtype=wide, device=x.device)

    loss_rows = torch.empty(N, dtype=wide, device=x.device)
    grad_x = torch.empty(N, x.shape[1], dtype=x.dtype, device=x.device) if need_grads else None
    # summed over chunks in float32 in weight's own memory order, so that the gradient matches the parameter's
    wide_w = torch.promote_types(weight.dtype, torch.float32)
    grad_weight = torch.zeros_like(weight, dtype=wide_w) if need_grads else None
    for start in range(0, N, rows):
        end = min(start + rows, N)
        x_chunk = x[start:end]  # (n, C), a view
        logits = _mm_float32(x_chunk, weight.T)  # (n, V) float32: the only (rows, V) tensor alive
        chunk_scale = None if scale is None else scale[start:end]
        loss_rows[start:end] = rows_step(logits, targets[start:end], ignore_index, chunk_scale)
        if need_grads:
            dlogits = logits.to(x.dtype)  # (n, V), now the gradient; the matmuls take one dtype (a no-op in float32)
            torch.mm(dlogits, weight, out=grad_x[start:end])  # (n, V) @ (V, C) -> (n, C)
            _mm_float32(dlogits.T, x_chunk, acc=grad_weight)  # += (V, n) @ (n, C)
            del dlogits
        del logits  # freed before the next chunk's are made: one (n, V) chunk alive at a time

    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / counted.sum()  # nan when every row is ignored (0 / 0), as F.cross_entropy
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)  # a no-op for float32 weights
    return loss, grad_x, grad_weight


class LinearCrossEntropy(torch.autograd.Function):
    """``linear_cross_entropy_chunks`` with autograd: gradients made in the forward for "mean" / "sum" (scaled by
    the upstream gradient in the backward), recomputed chunk by chunk in the backward for "none"."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, rows_step, chunk_rows):
        ctx.args = (ignore_index, reduction, rows_step, chunk_rows)
        with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen: see linear_cross_entropy_chunked
            if reduction == "none":
                loss, _, _ = linear_cross_entropy_chunks(x, weight, targets, ignore_index, reduction, rows_step,
                                                         need_grads=False, chunk_rows=chunk_rows)
                ctx.save_for_backward(x, weight, targets)
            else:
                loss, grad_x, grad_weight = linear_cross_entropy_chunks(
                    x, weight, targets, ignore_index, reduction, rows_step, need_grads=True, chunk_rows=chunk_rows)
                ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, reduction, rows_step, chunk_rows = ctx.args
        if reduction == "none":
            x, weight, targets = ctx.saved_tensors
            with torch.autocast(x.device.type, enabled=False):
                _, grad_x, grad_weight = linear_cross_entropy_chunks(
                    x, weight, targets, ignore_index, reduction, rows_step, need_grads=True, chunk_rows=chunk_rows,
                    grad_output=grad_loss)
        else:
            grad_x, grad_weight = ctx.saved_tensors
            grad_x, grad_weight = grad_x * grad_loss, grad_weight * grad_loss  # the upstream gradient, one number
        return grad_x, grad_weight, None, None, None, None, None


def autocast_inputs(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and weight cast to torch.autocast's dtype when it is on (as an nn.Linear's would be: a cast autograd sees,
    so float32 parameters still get float32 gradients); unchanged otherwise."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return x, weight


def linear_cross_entropy_chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    rows_step=cross_entropy_rows_step,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``linear_cross_entropy_math`` with autograd, in chunks of rows (``linear_cross_entropy_chunks``), its
    per-chunk softmax ``rows_step``; the inputs are the op's (``check_linear_cross_entropy_inputs`` for bad ones).

    Under torch.autocast, x and weight are cast to autocast's dtype first, as an nn.Linear's would be (the cast
    is differentiable, so float32 parameters get float32 gradients); the logits are float32 either way. Without
    gradients (torch.no_grad, or inputs that need none) only the loss is computed.
    """
    x, weight = autocast_inputs(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction, rows_step, chunk_rows)
    with torch.autocast(x.device.type, enabled=False):
        loss, _, _ = linear_cross_entropy_chunks(x, weight, targets, ignore_index, reduction, rows_step,
                                                 need_grads=False, chunk_rows=chunk_rows)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# The backend


class TorchBackend:
    """PyTorch's own implementations of LayerNorm, GELU and attention, and the chunked loss above (each checked
    against its ``*_math`` formula)."""

    name = "torch"

    def layer_norm(self, x, weight, bias, eps: float = EPS):
        check_layer_norm_inputs(x, weight, bias)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def gelu(self, x, approximate: str = "tanh"):
        check_gelu_approximate(approximate)
        return F.gelu(x, approximate=approximate)

    def causal_attention(self, q, k, v, dropout_p: float = 0.0, scale: float | None = None):
        # scaled_dot_product_attention picks a fused kernel (flash / memory-efficient) when one fits and falls back
        # to the plain math otherwise; its dropout acts on the softmax output, as nn.Dropout does in the seed.
        check_attention_inputs(q, k, v, dropout_p)
        Tq, Tk = q.shape[-2], k.shape[-2]
        if Tq == Tk:  # training, and a prompt's first forward
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        if Tq == 1:  # one decoding step: the new token sees every key, nothing to mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        # is_causal=True would align the mask top-left (query i sees keys 0..i); ours is bottom-right
        allowed = ~future_mask(Tq, Tk, q.device)  # (Tq, Tk), True = may attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)

    def linear_cross_entropy(self, x, weight, targets, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        # F.cross_entropy(x @ weight.T, ...) would hold the (N, V) logits and their gradient whole; the chunks
        # hold one (rows, V) slice at a time and give the same numbers (tests/test_linear_cross_entropy.py)
        check_linear_cross_entropy_inputs(x, weight, targets, ignore_index, reduction)
        return linear_cross_entropy_chunked(x, weight, targets, ignore_index, reduction, cross_entropy_rows_step)
