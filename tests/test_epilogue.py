"""The fused certificate epilogue (certkv.kernels.epilogue) against its torch reference
(certkv.streaming.certify) on the same kernel statistics, and against the exact reference. On the
CPU it runs in Triton's interpreter."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from certkv.kernels import epilogue
from certkv.kernels.decode import decode_partials, from_cache

from certkv.streaming import BOUND_FIELDS, STAGE0_COUNTS, certify
from tests.helpers import assert_sound, make_q, served_result
from tests.test_streaming import CASES, DEVICE, SCALE, cache_of, promoted_cache


def both(cache, q, precision, splits=None, **launch):
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    deq16 = launch.get("deq16", False)
    partials = decode_partials(q, t1, SCALE, splits, precision=precision, cert=True, **launch)
    args = (q, t1, partials, SCALE, precision, st.v_min, st.v_max, q.dtype, deq16)
    return certify(*args), epilogue.certify(*args)


def assert_same(ref, fused):
    """Same outputs (NaN where the reference has NaN); every bound within float64 reordering (sums in
    another order, tanh through exp); the stage-0 fields (zeros the fused epilogue writes itself into
    uninitialised memory) equal, dtypes and shapes included."""
    torch.testing.assert_close(fused[0], ref[0], rtol=0, atol=0, equal_nan=True)
    for name in BOUND_FIELDS:
        want, got = getattr(ref[1], name), getattr(fused[1], name)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14, msg=name)
    for name in (*STAGE0_COUNTS, "tolerance", "accepted"):
        want, got = getattr(ref[1], name), getattr(fused[1], name)
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("dtype, precision, launch, shape, splits, q_scale", CASES)
def test_fused_epilogue_is_its_reference(dtype, precision, launch, shape, splits, q_scale):
    b, hkv, g, n = shape
    cache = cache_of(b, hkv, n, dtype, seed=n)
    q = make_q(b=b, hq=hkv * g, d=128, dtype=dtype, seed=n + 1, scale=q_scale).to(DEVICE).reshape(b, hkv, g, 128)
    ref, fused = both(cache, q, precision, splits, **launch)
    assert_same(ref, fused)
    assert all(math.isfinite(x) for x in fused[1].output_bound.flatten().tolist())


@pytest.mark.parametrize("rows, edge_bins", [(2, 32), (4, 4)])
def test_other_program_shapes_give_the_same_certificate(monkeypatch, rows, edge_bins):
    # the final pass serves one query row per program and the edge maximum EDGE_BINS vertex rows per
    # program: any numbers give the same
    monkeypatch.setattr(epilogue, "FINAL_ROWS", rows)
    monkeypatch.setattr(epilogue, "EDGE_BINS", edge_bins)
    dtype, precision, launch, (b, hkv, g, n), splits, q_scale = CASES[5]  # 4 query rows per KV head
    cache = cache_of(b, hkv, n, dtype, seed=n)
    q = make_q(b=b, hq=hkv * g, d=128, dtype=dtype, seed=n + 1, scale=q_scale).to(DEVICE).reshape(b, hkv, g, 128)
    assert_same(*both(cache, q, precision, splits, **launch))


@pytest.mark.parametrize("case", [2, 5])
def test_many_parts_give_the_same_certificate(monkeypatch, case):
    # served chunks are 16+ blocks (one part at these sizes): parts of 2 blocks exercise the reductions
    # over parts in the binning, edge-maximum and final passes
    monkeypatch.setitem(epilogue.STEP, "blocks", 2)
    monkeypatch.setattr(epilogue, "CHUNK_LEAST", 2)
    dtype, precision, launch, (b, hkv, g, n), splits, q_scale = CASES[case]
    cache = cache_of(b, hkv, n, dtype, seed=n)
    q = make_q(b=b, hq=hkv * g, d=128, dtype=dtype, seed=n + 1, scale=q_scale).to(DEVICE).reshape(b, hkv, g, 128)
    t1 = from_cache(cache, 0)
    n_blocks = t1.kc.shape[2] // launch.get("block", 64)
    assert n_blocks >= 6  # three parts or more
    assert_same(*both(cache, q, precision, splits, **launch))


def test_uninitialised_buffers_never_reach_the_output_or_the_certificate(monkeypatch):
    # every buffer allocated without a value starts as garbage (NaN, -1, True): the kernel does not
    # write the padding rows of its partials (4 GQA rows padded to 16 here) and the epilogue's last launch
    # writes the certificate's stage-0 zeros, so the step is the same as with fresh memory
    dtype, precision, launch, (b, hkv, g, n), splits, q_scale = CASES[2]
    cache = cache_of(b, hkv, n, dtype, seed=n)
    q = make_q(b=b, hq=hkv * g, d=128, dtype=dtype, seed=n + 1, scale=q_scale).to(DEVICE).reshape(b, hkv, g, 128)
    clean = both(cache, q, precision, splits, **launch)
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan if t.dtype.is_floating_point else True if t.dtype == torch.bool else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    ref, fused = both(cache, q, precision, splits, **launch)
    monkeypatch.undo()
    assert_same(clean[0], ref)
    assert_same(clean[0], fused)


def test_gqa_group_of_three_pads_rows_without_changing_the_certificate():
    # 3 query rows per KV head: every pass runs on 4 (padded) rows, one program per row where it splits
    cache = cache_of(1, 2, 330, torch.bfloat16, seed=7)
    q = make_q(b=1, hq=6, d=128, dtype=torch.bfloat16, seed=8, scale=2.0).to(DEVICE)
    ref, fused = both(cache, q.reshape(1, 2, 3, 128), "fma", block=16)
    assert_same(ref, fused)
    assert_sound(cache, 0, q.cpu(), served_result(cache, *fused))


def test_no_exact_tokens():
    cache = cache_of(1, 2, 512, torch.float16, seed=5, window=0, sinks=0)
    q = make_q(b=1, hq=4, d=128, dtype=torch.float16, seed=2).to(DEVICE)
    ref, fused = both(cache, q.reshape(1, 2, 2, 128), "ieee")
    assert_same(ref, fused)
    assert_sound(cache, 0, q.cpu(), served_result(cache, *fused))


def test_fused_epilogue_refuses_and_flags_like_its_reference():
    cache = cache_of(1, 1, 300, torch.float16)
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    q = make_q(b=1, hq=2, d=128, dtype=torch.float16).to(DEVICE).reshape(1, 1, 2, 128)
    partials = decode_partials(q, t1, SCALE, precision="tf32", cert=True)
    with pytest.raises(ValueError, match="no rounding model"):
        epilogue.certify(q, t1, partials, SCALE, "tf32", st.v_min, st.v_max, q.dtype)
    # dequantized keys reaching 73,500 overflow FP16 operands: nothing certified, by both
    t1.ks[..., 0] = 300.0
    t1.kz[..., 0] = -3000.0
    ref, fused = both(cache, q, "fp16")
    assert bool(torch.isinf(fused[1].output_bound).all())
    assert_same(ref, fused)


def test_promoted_tokens_through_the_fused_epilogue():
    cache = promoted_cache(1)
    assert int(cache.promoted_count(0).min()) > 0
    q = make_q(b=1, hq=4, d=128, dtype=torch.float16, seed=11).to(DEVICE)
    ref, fused = both(cache, q.reshape(1, 2, 2, 128), "fp16", splits=2, block=32)
    assert_same(ref, fused)
    assert_sound(cache, 0, q.cpu(), served_result(cache, *fused))


@pytest.mark.parametrize("bh", [1, 8, 64, 512])
@pytest.mark.parametrize("n_blocks", [1, 15, 64, 256, 1024, 4096])
def test_parts_are_whole_steps_at_least_the_least_and_at_most_most_parts_per_head(bh, n_blocks):
    per, target, least, most = 16, 528, 16, 32
    chunk = epilogue.chunks_for(bh, n_blocks, per, target, least, most)
    parts = -(-n_blocks // chunk)
    assert chunk % per == 0 and chunk >= least and parts <= most
    # no longer than needed: one step shorter would make more than ``target`` programs in all or more
    # than ``most`` parts per head
    if chunk > least:
        shorter = chunk - per
        assert shorter * target < n_blocks * bh or shorter * most < n_blocks
