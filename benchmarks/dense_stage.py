"""Stage 3 of the kernel ladder, timed per call: the dense output certified by ``certified_step`` over the
originals (the torch ladder's certificate, ~500 small launches) against the decode kernel's certificate
over the same originals plus the two outputs' distance (``certkv.kernel_ladder.certify_dense``).

Synthetic FP16 cache on the GPU: B = 1, 32 query / 8 KV heads, D = 128, keys N(0, 1), values 0.5 N(0, 1);
``--contexts`` tokens. ``ladder.dense_stage`` is called directly with a stage-0 certificate that accepts
no row of the first ``heads`` KV heads, so exactly those heads go dense. Both variants alternate
``--reps`` times in one process (the host's speed drifts between runs); medians of synchronised wall
time, with the bounds they certify.

    PYTHONPATH=. python benchmarks/dense_stage.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from certkv.kernels.decode import from_cache

import certkv
from certkv.kernel_ladder import certify_dense
from certkv.ladder import dense_stage
from certkv.streaming import kernel_step


def measure(n: int, heads_list: list[int], reps: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """Both variants at ``n`` tokens, for each number of heads sent dense."""
    cfg = certkv.CertConfig()
    scale = 128**-0.5
    k = torch.randn(1, 8, n, 128, device="cuda", generator=gen).half()
    v = (torch.randn(1, 8, n, 128, device="cuda", generator=gen) * 0.5).half()
    q = torch.randn(1, 8, 4, 128, device="cuda", generator=gen).half()
    cache = certkv.TieredKVCache(1, 8, 128, config=cfg, device="cuda")
    cache.append(0, k, v)
    st = cache._layers[0]
    out, cert = kernel_step(q, from_cache(cache, 0), scale, st.v_min, st.v_max)

    def fetch(b: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cache._fetch_dense(st, b, h)

    def kernel(pairs: tuple[torch.Tensor, ...], *qkv: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return certify_dense(pairs, *qkv, scale, cfg, st.v_min, st.v_max)[:2]

    variants = {"torch": None, "kernel": kernel}
    rows = []
    for heads in heads_list:
        cert.tolerance = torch.full_like(cert.output_bound, 0.02)
        cert.accepted = torch.ones_like(cert.accepted)
        cert.accepted[:, :heads] = False
        times: dict[str, list[float]] = {name: [] for name in variants}
        bounds: dict[str, float] = {}
        for rep in range(reps + 1):  # the first round compiles and warms
            for name, certify in variants.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _, served = dense_stage(q, scale, cfg, out, cert, fetch, n, certify)
                torch.cuda.synchronize()
                if rep:
                    times[name].append(1e3 * (time.perf_counter() - t0))
                bounds[name] = float(served.output_bound[:, :heads].max())
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"context": n, "dense_heads": heads, "ms": ms, "ms_all": times, "max_output_bound": bounds})
        print(json.dumps({"context": n, "dense_heads": heads, "ms": ms, "max_output_bound": bounds}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768, 131072])
    ap.add_argument("--heads", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for n in args.contexts:
        rows += measure(n, args.heads, args.reps, gen)
        torch.cuda.empty_cache()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    (out_dir / "dense_stage.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
