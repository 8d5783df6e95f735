"""Benchmarks: one module per question.

    python -m benchmarks.kernels    each op (GELU, LayerNorm, causal attention) against PyTorch, pass by pass
    python -m benchmarks.train      end-to-end training-step throughput of the GPT presets
    bash benchmarks/run_all.sh OUT  the tests, both benchmarks and a summary, in one command for a GPU machine

``benchmarks/common.py`` holds what both share: the device's measured ceilings, the timer and the output writers.
See ``benchmarks/README.md`` for what every column means.
"""
