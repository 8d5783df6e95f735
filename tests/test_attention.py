"""The Triton causal attention (kernels/attention.py) against float64 math and the torch backend.

Every check compares with something computed independently: ``causal_attention_math`` in float64 is the truth,
and the torch backend in the same dtype says how far from it a good implementation lands. Without a GPU the
kernels run in Triton's interpreter on tiny shapes; on a GPU the same tests also run larger ones. The interpreter's
own tiles are large (fast); the ``tiles`` fixture also runs the value tests with small tiles shaped like
the GPU's, so that tiny sequences walk several tiles and the diagonal band in several steps, as long ones do there.
Queries may be the last Tq of Tk positions (a chunk, or Tq = 1 for a decoding step): those cases have tests of
their own, on an odd Tk so that the shifted diagonal falls across tile boundaries.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are imported, so first
pytest.importorskip("triton")

import kernels.attention_tiles  # noqa: E402
from kernels.attention import (  # noqa: E402
    MAX_HEAD_DIM,
    Tiles,
    attention_fwd,
    causal_attention,
)
from kernels.attention_tiles import tiles_for  # noqa: E402
from kernels.compile_targets import attention_targets  # noqa: E402
from kernels.definitions import causal_attention_math  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from kernels.torch_backend import TorchBackend  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not is_interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or is_interpreting(), reason="needs a CUDA GPU (and compiled kernels)")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TORCH = TorchBackend()
# Small tiles with the GPU table's shapes: forward and dQ hold a query tile and step through keys half as tall; dK/dV
# holds a key tile and steps through queries half as tall.
GPU_SHAPED_TILES = dict(fwd=Tiles(32, 16, 1, 1), dkdv=Tiles(16, 32, 1, 1), dq=Tiles(32, 16, 1, 1))
# Small tiles shaped like the GPU's few-query ones: 16 query rows, keys in longer steps, in every kernel.
FEW_QUERY_TILES = dict(fwd=Tiles(16, 32, 1, 1), dkdv=Tiles(16, 32, 1, 1), dq=Tiles(16, 32, 1, 1))


TILE_TABLES = {"interpreter tiles": None, "gpu-shaped tiles": GPU_SHAPED_TILES, "few-query tiles": FEW_QUERY_TILES}


def _use_tiles(name: str, monkeypatch) -> str:
    """Make the interpreter launch with the tiles called ``name`` (on a GPU the tiles are the GPU table's, so only
    the interpreter's own run there: the others skip)."""
    if TILE_TABLES[name] is not None:
        if not is_interpreting():
            pytest.skip("tiles of the interpreter only")
        monkeypatch.setattr(kernels.attention_tiles, "INTERPRETER_TILES", TILE_TABLES[name])
    return name


@pytest.fixture(params=["interpreter tiles", "gpu-shaped tiles"])
def tiles(request, monkeypatch):
    """Which tiles the interpreter uses."""
    return _use_tiles(request.param, monkeypatch)


def _shapes(device: str) -> list[tuple[int, int, int, int]]:
    """(B, H, T, D): several tiles with a partial tail, every power-of-two head dim and two padded ones."""
    small = [(1, 2, 70, 32), (2, 1, 33, 16), (1, 1, 40, 64), (1, 1, 20, 128), (1, 2, 37, 24), (1, 1, 19, 80)]
    if device == "cuda":
        small += [(2, 3, 300, 64), (1, 2, 1000, 128), (2, 2, 513, 80), (4, 4, 256, 32), (1, 1, 129, 8)]
    return small


def _qkv(shape, dtype, device, requires_grad=True):
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(3)]


def _run(fn, q, k, v, grad_out, **kwargs):
    """Output and (dq, dk, dv) of ``fn`` for the upstream gradient ``grad_out``."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _max_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.double() - exact.double()).abs().max().item()


def _assert_as_good_as_torch(ours, torch_ones, truth, dtype, label):
    """Each of ours must be within 2x of the torch backend's error against float64, plus a floor of a few float32
    roundings: in float32 both errors are that small and which is ahead is a matter of summation order."""
    for name, got, base, exact in zip(("out", "dq", "dk", "dv"), ours, torch_ones, truth):
        assert got.dtype == dtype, f"{label} {name}: dtype {got.dtype}, expected {dtype}"
        assert got.shape == exact.shape, f"{label} {name}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
        err, err_torch = _max_err(got, exact), _max_err(base, exact)
        floor = 8 * torch.finfo(torch.float32).eps * max(1.0, exact.abs().max().item())
        assert err <= 2 * err_torch + floor, (
            f"{label} {name}: max error {err:.3g} vs the torch backend's {err_torch:.3g} (floor {floor:.2g})")


# ----------------------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_math_as_well_as_torch(device, dtype, tiles):
    torch.manual_seed(0)
    for shape in _shapes(device):
        q, k, v = _qkv(shape, dtype, device)
        grad_out = torch.randn(shape, dtype=dtype, device=device)
        ours = _run(causal_attention, q, k, v, grad_out)
        theirs = _run(TORCH.causal_attention, q, k, v, grad_out)
        truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double())
        _assert_as_good_as_torch(ours, theirs, truth, dtype, f"{shape}")


@pytest.mark.parametrize("device", DEVICES)
def test_single_token_attends_to_itself(device):
    torch.manual_seed(1)
    q, k, v = _qkv((2, 3, 1, 32), torch.float32, device)
    out = causal_attention(q, k, v)
    torch.testing.assert_close(out, v.detach())  # softmax over one key is 1
    out.sum().backward()
    assert q.grad.abs().max() < 1e-5 and k.grad.abs().max() < 1e-5  # the output does not depend on q, k
    torch.testing.assert_close(v.grad, torch.ones_like(v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs_and_custom_scale(device, dtype, tiles):
    """Views as the model makes them ((B, T, H, D) transposed), a strided last dim, and scale != 1/sqrt(D)."""
    torch.manual_seed(2)
    B, T, H, D = 2, 45, 3, 32
    q = torch.randn(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)  # (B, H, T, D), not contiguous
    k = torch.randn(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)
    v = torch.randn(B, H, D, T, dtype=dtype, device=device).transpose(-1, -2)  # strided last dim
    grad_out = torch.randn(B, H, D, T, dtype=dtype, device=device).transpose(-1, -2)
    assert not q.is_contiguous() and v.stride(-1) != 1
    for scale in (None, 0.3):
        ours = _run(causal_attention, q, k, v, grad_out, scale=scale)
        theirs = _run(TORCH.causal_attention, q, k, v, grad_out, scale=scale)
        truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double(), scale=scale)
        _assert_as_good_as_torch(ours, theirs, truth, dtype, f"scale={scale}")


@pytest.mark.parametrize("device", DEVICES)
def test_saved_log_sum_exp(device, tiles):
    """The forward's LSE (what the backward rebuilds P from) is logsumexp of the masked, scaled scores, for all T
    queries and for the last 7 (whose row i sees keys 0 .. T - 7 + i)."""
    torch.manual_seed(3)
    B, H, T, D = 2, 2, 50, 16
    q, k, v = _qkv((B, H, T, D), torch.float32, device, requires_grad=False)
    for Tq in (T, 7):
        _, lse2 = attention_fwd(q[:, :, T - Tq:], k, v, 0.0, 0.25, torch.zeros(1, dtype=torch.int64))  # in base 2
        scores = (q[:, :, T - Tq:].double() @ k.double().transpose(-2, -1)) * 0.25
        future = torch.arange(T, device=device)[None, :] > (T - Tq + torch.arange(Tq, device=device))[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        lse = lse2.view(B, H, Tq).double() * math.log(2.0)
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    torch.manual_seed(4)
    q, k, v = _qkv((1, 2, 64, 32), torch.float16, device)
    grad_out = torch.randn_like(q)
    first = _run(causal_attention, q, k, v, grad_out, dropout_p=0.2)[1:]
    torch.manual_seed(4)
    q, k, v = _qkv((1, 2, 64, 32), torch.float16, device)
    grad_out = torch.randn_like(q)
    second = _run(causal_attention, q, k, v, grad_out, dropout_p=0.2)[1:]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for shape in [(2, 3, 0, 16), (0, 3, 5, 16)]:
        q, k, v = _qkv(shape, torch.float16, device)
        out = causal_attention(q, k, v, dropout_p=0.1)
        assert out.shape == shape and out.dtype == torch.float16
        out.sum().backward()
        assert q.grad.shape == shape
    # no query against 5 keys: nothing reaches k or v
    q = _qkv((2, 3, 0, 16), torch.float16, device)[0]
    _, k, v = _qkv((2, 3, 5, 16), torch.float16, device)
    out = causal_attention(q, k, v)
    assert out.shape == q.shape
    out.sum().backward()
    assert k.grad.shape == k.shape and not k.grad.any() and not v.grad.any()


def test_interpreter_tiles():
    """The interpreter's own tiles: the held side as long as the sequence (a power of two from 16 to 128), the
    streamed side halved until a tile product is at most INTERPRETER_MAX_DOT multiply-adds; the delta pass takes
    the forward's query tile. On a GPU the delta pass keeps PREPROCESS_TILES."""
    at = kernels.attention_tiles
    assert at.INTERPRETER_TILES is None
    # the tiny preset's shape, T = 128 and D = 32: 128 x 128 x 32 = 2^19 > 2^18, so the streamed side is 64
    tiles = tiles_for(torch.float32, 32, 128, 128, interpreting=True)
    assert tiles == dict(fwd=(Tiles(128, 64, 1, 1),), dkdv=(Tiles(64, 128, 1, 1),), dq=(Tiles(128, 64, 1, 1),))
    assert tiles_for(torch.float32, 64, 100, 100, interpreting=True)["fwd"] == (Tiles(128, 32, 1, 1),)  # 2^18
    assert tiles_for(torch.float32, 32, 40, 40, interpreting=True)["dkdv"] == (Tiles(64, 64, 1, 1),)  # 2^17: whole
    assert tiles_for(torch.float16, 32, 1, 300, interpreting=True)["fwd"] == (Tiles(16, 128, 1, 1),)  # decoding
    assert at.preprocess_tiles(32, 128, 128, interpreting=True).BLOCK_M == 128
    assert at.preprocess_tiles(32, 128, 128, interpreting=False) == at.PREPROCESS_TILES
    for D in (8, 16, 32, 64, 80, 128):
        for Tq, Tk in [(1, 1), (1, 300), (5, 300), (37, 37), (128, 128), (1000, 1000)]:
            held_q, held_k = (min(128, max(16, 1 << (n - 1).bit_length())) for n in (Tq, Tk))
            tiles = tiles_for(torch.float32, D, Tq, Tk, interpreting=True)
            for kernel, held in (("fwd", "BLOCK_M"), ("dq", "BLOCK_M"), ("dkdv", "BLOCK_N")):
                (t,) = tiles[kernel]
                assert getattr(t, held) == (held_k if kernel == "dkdv" else held_q), (kernel, D, Tq, Tk, t)
                assert t.BLOCK_M >= 16 and t.BLOCK_N >= 16
                assert t.BLOCK_M * t.BLOCK_N * max(16, 1 << (D - 1).bit_length()) <= at.INTERPRETER_MAX_DOT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 2, 128, 32), (1, 2, 100, 64)], ids=str)
def test_default_interpreter_tiles_step_through_the_keys(device, shape):
    """The interpreter's default tiles where they stream in several steps: at the tiny preset's T = 128, D = 32
    two key (query) steps of 64 a program; at T = 100, D = 64 four of 32, the last one partial. Values and every
    gradient against float64, as good as the torch backend. (On a GPU: its own tiles, the same check.)"""
    if device == "cpu":
        B, H, T, D = shape
        assert tiles_for(torch.float32, D, T, T)["fwd"][0].BLOCK_N < T
    torch.manual_seed(5)
    q, k, v = _qkv(shape, torch.float32, device)
    grad_out = torch.randn(shape, device=device)
    ours = _run(causal_attention, q, k, v, grad_out)
    theirs = _run(TORCH.causal_attention, q, k, v, grad_out)
    truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double())
    _assert_as_good_as_torch(ours, theirs, truth, torch.float32, f"{shape}")


# ----------------------------------------------------------------------------------------------------------------
# Dropout


def _read_mask(device, B, H, T, p, seed, Tq=None):
    """The kernel's keep mask for ``seed``, (B, H, Tq, T) for queries at the last Tq of T positions (default: all
    T): with v = the identity's columns [c, c + D), output column j of row i is P_ij * M_ij / (1 - p), so D <= 128
    columns of the mask come out per run (the mask depends on the seed, the (batch, head) and (i, j) only, not on
    q, k or the tiles)."""
    torch.manual_seed(10)
    q, k = (torch.randn(B, H, T, min(T, MAX_HEAD_DIM), device=device) for _ in range(2))
    q = q[:, :, T - (T if Tq is None else Tq):]
    eye = torch.eye(T, device=device).expand(B, H, T, T)
    outs, weights = [], []
    for c in range(0, T, MAX_HEAD_DIM):
        d = min(MAX_HEAD_DIM, T - c)
        qc, kc, vc = q[..., :d], k[..., :d], eye[..., c:c + d]
        torch.manual_seed(seed)
        outs.append(causal_attention(qc, kc, vc, dropout_p=p))
        # P, all > 0 on and below the diagonal
        weights.append(causal_attention_math(qc.double(), kc.double(), eye.double())[..., c:c + d])
    out = torch.cat(outs, dim=-1)
    return out, torch.cat(weights, dim=-1), out != 0


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_is_nn_dropout_of_the_weights(device):
    B, H, T, p = (2, 2, 40, 0.3) if device == "cpu" else (4, 4, 128, 0.3)
    out, weights, keep = _read_mask(device, B, H, T, p, seed=123)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    assert not keep[..., ~causal].any(), "weights on future positions"
    # kept weights are the undropped softmax scaled by 1 / (1 - p)
    torch.testing.assert_close(out.double()[keep], (weights / (1 - p))[keep], rtol=1e-5, atol=1e-6)
    n = int(causal.sum()) * B * H
    rate = keep[..., causal].double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n) + 1 / n, f"keep rate {rate:.4f}, expected {1 - p}"
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0]), "heads share a mask"
    # neighbours are independent: keys in one group of 8 share a Philox call but not its bits (offsets 1, 2, 4),
    # and groups do not repeat each other (offset 8)
    for offset in (1, 2, 4, 8):
        both = causal[:, offset:] & causal[:, :-offset]  # pairs (i, j), (i, j + offset) both in the past of i
        together = (keep[..., offset:] & keep[..., :-offset])[..., both].double()
        n = together.numel()
        assert abs(together.mean().item() - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n), (
            f"keys {offset} apart are not kept independently")
    # the same seed gives the same mask, another seed another one
    assert torch.equal(_read_mask(device, B, H, T, p, seed=123)[2], keep)
    assert not torch.equal(_read_mask(device, B, H, T, p, seed=124)[2], keep)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_gradients_match_math_with_the_same_mask(device, dtype, tiles):
    B, H, T, p, seed = (1, 2, 40, 0.25, 7) if device == "cpu" else (2, 3, 96, 0.25, 7)
    keep = _read_mask(device, B, H, T, p, seed)[2]  # the mask depends on (seed, batch*head, i, j) only
    torch.manual_seed(5)
    q, k, v = _qkv((B, H, T, 24), dtype, device)
    grad_out = torch.randn_like(q)
    _check_dropout_against_math(q, k, v, grad_out, p, seed, keep, dtype, f"dropout p={p}")


def _check_dropout_against_math(q, k, v, grad_out, p, seed, keep, dtype, label):
    """Our kernels with dropout (seeded to draw ``keep``) against the math with that exact mask: output and
    gradients as close to float64 as the math in the same dtype gets."""
    torch.manual_seed(seed)
    ours = _run(causal_attention, q, k, v, grad_out, dropout_p=p)
    same_dtype = _run(causal_attention_math, q, k, v, grad_out, dropout_p=p, dropout_mask=keep)
    truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double(), dropout_p=p,
                 dropout_mask=keep)
    _assert_as_good_as_torch(ours, same_dtype, truth, dtype, label)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_no_attention_to_the_future(device, dropout_p, tiles):
    torch.manual_seed(6)
    T, i = 50, 21
    q, k, v = _qkv((1, 2, T, 32), torch.float32, device, requires_grad=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, i + 1:] = torch.randn_like(k2[:, :, i + 1:]) * 10
    v2[:, :, i + 1:] = torch.randn_like(v2[:, :, i + 1:]) * 10
    torch.manual_seed(8)
    out = causal_attention(q, k, v, dropout_p=dropout_p)
    torch.manual_seed(8)
    out2 = causal_attention(q, k2, v2, dropout_p=dropout_p)
    assert torch.equal(out[:, :, : i + 1], out2[:, :, : i + 1])
    assert not torch.equal(out[:, :, i + 1:], out2[:, :, i + 1:])


# ----------------------------------------------------------------------------------------------------------------
# Fewer queries than keys: the last Tq of Tk positions (a chunk of a sequence; Tq = 1, a decoding step)

TK = 37  # odd, so that the diagonal, shifted by Tk - Tq, falls across tile boundaries
# The torch backend's own error against float64, relative to the largest value: a few roundings of the dtype.
TORCH_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _chunk_lens(device) -> list[tuple[int, int]]:
    """(Tq, Tk) pairs: one query, a few, all but one, all; on a GPU also around its few-query tiles' limit (16)."""
    lens = [(1, TK), (3, TK), (TK - 1, TK), (TK, TK)]
    if device == "cuda":
        lens += [(1, 1000), (16, 1000), (17, 1000), (999, 1000)]
    return lens


def _chunk(device, dtype, B, H, Tq, Tk, D):
    """q for the last Tq of Tk positions, k and v for all of them, and an upstream gradient of the output."""
    q = torch.randn(B, H, Tq, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, H, Tk, D, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, torch.randn(B, H, Tq, D, dtype=dtype, device=device)


@pytest.fixture(params=["interpreter tiles", "gpu-shaped tiles", "few-query tiles"])
def chunk_tiles(request, monkeypatch):
    """The ``tiles`` fixture's two, and small tiles shaped like the GPU's few-query ones (16 query rows, longer
    key steps), which run Tk = 37 in two key tiles."""
    return _use_tiles(request.param, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fewer_queries_than_keys_match_float64_math(device, dtype, chunk_tiles):
    """Values and gradients of q, k, v with Tq <= Tk: the torch backend within a few roundings of float64, ours
    as close as the torch backend."""
    torch.manual_seed(20)
    for Tq, Tk in _chunk_lens(device):
        q, k, v, grad_out = _chunk(device, dtype, 1, 2, Tq, Tk, 24)
        ours = _run(causal_attention, q, k, v, grad_out)
        theirs = _run(TORCH.causal_attention, q, k, v, grad_out)
        truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double())
        for name, got, exact in zip(("out", "dq", "dk", "dv"), theirs, truth):
            err, tol = _max_err(got, exact), TORCH_TOLERANCE[dtype] * max(1.0, exact.abs().max().item())
            assert got.shape == exact.shape and err <= tol, f"torch backend Tq={Tq} Tk={Tk} {name}: error {err:.3g}"
        _assert_as_good_as_torch(ours, theirs, truth, dtype, f"Tq={Tq} Tk={Tk}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fewer_queries_dropout_gradients_match_math_with_the_same_mask(device, dtype, tiles):
    B, H, p, seed = 1, 2, 0.25, 9
    for Tq, Tk in _chunk_lens(device)[:3]:
        keep = _read_mask(device, B, H, Tk, p, seed, Tq=Tq)[2]  # the mask of the chunk's own forward
        torch.manual_seed(21)
        q, k, v, grad_out = _chunk(device, dtype, B, H, Tq, Tk, 24)
        _check_dropout_against_math(q, k, v, grad_out, p, seed, keep, dtype, f"dropout p={p} Tq={Tq} Tk={Tk}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_of_a_chunk_is_the_same_rows_of_the_whole(device, tiles):
    """With one seed, the last Tq queries alone draw the keep mask that the same rows draw in the whole (Tk, Tk)
    op, so their output is the same rows of the whole op's output."""
    B, H, p, seed = 2, 2, 0.3, 12
    keep_whole = _read_mask(device, B, H, TK, p, seed)[2]
    torch.manual_seed(22)
    q, k, v = _qkv((B, H, TK, 16), torch.float32, device, requires_grad=False)
    torch.manual_seed(seed)
    whole = causal_attention(q, k, v, dropout_p=p)
    for Tq in (1, 3, TK - 1):
        assert torch.equal(_read_mask(device, B, H, TK, p, seed, Tq=Tq)[2], keep_whole[:, :, -Tq:]), f"Tq={Tq}"
        torch.manual_seed(seed)
        chunk = causal_attention(q[:, :, -Tq:], k, v, dropout_p=p)
        torch.testing.assert_close(chunk, whole[:, :, -Tq:], rtol=1e-5, atol=1e-6, msg=f"Tq={Tq}")


# ----------------------------------------------------------------------------------------------------------------
# The GPU's alternative tiles and the tuner that picks among them (kernels/launch.py)


def _with_tiles(monkeypatch, index):
    """Make candidate ``index`` of every kernel the only one (the first where a list is shorter), in the tables
    for many and for few queries."""
    for name in ("GPU_TILES", "SMALL_Q_TILES"):
        table = {group: {kernel: (cands[index] if index < len(cands) else cands[0],) for kernel, cands in per.items()}
                 for group, per in getattr(kernels.attention_tiles, name).items()}
        monkeypatch.setattr(kernels.attention_tiles, name, table)


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available() or is_interpreting(), reason="needs a CUDA GPU")


@CUDA_ONLY
@pytest.mark.parametrize("index", [1, 2])
@pytest.mark.parametrize("D", [64, 128])
def test_every_alternative_tile_is_correct(monkeypatch, index, D):
    """Whatever the tuner picks computes the same function: each alternative, alone, with and without dropout."""
    _with_tiles(monkeypatch, index)
    B, H, T, p, seed = 2, 3, 300, 0.2, 11
    torch.manual_seed(0)
    q, k, v = _qkv((B, H, T, D), torch.bfloat16, "cuda")
    grad_out = torch.randn_like(q)
    ours = _run(causal_attention, q, k, v, grad_out)
    theirs = _run(TORCH.causal_attention, q, k, v, grad_out)
    truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double())
    _assert_as_good_as_torch(ours, theirs, truth, torch.bfloat16, f"tiles #{index} D={D}")
    keep = _read_mask("cuda", B, H, T, p, seed)[2]  # read with float32 inputs, whose tiles are the defaults
    torch.manual_seed(seed)
    ours = _run(causal_attention, q, k, v, grad_out, dropout_p=p)
    same_dtype = _run(causal_attention_math, q, k, v, grad_out, dropout_p=p, dropout_mask=keep)
    truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double(), dropout_p=p,
                 dropout_mask=keep)
    _assert_as_good_as_torch(ours, same_dtype, truth, torch.bfloat16, f"tiles #{index} D={D} dropout")
    for Tq in (1, 5):  # the few-query tiles
        q, k, v, grad_out = _chunk("cuda", torch.bfloat16, B, H, Tq, T, D)
        ours = _run(causal_attention, q, k, v, grad_out)
        theirs = _run(TORCH.causal_attention, q, k, v, grad_out)
        truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double())
        _assert_as_good_as_torch(ours, theirs, truth, torch.bfloat16, f"tiles #{index} D={D} Tq={Tq}")


@CUDA_ONLY
def test_tuner_picks_tiles_once_per_problem_class(monkeypatch):
    monkeypatch.setenv("MINIGPT_AUTOTUNE", "1")
    for tuner in kernels.attention_tiles.TUNERS.values():
        monkeypatch.setattr(tuner, "chosen", {})
        monkeypatch.setattr(tuner, "timings", {})
    torch.manual_seed(0)
    q, k, v = _qkv((2, 4, 512, 64), torch.bfloat16, "cuda")
    grad_out = torch.randn_like(q)
    ours = _run(causal_attention, q, k, v, grad_out)
    truth = _run(causal_attention_math, q.double(), k.double(), v.double(), grad_out.double())
    theirs = _run(TORCH.causal_attention, q, k, v, grad_out)
    _assert_as_good_as_torch(ours, theirs, truth, torch.bfloat16, "tuned")
    report = kernels.attention_tiles.tuning_report()
    assert len(report) == 3 and all("chose" in line for line in report), report  # fwd, dkdv, dq: one class each
    _run(causal_attention, q, k, v, grad_out)  # the same class again: no new timing
    assert kernels.attention_tiles.tuning_report() == report


# ----------------------------------------------------------------------------------------------------------------
# Bad input and compile targets


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match=str(MAX_HEAD_DIM)):
        big = torch.randn(1, 2, 8, 160, device=device)
        causal_attention(big, big, big)
    with pytest.raises(ValueError, match="with Tq <= Tk"):
        causal_attention(x, x, x[:, :, :4])
    with pytest.raises(TypeError, match="share a dtype"):
        causal_attention(x, x, x.half())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        i = torch.ones(1, 2, 8, 16, dtype=torch.int32, device=device)
        causal_attention(i, i, i)
    with pytest.raises(ValueError, match="dropout_p"):
        causal_attention(x, x, x, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        causal_attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="Tk <= 46340"):  # dropout's limit is on the keys, whatever Tq
        long = torch.zeros(1, 1, 46341, 16, device=device)
        causal_attention(long[:, :, -1:], long, long, dropout_p=0.1)


def test_compile_targets_cover_every_launch_configuration():
    targets = attention_targets()
    names = [t["name"] for t in targets]
    assert len(names) == len(set(names))
    for t in targets:
        assert {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} <= set(t)
        params = list(t["signature"])
        assert params == list(t["fn"].arg_names), t["name"]
        assert {p for p, ty in t["signature"].items() if ty == "constexpr"} == set(t["constexprs"]), t["name"]
    for ty in ("fp16", "bf16", "fp32"):
        for d in (16, 32, 64, 128, 80):
            for kernel in ("fwd", "dkdv", "dq"):
                assert f"attention_{kernel}_{ty}_d{d}" in names and f"attention_{kernel}_{ty}_d{d}_dropout" in names
            for kernel in ("fwd", "dq"):  # the few-query tiles (dK/dV's are its usual ones)
                assert f"attention_{kernel}_{ty}_d{d}_smallq" in names
                assert f"attention_{kernel}_{ty}_d{d}_smallq_dropout" in names
            assert f"attention_fwd_{ty}_d{d}_decode" in names  # Tq = 1, a constant in the launch's kernel
            assert f"attention_bwd_preprocess_{ty}_d{d}" in names
    # every tile a GPU launch can choose, for many queries or few, is compiled: (kernel, dtype, D, tiles)
    compiled = {(*t["name"].split("_")[1:3], t["constexprs"]["HEAD_DIM"], t["constexprs"].get("BLOCK_M"),
                 t["constexprs"].get("BLOCK_N"), t["num_warps"], t["num_stages"]) for t in targets}
    for dtype, ty in zip(DTYPES, ("fp32", "fp16", "bf16")):
        for d in (16, 32, 64, 128, 80):
            for Tq in (1, 16, 17, 1000):
                for kernel, cands in tiles_for(dtype, d, Tq, 1000, interpreting=False).items():
                    for t in cands:
                        assert (kernel, ty, d, *t) in compiled, (kernel, ty, d, Tq, t)
