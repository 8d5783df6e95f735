"""The checks of the row-wise kernels' exercises: GELU (lesson 3), LayerNorm (lesson 4), the cross-entropy's row
softmax (lesson 5)."""
from __future__ import annotations

import math
from types import ModuleType

import torch

from .compare import _compare, _dtype_name, _generator, _grad, failed_so_far


GELU_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # relative to max(|dx|, 1), as in tests/test_gelu.py
GELU_SHAPES = [(7,), (1, 1, 1023), (3, 7, 256)]


def _gelu_backward_variants(x: torch.Tensor, dy: torch.Tensor, approximate: str) -> dict[str, torch.Tensor]:
    """Known wrong answers for dx = dy * GELU'(x), in float64."""
    from kernels.definitions import gelu_math

    other = "none" if approximate == "tanh" else "tanh"
    if approximate == "tanh":
        u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x ** 2)
        s = torch.sigmoid(2 * u)  # 0.5 (1 + tanh(u))
        first, missing_factor = s, s + x * s * (1 - s) * du
        factor = "a factor 2 in the second term: d/du sigmoid(2u) = 2 sigmoid(2u) (1 - sigmoid(2u))"
    else:
        first = 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # Phi(x)
        missing_factor = first + x * torch.exp(-x * x / 2)
        factor = "the 1/sqrt(2 pi) of the normal density phi(x)"
    form = {"tanh": "tanh", "none": "erf"}
    return {
        f"the derivative of the other GELU form ({form[other]} where {form[approximate]} was asked): "
        f"check which branch is TANH": _grad(gelu_math, x, dy, other),
        "GELU(x) itself, not its derivative": dy * gelu_math(x, approximate),
        "the first term of the product rule alone: d/dx [x Phi(x)] = Phi(x) + x Phi'(x)": dy * first,
        f"the derivative without {factor}": dy * missing_factor,
    }


def check_gelu_backward(module: ModuleType, device: str) -> None:
    from kernels.definitions import gelu_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for dtype in (torch.float32, torch.float16):
        for approximate in ("tanh", "none"):
            for shape in GELU_SHAPES:
                g = _generator(sum(shape))
                x = (3 * torch.randn(shape, generator=g)).to(device, dtype)  # both tails and the bend near 0
                dy = torch.randn(shape, generator=g).to(device, dtype)
                dx = module.gelu_backward(x, dy, approximate)
                exact = _grad(gelu_math, x.double(), dy.double(), approximate)
                scale = max(exact.abs().max().item(), 1.0)
                _compare("dx", dx, exact, _grad(torch_backend.gelu, x, dy, approximate), against="autograd",
                         case=f"approximate={approximate!r}, {_dtype_name(dtype)}, shape {shape}",
                         floor=torch.finfo(dtype).eps * scale, bound=GELU_TOL[dtype] * scale,
                         variants=_gelu_backward_variants(x.double(), dy.double(), approximate))


LAYER_NORM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}  # relative to max(|dx|, 1), as tests/test_layer_norm.py
LAYER_NORM_SHAPES = [(3, 7), (37, 48), (1, 1, 1023)]


def _layer_norm_dx_variants(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, eps: float,
                            block_c: int) -> dict[str, torch.Tensor]:
    """Known wrong answers for LayerNorm's dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w, in float64."""
    width = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    g = dy * w

    def dx(g, sum_g, sum_g_xhat, n):
        return (g - sum_g / n - xhat * sum_g_xhat / n) * rstd

    sum_g, sum_g_xhat = g.sum(-1, keepdim=True), (g * xhat).sum(-1, keepdim=True)
    return {
        "dx without the mean terms (g * rstd alone): the row means of g and of g * xhat come from every x": g * rstd,
        "dx without the mean of g": dx(g, 0, sum_g_xhat, width),
        "dx without the mean of g * xhat": dx(g, sum_g, 0, width),
        "the row sums divided by the block size BLOCK_C where the row has `width` elements":
            dx(g, sum_g, sum_g_xhat, block_c),
        "g = dy without the weight w": dx(dy, dy.sum(-1, keepdim=True), (dy * xhat).sum(-1, keepdim=True), width),
    }


def check_layer_norm_dx(module: ModuleType, device: str) -> None:
    from kernels.definitions import EPS, layer_norm_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for dtype in (torch.float32, torch.float16):
        for shape in LAYER_NORM_SHAPES:
            g = _generator(shape[-1])
            C = shape[-1]
            x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)  # off-centre, not unit scale
            w = (1 + 0.5 * torch.randn(C, generator=g)).to(device, dtype)
            b = (0.5 * torch.randn(C, generator=g)).to(device, dtype)
            dy = torch.randn(shape, generator=g).to(device, dtype)
            dx = module.layer_norm_dx(x, w, dy, EPS)
            exact = _grad(layer_norm_math, x.double(), dy.double(), w.double(), b.double(), EPS)
            scale = max(exact.abs().max().item(), 1.0)
            _compare("dx", dx, exact, _grad(torch_backend.layer_norm, x, dy, w, b, EPS), against="autograd",
                     case=f"{_dtype_name(dtype)}, shape {shape}", floor=torch.finfo(dtype).eps * scale,
                     bound=LAYER_NORM_TOL[dtype] * scale,
                     variants=_layer_norm_dx_variants(x.double(), w.double(), dy.double(), EPS,
                                                      block_c=1 << (C - 1).bit_length()))


# ----------------------------------------------------------------------------------------------------------------
# Exercise layer_norm_forward (lesson 4): the forward kernel from zero, with its launcher's grid
#
# y, mean and rstd against float64 (y by the formula of kernels/definitions.py; mean and rstd, which the kernel keeps
# in float32, against PyTorch's own statistics in float32, torch.native_layer_norm's). Each input is the head of a
# buffer whose tail holds NaN, as memory past a tensor may: a load without a mask reads it and shows as a NaN.

# (shape, spread of x): widths that BLOCK_C pads (7, 100, GPT-2's 768, 1000) and one it does not (64), rows that
# end in a partial program; x off-centre (mean 0.5), so that padded lanes counted in a sum show; and rows of small
# spread (variance 0.01), where the place of eps shows
LAYER_NORM_FORWARD_CASES = [((3, 7), 2.0), ((2, 5, 100), 2.0), ((2, 768), 2.0), ((3, 1000), 2.0), ((5, 64), 2.0),
                            ((6, 24), 0.1)]
# Rows of one feature (variance 0: rstd = 1 / sqrt(eps)), run once the cases above pass, since a wrong variance
# is named there better than by the NaN that a division by C - 1 = 0 makes here
LAYER_NORM_FORWARD_LAST_CASES = [((5, 1), 2.0)]


def _nan_past_the_end(x: torch.Tensor, tail: int) -> torch.Tensor:
    """``x``'s values, contiguous, at the head of a buffer whose next ``tail`` elements are NaN."""
    buffer = torch.full((x.numel() + tail,), float("nan"), dtype=x.dtype, device=x.device)
    buffer[:x.numel()] = x.flatten()
    return buffer[:x.numel()].view(x.shape)


def _layer_norm_forward_variants(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                                 block_c: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Known wrong answers (y, mean, rstd) of LayerNorm's forward, in float64."""
    width = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    sum_sq = ((x - mean) ** 2).sum(-1, keepdim=True)

    def forward(mean, var, rstd=None, w=w, b=b):
        rstd = torch.rsqrt(var + eps) if rstd is None else rstd
        return (x - mean) * rstd * w + b, mean[..., 0], rstd[..., 0]

    block_mean = x.sum(-1, keepdim=True) / block_c
    var = sum_sq / width
    return {
        "the row sums divided by the block size BLOCK_C where the row has `width` elements (mean and variance)":
            forward(block_mean, ((x - block_mean) ** 2).sum(-1, keepdim=True) / block_c),
        "a variance with the padded lanes in it: x - mean is -mean there, so zero it (tl.where(mask, ..., 0.0)) "
        "before squaring": forward(mean, (sum_sq + (block_c - width) * mean ** 2) / width),
        "a variance without the mean subtracted, sum(x^2) / C: it is sum((x - mean)^2) / C":
            forward(mean, (x * x).sum(-1, keepdim=True) / width),
        "the unbiased variance, divided by C - 1: LayerNorm's is the biased one, divided by C":
            forward(mean, sum_sq / (width - 1)),
        "eps outside the square root: rstd = 1 / sqrt(var + eps)": forward(mean, var, 1 / (var.sqrt() + eps)),
        "y without the bias b: y = xhat * w + b": forward(mean, var, b=0.0),
        "y without the weight w: y = xhat * w + b": forward(mean, var, w=1.0),
    }


def check_layer_norm_forward(module: ModuleType, device: str) -> None:
    from kernels.definitions import EPS, layer_norm_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for cases in (LAYER_NORM_FORWARD_CASES, LAYER_NORM_FORWARD_LAST_CASES):
        if cases is LAYER_NORM_FORWARD_LAST_CASES and failed_so_far():
            return
        for dtype in (torch.float32, torch.float16):
            for shape, spread in cases:
                g = _generator(sum(shape))
                C = shape[-1]
                block_c = 1 << (C - 1).bit_length()
                x = (torch.randn(shape, generator=g) * spread + 0.5).to(device, dtype)
                w = (1 + 0.5 * torch.randn(C, generator=g)).to(device, dtype)
                b = (0.5 * torch.randn(C, generator=g)).to(device, dtype)
                y, mean, rstd = module.layer_norm_forward(_nan_past_the_end(x, module.BLOCK_M * block_c), w, b, EPS)
                x64, w64, b64 = x.double(), w.double(), b.double()
                exact = (layer_norm_math(x64, w64, b64, EPS), x64.mean(-1),
                         torch.rsqrt(x64.var(-1, unbiased=False) + EPS))
                _, torch_mean, torch_rstd = torch.native_layer_norm(x.float(), (C,), w.float(), b.float(), EPS)
                in_torch = (torch_backend.layer_norm(x, w, b, EPS), torch_mean.view(shape[:-1]),
                            torch_rstd.view(shape[:-1]))
                wrong = _layer_norm_forward_variants(x64, w64, b64, EPS, block_c)
                case = f"{_dtype_name(dtype)}, shape {shape}" + (f", x spread {spread}" if spread != 2.0 else "")
                for i, (what, got, stored) in enumerate((("y", y, dtype), ("mean", mean, torch.float32),
                                                         ("rstd", rstd, torch.float32))):
                    scale = max(exact[i].abs().max().item(), 1.0)
                    _compare(what, got, exact[i], in_torch[i], against="float64 math", case=case,
                             floor=torch.finfo(stored).eps * scale, bound=LAYER_NORM_TOL[stored] * scale, dtype=dtype,
                             variants={name: outputs[i] for name, outputs in wrong.items()})


def check_elementwise_gelu(module: ModuleType, device: str) -> None:
    from kernels.definitions import gelu_math
    from kernels.torch_backend import TorchBackend

    torch_backend = TorchBackend()
    for dtype in (torch.float32, torch.float16):
        for approximate in ("tanh", "none"):
            for shape in GELU_SHAPES:
                x = (3 * torch.randn(shape, generator=_generator(sum(shape)))).to(device, dtype)
                y = module.gelu_forward(x, approximate)
                exact = gelu_math(x.double(), approximate)
                scale = max(exact.abs().max().item(), 1.0)
                _compare("y", y, exact, torch_backend.gelu(x, approximate), against="float64 math",
                         case=f"approximate={approximate!r}, {_dtype_name(dtype)}, shape {shape}",
                         floor=torch.finfo(dtype).eps * scale, bound=GELU_TOL[dtype] * scale)


# (rows, V): rows that fit in one tile of the exercise's BLOCK_V = 16 (a partial one, and one exactly full), then rows
# of several tiles with a partial last one; the rows' logits are shifted far apart (exp of an unshifted row overflows)
ROW_SOFTMAX_CASES = [(3, 5), (3, 16), (3, 37), (3, 100)]


def check_row_softmax(module: ModuleType, device: str) -> None:
    for rows, V in ROW_SOFTMAX_CASES:
        g = _generator(V)
        z = 4 * torch.randn(rows, V, generator=g) + torch.tensor([0.0, 90.0, -90.0])[:rows, None]
        targets = torch.randint(0, V, (rows,), generator=g)
        grad_scale = torch.rand(rows, generator=g) + 0.5
        logits = z.clone().to(device)
        loss = module.cross_entropy_rows(logits, targets.to(device), grad_scale.to(device))
        onehot = torch.nn.functional.one_hot(targets, V)
        zd = z.double()
        exact_loss = torch.logsumexp(zd, -1) - zd.gather(1, targets[:, None])[:, 0]
        exact_grad = grad_scale.double()[:, None] * (torch.softmax(zd, -1) - onehot)
        torch_loss = torch.logsumexp(z, -1) - z.gather(1, targets[:, None])[:, 0]
        torch_grad = grad_scale[:, None] * (torch.softmax(z, -1) - onehot)
        tiles = math.ceil(V / module.BLOCK_V)
        case = (f"float32, (rows, V) = {(rows, V)}, BLOCK_V = {module.BLOCK_V}: "
                f"{'one tile a row' if tiles == 1 else f'{tiles} tiles a row'}")
        # the floor: a few roundings of the exponent s = z log2(e), each an error of |s| eps in 2^s
        conditioning = 4 * torch.finfo(torch.float32).eps * max(1.0, z.abs().max().item())
        _compare("loss (log-sum-exp - the target's logit)", loss, exact_loss, torch_loss, against="float64 math",
                 case=case, floor=conditioning)  # lse's error: |s| eps, absolute
        _compare("softmax - onehot (times g)", logits, exact_grad, torch_grad, against="float64 math", case=case,
                 floor=conditioning * max(1.0, exact_grad.abs().max().item()))
