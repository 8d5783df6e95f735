r"""The ``linear_cross_entropy`` rows of ``python -m benchmarks.kernels``: what the loss needs that the other ops' rows
do not — three inputs of which one is integer, a scalar output, a float64 definition too big to evaluate whole, and
the question the op exists for, memory.

The op: ``loss = cross_entropy(x @ W^T, targets)``, x (N, C), W (V, C), targets (N,); the output head of a GPT and
its loss. Shapes: N = 16,384 rows (batch 16 x context 1024), V = 50,257 (GPT-2's vocabulary), C = 768 (gpt2-124m)
and 1600 (gpt2-xl). The (N, V) logits are what the fused op avoids: 3.3 GB in float32 at N = 16,384.

Contenders (besides ``triton``, the triton backend's ``linear_cross_entropy``):

    math          the plain formula as minigpt computed its loss before the fused op: logits in the inputs'
                  dtype, cross-entropy in float32 — F.cross_entropy((x @ W.T).float(), targets)
    math_compile  the same under torch.compile(dynamic=True)
    pytorch       what PyTorch ships: F.linear_cross_entropy with LinearCrossEntropyOptions() (its chunked path)
    chunked       our chunked PyTorch: the torch backend's linear_cross_entropy (kernels/torch_backend.py)

``kernels.definitions.linear_cross_entropy_math`` is the same function as ``math`` in float32, but widens 16-bit inputs
to float32 before the matmul, which is not what a bf16 training step ran: so ``math`` is written out here.

Counting: the three matmuls, 2 N C V FLOPs each — the logits (forward), dX and dW (backward):
fwd = 2 N C V, bwd = 4 N C V, fwd+bwd = 6 N C V, the same for every contender. Implementations that make the
gradients during the forward (ours, PyTorch's chunked path: the loss is the graph's last op, so its upstream gradient
is known to be one number) do most of their work in ``fwd`` and almost none in ``bwd``: compare them on ``fwd+bwd``.

Peak memory (``peak_mem_mib``): the most memory the pass needed beyond what was in use before it (the inputs), by
``benchmarks.memory`` — on a GPU from the allocator's counters, on the CPU from the process's peak resident set. For
``bwd`` the forward runs first, unmeasured, but the baseline is taken before it, so what the forward saved counts.

torch is imported inside functions so that importing this module does no work.
"""
from __future__ import annotations

import math

from benchmarks import memory
from benchmarks.ops.interface import InputSet

NAME = "linear_cross_entropy"
CONTENDERS = ("triton", "math", "math_compile", "pytorch", "chunked")
SWEEP = dict(rows=16384, widths=(768, 1600), vocab=50257)  # batch 16 x context 1024; gpt2-124m and gpt2-xl widths
QUICK_SWEEP = dict(rows=96, widths=(64, 128), vocab=1000)
NOTE_WARNINGS = True  # e.g. PyTorch's chunked path falling back to the plain formula: the row says so
IGNORE_EVERY = 64  # every 64th row's target is IGNORE_INDEX (as padding would be): the check covers the mean over
#                    counted rows; the work is the same
DEFINITION_CHUNK_ELEMENTS = 1 << 26  # the float64 definition holds at most this many logits at once (512 MiB)
# A pass a contender cannot run: the bwd timing calls backward again on one retained graph, which PyTorch's chunked
# path refuses unless built with allow_retain_graph=True (one more gradient-sized buffer: not what a user runs)
PASS_STATUS = {("pytorch", "bwd"): "skipped: F.linear_cross_entropy's chunked path refuses the retained graph the "
                                   "bwd timing reuses (its fwd and fwd+bwd are timed)"}
MATH_PLANES = {"math": 4, "math_compile": 2}  # rough (N, V) float32-sized tensors alive at once: logits (in the
#                                               inputs' dtype and float32), log-softmax, its gradient; fewer fused
PYTORCH_MISSING = "skipped: torch {version} has no F.linear_cross_entropy with chunking"


def ignore_index() -> int:
    from kernels.definitions import IGNORE_INDEX

    return IGNORE_INDEX


def cases(quick: bool, options: dict) -> list[tuple]:
    """[(shape, dropout)]: (N, C, V) for each width (``options``: ``widths``, ``rows`` N and ``vocab_size`` V replace
    the sweep's)."""
    sweep = QUICK_SWEEP if quick else SWEEP
    rows, vocab = options.get("rows") or sweep["rows"], options.get("vocab_size") or sweep["vocab"]
    return [((rows, c, vocab), 0.0) for c in options.get("widths") or sweep["widths"]]


def family(shape: tuple, dtype: str, dropout: float) -> str:
    return f"{NAME} N={shape[0]} V={shape[2]} {dtype}"


def size(shape: tuple) -> int:
    return shape[1]


def flops(rows: int, width: int, vocab: int, pass_: str) -> float:
    """Matmul FLOPs: logits 2 N C V (forward), dX = dZ W and dW = dZ^T X 2 N C V each (backward)."""
    from kernels.costs import linear_cross_entropy_flops

    fwd, bwd = linear_cross_entropy_flops(rows, width, vocab)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def counted_work(shape: tuple, elem: int, pass_: str) -> tuple[int | None, float | None]:
    return None, flops(*shape, pass_)


def set_bytes(shape: tuple, elem: int) -> int:
    """Bytes of one input set: x, W and the int64 targets."""
    rows, width, vocab = shape
    return (rows + vocab) * width * elem + 8 * rows


def planned_bytes(shape: tuple, elem: int, contender: str, copies: int) -> int:
    """Rough peak of one contender's row: the inputs and their gradients, and for the plain formula its (N, V)
    planes (the chunked paths hold one chunk of at most a few hundred MiB)."""
    rows, _width, vocab = shape
    chunk = 512 * 2**20
    return copies * (3 * set_bytes(shape, elem) + MATH_PLANES.get(contender, 0) * rows * vocab * 4 + chunk)


def interpreter_elements(shape: tuple) -> int:
    """What the Triton interpreter's cost grows with here: the logits it walks through."""
    return shape[0] * shape[2]


def make_inputs(shape: tuple, dtype, device, copies: int) -> list[InputSet]:
    """x ~ N(0, 1) (a final LayerNorm's output), W ~ N(0, 1/C) (so logits are ~ N(0, 1)), targets uniform over the
    vocabulary with every IGNORE_EVERY-th row ignored; dy None: the loss is a scalar, its upstream gradient 1."""
    import torch

    N, C, V = shape
    sets = []
    for _ in range(copies):
        x = torch.randn(N, C, device=device).to(dtype).requires_grad_()
        weight = (torch.randn(V, C, device=device) / math.sqrt(C)).to(dtype).requires_grad_()
        targets = torch.randint(0, V, (N,), device=device)
        targets[::IGNORE_EVERY] = ignore_index()
        sets.append(InputSet([x, weight, targets], None))
    return sets


def plain_loss(x, weight, targets):
    """The plain formula: the (N, V) logits whole, in the inputs' dtype, then cross-entropy in float32."""
    import torch.nn.functional as F

    return F.cross_entropy((x @ weight.T).float(), targets, ignore_index=ignore_index())  # logits (N, V)


def pytorch_loss():
    """PyTorch's own fused loss as a function of (x, weight, targets), or None where this torch lacks it.

    Newer torch releases ship ``F.linear_cross_entropy`` with ``torch.nn.LinearCrossEntropyOptions`` (its chunked
    path); older ones have neither. Both are looked up, never assumed, so that on an older torch the row says
    what is missing instead of failing.
    """
    import torch
    import torch.nn.functional as F

    fused = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fused is None or options is None:
        return None
    return lambda x, w, t: fused(x, w, t, ignore_index=ignore_index(), options=options())


def contender_fns(dropout: float, triton_backend, compiled: dict) -> tuple[dict, dict]:
    """(name -> function of (x, weight, targets), name -> why it cannot run). ``compiled`` keeps the compiled
    formula across cases (dynamic=True: one compile for every shape)."""
    import torch

    from benchmarks.ops.interface import compiled_formula
    from kernels.torch_backend import TorchBackend

    fns, missing = {"math": plain_loss, "math_compile": compiled_formula(compiled, NAME, plain_loss)}, {}
    pytorch = pytorch_loss()
    if pytorch is not None:
        fns["pytorch"] = pytorch
    else:
        missing["pytorch"] = PYTORCH_MISSING.format(version=torch.__version__)
    backend = TorchBackend()
    fns["chunked"] = lambda x, w, t: backend.linear_cross_entropy(x, w, t, ignore_index())
    if triton_backend is not None:
        fns["triton"] = lambda x, w, t: triton_backend.linear_cross_entropy(x, w, t, ignore_index())
    return fns, missing


def selector(shape: tuple, device):
    """All of it: the float64 definition goes in chunks of rows instead."""
    return lambda t: t


def definition_outputs(inputs: InputSet, select, dropout: float = 0.0):
    """The loss and the gradients of x and W in float64, by autograd of the plain formula over chunks of rows (the
    whole float64 logits would need 6.6 GB at N = 16,384): -> (loss, [dx, dW])."""
    import torch
    import torch.nn.functional as F

    x, weight, targets = inputs.tensors
    x64 = x.detach().double()
    w64 = weight.detach().double().requires_grad_()
    N, V = x.shape[0], weight.shape[0]
    counted = int((targets != ignore_index()).sum())
    rows = max(1, DEFINITION_CHUNK_ELEMENTS // V)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    grads_x = []
    for start in range(0, N, rows):
        chunk = x64[start:start + rows].clone().requires_grad_()
        part = F.cross_entropy(chunk @ w64.T, targets[start:start + rows], ignore_index=ignore_index(),
                               reduction="sum") / counted  # this chunk's share of the mean
        part.backward()  # dW accumulates over the chunks
        total += part.detach()
        grads_x.append(chunk.grad)
    return total, [torch.cat(grads_x), w64.grad]


def pass_peak_bytes(fn, inputs: InputSet, pass_: str, device) -> int:
    """Peak bytes of one pass beyond what was in use before it (``benchmarks.memory``); run after a warm-up (the
    timed runs), so that no first-call setup is counted."""
    import gc

    x, weight, targets = inputs.tensors
    x.grad = weight.grad = None
    gc.collect()
    baseline = memory.current_bytes(device)
    if pass_ == "bwd":
        loss = fn(x, weight, targets)  # outside the window; what it saved is above the baseline, and counts
        with memory.PeakMemory(device, baseline) as peak:
            loss.backward()
    else:
        with memory.PeakMemory(device, baseline) as peak:
            loss = fn(x, weight, targets)
            if pass_ == "fwd+bwd":
                loss.backward()
    del loss
    x.grad = weight.grad = None
    return peak.bytes
