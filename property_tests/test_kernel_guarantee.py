"""The decode kernel's streamed certificate against the exact reference on drawn caches: every
certified precision, GQA group, split count and the hard logit cases of the core suite, with and
without promoted tokens, through either epilogue (the torch reference or the fused kernel). The
kernel runs on the GPU where there is one, else in Triton's interpreter on the CPU; a quarter of the
profile's examples (it is the slowest suite)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")


import certkv
from certkv.reference.verify import verify_step
from property_tests.strategies import MODES, Scenario
from tests.helpers import kernel_result

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LAUNCHES = {
    "ieee": {"block": 64},
    "ieee-chunks": {"block": 32, "key_chunks": 2},
    "fma": {"block": 16},
    "fp16": {"block": 64},
    "fp16-deq16": {"block": 32, "deq16": True, "key_chunks": 2},
}


@st.composite
def kernel_cases(draw: st.DrawFn) -> tuple[Scenario, str, int | None, str]:
    launch = draw(st.sampled_from(sorted(LAUNCHES)))
    # deq16 dequantizes in FP16 arithmetic: FP16 caches only
    dtype = torch.float16 if launch == "fp16-deq16" else draw(st.sampled_from((torch.float16, torch.bfloat16)))
    sc = Scenario(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from((1, 2, 4))),
        n=draw(st.integers(129, 700)),
        head_dim=128,
        dtype=dtype,
        mode=draw(st.sampled_from(MODES)),
        q_scale=draw(st.sampled_from((0.1, 1.0, 3.0, 10.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        config=certkv.CertConfig(
            window=draw(st.sampled_from((0, 16, 128))),
            sinks=draw(st.integers(0, 4)),
            # promotion: two earlier steps served by the torch ladder; at out_tol 0 every head fetches
            # rows, and promote_after=1 promotes them (at 1e9 nothing is fetched or promoted)
            promote_after=1,
            out_tol=draw(st.sampled_from((0.0, 1e9))),
            out_rtol=0.0,
            max_stage=2,
            decode_kernel="never",
        ),
    )
    return sc, launch, draw(st.sampled_from((None, 1, 2, 5))), draw(st.sampled_from(("torch", "fused")))


@settings(max_examples=max(1, settings().max_examples // 4))
@given(kernel_cases())
def test_streamed_certificate_dominates_the_exact_error(case: tuple[Scenario, str, int | None, str]) -> None:
    sc, launch, splits, epilogue = case
    q, k, v = sc.tensors()
    cache = certkv.TieredKVCache(1, sc.kv_heads, 128, config=sc.config, device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    layer = cache._layers[0]
    if layer.qk is None:
        return  # fewer tokens than one key group beyond the window: nothing for the kernel
    for shift in (1, 2):
        cache.attend(0, torch.roll(q, shift, dims=-1).to(DEVICE))
    result = kernel_result(cache, q.to(DEVICE), launch.split("-")[0], splits, epilogue, **LAUNCHES[launch])
    checks = verify_step(q, *cache.originals(0), *cache.dequantized_exact(0), result)
    bad = [c for c in checks if c.violations]
    assert not bad, f"violated {bad[0].violations}: claimed {bad[0].claimed} exact {bad[0].exact}"
