"""The decode kernel's certificate (certkv.streaming) against the exact reference, against the same
epilogue fed float64 statistics, and serving through the cache. On the CPU the kernel runs in
Triton's interpreter."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from certkv.kernels.decode import Tier1, code_descriptors, decode_partials, from_cache, partials_reference

import certkv
from certkv.streaming import BOUND_FIELDS, LIVE, certify, kernel_step, mass_error
from certkv.tv import BIN_RATIO, sum_radius, tanh_bound, tv_bound
from tests.helpers import assert_sound, kernel_result, make_kv, make_q

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 128**-0.5


def cache_of(b, hkv, n, dtype, seed=0, outlier=6.0, **cfg):
    k, v = make_kv(b=b, hkv=hkv, n=n, d=128, dtype=dtype, seed=seed, outlier=outlier)
    cache = certkv.TieredKVCache(1, hkv, 128, config=certkv.CertConfig(max_stage=0, **cfg), device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    return cache


CASES = [
    # dtype, precision, launch options, (b, hkv, g, n), splits, query scale
    (torch.float16, "ieee", {}, (1, 2, 2, 700), 3, 2.0),
    (torch.bfloat16, "ieee", {"key_chunks": 2}, (2, 1, 4, 390), None, 2.0),
    (torch.float16, "fp16", {"block": 32}, (1, 1, 4, 520), None, 2.0),
    (torch.float16, "fp16", {"block": 32, "deq16": True, "key_chunks": 2}, (1, 2, 1, 650), 2, 2.0),
    (torch.float16, "fma", {"block": 16}, (1, 1, 2, 300), None, 2.0),
    (torch.bfloat16, "ieee", {}, (1, 1, 4, 900), 4, 40.0),  # peaky: most blocks are dust
    (torch.float16, "fp16", {"block": 64, "tma": "on"}, (1, 2, 2, 460), None, 0.05),  # flat; codes by TMA
    (torch.bfloat16, "fp16", {"block": 64, "key_chunks": 2}, (1, 2, 2, 520), None, 3.0),  # BF16 on FP16 products
]


@pytest.mark.parametrize("dtype, precision, launch, shape, splits, q_scale", CASES)
def test_kernel_certificate_dominates_the_exact_error(dtype, precision, launch, shape, splits, q_scale):
    b, hkv, g, n = shape
    cache = cache_of(b, hkv, n, dtype, seed=n)
    q = make_q(b=b, hq=hkv * g, d=128, dtype=dtype, seed=n + 1, scale=q_scale).to(DEVICE)
    result = kernel_result(cache, q, precision, splits, **launch)
    checks = assert_sound(cache, 0, q.cpu(), result)
    assert all(math.isfinite(c.claimed["output_bound"]) for c in checks)


@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, "ieee"), (torch.float16, "fp16")])
def test_kernel_statistics_give_the_certificate_of_exact_statistics(dtype, precision):
    # the same epilogue fed the kernel's binary32 statistics and float64 ones computed without
    # rounding from the same Tier-1 tensors: the certificates agree to the statistics' accuracy
    cache = cache_of(2, 2, 700, dtype, seed=1)
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    q = make_q(b=2, hq=4, d=128, dtype=dtype, seed=4).to(DEVICE).reshape(2, 2, 2, 128)
    kernel = certify(q, t1, decode_partials(q, t1, SCALE, 3, precision=precision, cert=True), SCALE, precision,
                     st.v_min, st.v_max, dtype)  # fmt: skip
    exact = certify(q.cpu(), on_cpu(t1), partials_reference(q.cpu(), on_cpu(t1), SCALE), SCALE, precision,
                    st.v_min.cpu(), st.v_max.cpu(), dtype)  # fmt: skip
    # outputs: a BF16 ulp apart for binary32 products; FP16 operands move the logits by ~2^-11 relative
    atol = 1e-5 if precision == "ieee" else 2e-3
    assert torch.allclose(kernel[0].float().cpu(), exact[0].float(), rtol=2**-7, atol=atol)
    for name in ("tv_bound", "key_term", "value_term", "cross_term", "output_bound", "logit_radius"):
        got, want = getattr(kernel[1], name).cpu(), getattr(exact[1], name)
        assert torch.allclose(got, want, rtol=1e-3), name
    # the rounding term depends on the rescales counted, which the split changes: same order only
    ratio = kernel[1].rounding_term.cpu() / exact[1].rounding_term
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all())


def on_cpu(t1: Tier1) -> Tier1:
    return t1.map(lambda t: t.cpu())


@pytest.mark.parametrize("blk", [16, 32, 64, 128])
def test_the_tilde_radii_fill_the_top_bin_so_their_divisible_bound_is_the_tanh_bound(blk):
    # the certificate takes TV(p~, pi) as the tanh bound of its largest radius, without binning or an
    # edge maximum (EDGE_SETS in the fused epilogue): a live block's radius lambda = 2 (c1 + b / M)
    # (1 + 2^-40) with M >= LIVE b lies within a factor BIN_RATIO of every other's, so all the live mass
    # rounds up into the top bin, a problem of one radius, where tv_bound can do no better than tanh
    c1, _ = mass_error(blk)
    lo, hi = 2 * c1, 2 * (c1 + 1 / LIVE) * (1 + 2.0**-40)
    assert hi / lo < BIN_RATIO
    gen = torch.Generator().manual_seed(blk)
    rows, n = 64, 300
    mass = torch.rand(rows, n, generator=gen, dtype=torch.float64) ** 6  # masses over decades
    lam = lo + (hi - lo) * torch.rand(rows, n, generator=gen, dtype=torch.float64)
    lam[:16, :2] = torch.tensor([lo, hi], dtype=torch.float64)  # both extremes in one row
    dust = torch.rand(rows, n, generator=gen) < 0.3  # blocks that are not live: no mass, no radius
    mass[dust], lam[dust] = 0.0, 0.0
    mass[16:24, 1:] = 0.0  # one live block
    got = tv_bound(mass, lam, divisible=True)
    assert torch.equal(got, tanh_bound(lam.amax(-1) + sum_radius(n)))


def test_no_exact_tokens():
    # window 0 and no sinks, a whole number of key groups: every token quantized, no window split work
    cache = cache_of(1, 1, 512, torch.float16, seed=3, window=0, sinks=0)
    assert cache._layers[0].win_k.shape[2] == 0 and cache._layers[0].n_sink == 0
    q = make_q(b=1, hq=2, d=128, dtype=torch.float16, seed=5).to(DEVICE)
    assert_sound(cache, 0, q.cpu(), kernel_result(cache, q, "ieee"))


def test_precisions_without_a_rounding_model_are_refused():
    cache = cache_of(1, 1, 300, torch.bfloat16)
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    q = make_q(b=1, hq=2, d=128, dtype=torch.bfloat16).to(DEVICE).reshape(1, 1, 2, 128)
    with pytest.raises(ValueError, match="no rounding model"):
        certify(q, t1, decode_partials(q, t1, SCALE, precision="tf32", cert=True), SCALE, "tf32", st.v_min,
                st.v_max, q.dtype)  # fmt: skip
    # FP16 dequantization arithmetic assumes FP16 scales; FP16 products over BF16 have a model
    with pytest.raises(ValueError, match="FP16 caches"):
        certify(q, t1, decode_partials(q, t1, SCALE, precision="fp16", deq16=True, cert=True), SCALE, "fp16",
                st.v_min, st.v_max, q.dtype, True)  # fmt: skip


def test_operands_beyond_fp16_range_are_not_certified():
    # scales and zero points whose dequantized keys reach 73,500: FP16 operands would overflow
    cache = cache_of(1, 1, 300, torch.float16)
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    t1.ks[..., 0] = 300.0
    t1.kz[..., 0] = -3000.0
    q = make_q(b=1, hq=2, d=128, dtype=torch.float16).to(DEVICE).reshape(1, 1, 2, 128)
    _, cert = certify(q, t1, decode_partials(q, t1, SCALE, precision="fp16", cert=True), SCALE, "fp16", st.v_min,
                      st.v_max, q.dtype)  # fmt: skip
    assert bool(torch.isinf(cert.output_bound).all())
    _, cert = certify(q, t1, decode_partials(q, t1, SCALE, precision="ieee", cert=True), SCALE, "ieee", st.v_min,
                      st.v_max, q.dtype)  # fmt: skip
    assert bool(torch.isfinite(cert.output_bound).all())
    # a BF16 query beyond FP16's range in a channel where every key is 0 (so no logit or radius grows):
    # rounded into FP16 products it would overflow (inf x 0); binary32 products take it
    cache = cache_of(1, 1, 300, torch.bfloat16)
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    for x in (t1.ks, t1.kz, t1.sink_k, t1.win_k):
        x[..., 5] = 0.0
    q = make_q(b=1, hq=2, d=128, dtype=torch.bfloat16).to(DEVICE).reshape(1, 1, 2, 128)
    q[0, 0, 1, 5] = 70000.0
    for precision, finite in (("fp16", False), ("ieee", True)):
        _, cert = certify(q, t1, decode_partials(q, t1, SCALE, precision=precision, cert=True), SCALE, precision,
                          st.v_min, st.v_max, q.dtype)  # fmt: skip
        assert bool(torch.isfinite(cert.output_bound[0, 0, 1])) == finite


def test_cache_serves_stage0_from_the_kernel_and_falls_back_along_the_ladder():
    k, v = make_kv(b=1, hkv=2, n=700, d=128, dtype=torch.float16, seed=1)
    q = make_q(b=1, hq=4, d=128, dtype=torch.float16, seed=2, scale=0.5).to(DEVICE)
    loose = certkv.CertConfig(decode_kernel="always", out_tol=1.0, tv_tol=1.0)
    cache = certkv.TieredKVCache(1, 2, 128, config=loose, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    served = cache.attend(0, q)
    st = cache._layers[0]
    out, cert = kernel_step(q.reshape(1, 2, 2, 128), from_cache(cache, 0), SCALE, st.v_min, st.v_max)
    assert torch.equal(served.output, out.reshape(1, 4, 1, 128))  # the kernel's output, not the torch path's
    assert torch.equal(served.certificate.output_bound, cert.output_bound.reshape(1, 4, 1))
    assert bool((served.certificate.stage == 0).all() and served.certificate.accepted.all())
    assert cache.kernel_steps == {"tried": 1, "served": 1, "fetched": 0, "dense": 0, "dense_torch": 0}
    assert_sound(cache, 0, q.cpu(), served)
    # "auto": the kernel on CUDA, the torch path on the CPU
    auto = certkv.TieredKVCache(1, 2, 128, config=certkv.CertConfig(out_tol=1.0, tv_tol=1.0), device=DEVICE)
    auto.append(0, k.to(DEVICE), v.to(DEVICE))
    auto.attend(0, q)
    tried = int(DEVICE == "cuda")
    assert auto.kernel_steps == {"tried": tried, "served": tried, "fetched": 0, "dense": 0, "dense_torch": 0}
    # a tolerance the streamed certificate misses even with a quarter of the tokens fetched (flat
    # attention: certkv.kernel_ladder): the step is served dense
    tight = certkv.CertConfig(decode_kernel="always", out_tol=0.02)
    cache = certkv.TieredKVCache(1, 2, 128, config=tight, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    served = cache.attend(0, q)
    assert bool((served.certificate.stage > 0).all() and served.certificate.accepted.all())
    assert_sound(cache, 0, q.cpu(), served)


def test_decode_kernel_mode_is_validated():
    with pytest.raises(certkv.errors.ConfigError, match="decode_kernel"):
        certkv.CertConfig(decode_kernel="sometimes")


def promoted_cache(b: int) -> certkv.TieredKVCache:
    """600 FP16 tokens, 2 KV heads, after three steps at promote_after=1 and a tolerance the quantized
    step misses: the torch ladder fetched rows and promoted them."""
    k, v = make_kv(b=b, hkv=2, n=600, d=128, dtype=torch.float16, seed=7, outlier=6.0)
    cfg = certkv.CertConfig(promote_after=1, out_tol=0.002, out_rtol=0.0, max_stage=2)
    cache = certkv.TieredKVCache(1, 2, 128, config=cfg, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    for seed in range(3):
        cache.attend(0, make_q(b=b, hq=4, d=128, dtype=torch.float16, seed=seed).to(DEVICE))
    return cache


def test_promoted_tokens_are_served_from_their_exact_copies():
    # the kernel skips the promoted tokens' quantized copies and serves the exact ones
    cache = promoted_cache(2)
    counts = cache.promoted_count(0)
    assert int(counts.min()) > 0
    t1 = from_cache(cache, 0)
    assert t1.prom_mask is not None and int(t1.prom_mask.sum()) == int(counts.sum())
    q = make_q(b=2, hq=4, d=128, dtype=torch.float16, seed=11).to(DEVICE)
    for precision in ("ieee", "fp16"):
        assert_sound(cache, 0, q.cpu(), kernel_result(cache, q, precision, splits=2, block=32))
    # the float64 references agree with the kernel on which tokens are served
    qg = q.reshape(2, 2, 2, 128)
    got = decode_partials(qg, t1, SCALE, 2, precision="ieee", block=32)
    from certkv.kernels.decode import combine, decode_reference

    want = decode_reference(qg.cpu(), on_cpu(t1), SCALE)
    assert float((combine(got, 2).reshape(want.shape).double().cpu() - want).abs().max()) < 2e-6


@pytest.mark.parametrize("d, dtype", [(64, torch.bfloat16), (256, torch.float16)])
def test_other_head_dims_are_served_by_the_kernel_and_sound(d, dtype):
    # the cache's own kernel step (serving launch for D, fused epilogue), checked against the exact reference
    k, v = make_kv(b=1, hkv=2, n=420, d=d, dtype=dtype, seed=d)
    cfg = certkv.CertConfig(decode_kernel="always", out_tol=1.0, tv_tol=1.0)
    cache = certkv.TieredKVCache(1, 2, d, config=cfg, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    q = make_q(b=1, hq=4, d=d, dtype=dtype, seed=d + 1).to(DEVICE)
    served = cache.attend(0, q)
    assert cache.kernel_steps == {"tried": 1, "served": 1, "fetched": 0, "dense": 0, "dense_torch": 0}
    checks = assert_sound(cache, 0, q.cpu(), served)
    assert all(math.isfinite(c.claimed["output_bound"]) for c in checks)


def test_head_dims_the_kernels_cannot_tile_go_to_the_torch_path():
    # 192 channels: whole value groups, but not a power of two (the kernels tile D whole)
    k, v = make_kv(b=1, hkv=1, n=300, d=192, dtype=torch.float16, seed=2)
    cfg = certkv.CertConfig(decode_kernel="always", out_tol=1.0, tv_tol=1.0)
    cache = certkv.TieredKVCache(1, 1, 192, config=cfg, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    q = make_q(b=1, hq=2, d=192, dtype=torch.float16, seed=3).to(DEVICE)
    result = cache.attend(0, q)
    assert cache.kernel_steps == {"tried": 0, "served": 0, "fetched": 0, "dense": 0, "dense_torch": 0}
    assert_sound(cache, 0, q.cpu(), result)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_certified_step_captured_in_a_cuda_graph_equals_the_eager_step():
    # the FP16 serving launch loads codes by pointer eagerly at this size and through TMA (where the
    # GPU has it) inside a graph, compiled during the capture: the same bits either way
    cache = cache_of(2, 2, 700, torch.float16, seed=3)
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    q = make_q(b=2, hq=4, d=128, dtype=torch.float16, seed=5, scale=2.0).to(DEVICE).reshape(2, 2, 2, 128)
    assert code_descriptors(t1, 128, "auto") is None
    eager = kernel_step(q, t1, SCALE, st.v_min, st.v_max)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = code_descriptors(t1, 128, "auto")
        graphed = kernel_step(q, t1, SCALE, st.v_min, st.v_max)
    graph.replay()
    torch.cuda.synchronize()
    assert (captured is not None) == (torch.cuda.get_device_capability()[0] >= 9)
    assert torch.equal(graphed[0], eager[0])
    for name in BOUND_FIELDS:
        assert torch.equal(getattr(graphed[1], name), getattr(eager[1], name)), name
