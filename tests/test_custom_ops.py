"""The kernels as PyTorch custom ops (``minigpt::*``): registration checks, and torch.compile without graph breaks.

``torch.library.opcheck`` checks each op's schema, fake (shape-only) implementation, autograd registration and
its tracing by AOTAutograd against the op itself. ``fullgraph=True`` makes torch.compile fail on any graph break,
so a compiled forward + backward that matches eager shows each op is one opaque node of the graph. On a CPU the
kernels run in Triton's interpreter and the compiler backend is ``aot_eager`` (it traces like inductor but runs
the traced graph op by op); on a GPU inductor is checked as well.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import kernels.triton_backend  # noqa: E402,F401  (registers the minigpt:: ops)
from kernels.attention import causal_attention  # noqa: E402
from kernels.gelu import gelu  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from kernels.layer_norm import layer_norm  # noqa: E402
from minigpt import GPTModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not is_interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or is_interpreting(), reason="needs a CUDA GPU (and compiled kernels)")),
]
OPS = torch.ops.minigpt


def _randn(*shape, device, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration, AOTAutograd tracing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_layer_norm(device, dtype):
    torch.manual_seed(0)
    x = _randn(3, 5, 48, device=device, dtype=dtype, requires_grad=True)
    w = _randn(48, device=device, requires_grad=True)  # float32 parameters under 16-bit activations
    b = _randn(48, device=device, requires_grad=True)
    torch.library.opcheck(OPS.layer_norm_fwd, (x, w, b, 1e-5))
    with torch.no_grad():
        _, mean, rstd = OPS.layer_norm_fwd(x, w, b, 1e-5)
    dy = _randn(3, 5, 48, device=device, dtype=dtype)
    torch.library.opcheck(OPS.layer_norm_bwd, (dy, x.detach(), w.detach(), mean, rstd, b.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_opcheck_gelu(device, approximate):
    torch.manual_seed(1)
    x = _randn(4, 37, device=device, requires_grad=True)
    torch.library.opcheck(OPS.gelu_fwd, (x, approximate))
    torch.library.opcheck(OPS.gelu_bwd, (_randn(4, 37, device=device), x.detach(), approximate))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("q_len", [21, 5])  # all 21 positions, or the last 5 of them (Tq < Tk)
def test_opcheck_attention(device, dropout_p, q_len):
    torch.manual_seed(2)
    q = _randn(1, 2, q_len, 16, device=device, requires_grad=True)
    k, v = (_randn(1, 2, 21, 16, device=device, requires_grad=True) for _ in range(2))
    seed = torch.tensor([1234]) if dropout_p > 0.0 else None  # as causal_attention passes it
    torch.library.opcheck(OPS.attention_fwd, (q, k, v, dropout_p, 0.25, seed))
    with torch.no_grad():
        o, lse = OPS.attention_fwd(q, k, v, dropout_p, 0.25, seed)
    do = _randn(1, 2, q_len, 16, device=device)
    torch.library.opcheck(OPS.attention_bwd, (do, q.detach(), k.detach(), v.detach(), o, lse, dropout_p, 0.25, seed))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention_seed(device):
    q = _randn(1, 2, 5, 16, device=device, requires_grad=True)
    k, v = (_randn(1, 2, 21, 16, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(OPS.attention_seed, (q, k, v))
    torch.manual_seed(7)
    first, second = OPS.attention_seed(q, k, v), OPS.attention_seed(q, k, v)
    assert first.dtype == torch.int64 and first.shape == (1,) and first.device.type == "cpu"
    assert not torch.equal(first, second), "two draws gave one seed"
    torch.manual_seed(7)
    assert torch.equal(OPS.attention_seed(q, k, v), first), "torch.manual_seed does not reproduce the seed"


def test_registering_again_on_reimport_is_fine():
    """Reloading a kernel module defines its ops a second time; torch.library replaces them and they still run."""
    device = "cpu" if is_interpreting() else "cuda"
    script = (
        "import importlib, torch\n"
        "import kernels.gelu, kernels.layer_norm, kernels.attention\n"
        "for m in (kernels.gelu, kernels.layer_norm, kernels.attention):\n"
        "    importlib.reload(m)\n"
        f"x = torch.randn(1, 1, 5, 16, device={device!r}, requires_grad=True)\n"
        f"w, b = torch.ones(16, device={device!r}), torch.zeros(16, device={device!r})\n"
        "y = kernels.gelu.gelu(x) + kernels.layer_norm.layer_norm(x, w, b)\n"
        "kernels.attention.causal_attention(y, y, y).sum().backward()\n"
        "assert torch.isfinite(x.grad).all()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if is_interpreting():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): one node per op, the same numbers as eager


def _grads(fn, *inputs, grad_out):
    """fn's output and the gradients of its inputs for the upstream gradient ``grad_out``."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in inputs]


def _assert_compiled_matches_eager(fn, *inputs, seed=0):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(seed)
    grad_out = torch.randn_like(fn(*inputs))
    torch.manual_seed(seed)
    eager = _grads(fn, *inputs, grad_out=grad_out)
    torch.manual_seed(seed)
    ours = _grads(compiled, *inputs, grad_out=grad_out)
    for got, want in zip(ours, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_ops_match_eager_on_cpu():
    if not is_interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    torch.manual_seed(3)
    x = torch.randn(2, 7, 40)
    w, b = 1 + 0.1 * torch.randn(40), 0.1 * torch.randn(40)
    _assert_compiled_matches_eager(lambda x, w, b: layer_norm(x, w, b), x, w, b)
    _assert_compiled_matches_eager(lambda x: gelu(x, "tanh"), x)
    _assert_compiled_matches_eager(lambda x: gelu(x.transpose(0, 1), "none"), x)  # a non-contiguous input
    q, k, v = (torch.randn(2, 2, 19, 16) for _ in range(3))
    _assert_compiled_matches_eager(lambda q, k, v: causal_attention(q, k, v), q, k, v)
    # with dropout: the seed op draws in the compiled graph from the same generator, so eager's mask
    _assert_compiled_matches_eager(lambda q, k, v: causal_attention(q, k, v, dropout_p=0.3), q, k, v, seed=4)
    # the last 4 queries against all 19 keys: the fake rules give q's shape to the output, k's and v's to their
    # gradients
    _assert_compiled_matches_eager(lambda q, k, v: causal_attention(q[:, :, -4:], k, v), q, k, v)


def test_compiled_dropout_draws_a_new_seed_every_call():
    if not is_interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: causal_attention(q, q, q, dropout_p=0.5), fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 1, 16, 16)
    torch.manual_seed(5)
    first, second = compiled(q), compiled(q)
    assert not torch.equal(first, second), "the compiled graph reused one dropout seed"
    torch.manual_seed(5)
    assert torch.equal(compiled(q), first), "torch.manual_seed no longer reproduces the compiled run"


# Compiled by inductor on a machine without a C++ compiler: the script runs in a subprocess whose PATH holds links
# to every program on ours except the compilers, with CC and CXX unset. It first checks that inductor finds no
# compiler (torch._inductor.cpp_builder tries $CXX, else g++ on the PATH, and installs one only when
# TORCH_INDUCTOR_INSTALL_GXX is set), and last that a random op of torch's own in a graph does fail there: the
# environment is one where the dropout seed's draw would fail if inductor compiled it. The inductor cache is a
# fresh folder, so that no kernel built earlier is reused.
NO_CXX_SCRIPT = """
import sys
import torch
from torch._inductor import cpp_builder, exc
try:
    found = cpp_builder.get_cpp_compiler()
except exc.InvalidCxxCompiler:
    found = None
assert found is None, f"inductor still finds the C++ compiler {found}"

import kernels.triton_backend
from kernels.attention import causal_attention

device = sys.argv[1]
torch.manual_seed(0)
q, k, v, grad_out = (torch.randn(1, 2, 16, 16, device=device) for _ in range(4))


def run(fn):
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in inputs]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


attend = lambda q, k, v: causal_attention(q, k, v, dropout_p=0.5)
compiled = torch.compile(attend, fullgraph=True, backend="inductor")
torch.manual_seed(1)
first, second = run(compiled), run(compiled)
torch.manual_seed(1)
again = run(compiled)
torch.manual_seed(1)
eager = run(attend)
assert not torch.equal(first[0], second[0]), "two compiled calls drew one dropout seed"
assert same(again, first), "torch.manual_seed does not reproduce the compiled run"
assert same(eager, first), "the compiled run is not eager mode's with the same seed"

try:
    torch.compile(lambda: torch.randint(0, 9, (1,)), backend="inductor")()
except Exception as e:
    assert "InvalidCxxCompiler" in f"{type(e).__name__}: {e}", e
else:
    raise AssertionError("inductor compiled a CPU random op without a C++ compiler: the test proves nothing here")
print("ok")
"""


def _path_without(compiler, folder: Path) -> str:
    """A PATH of one folder: links to the programs of this PATH whose names ``compiler`` does not match."""
    folder.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            program = os.path.join(directory, name)
            if compiler.fullmatch(name) or (folder / name).exists() or not os.access(program, os.X_OK):
                continue
            (folder / name).symlink_to(program)
    return str(folder)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_dropout_runs_without_a_cxx_compiler(device, tmp_path):
    if device == "cpu":  # the interpreter needs no compiler at all
        compiler = re.compile(r"(.*-)?(g\+\+|c\+\+|clang\+\+|gcc|cc|clang|cpp)(-[0-9.]+)?")
    else:  # Triton builds its small C launcher module with gcc or clang: a GPU machine needs a C compiler anyway
        compiler = re.compile(r"(.*-)?(g\+\+|c\+\+|clang\+\+)(-[0-9.]+)?")
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "TORCH_INDUCTOR_INSTALL_GXX")}
    env |= dict(PATH=_path_without(compiler, tmp_path / "bin"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", NO_CXX_SCRIPT, device], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


# The model of test_model_kernels.py: head_dim 16, T=24 not a multiple of the interpreter's blocks
CFG = dict(vocab_size=61, context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


def _model_logits_and_grads(forward, model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits = forward(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_matches_eager(device):
    torch.manual_seed(6)
    model = GPTModel(CFG, kernels="triton").to(device)
    idx = torch.randint(0, CFG["vocab_size"], (2, CFG["context_length"]), device=device)
    targets = torch.randint(0, CFG["vocab_size"], (2, CFG["context_length"]), device=device)
    eager_logits, eager_grads = _model_logits_and_grads(model, model, idx, targets)
    backends = ["aot_eager"] + (["inductor"] if device == "cuda" else [])
    for backend in backends:
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        logits, grads = _model_logits_and_grads(compiled, model, idx, targets)
        # aot_eager runs the same ops; inductor fuses the rest of the model (matmul epilogues, adds) its own way
        tol = dict(rtol=1e-5, atol=1e-6) if backend == "aot_eager" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits, eager_logits, **tol, msg=backend)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], **tol, msg=f"{backend} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_with_dropout_matches_eager(device):
    """Training mode with dropout: each layer's attention draws its own seed in the compiled graph, in eager mode's
    order and from the same generator as nn.Dropout, so aot_eager (which runs the graph's ops as they are) gives
    eager mode's logits and gradients with the same torch.manual_seed; a second step draws new masks."""
    torch.manual_seed(6)
    model = GPTModel(CFG | dict(drop_rate=0.2), kernels="triton").to(device).train()
    idx = torch.randint(0, CFG["vocab_size"], (2, CFG["context_length"]), device=device)
    targets = torch.randint(0, CFG["vocab_size"], (2, CFG["context_length"]), device=device)
    torch.manual_seed(7)
    eager_logits, eager_grads = _model_logits_and_grads(model, model, idx, targets)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    logits, grads = _model_logits_and_grads(compiled, model, idx, targets)
    next_logits, _ = _model_logits_and_grads(compiled, model, idx, targets)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(next_logits, logits), "the second compiled step reused the first one's dropout masks"
