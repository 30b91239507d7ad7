"""Launch shapes of the certified decode kernel and the fused epilogue, swept on the GPU.

Run from the repository root: ``PYTHONPATH=. python benchmarks/launch_sweep.py [--parts ...] [--out DIR]``.

For B in {1, 8}, H_q/H_kv = 32/8, D = 128 and contexts 8K, 32K and 128K (random Tier-1 tensors as in
``decode_bench``), median times of replayed CUDA graphs (``triton.testing.do_bench``) of
  * ``kernels``: the decode kernel with its certificate statistics (``decode_partials(cert=True)``)
    over FP16 and BF16 caches, for each launch in ``KERNELS`` (precision, block, dequantization,
    pipelining stages) and each number of splits per row and KV head;
  * ``epilogue``: the fused epilogue (``certkv.kernels.epilogue``) after the FP16 serving launch, for
    its programs per block pass and blocks per loop step;
  * ``steps``: the whole certified step (kernel and fused epilogue) for the serving launch
    (``certkv.streaming.serving_launch``) and the alternatives in ``STEPS``, with the median output
    bound each gives (the launch's arithmetic enters the bound);
and SDPA on the same FP16 cache. Every row is printed and written to ``launch_sweep.json`` as it comes.
Earlier sweeps: ``launch_sweep_v1.json`` (64- and 128-token blocks x programs x stages x warps, FP16,
32K and 128K) and ``launch_sweep_v2.json`` (``kernels`` and ``epilogue``, the latter before the
serving launch moved to 128-token blocks).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from certkv.kernels import epilogue
from certkv.kernels.decode import decode_partials, splits_for

from benchmarks.certified_decode import _epilogue_args
from benchmarks.decode_bench import HKV, HQ, D, bench, tier1
from certkv.streaming import kernel_step, serving_launch

DTYPES = (torch.float16, torch.bfloat16)
# (cache dtype, name): launch options, splits per (row, KV head) to try
KERNELS = {
    (torch.float16, "fp16_b64_s3_w4"): (dict(precision="fp16", block=64), (33,)),
    (torch.float16, "fp16_b128_deq16_k2_s2_w4"): (
        dict(precision="fp16", block=128, deq16=True, key_chunks=2, num_stages=2),
        (16, 24, 33, 48, 66, 96),
    ),
    (torch.bfloat16, "ieee_b64_s3_w4"): (dict(precision="ieee", block=64), (33, 66)),
    (torch.bfloat16, "ieee_b128_k2_s2_w4"): (
        dict(precision="ieee", block=128, key_chunks=2, num_stages=2),
        (33, 66),
    ),
    (torch.bfloat16, "fma_b16_s2_w4"): (dict(precision="fma", block=16, num_stages=2), (33, 66)),
    (torch.bfloat16, "fma_b16_s3_w4"): (dict(precision="fma", block=16), (33, 66)),
    (torch.bfloat16, "fma_b32_s2_w4"): (dict(precision="fma", block=32, num_stages=2), (33, 66)),
}
EPILOGUE_PROGRAMS = (264, 528, 1056)
EPILOGUE_STEPS = (4, 8)
# whole-step alternatives to the serving launch (the launches served before this sweep among them)
STEPS = {
    torch.float16: {
        "fp16_b64_s3_w4": dict(precision="fp16", block=64),
        "fp16_b128_deq16_k2_s2_w4": dict(precision="fp16", block=128, deq16=True, key_chunks=2, num_stages=2),
    },
    torch.bfloat16: {
        "ieee_b64_s3_w4": dict(precision="ieee", block=64),
        "fma_b32_s2_w4": dict(precision="fma", block=32, num_stages=2),
    },
}


def sweep(b: int, n: int, gen: torch.Generator, parts: list[str], record) -> None:
    scale = D**-0.5
    q = torch.randn(b, HQ, 1, D, generator=gen, device="cuda")
    for dtype in DTYPES:
        t1, k, v = tier1(b, n, dtype, gen)
        qd = q.to(dtype)
        qg = qd.reshape(b, HKV, HQ // HKV, D)
        v_min, v_max = v.amin(2), v.amax(2)
        if dtype == torch.float16:
            sdpa = functools.partial(F.scaled_dot_product_attention, qd, k, v, scale=scale, enable_gqa=True)
            record(what="sdpa", ms=bench(sdpa, graph=True))
        for (kind, name), (launch, splits) in KERNELS.items() if "kernels" in parts else ():
            for s in splits if kind == dtype else ():
                s = min(s, t1.kc.shape[2] // 128)
                fn = functools.partial(decode_partials, qg, t1, scale, s, cert=True, **launch)
                record(what="kernel", dtype=str(dtype), launch=name, splits=s, ms=bench(fn, graph=True))
        if "epilogue" in parts and dtype == torch.float16:
            args = _epilogue_args(qg, t1, scale, v_min, v_max, dtype, serving_launch(dtype))
            default = (epilogue.PROGRAMS["blocks"], epilogue.STEP["blocks"])
            for programs, step in itertools.product(EPILOGUE_PROGRAMS, EPILOGUE_STEPS):
                epilogue.PROGRAMS["blocks"], epilogue.STEP["blocks"] = programs, step
                ms = bench(functools.partial(epilogue.certify, *args), graph=True)
                record(what="epilogue", programs=programs, step=step, ms=ms)
            epilogue.PROGRAMS["blocks"], epilogue.STEP["blocks"] = default
        steps = {"serving": serving_launch(dtype), **STEPS[dtype]} if "steps" in parts else {}
        for name, launch in steps.items():
            kernel = functools.partial(decode_partials, qg, t1, scale, cert=True, **launch)
            step = functools.partial(kernel_step, qg, t1, scale, v_min, v_max, launch)
            record(what="step", dtype=str(dtype), launch=name, options=str(launch),
                   splits=splits_for(b * HKV, t1.kc.shape[2], int(launch["block"])),  # type: ignore[call-overload]
                   kernel_ms=bench(kernel, graph=True), step_ms=bench(step, graph=True),
                   bound_median=float(step()[1].output_bound.median()))  # fmt: skip
        del t1, k, v
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--parts", nargs="+", default=["kernels", "epilogue", "steps"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    rows: list[dict] = []
    for b, n in itertools.product(args.batches, args.contexts):

        def record(b: int = b, n: int = n, **row: object) -> None:
            row.update(batch=b, context=n)
            print(json.dumps(row), flush=True)
            rows.append(row)
            result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
            (args.out / "launch_sweep.json").write_text(json.dumps(result, indent=1) + "\n")

        sweep(b, n, gen, args.parts, record)


if __name__ == "__main__":
    main()
