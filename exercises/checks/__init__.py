"""The checks behind ``python -m exercises check``, one function per exercise (``check_<exercise>(module, device)``),
grouped by the kernels they test; exercises/check.py registers them and runs them. Each uses the inputs and
tolerances of its real kernel's tests, on shapes the interpreter runs in a moment (a partial last block or tile,
widths and head dims that are not powers of two).

- ``compare``: comparing a result with float64 and PyTorch in the same dtype, recording every comparison, and naming
  what the failures have in common.
- ``rows``: the row-wise kernels (GELU, LayerNorm, the cross-entropy's row softmax).
- ``attention``: the attention forward, its inner loop, the backward's delta, the causal tile bounds.
- ``dropout``: attention's dropout keep mask, bit for bit.
- ``documents``: the tile bounds of packed documents.
"""
