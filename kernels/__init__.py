"""Triton kernels of certkv, installed as ``certkv.kernels`` (never as a top-level ``kernels``).

``decode``: split-K decode attention over the paper's Tier-1 layout, beside its float64 torch
references; with ``cert=True`` it streams the statistics the step's certificate is built from, and the
cache serves stage 0 through it on CUDA (docs/benchmarks.md has its measurements).

``epilogue``: that certificate in five launches; ``certkv.streaming.certify`` is its torch reference.

``append``: quantizes and packs whole blocks into the paper layout in one launch, bit for bit the
torch quantizer's output; ``TieredKVCache`` appends through it on CUDA.

``launch``: every launch above, past Triton's generic dispatch once Triton has chosen the kernel for
the arguments' specialisation (less host time for eager steps; the same compiled kernels).
"""
