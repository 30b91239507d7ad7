"""The ladder's stage 2 on the decode kernel (certkv.kernel_ladder): the heads its stage 0 leaves
uncertified fetch their heaviest-error tokens from Tier-2 and are served again by the kernel with
those tokens promoted. On the CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from certkv.kernels.decode import Tier1, from_cache

import certkv
from certkv.kernel_ladder import token_shares, with_fetched
from certkv.streaming import kernel_step, kernel_step_partials
from tests.helpers import assert_sound, make_kv, make_q

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAVY = torch.tensor([40, 41, 200, 333, 334, 480])  # token positions (cache order), all quantized


def peaked(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """700 FP16 tokens, 2 KV heads x 2 query rows: the HEAVY keys lie along their head's queries and
    carry most of the attention, so the quantized step's error is theirs."""
    k, v = make_kv(b=1, hkv=2, n=700, d=128, dtype=torch.float16, seed=seed)
    q = make_q(b=1, hq=4, d=128, dtype=torch.float16, seed=seed + 1, scale=1.0)
    for h in range(2):
        qd = q[0, 2 * h : 2 * h + 2, 0].float().mean(0)
        k[0, h, HEAVY] = (4.5 * 128**0.5 * qd / qd.norm()).half()
    return k, v, q


def flat() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """700 FP16 tokens, 2 KV heads x 2 query rows, flat attention: the error is spread over all tokens,
    and a quarter of them fetched leave the kernel's bound above a tolerance of 0.02."""
    k, v = make_kv(b=1, hkv=2, n=700, d=128, dtype=torch.float16, seed=1)
    return k, v, make_q(b=1, hq=4, d=128, dtype=torch.float16, seed=2, scale=0.5)


def cache_for(k: torch.Tensor, v: torch.Tensor, **cfg: object) -> certkv.TieredKVCache:
    config = certkv.CertConfig(**{"decode_kernel": "always", "out_tol": 0.02, "out_rtol": 0.0} | cfg)  # type: ignore[arg-type]
    cache = certkv.TieredKVCache(1, 2, 128, config=config, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    return cache


def test_the_heavy_tokens_are_fetched_and_the_kernel_serves_the_step():
    k, v, q = peaked()
    q = q.to(DEVICE)
    cache = cache_for(k, v, promote_after=1)
    st = cache._layers[0]
    stage0 = kernel_step(q.reshape(1, 2, 2, 128), from_cache(cache, 0), 128**-0.5, st.v_min, st.v_max)[1]
    assert bool((stage0.output_bound > 0.02).all())  # the quantized step misses the tolerance
    served = cache.attend(0, q)
    cert = served.certificate
    assert cache.kernel_steps == {"tried": 1, "served": 1, "fetched": 1, "dense": 0, "dense_torch": 0}
    assert bool((cert.stage == 2).all() and cert.accepted.all())
    assert cert.fetched_keys.flatten().tolist() == [len(HEAVY)] * 4
    assert torch.equal(cert.fetched_values, cert.fetched_keys)
    want = torch.zeros(1, 2, 700, dtype=torch.bool)
    want[:, :, HEAVY] = True
    assert torch.equal(served.rows_stage2.cpu(), want) and not bool(served.rows_stage1.any())
    assert_sound(cache, 0, q.cpu(), served)
    # fetched once at promote_after=1: promoted into Tier-1, and the next step over the cache's own
    # promoted copies is served at stage 0 with the same output and terms (the same kernel arithmetic;
    # only the rounding term's token count differs: the cache's eight slots, two free, against six)
    assert cache.promoted_count(0).flatten().tolist() == [len(HEAVY)] * 2
    again = cache.attend(0, q)
    assert bool((again.certificate.stage == 0).all())
    assert torch.equal(again.output, served.output)
    for name in ("tv_bound", "key_term", "value_term", "cross_term"):
        assert torch.equal(getattr(again.certificate, name), getattr(cert, name))
    assert torch.allclose(again.certificate.rounding_term, cert.rounding_term, rtol=1e-5, atol=0.0)


def test_stage2_on_the_kernel_needs_max_stage_2():
    k, v, q = peaked()
    cache = cache_for(k, v, max_stage=1)
    served = cache.attend(0, q.to(DEVICE))
    assert cache.kernel_steps == {"tried": 1, "served": 0, "fetched": 0, "dense": 0, "dense_torch": 0}
    assert not bool((served.certificate.stage == 2).any())  # the torch ladder's stages 0-1 (and 3 off)
    assert_sound(cache, 0, q, served)


@pytest.mark.parametrize("max_stage", [2, 3])
def test_rows_stage2_leaves_uncertified_are_served_dense_or_by_the_torch_ladder(max_stage):
    # flat attention: with stage 3 allowed the rows stage 2 leaves above tolerance are served dense over
    # their heads' originals; at max_stage=2 the torch ladder (tighter per-token bounds) serves the step
    k, v, q = flat()
    cache = cache_for(k, v, max_stage=max_stage)
    served = cache.attend(0, q.to(DEVICE))
    cert = served.certificate
    if max_stage == 3:
        assert cache.kernel_steps == {"tried": 1, "served": 1, "fetched": 1, "dense": 1, "dense_torch": 0}
        assert bool((cert.stage == 3).all())
        assert cert.fetched_keys.flatten().tolist() == [700] * 4
        assert int(served.rows_stage2.sum(-1).max()) == 175  # stage 2's fetch, a quarter of 700 tokens
    else:
        assert cache.kernel_steps == {"tried": 1, "served": 0, "fetched": 0, "dense": 0, "dense_torch": 0}
        assert bool((cert.stage <= 2).all())
    assert bool(cert.accepted.all()) == (max_stage == 3)
    assert_sound(cache, 0, q, served)


def test_fetched_rows_join_the_promotion_slots_after_the_promoted_ones():
    k, v, _ = peaked()
    cache = cache_for(k, v)
    st = cache._layers[0]
    cache._grow_promoted(st, 8)
    st.promoted["idx"][0, 1, :2] = torch.tensor([7, 9], device=DEVICE)  # quantized indices 7 and 9 of head 1 promoted
    st.promoted["k"][0, 1, :2] = 1.0
    t1 = from_cache(cache, 0)
    rows = tuple(torch.tensor(x, device=DEVICE) for x in ([0, 0, 0], [0, 1, 1], [3, 5, 7 + 100]))
    keys = torch.arange(3 * 128, dtype=torch.float16).reshape(3, 128).to(DEVICE)
    out = with_fetched(t1, rows, keys, -keys)
    assert out.prom_k.shape[2] == 8 + 2  # the widest head fetched two
    assert out.prom_idx[0, 0].tolist() == [-1] * 8 + [3, -1]
    assert out.prom_idx[0, 1].tolist() == [7, 9] + [-1] * 6 + [5, 107]
    assert torch.equal(out.prom_k[0, 1, 8:], keys[1:]) and torch.equal(out.prom_v[0, 0, 8], -keys[0])
    assert torch.equal(out.prom_k[0, 1, :2], t1.prom_k[0, 1, :2])
    assert sorted(out.prom_mask[0, 1].nonzero().flatten().tolist()) == [5, 7, 9, 107]
    assert out.prom_mask[0, 0].nonzero().flatten().tolist() == [3]
    assert t1.prom_mask is not None and int(t1.prom_mask.sum()) == 2  # the cache's own Tier-1 untouched
    # rows in another dtype would be converted, and no longer be the originals: refused
    with pytest.raises(certkv.errors.DTypeError, match="fetched rows"):
        with_fetched(t1, rows, keys.bfloat16(), -keys)


@pytest.mark.parametrize("out_tol", [0.02, 1e-4])
def test_stage3_on_the_kernel_serves_the_dense_output_under_the_kernels_bound_or_the_torch_one(out_tol):
    # flat attention, served dense (as above). Stage 3's output is the dense path's; its certificate is
    # the kernel's over the same originals plus the two outputs' distance, or certified_step's over the
    # originals, row by row the smaller, where the first misses tolerance (1e-4: so tight that no
    # certificate meets it)
    from certkv.attention import StepTokens, certified_step

    k, v, q = flat()
    cache = cache_for(k, v, out_tol=out_tol)
    served = cache.attend(0, q.to(DEVICE))
    cert = served.certificate
    reproved = int(out_tol < 0.02)
    assert cache.kernel_steps == {"tried": 1, "served": 1, "fetched": 1, "dense": 1, "dense_torch": reproved}
    assert bool((cert.stage == 3).all())
    k, v, q = k.to(DEVICE), v.to(DEVICE), q.to(DEVICE)
    assert torch.equal(served.output, certkv.dense_attention(q, k, v))
    # both certificates as stage 3 computes them: the two heads as a batch of one head each
    q_d, k_d, v_d = (x.reshape(2, 1, -1, 128) for x in (q.reshape(1, 2, 2, 128), k, v))
    scale, st = 128**-0.5, cache._layers[0]
    out_k, cert_k = kernel_step(q_d, Tier1.of_originals(k_d, v_d), scale, st.v_min[0][:, None], st.v_max[0][:, None])
    apart = (served.output.reshape(2, 1, 2, 128).double() - out_k.double()).abs().amax(-1)
    kernel_bound = cert_k.output_bound + apart
    dense = certified_step(q_d, StepTokens.exact(k_d, v_d), scale, torch.float16)[1]
    bound = cert.output_bound.reshape(2, 1, 2)
    assert bool(cert.accepted.all()) != bool(reproved)
    assert bool((bound >= torch.minimum(kernel_bound, dense.output_bound)).all())
    if reproved:
        assert torch.equal(bound, torch.minimum(bound, dense.output_bound))  # never above the dense bound
        assert bool(((bound == dense.output_bound) | (bound <= kernel_bound * (1 + 1e-9))).all())
    else:
        assert bool((bound <= kernel_bound * (1 + 1e-9)).all())
        # at 700 tokens the binary32 dense computation's own bound is the tighter (FP16 weights in the
        # kernel's products); at long contexts the kernel's (benchmarks/dense_stage.py)
        assert bool((bound > dense.output_bound).all())
    assert_sound(cache, 0, q.cpu(), served)


@pytest.mark.parametrize("data", ["peaked", "flat"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_shares_kernel_gives_its_torch_references_estimate(dtype, data):
    # certkv.kernels.shares (one launch, the normaliser from stage 0's partials) against
    # certkv.kernel_ladder.token_shares (dequantized keys, a softmax over every served token), over a
    # Tier-1 with promoted tokens, for every pair and for one
    from certkv.kernels.shares import token_shares as shares_kernel

    k, v, q = peaked() if data == "peaked" else flat()
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype).to(DEVICE)
    cache = cache_for(k, v)
    st = cache._layers[0]
    qg, scale = q.reshape(1, 2, 2, 128), 128**-0.5
    idx = [int(HEAVY[0]) - 4, 3, int(HEAVY[2]) - 4]  # quantized indices (after the 4 sinks)
    rows = tuple(torch.tensor(x, device=DEVICE) for x in ([0, 0, 0], [0, 1, 1], idx))
    fetched = [x[0, rows[1].cpu(), rows[2].cpu() + 4].to(DEVICE) for x in (k, v)]
    t1 = with_fetched(from_cache(cache, 0), rows, *fetched)
    value_range = (st.v_max.float() - st.v_min.float()).amax(-1)
    _, _, partials = kernel_step_partials(qg, t1, scale, st.v_min, st.v_max)
    for pairs in (torch.tensor([[0, 0], [0, 1]], device=DEVICE), torch.tensor([[0, 1]], device=DEVICE)):
        got = shares_kernel(qg, t1, partials, scale, value_range, pairs)
        want = token_shares(qg, t1, scale, value_range, pairs)
        # the two softmaxes differ by rounding: stage 0's logits from FP16 operands, the reference's
        # from binary32 ones
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-12)
        if data == "flat":  # nearly every share is compared relatively (none far below atol)
            assert float(want[want > 0].min()) > 1e-9
        for j, (_, h) in enumerate(pairs.tolist()):
            promoted = [i for hh, i in zip(rows[1].tolist(), idx, strict=True) if hh == h]
            assert bool((got[j, promoted] == 0).all())  # served exactly already
            if data == "peaked":  # the heavy tokens carry the largest shares
                heavy = set((HEAVY - 4).tolist()) - set(promoted)
                assert set(got[j].topk(len(heavy)).indices.tolist()) == heavy
