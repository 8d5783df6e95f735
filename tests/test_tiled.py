"""The tiled mirrors (kernels/tiled.py) against float64 math and autograd, and their dropout against the kernel.

Two kinds of check. The loops must compute the op: each is compared with the whole-tensor formula of
``kernels/definitions.py`` in float64 (values) and with torch autograd (gradients), on shapes and tiles chosen so that
sequences end mid-tile and Tq < Tk shifts the diagonal across tiles. The loops must also be the kernels' loops:
the NumPy Philox and the keep mask are compared bit for bit with what Triton's interpreter draws, and the tile
grid (which tiles each program visits, which are masked) with the causal mask, tile by tile. Triton launches are
few and tiny: the interpreter is slow.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels import tiled
from kernels.definitions import causal_attention_math, future_mask, gelu_math, layer_norm_math

# (B, H, Tq, Tk, D, block_m, block_n): several tiles with partial tails, Tq < Tk with the diagonal across tiles,
# block_m larger and smaller than block_n, one-element tiles, a single decoding query.
SHAPES = [
    (1, 1, 10, 10, 4, 4, 2),
    (2, 1, 13, 13, 5, 3, 5),
    (1, 2, 3, 10, 4, 2, 4),
    (1, 1, 7, 19, 3, 4, 8),
    (1, 1, 1, 9, 4, 16, 8),
    (1, 1, 6, 6, 2, 1, 1),
    (1, 1, 5, 5, 3, 8, 16),
]


def _inputs(B, H, Tq, Tk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)


def _keep(seed, B, H, Tq, Tk, p):
    """The kernels' keep mask for every head, (B, H, Tq, Tk) bool, from the NumPy Philox."""
    masks = [tiled.dropout_keep_mask(seed, bh, Tk, p, Tq=Tq) for bh in range(B * H)]
    return torch.from_numpy(np.stack(masks)).view(B, H, Tq, Tk)


# ----------------------------------------------------------------------------------------------------------------
# Attention values and gradients


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_lse_match_float64_math(shape):
    B, H, Tq, Tk, D, block_m, block_n = shape
    q, k, v, _ = _inputs(B, H, Tq, Tk, D)
    o, lse = tiled.attention_forward(q, k, v, block_m, block_n, scale=0.7)
    torch.testing.assert_close(o, causal_attention_math(q, k, v, scale=0.7), rtol=0, atol=1e-12)
    scores = (q @ k.transpose(-2, -1) * 0.7).masked_fill(future_mask(Tq, Tk), float("-inf"))
    assert lse.shape == (B * H, Tq)  # the kernel's layout, in base 2
    torch.testing.assert_close(lse.view(B, H, Tq) * math.log(2.0), torch.logsumexp(scores, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[6] % 8 == 0] + [SHAPES[0], SHAPES[1]], ids=str)
def test_backward_matches_autograd(shape, dropout_p):
    """dq, dk, dv against autograd through the whole-tensor math, with dropout applied by the same mask."""
    B, H, Tq, Tk, D, block_m, block_n = shape
    if dropout_p > 0 and block_n % 8:
        block_n = 8  # with dropout the key tile is a multiple of 8, as in the kernel
    q, k, v, do = _inputs(B, H, Tq, Tk, D, seed=1)
    keep = _keep(5, B, H, Tq, Tk, dropout_p) if dropout_p > 0 else None
    o, lse = tiled.attention_forward(q, k, v, block_m, block_n, dropout_p=dropout_p, seed=5)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    exact = causal_attention_math(qs, ks, vs, dropout_p=dropout_p, dropout_mask=keep)
    exact.backward(do)
    torch.testing.assert_close(o, exact.detach(), rtol=0, atol=1e-12)
    grads = tiled.attention_backward(do, q, k, v, o, lse, block_m, block_n, dropout_p=dropout_p, seed=5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, (qs.grad, ks.grad, vs.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=name)


def test_dropout_mask_statistics():
    """Kept at rate 1 - p; heads, seeds and neighbouring keys independent (the layout spreads a call's bits)."""
    T, p = 64, 0.25
    keep = np.stack([tiled.dropout_keep_mask(3, bh, T, p) for bh in range(4)])
    n = keep.size
    assert abs(keep.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not (keep[0] == keep[1]).all() and not (keep[0] == tiled.dropout_keep_mask(4, 0, T, p)).all()
    for offset in (1, 2, 4, 8):
        both = (keep[..., offset:] & keep[..., :-offset]).mean()
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n), offset
    # a chunk (the last Tq of T positions) draws the same rows as the whole
    assert (tiled.dropout_keep_mask(3, 2, T, p, Tq=5) == keep[2, -5:]).all()


def test_bad_tiles_raise():
    q, k, v, _ = _inputs(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        tiled.attention_forward(q, k, v, 4, 4, dropout_p=0.1)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        tiled.attention_forward(k, q[:, :, :2], v, 4, 4)
    with pytest.raises(ValueError, match="one of"):
        tiled.attention_tile_grid("forward", 4, 4, 2, 2)


# ----------------------------------------------------------------------------------------------------------------
# The schedule


def _visible(Tq, Tk):
    """(Tq, Tk) bool: query i sees key j (j <= (Tk - Tq) + i)."""
    return ~future_mask(Tq, Tk).numpy()


@pytest.mark.parametrize("kernel", tiled.ATTENTION_KERNELS)
@pytest.mark.parametrize("Tq,Tk,block_m,block_n", [(10, 10, 4, 2), (13, 13, 2, 4), (3, 10, 2, 4), (7, 19, 4, 8),
                                                   (1, 9, 16, 8), (12, 12, 3, 3), (16, 16, 8, 8), (16, 16, 2, 8),
                                                   (5, 17, 1, 1)])
def test_tile_grid_covers_the_causal_mask_exactly(kernel, Tq, Tk, block_m, block_n):
    grid = tiled.attention_tile_grid(kernel, Tq, Tk, block_m, block_n)
    assert grid.shape == (math.ceil(Tq / block_m), math.ceil(Tk / block_n))
    visible = _visible(Tq, Tk)
    pad = np.zeros((grid.shape[0] * block_m, grid.shape[1] * block_n), dtype=bool)
    pad[:Tq, :Tk] = True  # entries that exist
    rows_exist = np.zeros(grid.shape[0] * block_m, dtype=bool)
    rows_exist[:Tq] = True
    seen = np.zeros_like(pad)
    seen[:Tq, :Tk] = visible
    unmasked_wasted = 0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            tile = (slice(i * block_m, (i + 1) * block_m), slice(j * block_n, (j + 1) * block_n))
            any_visible = seen[tile].any()
            # forward and dQ mask keys past Tk inside the band, dK/dV masks by loads: what counts as "future"
            existing = rows_exist[tile[0]][:, None] & (pad[tile] if kernel == "dkdv" else True)
            needs_mask = (existing & ~seen[tile]).any()
            assert (grid[i, j] != 0) == any_visible, f"tile ({i}, {j}) visited={grid[i, j]}, visible={any_visible}"
            if any_visible and needs_mask:
                assert grid[i, j] == 2, f"tile ({i}, {j}) needs the causal mask but is visited without it"
            if grid[i, j] == 2 and not needs_mask:
                unmasked_wasted += 1
    # A masked tile that needs no mask only comes from rounding the band's start down to a whole tile: never when
    # the tiles are aligned with the diagonal (Tq == Tk and the stepping tile divides the owned one)
    stepped, owned = (block_n, block_m) if kernel != "dkdv" else (block_m, block_n)
    if Tq == Tk and owned % stepped == 0 and stepped > 1 and Tk % block_n == 0:
        assert unmasked_wasted == 0


def test_tile_grid_by_hand():
    # Tq = Tk = 10, 4-row query tiles, 2-key tiles: query tile 1 (rows 4-7) needs keys 0-7, masked from 4 on
    assert tiled.attention_tile_grid("fwd", 10, 10, 4, 2).tolist() == [
        [2, 2, 0, 0, 0],
        [1, 1, 2, 2, 0],
        [1, 1, 1, 1, 2],
    ]
    # 3 queries at positions 7-9 of 10 keys, 2-row tiles, 4-key tiles: the band of query tile 0 starts at key 7,
    # rounded down to key tile 1 (keys 4-7), which row 7 sees whole: masked all the same
    assert tiled.attention_tile_grid("fwd", 3, 10, 2, 4).tolist() == [[1, 2, 2], [1, 1, 2]]
    assert tiled.attention_tile_grid("dq", 3, 10, 2, 4).tolist() == [[1, 2, 2], [1, 1, 2]]
    # dK/dV rounds in query tiles instead: key tiles 0 and 1 (keys 0-7) are in the past of every query, no mask;
    # key tile 2 (keys 8-9) is seen from row 1 on (position 8), so both query tiles need the mask
    assert tiled.attention_tile_grid("dkdv", 3, 10, 2, 4).tolist() == [[1, 1, 2], [1, 1, 2]]
    grid = tiled.attention_tile_grid("dkdv", 16, 16, 4, 8)
    assert (grid == 2).sum() == 4 and (grid == 1).sum() == 2 and (grid == 0).sum() == 2


def test_layer_norm_groups_by_hand():
    assert tiled.layer_norm_groups(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert tiled.layer_norm_groups(6, 4) == [[0, 1], [2, 3], [4, 5]]  # 3 groups: a 4th would be empty
    assert tiled.layer_norm_groups(9, 4, block_m=2) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert tiled.layer_norm_groups(2, 4) == [[0], [1]] and tiled.layer_norm_groups(0, 4) == []
    for n_rows, n_groups, block_m in [(37, 4, 1), (37, 5, 4), (100, 264, 2), (1, 1, 8)]:
        groups = tiled.layer_norm_groups(n_rows, n_groups, block_m)
        assert sum(groups, []) == list(range(n_rows)) and 1 <= len(groups) <= n_groups
        assert all(len(g) % block_m == 0 for g in groups[:-1]) and all(groups)


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm and GELU


@pytest.mark.parametrize("shape,n_groups,block_m", [((3, 7, 13), 4, 1), ((1, 1, 5), 4, 4), ((10, 8), 3, 2),
                                                    ((9, 6), 100, 4)])
def test_layer_norm_matches_autograd(shape, n_groups, block_m):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    w, b = (torch.randn(shape[-1], generator=g, dtype=torch.float64) for _ in range(2))
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    y, mean, rstd = tiled.layer_norm_forward(x, w, b, block_m=block_m)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    exact = layer_norm_math(xs, ws, bs)
    exact.backward(dy)
    torch.testing.assert_close(y, exact.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, x.mean(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(rstd, 1 / torch.sqrt(x.var(-1, unbiased=False) + 1e-5), rtol=1e-12, atol=0)
    dx, dw, db = tiled.layer_norm_backward(dy, x, w, mean, rstd, n_groups=n_groups, block_m=block_m)
    for name, got, want in (("dx", dx, xs.grad), ("dw", dw, ws.grad), ("db", db, bs.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=name)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_autograd(approximate):
    x = torch.cat([torch.linspace(-12, 12, 241, dtype=torch.float64), torch.tensor([-200.0, 0.0, 200.0])])
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xs = x.clone().requires_grad_()
    exact = gelu_math(xs, approximate)
    exact.backward(dy)
    # the absolute floor: for large negative x, 1 + tanh(u) in the formula cancels to 0 where the kernels' (and the
    # mirror's) x * sigmoid(2u) keeps a tiny, more accurate value
    torch.testing.assert_close(tiled.gelu_forward(x, approximate), exact.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tiled.gelu_backward(dy, x, approximate), xs.grad, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Bit for bit against Triton (its interpreter on the CPU)

try:  # tests/conftest.py has set TRITON_INTERPRET=1 when there is no GPU, before anything imported triton
    import triton
    import triton.language as tl
except ImportError:  # the mirrors above need no Triton; the comparisons below do
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="needs triton (on the CPU, its interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if triton is not None:
    from kernels.attention import _keep_mask, attention_fwd, causal_attention

    @triton.jit
    def _randint4x_kernel(OFFSETS, OUT, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        w0, w1, w2, w3 = tl.randint4x(seed, tl.load(OFFSETS + i))
        tl.store(OUT + i, w0.to(tl.int64))
        tl.store(OUT + N + i, w1.to(tl.int64))
        tl.store(OUT + 2 * N + i, w2.to(tl.int64))
        tl.store(OUT + 3 * N + i, w3.to(tl.int64))

    @triton.jit
    def _keep_mask_kernel(OUT, rng_key, T, dropout_p, R: tl.constexpr, C: tl.constexpr):
        rows = tl.arange(0, R)
        keep = _keep_mask(rng_key, rows, 0, T, dropout_p, R, C)  # the query at position r on key c
        tl.store(OUT + rows[:, None] * C + tl.arange(0, C)[None, :], keep.to(tl.int8))

    @triton.jit
    def _keep_mask_tile_kernel(OUT, rng_key, first_row, first_key, T, dropout_p, R: tl.constexpr, C: tl.constexpr):
        r = tl.arange(0, R)
        keep = _keep_mask(rng_key, first_row + r, first_key, T, dropout_p, R, C)  # rows at positions first_row + r
        tl.store(OUT + r[:, None] * C + tl.arange(0, C)[None, :], keep.to(tl.int8))


@needs_triton
@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 2, 77 + (5 << 32)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_philox_matches_triton_randint4x(seed, dtype):
    offsets = [0, 1, 7, 8, 1000, 12345, 2**31 - 1, 46339 * 46340]
    if dtype == torch.int64:
        offsets += [2**32, 2**32 + 5, 2**40 + 3, 2**62 + 1]  # the counter's high word
    offsets += [0] * (16 - len(offsets))
    out = torch.empty(4 * 16, dtype=torch.int64, device=DEVICE)
    _randint4x_kernel[(1,)](torch.tensor(offsets, dtype=dtype, device=DEVICE), out, seed, N=16)
    words = np.stack(tiled.philox4x32(seed, offsets)).astype(np.int64).reshape(-1)
    assert (out.cpu().numpy() == words).all()


@needs_triton
def test_philox_key_layout_is_read_off_the_kernel():
    """With p = 1/2 a key is kept when bit 15 of its draw is set: for each of the 8 keys of a group, exactly one of
    the 8 (word, half) candidates of the NumPy Philox has the kernel's kept/dropped pattern over 64 x 8 calls."""
    R = C = 64
    rng_key = 99 + (3 << 32)
    out = torch.empty(R, C, dtype=torch.int8, device=DEVICE)
    _keep_mask_kernel[(1,)](out, rng_key, C, 0.5, R=R, C=C)
    kept = out.cpu().numpy().astype(bool).reshape(R, C // 8, 8)
    counters = np.arange(R)[:, None] * C + 8 * np.arange(C // 8)[None, :]
    words = tiled.philox4x32(rng_key, counters)
    layout = []
    for r in range(8):
        matches = [(w, h) for w in range(4) for h in range(2)
                   if ((words[w] >> np.uint32(16 * h + 15)) & 1).astype(bool).tolist() == kept[..., r].tolist()]
        assert len(matches) == 1, f"key {r}: candidates {matches}"
        layout.append(matches[0])
    assert tuple(layout) == tiled.PHILOX_KEY_LAYOUT
    assert tiled.PHILOX_KEY_LAYOUT == ((0, 0), (2, 0), (1, 0), (3, 0), (0, 1), (2, 1), (1, 1), (3, 1))


def _kernel_keep_mask(B, H, Tq, Tk, p, seed):
    """The keep mask the kernel applied, read off its output: with q = k = 0 every visible weight is 1 / (a + 1)
    > 0, and with v = the identity output column j of row i is that weight on key j if kept, else 0."""
    q = torch.zeros(B, H, Tq, Tk, device=DEVICE)
    k = torch.zeros(B, H, Tk, Tk, device=DEVICE)
    v = torch.eye(Tk, device=DEVICE).expand(B, H, Tk, Tk)
    o, _ = attention_fwd(q, k, v, p, 1.0, torch.tensor([seed]))
    positions = torch.arange(Tk - Tq, Tk, device=DEVICE, dtype=torch.float32)
    kept = o != 0
    # kept weights are exactly 1 / ((a + 1) (1 - p))
    expect = (1.0 / ((positions + 1) * (1 - p)))[:, None].expand(Tq, Tk)
    torch.testing.assert_close(o[kept], expect.expand(B, H, Tq, Tk)[kept], rtol=1e-5, atol=0)
    return kept.cpu()


@needs_triton
@pytest.mark.parametrize("B,H,Tq,Tk,p,seed", [(1, 3, 24, 24, 0.3, 7), (2, 1, 5, 29, 0.5, 2**31 - 2),
                                              (1, 2, 17, 17, 0.1, 12345)])
def test_numpy_keep_mask_is_the_kernels(B, H, Tq, Tk, p, seed):
    kept = _kernel_keep_mask(B, H, Tq, Tk, p, seed)
    ours = _keep(seed, B, H, Tq, Tk, p) & torch.from_numpy(_visible(Tq, Tk))
    assert torch.equal(kept, ours)


@needs_triton
def test_tiled_dropout_forward_is_the_kernels_output():
    """Random q, k, v through the kernel and through the mirror with the same seed: the same output. The op
    draws its seed from torch's CPU generator (torch.randint(0, 2**31 - 1, (1,)) in kernels/attention.py), so
    pinning the generator pins the seed."""
    B, H, Tq, Tk, D, p = 1, 2, 11, 19, 8, 0.25
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = (torch.randn(B, H, Tk, D, generator=g) for _ in range(2))
    torch.manual_seed(31)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    torch.manual_seed(31)
    out = causal_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), dropout_p=p).cpu()
    o, lse = tiled.attention_forward(q, k, v, 16, 8, dropout_p=p, seed=seed)
    torch.testing.assert_close(out, o, rtol=1e-5, atol=1e-6)
    o_kernel, lse_kernel = attention_fwd(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), p, 1 / math.sqrt(D),
                                         torch.tensor([seed]))
    torch.testing.assert_close(o_kernel.cpu(), o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_kernel.cpu(), lse, rtol=1e-5, atol=1e-5)  # same layout: (B * H, Tq), base 2
    assert not torch.allclose(o, tiled.attention_forward(q, k, v, 16, 8, dropout_p=p, seed=seed + 1)[0])


@needs_triton
def test_dropout_threshold_rounds_as_the_kernel():
    """p chosen so that p * 2^16 = e + 0.7 for the draw e of one entry: rounded (the kernel), the threshold is
    e + 1 and the entry is dropped; truncated it would be e and the entry kept."""
    R = C = 8
    rng_key = 5
    word, half = tiled.PHILOX_KEY_LAYOUT[3]
    e = int((tiled.philox4x32(rng_key, [2 * C])[word][0] >> np.uint32(16 * half)) & np.uint32(0xFFFF))  # row 2, key 3
    p = (e + 0.7) / 65536
    assert tiled.dropout_threshold(p) == e + 1
    out = torch.empty(R, C, dtype=torch.int8, device=DEVICE)
    _keep_mask_kernel[(1,)](out, rng_key, C, p, R=R, C=C)
    ours = tiled.dropout_keep_mask(rng_key, 0, C, p)
    assert not ours[2, 3] and (out.cpu().numpy().astype(bool) == ours).all()


@needs_triton
@pytest.mark.parametrize("T", [46341, 60000, 65536, 70000])
def test_keep_mask_counters_are_distinct_to_2_32_and_wrap_past_it(T):
    """COURSE.md, lesson 7, answer 2, on the kernel's own ``_keep_mask``: a 16 x 16 tile, the last 16 query
    positions against the 16 keys from 8 * ((T - 16) // 8), whose counters a * T + 8 * (j // 8) pass 2^31
    (T = 46341 = MAX_DROPOUT_T + 1, the first T where any does: some of the tile's; T = 60000, 65536: all of them)
    or 2^32 (T = 70000: all of them).

    The kernel computes the counter in int32 arithmetic, which wraps, and ``tl.randint4x`` reads it as uint32, the
    same 32 bits. So below 2^32 the kernel draws exactly what the NumPy mirror (int64 counters) draws at the true
    counter c — not what it draws at c - 2^31, as it would if the counters collided at 2^31 — and from 2^32 on it
    draws what the mirror draws at c - 2^32, not at c (the mirror carries past 2^32 into Philox's second counter
    word; the kernel has none). ``tiled._keep_mask`` with Tk = 1 draws from given counters: row r's are
    ``base[r] + 8 * (j // 8)``. p = 1/2: each entry is one bit of its draw."""
    from kernels.attention import MAX_DROPOUT_T

    R = C = 16
    p, rng_key = 0.5, 1234 + (3 << 32)  # bh = 3 in the key's high word, as the launcher builds it
    first_row, first_key = T - R, 8 * ((T - C) // 8)  # the key tile starts on a group of 8
    rows, cols = np.arange(first_row, first_row + R), np.arange(first_key, first_key + C)
    counters = rows[:, None].astype(np.int64) * T + 8 * (cols // 8)  # the true values: int64 holds them
    out = torch.empty(R, C, dtype=torch.int8, device=DEVICE)
    _keep_mask_tile_kernel[(1,)](out, rng_key, first_row, first_key, T, p, R=R, C=C)
    kernel = out.cpu().numpy().astype(bool)

    def drawn_at(shift: int) -> np.ndarray:  # the mirror's mask at counters c - shift
        return tiled._keep_mask(rng_key, rows * T - shift, cols, 1, p)

    assert counters.max() >= 2**31
    if T == 46341:
        assert T == MAX_DROPOUT_T + 1 and (counters < 2**31).any()
    if counters.max() < 2**32:  # past int32, below 2^32: the true counters, no collision
        assert (kernel == drawn_at(0)).all()
        if counters.min() >= 2**31:
            assert (kernel != drawn_at(2**31)).any()
    else:  # past 2^32: c draws what c - 2^32 draws
        assert counters.min() >= 2**32
        assert (kernel == drawn_at(2**32)).all() and (kernel != drawn_at(0)).any()
