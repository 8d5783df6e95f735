"""Benchmarks: one module per question.

    python -m benchmarks.kernels    each op (GELU, LayerNorm, the fused loss, causal attention) against PyTorch,
                                    pass by pass; the loss's peak memory too
    python -m benchmarks.train      end-to-end training steps of the GPT presets: throughput, memory per step and
                                    the largest batch in a memory budget, with the fused loss and without
    python -m benchmarks.generate   tokens/s with the KV cache, without it, and against transformers' GPT-2
    python -m benchmarks.profile    a training step's time by op group (matmuls, attention, ..., the optimizer)
    bash benchmarks/run_all.sh OUT  the tests, the four benchmarks and a summary, in one command for a GPU machine

What they share: ``benchmarks/common.py`` (options, checks, device, the row loop), ``benchmarks/timing.py`` (the
timer and the device's measured ceilings), ``benchmarks/results.py`` (the output files, tables and figures),
``benchmarks/memory.py`` (peak memory on either device). The kernels benchmark is one harness over one module per op
(``benchmarks/ops/``). See ``benchmarks/README.md`` for what every column means.
"""
