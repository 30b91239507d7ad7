"""Host time of an eager certified step: Triton's own dispatch against ``certkv.kernels.launch``.

Run from the repository root on a CUDA machine: ``PYTHONPATH=. python benchmarks/eager_host.py``.
For B = 1 at 8K and B = 8 at 128K (H_q/H_kv = 32/8, D = 128, FP16, the serving launch), ``kernel_step``
is queued 20 times without synchronising and the host time per call is taken, 30 times for each
path, alternating so that both see the same host load. Writes ``eager_host_launch.json``: the median
and the smallest host microseconds per call of each path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton
from certkv.kernels import launch

from benchmarks.decode_bench import HKV, HQ, D, tier1
from certkv.streaming import kernel_step


def host_times(b: int, n: int, rounds: int = 30, calls: int = 20) -> dict[str, float]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    t1, _, v = tier1(b, n, torch.float16, gen)
    q = torch.randn(b, HQ, 1, D, generator=gen, device="cuda").half().reshape(b, HKV, HQ // HKV, D)
    v_min, v_max = v.amin(2), v.amax(2)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for direct in (False, True):
            launch.ENABLED = direct
            for _ in range(3):
                kernel_step(q, t1, D**-0.5, v_min, v_max)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                kernel_step(q, t1, D**-0.5, v_min, v_max)
            times[direct].append((time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
    launch.ENABLED = True
    return {
        f"{'direct' if direct else 'triton'}_{stat}": round(f(times[direct]), 1)
        for direct in (False, True)
        for stat, f in (("median", statistics.median), ("min", min))
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    rows = {}
    for b, n in ((1, 8192), (8, 131072)):
        rows[f"b{b}_n{n}"] = host_times(b, n)
        print(json.dumps({f"b{b}_n{n}": rows[f"b{b}_n{n}"]}), flush=True)
    result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
              "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eager_host_launch.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
