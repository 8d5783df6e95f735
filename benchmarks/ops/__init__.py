"""One module per op of ``python -m benchmarks.kernels``, each writing only its setup and contenders
(``benchmarks/ops/interface.py`` lists what); the harness in ``benchmarks/kernels.py`` does the rest for all."""
from __future__ import annotations

from benchmarks.ops import attention, doc_attention, gelu, layer_norm, linear_cross_entropy

# Run in this order, the headline first (attention, then attention over packed documents, which builds on it): when
# a time budget runs out, the tail is what is lost.
MODULES = {m.NAME: m for m in (attention, doc_attention, linear_cross_entropy, layer_norm, gelu)}
OPS = tuple(MODULES)
