"""Shared builders for tests: random but structured attention inputs."""

from __future__ import annotations

import torch

import certkv


def make_kv(b=1, hkv=2, n=96, d=32, dtype=torch.float16, seed=0, outlier=0.0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=gen)
    if outlier:
        k[..., 1] *= outlier
    v = torch.randn(b, hkv, n, d, generator=gen) * 0.5
    return k.to(dtype), v.to(dtype)


def make_q(b=1, hq=4, d=32, dtype=torch.float16, seed=1, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, 1, d, generator=gen) * scale).to(dtype)


def small_config(**kw) -> certkv.CertConfig:
    base = dict(window=8, sinks=2, key_group_size=16, value_group_size=16)
    base.update(kw)
    return certkv.CertConfig(**base)


def assert_sound(cache, layer, q, result, prec=128):
    from certkv.reference.verify import verify_step

    k, v = cache.originals(layer)
    kp, vp = cache.dequantized_exact(layer)
    checks = verify_step(q, k, v, kp, vp, result, prec=prec)
    bad = [c for c in checks if c.violations]
    assert not bad, bad[0]
    return checks


def kernel_result(cache, q, precision, splits=None, epilogue="torch", **launch):
    """Layer 0 of ``cache`` through the decode kernel with cert=True and an epilogue ("torch":
    certkv.streaming.certify, the reference; "fused": certkv.kernels.epilogue.certify), for
    q [B, H_q, 1, D], shaped as the cache serves a step (nothing fetched)."""
    from certkv.kernels import epilogue as fused
    from certkv.kernels.decode import decode_partials, from_cache

    from certkv.streaming import certify as reference

    certify = fused.certify if epilogue == "fused" else reference

    b, hq, _, d = q.shape
    hkv = cache.num_kv_heads
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    qg = q.reshape(b, hkv, hq // hkv, d)
    scale = d**-0.5
    partials = decode_partials(qg, t1, scale, splits, precision=precision, cert=True, **launch)
    out, cert = certify(qg, t1, partials, scale, precision, st.v_min, st.v_max, q.dtype, launch.get("deq16", False))
    return served_result(cache, out, cert)


def served_result(cache, out, cert):
    """A kernel step's output [B, H_kv, G, D] and certificate ([B, H_kv, G] fields) on layer 0 of
    ``cache``, shaped as the cache serves a step (query heads flattened, nothing fetched)."""
    from certkv.certificate import AttentionResult, Certificate

    b, hkv, g, d = out.shape
    fields = {k: v.reshape(b, hkv * g, 1) for k, v in cert.to_dict().items()}
    none = torch.zeros(b, hkv, cache._layers[0].length, dtype=torch.bool)
    return AttentionResult(out.reshape(b, hkv * g, 1, d).cpu(), Certificate(**fields), none, none)
