"""Triton kernels of certkv, installed as ``certkv.kernels`` (never as a top-level ``kernels``).

``decode``: split-K decode attention over the paper's Tier-1 layout, beside its float64 torch
reference. It computes the stage-0 output only; until its fused certificate lands, certkv serves every
step through the torch path in ``certkv.attention`` (docs/benchmarks.md has its measurements).

``append``: quantizes and packs whole blocks into the paper layout in one launch, bit for bit the
torch quantizer's output; ``TieredKVCache`` appends through it on CUDA.
"""
