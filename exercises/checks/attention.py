"""The checks of the attention exercises: the forward's inner loop and the whole forward, the backward's delta, the
causal tile bounds (lessons 5 and 6)."""
from __future__ import annotations

import math
from types import ModuleType

import torch

from .compare import LOG2E, Mismatch, _compare, _dtype_name, _generator


# (B, H, Tq, Tk, D): several query and key tiles with partial tails, padded head dims, a chunk of queries (Tq < Tk)
# whose diagonal falls across key tiles, and a decoding step (Tq = 1)
ATTENTION_SHAPES = [(1, 2, 37, 37, 24), (2, 1, 33, 33, 16), (1, 1, 5, 21, 16), (1, 2, 1, 19, 32)]


def _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed):
    g = _generator(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H, Tk, D, generator=g).to(device, dtype) for _ in range(2))
    do = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    return q, k, v, do


def _attention_scores(q, k):
    """scale * q k^T with the future masked (-inf), in q's dtype: (B, H, Tq, Tk)."""
    from kernels.definitions import future_mask

    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.masked_fill(future_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))


def _attention_floor(exact: torch.Tensor, stored: torch.dtype = torch.float32) -> float:
    """A few float32 roundings, as tests/test_attention.py, plus, for an output stored in a 16-bit dtype, one
    rounding of that dtype at the output's magnitude: the kernel rounds p to that dtype for tl.dot and its float32
    result once on the store, so it may land on the other neighbour of a value that PyTorch rounds to the nearer
    one, and 2 x PyTorch's error alone (half a rounding each) leaves it no room."""
    magnitude = exact.abs().max().item()
    storage = torch.finfo(stored).eps * magnitude if stored != torch.float32 else 0.0
    return 8 * torch.finfo(torch.float32).eps * max(1.0, magnitude) + storage


def _online_softmax(q, k, v, block_n: int, *, natural_exp=False, rescale_acc=True, rescale_l=True):
    """(out, lse2) of the forward's online softmax run tile by tile (key tiles of ``block_n``), in float64, with
    the kernel's mistakes on demand: ``natural_exp``, exp where the base-2 scores s want exp2; no ``rescale_acc`` or
    ``rescale_l``, acc or l not multiplied by alpha, so each tile's terms stay relative to the max of their step."""
    s = _attention_scores(q, k) * LOG2E  # the kernel's s: (B, H, Tq, Tk), base 2, -inf in the future
    Tk = s.shape[-1]
    tiles = -(-Tk // block_n)
    s = torch.nn.functional.pad(s, (0, tiles * block_n - Tk), value=float("-inf")).unflatten(-1, (tiles, block_n))
    m_step = s.amax(-1).cummax(-1).values  # m_i after each tile; finite (key 0 is in every row's first tile)
    m_last = m_step[..., -1:].expand_as(m_step)
    exp = torch.exp if natural_exp else torch.exp2

    def weights(rescaled):  # (B, H, Tq, Tk): each key's term as it sits in acc or l at the end
        return exp(s - (m_last if rescaled else m_step)[..., None]).flatten(-2)[..., :Tk]

    acc, l = weights(rescale_acc) @ v, weights(rescale_l).sum(-1)
    return acc / l[..., None], (m_last[..., 0] + torch.log2(l)).flatten(0, 1)


ONLINE_SOFTMAX_MISTAKES = {  # the update's wrong variants, named: _online_softmax's options for each
    "natural exp where the kernel works in base 2: did you fold log2(e) into the scale? s is already "
    "scale * log2(e) * q k^T, so use tl.math.exp2": dict(natural_exp=True),
    "a missing alpha rescale: multiply both l_i and acc by alpha = exp2(m_i - m_new) before adding the new "
    "tile": dict(rescale_acc=False, rescale_l=False),
    "a missing alpha rescale of acc (l_i is rescaled)": dict(rescale_acc=False),
    "a missing alpha rescale of l_i (acc is rescaled)": dict(rescale_l=False),
}


def check_attention_forward_inner(module: ModuleType, device: str) -> None:
    from kernels.definitions import causal_attention_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    mistakes = ONLINE_SOFTMAX_MISTAKES
    for dtype in (torch.float32, torch.float16):
        for B, H, Tq, Tk, D in ATTENTION_SHAPES:
            q, k, v, _ = _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed=Tq + Tk + D)
            case = f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}"
            o, lse2 = module.attention_forward(q, k, v)
            exact = causal_attention_math(q.double(), k.double(), v.double())
            wrong = {name: _online_softmax(q.double(), k.double(), v.double(), module.BLOCK_N, **how)
                     for name, how in mistakes.items()}
            _compare("out", o, exact, torch_backend.causal_attention(q, k, v), against="float64 math", case=case,
                     floor=_attention_floor(exact, dtype), dtype=dtype,
                     variants={name: out for name, (out, _) in wrong.items()})
            exact_lse2 = (torch.logsumexp(_attention_scores(q.double(), k.double()), -1) * LOG2E).view(B * H, Tq)
            torch_lse2 = (torch.logsumexp(_attention_scores(q, k).float(), -1) * LOG2E).view(B * H, Tq)
            _compare("log-sum-exp (base 2)", lse2, exact_lse2, torch_lse2, against="float64 math", case=case,
                     floor=_attention_floor(exact_lse2), dtype=dtype,
                     variants={name: lse for name, (_, lse) in wrong.items()})


def _forward_walk(q, k, v, block_m: int, block_n: int, *, band_end=None, band_mask=True):
    """(out, lse2, acc) of the forward kernel's walk over key tiles, in float64, key by key: the query tile of rows
    [start_m * block_m, ...) visits the key tiles [0, lo) unmasked and the tiles from lo up to hi masked (keys past
    Tk load as zeros; scores of keys in a row's future are -inf), with the kernel's mistakes on demand: ``band_end``
    (first, Tk) -> hi in place of min(first + block_m, Tk); no ``band_mask``, the band's scores not masked, so a
    row sees its future and the zero keys past Tk (score 0, value 0). acc: the unnormalized output."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    padded = -(-Tk // block_n) * block_n
    k, v = (torch.nn.functional.pad(t, (0, 0, 0, padded - Tk)) for t in (k, v))
    s = (q @ k.transpose(-2, -1)) * (LOG2E / math.sqrt(q.shape[-1]))  # the kernel's s: base 2
    seen = torch.zeros(Tq, padded, dtype=torch.bool)  # [row, key]: the key's score is in the row's softmax
    for start_m in range(-(-Tq // block_m)):
        rows = torch.arange(start_m * block_m, min(start_m * block_m + block_m, Tq))
        first = (Tk - Tq) + start_m * block_m
        lo = first // block_n * block_n
        hi = band_end(first, Tk) if band_end else min(first + block_m, Tk)
        end = lo + max(0, -(-(hi - lo) // block_n)) * block_n  # the band's tiles: range(lo, hi, block_n)
        cols = torch.arange(lo, end)
        seen[rows, :lo] = True
        seen[rows[:, None], cols] = (Tk - Tq + rows[:, None] >= cols) if band_mask else True
    s = s.masked_fill(~seen.to(s.device), float("-inf"))
    m = s.amax(-1)
    weights = torch.exp2(s - m[..., None])
    l = weights.sum(-1)
    acc = weights @ v
    return acc / l[..., None], (m + torch.log2(l)).flatten(0, 1), acc


def _forward_variants(q, k, v, block_m: int, block_n: int) -> tuple[dict, dict]:
    """Known wrong answers of the whole forward, in float64: (name -> out, name -> lse2)."""
    outs, lses = {}, {}
    for name, how in ONLINE_SOFTMAX_MISTAKES.items():
        outs[name], lses[name] = _online_softmax(q, k, v, block_n, **how)
    walks = {
        "the diagonal band one key short: the band is [lo, min(first + BLOCK_M, Tk)), the end exclusive, so that "
        "the last row sees its own key": dict(band_end=lambda first, Tk: min(first + block_m, Tk - 1)),
        "no causal mask on the diagonal band: there the rows see keys in their future (and the zeros loaded past "
        "Tk); mask the scores with tl.where(q_pos[:, None] >= cols[None, :], s, float(\"-inf\"))":
            dict(band_mask=False),
    }
    for name, how in walks.items():
        outs[name], lses[name], _ = _forward_walk(q, k, v, block_m, block_n, **how)
    _, lse2, acc = _forward_walk(q, k, v, block_m, block_n)
    outs["O = acc without the final division by l_i: the output is acc / l_i"] = acc
    m, l = _online_max_and_sum(q, k)
    lses["the log-sum-exp in natural log: the kernel keeps it in base 2, m_i + log2(l_i), as the backward reads "
         "it"] = lse2 * math.log(2)
    lses["m_i + ln(l_i): m_i is in base 2, so take the log of l_i in base 2 too (tl.math.log2)"] = m + torch.log(l)
    return outs, lses


def _online_max_and_sum(q, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max m (base 2) and sum l = sum_j 2^(s_j - m) as the kernel ends with them: (B * H, Tq) each."""
    s = _attention_scores(q, k) * LOG2E
    m = s.amax(-1)
    return m.flatten(0, 1), torch.exp2(s - m[..., None]).sum(-1).flatten(0, 1)


def check_attention_forward(module: ModuleType, device: str) -> None:
    from kernels.definitions import causal_attention_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    tiles = module.TILES
    for dtype in (torch.float32, torch.float16):
        for B, H, Tq, Tk, D in ATTENTION_SHAPES:
            q, k, v, _ = _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed=Tq + Tk + D)
            case = f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}"
            o, lse2 = module.attention_forward(q, k, v)
            q64, k64, v64 = q.double(), k.double(), v.double()
            exact = causal_attention_math(q64, k64, v64)
            outs, lses = _forward_variants(q64.cpu(), k64.cpu(), v64.cpu(), tiles.BLOCK_M, tiles.BLOCK_N)
            _compare("out", o, exact, torch_backend.causal_attention(q, k, v), against="float64 math", case=case,
                     floor=_attention_floor(exact, dtype), dtype=dtype, variants=outs)
            exact_lse2 = (torch.logsumexp(_attention_scores(q64, k64), -1) * LOG2E).view(B * H, Tq)
            torch_lse2 = (torch.logsumexp(_attention_scores(q, k).float(), -1) * LOG2E).view(B * H, Tq)
            _compare("log-sum-exp (base 2)", lse2, exact_lse2, torch_lse2, against="float64 math", case=case,
                     floor=_attention_floor(exact_lse2), dtype=dtype, variants=lses)


def check_attention_delta(module: ModuleType, device: str) -> None:
    for dtype in (torch.float32, torch.float16):
        for B, H, Tq, Tk, D in ATTENTION_SHAPES:
            q, k, v, do = _attention_inputs(B, H, Tq, Tk, D, dtype, device, seed=Tq + Tk + D)
            # The definition, in float64: delta_i = sum_j P_ij dP_ij with dP = dO v^T.
            p = torch.softmax(_attention_scores(q.double(), k.double()), dim=-1)  # (B, H, Tq, Tk)
            dp = do.double() @ v.double().transpose(-2, -1)
            exact = (p * dp).sum(-1).view(B * H, Tq)
            o = (p @ v.double()).to(dtype)  # the forward's output, rounded to the dtype as a kernel would store it
            delta = module.attention_delta(o, do)
            in_torch = (o.float() * do.float()).sum(-1).view(B * H, Tq)
            o64, do64 = o.double(), do.double()
            wrong = {
                "the row sums of dO alone: delta is rowsum(dO * O), the product first": do64.sum(-1),
                "the row sums of O alone: delta is rowsum(dO * O), the product first": o64.sum(-1),
                "a row mean, not a row sum: delta = rowsum(dO * O), no division by D": (o64 * do64).mean(-1),
            }
            _compare("delta", delta, exact, in_torch, against="float64 sum_j P_ij dP_ij",
                     case=f"{_dtype_name(dtype)}, (B, H, Tq, Tk, D) = {(B, H, Tq, Tk, D)}",
                     floor=_attention_floor(exact), dtype=dtype,
                     variants={name: t.view(B * H, Tq) for name, t in wrong.items()})


# (Tq, Tk, block_m, block_n): tiles of queries wider and narrower than the key tiles, partial last tiles, fewer
# queries than keys with the diagonal falling inside a key tile and on its boundary, a decoding step (Tq = 1)
TILE_BOUNDS_CASES = [(37, 37, 16, 8), (37, 37, 8, 16), (33, 33, 16, 16), (5, 21, 16, 16), (1, 19, 16, 8),
                     (20, 50, 16, 32), (17, 40, 4, 8), (24, 31, 8, 8), (16, 64, 16, 16), (3, 3, 16, 16)]


def check_attention_tile_bounds(module: ModuleType, device: str) -> None:
    """Against a brute-force count over every (query, key) pair: row r of the queries (position Tk - Tq + r) sees
    key j when j <= Tk - Tq + r. The bounds must be tile-aligned, leave out no key a row sees, load none that no row
    sees, mask none that every row sees unless it shares a key tile with one that needs the mask."""
    for Tq, Tk, block_m, block_n in TILE_BOUNDS_CASES:
        for start_m in range(math.ceil(Tq / block_m)):
            rows = range(start_m * block_m, min(start_m * block_m + block_m, Tq))  # the tile's real rows
            seen = [[j <= Tk - Tq + r for j in range(Tk)] for r in rows]  # seen[row][key]
            by_all = [j for j in range(Tk) if all(s[j] for s in seen)]
            by_any = [j for j in range(Tk) if any(s[j] for s in seen)]
            got = module.forward_key_bounds(start_m, Tq, Tk, block_m, block_n)
            case = f"query tile {start_m}, (Tq, Tk, block_m, block_n) = {(Tq, Tk, block_m, block_n)}"
            problem = None
            if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(b, int) for b in got)):
                problem = f"{got!r} is not a pair of ints"
            else:
                lo, hi = got
                if lo % block_n or not 0 <= lo <= hi:
                    problem = f"lo = {lo} is not a key tile boundary (a multiple of block_n) in [0, hi]"
                elif lo > len(by_all):  # by_all is the keys [0, len(by_all))
                    problem = (f"key {len(by_all)} is before lo but not seen by every row: it needs the mask "
                               f"({len(by_all)} keys are seen by every row)")
                elif hi < by_any[-1] + 1:
                    problem = f"key {by_any[-1]} is seen by a row of the tile but lies at or past hi"
                elif hi > by_any[-1] + 1:
                    problem = f"hi is past key {by_any[-1]}, the last one any row sees: tiles loaded for nothing"
                elif lo // block_n < (len(by_all) - 1) // block_n:  # the tile's first row sees keys [0, len)
                    problem = (f"the band starts {(len(by_all) - 1) // block_n - lo // block_n} key tile(s) early: "
                               f"keys [{lo}, {lo + block_n}) are seen by every row, no mask needed")
            if problem:
                raise Mismatch(f"(lo, hi) = {got!r} differs from what a brute-force count over every (query, key) "
                               f"pair allows: {problem} ({case})")
