"""One certified attend at long context through the ladder on the decode kernel against the torch
ladder (``CertConfig.decode_kernel`` "always" vs "never"), on the H100.

Synthetic FP16 cache: B = 1, 32 query / 8 KV heads, D = 128, ``--context`` tokens of N(0, 1) keys and
0.5 N(0, 1) values, with 16 tokens per head whose keys lie along their head's queries (heavy attention,
so fetching can certify). Three tolerances: loose (stage 0 or 2), 0.03 (stage 2 on the kernel) and
0.003 (below the dense path's own rounding bound: stage 3, reported over tolerance). Three attends
each, the first including compilation; milliseconds, stages served, rows fetched, peak GPU memory.

    PYTHONPATH=. python benchmarks/ladder_long.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import certkv


def peaked_inputs(
    batch: int, n: int, queries: int, dtype: torch.dtype, gen: torch.Generator, peaked: range
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A synthetic cache of 8 KV heads, D = 128, in ``dtype`` on ``gen``'s device: keys N(0, 1), values
    0.5 N(0, 1) [batch, 8, n, 128], ``queries`` queries N(0, 1) [batch, 32, 1, 128], and in the KV heads
    ``peaked`` 16 tokens (one set of positions) whose keys lie along the first query's group mean, 5 sqrt(D)
    long: heavy attention, which fetching those tokens can certify."""
    dev = gen.device
    k = torch.randn(batch, 8, n, 128, device=dev, generator=gen).to(dtype)
    v = (torch.randn(batch, 8, n, 128, device=dev, generator=gen) * 0.5).to(dtype)
    qs = [torch.randn(batch, 32, 1, 128, device=dev, generator=gen).to(dtype) for _ in range(queries)]
    heavy = torch.randint(4, n - 256, (16,), device=dev, generator=gen)
    for h in peaked:
        qd = qs[0][:, 4 * h : 4 * h + 4, 0].float().mean(1)  # [batch, D]
        k[:, h, heavy] = (5.0 * 128**0.5 * qd / qd.norm(dim=-1, keepdim=True)).to(dtype)[:, None, :]
    return k, v, qs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    n = args.context
    k, v, (q,) = peaked_inputs(1, n, 1, torch.float16, torch.Generator(device="cuda").manual_seed(0), range(8))
    rows = []
    for tol in (1.0, 0.03, 0.003):
        for mode in ("always", "never"):
            cfg = certkv.CertConfig(decode_kernel=mode, out_tol=tol, out_rtol=0.0, promote_after=100)
            cache = certkv.TieredKVCache(1, 8, 128, config=cfg, device="cuda")
            cache.append(0, k, v)
            torch.cuda.reset_peak_memory_stats()
            ms = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = cache.attend(0, q)
                torch.cuda.synchronize()
                ms.append((time.perf_counter() - t0) * 1e3)
            cert = res.certificate
            row = {
                "out_tol": tol, "decode_kernel": mode, "ms": ms,
                "stages": torch.bincount(cert.stage.flatten(), minlength=4).tolist(),
                "accepted": int(cert.accepted.sum()), "heads": cert.stage.numel(),
                "kernel_steps": cache.kernel_steps, "max_output_bound": float(cert.output_bound.max()),
                "fetched_rows_max": int(cert.fetched_keys.max()),
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            del cache
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "context": n, "rows": rows}
    (out / "ladder_long.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
