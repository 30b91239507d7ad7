"""The core guarantee under every quantization policy preset (certkv.policies), against the exact reference."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

import certkv
from property_tests.strategies import Scenario, scenarios
from property_tests.test_guarantee import _check, _serve

POLICIES = (
    "paper", "kivi", "kivi:4", "key-favoured:K4V2", "key-favoured:K8V2", "key-favoured:K2V4", "progressive:128",
    "kvquant", "kvquant:2", "kvquant:8", "rotated", "rotated:2", "rotated:8",
    "keys=kvquant:8,values=kivi", "keys=rotated,values=kvquant:2",
)  # fmt: skip


@st.composite
def policy_scenarios(draw: st.DrawFn) -> Scenario:
    """A scenario whose cache follows a policy; head_dim 64 (policies group 32 or 64 channels), and a
    window of at most 12 tokens so that most tokens are quantized at these small sizes."""
    sc = draw(scenarios())
    base = sc.config
    cfg = certkv.CertConfig(
        policy=draw(st.sampled_from(POLICIES)),
        window=draw(st.integers(0, 12)),
        max_stage=base.max_stage,
        tv_tol=base.tv_tol,
        out_tol=base.out_tol,
        out_rtol=base.out_rtol,
        fetch_fraction=base.fetch_fraction,
    )
    return dataclasses.replace(sc, head_dim=64, config=cfg)


@given(policy_scenarios())
def test_every_policy_is_certified_soundly(sc: Scenario) -> None:
    q, cache, res = _serve(sc, appends=2)
    _check(q, cache, res)
