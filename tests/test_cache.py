"""TieredKVCache: tiers, memory, the ladder, promotion, strict mode and soundness on fixed cases."""

import pytest
import torch

import certkv
from tests.helpers import assert_sound, make_kv, make_q, small_config


def test_append_in_pieces_equals_append_at_once():
    k, v = make_kv(n=150)
    q = make_q()
    whole = certkv.TieredKVCache(1, 2, 32, config=small_config())
    whole.append(0, k, v)
    pieces = certkv.TieredKVCache(1, 2, 32, config=small_config())
    for lo, hi in ((0, 1), (1, 40), (40, 41), (41, 150)):
        pieces.append(0, k[:, :, lo:hi], v[:, :, lo:hi])
    a, b = whole.attend(0, q), pieces.attend(0, q)
    assert torch.equal(a.output, b.output)
    assert torch.equal(a.certificate.output_bound, b.certificate.output_bound)
    ko, vo = pieces.originals(0)
    assert torch.equal(ko, k) and torch.equal(vo, v)


def test_tier_layout_window_and_sinks():
    cfg = small_config(window=8, sinks=2, key_group_size=16)
    cache = certkv.TieredKVCache(1, 2, 32, config=cfg)
    k, v = make_kv(n=50)
    cache.append(0, k, v)
    lo, hi = cache.quantized_span(0)
    assert lo == 2 and (hi - lo) % 16 == 0 and 8 <= 50 - hi < 8 + 16
    tokens = cache.tokens(0)
    assert torch.equal(tokens.k[:, :, :2], k[:, :, :2].float())  # sinks exact
    assert torch.equal(tokens.k[:, :, hi:], k[:, :, hi:].float())  # window exact
    assert bool((tokens.k_radius[:, :, lo:hi] > 0).any())


def test_memory_report_counts_every_tier1_byte():
    d, n = 128, 16384
    cache = certkv.TieredKVCache(1, 1, d, config=certkv.CertConfig())
    k, v = make_kv(hkv=1, n=n, d=d)
    cache.append(0, k, v)
    rep = cache.memory_report()
    lo, hi = cache.quantized_span(0)
    n_q = hi - lo
    per_quant_token = d * 1 + d // 2 + 2 * 2 * d / 128 + 2 * 2 * d / 64  # INT8 K, INT4 V, scales+zeros
    expected = n_q * per_quant_token + (n - n_q) * 2 * 2 * d + 2 * 4 * d  # + FP16 tokens + value range
    assert rep.tier1_bytes == expected
    assert rep.tier2_bytes == rep.fp16_cache_bytes == 2 * n * 2 * d
    assert rep.ratio <= 0.41  # -> 0.398 as the FP16 window's share vanishes (docs/theory.md)


def test_stage3_is_bitwise_the_dense_path():
    k, v = make_kv(n=120)
    q = make_q()
    cfg = small_config(out_tol=0.0, out_rtol=0.0, tv_tol=0.0)  # nothing but dense is acceptable
    res = certkv.certified_attention(q, k, v, cfg)
    assert bool((res.certificate.stage == 3).all())
    assert torch.equal(res.output, certkv.dense_attention(q, k, v))


def test_the_dense_path_sums_over_blocks_and_its_bound_holds_across_them():
    # 1000 tokens: three whole blocks of SUM_BLOCK and a padded fourth; served dense, sound against the
    # exact reference, and the bound covers the blocked sums (gamma of sum_chain, not of 1000)
    from certkv.attention import SUM_BLOCK, sum_chain

    assert 1000 % SUM_BLOCK and sum_chain(1000) == SUM_BLOCK + 4
    k, v = make_kv(n=1000, seed=11)
    q = make_q(seed=12, scale=2.0)
    cfg = small_config(out_tol=0.0, out_rtol=0.0, tv_tol=0.0)
    cache = certkv.TieredKVCache(1, 2, 32, config=cfg)
    cache.append(0, k, v)
    res = cache.attend(0, q)
    assert bool((res.certificate.stage == 3).all())
    assert torch.equal(res.output, certkv.dense_attention(q, k, v))
    assert_sound(cache, 0, q, res)


def test_stage3_for_some_heads_only_matches_dense_on_those_heads():
    k, v = make_kv(b=2, n=120, seed=5)
    q = make_q(b=2, seed=6)
    cfg = small_config(max_stage=3, out_tol=0.02, out_rtol=0.0, fetch_fraction=0.02)
    res = certkv.certified_attention(q, k, v, cfg)
    dense = certkv.dense_attention(q, k, v)
    st = res.certificate.stage[..., 0]
    assert bool((st == 3).any())
    assert torch.equal(res.output[st == 3], dense[st == 3])


def test_max_stage_zero_reports_without_fallback():
    k, v = make_kv(n=200)
    res = certkv.certified_attention(make_q(), k, v, small_config(max_stage=0, out_tol=0.0, out_rtol=0.0))
    c = res.certificate
    assert bool((c.stage == 0).all()) and not bool(c.accepted.any())
    assert bool((c.output_bound > 0).all()) and int(c.fetched_values.sum()) == 0


@pytest.mark.parametrize("max_stage", [1, 2, 3])
def test_ladder_escalates_only_as_needed_and_stays_sound(max_stage):
    k, v = make_kv(n=160, outlier=8.0, seed=2)
    q = make_q(seed=3, scale=3.0)
    cfg = small_config(max_stage=max_stage, out_tol=0.01, out_rtol=0.0, tv_tol=0.02)
    cache = certkv.TieredKVCache(1, 2, 32, config=cfg)
    cache.append(0, k, v)
    res = cache.attend(0, q)
    c = res.certificate
    assert int(c.stage.max()) <= max_stage
    assert bool((c.accepted | (c.stage == max_stage)).all())
    checks = assert_sound(cache, 0, q, res)
    assert {ch.stage for ch in checks} <= set(range(max_stage + 1))


def test_stage1_reads_value_rows_only_and_stage2_reads_both():
    k, v = make_kv(n=160, outlier=8.0, seed=2)
    q = make_q(seed=3, scale=3.0)
    cache = certkv.TieredKVCache(1, 2, 32, config=small_config(max_stage=2, out_tol=0.01, out_rtol=0.0, tv_tol=0.02))
    cache.append(0, k, v)
    calls, fetch = [], cache._fetch_rows

    def spy(st, b, h, t, keys=True):
        rows = fetch(st, b, h, t, keys)
        calls.append((keys, rows[0] is not None, len(rows[1])))
        return rows

    cache._fetch_rows = spy
    res = cache.attend(0, q)
    assert set(res.certificate.stage.flatten().tolist()) >= {2}  # both stages ran
    assert calls[0][:2] == (False, False) and calls[1][:2] == (True, True) and len(calls) == 2
    assert calls[0][2] == int(res.rows_stage1.sum()) and calls[1][2] == int(res.rows_stage2.sum())
    assert_sound(cache, 0, q, res)


def test_ladder_stage_bounds_improve_on_stage0():
    k, v = make_kv(n=160, seed=4)
    q = make_q(seed=4, scale=4.0)
    base = certkv.certified_attention(q, k, v, small_config(max_stage=0))
    laddered = certkv.certified_attention(q, k, v, small_config(max_stage=2, out_tol=0.005, out_rtol=0.0))
    moved = laddered.certificate.stage[..., 0] > 0
    assert bool(moved.any())
    assert bool((laddered.certificate.output_bound[moved] < base.certificate.output_bound[moved]).all())


def test_tokens_that_keep_falling_back_are_promoted():
    k, v = make_kv(n=160, seed=8)
    cfg = small_config(max_stage=1, out_tol=0.02, out_rtol=0.0, promote_after=2, promote_budget=8)
    cache = certkv.TieredKVCache(1, 2, 32, config=cfg)
    cache.append(0, k, v)
    q = make_q(seed=9, scale=4.0)
    first = cache.attend(0, q)
    assert int(first.certificate.fetched_values.sum()) > 0
    cache.attend(0, q)
    promoted = cache.promoted_count(0)
    assert int(promoted.sum()) > 0 and int(promoted.max()) <= 8
    third = cache.attend(0, q)
    assert_sound(cache, 0, q, third)
    # promoted tokens are exact in Tier-1: fewer fetches are needed for the same query
    assert int(third.certificate.fetched_values.sum()) < int(first.certificate.fetched_values.sum())


def test_promotion_bookkeeping_runs_exactly_on_steps_that_fetched():
    # the cache skips it on the host's word (LadderOutcome.fetched), without looking at the rows
    k, v = make_kv(n=160, seed=8)
    cfg = small_config(max_stage=1, out_tol=0.15, out_rtol=0.0, promote_after=2, promote_budget=8)
    cache = certkv.TieredKVCache(1, 2, 32, config=cfg)
    cache.append(0, k, v)
    seen, count = [], cache._count_fetches

    def spy(st, fetched):
        seen.append(int(fetched.sum()))
        count(st, fetched)

    cache._count_fetches = spy
    fetching = cache.attend(0, make_q(seed=9, scale=4.0))
    quiet = cache.attend(0, make_q(seed=9, scale=0.05))
    assert int(fetching.certificate.fetched_values.sum()) > 0 and int(quiet.certificate.fetched_values.sum()) == 0
    assert seen == [int((fetching.rows_stage1 | fetching.rows_stage2).sum())]


def test_fetch_bookkeeping_stops_once_every_promotion_slot_is_taken():
    # promote_after=1 and a budget of 2 slots per head: the first step fetches more rows than that for
    # every head and fills every slot, after which fetched rows are no longer counted (nothing could be
    # promoted), and Tier-1 stays as it was
    k, v = make_kv(n=160, seed=8)
    cfg = small_config(max_stage=1, out_tol=0.15, out_rtol=0.0, promote_after=1, promote_budget=2)
    cache = certkv.TieredKVCache(1, 2, 32, config=cfg)
    cache.append(0, k, v)
    st = cache._layers[0]
    first = cache.attend(0, make_q(seed=9, scale=4.0))
    assert bool(((first.rows_stage1 | first.rows_stage2).sum(-1) > 2).all())
    assert cache.promoted_count(0).flatten().tolist() == [2, 2] and st.promotion_full
    counts, rows = st.fetch_count.clone(), cache.promoted_rows(0)
    again = cache.attend(0, make_q(seed=10, scale=4.0))
    assert bool((again.rows_stage1 | again.rows_stage2).any())  # fetched, and not counted
    assert torch.equal(st.fetch_count, counts) and torch.equal(cache.promoted_rows(0), rows)


def test_self_check_passes_on_sound_steps():
    k, v = make_kv(n=100)
    res = certkv.certified_attention(make_q(), k, v, small_config(self_check=True))
    assert res.output.shape == (1, 4, 1, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq", [2, 4, 8])
def test_gqa_and_dtypes_sound_at_stage0(dtype, hq):
    k, v = make_kv(n=90, dtype=dtype, outlier=20.0)
    q = make_q(hq=hq, dtype=dtype, scale=1.5)
    cache = certkv.TieredKVCache(1, 2, 32, config=small_config(max_stage=0))
    cache.append(0, k, v)
    res = cache.attend(0, q)
    assert res.output.dtype == dtype and res.output.shape == (1, hq, 1, 32)
    assert_sound(cache, 0, q, res)


def test_single_token_and_explicit_scale():
    k, v = make_kv(n=1)
    q = make_q()
    res = certkv.certified_attention(q, k, v, small_config(), scale=0.3)
    assert torch.equal(res.output, certkv.dense_attention(q, k, v, scale=0.3))
    assert bool((res.output == v.repeat_interleave(2, 1)).all())
