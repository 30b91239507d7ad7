"""Stage-3 fetch of one head's originals from pinned Tier-2 at 128K tokens, against the pinned
host-to-device floor, on the GPU: ``PYTHONPATH=. python benchmarks/fetch_bench.py [--out DIR]``.

Times (wall clock to completion, median of 20, the copies synchronised): the floor (two preallocated
device buffers filled from the pinned rows), ``TieredKVCache._fetch_dense`` as it serves stage 3, and
the gather-then-copy it replaced (advanced indexing makes a pageable CPU copy first); and the stage-1/2
row fetch (``_fetch_rows``, an eighth of one head's tokens) against the pageable gather it replaced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import certkv

HKV, D = 8, 128


def wall_ms(fn: Callable[[], object], reps: int = 20) -> float:
    times = []
    for _ in range(reps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--context", type=int, default=131072)
    args = ap.parse_args()
    n = args.context
    cache = certkv.TieredKVCache(1, HKV, D, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(n // 8192):
        k = torch.randn(1, HKV, 8192, D, generator=gen, device="cuda").half()
        cache.append(0, k, k)
    st = cache._layers[0]
    b, h = torch.tensor([0]), torch.tensor([3])
    dst = [torch.empty(n, D, dtype=torch.float16, device="cuda") for _ in "kv"]

    def floor() -> None:
        dst[0].copy_(st.tier2_k[0, 3, :n], non_blocking=True)
        dst[1].copy_(st.tier2_v[0, 3, :n], non_blocking=True)

    def gather() -> None:
        st.tier2_k[b, h, :n].unsqueeze(1).to("cuda", non_blocking=True)
        st.tier2_v[b, h, :n].unsqueeze(1).to("cuda", non_blocking=True)

    rows = torch.randperm(n)[: n // 8].sort().values  # stage 1/2: an eighth of one head's tokens
    rb, rh = torch.zeros_like(rows), torch.full_like(rows, 3)

    def rows_gather() -> None:  # the gather the row fetch replaced: pageable, then a synchronous copy
        st.tier2_k[rb, rh, rows].to("cuda", non_blocking=True)
        st.tier2_v[rb, rh, rows].to("cuda", non_blocking=True)

    k_r, v_r = cache._fetch_rows(st, rb, rh, rows)
    assert torch.equal(k_r.cpu(), st.tier2_k[0, 3, rows]) and torch.equal(v_r.cpu(), st.tier2_v[0, 3, rows])
    k_d, v_d = cache._fetch_dense(st, b, h)
    assert torch.equal(k_d[0, 0].cpu(), st.tier2_k[0, 3, :n]) and torch.equal(v_d[0, 0].cpu(), st.tier2_v[0, 3, :n])
    nbytes = 2 * n * D * 2
    result = {"device": torch.cuda.get_device_name(), "context": n, "bytes": nbytes}
    for name, fn in (("floor", floor), ("fetch_dense", lambda: cache._fetch_dense(st, b, h)), ("gather", gather)):
        ms = wall_ms(fn)
        result[f"{name}_ms"] = ms
        result[f"{name}_gb_per_s"] = nbytes / ms / 1e6
    result["rows"] = len(rows)
    for name, fn in (("fetch_rows", lambda: cache._fetch_rows(st, rb, rh, rows)), ("rows_gather", rows_gather)):
        result[f"{name}_ms"] = wall_ms(fn)
    result["fetch_dense_over_floor"] = result["fetch_dense_ms"] / result["floor_ms"]
    result["gather_over_floor"] = result["gather_ms"] / result["floor_ms"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fetch_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
