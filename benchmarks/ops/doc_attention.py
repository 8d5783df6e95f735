r"""The ``doc_attention`` rows of ``python -m benchmarks.kernels``: causal attention over packed documents — a window
of T tokens holding several documents, where a query sees a key only if both are in the same document and the key
is not after it (``causal_attention(q, k, v, doc_ids=...)``, ``doc_ids`` (B, T): the document of each position).

Shapes: (B, H, T, D, L) — the attention sweep's batch and first head shape (B = 8, 12 heads of 64), T = 1024 and
4096, and documents of fixed length L = 128, 256 and 512: each window holds T / L documents of L tokens (when L does
not divide T the last document is shorter), the same layout in every row of the batch. The quick sweep: one row of
two heads of 32, T = 64 and 128, documents of 16 and 32. ``--seq-lens`` replaces T, ``--doc-lens`` L. No dropout
rows (``--dropout`` adds none here).

Contenders:

    triton         ours with documents: kernels/attention.py's causal_attention(q, k, v, doc_ids=doc_ids), which
                   skips the key tiles no query of a tile can see (its document bounds are computed in the call)
    flex           torch.nn.attention.flex_attention under torch.compile, with a block mask from
                   create_block_mask for causal & same-document (BLOCK_SIZE 128, built once per input set, outside
                   the timed region); skipped where FlexAttention is missing or has no backward (the CPU), and under
                   --no-compile
    sdpa_mask      F.scaled_dot_product_attention with the dense boolean (B, 1, T, T) mask causal & same-document
                   (built once per input set, outside the timed region), PyTorch's default dispatch
    triton_causal  our plain causal kernel, no documents: the speed baseline. It computes a different function (every
                   query sees every earlier key of the window), so it is checked against the plain causal definition
                   in float64, not the documents' one; its time is what packing without a document mask costs

Counting: the work actually needed — only the (query, key) pairs a query may see: L (L + 1) / 2 per document of L
tokens, each pair costing what it costs in the attention rows (``kernels.costs.causal_attention_flops``: two D-long
dot products forward, 4 D FLOPs; five backward, 10 D): fwd = 4 D B H sum_docs L (L + 1) / 2, bwd = 2.5 fwd. The same
count for every contender, so TFLOP/s is useful work and ``triton_speedup`` over ``triton_causal`` is the gain
documents give.

Tiles (extra columns of every row, from ``row_fields``): how many (query tile, key tile) pairs our kernel computes
per (batch, head) window with these documents, ``tiles_visited``, against the plain causal kernel at the same T,
``tiles_causal``, summed over the kernels of the pass (fwd: the forward; bwd: dK/dV and dQ; fwd+bwd: all three);
``tiles`` gives each kernel's pair and ``tile_sizes`` the tiles counted with: on a GPU the default tiles for the
row's dtype and head dim (the tile tuner may pick others: the run's ``attention_tiles``), in the interpreter the
tiles it runs. The counts are ``kernels.tiled.tiles_visited``, which mirrors the kernels' loop bounds. ``notes``
gives the same counts for the full sweep's shapes with the GPU's default tiles, in every run (also --quick on a CPU).

torch is imported inside functions so that importing this module does no work.
"""
from __future__ import annotations

import functools
import math
import warnings

from benchmarks.ops import attention
from benchmarks.ops.interface import InputSet, forward_backward, random_leaf, upstream_gradient

NAME = "doc_attention"
CONTENDERS = ("triton", "flex", "sdpa_mask", "triton_causal")
PASS_STATUS: dict = {}
DEFINITIONS = {"triton_causal": "causal"}  # contender -> the definition it is checked against (default: documents)
TABLE_FIELDS = ("tiles",)  # of row_fields: what the printed tables show
SWEEP = dict(batch=attention.SWEEP["batch"], heads=attention.SWEEP["heads"][0], seq_lens=(1024, 4096),
             doc_lens=(128, 256, 512))
QUICK_SWEEP = dict(batch=1, heads=(2, 32), seq_lens=(64, 128), doc_lens=(16, 32))
FLEX_BLOCK = 128  # create_block_mask's BLOCK_SIZE: FlexAttention's default tile
KERNELS = {"fwd": ("fwd",), "bwd": ("dkdv", "dq"), "fwd+bwd": ("fwd", "dkdv", "dq")}  # our kernels in each pass


# ----------------------------------------------------------------------------------------------------------------
# The cases and their documents


def cases(quick: bool, options: dict) -> list[tuple]:
    """[(shape, dropout)]: (B, H, T, D, L) for each sequence length T and document length L, in the order given
    (``options``: ``seq_lens`` and ``doc_lens`` replace the sweep's); documents longer than T are left out."""
    sweep = QUICK_SWEEP if quick else SWEEP
    (H, D), B = sweep["heads"], sweep["batch"]
    seq_lens = options.get("seq_lens") or sweep["seq_lens"]
    doc_lens = options.get("doc_lens") or sweep["doc_lens"]
    return [((B, H, T, D, L), 0.0) for T in seq_lens for L in doc_lens if L <= T]


def doc_lengths(T: int, L: int) -> list[int]:
    """One window's documents: T // L of L tokens, then the remainder (if any) as a shorter last one."""
    return [L] * (T // L) + ([T % L] if T % L else [])


def window_doc_ids(T: int, L: int):
    """(T,) int64 numpy array: 0, 0, ..., 1, 1, ... — the document of each position."""
    import numpy as np

    lengths = doc_lengths(T, L)
    return np.repeat(np.arange(len(lengths)), lengths)


def family(shape: tuple, dtype: str, dropout: float) -> str:
    B, H, _T, D, L = shape
    return f"{NAME} B{B} H{H} D{D} docs of {L} {dtype}"


def size(shape: tuple) -> int:
    return shape[2]


# ----------------------------------------------------------------------------------------------------------------
# What is counted


def allowed_pairs(T: int, L: int) -> int:
    """(query, key) pairs one window's queries may see: L (L + 1) / 2 per document of L tokens."""
    return sum(n * (n + 1) // 2 for n in doc_lengths(T, L))


def pair_flops(D: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per (query, key) pair, the attention rows' convention: kernels.costs counts
    T * T / 2 pairs for causal attention, so a pair costs its total divided by that (T cancels; T = 2 here)."""
    from kernels.costs import causal_attention_flops

    fwd, bwd = causal_attention_flops(1, 1, 2, D)
    return fwd / 2, bwd / 2


def doc_attention_flops(B: int, H: int, T: int, D: int, L: int, pass_: str) -> float:
    """FLOPs of the pairs the documents allow: fwd = 4 D per pair, bwd = 10 D per pair (2.5 fwd)."""
    fwd, bwd = (B * H * allowed_pairs(T, L) * f for f in pair_flops(D))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def counted_work(shape: tuple, elem: int, pass_: str) -> tuple[int | None, float | None]:
    return None, doc_attention_flops(*shape, pass_)


def set_bytes(shape: tuple, elem: int) -> int:
    """q, k, v, dy and the int64 doc_ids."""
    B, H, T, D, _L = shape
    return 4 * B * H * T * D * elem + 8 * B * T


def interpreter_elements(shape: tuple) -> int:
    return math.prod(shape[:4])


def planned_bytes(shape: tuple, elem: int, contender: str, copies: int) -> int:
    """Rough peak of a row: inputs, output and gradients (about 3 input sets); sdpa_mask adds its (B, 1, T, T)
    boolean mask and the additive bias of the inputs' dtype PyTorch turns it into. (Should the dispatch fall back
    to the plain formula, its (B, H, T, T) planes come on top: a row that then runs out of memory says so.)"""
    B, _H, T, _D, _L = shape
    extra = B * T * T * (1 + elem) if contender == "sdpa_mask" else 0
    return (3 * set_bytes(shape, elem) + extra) * copies


# ----------------------------------------------------------------------------------------------------------------
# Tiles our kernels visit


@functools.lru_cache(maxsize=None)
def tile_counts(kernel: str, T: int, L: int | None, block_m: int, block_n: int) -> int:
    """Tiles ``kernel`` visits in one (T, T) window with documents of L (None: the plain causal kernel)."""
    from kernels import tiled

    return tiled.tiles_visited(kernel, T, T, block_m, block_n, None if L is None else window_doc_ids(T, L))


def kernel_tiles(dtype: str, D: int, T: int, interpreting: bool) -> dict:
    """kernel -> (BLOCK_M, BLOCK_N): a GPU's default tiles for ``dtype`` and head dim ``D``, or the interpreter's."""
    from benchmarks.common import torch_dtype
    from kernels.attention_tiles import tiles_for

    candidates = tiles_for(torch_dtype(dtype), D, T, T, interpreting=interpreting)
    return {kernel: tuple(candidates[kernel][0][:2]) for kernel in ("fwd", "dkdv", "dq")}


def tile_fields(shape: tuple, dtype: str, pass_: str, interpreting: bool) -> dict:
    """The tile columns of a row (the same in every contender's row of a case and pass)."""
    _B, _H, T, D, L = shape
    tiles = kernel_tiles(dtype, D, T, interpreting)
    kernels = KERNELS[pass_]
    counts = {k: (tile_counts(k, T, L, *tiles[k]), tile_counts(k, T, None, *tiles[k])) for k in kernels}
    visited, causal = (sum(c[i] for c in counts.values()) for i in (0, 1))
    where = "interpreter" if interpreting else f"GPU defaults, {dtype} D={D}"
    return dict(tiles_visited=visited, tiles_causal=causal, tiles_ratio=round(visited / causal, 4),
                tiles=f"{visited}/{causal} ({visited / causal:.3f}): "
                      + ", ".join(f"{k} {v}/{c}" for k, (v, c) in counts.items()),
                tile_sizes=", ".join(f"{k} {m}x{n}" for k, (m, n) in tiles.items() if k in kernels) + f" ({where})")


def row_fields(shape: tuple, dtype: str, contender: str, pass_: str, interpreting: bool) -> dict:
    """Our kernel's tiles for the case (every contender's row carries them: they describe the case, and need no
    Triton: the counts come from the kernels' loop bounds in kernels/tiled.py)."""
    return tile_fields(shape, dtype, pass_, interpreting)


def notes(options: dict, dtypes: list[str]) -> list[str]:
    """The full sweep's tile counts with a GPU's default tiles (whatever the run's own sizes): per dtype, T and L,
    each kernel's tiles visited with documents of the plain causal kernel's, and their ratio."""
    from benchmarks.results import format_table

    (_H, D) = SWEEP["heads"]
    lines = []
    for dtype in dtypes:
        rows = []
        for T in SWEEP["seq_lens"]:
            tiles = kernel_tiles(dtype, D, T, interpreting=False)
            for L in SWEEP["doc_lens"]:
                counts = [(tile_counts(k, T, L, *tiles[k]), tile_counts(k, T, None, *tiles[k])) for k in tiles]
                rows.append([T, L, *(f"{v}/{c} ({v / c:.3f})" for v, c in counts)])
        sizes = ", ".join(f"{k} {m}x{n}" for k, (m, n) in kernel_tiles(dtype, D, SWEEP["seq_lens"][-1], False).items())
        lines += [f"{NAME}: tiles visited per window with documents / the plain causal kernel's, a GPU's default "
                  f"tiles ({dtype}, D={D}: {sizes})"]
        lines += format_table(["T", "doc len", "fwd", "dkdv", "dq"], rows, right={0, 1, 2, 3, 4}).splitlines()
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Inputs, contenders and the definition


def make_inputs(shape: tuple, dtype, device, copies: int) -> list[InputSet]:
    """q, k, v ~ N(0, 1) and doc_ids (B, T), the case's documents in every row; the sets share one doc_ids (the
    masks built from it are built once)."""
    import torch

    B, H, T, D, L = shape
    doc_ids = torch.from_numpy(window_doc_ids(T, L)).to(device)[None].expand(B, T).contiguous()
    return [InputSet([*(random_leaf((B, H, T, D), dtype, device) for _ in range(3)), doc_ids],
                     upstream_gradient((B, H, T, D), dtype, device)) for _ in range(copies)]


class MaskCache:
    """Masks built from a doc_ids tensor once, kept while the case runs (keyed by the tensor itself)."""

    def __init__(self, build):
        self.build, self.kept = build, {}

    def __call__(self, doc_ids, T: int):
        key = (id(doc_ids), T)
        if key not in self.kept:  # the tensor is kept with its mask: its id is not reused meanwhile
            self.kept[key] = (doc_ids, self.build(doc_ids, T))
        return self.kept[key][1]


def dense_mask(doc_ids, T: int):
    """(B, 1, T, T) bool, True where query i may see key j: j <= i and the same document."""
    from kernels.definitions import future_mask, same_document

    return (~future_mask(T, T, doc_ids.device) & same_document(doc_ids, T))[:, None]


def flex_block_mask(doc_ids, T: int):
    """FlexAttention's block mask for causal & same-document attention over ``doc_ids`` (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(causal_same_document, doc_ids.shape[0], None, T, T, device=doc_ids.device,
                             BLOCK_SIZE=FLEX_BLOCK)


def flex_unavailable() -> str | None:
    """Why FlexAttention cannot be a contender with this torch, or None."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        import torch

        return f"skipped: torch {torch.__version__} has no FlexAttention ({exc})"
    return None


def flex_contender(compiled: dict | None):
    """fn(q, k, v, doc_ids): flex_attention with the documents' block mask; compiled (once, kept in ``compiled``,
    static shapes: a compile per T) or, with ``compiled`` None, eager (the unfused reference: for tests only)."""
    blocks = MaskCache(flex_block_mask)

    def run(q, k, v, doc_ids):
        from torch.nn.attention.flex_attention import flex_attention

        attend = flex_attention
        if compiled is not None:
            if (NAME, "flex") not in compiled:
                import torch

                compiled[NAME, "flex"] = torch.compile(flex_attention, dynamic=False)
            attend = compiled[NAME, "flex"]
        return attend(q, k, v, block_mask=blocks(doc_ids, q.shape[2]))

    return run


def contender_fns(dropout: float, triton_backend, compiled: dict) -> tuple[dict, dict]:
    import torch.nn.functional as F

    masks = MaskCache(dense_mask)
    fns = {"sdpa_mask": lambda q, k, v, doc_ids: F.scaled_dot_product_attention(
        q, k, v, attn_mask=masks(doc_ids, q.shape[2]))}
    missing = {}
    if (why := flex_unavailable()) is None:
        fns["flex"] = flex_contender(compiled)
    else:
        missing["flex"] = why
    if triton_backend is not None:
        fns["triton"] = lambda q, k, v, doc_ids: triton_backend.causal_attention(q, k, v, doc_ids=doc_ids)
        fns["triton_causal"] = lambda q, k, v, doc_ids: triton_backend.causal_attention(q, k, v)
    return fns, missing


@functools.lru_cache(maxsize=None)
def flex_backward_missing(device_type: str) -> str | None:
    """Why FlexAttention runs no backward on this kind of device, or None: asked of a tiny eager call, which raises
    at once where that is so (on the CPU so far; torch's own message goes in the rows, with its version)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    probe = torch.zeros(1, 1, 16, 16, device=device_type, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": the point here
            flex_attention(probe, probe, probe).sum().backward()
    except NotImplementedError as exc:
        return f"skipped: {str(exc).splitlines()[0]} (torch {torch.__version__})"
    except Exception:  # anything else: the row's own check meets it and says what it is
        return None
    return None


def skip_reason(contender: str, device, args) -> str | None:
    """FlexAttention where it has no backward (the rows check and time forward and backward). The harness skips it
    under --no-compile (eager it is the unfused reference) and on the CPU with --quick, as it does math_compile."""
    if contender != "flex" or flex_unavailable():
        return None
    return flex_backward_missing(device.type)


def selector(shape: tuple, device):
    """The first and last (batch, head) pairs (as the attention rows); doc_ids (B, T) are selected as (B, H, T, 1)."""
    return attention.selector(shape[:4], device)


def definition_outputs(inputs: InputSet, select, dropout: float = 0.0, variant: str | None = None):
    """One head at a time in float64: causal attention with the documents, or (``variant`` "causal") without."""
    import torch

    from kernels.definitions import causal_attention_math

    q, k, v, doc_ids = inputs.tensors
    B, H, T, _D = q.shape
    ids = select(doc_ids[:, None, :, None].expand(B, H, T, 1))[0, :, :, 0]  # (P, T): each selected head's documents
    leaves = [select(t.detach()).double() for t in (q, k, v)]
    dy = select(inputs.dy).double()
    outs, grads = [], []
    for p in range(leaves[0].shape[1]):
        docs = None if variant == "causal" else ids[p:p + 1]
        head = InputSet([t[:, p:p + 1].clone().requires_grad_() for t in leaves], dy[:, p:p + 1])
        out, g = forward_backward(lambda q, k, v: causal_attention_math(q, k, v, doc_ids=docs), head)
        outs.append(out)
        grads.append(g)
    return torch.cat(outs, dim=1), [torch.cat(gs, dim=1) for gs in zip(*grads)]
