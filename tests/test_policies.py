"""Policy presets: what each name sets, and Tier-1 bytes counted exactly per policy."""

from __future__ import annotations

import pytest
import torch

import certkv
from certkv import errors
from tests.helpers import make_kv


@pytest.mark.parametrize(
    "policy, fields",
    [
        ("paper", dict(key_bits=8, value_bits=4, key_group_size=128, value_group_size=64, window=128, sinks=4)),
        ("kivi", dict(key_bits=2, value_bits=2, key_group_axis="token", value_group_axis="channel", sinks=0)),
        ("kivi:4", dict(key_bits=4, value_bits=4, key_group_size=32, value_group_size=32, window=128)),
        ("key-favoured:K8V2", dict(key_bits=8, value_bits=2)),
        ("progressive:128", dict(key_bits=2, value_bits=2, window=128, sinks=4)),
        ("progressive", dict(window=512)),
    ],
)
def test_presets(policy, fields):
    cfg = certkv.CertConfig(policy=policy)
    assert {k: getattr(cfg, k) for k in fields} == fields


def test_explicit_fields_win_and_bad_names_are_refused():
    assert certkv.CertConfig(policy="kivi", window=16, value_bits=4).window == 16
    assert certkv.CertConfig(policy="kivi", value_bits=4).value_bits == 4
    for bad in ("kivi:3", "key-favoured:K3V2", "progressive:many", "kvquant-ish"):
        with pytest.raises(errors.ConfigError, match="policy"):
            certkv.CertConfig(policy=bad)


@pytest.mark.parametrize("policy", ["paper", "kivi", "key-favoured:K4V2", "progressive:128"])
def test_tier1_bytes_are_counted_exactly(policy):
    cfg = certkv.CertConfig(policy=policy)
    b, h, d, n = 1, 2, 128, 1000
    k, v = make_kv(b=b, hkv=h, n=n, d=d, dtype=torch.bfloat16)
    cache = certkv.TieredKVCache(1, h, d, config=cfg)
    cache.append(0, k, v)
    start, end = cache.quantized_span(0)
    nq = end - start
    assert nq > 0 and nq % cfg.block == 0
    exact = n - nq  # sinks and window in 16-bit
    per_head = (
        nq * d * (cfg.key_bits + cfg.value_bits) // 8  # packed codes
        + 2 * 2 * (nq // cfg.key_group_size) * d  # key scale + zero, per channel per token group
        + 2 * 2 * nq * (d // cfg.value_group_size)  # value scale + zero, per token per channel group
        + 2 * 2 * exact * d  # FP16/BF16 keys and values
        + 2 * 4 * d  # per-channel value range (binary32 min and max)
    )
    rep = cache.memory_report()
    assert rep.tier1_bytes == b * h * per_head
    assert rep.fp16_cache_bytes == b * h * n * d * 2 * 2
