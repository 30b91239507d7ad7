"""One decode-kernel configuration, run a few times, for a profiler (ncu) to attach to.

``PYTHONPATH=. ncu --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 --section
SpeedOfLight --section WarpStateStats python benchmarks/profile_decode.py --context 131072 --batch 1``
"""

from __future__ import annotations

import argparse

import torch
from certkv.kernels.decode import decode

from benchmarks.decode_bench import HKV, HQ, VARIANTS, D, tier1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variant", default="fp16_b64_w8", choices=sorted(VARIANTS))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    t1, _, _ = tier1(args.batch, args.context, torch.float16, gen)
    q = torch.randn(args.batch, HKV, HQ // HKV, D, generator=gen, device="cuda").half()
    for _ in range(4):
        decode(q, t1, D**-0.5, **VARIANTS[args.variant])
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
