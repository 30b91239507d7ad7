"""The certified decode kernel on the GPU: soundness at realistic shapes, then speed against SDPA.

Run from the repository root: ``PYTHONPATH=. python benchmarks/certified_decode.py [--out DIR]``.

``--head-dim`` (default 128) sets D for both parts; other sizes write ``*_dD.json``.

``check``: for B in {1, 8}, H_q/H_kv in {32/8, 8/8}, D, FP16 and BF16 and contexts from 1K to
128K (B = 8 up to 32K), fresh random originals (an outlier key channel) go through
``TieredKVCache.append`` (the append kernel) and one query through ``certkv.streaming.kernel_step``
(the kernel with its statistics, then the fused epilogue; the torch epilogue on the same statistics
must give the same output and fields within 1e-9). On sampled heads (all heads up to 8K) the output
is compared with the float64 attention over the same Tier-1 tensors and the error against exact
attention over the originals (float64) with the certificate's output bound; up to 8K the torch path's
stage-0 bound is recorded beside it. Any violation fails the run.

``bench``: at B in {1, 8}, H_q/H_kv = 32/8, D, contexts 8K, 32K, 128K (FP16, or BF16 with ``--dtype
bfloat16``), median times (triton.testing.do_bench) eager and as replayed CUDA graphs of: SDPA on the
16-bit cache; the kernel without and with its certificate statistics (the overhead); the fused epilogue
(``certkv.kernels.epilogue``); the whole certified step (``kernel_step``: the kernel and the fused
epilogue); and, eager, the torch epilogue it replaces (``certkv.streaming.certify``), with the largest
relative difference of the two certificates. Writes ``certified_decode.json`` (BF16:
``certified_decode_bfloat16.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from certkv.kernels import epilogue
from certkv.kernels.decode import decode_partials, decode_reference, from_cache
from triton.testing import do_bench

import certkv
from benchmarks.decode_bench import bandwidths, bench, tier1
from certkv.streaming import BOUND_FIELDS, certify, kernel_step, serving_launch

D = 128
TAG = {torch.float16: "fp16", torch.bfloat16: "bf16"}


# per cache dtype: the serving launch (from launch_sweep.py) and, for FP16, the one it replaced
def launches(dtype: torch.dtype, d: int) -> dict[str, dict]:
    """Per cache dtype and head size: the serving launch and, for FP16 at D = 128, the one it replaced."""
    served = {f"serving_{TAG[dtype]}": serving_launch(dtype, d)}
    if dtype == torch.float16 and d == 128:
        served["fp16_b64_w4"] = dict(precision="fp16", block=64, num_warps=4)
    return served


def check(gen: torch.Generator, d: int = D) -> list[dict]:
    rows = []
    shapes = [(b, hq, hkv, n) for b, ns in ((1, (1024, 8192, 32768, 131072)), (8, (1024, 8192, 32768)))
              for hq, hkv in ((32, 8), (8, 8)) for n in ns]  # fmt: skip
    for dtype in (torch.float16, torch.bfloat16):
        for b, hq, hkv, n in shapes:
            t0 = time.time()
            k = torch.randn(b, hkv, n, d, generator=gen, device="cuda")
            k[..., 3] *= 8.0
            v = torch.randn(b, hkv, n, d, generator=gen, device="cuda") * 0.5
            q = (torch.randn(b, hq, 1, d, generator=gen, device="cuda") * 1.5).to(dtype)
            k, v = k.to(dtype), v.to(dtype)
            cache = certkv.TieredKVCache(1, hkv, d, config=certkv.CertConfig(max_stage=0), device="cuda")
            cache.append(0, k, v)
            st = cache._layers[0]
            t1 = from_cache(cache, 0)
            g = hq // hkv
            qg = q.reshape(b, hkv, g, d)
            out, cert = kernel_step(qg, t1, d**-0.5, st.v_min, st.v_max)
            launch = serving_launch(dtype, d)
            args = _epilogue_args(qg, t1, d**-0.5, st.v_min, st.v_max, dtype, launch)
            _, fused_rel, equal = _compare_epilogues(args)
            assert equal and fused_rel < 1e-9, fused_rel
            heads = [(bi, hi) for bi in range(b) for hi in range(hkv)]
            if n > 8192:
                pick = torch.randperm(len(heads), generator=torch.Generator().manual_seed(n + b))[:4]
                heads = [heads[i] for i in pick]
            worst_ratio, worst_ref, violations = 0.0, 0.0, 0
            torch_bound = []
            for bi, hi in heads:
                one = t1.map(lambda x, b0=bi, h0=hi: x[b0 : b0 + 1, h0 : h0 + 1])
                ref = decode_reference(qg[bi : bi + 1, hi : hi + 1], one, d**-0.5)[0, 0]
                got = out[bi, hi].double()
                worst_ref = max(worst_ref, float((got - ref).abs().max() / ref.abs().max()))
                w = torch.softmax(d**-0.5 * qg[bi, hi].double() @ k[bi, hi].double().T, dim=-1)
                exact = w @ v[bi, hi].double()
                err = (got - exact).abs().amax(-1)
                bound = cert.output_bound[bi, hi]
                violations += int((err > bound).sum())
                worst_ratio = max(worst_ratio, float((err / bound).max()))
            if n <= 8192:
                torch_cache = certkv.TieredKVCache(
                    1, hkv, d, config=certkv.CertConfig(max_stage=0, decode_kernel="never"), device="cuda"
                )
                torch_cache.append(0, k, v)
                torch_bound = torch_cache.attend(0, q).certificate.output_bound.flatten().tolist()
                del torch_cache
            row = {
                "dtype": str(dtype), "batch": b, "hq": hq, "hkv": hkv, "context": n,
                "launch": str(launch), "heads_checked": len(heads) * g,
                "violations": violations, "max_err_over_bound": worst_ratio, "rel_err_vs_float64_tier1": worst_ref,
                "fused_vs_torch_epilogue_max_rel": fused_rel,
                "bound_median": float(cert.output_bound.median()), "tv_median": float(cert.tv_bound.median()),
                "torch_path_bound_median": float(torch.tensor(torch_bound).median()) if torch_bound else None,
                "seconds": time.time() - t0,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            assert violations == 0, row
            del cache, k, v, t1
            torch.cuda.empty_cache()
    return rows


def _epilogue_args(qg, t1, scale, v_min, v_max, out_dtype, launch: dict) -> tuple:
    """The kernel with its statistics (one launch), then the arguments both epilogues take."""
    parts = decode_partials(qg, t1, scale, cert=True, **launch)
    return qg, t1, parts, scale, launch["precision"], v_min, v_max, out_dtype, bool(launch.get("deq16", False))


def _compare_epilogues(args: tuple) -> tuple:
    """Both epilogues on the same statistics: the fused certificate, the largest relative difference
    of their fields and whether the outputs are equal."""
    (ref_out, ref), (out, fused) = certify(*args), epilogue.certify(*args)
    rel = max(_rel_diff(getattr(fused, f), getattr(ref, f)) for f in BOUND_FIELDS)
    return fused, rel, bool(torch.equal(out, ref_out))


def _rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest relative difference (equal values, infinities included, count as 0; NaN anywhere: NaN)."""
    if bool(got.isnan().any() or want.isnan().any()):
        return math.nan
    rel = (got - want).abs() / want.abs().clamp(min=1e-300)
    return float(torch.where(got == want, torch.zeros_like(rel), rel).max())


def speed(gen: torch.Generator, contexts: list[int], batches: list[int], dtype: torch.dtype, d: int = D) -> list[dict]:
    rows = []
    hq, hkv = 32, 8
    for b in batches:
        for n in contexts:
            t1, k, v = tier1(b, n, dtype, gen, d)
            q = torch.randn(b, hq, 1, d, generator=gen, device="cuda").to(dtype)
            qg = q.reshape(b, hkv, hq // hkv, d)
            scale = d**-0.5
            v_min, v_max = v.amin(2), v.amax(2)
            row: dict = {"batch": b, "context": n, "tier1_over_fp16": t1.nbytes / (2 * k.numel() * 2)}
            sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, scale=scale, enable_gqa=True)
            for graph in (False, True):
                tag = "graph" if graph else "eager"
                row[f"sdpa_ms_{tag}"] = bench(sdpa, graph)
                for name, launch in launches(dtype, d).items():
                    for cert in (False, True):
                        fn = functools.partial(decode_partials, qg, t1, scale, cert=cert, **launch)
                        row[f"{name}{'_cert' if cert else ''}_ms_{tag}"] = bench(fn, graph)
                    args = _epilogue_args(qg, t1, scale, v_min, v_max, dtype, launch)
                    row[f"{name}_fused_epilogue_ms_{tag}"] = bench(functools.partial(epilogue.certify, *args), graph)
                    step = functools.partial(kernel_step, qg, t1, scale, v_min, v_max, launch)
                    row[f"{name}_step_ms_{tag}"] = bench(step, graph)
            for name, launch in launches(dtype, d).items():
                args = _epilogue_args(qg, t1, scale, v_min, v_max, dtype, launch)
                row[f"{name}_torch_epilogue_ms_eager"] = float(
                    do_bench(functools.partial(certify, *args), warmup=3, rep=50, return_mode="median")
                )
                row[f"{name}_overhead_graph"] = row[f"{name}_cert_ms_graph"] / row[f"{name}_ms_graph"] - 1
                fused, rel, equal = _compare_epilogues(args)
                row[f"{name}_bound_median"] = float(fused.output_bound.median())
                row[f"{name}_fused_vs_torch_max_rel"] = rel
                row[f"{name}_fused_output_equal"] = equal
            print(json.dumps(row), flush=True)
            rows.append(row)
            del t1, k, v
            torch.cuda.empty_cache()
    return rows


def _torch_step(cache: certkv.TieredKVCache, q: torch.Tensor) -> tuple:
    from certkv.attention import certified_step

    return certified_step(q, cache.tokens(0), D**-0.5, torch.float16)


def paths(gen: torch.Generator, contexts: list[int]) -> list[dict]:
    """One certified stage-0 step of a TieredKVCache (B = 1, 32/8 heads, FP16) both ways, eager: the
    kernel with its epilogue, and the torch path (``tokens()`` then ``certified_step``)."""
    rows = []
    for n in contexts:
        k = torch.randn(1, 8, n, D, generator=gen, device="cuda").half()
        v = (torch.randn(1, 8, n, D, generator=gen, device="cuda") * 0.5).half()
        q = torch.randn(1, 8, 4, D, generator=gen, device="cuda").half()
        cache = certkv.TieredKVCache(1, 8, D, config=certkv.CertConfig(max_stage=0), device="cuda")
        cache.append(0, k, v)
        st = cache._layers[0]
        kern = functools.partial(kernel_step, q, from_cache(cache, 0), D**-0.5, st.v_min, st.v_max)
        torch_path = functools.partial(_torch_step, cache, q)
        row = {"context": n, "kernel_step_ms": float(do_bench(kern, warmup=3, rep=30, return_mode="median")),
               "torch_path_ms": float(do_bench(torch_path, warmup=1, rep=5, return_mode="median")),
               "kernel_bound_median": float(kern()[1].output_bound.median()),
               "torch_bound_median": float(torch_path()[1].output_bound.median())}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        del cache, k, v
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="the speed part's cache")
    ap.add_argument("--head-dim", type=int, default=D, help="D of the check and the speed part (a power of two >= 64)")
    ap.add_argument("--paths", action="store_true", help="only: the cache's certified step, kernel vs torch path")
    args = ap.parse_args()
    if args.paths:
        gen = torch.Generator(device="cuda").manual_seed(0)
        out = {"device": torch.cuda.get_device_name(), "paths": paths(gen, args.contexts)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "certified_paths.json").write_text(json.dumps(out, indent=1) + "\n")
        return
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **bandwidths()}
    d = args.head_dim
    result["head_dim"] = d
    result["check"] = [] if args.skip_check else check(gen, d)
    dtype = getattr(torch, args.dtype)
    result["speed"] = [] if args.skip_speed else speed(gen, args.contexts, args.batches, dtype, d)
    args.out.mkdir(parents=True, exist_ok=True)
    size = "" if d == D else f"_d{d}"
    cast = "" if dtype == torch.float16 else f"_{args.dtype}"
    name = f"certified_check{size}.json" if args.skip_speed else f"certified_decode{cast}{size}.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    for r in result["speed"]:
        sdpa_g, sdpa_e = r["sdpa_ms_graph"] * 1e3, r["sdpa_ms_eager"] * 1e3
        print(f"B={r['batch']} n={r['context']}: sdpa {sdpa_g:.1f} us graph, {sdpa_e:.1f} eager")
        for name in launches(dtype, d):
            cert, fused, step_g, step_e = (
                r[f"{name}{x}"] * 1e3
                for x in ("_cert_ms_graph", "_fused_epilogue_ms_graph", "_step_ms_graph", "_step_ms_eager")
            )
            print(
                f"  {name}: kernel {cert:.1f} us (+{r[f'{name}_overhead_graph']:.0%} statistics); epilogue fused "
                f"{fused:.1f} us graph, torch {r[f'{name}_torch_epilogue_ms_eager'] * 1e3:.0f} us eager; step "
                f"{step_g:.1f} us graph (x{sdpa_g / step_g:.2f} SDPA), {step_e:.1f} eager (x{sdpa_e / step_e:.2f})"
            )


if __name__ == "__main__":
    main()
