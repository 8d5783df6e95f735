"""Triton linear cross-entropy (kernels/linear_cross_entropy.py): the rows kernel alone, then the whole op.

The rows kernel (the chunk loop's ``rows_step``: ``cross_entropy_rows_step`` of kernels/linear_cross_entropy.py) is
checked against the plain PyTorch step of the same name, ``chunked_loss.cross_entropy_rows_step``, evaluated in
float64 on the same float32 logits: the loss rows, and the gradient it writes over the logits in place. The op,
``linear_cross_entropy``, is checked as tests/test_layer_norm.py checks LayerNorm: its loss and both gradients
against float64 ``F.cross_entropy(x @ w.T)`` on the very same rounded inputs, with an error at most twice the torch
backend's (the same chunk loop and matmuls, the plain step), plus a few float32 units, and under a per-dtype bound.
Without a GPU the kernel runs in Triton's interpreter, where a program costs milliseconds, so the shapes on "cpu"
are small; the GPT-2-sized checks are marked ``cuda``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import kernels.chunked_loss  # noqa: E402
import kernels.launch  # noqa: E402
from kernels.compile_targets import linear_cross_entropy_targets  # noqa: E402
from kernels.costs import rows_step_bytes  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from kernels.linear_cross_entropy import cross_entropy_rows_step, linear_cross_entropy, rows_per_program  # noqa: E402
from kernels.torch_backend import TorchBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPS = torch.ops.minigpt
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not is_interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available() or is_interpreting(), reason="needs a CUDA GPU (and compiled kernels)")]),
]
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available() or is_interpreting(),
                               reason="needs a CUDA GPU (and compiled kernels)")
REDUCTIONS = ["mean", "sum", "none"]
# Upper bound on the error, relative to the largest exact (float64) value: the logits are made by a matmul in the input
# dtype (on a CPU, rounded to it; on a GPU accumulated in float32), so a few units in its last place.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
FLOOR_ULPS = 16  # float32 units of the largest value allowed beyond twice the torch backend's error


def _cpu_only() -> None:
    if not is_interpreting():
        pytest.skip("the kernels were compiled for the GPU in this process; run with TRITON_INTERPRET=1 for the CPU")


# ----------------------------------------------------------------------------------------------------------------
# The rows kernel alone: loss rows and the in-place gradient


def _rows_inputs(n, V, device="cpu", seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, V, generator=g)).to(device)
    targets = torch.randint(0, V, (n,), generator=g).to(device)
    targets[::5] = ignore_index  # rows 0, 5, 10, ...: ignored
    scale = (0.5 + torch.rand(n, generator=g)).to(device)  # one factor a row, as reduction "none" passes
    return logits, targets, scale


def _check_rows_step(logits, targets, scale, ignore_index=-100):
    """The kernel vs the plain step in float64 on the same logits: loss rows, and (with ``scale``) the gradient."""
    exact_logits = logits.double().clone()
    exact_loss = kernels.chunked_loss.cross_entropy_rows_step(exact_logits, targets, ignore_index,
                                                              None if scale is None else scale.double())
    ours = logits.clone()
    loss = cross_entropy_rows_step(ours, targets, ignore_index, scale)
    assert loss.dtype == torch.float32 and loss.shape == targets.shape
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-6, atol=2e-6, equal_nan=True)
    if scale is None:
        assert torch.equal(ours, logits), "without grad_scale the logits must be left as they were"
    else:
        torch.testing.assert_close(ours.double(), exact_logits, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("tile", [None, 64])  # None: a whole row per tile; 64: several tiles, a partial last one
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "loss"])
@pytest.mark.parametrize("n, V", [(1, 37), (7, 256), (33, 1003)])  # 256 = 4 whole tiles of 64, last tile empty
def test_rows_step_matches_plain_step(monkeypatch, n, V, grad, tile):
    _cpu_only()
    if tile:
        monkeypatch.setattr(kernels.launch, "INTERPRETER_TILE", tile)
    logits, targets, scale = _rows_inputs(n, V, seed=V)
    _check_rows_step(logits, targets, scale if grad else None)


# Under the interpreter a launch takes several whole rows a program (_cross_entropy_row_block) when they fit in
# kernels.launch.INTERPRETER_TILE logits, else one row a program (_cross_entropy_rows_step, the GPU's kernel).
# (tile, V) -> (BLOCK_V, rows a program): (256, 100) -> (128, 2), (1024, 37) -> (64, 16), (128, 64) -> (64, 2)
ROW_BLOCK_CASES = [(256, 100), (1024, 37), (128, 64)]


def test_rows_per_program():
    """One row a program on a GPU whatever the sizes; under the interpreter as many whole rows as fit in the tile
    (the CPU demo's 2048 rows of 257 logits: 128 a program, 16 programs), never many more than there are, and one
    when a row alone fills the tile."""
    for n, V in [(1, 37), (2048, 257), (640, 50257)]:
        assert rows_per_program(n, V, interpreting=False) == 1
    assert kernels.launch.INTERPRETER_TILE == 1 << 16
    assert rows_per_program(2048, 257, interpreting=True) == 128
    assert rows_per_program(7, 257, interpreting=True) == 8  # one program, its last lane past the rows
    assert rows_per_program(640, 50257, interpreting=True) == 1  # 65536 padded logits: the one-row kernel
    assert rows_per_program(640, 1 << 15, interpreting=True) == 2


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "loss"])
@pytest.mark.parametrize("n", [7, 33])  # a ragged last program in every case below
@pytest.mark.parametrize("tile, V", ROW_BLOCK_CASES)
def test_row_block_matches_plain_step(monkeypatch, tile, V, n, grad):
    """Several rows a program, the last program holding fewer rows than its lanes: loss rows and gradient against
    the plain step in float64, as the one-row kernel is checked."""
    _cpu_only()
    monkeypatch.setattr(kernels.launch, "INTERPRETER_TILE", tile)
    rows = rows_per_program(n, V)
    assert rows > 1 and n % rows != 0, "the case must launch the row-block kernel with a ragged last program"
    logits, targets, scale = _rows_inputs(n, V, seed=n + V)
    _check_rows_step(logits, targets, scale if grad else None)


@pytest.mark.parametrize("tile", [None, 32], ids=["row block", "one row"])
def test_rows_step_ignored_rows_and_targets_out_of_range(monkeypatch, tile):
    """Ignored rows: loss 0 and a gradient of exact zeros, also with grad_scale inf ("mean" with every row ignored)
    and for an ignore_index that is a valid class. Out-of-range targets (-1, V, far past V): loss NaN and a NaN
    gradient row (the shared contract), and nothing written outside the row: the buffer's padding stays as it was.
    For both kernels: the interpreter's default tile takes the 6 rows in one program of 8 lanes, a 32-logit tile
    one row a program in two tiles."""
    _cpu_only()
    if tile:
        monkeypatch.setattr(kernels.launch, "INTERPRETER_TILE", tile)
    n, V, pad = 6, 37, 11
    assert (rows_per_program(n, V) > 1) == (tile is None)
    buffer = torch.full((n, V + pad), 123.0)
    buffer[:, :V] = 3 * torch.randn(n, V, generator=torch.Generator().manual_seed(1))
    logits = buffer[:, :V]  # rows V + pad apart: the kernel takes a row stride
    targets = torch.tensor([-100, 4, -1, V, 2**40, V - 1])
    scale = torch.tensor([float("inf"), 1.0, 0.5, 2.0, 1.0, 3.0])
    exact_logits = logits.double().clone()
    exact_loss = kernels.chunked_loss.cross_entropy_rows_step(exact_logits, targets, -100, scale.double())
    loss = cross_entropy_rows_step(logits, targets, -100, scale)
    assert loss[0] == 0 and torch.equal(logits[0], torch.zeros(V)), "an ignored row: loss 0, gradient exactly 0"
    assert loss[2:5].isnan().all() and not loss[[0, 1, 5]].isnan().any()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-6, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(logits.double(), exact_logits, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert logits[2:5].isnan().all() and not logits[[0, 1, 5]].isnan().any()
    assert torch.equal(buffer[:, V:], torch.full((n, pad), 123.0)), "the kernel wrote outside the rows"
    # an ignore_index that is a real class id: those rows are ignored, the others not
    logits, targets, scale = _rows_inputs(7, 37, seed=2, ignore_index=5)
    targets[1] = 5
    _check_rows_step(logits, targets, scale, ignore_index=5)


def test_rows_step_bad_inputs():
    _cpu_only()
    targets = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32"):
        cross_entropy_rows_step(torch.zeros(3, 5, dtype=torch.float64), targets, -100, None)
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_rows_step(torch.zeros(5, 3).T, targets, -100, None)
    with pytest.raises(ValueError, match=r"targets must be \(3,\)"):
        cross_entropy_rows_step(torch.zeros(3, 5), targets[:2], -100, None)
    with pytest.raises(ValueError, match="grad_scale"):
        cross_entropy_rows_step(torch.zeros(3, 5), targets, -100, torch.ones(2))
    assert cross_entropy_rows_step(torch.zeros(0, 5), targets[:0], -100, None).shape == (0,)


def test_rows_step_bytes():
    """The docstring's table: 12 V + 20 bytes a row with the gradient, 4 V + 16 without."""
    assert rows_step_bytes(640, 50257) == 640 * (12 * 50257 + 20)
    assert rows_step_bytes(1, 100, grad=False) == 416


# ----------------------------------------------------------------------------------------------------------------
# The op: loss and both gradients vs float64 F.cross_entropy


def _op_inputs(N, V, C, dtype, device, seed=0, input_major=True, ignored=(3,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(device, dtype)
    w = 0.3 * torch.randn(V, C, generator=g)
    # input-major, as the model stores its Linear weights: (V, C) over (C, V) memory
    w = (w.T.contiguous().T if input_major else w).to(device, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[[i for i in ignored if i < N]] = -100
    return x, w, targets


def _run(fn, x, w, targets, reduction, grad_out):
    """fn's loss and (dx, dw) for the upstream gradient ``grad_out``, on fresh leaf copies of x and w."""
    x, w = (t.detach().clone().requires_grad_() for t in (x, w))
    loss = fn(x, w, targets, reduction=reduction)
    loss.backward(grad_out.to(loss.device, loss.dtype))
    return loss.detach(), x.grad, w.grad


def _exact(x, w, targets, reduction, **kwargs):
    return F.cross_entropy(x @ w.T, targets, reduction=reduction, **kwargs)


def _assert_close_to_definition(x, w, targets, reduction, seed=0):
    """Triton vs torch backend vs float64 on the same inputs: loss, dx, dw (dtype, shape, strides, values)."""
    N = x.shape[0]
    grad_out = torch.randn(N if reduction == "none" else (), generator=torch.Generator().manual_seed(seed))
    ours = _run(linear_cross_entropy, x, w, targets, reduction, grad_out)
    theirs = _run(TorchBackend().linear_cross_entropy, x, w, targets, reduction, grad_out)
    exact = _run(_exact, x.double(), w.double(), targets, reduction, grad_out)
    for name, got, other, want, like in zip(("loss", "dx", "dw"), ours, theirs, exact, (exact[0], x, w)):
        want_dtype = torch.float32 if name == "loss" else like.dtype
        assert got.dtype == want_dtype and got.shape == like.shape, name
        if name == "dw":
            assert got.stride() == w.stride(), "dw must come back in the weight's memory order"
        err = (got.double() - want).abs().max().item() if got.numel() else 0.0
        err_torch = (other.double() - want).abs().max().item() if got.numel() else 0.0
        scale = want.abs().max().item() if got.numel() else 0.0
        floor = FLOOR_ULPS * torch.finfo(torch.float32).eps * scale
        assert err <= 2 * err_torch + floor, f"{name}: error {err:.3g} vs torch backend's {err_torch:.3g}"
        assert err <= TOL[x.dtype] * scale + 1e-12, f"{name}: error {err:.3g} over {TOL[x.dtype]} x {scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N, V, C", [(1, 37, 16), (7, 257, 40), (33, 1003, 40)], ids=str)
def test_matches_float64(device, N, V, C, reduction, dtype):
    """bfloat16 is fine under the interpreter here: the kernel only sees float32 logits, the matmuls are torch's."""
    x, w, targets = _op_inputs(N, V, C, dtype, device, seed=V)
    _assert_close_to_definition(x, w, targets, reduction, seed=N)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_several_chunks(device, monkeypatch, reduction):
    """33 rows in chunks of 10 (the last of 3): dW is summed over the chunks, dX and the loss rows are per chunk."""
    N, V, C = 33, 257, 16
    monkeypatch.setattr(kernels.chunked_loss, "LOGITS_CHUNK_BYTES", 10 * 4 * V)
    assert kernels.chunked_loss.default_chunk_rows(N, V) == 10
    x, w, targets = _op_inputs(N, V, C, torch.float32, device, seed=4, ignored=(0, 10, 32))
    _assert_close_to_definition(x, w, targets, reduction, seed=5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_x_and_row_major_weight(device):
    x, w, targets = _op_inputs(7, 257, 40, torch.float32, device, seed=6, input_major=False)
    assert w.is_contiguous()
    x_t = x.T.contiguous().T  # (N, C) over (C, N) memory
    assert not x_t.is_contiguous()
    _assert_close_to_definition(x_t, w, targets, "mean")
    wide = torch.randn(7, 80, device=device)[:, ::2]  # every other column: row stride 80, column stride 2
    _assert_close_to_definition(wide, w, targets, "none")


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_ignored(device):
    """As F.cross_entropy: "mean" is 0 / 0 = nan, "sum" 0; the gradients are exact zeros, never nan."""
    x, w, targets = _op_inputs(5, 37, 16, torch.float32, device, seed=7)
    targets[:] = -100
    for reduction in REDUCTIONS:
        grad_out = torch.ones(5 if reduction == "none" else ())
        loss, dx, dw = _run(linear_cross_entropy, x, w, targets, reduction, grad_out)
        exact = _exact(x.double(), w.double(), targets, reduction)
        torch.testing.assert_close(loss.double(), exact, equal_nan=True)
        assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw)), reduction


@pytest.mark.parametrize("device", DEVICES)
def test_without_gradients(device):
    """Inputs that need no gradient, or torch.no_grad: the loss alone (no gradient sweep), the same numbers."""
    x, w, targets = _op_inputs(7, 257, 40, torch.float32, device, seed=8)
    for reduction in REDUCTIONS:
        exact = _exact(x.double(), w.double(), targets, reduction)
        torch.testing.assert_close(linear_cross_entropy(x, w, targets, reduction=reduction).double(), exact,
                                   rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            loss = linear_cross_entropy(x.requires_grad_(), w, targets, reduction=reduction)
        x.requires_grad_(False)
        assert not loss.requires_grad
        torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-5)


def test_autocast_casts_like_a_linear_layer():
    """Under autocast the matmuls take bfloat16 x and weight, as an nn.Linear's would; float32 leaves still get
    float32 gradients, equal to those of the same function written with explicit casts."""
    _cpu_only()
    x, w, targets = _op_inputs(7, 257, 40, torch.float32, "cpu", seed=9)
    grad_out = torch.tensor(1.0)

    def under_autocast(x, w, targets, reduction):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(x, w, targets, reduction=reduction)

    def cast(x, w, targets, reduction):
        return linear_cross_entropy(x.bfloat16(), w.bfloat16(), targets, reduction=reduction)

    for got, want in zip(_run(under_autocast, x, w, targets, "mean", grad_out), _run(cast, x, w, targets, "mean",
                                                                                      grad_out)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_out_of_range_target_through_the_op():
    """The custom ops themselves (the public function raises first on a CPU): no crash, a nan loss for that row,
    so a nan mean, and nan gradients: dx's row and every dw element (each sums over all rows)."""
    _cpu_only()
    x, w, targets = _op_inputs(4, 37, 16, torch.float32, "cpu", seed=10)
    targets[1] = 37
    loss = OPS.linear_cross_entropy_loss(x, w, targets, -100, "none")
    assert loss[1].isnan() and not loss[[0, 2, 3]].isnan().any()
    loss, dx, dw = OPS.linear_cross_entropy_fwd(x, w, targets, -100, "mean")
    assert loss.isnan() and dx[1].isnan().all() and not dx[[0, 2, 3]].isnan().any() and dw.isnan().all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(x, w, targets)


def test_bad_inputs():
    _cpu_only()
    x, w, targets = _op_inputs(4, 37, 16, torch.float32, "cpu", seed=11)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        linear_cross_entropy(x.double(), w.double(), targets)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, targets, reduction="max")
    with pytest.raises(ValueError, match="width C"):
        linear_cross_entropy(x, w.T, targets)


def test_op_with_several_rows_a_program(monkeypatch):
    """The whole op (chunk loop, rows step, matmuls) on the row-block kernel, 4 rows a program over 37 rows (the
    last program holds one): loss and both gradients against float64, as good as the torch backend."""
    _cpu_only()
    monkeypatch.setattr(kernels.launch, "INTERPRETER_TILE", 512)
    N, V, C = 37, 100, 16
    assert rows_per_program(N, V) == 4
    x, w, targets = _op_inputs(N, V, C, torch.float32, "cpu", seed=18, ignored=(0, 11, 36))
    for reduction in ("mean", "none"):
        _assert_close_to_definition(x, w, targets, reduction, seed=19)



# ----------------------------------------------------------------------------------------------------------------
# Compile targets: the kernel compiles for real GPUs (no GPU needed), without spilling


def test_compile_targets_are_well_formed():
    """Every target names exactly the kernel's arguments, so a renamed argument fails here."""
    targets = linear_cross_entropy_targets()
    assert {(t["constexprs"]["HAS_GRAD"], bool(t["aligned"])) for t in targets} == {
        (True, True), (True, False), (False, True), (False, False)}
    for t in targets:
        assert set(t["signature"]) | set(t["constexprs"]) == set(t["fn"].arg_names), t["config"]
    blocks = [t for t in targets if t["name"] == "linear_cross_entropy_row_block"]
    assert {t["constexprs"]["HAS_GRAD"] for t in blocks} == {True, False}  # the interpreter's kernel compiles too


def test_compiles_for_sm80_and_sm90_without_spills():
    """``python -m kernels.compile_check --only linear_cross_entropy``, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--only", "linear_cross_entropy", "--arch",
                           "80", "90"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("linear_cross_entropy_rows_step")]
    assert len(rows) == 4 * 2 and {row[-1] for row in rows} == {"ok"}  # 4 configurations x 2 architectures
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("linear_cross_entropy_row_block")]
    assert len(rows) == 2 * 2 and {row[-1] for row in rows} == {"ok"}  # with and without the gradient


# ----------------------------------------------------------------------------------------------------------------
# The custom ops: opcheck, and torch.compile without graph breaks


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake implementation (shapes, dtypes, strides: dw keeps the input-major layout), autograd
    registration and AOTAutograd tracing of the three ops."""
    x, w, targets = _op_inputs(5, 37, 16, torch.float32, device, seed=12, ignored=(2,))
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(OPS.linear_cross_entropy_fwd, (x, w, targets, -100, "mean"))
    torch.library.opcheck(OPS.linear_cross_entropy_loss, (x, w, targets, -100, "none"))
    torch.library.opcheck(OPS.linear_cross_entropy_bwd, (torch.randn(5, device=device), x.detach(), w.detach(),
                                                        targets, -100, "none"))


def _assert_compiled_matches_eager(reduction, device, backend):
    x, w, targets = _op_inputs(7, 257, 40, torch.float32, device, seed=13)

    def loss_fn(x, w, targets, reduction):
        return 2.0 * linear_cross_entropy(x, w, targets, reduction=reduction)  # an op after it: a real graph

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)  # fullgraph: any graph break fails
    grad_out = torch.randn(7 if reduction == "none" else (), generator=torch.Generator().manual_seed(14))
    eager = _run(loss_fn, x, w, targets, reduction, grad_out)
    ours = _run(compiled, x, w, targets, reduction, grad_out)
    tol = dict(rtol=1e-6, atol=1e-6) if backend == "aot_eager" else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(ours, eager):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_matches_eager_on_cpu(reduction):
    _cpu_only()
    _assert_compiled_matches_eager(reduction, "cpu", "aot_eager")


# ----------------------------------------------------------------------------------------------------------------
# GPU only: GPT-2's sizes


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager_on_gpu(reduction, backend):
    _assert_compiled_matches_eager(reduction, "cuda", backend)


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("padded", [False, True], ids=["stride 50257", "stride 50304"])
def test_rows_step_gpt2_vocabulary_on_gpu(padded):
    """One default chunk (640 rows) of GPT-2's vocabulary: 49 whole tiles and a partial one per sweep; in a buffer
    whose rows are 16-element aligned (the vectorized variant) or not."""
    n, V = 640, 50257
    logits, targets, scale = _rows_inputs(n, V, device="cuda", seed=15)
    if padded:
        logits = torch.empty(n, 50304, device="cuda")[:, :V].copy_(logits)
    _check_rows_step(logits, targets, scale)


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpt2_size_bfloat16_on_gpu(reduction):
    """N = 4096 rows (7 chunks of 640 at the default chunk size), V = 50,257, C = 768, bfloat16, input-major
    weight: loss and both gradients against float64."""
    N, V, C = 4096, 50257, 768
    x, w, targets = _op_inputs(N, V, C, torch.bfloat16, "cuda", seed=16, ignored=range(0, N, 97))
    w = (w.float() * (0.02 / 0.3)).to(torch.bfloat16).T.contiguous().T  # GPT-2's init scale, still input-major
    _assert_close_to_definition(x, w, targets, reduction, seed=17)
