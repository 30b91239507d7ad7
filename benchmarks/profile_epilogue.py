"""GPU time of each launch of the fused epilogue (``certkv.kernels.epilogue``), from the profiler.

Run from the repository root: ``PYTHONPATH=. python benchmarks/profile_epilogue.py --sweep NAME``.
For B in {1, 8}, H_q/H_kv = 32/8, D = 128, FP16, contexts 8K and 128K, after the serving launch
(``certkv.streaming.serving_launch``): the mean GPU time per launch of the scales pass, the block
pass, binning, the edge maximum and the final pass (torch.profiler, 20 calls), for each launch shape of
the sweep (``SWEEPS``: warps, blocks per loop step or exact tokens per scales-pass program, programs,
query rows of the final pass, bins per program of the edge maximum). Writes
``profile_epilogue_NAME.json``. Earlier runs kept beside them: ``profile_epilogue_lp_v1.json``,
``profile_epilogue_lprows.json``, ``profile_epilogue_lp.json`` (the grid relaxation the edge maximum
replaced: warps, intervals and query rows per program), ``profile_epilogue_regs.json`` (register
limits per kernel through Triton's ``maxnreg``, since removed). The edge maximum's launch was
``_lp_kernel`` until session 13, so files before then key its time "lp" (and its settings "lp.bins",
"warps.lp"); it is "edges" since.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from certkv.kernels import epilogue
from torch.profiler import ProfilerActivity, profile

from benchmarks.certified_decode import _epilogue_args
from benchmarks.decode_bench import HKV, HQ, D, tier1
from certkv.streaming import serving_launch

# each shape: settings of epilogue.WARPS / STEP / PROGRAMS and of the module's constants in MODULE; the
# defaults elsewhere. ``--sweep NAME`` runs one list and writes profile_epilogue_NAME.json.
SWEEPS = {
    "blocks": [{"warps.blocks": w, "step.blocks": cb, "step.tokens": tok, "programs.blocks": p}
               for w, cb, tok, p in itertools.product((2, 4), (4, 8, 16), (16, 32), (528, 1056, 2112))]
              + [{"warps.edges": 16}],
    "edges": [{"edges.bins": ib, "warps.edges": w} for ib, w in itertools.product((4, 8, 16, 32), (1, 2, 4))],
    "serving": [{}],
    "final": [{}, {"final.rows": 2}, {"final.rows": 4}, {"warps.final": 2}, {"warps.final": 8}],
    "tokens": [{"step.tokens": t} for t in (4, 8, 16)],
    "parts": [{"programs.blocks": p, "step.blocks": cb} for p, cb in itertools.product((132, 264, 528), (8, 16, 32))],
    "scales": [{"warps.scales": w, "step.tokens": t} for w, t in itertools.product((1, 2, 4), (8, 16, 32))],
    "chunk": [{"chunk.least": least, "step.blocks": min(least, 16), "step.bins": cb}
              for least, cb in itertools.product((8, 16, 32), (8, 16))],
    "onewarp": [{}, {"warps.bins": 1}, {"warps.bins": 1, "step.bins": 8}, {"warps.bins": 1, "step.bins": 32},
                {"warps.blocks": 1}, {"warps.final": 1}, {"warps.final": 2}],
}  # fmt: skip


# shape keys that set one of the module's constants
MODULE = {"edges.bins": "EDGE_BINS", "final.rows": "FINAL_ROWS", "chunk.least": "CHUNK_LEAST"}


def _apply(shape: dict[str, int]) -> dict[str, int]:
    """Set a shape's values in the epilogue's tables; returns the values they replace."""
    tables = {
        "warps": epilogue.WARPS,
        "step": epilogue.STEP,
        "programs": epilogue.PROGRAMS,
    }
    old = {}
    for key, value in shape.items():
        table, name = key.split(".")
        if key in MODULE:
            attr = MODULE[key]
            old[key] = getattr(epilogue, attr)
            setattr(epilogue, attr, value)
        else:
            old[key], tables[table][name] = tables[table][name], value
    return old


def launch_times(args: tuple, calls: int = 20) -> dict[str, float]:
    """Mean GPU microseconds per call of each of the epilogue's kernels."""
    for _ in range(3):
        epilogue.certify(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            epilogue.certify(*args)
        torch.cuda.synchronize()
    return {
        e.key.strip("_").removesuffix("_kernel"): e.device_time_total / calls
        for e in prof.key_averages()
        if e.key.startswith("_") and e.key.endswith("_kernel")
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="edges")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for b, n in itertools.product((1, 8), (8192, 131072)):
        t1, k, v = tier1(b, n, torch.float16, gen)
        q = torch.randn(b, HQ, 1, D, generator=gen, device="cuda").half()
        qg = q.reshape(b, HKV, HQ // HKV, D)
        call = _epilogue_args(qg, t1, D**-0.5, v.amin(2), v.amax(2), torch.float16, serving_launch(torch.float16))
        for shape in SWEEPS[args.sweep]:
            old = _apply(shape)
            times = launch_times(call)
            _apply(old)
            row = {"batch": b, "context": n, **shape, "us": times, "sum_us": sum(times.values())}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del t1, k, v
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "rows": rows}
    (args.out / f"profile_epilogue_{args.sweep}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
