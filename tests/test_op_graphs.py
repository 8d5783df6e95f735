"""What torch.compile sees of our kernels (COURSE.md, Lesson 8; the graphs are in benchmarks/NOTES.md).

Our ops are ``torch.library.custom_op``s: one opaque node each, no graph break. The alternative the lesson weighs,
``torch.library.triton_op`` with ``wrap_triton``, shows each kernel launch to the compiler instead; a bare
``@triton.jit`` launch with no op around it is captured without a break too, while our attention launcher called
bare breaks the graph where its tile tuner times the candidates. The alternatives need real Triton kernels: under
Triton's interpreter (every CPU run of this project) ``wrap_triton`` hands the interpreted kernel back unwrapped,
and compiling such a ``triton_op`` fails. The graphs of real kernels are captured in a subprocess without the
interpreter, where nothing is launched (a CPU cannot run a compiled Triton kernel): the backend records the graph
and stops.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernel modules are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import triton  # noqa: E402

from kernels.attention import causal_attention  # noqa: E402
from kernels.gelu import NUM_WARPS, _block, _gelu_fwd, gelu  # noqa: E402
from kernels.launch import is_interpreting  # noqa: E402
from kernels.layer_norm import layer_norm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.skipif(not is_interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")


def _targets(graph_module) -> list[str]:
    return [str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"]


@needs_interpreter
def test_our_ops_compile_as_one_opaque_node_each_without_a_graph_break():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    w, b = torch.ones(32), torch.zeros(32)
    q = torch.randn(1, 2, 9, 16)
    cases = [
        (lambda t: gelu(t) * 2, (x,), ["minigpt.gelu_fwd.default"]),
        (lambda t, w, b: layer_norm(t, w, b), (x, w, b), ["minigpt.layer_norm_fwd.default"]),
        (lambda q: causal_attention(q, q, q, dropout_p=0.25), (q,),
         ["minigpt.attention_seed.default", "minigpt.attention_fwd.default"]),
    ]
    for fn, inputs, ops in cases:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fn)(*inputs)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
        targets = _targets(explanation.graphs[0])
        assert [t for t in targets if t.startswith("minigpt.")] == ops, targets
        assert not any("triton_kernel_wrapper" in t for t in targets), targets  # the kernels stay inside the ops


@torch.library.triton_op("minigpt_test::gelu_fwd_interpreted", mutates_args=())
def _gelu_triton_op(x: torch.Tensor) -> torch.Tensor:
    """Our GELU forward kernel as a triton_op (tanh form), launched through wrap_triton."""
    y = torch.empty_like(x)
    block = _block(x.numel())
    torch.library.wrap_triton(_gelu_fwd)[(triton.cdiv(x.numel(), block),)](
        x, y, x.numel(), TANH=True, BLOCK=block, num_warps=NUM_WARPS)
    return y


@needs_interpreter
def test_under_the_interpreter_a_triton_op_runs_but_does_not_compile():
    assert torch.library.wrap_triton(_gelu_fwd) is _gelu_fwd  # handed back as it is: nothing for a tracer to see
    x = torch.randn(4, 64)
    assert torch.equal(_gelu_triton_op(x), gelu(x))  # eager: the interpreter runs it
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: _gelu_triton_op(t) * 2, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="data pointer"):  # the interpreter reads a fake tensor's memory
        compiled(x)


# Run without the interpreter, so that triton.jit gives real kernels (JITFunction). Dynamo takes a launch for a
# Triton kernel only on a machine with a Triton device (torch.utils._triton.has_triton); without a GPU it says yes
# here, as it would on one. Each backend records its graph and raises, so nothing is compiled or launched.
GRAPHS_SCRIPT = """
import json
import torch
import torch.utils._triton
import triton
torch.utils._triton.has_triton = lambda: True
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch.library import triton_op, wrap_triton
from kernels.attention import attention_fwd
from kernels.gelu import NUM_WARPS, _block, _gelu_forward, _gelu_fwd, gelu_fwd

class Recorded(Exception):
    pass

def targets(gm):
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        out.append(str(n.target))
        if "triton_kernel_wrapper" in str(n.target):
            out.append("kernel " + kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__)
    return out

def capture(fn, inputs, aot=False):
    torch._dynamo.reset()
    seen = {}
    def dynamo_backend(gm, example_inputs):
        seen["graph"] = targets(gm)
        raise Recorded
    def aot_backend(gm, example_inputs):
        def forward_compiler(fx_graph, inputs):
            seen["graph"] = targets(fx_graph)
            raise Recorded
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler)
    try:
        torch.compile(fn, backend=aot_backend if aot else dynamo_backend, fullgraph=True)(*inputs)
    except Exception as e:
        if "graph" not in seen:  # fullgraph=True: a graph break is an error, its traceback where it happened
            return {"not captured": str(e).splitlines()[0], "in the tuner's timing": "do_bench(" in str(e)}
    return seen["graph"]

@triton_op("minigpt_test::gelu_fwd", mutates_args=())
def gelu_triton_op(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    block = _block(x.numel())
    wrap_triton(_gelu_fwd)[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), TANH=True, BLOCK=block,
                                                              num_warps=NUM_WARPS)
    return y

x = torch.randn(4, 64)
cases = {"custom_op": lambda t: gelu_fwd(t, "tanh") * 2, "triton_op": lambda t: gelu_triton_op(t) * 2,
         "bare launch": lambda t: _gelu_forward(t, True) * 2}
graphs = {f"{name}, {stage}": capture(fn, (x,), stage == "aot") for name, fn in cases.items()
          for stage in ("dynamo", "aot")}
# the attention launcher called bare (the function the custom op wraps), with dropout: float32 has one tile
# candidate, 16-bit inputs three, which the tuner times on the first call
launcher = attention_fwd._init_fn
seed = torch.tensor([1234])
for dtype in (torch.float32, torch.bfloat16):
    q = torch.randn(1, 2, 32, 16, dtype=dtype)
    graphs[f"attention launcher, {dtype}"] = capture(lambda q, s: launcher(q, q, q, 0.25, 0.25, s)[0], (q, seed))
print(json.dumps(graphs))
"""


def test_what_the_compiler_sees_of_real_triton_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MINIGPT_AUTOTUNE"] = "1"  # the tuner on, as on a GPU by default
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", GRAPHS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    graphs = json.loads(proc.stdout.strip().splitlines()[-1])
    kernel = ["triton_kernel_wrapper_functional", "kernel _gelu_fwd"]
    # ours: one opaque node before and after AOTAutograd, which is what inductor is given
    assert graphs["custom_op, dynamo"] == ["minigpt.gelu_fwd.default", "<built-in function mul>"]
    assert graphs["custom_op, aot"] == ["minigpt.gelu_fwd.default", "aten.mul.Tensor"]
    # triton_op: one node for dynamo, opened by AOTAutograd into the allocation and the kernel launch
    assert graphs["triton_op, dynamo"] == ["minigpt_test.gelu_fwd.default", "<built-in function mul>"]
    assert graphs["triton_op, aot"][:1] == ["aten.empty_like.default"]
    assert graphs["triton_op, aot"][1:3] == kernel and graphs["triton_op, aot"][-1] == "aten.mul.Tensor"
    # no op at all: fullgraph=True held, so the launch was captured without a graph break
    assert graphs["bare launch, dynamo"][1:3] == ["triton_kernel_wrapper_mutation", "kernel _gelu_fwd"]
    assert graphs["bare launch, aot"][1:3] == kernel
    # our attention launcher called bare: captured whole, the seed's .item() included, while there is one tile to
    # launch; with several (16-bit inputs), the tuner's timing of them breaks the graph
    attention = ["triton_kernel_wrapper_mutation", "kernel _attention_fwd"]
    assert graphs["attention launcher, torch.float32"][-2:] == attention
    tuned = graphs["attention launcher, torch.bfloat16"]
    assert "not captured" in tuned and tuned["in the tuner's timing"], tuned
