"""The certified decode kernel under variants of its serving launch, at one head size.

Run from the repository root: ``PYTHONPATH=. python benchmarks/launch_probe.py --head-dim D --set NAME``.
For B in {1, 8} (``--batches``), H_q/H_kv = 32/8, contexts 8K, 32K and 128K (random Tier-1 tensors as
in ``decode_bench``; ``--contexts`` to change them): the median time of a replayed CUDA graph of
``decode_partials(cert=True)`` for the serving launch (``certkv.streaming.serving_launch``) and each
variant of the set (options replaced; None removes one), with ``--step`` also of the whole certified
step (``kernel_step``: the kernel and the fused epilogue), and SDPA on the same 16-bit cache. Writes
``launch_probe_dD_NAME.json``. Kept: ``launch_sweep_d64.json``, ``launch_sweep_d256.json`` and
``launch_sweep_d128_two_warps.json`` (the sets "d64", "tma" and "two_warps" of this script's first
version, run from outside the repository before it was added), and ``launch_probe_d128_per_head.json``,
``launch_probe_d128_least_v0.json`` and ``launch_probe_d128_splits_step.json`` (kernel and step times of
the sets "per_head", "least" and "splits" from an untracked first version of ``--step``).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from certkv.kernels.decode import decode_partials

from benchmarks.decode_bench import HKV, HQ, bench, tier1
from certkv.streaming import kernel_step, serving_launch

# each set: name -> the launch options it replaces
SETS: dict[str, dict[str, dict[str, object]]] = {
    "tma": {
        "off": {"tma": "off"}, "p396": {"programs": 396}, "p792": {"programs": 792}, "kc1": {"key_chunks": 1},
        "b64": {"block": 64}, "w8": {"num_warps": 8}, "s3": {"num_stages": 3}, "off_w2": {"tma": "off", "num_warps": 2},
    },
    "d64": {
        "off": {"tma": "off"}, "off_w2": {"tma": "off", "num_warps": 2},
        "off_w2_p792": {"tma": "off", "num_warps": 2, "programs": 792},
        "off_w2_p1584": {"tma": "off", "num_warps": 2, "programs": 1584},
        "off_w2_kc1": {"tma": "off", "num_warps": 2, "key_chunks": 1},
        "off_w2_b64": {"tma": "off", "num_warps": 2, "block": 64},
        "off_w2_s3": {"tma": "off", "num_warps": 2, "num_stages": 3},
    },
    "blocks": {
        "b64": {"block": 64}, "b64_p792": {"block": 64, "programs": 792}, "b64_p3168": {"block": 64, "programs": 3168},
        "b32": {"block": 32},
    },
    # split counts per (row, KV head) other than the serving launch's (33 at B = 8), explicitly
    "waves": {"s30": {"splits": 30}, "s37": {"splits": 37}, "s43": {"splits": 43}, "s49": {"splits": 49}},
    "splits": {"s12": {"splits": 12}, "s16": {"splits": 16}, "s21": {"splits": 21}, "s26": {"splits": 26}},
    # the split rule's least blocks per split, and its splits per (row, head) without that least
    "least": {"l1": {"least_blocks": 1}, "l3": {"least_blocks": 3}, "l6": {"least_blocks": 6}},
    "per_head": {f"p{n}": {"per_head": n, "least_blocks": 1} for n in (8, 12, 16)},
    # codes to floats by Triton's integer operations instead of the inline prmt PTX
    "ptx": {"plain": {"ptx": False}},
    "two_warps": {
        "w2": {"num_warps": 2}, "w2_p792": {"num_warps": 2, "programs": 792},
        "w2_nocap_p792": {"num_warps": 2, "maxnreg": None, "programs": 792},
        "w2_off_p792": {"num_warps": 2, "tma": "off", "programs": 792},
        "w2_kc1_p792": {"num_warps": 2, "key_chunks": 1, "programs": 792},
    },
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--set", choices=sorted(SETS), default="two_warps")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--step", action="store_true", help="also time the whole certified step")
    args = ap.parse_args()
    d = args.head_dim
    served = serving_launch(torch.float16, d)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for b in args.batches:
        for n in args.contexts:
            t1, k, v = tier1(b, n, torch.float16, gen, d)
            q = torch.randn(b, HQ, 1, d, generator=gen, device="cuda").half()
            qg = q.reshape(b, HKV, HQ // HKV, d)
            v_min, v_max = v.amin(2), v.amax(2)
            sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, scale=d**-0.5, enable_gqa=True)
            row: dict[str, object] = {"batch": b, "context": n, "sdpa_us": bench(sdpa, True) * 1e3}
            for name, change in {"serving": {}, **SETS[args.set]}.items():
                launch = {key: x for key, x in (served | change).items() if x is not None}
                fn = functools.partial(decode_partials, qg, t1, d**-0.5, cert=True, **launch)
                row[f"{name}_us"] = bench(fn, True) * 1e3
                if args.step:
                    step = functools.partial(kernel_step, qg, t1, d**-0.5, v_min, v_max, launch)
                    row[f"{name}_step_us"] = bench(step, True) * 1e3
            print(json.dumps(row), flush=True)
            rows.append(row)
            del t1, k, v
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "head_dim": d, "serving": str(served), "rows": rows}
    (args.out / f"launch_probe_d{d}_{args.set}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
