"""GPU soundness check of steps served through the ladder on the decode kernel (``certkv.kernel_ladder``)
at realistic shapes: every served output against float64 attention over the FP16/BF16 originals.

For each configuration (batch, context, dtype, tolerance) a cache of 32 query / 8 KV heads, D = 128,
is filled with fresh random keys and values (values 0.5 N(0, 1); in half the KV heads 16 keys lie
along their head's queries, so those heads' attention is peaked) and serves four queries with
``decode_kernel="always"``. Every query head's |served - o| is compared with its certified bound: a
violation is any head where it exceeds the bound plus 2^-40 of the value range (the float64 reference's
own accuracy, as ``CertConfig(self_check=True)``). Reports violations, the largest error / bound per
stage served and the stage counts.

    PYTHONPATH=. python benchmarks/ladder_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import certkv
from benchmarks.ladder_long import peaked_inputs

CONFIGS = [  # batch, context, dtype
    (1, 4096, torch.float16),
    (1, 32768, torch.bfloat16),
    (1, 131072, torch.float16),
    (8, 4096, torch.bfloat16),
    (8, 32768, torch.float16),
]
TOLERANCES = (0.03, 0.01)


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 attention of q [B, Hq, 1, D] over k, v [B, Hkv, n, D]: [B, Hq, 1, D]."""
    b, hq, _, d = q.shape
    g = hq // k.shape[1]
    qg = q.double().reshape(b, k.shape[1], g, d)
    w = torch.softmax(torch.matmul(qg, k.double().transpose(-1, -2)) * d**-0.5, -1)
    return torch.matmul(w, v.double()).reshape(b, hq, 1, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seed", type=int, default=None, help="fixed seed (default: fresh every run)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda")
    seed = gen.seed() if args.seed is None else gen.manual_seed(args.seed).initial_seed()
    rows = []
    for b, n, dtype in CONFIGS:
        k, v, queries = peaked_inputs(b, n, 4, dtype, gen, range(0, 8, 2))  # half the KV heads peaked
        for tol in TOLERANCES:
            cfg = certkv.CertConfig(decode_kernel="always", out_tol=tol, out_rtol=0.0)
            cache = certkv.TieredKVCache(1, 8, 128, config=cfg, device="cuda")
            cache.append(0, k, v)
            k_orig, v_orig = (x.to("cuda") for x in cache.originals(0))
            slack = 2.0**-40 * (1 + float(v_orig.double().abs().amax()))
            stages = [0, 0, 0, 0]
            worst = [0.0, 0.0, 0.0, 0.0]
            violations = over = 0
            for q in queries:
                res = cache.attend(0, q)
                o = exact(q, k_orig, v_orig)
                err = (res.output.double() - o).abs().amax(-1)  # [B, Hq, 1]
                bound = res.certificate.output_bound
                violations += int((err > bound + slack).sum())
                over += int((~res.certificate.accepted).sum())
                for s in range(4):
                    at = res.certificate.stage == s
                    stages[s] += int(at.sum())
                    if bool(at.any()):
                        worst[s] = max(worst[s], float((err[at] / bound[at]).max()))
            row = {
                "batch": b, "context": n, "dtype": str(dtype).removeprefix("torch."), "out_tol": tol,
                "violations": violations, "heads": 4 * b * 32, "stages": stages, "over_tolerance": over,
                "max_error_over_bound_per_stage": worst, "kernel_steps": cache.kernel_steps,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            del cache
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "seed": seed, "rows": rows}
    (out / "ladder_check.json").write_text(json.dumps(result, indent=1))
    print("violations:", sum(r["violations"] for r in rows))


if __name__ == "__main__":
    main()
