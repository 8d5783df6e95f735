"""What a training step optimizes, and how: the loss of a batch and of a loader, AdamW and the learning-rate schedule.

The original notebook's ``calc_loss_batch`` and ``calc_loss_loader`` keep their names and meaning; ``calc_loss_loader``
also serves the Trainer's evaluation, where several processes share the batches and each batch counts by its tokens.
"""
from __future__ import annotations

import math

import torch

from .token_windows import document_ids


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device | str = "cpu"):
    """AdamW with weight decay on the weight matrices of the Linear layers only.

    Biases and LayerNorm scale/shift are offsets and gains, not capacity: decaying them only pulls the model away
    from the identity. The embeddings are excluded too: a row of ``tok_emb`` is updated only when its token occurs,
    but decay would shrink every row at every step, rare tokens toward zero. (nanoGPT decays embeddings; minGPT
    does not. We follow minGPT.)
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and not name.startswith(("tok_emb", "pos_emb"))
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all the parameters instead of a loop over them — on a CPU it halves the tiny model's
    # AdamW step (2.3 -> 1.1 ms; benchmarks/NOTES.md, "The trainer's overhead")
    return torch.optim.AdamW(groups, lr=lr, fused=torch.device(device).type in ("cuda", "cpu"))


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Factor of the peak LR at a step: linear warm-up, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps <= warmup_steps:
            return 1.0
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------------------------
# Loss


def calc_loss_batch(input_batch, target_batch, model, device, eot_token: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch (B, T) -> float32 scalar (the original notebook's function of
    the same name).

    The original notebook computed ``F.cross_entropy(model(x).flatten(0, 1), y.flatten())``, the (B*T, V) logits whole;
    the model's ``targets=`` path gives the same number through the backend's fused linear + cross-entropy, without
    them (minigpt/model.py).

    ``eot_token`` (``--doc-mask``): the end-of-text id; each window's documents are numbered from it
    (minigpt.token_windows.document_ids) and every position attends only inside its own document. None (the
    default): attention crosses document boundaries, as in the original notebook."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    if eot_token is None:
        return model(input_batch, targets=target_batch)
    return model(input_batch, targets=target_batch, doc_ids=document_ids(input_batch, eot_token))


@torch.no_grad()
def calc_loss_loader(data_loader, model, device, num_batches: int | None = None, *, rank: int = 0,
                     world_size: int = 1, token_weighted: bool = False, as_sum: bool = False,
                     eot_token: int | None = None):
    """Average loss over the first ``num_batches`` batches (the original notebook's calc_loss_loader); each batch's
    loss is ``calc_loss_batch``'s, with its ``eot_token`` (documents masked, as in training, or not).

    For evaluation by several processes (the Trainer's): ``world_size`` processes read the first
    ``num_batches * world_size`` batches, process ``rank`` every ``world_size``-th one from its own; with
    ``token_weighted`` a batch counts by its number of targets, not as one, so that the estimate is the same for
    any split of the batches over processes. ``as_sum`` returns ``(sum of losses x weights, sum of weights)``
    instead of their ratio, for the caller to add up over processes (all_reduce_mean); a process with no batch
    then gives ``(0.0, 0)``, not NaN.
    """
    total, weight = 0.0, 0
    for i, (x, y) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches * world_size:
            break
        if i % world_size != rank:
            continue
        w = y.numel() if token_weighted else 1
        total += calc_loss_batch(x, y, model, device, eot_token).item() * w
        weight += w
    if as_sum:
        return total, weight
    return total / weight if weight else float("nan")


def optimizer_step(optimizer, parameters, grad_clip: float, scaler=None, scheduler=None) -> torch.Tensor:
    """Everything a training step does after ``backward()``: unscale the gradients (fp16's loss ``scaler``), clip
    their global norm to ``grad_clip`` (0: no clipping, the norm is measured all the same), step the optimizer,
    update the scaler, advance the LR ``scheduler``, free the gradients. The Trainer's step and the training
    benchmark's both end here, so the benchmark times what training does.

    Returns the norm before clipping as a tensor: reading it (``.item()``) waits for the GPU, so the caller
    decides whether that is worth it."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed (the scaler then lowers its scale)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---------------------------------------------------------------------------------------------------------------
# Resuming: this run's hyperparameters, not the checkpoint's


def set_hyperparameters(optimizer, scheduler, lr: float, weight_decay: float, lr_factor) -> None:
    """After loading a checkpoint's optimizer and scheduler: this run's ``lr`` and ``weight_decay``. Their state
    dicts carry the values they were saved with (each group's lr and weight decay, the scheduler's base lr) and
    would silently keep them; the schedule's shape (``lr_factor``: warm-up, cosine, floor) is this run's already,
    being a function the state dict does not hold."""
    step = scheduler.last_epoch
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group["initial_lr"] = lr
        group["lr"] = lr * lr_factor(step)  # the rate of the next step, as the scheduler would have set it
        group["weight_decay"] = decay  # configure_optimizer's groups: weight matrices, then the rest
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def match_moment_layout(optimizer) -> None:
    """AdamW's moments in their parameter's memory order (a checkpoint may have saved another; the fused
    optimizer walks a parameter and its moments as flat arrays, so the orders must agree)."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
