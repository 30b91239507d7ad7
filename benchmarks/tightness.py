"""How tight is each certificate term? bound / exact actual, on random data and on real attention.

Random: Gaussian q, k, v (with and without an outlier key channel), default quantization layout.
Real: the post-RoPE q, k, v of every layer of the bundled tinylm model on held-out text, replayed as
decode steps through a cache with the default configuration (stage 0 only, so every term is a
quantization term), plus the stage distribution with the default ladder.

Every ratio is a claimed bound over its exact value from ``certkv.reference.exact`` (both >= 0; pairs
with an exact value of 0 are counted separately). Usage (CPU, a few minutes):
``python benchmarks/tightness.py --out benchmarks/results/tightness.json``
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import certkv
from certkv.capture import DEFAULT_MODEL, capture, load_model
from certkv.codec import TextCodec
from certkv.reference.verify import CLAIMS, verify_step


def _collect(stats: dict, checks: list, baseline: list[float] | None = None) -> None:
    for chk in checks:
        assert not chk.violations, chk
        stats["stage"].append(chk.stage)
        for name in CLAIMS:
            actual = chk.exact[name]
            if actual > 0:
                stats[name].append(chk.claimed[name] / actual)
            else:
                stats[f"{name}_exact_zero"].append(1)


def _summary(stats: dict) -> dict:
    out = {}
    for name, vals in stats.items():
        if name == "stage":
            out["stage_histogram"] = {str(s): int(c) for s, c in zip(*np.unique(vals, return_counts=True))}
        elif name.endswith("_exact_zero") or name.endswith("_count"):
            out[name] = len(vals)
        else:
            arr = np.array(vals)
            out[name] = {"median": float(np.median(arr)), "p99": float(np.percentile(arr, 99)), "count": len(arr)}
    return out


def random_data(heads: int, n: int, d: int, seed: int) -> dict:
    stats: dict = defaultdict(list)
    cfg = certkv.CertConfig(window=16, max_stage=0)
    for i in range(heads):
        gen = torch.Generator().manual_seed(seed + i)
        k = torch.randn(1, 1, n, d, generator=gen)
        if i % 2:
            k[..., 7] *= 30  # an outlier key channel
        v = torch.randn(1, 1, n, d, generator=gen)
        q = torch.randn(1, 2, 1, d, generator=gen) * float(1 + i % 4)
        k, v, q = k.half(), v.half(), q.half()
        cache = certkv.TieredKVCache(1, 1, d, config=cfg)
        cache.append(0, k, v)
        res = cache.attend(0, q)
        kp, vp = cache.dequantized_exact(0)
        _collect(stats, verify_step(q, k, v, kp, vp, res))
        stats["tv_tanh_over_tv"].extend((res.certificate.tv_tanh / res.certificate.tv_bound).flatten().tolist())
    return _summary(stats)


def real_attention(context: int, steps: int, max_stage: int) -> dict:
    model = load_model()
    text = (DEFAULT_MODEL.parent / "heldout_sample.txt").read_text(encoding="utf-8")
    ids = TextCodec(model, DEFAULT_MODEL).encode(text, bos=True)[:context]
    cap = capture(model, torch.tensor([ids]))
    stats: dict = defaultdict(list)
    cfg = certkv.CertConfig(max_stage=max_stage)
    for layer in range(len(cap.q)):
        q, k, v, scale = cap.q[layer], cap.k[layer], cap.v[layer], cap.scaling[layer]
        n0 = context - steps
        cache = certkv.TieredKVCache(1, k.shape[1], k.shape[-1], config=cfg)
        cache.append(0, k[:, :, :n0], v[:, :, :n0])
        for t in range(steps):
            cache.append(0, k[:, :, n0 + t : n0 + t + 1], v[:, :, n0 + t : n0 + t + 1])
            qt = q[:, :, n0 + t : n0 + t + 1]
            res = cache.attend(0, qt, scale=scale)
            ko, vo = cache.originals(0)
            kp, vp = cache.dequantized_exact(0)
            _collect(stats, verify_step(qt, ko, vo, kp, vp, res, scale=scale))
            c = res.certificate
            stats["tv_tanh_over_tv"].extend((c.tv_tanh / c.tv_bound).flatten().tolist())
    return _summary(stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tightness.json"))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    t0 = time.time()
    result = {
        "command": "python benchmarks/tightness.py",
        "torch": torch.__version__,
        "random_n1024_d128": random_data(heads=48, n=1024, d=128, seed=0),
        f"tinylm_ctx{args.context}_stage0": real_attention(args.context, args.steps, max_stage=0),
        f"tinylm_ctx{args.context}_default_ladder": real_attention(args.context, args.steps, max_stage=3),
    }
    result["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
