"""What an op's module in ``benchmarks/ops/`` writes, and the two helpers they share.

The kernels benchmark (``benchmarks/kernels.py``) is one harness over one module per op: the harness builds the
cases, checks every contender against float64, times each pass, counts the work, writes and plots for all. An op's
module writes only what is its own — its setup and its contenders:

    NAME                 the op's name stem (``kernels/<NAME>.py``, ``tests/test_<NAME>.py``, the rows' ``op``)
    CONTENDERS           the contenders of its rows, triton first (benchmarks/kernels_report.py's column order)
    PASS_STATUS          (contender, pass) -> the status of a pass that contender cannot run (usually empty)
    cases(dtype, sweep)  the shapes of the sweep: [(shape, dropout), ...]; ``sweep`` holds the sizes and options
    family(shape, dtype, dropout), size(shape)          a plot line per contender, and its x axis
    set_bytes(shape, elem), interpreter_elements(shape), planned_bytes(shape, elem, contender, copies)
    counted_work(shape, elem, pass_) -> (bytes, FLOPs)  the fewest bytes (memory-bound ops) or the FLOPs of a pass
    make_inputs(shape, dtype, device, copies) -> [InputSet, ...]                        random, never zeros
    contender_fns(dropout, triton_backend, compiled) -> (name -> fn, name -> why it cannot run)
    selector(shape, device) -> the part of an output or gradient the float64 definition is evaluated on
    definition_outputs(inputs, select, dropout) -> (output, [gradients]) of the definition, in float64, on that part

and where the op needs them (the harness looks them up):

    fallback(contender, exc, dropout) -> (function, note) to check instead, when a contender cannot run as asked
    pass_peak_bytes(fn, inputs, pass_, device)          the peak memory of a pass: the rows get ``peak_mem_mib``
    NOTE_WARNINGS = True                                a contender's warning goes in its row's note
    skip_reason(contender, device, args) -> str | None  why a contender cannot run here ("skipped: ..."), asked
                                                        before its check (``args``: the command line's options)
    DEFINITIONS = {contender: variant}                  a contender checked against another definition than the
                                                        op's: ``definition_outputs(..., variant=variant)``
    row_fields(shape, dtype, contender, pass_, interpreting) -> dict   columns of the op's own, added to each row
                                                        (the same keys in every row of the op; results files carry
                                                        them); ``interpreting``: Triton runs in its interpreter
    TABLE_FIELDS = (key, ...)                           which of them the printed tables show, after the times
    notes(options, dtypes) -> [line, ...]               printed at the start of a run and kept in its results
                                                        (``meta["notes"]``); the summary prints them again

torch is imported inside functions so that importing these modules does no work.
"""
from __future__ import annotations

from typing import NamedTuple


class InputSet(NamedTuple):
    tensors: list  # the tensors the op takes: leaves that require grad (and the loss's integer targets)
    dy: object  # the upstream gradient a backward pass uses (None for the loss: a scalar, gradient 1)


def forward_backward(fn, inputs: InputSet):
    """One forward and backward; returns the output and the gradients of the inputs that require them (detached)."""
    leaves = [t for t in inputs.tensors if t.requires_grad]
    for t in leaves:
        t.grad = None
    out = fn(*inputs.tensors)
    out.backward(inputs.dy)
    return out.detach(), [t.grad for t in leaves]


def random_leaf(shape, dtype, device, scale: float = 1.0, shift: float = 0.0):
    """N(shift, scale^2) in ``dtype``, requiring grad: an activation or a parameter of an op's inputs."""
    import torch

    return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()


def upstream_gradient(shape, dtype, device):
    """A random ``dy`` for ``out.backward(dy)``."""
    import torch

    return torch.randn(*shape, device=device).to(dtype)


def compiled_formula(compiled: dict, key, formula, *args):
    """``formula`` under torch.compile(dynamic=True: one compile serves every size), created on first use (it
    imports the compiler stack, seconds on a CPU) and kept in ``compiled`` across cases; called with ``args`` after
    the inputs."""
    def run(*tensors):
        if key not in compiled:
            import torch

            compiled[key] = torch.compile(formula, dynamic=True)
        return compiled[key](*tensors, *args)

    return run
