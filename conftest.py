"""Shared by tests/ and property_tests/: set up before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():  # without a GPU, Triton kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's test command) each worker gets its share of the cores for torch's
# intra-op threads: a worker per core each running torch on every core oversubscribes the CPU.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
