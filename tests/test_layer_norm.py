"""Triton LayerNorm (kernels/layer_norm.py): output and every gradient vs float64 math and the torch backend.

The measure: the kernel's error against the float64 formula (``definitions.layer_norm_math``, evaluated on the very
same rounded inputs) may be at most twice the torch backend's error in the same dtype, plus one unit in the last
place of the largest value; and it must stay under a per-dtype bound, so a broken torch could not hide a broken
kernel. Without a GPU the kernels run in Triton's interpreter, so the shapes on "cpu" are small; there one program
takes many rows, so ``test_small_interpreter_tiles`` shrinks the tiles to run several programs and loop steps.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels.launch  # noqa: E402
from kernels import get_backend  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from kernels.layer_norm import MAX_WIDTH, layer_norm, row_tile  # noqa: E402
from kernels.definitions import EPS, layer_norm_math  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Upper bound on the error, relative to the largest exact (float64) value: a few units in the last place of the dtype.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}

# (shape, on which devices): widths a GPT uses and awkward ones; the interpreter gets few rows.
SHAPES = [
    ((2, 1), "any"),
    ((3, 7), "any"),
    ((2, 768), "any"),
    ((2, 1000), "any"),
    ((2, 4096), "any"),
    ((1, 1, 1023), "any"),
    ((3, 7, 256), "any"),  # 21 rows over 4 row groups: the last group is short
    ((37, 48), "any"),
    ((8, 128, 768), "cuda"),
    ((4, 250, 1000), "cuda"),
    ((4, 64, 4096), "cuda"),
    ((2, 64, 8192), "cuda"),
    ((20000, 64), "cuda"),  # far more rows than row groups
]


def _skip_unless_runnable(device: str) -> None:
    if device == "cpu" and not is_interpreting():
        pytest.skip("the kernels were compiled for the GPU in this process; run with TRITON_INTERPRET=1 for the CPU")


def _run(fn, x, w, b, dy, eps=EPS):
    """fn's output and (dx, dw, db) for upstream gradient dy, on fresh leaf copies of the inputs."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def _inputs(shape, dtype, device, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    w_dtype = w_dtype or dtype
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)  # off-centre, not unit scale
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(device, w_dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(device, w_dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, b, dy


def _assert_close_to_definition(x, w, b, dy, eps=EPS):
    """Triton vs torch backend vs float64 on the same inputs: output, dx, dw, db."""
    ours = _run(layer_norm, x, w, b, dy, eps)
    torch_backend = get_backend("torch")
    theirs = _run(torch_backend.layer_norm, x, w, b, dy, eps)
    exact = _run(layer_norm_math, *(t.double() for t in (x, w, b, dy)), eps)
    for name, got, other, want, like in zip(("y", "dx", "dw", "db"), ours, theirs, exact, (x, x, w, b)):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        err = (got.double() - want).abs().max().item()
        err_torch = (other.double() - want).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)
        floor = torch.finfo(got.dtype).eps * scale
        assert err <= 2 * err_torch + floor, f"{name}: error {err:.3g} vs torch backend's {err_torch:.3g}"
        assert err <= TOL[got.dtype] * scale, f"{name}: error {err:.3g} over {TOL[got.dtype]} x {scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, where", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_matches_definition(device, dtype, shape, where):
    if where == "cuda" and device != "cuda":
        pytest.skip("large shape: GPU only")
    _skip_unless_runnable(device)
    _assert_close_to_definition(*_inputs(shape, dtype, device, seed=shape[-1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_dtype_float32_parameters(device, x_dtype):
    """Under autocast the activations are 16-bit while the parameters stay float32: y, dx in x's dtype,
    dw, db in float32."""
    _skip_unless_runnable(device)
    shape = (3, 5, 768) if device == "cpu" else (8, 256, 768)
    _assert_close_to_definition(*_inputs(shape, x_dtype, device, w_dtype=torch.float32, seed=1))


@pytest.mark.parametrize("tile", [256, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 48), (3, 7, 256), (2, 9, 1000)], ids=str)
def test_small_interpreter_tiles(monkeypatch, tile, dtype, shape):
    """Interpreter tiles of 256 or 1024 elements: several programs in the forward, several loop steps in each
    backward row group with a partial last step, and for the wider rows one row per program, as on a GPU."""
    _skip_unless_runnable("cpu")
    monkeypatch.setattr(kernels.launch, "INTERPRETER_TILE", tile)
    C, M = shape[-1], shape[0] * (shape[1] if len(shape) == 3 else 1)
    assert M // row_tile(C, 4, M).BLOCK_M >= 2, "the forward should need several programs"
    _assert_close_to_definition(*_inputs(shape, dtype, "cpu", seed=C + 1))


def test_gpu_tiles():
    """On a GPU narrow rows share a program (about 4096 elements each), wide rows get one each."""
    for width, rows_per_program in [(64, 64), (128, 32), (768, 4), (1000, 4), (2048, 2), (4096, 1), (8192, 1)]:
        tile = row_tile(width, 2, rows=10**6, interpreting=False)
        assert (tile.BLOCK_M, tile.BLOCK_C) == (rows_per_program, 1 << (width - 1).bit_length()), width
        assert 1 <= tile.num_warps <= 16


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    _skip_unless_runnable(device)
    x, w, b, dy = _inputs((6, 4, 2 * 96), torch.float32, device, seed=2)
    _assert_close_to_definition(x.transpose(0, 1), w, b, dy.transpose(0, 1))  # rows strided
    _assert_close_to_definition(x[..., ::2], w[::2], b[::2], dy[..., 1::2])  # features strided


@pytest.mark.parametrize("device", DEVICES)
def test_other_eps_and_constant_rows(device):
    """A constant row has zero variance: the output is the bias and every gradient stays finite."""
    _skip_unless_runnable(device)
    x, w, b, dy = _inputs((4, 32), torch.float32, device, seed=3)
    x[1] = 3.0
    _assert_close_to_definition(x, w, b, dy, eps=1e-3)
    y, dx, dw, db = _run(layer_norm, x, w, b, dy)
    torch.testing.assert_close(y[1], b, rtol=0, atol=1e-6)
    assert all(torch.isfinite(t).all() for t in (y, dx, dw, db))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0)])
def test_empty(device, shape):
    _skip_unless_runnable(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(shape[-1], device=device, requires_grad=True)
    b = torch.randn(shape[-1], device=device, requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    _skip_unless_runnable(device)
    x = torch.randn(2, 8, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="weight and bias of shape"):
        layer_norm(x, torch.ones(7, device=device), b)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer_norm(x.double(), w.double(), b.double())
    wide = torch.randn(1, MAX_WIDTH + 1, device=device)
    with pytest.raises(ValueError, match=str(MAX_WIDTH)):
        layer_norm(wide, torch.ones(MAX_WIDTH + 1, device=device), torch.zeros(MAX_WIDTH + 1, device=device))
    if device == "cuda":
        with pytest.raises(ValueError, match="one device"):
            layer_norm(x, w.cpu(), b)
