"""Hypothesis strategies, each named for the failure mode it hunts.

A drawn ``Scenario`` fixes shapes, dtype, configuration and a seed; tensors are generated from the
seed (so examples shrink on the parameters that matter, and replay exactly)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import certkv

MODES = (
    "gaussian",
    "outlier_channel_keys",
    "near_tied_logits",
    "huge_logit_range",
    "attention_sink",
    "constant_values",
    "tiny_values",
)


@dataclass(frozen=True)
class Scenario:
    batch: int
    kv_heads: int
    group: int
    n: int
    head_dim: int
    dtype: torch.dtype
    mode: str
    q_scale: float
    seed: int
    config: certkv.CertConfig

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.batch, self.kv_heads, self.n, self.head_dim)
        k = torch.randn(shape, generator=g)
        v = torch.randn(shape, generator=g) * 0.5
        q = torch.randn(self.batch, self.kv_heads * self.group, 1, self.head_dim, generator=g) * self.q_scale
        if self.mode == "outlier_channel_keys":
            k[..., 0] *= 60.0
            k[..., 1] += 25.0
            q[..., 0] *= 4.0
        elif self.mode == "near_tied_logits":
            k = k[:, :, :1] + 1e-3 * k
        elif self.mode == "huge_logit_range":
            k = k * 150.0
            q = q * 40.0
        elif self.mode == "attention_sink":
            k[:, :, 0] = q.reshape(self.batch, self.kv_heads, self.group, -1).mean(2) * 3
        elif self.mode == "constant_values":
            v = v[:, :, :1].expand_as(v).clone()
        elif self.mode == "tiny_values":
            v = v * 1e-4
        lim = 60000.0 if self.dtype == torch.float16 else 1e30
        return tuple(t.clamp(-lim, lim).to(self.dtype) for t in (q, k, v))  # type: ignore[return-value]


@st.composite
def configs(draw: st.DrawFn, head_dim: int) -> certkv.CertConfig:
    divisors = [g for g in (4, 8, 16, 32) if head_dim % g == 0]
    return certkv.CertConfig(
        key_bits=draw(st.sampled_from((8, 4, 2))),
        value_bits=draw(st.sampled_from((8, 4, 2))),
        key_group_axis=draw(st.sampled_from(("token", "channel"))),
        key_group_size=draw(st.sampled_from(divisors)),
        value_group_axis=draw(st.sampled_from(("channel", "token"))),
        value_group_size=draw(st.sampled_from(divisors)),
        window=draw(st.integers(0, 12)),
        sinks=draw(st.integers(0, 3)),
        max_stage=draw(st.integers(0, 3)),
        tv_tol=draw(st.sampled_from((0.0, 0.01, 0.05, 0.5))),
        out_tol=draw(st.sampled_from((0.0, 0.005, 0.02, 0.2))),
        out_rtol=draw(st.sampled_from((0.0, 0.05))),
        fetch_fraction=draw(st.sampled_from((0.05, 0.25, 1.0))),
    )


@st.composite
def scenarios(draw: st.DrawFn, modes: tuple[str, ...] = MODES) -> Scenario:
    head_dim = draw(st.sampled_from((8, 16, 32)))
    n = draw(st.one_of(st.just(1), st.integers(2, 64), st.integers(65, 260)))
    return Scenario(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from((1, 2, 4))),
        n=n,
        head_dim=head_dim,
        dtype=draw(st.sampled_from((torch.float16, torch.bfloat16))),
        mode=draw(st.sampled_from(modes)),
        q_scale=draw(st.sampled_from((0.1, 1.0, 3.0, 10.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        config=draw(configs(head_dim)),
    )
