"""Bad input gets a specific, typed error that names the problem; nothing is silently certified."""

import pytest
import torch

import certkv
from certkv import errors
from tests.helpers import make_kv, make_q, small_config


@pytest.fixture
def cache():
    c = certkv.TieredKVCache(2, 2, 32, config=small_config())
    k, v = make_kv()
    c.append(0, k, v)
    return c


@pytest.mark.parametrize(
    "field,value",
    [
        ("key_bits", 3),
        ("value_bits", 16),
        ("key_group_axis", "row"),
        ("value_group_size", 0),
        ("window", -1),
        ("tv_tol", float("nan")),
        ("out_tol", -1.0),
        ("max_stage", 4),
        ("fetch_fraction", 0.0),
        ("promote_after", 0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(errors.ConfigError, match=field):
        certkv.CertConfig(**{field: value})


def test_group_size_must_divide_head_dim():
    with pytest.raises(errors.ConfigError, match="value_group_size"):
        certkv.TieredKVCache(1, 2, 40, config=certkv.CertConfig(value_group_size=64))


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(cache, where, bad):
    k, v = make_kv()
    q = make_q()
    target = {"q": q, "k": k, "v": v}[where]
    target[0, 0, 0, 0] = bad
    with pytest.raises(errors.NonFiniteError, match=where):
        if where == "q":
            cache.attend(0, q)
        else:
            cache.append(0, k, v)


def test_wrong_rank_dtype_heads_and_dims(cache):
    k, v = make_kv()
    with pytest.raises(errors.ShapeError, match="rank 4"):
        cache.append(0, k[0], v[0])
    with pytest.raises(errors.DTypeError, match="float32"):
        cache.append(0, k.float(), v.float())
    with pytest.raises(errors.HeadMismatchError, match="3 heads"):
        cache.append(0, torch.zeros(1, 3, 4, 32, dtype=torch.float16), torch.zeros(1, 3, 4, 32, dtype=torch.float16))
    with pytest.raises(errors.ShapeError, match="head_dim 16"):
        cache.append(0, k[..., :16], v[..., :16])
    with pytest.raises(errors.HeadMismatchError, match="not a multiple"):
        cache.attend(0, make_q(hq=3))
    with pytest.raises(errors.ShapeError, match="positions"):
        cache.attend(0, torch.zeros(1, 4, 2, 32, dtype=torch.float16))
    with pytest.raises(errors.DTypeError, match="cannot append"):
        cache.append(0, k.bfloat16(), v.bfloat16())
    with pytest.raises(errors.ShapeError, match="batch"):
        cache.attend(0, make_q(b=2))


def test_empty_layer_and_unknown_layer(cache):
    with pytest.raises(errors.EmptyCacheError, match="layer 1"):
        cache.attend(1, make_q())
    with pytest.raises(errors.LayerIndexError, match="out of range"):
        cache.attend(2, make_q())
    with pytest.raises(errors.LayerIndexError):
        cache.append(-1, *make_kv())


def test_device_mismatch_is_reported(cache):
    q = make_q().to("meta")
    with pytest.raises(errors.DeviceError, match="meta"):
        cache.attend(0, q)


def test_strict_mode_raises_with_figures():
    cfg = small_config(strict=True, max_stage=0, out_tol=0.0, out_rtol=0.0)
    k, v = make_kv(n=200)
    with pytest.raises(errors.CertificationError, match="strict: layer 0") as info:
        certkv.certified_attention(make_q(), k, v, cfg)
    assert info.value.details["output_bound"] > info.value.details["tolerance"]
