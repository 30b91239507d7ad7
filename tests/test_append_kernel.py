"""The append kernel against its torch reference (certkv.quant.quantize): bit for bit, codes, scales,
zero points and radii. On the CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from certkv.kernels.append import append_block

from certkv.quant import quantize
from tests.helpers import make_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, h, n, seed", [(1, 1, 128, 0), (2, 3, 256, 1)])
def test_append_kernel_equals_the_torch_quantizer(dtype, b, h, n, seed):
    k, v = make_kv(b=b, hkv=h, n=n, d=128, dtype=dtype, seed=seed, outlier=40.0)
    k[0, 0, :, 7] = 1.5  # a constant channel: scale 0, radius 0
    v[0, 0, 3, :64] = -2.0  # a constant value group
    k, v = k.to(DEVICE), v.to(DEVICE)
    keys, values, kr, vr = append_block(k, v)
    want_k, want_v = quantize(k, 8, "token", 128), quantize(v, 4, "channel", 64)
    for got, want in ((keys, want_k), (values, want_v)):
        for part in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, part), getattr(want, part)), part
    assert torch.equal(keys.radius(), want_k.radius()) and torch.equal(values.radius(), want_v.radius())
    # the emitted radii are the ones the bounds use, per group
    assert torch.equal(kr.repeat_interleave(128, dim=2), want_k.radius())
    assert torch.equal(vr.repeat_interleave(64, dim=3), want_v.radius())
    assert float(kr[0, 0, 0, 7]) == 0.0


def test_append_kernel_refuses_other_shapes():
    k, v = make_kv(b=1, hkv=1, n=100, d=128)
    with pytest.raises(ValueError, match="multiple of 128"):
        append_block(k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cache uses the kernel on CUDA only")
def test_cuda_cache_appends_through_the_kernel():
    import certkv
    from tests.helpers import assert_sound, make_q

    k, v = make_kv(b=2, hkv=2, n=700, d=128, dtype=torch.bfloat16, outlier=20.0)
    cache = certkv.TieredKVCache(1, 2, 128, device="cuda")
    assert cache._append_kernel
    cache.append(0, k[:, :, :300].cuda(), v[:, :, :300].cuda())
    cache.append(0, k[:, :, 300:].cuda(), v[:, :, 300:].cuda())
    lo, hi = cache.quantized_span(0)
    qk, qv = cache.quantized_storage(0)
    want_k = quantize(k[:, :, lo:hi].cuda(), 8, "token", 128)
    want_v = quantize(v[:, :, lo:hi].cuda(), 4, "channel", 64)
    for got, want in ((qk, want_k), (qv, want_v)):
        assert all(torch.equal(getattr(got, p), getattr(want, p)) for p in ("codes", "scale", "zero"))
    q = make_q(b=2, hq=4, d=128, dtype=torch.bfloat16, scale=3.0).cuda()
    assert_sound(cache, 0, q, cache.attend(0, q))
