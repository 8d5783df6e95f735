"""The loss op of the torch backend (kernels/chunked_loss.py): the formula, the chunked path, and their autograd.

The measure: ``linear_cross_entropy_math`` is checked against F.cross_entropy in float64; the chunked path against
the math in float64 (loss and both gradients, every reduction, ignored rows, chunk sizes that do and do not divide
the rows) to float64 rounding; half-precision inputs against the float64 answer with a tolerance per dtype. Then
what the chunks are for: no tensor as large as the logits is ever made, the weight is never copied, and the matmul
work is the plain formula's. The Triton kernel's own tests are tests/test_linear_cross_entropy_triton.py.
"""
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels.chunked_loss as chunked_loss
from kernels.chunked_loss import chunked_linear_cross_entropy, cross_entropy_rows_step, default_chunk_rows
from kernels.definitions import REDUCTIONS, linear_cross_entropy_math

torch_ops = kernels.get_backend("torch")


def make_inputs(N=37, C=16, V=257, dtype=torch.float64, ignored="some", seed=0):
    """x (N, C) not contiguous, weight (V, C) stored input-major as the model's, targets (N,) with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2 * C, generator=g, dtype=torch.float64)[:, ::2].to(dtype)  # every other column: strided
    weight = (0.3 * torch.randn(C, V, generator=g, dtype=torch.float64)).to(dtype).t()  # (V, C) in (C, V) memory
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored == "some":
        targets[::4] = -100
    elif ignored == "all":
        targets[:] = -100
    return x.requires_grad_(), weight.requires_grad_(), targets


def loss_and_grads(fn, x, weight, targets, reduction, upstream=None):
    """fn's loss and the gradients of sum(upstream * loss) for x and weight. upstream: by default a different factor
    for each row of "none", and 0.5 for a scalar loss — so the backward's scaling by the upstream gradient is
    tested too."""
    loss = fn(x, weight, targets, reduction=reduction)
    if upstream is None:
        upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    gx, gw = torch.autograd.grad((loss * upstream).sum(), (x, weight))
    return loss, gx, gw


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
def test_math_is_f_cross_entropy_in_float64(reduction, ignored):
    x, w, t = make_inputs(ignored=ignored)
    ours = loss_and_grads(linear_cross_entropy_math, x, w, t, reduction)
    theirs = loss_and_grads(lambda x, w, t, reduction: F.cross_entropy(x @ w.T, t, reduction=reduction),
                            x, w, t, reduction)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
    if ignored == "all" and reduction == "mean":  # 0 / 0, as F.cross_entropy; the gradients are zeros
        assert ours[0].isnan() and not ours[1].any() and not ours[2].any()


def test_math_with_an_ignore_index_inside_the_vocabulary():
    x, w, t = make_inputs(ignored="none")
    t[:5] = 3
    ours = linear_cross_entropy_math(x, w, t, ignore_index=3)
    torch.testing.assert_close(ours, F.cross_entropy(x @ w.T, t, ignore_index=3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 64])  # 5 does not divide 37 rows; 64 is more than there are
@pytest.mark.parametrize("V", [257, 1003])
def test_chunks_equal_the_math_in_float64(reduction, ignored, chunk_rows, V):
    x, w, t = make_inputs(V=V, ignored=ignored)

    def chunked(x, w, t, reduction):
        return chunked_linear_cross_entropy(x, w, t, reduction=reduction, chunk_rows=chunk_rows)

    for a, b in zip(loss_and_grads(chunked, x, w, t, reduction),
                    loss_and_grads(linear_cross_entropy_math, x, w, t, reduction)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_gradients_keep_the_parameters_layout_and_the_weight_is_never_copied():
    x, w, t = make_inputs(V=1003)
    w_storage = w.untyped_storage().data_ptr()
    touched = []  # every op that reads the weight's memory

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
            if any(a.untyped_storage().data_ptr() == w_storage for a in flat):
                touched.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        loss = torch_ops.linear_cross_entropy(x, w, t)
        gx, gw = torch.autograd.grad(loss, (x, w))
    assert touched and not {"clone", "_to_copy", "copy_", "contiguous"} & set(touched), touched
    assert gw.shape == w.shape and gw.stride() == w.stride()  # input-major, as the parameter
    assert gx.shape == x.shape


class LiveBytes(TorchDispatchMode):
    """Peak bytes held by the tensors ops make while it is on — a storage counts while any tensor made on it lives —
    and the largest single tensor. (The CPU allocator keeps no max_memory_allocated; this sees every op's output.)"""

    def __init__(self):
        super().__init__()
        self.holders, self.live, self.peak, self.largest = {}, 0, 0, 0

    def _release(self, ptr, nbytes):
        self.holders[ptr] -= 1
        if self.holders[ptr] == 0:
            del self.holders[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                storage = o.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                self.largest = max(self.largest, o.numel() * o.element_size())
                if ptr not in self.holders:
                    self.holders[ptr] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.holders[ptr] += 1
                weakref.finalize(o, self._release, ptr, nbytes)
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_chunk_of_logits_at_a_time(reduction, monkeypatch):
    N, C, V, rows = 256, 8, 1003, 16  # C < rows: the (V, C) weight gradient is smaller than one chunk's logits
    monkeypatch.setattr(chunked_loss, "LOGITS_CHUNK_BYTES", rows * V * 4)  # the default rule, at a small budget
    assert default_chunk_rows(N, V) == rows
    x, w, t = make_inputs(N=N, C=C, V=V, dtype=torch.float32)
    upstream = torch.rand(N) if reduction == "none" else torch.tensor(1.0)

    def measure(fn):
        with LiveBytes() as rec:
            loss_and_grads(fn, x, w, t, reduction, upstream)
        return rec

    chunked, plain = measure(torch_ops.linear_cross_entropy), measure(linear_cross_entropy_math)
    assert chunked.largest <= rows * V * 4
    # one chunk's logits, the gradients twice (as made, then times the upstream gradient), a few floats per row;
    # a second chunk alive would add rows * V * 4 = 64 kB to the 145 kB
    assert chunked.peak <= rows * V * 4 + 2 * (V * C * 4 + N * C * 4) + 16 * N
    assert plain.largest >= N * V * 4 and plain.peak > 3 * N * V * 4  # the instrument does see the full logits


class MatmulFlops(TorchDispatchMode):
    """Counts 2 m k n FLOPs per matrix product (torch's FlopCounterMode skips the in-place addmm_)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[:2] if name == "mm" else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name in ("bmm", "baddbmm", "addmv", "mv", "dot"):
            raise AssertionError(f"MatmulFlops does not count {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction, matmuls", [("mean", 3), ("sum", 3), ("none", 4)])
def test_the_matmul_work_is_the_plain_formulas(reduction, matmuls):
    # mean / sum: logits, dx, dweight once each, the gradients made in the forward; none: the logits again in the
    # backward, where each row's upstream gradient is known
    N, C, V = 64, 16, 257
    x, w, t = make_inputs(N=N, C=C, V=V, dtype=torch.float32)
    with MatmulFlops() as counter:
        loss_and_grads(lambda *a, **k: chunked_linear_cross_entropy(*a, **k, chunk_rows=10), x, w, t, reduction)
    assert counter.flops == matmuls * 2 * N * V * C


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_inputs_against_float64(dtype, tol, reduction):
    x64, w64, t = make_inputs(N=24, C=32, V=300)
    x = x64.detach().to(dtype).requires_grad_()
    w = w64.detach().to(dtype).requires_grad_()
    # the float64 definition gets the very same rounded inputs: what is measured is the op's own error
    exact = loss_and_grads(linear_cross_entropy_math, x.detach().double().requires_grad_(),
                         w.detach().double().requires_grad_(), t, reduction)
    ours = loss_and_grads(lambda *a, **k: chunked_linear_cross_entropy(*a, **k, chunk_rows=7), x, w, t, reduction)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    for a, b in zip(ours, exact):
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= tol * scale, (a, b)


def test_under_autocast_the_loss_is_float32_and_parameters_get_float32_gradients():
    x64, w64, t = make_inputs(N=24, C=32, V=300)
    x, w = x64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gx, gw = loss_and_grads(torch_ops.linear_cross_entropy, x, w, t, "mean")
    assert loss.dtype == gx.dtype == gw.dtype == torch.float32
    exact = loss_and_grads(linear_cross_entropy_math, x64, w64, t, "mean")
    for a, b in zip((loss, gx, gw), exact):
        assert (a.double() - b).abs().max().item() <= 3e-2 * b.abs().max().item()


def test_without_gradients_only_the_loss_is_computed():
    x, w, t = make_inputs(N=64, C=16, V=257, dtype=torch.float32)
    with torch.no_grad(), MatmulFlops() as counter:
        loss = torch_ops.linear_cross_entropy(x, w, t)
    assert not loss.requires_grad
    assert counter.flops == 2 * 64 * 257 * 16  # the logits' matmul alone
    torch.testing.assert_close(loss, linear_cross_entropy_math(x, w, t).detach())


def test_an_unchecked_target_outside_the_vocabulary_is_nan_and_reads_nothing_outside():
    # what a GPU does without MINIGPT_DEBUG_CHECKS=1 (on the CPU the backend's check raises first, below)
    logits = torch.randn(4, 10, dtype=torch.float64)
    targets = torch.tensor([3, 10, -7, -100])
    loss = cross_entropy_rows_step(logits, targets, -100, torch.ones(4, dtype=torch.float64))
    assert loss[0].isfinite() and loss[1].isnan() and loss[2].isnan() and loss[3] == 0
    assert logits[0].isfinite().all() and logits[1:3].isnan().all() and not logits[3].any()


def test_default_chunk_rows():
    assert default_chunk_rows(16 * 1024, 50257) == 640  # 128 MiB / (4 * 50257) = 667, in whole 64-row tiles
    assert default_chunk_rows(16 * 1024, 257) == 16 * 1024  # a small vocabulary: all rows in one chunk
    assert default_chunk_rows(3, 50257) == 3
    assert default_chunk_rows(0, 50257) == 1  # an empty batch still makes a valid range step
    assert default_chunk_rows(10, 10 ** 9) == 1  # a chunk is at least one row


def test_an_empty_batch_is_nan_like_f_cross_entropy():
    x, w, t = make_inputs(N=0)
    assert torch_ops.linear_cross_entropy(x, w, t).isnan()
    assert torch_ops.linear_cross_entropy(x, w, t, reduction="sum") == 0


@pytest.mark.parametrize("change, error, match", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(x=torch.randn(2, 3, 16)), ValueError, "flatten the batch first"),
    (dict(weight=torch.randn(16, 257)), ValueError, "not its transpose"),
    (dict(targets=torch.rand(37)), TypeError, "not probabilities"),
    (dict(targets=torch.zeros(37, dtype=torch.int32)), TypeError, r"targets.long\(\)"),
    (dict(targets=torch.zeros(36, dtype=torch.long)), ValueError, "one per row of x"),
    (dict(weight=torch.randn(257, 16, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(x=torch.zeros(37, 16, dtype=torch.long), weight=torch.zeros(257, 16, dtype=torch.long)), TypeError,
     "floating point"),
    (dict(targets=torch.full((37,), 257)), ValueError, r"target 257 \(row 0\) is outside the vocabulary \[0, 257\)"),
    (dict(targets=torch.full((37,), -1)), ValueError, "is not ignore_index = -100"),
])
def test_bad_input_is_one_line_that_names_the_fix(change, error, match):
    x, w, t = make_inputs(dtype=torch.float32, ignored="none")
    inputs = dict(x=x, weight=w, targets=t, reduction="mean") | change
    with pytest.raises(error, match=match) as info:
        torch_ops.linear_cross_entropy(**inputs)
    assert "\n" not in str(info.value)
