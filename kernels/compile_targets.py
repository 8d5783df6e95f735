"""What ``python -m kernels.compile_check`` compiles: every (kernel, configuration) the project launches on a GPU.

One function per kernel file, each returning one dict per target with the keys ``kernels/compile_check.py``
describes (name, fn, signature, constexprs, num_warps, num_stages, and optionally config, aligned,
spills_allowed). Building the lists launches nothing; the kernel files stay about their kernels, and every
configuration that must compile is listed here, in one place.
"""
from __future__ import annotations

import inspect

import torch

from .attention import _attention_bwd_dkdv, _attention_bwd_dq, _attention_bwd_preprocess, _attention_fwd
from .attention_tiles import PREPROCESS_TILES, SMALL_Q_MAX, block_d, dot_precision, tiles_for
from .gelu import BLOCK, _gelu_bwd, _gelu_fwd
from .gelu import NUM_WARPS as GELU_NUM_WARPS
from .layer_norm import REDUCE_BLOCK_C, REDUCE_BLOCK_G, REDUCE_NUM_WARPS, _layer_norm_bwd_dwdb, _layer_norm_bwd_dx, \
    _layer_norm_fwd, backward_tile, row_tile
from .linear_cross_entropy import BLOCK_V, _cross_entropy_row_block, _cross_entropy_rows_step
from .linear_cross_entropy import NUM_WARPS as ROWS_NUM_WARPS

__all__ = ["TARGETS", "attention_targets", "gelu_targets", "layer_norm_targets", "linear_cross_entropy_targets"]

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # Triton's names for them
_ATTENTION_DTYPES = {dtype: TRITON_DTYPE[dtype] for dtype in (torch.float16, torch.bfloat16, torch.float32)}


# ----------------------------------------------------------------------------------------------------------------
# Attention (kernels/attention.py)

_COMPILE_HEAD_DIMS = (16, 32, 64, 128, 80)  # the power-of-two tiles and one padded (80 -> 128)
_DOCS_HEAD_DIMS = (64, 128, 80)  # packed documents (DOCS): GPT-2's head dim, the largest tile, the padded one


def _signature(fn, ty: str) -> dict:
    """Triton types of ``fn``'s arguments for ``ty`` inputs (pointers are the capitalized names), and the integer
    arguments a launch on ordinary tensors sees as multiples of 16 (the strides), which lets Triton vectorize and
    pipeline the loads."""
    sig = {}
    for name, param in inspect.signature(fn.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("DOC_START", "DOC_END"):
            sig[name] = "*i32"
        elif name.isupper() and name != "H":
            sig[name] = f"*{ty}"
        elif name in ("qk_scale", "sm_scale", "dropout_p"):
            sig[name] = "fp32"
        else:  # strides, H, Tq, Tk, seed
            sig[name] = "i32"
    return dict(signature=sig, aligned=[name for name in sig if name.startswith("stride_")])


def attention_targets() -> list[dict]:
    """The four attention kernels: every dtype and head dim (the power-of-two tiles and one padded), the training
    tiles with and without dropout, each tuner alternative, the few-query tiles, and a decoding step; and with packed
    documents, the default training tiles with and without dropout at three head dims."""
    targets = []
    for dtype, ty in _ATTENTION_DTYPES.items():
        for head_dim in _COMPILE_HEAD_DIMS:
            sizes = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim))
            pre = PREPROCESS_TILES
            targets.append(dict(
                name=f"attention_bwd_preprocess_{ty}_d{head_dim}", fn=_attention_bwd_preprocess,
                **_signature(_attention_bwd_preprocess, ty), constexprs=dict(sizes, BLOCK_M=pre.BLOCK_M),
                num_warps=pre.num_warps, num_stages=pre.num_stages,
            ))
            many_q = tiles_for(dtype, head_dim, SMALL_Q_MAX + 1, SMALL_Q_MAX + 1, interpreting=False)
            few_q = tiles_for(dtype, head_dim, 1, 1, interpreting=False)
            for kernel, fn in (("fwd", _attention_fwd), ("dkdv", _attention_bwd_dkdv), ("dq", _attention_bwd_dq)):
                # the training tiles; then the few-query tiles where they differ ("_smallq")
                for label, tiles in (("", many_q[kernel]), ("_smallq", few_q[kernel])):
                    if label and tiles == many_q[kernel]:
                        continue
                    for i, t in enumerate(tiles):  # the default, then the tuner's alternatives
                        docs_too = not label and i == 0 and head_dim in _DOCS_HEAD_DIMS
                        for dropout, docs in [(d, docs) for docs in (False, True)[:1 + docs_too]
                                              for d in (False, True)]:
                            targets.append(dict(
                                name=f"attention_{kernel}_{ty}_d{head_dim}{label}{'_dropout' if dropout else ''}"
                                     f"{'_docs' if docs else ''}{f'_alt{i}' if i else ''}",
                                fn=fn, **_signature(fn, ty), num_warps=t.num_warps, num_stages=t.num_stages,
                                constexprs=dict(sizes, BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, DROPOUT=dropout,
                                                DOT_PRECISION=dot_precision(dtype), DOCS=docs),
                                spills_allowed=i > 0,  # an alternative that spills is only slower: it loses the tuning
                            ))
            # A decoding step, Tq = 1: a launch specializes an integer argument equal to 1 into a constant, so this
            # is a kernel of its own (the forward, what generation runs, with its default tiles).
            t, signature = few_q["fwd"][0], _signature(_attention_fwd, ty)
            signature["signature"]["Tq"] = "constexpr"
            targets.append(dict(
                name=f"attention_fwd_{ty}_d{head_dim}_decode", fn=_attention_fwd, **signature,
                num_warps=t.num_warps, num_stages=t.num_stages,
                constexprs=dict(sizes, Tq=1, BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, DROPOUT=False,
                                DOT_PRECISION=dot_precision(dtype), DOCS=False),
            ))
    return targets


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm (kernels/layer_norm.py)


def layer_norm_targets() -> list[dict]:
    """The LayerNorm kernels, forward and backward.

    Widths: 128 (a small model's, 32 rows per program), GPT-2 small's 768 (4 rows per program), an awkward 1000 (its
    rows are not 16-element aligned), 4096 and the 8192 ceiling we promise to run well (one row per program).
    Dtypes: all three, plus 16-bit activations with float32 parameters (autocast).
    """
    dtype_pairs = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                   (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    targets = []
    for width in (128, 768, 1000, 4096, 8192):
        aligned = ["stride", "width"] if width % 16 == 0 else []
        for x_dtype, w_dtype in dtype_pairs:
            xt, wt = TRITON_DTYPE[x_dtype], TRITON_DTYPE[w_dtype]
            tile = row_tile(width, x_dtype.itemsize, rows=1 << 20, interpreting=False)

            def common(tile):
                return dict(constexprs={"BLOCK_M": tile.BLOCK_M, "BLOCK_C": tile.BLOCK_C}, num_warps=tile.num_warps,
                            num_stages=1, aligned=aligned,
                            config=f"x={xt} w={wt} C={width} BLOCK={tile.BLOCK_M}x{tile.BLOCK_C} w{tile.num_warps}")

            sig = {"X": f"*{xt}", "WEIGHT": f"*{wt}", "BIAS": f"*{wt}", "Y": f"*{xt}", "MEAN": "*fp32",
                   "RSTD": "*fp32", "stride": "i32", "n_rows": "i32", "width": "i32", "eps": "fp32"}
            targets.append(dict(name="layer_norm_fwd", fn=_layer_norm_fwd, signature=sig, **common(tile)))
            sig = {"X": f"*{xt}", "DY": f"*{xt}", "DX": f"*{xt}", "WEIGHT": f"*{wt}", "MEAN": "*fp32",
                   "RSTD": "*fp32", "PARTIAL_DW": "*fp32", "PARTIAL_DB": "*fp32", "stride": "i32", "n_rows": "i32",
                   "width": "i32", "rows_per_group": "i32"}
            targets.append(dict(name="layer_norm_bwd_dx", fn=_layer_norm_bwd_dx, signature=sig,
                                **common(backward_tile(tile))))
    for wt in ("fp32", "fp16", "bf16"):
        sig = {"PARTIAL_DW": "*fp32", "PARTIAL_DB": "*fp32", "DW": f"*{wt}", "DB": f"*{wt}", "n_groups": "i32",
               "width": "i32"}
        targets.append(dict(
            name="layer_norm_bwd_dwdb", fn=_layer_norm_bwd_dwdb, signature=sig,
            constexprs={"BLOCK_G": REDUCE_BLOCK_G, "BLOCK_C": REDUCE_BLOCK_C}, num_warps=REDUCE_NUM_WARPS,
            num_stages=1, aligned=["width"], config=f"w={wt} BLOCK_G={REDUCE_BLOCK_G} BLOCK_C={REDUCE_BLOCK_C}",
        ))
    return targets


# ----------------------------------------------------------------------------------------------------------------
# GELU (kernels/gelu.py)


def gelu_targets() -> list[dict]:
    """The GELU kernels, forward and backward, for both approximations and every dtype."""
    targets = []
    for tanh in (True, False):
        for dtype in ("fp32", "fp16", "bf16"):
            common = dict(constexprs={"TANH": tanh, "BLOCK": BLOCK}, num_warps=GELU_NUM_WARPS, num_stages=1,
                          aligned=["n"], config=f"{'tanh' if tanh else 'erf'} {dtype} BLOCK={BLOCK} w{GELU_NUM_WARPS}")
            sig = {"X": f"*{dtype}", "Y": f"*{dtype}", "n": "i32"}
            targets.append(dict(name="gelu_fwd", fn=_gelu_fwd, signature=sig, **common))
            sig = {"X": f"*{dtype}", "DY": f"*{dtype}", "DX": f"*{dtype}", "n": "i32"}
            targets.append(dict(name="gelu_bwd", fn=_gelu_bwd, signature=sig, **common))
    return targets


# ----------------------------------------------------------------------------------------------------------------
# The loss's rows kernel (kernels/linear_cross_entropy.py)


def linear_cross_entropy_targets() -> list[dict]:
    """The loss's rows kernel, and the interpreter's row-block kernel (below).

    The logits are float32 whatever the model's dtype, so the configurations are: with and without the gradient
    sweep, times a row stride that is a multiple of 16 (a padded vocabulary such as 50,304, or a chunk buffer with
    padded rows: Triton then knows every row starts 64-byte aligned and vectorizes the whole tiles' loads) or not
    (GPT-2's 50,257 in a contiguous buffer: 4-byte loads, still coalesced across a warp).
    """
    targets = []
    for has_grad in (True, False):
        for aligned in (True, False):
            sig = {"LOGITS": "*fp32", "TARGETS": "*i64", "LOSS": "*fp32", "GRAD_SCALE": "*fp32", "stride_row": "i32",
                   "n_vocab": "i32", "ignore_index": "i32"}
            targets.append(dict(
                name="linear_cross_entropy_rows_step", fn=_cross_entropy_rows_step, signature=sig,
                constexprs={"HAS_GRAD": has_grad, "BLOCK_V": BLOCK_V}, num_warps=ROWS_NUM_WARPS, num_stages=1,
                aligned=["stride_row"] if aligned else [],
                config=f"{'loss+grad' if has_grad else 'loss'} row stride {'%16 == 0' if aligned else 'unaligned'} "
                       f"BLOCK_V={BLOCK_V} w{ROWS_NUM_WARPS}",
            ))
    # The row-block kernel runs only under the interpreter, with tiles far larger than a GPU's registers; it still
    # has to be valid Triton for the compiler, so it is compiled here at a tile a GPU holds (4 rows of a 1024-wide
    # vocabulary, the rows kernel's tile four times).
    for has_grad in (True, False):
        sig = {"LOGITS": "*fp32", "TARGETS": "*i64", "LOSS": "*fp32", "GRAD_SCALE": "*fp32", "stride_row": "i32",
               "n_rows": "i32", "n_vocab": "i32", "ignore_index": "i32"}
        targets.append(dict(
            name="linear_cross_entropy_row_block", fn=_cross_entropy_row_block, signature=sig,
            constexprs={"HAS_GRAD": has_grad, "BLOCK_ROWS": 4, "BLOCK_V": 1024}, num_warps=ROWS_NUM_WARPS,
            num_stages=1, aligned=[],
            config=f"{'loss+grad' if has_grad else 'loss'} BLOCK_ROWS=4 BLOCK_V=1024 w{ROWS_NUM_WARPS}",
        ))
    return targets


# In the order compile_check reports them
TARGETS = {"attention": attention_targets, "layer_norm": layer_norm_targets, "gelu": gelu_targets,
           "linear_cross_entropy": linear_cross_entropy_targets}
