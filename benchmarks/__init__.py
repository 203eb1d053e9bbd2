"""Benchmarks of maskdit_fast.

``benchmarks.report`` (CLI) and the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``)
time full training steps and the EDM sampler of MaskDiT and the plain DiT baseline;
``benchmarks.kernels.bench`` holds the per-kernel microbenchmarks.
"""
