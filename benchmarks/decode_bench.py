"""Decode attention over certkv's Tier-1 layout (kernels/decode.py) against PyTorch SDPA on FP16 K/V.

Run on the GPU from the repository root: ``PYTHONPATH=. python benchmarks/decode_bench.py [--out DIR]``.
For B in {1, 8}, H_q/H_kv = 32/8, D = 128 and contexts 8K, 32K, 128K (4 sinks and a 252-token window
in FP16, the rest quantized), with fresh random inputs every run, it
  * checks the kernel against SDPA on the dequantized values (same function, different arithmetic)
    and, at 8K, against the float64 reference;
  * times median latency (triton.testing.do_bench) eagerly and as a replayed CUDA graph, for the
    kernel (launch + split combine) and for SDPA (enable_gqa) on the FP16 cache;
  * measures device-to-device copy and pinned host-to-device bandwidth, and the stage-3 fetch of one
    head's originals at 128K;
and writes ``decode_bench.json``. The stage-0 kernel computes the output only (no certificate yet).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from certkv.kernels.decode import Tier1, decode, decode_reference
from triton.testing import do_bench

HQ, HKV, D, SINKS, WINDOW = 32, 8, 128, 4, 252
# launch variants timed side by side: binary32 products (what certkv's rounding model covers) and
# FP16 tensor-core products, with FP16 dequantization and the logits over two channel chunks or not
VARIANTS = {
    "ieee_b64_w4": dict(precision="ieee", block=64, num_warps=4),
    "fp16_b128_w8_deq16_k2": dict(precision="fp16", block=128, num_warps=8, num_stages=2, deq16=True, key_chunks=2),
    "fp16_b64_w4_deq16_k2": dict(precision="fp16", block=64, num_warps=4, deq16=True, key_chunks=2),
    "fma_b16_w4": dict(precision="fma", block=16, num_warps=4),
    "fma_b16_w8": dict(precision="fma", block=16, num_warps=8),
    "fma_b32_w8": dict(precision="fma", block=32, num_warps=8),
    "fma_b16_w4_k2": dict(precision="fma", block=16, num_warps=4, key_chunks=2),
    "fma_b32_w8_k2": dict(precision="fma", block=32, num_warps=8, key_chunks=2),
}


def tier1(
    b: int, n: int, dtype: torch.dtype, gen: torch.Generator, d: int = D
) -> tuple[Tier1, torch.Tensor, torch.Tensor]:
    """Random Tier-1 tensors and the 16-bit cache they dequantize to (k, v [B, HKV, n, d])."""
    nq = n - SINKS - WINDOW
    dev = "cuda"

    def r(*shape: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen, device=dev) * (hi - lo) + lo).to(dtype)

    kc = torch.randint(0, 256, (b, HKV, nq, d), generator=gen, device=dev, dtype=torch.uint8)
    vc = torch.randint(0, 256, (b, HKV, nq, d // 2), generator=gen, device=dev, dtype=torch.uint8)
    t1 = Tier1(
        kc, r(b, HKV, nq // 128, d, lo=1e-3, hi=2e-2), r(b, HKV, nq // 128, d, lo=-2.0, hi=0.0),
        vc, r(b, HKV, nq, d // 64, lo=1e-2, hi=1e-1), r(b, HKV, nq, d // 64, lo=-1.0, hi=0.0),
        r(b, HKV, SINKS, d), r(b, HKV, SINKS, d), r(b, HKV, WINDOW, d), r(b, HKV, WINDOW, d),
    )  # fmt: skip
    k = t1.quantized_keys().dequantize().to(dtype)
    v = t1.quantized_values().dequantize().to(dtype)
    k = torch.cat([t1.sink_k, k, t1.win_k], dim=2)
    v = torch.cat([t1.sink_v, v, t1.win_v], dim=2)
    return t1, k, v


def bench(fn, graph: bool) -> float:
    """Median milliseconds of fn() (eager) or of replaying a CUDA graph of it."""
    if not graph:
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return float(do_bench(g.replay, warmup=25, rep=200, return_mode="median"))


def bandwidths() -> dict[str, float]:
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(big)
    d2d = 2 * big.numel() / (do_bench(lambda: dst.copy_(big), return_mode="median") * 1e-3)
    host = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    h2d = host.numel() / (do_bench(lambda: dev.copy_(host, non_blocking=True), return_mode="median") * 1e-3)
    return {"d2d_bytes_per_s": d2d, "pinned_h2d_bytes_per_s": h2d}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    dtype = torch.float16
    bw = bandwidths()
    rows = []
    for b in args.batches:
        for n in args.contexts:
            t1, k, v = tier1(b, n, dtype, gen)
            q = torch.randn(b, HQ, 1, D, generator=gen, device="cuda").to(dtype)
            qg = q.reshape(b, HKV, HQ // HKV, D)
            scale = D**-0.5
            out = decode(qg, t1, scale).reshape(b, HQ, 1, D)
            sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
            err = float((out.float() - sdpa.float()).abs().max() / sdpa.float().abs().max())
            ref_err = None
            if n == args.contexts[0] and b == args.batches[0]:
                ref = decode_reference(qg.cpu(), t1.map(lambda t: t.cpu()), scale)
                ref_err = float((out.reshape(ref.shape).double().cpu() - ref).abs().max() / ref.abs().max())
            assert torch.isfinite(out).all() and err < 2e-2, err
            kernel_bytes = t1.nbytes + q.numel() * 2
            sdpa_bytes = 2 * k.numel() * 2 + q.numel() * 2
            row = {"batch": b, "context": n, "rel_err_vs_sdpa": err, "rel_err_vs_float64": ref_err,
                   "tier1_over_fp16": t1.nbytes / (2 * k.numel() * 2)}  # fmt: skip
            sdpa_fn = functools.partial(F.scaled_dot_product_attention, q, k, v, scale=scale, enable_gqa=True)
            for graph in (False, True):
                tag = "graph" if graph else "eager"
                row[f"sdpa_ms_{tag}"] = bench(sdpa_fn, graph)
                row[f"sdpa_bw_frac_{tag}"] = sdpa_bytes / (row[f"sdpa_ms_{tag}"] * 1e-3) / bw["d2d_bytes_per_s"]
                for name, launch in VARIANTS.items():
                    fn = functools.partial(decode, qg, t1, scale, **launch)
                    if not graph:
                        got = fn().reshape(b, HQ, 1, D).float()
                        row[f"{name}_rel_err_vs_sdpa"] = float(
                            (got - sdpa.float()).abs().max() / sdpa.float().abs().max()
                        )
                    ms = bench(fn, graph)
                    row[f"{name}_ms_{tag}"] = ms
                    row[f"{name}_speedup_{tag}"] = row[f"sdpa_ms_{tag}"] / ms
                    row[f"{name}_bw_frac_{tag}"] = kernel_bytes / (ms * 1e-3) / bw["d2d_bytes_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del t1, k, v, sdpa_fn
            torch.cuda.empty_cache()
    # stage 3: one head's originals from pinned Tier-2 at the longest context
    n = max(args.contexts)
    host_k = torch.empty(1, 1, n, D, dtype=dtype, pin_memory=True).normal_()
    host_v = torch.empty_like(host_k).normal_()

    def fetch() -> None:
        host_k.to("cuda", non_blocking=True)
        host_v.to("cuda", non_blocking=True)

    fetch_ms = float(do_bench(fetch, return_mode="median"))
    floor_ms = 2 * host_k.numel() * 2 / bw["pinned_h2d_bytes_per_s"] * 1e3
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **bw, "rows": rows,
              "stage3_fetch_one_head": {"context": n, "ms": fetch_ms, "bytes_over_h2d_ms": floor_ms,
                                        "ratio": fetch_ms / floor_ms}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["stage3_fetch_one_head"]))
    for name in VARIANTS:
        print(f"{name}: B ctx | kernel eager / sdpa eager = x | kernel graph / sdpa graph = x | bw% of d2d (graph)")
        for r in rows:
            ke, se = r[f"{name}_ms_eager"] * 1e3, r["sdpa_ms_eager"] * 1e3
            kg, sg = r[f"{name}_ms_graph"] * 1e3, r["sdpa_ms_graph"] * 1e3
            print(
                f"  {r['batch']:>2} {r['context']:>7} | {ke:8.1f} / {se:7.1f} = {se / ke:5.2f} | "
                f"{kg:8.1f} / {sg:7.1f} = {sg / kg:5.2f} | {r[f'{name}_bw_frac_graph']:4.0%}"
            )


if __name__ == "__main__":
    main()
