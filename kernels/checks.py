"""Input checks every backend shares: a user's mistake gets a message with its fix, not a shape error deep inside
a kernel."""
from __future__ import annotations

import os

import torch

from .definitions import GELU_APPROXIMATIONS, REDUCTIONS


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                           doc_ids: torch.Tensor | None = None) -> None:
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
    if doc_ids is not None:
        check_doc_ids(doc_ids, k.shape[0], k.shape[2], k.device)


def check_doc_ids(doc_ids: torch.Tensor, B: int, Tk: int, device: torch.device) -> None:
    """``doc_ids``: (B, Tk) integers on the attention's device, non-decreasing along each row (a window's documents
    numbered in order). Whether they are non-decreasing is checked only on the CPU, where it costs no wait for a
    GPU; on a GPU ids out of order give each backend's own answer (see causal_attention)."""
    if doc_ids.shape != (B, Tk) or doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or \
            doc_ids.dtype == torch.bool:
        raise ValueError(f"causal_attention: doc_ids must be ({B}, {Tk}) integers, one document id per key "
                         f"position, got {tuple(doc_ids.shape)} {doc_ids.dtype}")
    if doc_ids.device != device:
        raise ValueError(f"causal_attention: doc_ids is on {doc_ids.device}, q, k, v on {device} — move it with "
                         f"doc_ids.to({str(device)!r})")
    if doc_ids.device.type == "cpu" and Tk > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise ValueError("causal_attention: doc_ids must not decrease along a row (each document is a run of "
                         "positions, numbered in order) — number a window's documents 0, 1, 2, ... from its start, "
                         "e.g. with minigpt.token_windows.document_ids")


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

