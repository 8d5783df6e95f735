"""Exercise attention_forward (lesson 5 of COURSE.md): the FlashAttention forward, every line of it.

Write the causal attention forward from zero: the loop of ``_fwd_inner`` over key tiles, the whole program of
``_attention_fwd`` — which query tile and which (batch, head) it owns, its pointers, the masked load of q, the two
calls of the loop (the key tiles without the causal mask, then the diagonal band with it), O = acc / l and the
base-2 log-sum-exp — and, in the launcher ``attention_fwd``, the grid. All of it lies in the one region between the
marked lines; the signatures and the launcher's other lines are given in it. Check your answer with

    python -m exercises check attention_forward

This file is a copy of the real forward in kernels/attention.py without dropout (lesson 7) and without packed
documents (a later lesson): the signatures keep their arguments so that the lines you write are the real ones, and
the launcher always passes dropout_p = 0 and no documents (DROPOUT and DOCS are False), so your loop has neither
to apply. When your answer passes, compare it with the real kernels,
``_fwd_inner`` and ``_attention_fwd`` in kernels/attention.py, and their launcher ``attention_fwd``, and with
exercises/solutions/attention_forward.py (this file with the real kernels' lines filled in).

The math (lesson 5; exercise attention_forward_inner wrote its update)
----------------------------------------------------------------------
For one (batch, head): q (Tq, D), k and v (Tk, D) with Tq <= Tk. The queries are the last Tq of the Tk positions:
query row r sits at position (Tk - Tq) + r and sees the keys 0 .. (Tk - Tq) + r. With s = qk_scale * q k^T, where
qk_scale = scale * log2(e) (the launcher computes it), the output row is softmax(S) v in base 2: 2^s replaces e^S.
A program owns BLOCK_M query rows and keeps, per row, a running max m (base 2), sum l and unnormalized output acc
(-inf, 0 and 0 at the start, float32), folding in one tile of BLOCK_N keys at a time:

    m_new = max(m, rowmax(s_j));  alpha = 2^(m - m_new);  p = 2^(s_j - m_new)
    l = alpha * l + rowsum(p);    acc = alpha * acc + p v_j;   m = m_new

and at the end stores O = acc / l and the row's log-sum-exp in base 2, m + log2(l), which the backward reads.

Causality in tiles (exercise attention_tile_bounds): for the query tile whose first row sits at position
first = (Tk - Tq) + start_m * BLOCK_M, every row sees all keys [0, lo) with lo = first rounded down to a multiple
of BLOCK_N: walk those tiles without a mask. The diagonal band [lo, min(first + BLOCK_M, Tk)) needs the causal
mask (s = -inf where a key is in a row's future) and a mask on the loads, since its last tile may run past Tk. The
keys past the band are in the future of every row: never loaded. ``_fwd_inner`` is one loop for both, told which by
the compile-time flag ON_DIAGONAL; the program calls it twice.

The layout
----------
The grid is (query tiles, B * H): ``tl.program_id(0)`` is the query tile, ``tl.program_id(1)`` the (batch, head)
pair bh, so b = bh // H and h = bh % H (make them int64: offsets into a large tensor overflow an int32). Element
(b, h, t, d) of q is at Q + b * stride_qb + h * stride_qh + t * stride_qt + d (the last dim is contiguous); so are
k, v and o with their strides, and LSE is a (B * H, Tq) float32 array: row bh starts at LSE + bh * Tq. The head dim
D = HEAD_DIM is padded to BLOCK_D (a power of two >= 16, for ``tl.dot``): lanes d >= HEAD_DIM are masked out of
every load (``other=0.0``) and store, as are query rows t >= Tq of the last tile. The launcher must start one
program for each query tile of BLOCK_M rows (``triton.cdiv(a, b)`` is ceil(a / b)) and each (batch, head).

What you have at hand
---------------------
* In ``_fwd_inner``: the arguments of its signature; ``q`` is the (BLOCK_M, BLOCK_D) tile of queries, ``K`` and
  ``V`` point at this (batch, head)'s keys and values (time stride ``stride_kt``, ``stride_vt``), ``q_pos`` holds
  the rows' positions, ``offs_d`` and ``d_ok`` the head-dim lanes and their mask. Step ``start_n`` over
  ``range(lo, hi, BLOCK_N)``. Return the updated ``acc, l_i, m_i``. Leave dropout_p, rng_key, DROPOUT, DOC_START
  and IN_DOCUMENT unused.
* ``tl.dot(a, b, input_precision=DOT_PRECISION)`` (a and b of one dtype; pass an accumulator as the third argument
  to add to it), ``tl.trans(k)``, ``tl.where(cond, a, b)``, ``tl.max(t, 1)``, ``tl.sum(t, 1)``, ``tl.maximum``,
  ``tl.math.exp2``, ``tl.math.log2``, ``tl.minimum``, ``tl.full``, ``tl.zeros``; ``x[:, None]`` and ``x[None, :]``
  broadcast a vector against a tile; cast the weights to the values' dtype for ``tl.dot`` (``p.to(v.dtype)``) and
  the output to O's on the store (``acc.to(O.dtype.element_ty)``).
* Pass ``_fwd_inner`` the dropout arguments it expects: ``dropout_p``, and the Philox key lesson 7 explains,
  ``rng_key = seed.to(tl.int64) + (bh.to(tl.int64) << 32)``; and the documents' ``DOC_START`` and
  ``IN_DOCUMENT=DOCS`` (both calls), which it leaves unread.
* In the launcher: ``tiles`` (a ``Tiles``: BLOCK_M, BLOCK_N, num_warps, num_stages), ``Tq`` and ``B * H``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
MIN_BLOCK_D = 16  # tl.dot needs every tile dimension >= 16; smaller head dims are padded (masked) up to 16


class Tiles(NamedTuple):
    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # key rows per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads


# Small tiles shaped like a GPU's (BLOCK_N divides BLOCK_M), so that the checker's short sequences span several
# query tiles, several key tiles, and a diagonal band of more than one key tile (the real launcher picks its tiles
# by device and head dim: kernels/attention_tiles.py)
TILES = Tiles(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)


def block_d(head_dim: int) -> int:
    """The head dim as the kernels tile it: padded to a power of two, at least MIN_BLOCK_D."""
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: full float32 ("ieee") for float32 inputs; ignored for 16-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _no_documents(q: torch.Tensor) -> torch.Tensor:
    """What the kernel gets for DOC_START without documents: never read, an int32 pointer."""
    return torch.empty(1, dtype=torch.int32, device=q.device)


def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())  # no seed without dropout: the kernel does not read it then


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, q_pos, DOC_START, offs_d, d_ok, lo, hi, Tk, qk_scale,
               dropout_p, rng_key, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr, ON_DIAGONAL: tl.constexpr, IN_DOCUMENT: tl.constexpr):
    """Fold the key tiles [lo, hi) into the running (acc, l, m) of one query tile (the online softmax above).
    ``q_pos``: the tile's query positions among the Tk keys. (DOC_START and IN_DOCUMENT: packed documents, which
    this copy leaves out: IN_DOCUMENT is always False here.)"""
    # ---- your code here (exercise attention_forward, lesson 5) ----
    return acc, l_i, m_i  # placeholder: runs, but wrong (no key tile is folded in). Write the loop


@triton.jit(do_not_specialize=["seed"])
def _attention_fwd(
    Q, K, V,  # q (B, H, Tq, D), k and v (B, H, Tk, D), last dim contiguous
    O,  # (B, H, Tq, D) output, contiguous
    LSE,  # (B * H, Tq) float32 output: each row's log-sum-exp in base 2 (LSE * log2 e), for the backward
    DOC_START,  # (B, Tk) int32: where the document of each position starts (read when DOCS)
    stride_qb, stride_qh, stride_qt,  # q's strides in elements (batch, head, time)
    stride_kb, stride_kh, stride_kt,  # k's strides
    stride_vb, stride_vh, stride_vt,  # v's strides
    stride_ob, stride_oh, stride_ot,  # o's strides
    H, Tq, Tk,  # number of heads, of queries and of keys (Tq <= Tk: the queries are the last Tq positions)
    qk_scale,  # scale * log2(e), so scores feed exp2 directly
    dropout_p,  # probability of dropping an attention weight (used when DROPOUT)
    seed,  # Philox seed for the dropout mask (used when DROPOUT)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    DROPOUT: tl.constexpr,  # dropout_p > 0
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (full precision), "tf32" otherwise (ignored for 16-bit)
    DOCS: tl.constexpr,  # packed documents: a query sees only the keys of its own document
):
    pass  # write the program: its tiles, pointers, q, the two loops, O and the log-sum-exp


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float,
                  seed: torch.Tensor | None,
                  doc_bounds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, Tq), dtype=torch.float32, device=q.device)
    doc_start = _no_documents(q) if doc_bounds is None else doc_bounds[0]

    def run(tiles: Tiles):
        _attention_fwd[(1, 1)](  # placeholder grid: one program
            q, k, v, o, lse, doc_start, *_strides(q), *_strides(k), *_strides(v), *_strides(o), H, Tq, Tk,
            scale * LOG2E, dropout_p,
            _seed_value(seed), HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N,
            DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(q.dtype), DOCS=doc_bounds is not None,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    # ---- end ----

    run(TILES)
    return o, lse


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention's forward: (o, lse2) for q (B, H, Tq, D) and k, v (B, H, Tk, D), Tq <= Tk, D <= 128.

    float32 or float16. o: (B, H, Tq, D) in q's dtype; lse2: (B * H, Tq) float32, each row's log-sum-exp in base 2.
    The queries are the last Tq of the Tk positions (query i sees keys 0 .. Tk - Tq + i). ``scale`` defaults to
    1 / sqrt(D). No dropout: ``attention_fwd`` is called with dropout_p = 0. The tensors are on a CUDA GPU, or on
    the CPU with Triton's interpreter on (``python -m exercises check`` sees to it).
    """
    Tq, Tk, D = q.shape[2], k.shape[2], q.shape[3]
    if Tq > Tk:
        raise ValueError(f"attention_forward: more queries ({Tq}) than keys ({Tk}) — pass Tq <= Tk")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernel takes the other strides
    return attention_fwd(q, k, v, 0.0, 1.0 / math.sqrt(D) if scale is None else scale, None)
