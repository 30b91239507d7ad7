"""Steps served through the ladder on the decode kernel (``certkv.kernel_ladder``: stage 0 and stage 2
on the kernel, stage 3 dense, else the torch ladder) against the exact reference, on drawn caches:
the hard logit cases of the core suite, tolerances that send heads up every stage, tokens promoted
by earlier steps' fetches. The kernel runs on the GPU where there is one, else in Triton's
interpreter; an eighth of the profile's examples (each step runs the kernel up to twice)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import certkv
from certkv.reference.verify import verify_step
from property_tests.strategies import MODES, Scenario

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def ladder_cases(draw: st.DrawFn) -> tuple[Scenario, int]:
    sc = Scenario(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from((1, 2, 4))),
        n=draw(st.integers(300, 700)),
        head_dim=128,
        dtype=draw(st.sampled_from((torch.float16, torch.bfloat16))),
        mode=draw(st.sampled_from(MODES)),
        q_scale=draw(st.sampled_from((0.1, 1.0, 3.0, 10.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        config=certkv.CertConfig(
            window=draw(st.sampled_from((16, 128))),
            sinks=draw(st.integers(0, 4)),
            promote_after=draw(st.sampled_from((1, 3))),
            out_tol=draw(st.sampled_from((0.0, 0.005, 0.02, 1e9))),
            out_rtol=0.0,
            max_stage=draw(st.sampled_from((2, 3))),
            decode_kernel="always",
        ),
    )
    return sc, draw(st.integers(0, 1))


@settings(max_examples=max(1, settings().max_examples // 8))
@given(ladder_cases())
def test_kernel_ladder_steps_are_within_their_bounds(case: tuple[Scenario, int]) -> None:
    sc, earlier = case
    q, k, v = sc.tensors()
    cache = certkv.TieredKVCache(1, sc.kv_heads, 128, config=sc.config, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    for shift in range(1, earlier + 1):  # an earlier step's fetches, promoted at promote_after=1
        cache.attend(0, torch.roll(q, shift, dims=-1).to(DEVICE))
    # Tier-1 as the step sees it: its own fetches may be promoted once it is served
    served_parts = cache.dequantized_exact(0)
    result = cache.attend(0, q.to(DEVICE))
    checks = verify_step(q, *cache.originals(0), *served_parts, result)
    bad = [c for c in checks if c.violations]
    assert not bad, f"violated {bad[0].violations}: claimed {bad[0].claimed} exact {bad[0].exact}"
