"""Triton GELU (kernels/gelu.py): output and gradient vs float64 math and the torch backend, both approximations.

The measure: the kernel's error against the float64 formula (``definitions.gelu_math`` on the very same rounded
inputs) may be at most twice the torch backend's error in the same dtype, plus one unit in the last place of the
largest value; and it must stay under a per-dtype bound. Without a GPU the kernels run in Triton's interpreter,
where one program takes up to ``kernels.launch.INTERPRETER_TILE`` elements; ``test_small_interpreter_tiles``
shrinks it so that the shapes below span several programs there too.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels.gelu as gelu_module  # noqa: E402
import kernels.launch  # noqa: E402
from kernels import get_backend  # noqa: E402
from kernels.gelu import BLOCK, gelu  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from kernels.definitions import gelu_math  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATIONS = ["tanh", "none"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the largest |value|

SHAPES = [  # BLOCK: the elements of one program on a GPU
    ((BLOCK,), "any"),
    ((BLOCK + 1,), "any"),  # one element into a second block
    ((7,), "any"),
    ((1, 1, 1023), "any"),
    ((3, 7, 256), "any"),
    ((2, 3000), "any"),
    ((8, 1024, 3072), "cuda"),  # a GPT-2 small MLP activation
    ((3, 333, 777), "cuda"),
]


def _skip_unless_runnable(device: str) -> None:
    if device == "cpu" and not is_interpreting():
        pytest.skip("the kernels were compiled for the GPU in this process; run with TRITON_INTERPRET=1 for the CPU")


def _run(fn, x, dy, approximate):
    x = x.detach().clone().requires_grad_()
    y = fn(x, approximate)
    y.backward(dy)
    return y.detach(), x.grad


def _assert_close_to_definition(x, dy, approximate):
    ours = _run(gelu, x, dy, approximate)
    theirs = _run(get_backend("torch").gelu, x, dy, approximate)
    exact = _run(gelu_math, x.double(), dy.double(), approximate)
    for name, got, other, want in zip(("y", "dx"), ours, theirs, exact):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        err = (got.double() - want).abs().max().item()
        err_torch = (other.double() - want).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)
        floor = torch.finfo(x.dtype).eps * scale
        assert err <= 2 * err_torch + floor, f"{name}: error {err:.3g} vs torch backend's {err_torch:.3g}"
        assert err <= TOL[x.dtype] * scale, f"{name}: error {err:.3g} over {TOL[x.dtype]} x {scale:.3g}"


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(device, dtype)  # reaches both tails and the bend near 0
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, dy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, where", SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_matches_definition(device, approximate, dtype, shape, where):
    if where == "cuda" and device != "cuda":
        pytest.skip("large shape: GPU only")
    _skip_unless_runnable(device)
    _assert_close_to_definition(*_inputs(shape, dtype, device, seed=sum(shape)), approximate)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(BLOCK + 1,), (2, 3000), (3, 7, 5)], ids=str)
def test_small_interpreter_tiles(monkeypatch, approximate, dtype, shape):
    """With the interpreter's tiles as small as a GPU's (1024) or smaller (64): several programs, a partial last."""
    _skip_unless_runnable("cpu")
    for tile in (64, BLOCK):
        monkeypatch.setattr(kernels.launch, "INTERPRETER_TILE", tile)
        assert gelu_module._block(BLOCK + 1) == tile
        _assert_close_to_definition(*_inputs(shape, dtype, "cpu", seed=sum(shape)), approximate)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_extreme_values_stay_finite(device, approximate):
    """Far tails: no NaN from exp overflow, and the float32 result is still close to float64."""
    _skip_unless_runnable(device)
    x = torch.tensor([-1e4, -100.0, -20.0, -9.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 9.0, 20.0, 100.0, 1e4], device=device)
    dy = torch.ones_like(x)
    y, dx = _run(gelu, x, dy, approximate)
    y_exact, dx_exact = _run(gelu_math, x.double(), dy.double(), approximate)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y.double(), y_exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx_exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(device, dtype):
    _skip_unless_runnable(device)
    x, dy = _inputs((40, 60), dtype, device, seed=5)
    _assert_close_to_definition(x.t(), dy.t(), "tanh")  # transposed
    _assert_close_to_definition(x[:, ::3], dy[:, 1::3], "none")  # strided


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)])
def test_empty_launches_nothing(device, shape, monkeypatch):
    _skip_unless_runnable(device)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("an empty tensor must not launch a kernel")

    monkeypatch.setattr(gelu_module, "_gelu_fwd", NoLaunch())
    monkeypatch.setattr(gelu_module, "_gelu_bwd", NoLaunch())
    x = torch.randn(shape, device=device, requires_grad=True)
    y = gelu(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_saves_only_the_input(device):
    """The backward recomputes from x: the output is not kept alive for it."""
    _skip_unless_runnable(device)
    x = torch.randn(10, device=device, requires_grad=True)
    y = gelu(x)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0] is x


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    _skip_unless_runnable(device)
    x = torch.randn(8, device=device)
    with pytest.raises(ValueError, match="approximate must be one of"):
        gelu(x, "fast")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        gelu(torch.arange(8, device=device))
