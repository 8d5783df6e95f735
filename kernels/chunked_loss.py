"""The loss without the logits: the output head's matmul and cross-entropy, rows in chunks, in plain PyTorch.

PyTorch has no fused "matmul + cross-entropy", and the plain formula (``linear_cross_entropy_math``) is what this
op exists to avoid: at GPT-2's vocabulary the logits outweigh every other activation. This module is the loop both
backends run: the torch backend with ``cross_entropy_rows_step`` below as its per-chunk softmax, the Triton backend
with its namesake of the same contract, one Triton kernel (``kernels/linear_cross_entropy.py``).

At GPT-2's size the output head turns N = 16 x 1024 rows of C = 768 features into N x V = 16,384 x 50,257 logits:
3.3 GB in float32, more than every other activation together, and the plain formula holds them (and their
gradient) whole. But each row's loss needs only its own logits, and the gradients are sums over rows:

    dlogits = grad_scale * (softmax(logits) - onehot(targets))     (n, V), zero for ignored rows
    dx      = dlogits @ weight                                     (n, V) @ (V, C) -> (n, C), this chunk's rows
    dweight += dlogits.T @ x_chunk                                 (V, n) @ (n, C) -> (V, C), summed over chunks

So the rows go through in chunks of n: a chunk's logits are made, turned IN PLACE into their gradient, used for
dx and dweight, and freed before the next chunk's. Peak memory: one (n, V) chunk, not (N, V).

When the loss is reduced ("mean", "sum") it is the last op of the graph, so the gradient reaching it is one
number g, and d(loss)/d(logits) is g times the dlogits above: the forward computes dx and dweight while the
logits are at hand, and the backward only multiplies them by g. No recomputation: the matmul work is the plain
formula's three products (logits, dx, dweight). For "none" each row has its own upstream gradient, unknown until
the backward, which therefore makes each chunk's logits again.

Two layers, two names: ``loss_and_grads_in_chunks`` is the loop itself (no autograd: it returns the loss and, when
asked, the gradients); ``chunked_linear_cross_entropy`` is the differentiable op built on it.
"""
from __future__ import annotations

import torch

from .definitions import IGNORE_INDEX


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
    """The per-chunk softmax step of ``loss_and_grads_in_chunks``, in plain PyTorch (the Triton backend's is a
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


def loss_and_grads_in_chunks(
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
        raise ValueError("loss_and_grads_in_chunks: reduction 'none' needs grad_output (N,) to give gradients")
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
    """``loss_and_grads_in_chunks`` with autograd: gradients made in the forward for "mean" / "sum" (scaled by
    the upstream gradient in the backward), recomputed chunk by chunk in the backward for "none"."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, rows_step, chunk_rows):
        ctx.args = (ignore_index, reduction, rows_step, chunk_rows)
        with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen: see chunked_linear_cross_entropy
            if reduction == "none":
                loss, _, _ = loss_and_grads_in_chunks(x, weight, targets, ignore_index, reduction, rows_step,
                                                      need_grads=False, chunk_rows=chunk_rows)
                ctx.save_for_backward(x, weight, targets)
            else:
                loss, grad_x, grad_weight = loss_and_grads_in_chunks(
                    x, weight, targets, ignore_index, reduction, rows_step, need_grads=True, chunk_rows=chunk_rows)
                ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, reduction, rows_step, chunk_rows = ctx.args
        if reduction == "none":
            x, weight, targets = ctx.saved_tensors
            with torch.autocast(x.device.type, enabled=False):
                _, grad_x, grad_weight = loss_and_grads_in_chunks(
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


def chunked_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    rows_step=cross_entropy_rows_step,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``linear_cross_entropy_math`` with autograd, in chunks of rows (``loss_and_grads_in_chunks``), its
    per-chunk softmax ``rows_step``; the inputs are the op's (``check_linear_cross_entropy_inputs`` for bad ones).

    Under torch.autocast, x and weight are cast to autocast's dtype first, as an nn.Linear's would be (the cast
    is differentiable, so float32 parameters get float32 gradients); the logits are float32 either way. Without
    gradients (torch.no_grad, or inputs that need none) only the loss is computed.
    """
    x, weight = autocast_inputs(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction, rows_step, chunk_rows)
    with torch.autocast(x.device.type, enabled=False):
        loss, _, _ = loss_and_grads_in_chunks(x, weight, targets, ignore_index, reduction, rows_step,
                                              need_grads=False, chunk_rows=chunk_rows)
    return loss
