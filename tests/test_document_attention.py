"""Packed documents (``doc_ids``): a query attends only to keys of its own document, in both backends.

The truth is ``causal_attention_math`` in float64 with the same ``doc_ids`` (an explicit (Tq, Tk) mask), the torch
backend (SDPA with a boolean mask) must land within a few roundings of it, and the Triton kernels, which skip the
key tiles no query of a tile can see and mask the rest by document, as close as the torch backend. The layouts: a
document of one token, documents across tile boundaries, one document (the plain causal attention, bit for bit),
every token its own document, random lengths; fewer queries than keys (decoding inside the last document); dropout
with the very mask the kernels draw without documents.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are imported, so first
pytest.importorskip("triton")

from kernels.attention import causal_attention, document_bounds  # noqa: E402
from kernels.definitions import causal_attention_math  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from tests.test_attention import (  # noqa: E402
    DEVICES,
    DTYPES,
    TORCH,
    TORCH_TOLERANCE,
    _assert_as_good_as_torch,
    _max_err,
    _read_mask,
    _run,
    _use_tiles,
)

T = 70  # several tiles of every table the tests use, with a partial tail


def doc_ids_from_lengths(rows: list[list[int]], device="cpu") -> torch.Tensor:
    """(B, sum of lengths) ids 0, 0, ..., 1, 1, ...: row b holds documents of the lengths rows[b]."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in rows]).to(device)


def _random_lengths(total: int, generator: torch.Generator) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(1, 30, (1,), generator=generator)), total - sum(lengths)))
    return lengths


def _layouts(total: int) -> dict[str, list[list[int]]]:
    """Named document layouts for two windows of ``total`` tokens."""
    g = torch.Generator().manual_seed(3)
    return {
        "one token, then long ones": [[1, 40, total - 41], [total - 1, 1]],
        "across tile boundaries": [[15, 18, 33, total - 66], [31, 2, total - 33]],
        "one document": [[total], [total]],
        "every token alone": [[1] * total, [1] * total],
        "random lengths": [_random_lengths(total, g), _random_lengths(total, g)],
    }


# In the interpreter, float32 with each table of tiles and the 16-bit dtypes with the GPU-shaped ones: every dtype
# and every tile walk, in less time than their product. On a GPU, each dtype with the GPU's own tiles.
CASES = ([(torch.float32, "interpreter tiles"), (torch.float32, "gpu-shaped tiles"),
          (torch.float32, "few-query tiles"), (torch.float16, "gpu-shaped tiles"), (torch.bfloat16, "gpu-shaped tiles")]
         if is_interpreting() else [(dtype, "interpreter tiles") for dtype in DTYPES])


@pytest.fixture(params=CASES, ids=[f"{str(dtype).removeprefix('torch.')}-{tiles}" for dtype, tiles in CASES])
def dtype(request, monkeypatch):
    """The input dtype, with the tiles the interpreter uses for it."""
    _use_tiles(request.param[1], monkeypatch)
    return request.param[0]


@pytest.fixture(params=["interpreter tiles", "gpu-shaped tiles", "few-query tiles"])
def tiles(request, monkeypatch):
    return _use_tiles(request.param, monkeypatch)


def _inputs(device, dtype, B, H, Tq, Tk, D, seed):
    torch.manual_seed(seed)
    q = torch.randn(B, H, Tq, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, H, Tk, D, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, torch.randn(B, H, Tq, D, dtype=dtype, device=device)


def _check_both_backends(q, k, v, grad_out, doc_ids, dtype, label, **kwargs):
    ours = _run(causal_attention, q, k, v, grad_out, doc_ids=doc_ids, **kwargs)
    theirs = _run(TORCH.causal_attention, q, k, v, grad_out, doc_ids=doc_ids, **kwargs)
    truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double(), doc_ids=doc_ids,
                 **kwargs)
    for name, got, exact in zip(("out", "dq", "dk", "dv"), theirs, truth):
        err, tol = _max_err(got, exact), TORCH_TOLERANCE[dtype] * max(1.0, exact.abs().max().item())
        assert err <= tol, f"torch backend, {label}, {name}: error {err:.3g} > {tol:.3g}"
    _assert_as_good_as_torch(ours, theirs, truth, dtype, label)


@pytest.mark.parametrize("device", DEVICES)
def test_documents_match_float64_math(device, dtype):
    for i, (name, rows) in enumerate(_layouts(T).items()):
        doc_ids = doc_ids_from_lengths(rows, device)
        q, k, v, grad_out = _inputs(device, dtype, 2, 2, T, T, 24, seed=i)
        _check_both_backends(q, k, v, grad_out, doc_ids, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_fewer_queries_than_keys_inside_the_last_documents(device, dtype):
    """Decoding and chunks: the queries are the last Tq positions, in the window's last one or two documents."""
    rows = [[20, 30, T - 50], [T - 3, 3]]  # the second window's last document is shorter than some chunks
    doc_ids = doc_ids_from_lengths(rows, device)
    for Tq in (1, 3, 25, T - 1):
        q, k, v, grad_out = _inputs(device, dtype, 2, 2, Tq, T, 16, seed=Tq)
        _check_both_backends(q, k, v, grad_out, doc_ids, dtype, f"Tq={Tq}")


@pytest.mark.parametrize("device", DEVICES)
def test_one_document_is_the_causal_attention_bit_for_bit(device, tiles):
    """One document masks nothing: the same tiles are visited, and each score masked by document is kept as it
    is, so values and gradients equal the plain kernel's exactly."""
    q, k, v, grad_out = _inputs(device, torch.float32, 2, 2, T, T, 32, seed=1)
    plain = _run(causal_attention, q, k, v, grad_out)
    one_doc = _run(causal_attention, q, k, v, grad_out, doc_ids=torch.zeros(2, T, dtype=torch.long, device=device))
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, one_doc):
        assert torch.equal(a, b), f"{name} differs by {_max_err(a, b):.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_no_attention_across_documents(device, tiles):
    """A query's output and gradients do not depend on another document's keys and values: change them and
    nothing of the other documents moves (the same kind of check as for the future)."""
    rows = [[23, 17, T - 40]]
    doc_ids = doc_ids_from_lengths(rows, device)
    q, k, v, grad_out = _inputs(device, torch.float32, 1, 2, T, T, 16, seed=2)
    before = _run(causal_attention, q, k, v, grad_out, doc_ids=doc_ids)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 23:40] += 5 * torch.randn_like(k2[:, :, 23:40])  # the second document's keys and values
    v2[:, :, 23:40] += 5
    after = _run(causal_attention, q, k2, v2, grad_out, doc_ids=doc_ids)
    others = torch.ones(T, dtype=torch.bool, device=device)
    others[23:40] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), before, after):
        assert torch.equal(a[:, :, others], b[:, :, others]), f"{name} of other documents changed"
    assert not torch.equal(before[0][:, :, 23:40], after[0][:, :, 23:40])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_with_documents_is_the_same_mask_restricted(device, dtype):
    """With documents the kernels draw the mask they draw without them (by position, seed and head): the math
    with that mask and the documents is the truth."""
    B, H, p, seed = 2, 2, 0.25, 11
    keep = _read_mask(device, B, H, T, p, seed)[2]
    doc_ids = doc_ids_from_lengths(_layouts(T)["across tile boundaries"], device)
    q, k, v, grad_out = _inputs(device, dtype, B, H, T, T, 24, seed=4)
    torch.manual_seed(seed)
    ours = _run(causal_attention, q, k, v, grad_out, dropout_p=p, doc_ids=doc_ids)
    same_dtype = _run(causal_attention_math, q, k, v, grad_out, dropout_p=p, dropout_mask=keep, doc_ids=doc_ids)
    truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double(), dropout_p=p,
                 dropout_mask=keep, doc_ids=doc_ids)
    _assert_as_good_as_torch(ours, same_dtype, truth, dtype, f"dropout p={p}")


def test_document_bounds_are_each_positions_document():
    doc_ids = doc_ids_from_lengths([[2, 1, 3], [6]])
    starts, ends = document_bounds(doc_ids)
    assert starts.tolist() == [[0, 0, 2, 3, 3, 3], [0] * 6]
    assert ends.tolist() == [[2, 2, 3, 6, 6, 6], [6] * 6]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_doc_ids_are_one_line_errors(backend):
    from kernels import get_backend

    attention = get_backend(backend).causal_attention
    q = k = v = torch.zeros(2, 1, 5, 16)
    bad = {
        "must be (2, 5) integers": torch.zeros(2, 4, dtype=torch.long),
        "must be (2, 5) integers, one document id per key position, got (2, 5) torch.float32": torch.zeros(2, 5),
        "must not decrease along a row": torch.tensor([[0, 0, 1, 0, 1], [0] * 5]),
    }
    for message, doc_ids in bad.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            attention(q, k, v, doc_ids=doc_ids)
        assert "\n" not in str(info.value)


def test_the_tile_tuner_keeps_documents_a_problem_class_of_their_own(monkeypatch):
    """The tuner's key says whether documents are packed: tiles tuned for the plain causal kernel (which visits
    every tile below the diagonal) are not reused for one that skips most of them, or the other way round."""
    import kernels.attention_tiles as tiles

    keys = {kernel: [] for kernel in tiles.TUNERS}
    for kernel, tuner in tiles.TUNERS.items():
        monkeypatch.setattr(tuner, "choose", lambda key, candidates, run, kernel=kernel:
                            keys[kernel].append(key) or candidates[0])
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    doc_ids = doc_ids_from_lengths([[10, 22]])
    for ids in (None, doc_ids):
        causal_attention(q, k, v, doc_ids=ids).sum().backward()
    for kernel, (plain, packed) in keys.items():
        assert plain != packed, kernel
        assert [a for a, b in zip(plain, packed) if a != b] == [False]  # they differ in that one field, False/True
