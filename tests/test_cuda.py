"""On CUDA: pinned Tier-2, the ladder and soundness of the torch path on the GPU (skipped without one)."""

import pytest
import torch

import certkv
from tests.helpers import assert_sound, make_kv, make_q, small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", [None, "kvquant", "rotated:2", "keys=kvquant:8,values=kivi"])
def test_cuda_cache_is_sound_at_every_stage(dtype, policy):
    k, v = make_kv(b=2, n=300, dtype=dtype, outlier=10.0)
    q = make_q(b=2, dtype=dtype, scale=3.0)
    cfg = small_config(out_tol=0.01, out_rtol=0.0, policy=policy, key_outliers=0.05 if policy else 0.0)
    cache = certkv.TieredKVCache(1, 2, 32, config=cfg, device="cuda")
    cache.append(0, k.cuda(), v.cuda())
    ko, _ = cache.originals(0)
    assert ko.is_pinned() and not ko.is_cuda
    res = cache.attend(0, q.cuda())
    assert res.output.is_cuda and len(set(res.certificate.stage.flatten().tolist())) >= 1
    assert_sound(cache, 0, q.cuda(), res)
    dense = certkv.dense_attention(q.cuda(), k.cuda(), v.cuda())
    at3 = res.certificate.stage[..., 0] == 3
    assert torch.equal(res.output[at3], dense[at3])


@pytest.mark.parametrize("policy", [None, "kvquant"])
def test_cuda_trace_audits_on_the_host(tmp_path, policy):
    from certkv.audit import audit
    from certkv.trace import TraceRecorder

    k, v = make_kv(b=2, n=200, outlier=10.0)
    with TraceRecorder(tmp_path / "t") as rec:
        cfg = small_config(out_tol=0.01, out_rtol=0.0, policy=policy)
        cache = certkv.TieredKVCache(1, 2, 32, config=cfg, device="cuda", recorder=rec)
        cache.append(0, k.cuda(), v.cuda())
        for seed in range(3):
            cache.attend(0, make_q(b=2, seed=seed, scale=3.0).cuda())
    report = audit(tmp_path / "t")
    assert len(report.steps) == 3 and not report.violations
    assert report.dense_note is not None and "cuda" in report.dense_note
