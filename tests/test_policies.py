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
        (
            "kvquant",
            dict(
                key_bits=4,
                key_codebook="nuq",
                key_transform="rope",
                key_group_axis="token",
                key_outliers=0.01,
                value_codebook="nuq",
                value_outliers=0.01,
                window=0,
                sinks=1,
            ),
        ),
        ("kvquant:2", dict(key_bits=2, value_bits=2)),
        (
            "rotated",
            dict(
                key_bits=4,
                key_codebook="lloyd-max",
                key_transform="hadamard",
                key_group_axis="channel",
                value_codebook="lloyd-max",
                value_outliers=0.0,
                window=128,
                sinks=0,
            ),
        ),
        (
            "keys=kvquant:8,values=kivi",
            dict(
                key_bits=8,
                key_transform="rope",
                key_codebook="nuq",
                value_bits=2,
                value_codebook="uniform",
                value_group_size=32,
                window=128,
                sinks=1,
            ),
        ),
    ],
)
def test_presets(policy, fields):
    cfg = certkv.CertConfig(policy=policy)
    assert {k: getattr(cfg, k) for k in fields} == fields


def test_explicit_fields_win_and_bad_names_are_refused():
    assert certkv.CertConfig(policy="kivi", window=16, value_bits=4).window == 16
    assert certkv.CertConfig(policy="kivi", value_bits=4).value_bits == 4
    bad_names = (
        "kivi:3",
        "key-favoured:K3V2",
        "progressive:many",
        "kvquant-ish",
        "kvquant:3",
        "rotated:x",
        "keys=kivi",
        "keys=kivi,values=paper,values=kivi",
        "keys=kivi,vals=kivi",
        "keys=keys=kivi,values=kivi",
    )
    for bad in bad_names:
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


@pytest.mark.parametrize("policy", ["kvquant", "rotated:2", "keys=kvquant:8,values=kivi"])
def test_codebook_policy_bytes_are_counted_exactly(policy):
    """Codes, scales, zero points, one codebook per tensor, 8 bytes per outlier, 16-bit exact tokens."""
    cfg = certkv.CertConfig(policy=policy)
    b, h, d, n = 1, 2, 128, 1000
    k, v = make_kv(b=b, hkv=h, n=n, d=d, dtype=torch.float16, outlier=8.0)
    cache = certkv.TieredKVCache(1, h, d, config=cfg)
    cache.append(0, k, v)
    start, end = cache.quantized_span(0)
    nq = end - start
    qk, qv = cache.quantized_storage(0)

    def groups(axis: str, size: int) -> int:
        return (nq // size) * d if axis == "token" else nq * (d // size)

    expected = (
        b * h * nq * d * (cfg.key_bits + cfg.value_bits) // 8
        + b
        * h
        * 2
        * 2
        * (groups(cfg.key_group_axis, cfg.key_group_size) + groups(cfg.value_group_axis, cfg.value_group_size))
        + b * h * 2 * 2 * (n - nq) * d  # 16-bit sinks and window
        + b * h * 2 * 4 * d  # value range
    )
    for qt, book in ((qk, cfg.book_keys), (qv, cfg.book_values)):
        if book:
            expected += 4 * (1 << qt.bits) + 8 * int(qt.o_value.numel())
    assert cache.memory_report().tier1_bytes == expected
    outliers = sum(int(qt.o_value.numel()) for qt, book in ((qk, cfg.book_keys), (qv, cfg.book_values)) if book)
    assert (outliers > 0) == (policy != "rotated:2")


def test_codebook_policies_are_refused_where_unsupported():
    with pytest.raises(errors.ConfigError, match="power-of-two"):
        certkv.TieredKVCache(
            1, 2, 96, config=certkv.CertConfig(policy="rotated", key_group_size=32, value_group_size=32)
        )
    cache = certkv.TieredKVCache(1, 1, 64, config=certkv.CertConfig(policy="kvquant"))
    huge = torch.zeros(1, 1, 1, 64, dtype=torch.float16).expand(1, 1, 2**25, 64)  # a view: no memory
    with pytest.raises(errors.ConfigError, match="2\\^31"):
        cache.append(0, huge, huge)
    assert cache.memory_report().tokens == 0  # refused before anything was written
    for bad in (dict(key_codebook="nf4"), dict(key_transform="fft"), dict(value_outliers=0.7), dict(rope_theta=0.5)):
        with pytest.raises(errors.ConfigError):
            certkv.CertConfig(**bad)
