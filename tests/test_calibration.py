"""Calibration: fitted on tinylm's activations, reproducible from its seed, refused where it does not fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import certkv
from certkv import errors
from certkv.calibration import TENSORS, Calibration, for_model, from_model
from certkv.capture import DEFAULT_MODEL, load_model
from certkv.codec import TextCodec
from certkv.transforms import RoPE
from tests.helpers import assert_sound

TEXT = Path(dataclasses.__file__).read_text(encoding="utf-8")  # CPython source: tinylm's training domain


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def ids(model):
    return TextCodec(model, str(DEFAULT_MODEL)).encode(TEXT, bos=False)


def test_rope_basis_recovers_the_models_pre_rope_keys(model, ids):
    """What kvquant quantizes is the model's own pre-RoPE key: undoing RoPE on the cached keys gives
    k_proj's output back (to the model's bf16 rounding of the rotation)."""
    seen = {}
    layer = model.model.layers[1].self_attn
    hook = layer.k_proj.register_forward_hook(lambda m, i, o: seen.setdefault("k", o.detach()))
    cfg = for_model(certkv.CertConfig(policy="kvquant"), model.config)
    try:
        from certkv.capture import capture

        cap = capture(model, torch.tensor([ids[:64]]))
    finally:
        hook.remove()
    d = model.config.head_dim
    pre = seen["k"].reshape(1, 64, -1, d).transpose(1, 2).double()
    x, _ = RoPE(d, cfg.rope_theta).to_basis(cap.k[1], torch.arange(64))
    assert cfg.rope_theta == 500000.0
    assert float((x - pre).abs().max()) <= 0.02 * float(pre.abs().max())
    wrong, _ = RoPE(d, 10000.0).to_basis(cap.k[1], torch.arange(64))
    assert float((wrong - pre).abs().max()) > 0.1 * float(pre.abs().max())


def test_calibration_is_reproducible_and_checked(model, ids, tmp_path):
    cfg = certkv.CertConfig(policy="kvquant")
    paths = []
    for i in range(2):
        cal = from_model(model, ids, cfg, sequences=2, length=128, seed=3, source="test")
        paths.append(tmp_path / f"cal{i}.safetensors")
        cal.save(paths[-1])
    first, second = (Calibration.load(p) for p in paths)  # safetensors may order its header differently
    assert first.meta == second.meta
    assert all(torch.equal(getattr(first, n), getattr(second, n)) for n in TENSORS)
    assert first.bounds("v", 0) is None and first.bounds("k", 0)[0].shape == (2, 128)
    other = from_model(model, ids, cfg, sequences=2, length=128, seed=4, source="test")
    assert not torch.equal(other.key_levels, cal.key_levels)
    loaded = Calibration.load(paths[0])
    assert loaded.key_levels.shape == (6, 16) and loaded.key_bounds.shape == (6, 2, 2, 128)
    assert loaded.meta["seed"] == 3 and loaded.meta["rope_theta"] == 500000.0
    # a cache with the calibration follows it; other layouts or shapes are refused
    fitted = for_model(cfg, model.config, (str(paths[0]),))
    assert fitted.calibration == str(paths[0])
    certkv.TieredKVCache(6, 2, 128, config=fitted)
    with pytest.raises(errors.ConfigError, match="another layout"):
        certkv.TieredKVCache(6, 2, 64, config=fitted)
    with pytest.raises(errors.ConfigError, match="another layout"):
        certkv.TieredKVCache(6, 2, 128, config=dataclasses.replace(fitted, key_bits=2))
    assert for_model(certkv.CertConfig(policy="rotated"), model.config, (str(paths[0]),)).calibration is None
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(paths[0].read_bytes()[:100])
    with pytest.raises(errors.ConfigError, match="cannot be read"):
        Calibration.load(broken)


def test_calibrated_cache_on_model_keys_is_sound_and_tighter(model, ids, tmp_path):
    """Served from tinylm's own keys and values: every claim holds against the exact reference, and
    the calibrated codebook gives a smaller logit radius than the Gaussian default."""
    from certkv.capture import capture

    cfg = for_model(certkv.CertConfig(policy="kvquant", max_stage=0), model.config)
    path = tmp_path / "cal.safetensors"
    from_model(model, ids[:2000], cfg, sequences=2, length=256, seed=0).save(path)
    cap = capture(model, torch.tensor([ids[3000:3400]]))
    radius = {}
    for name, c in (("default", cfg), ("calibrated", dataclasses.replace(cfg, calibration=str(path)))):
        cache = certkv.TieredKVCache(6, 2, 128, config=c)
        cache.append(2, cap.k[2][:, :, :399], cap.v[2][:, :, :399])
        q = cap.q[2][:, :, 399:400]
        res = cache.attend(2, q, scale=cap.scaling[2])
        assert_sound(cache, 2, q, res)
        radius[name] = float(res.certificate.logit_radius.mean())
    assert radius["calibrated"] < radius["default"]


def test_calibrate_and_eval_command_lines(tmp_path):
    import json

    from certkv.cli import main

    cal = tmp_path / "kvq.safetensors"
    assert main(["calibrate", "--policy", "kvquant", "--out", str(cal), "--sequences", "1", "--length", "128"]) == 0
    assert Calibration.load(cal).meta["sequences"] == 1
    assert main(["calibrate", "--policy", "paper", "--out", str(tmp_path / "x")]) == 2  # nothing to fit
    out = tmp_path / "r.json"
    args = ["eval", "--bpb-lengths", "260", "--bpb-score", "8", "--bpb-windows", "1", "--tasks", "bpb",
            "--methods", "dense", "--policy", "kvquant", "--calibration", str(cal), "--quiet",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["spec"]["calibrations"] == [str(cal)]
    assert [r["method"] for r in payload["results"]] == ["dense", "naive@kvquant", "certified@kvquant"]
    certified = payload["results"][2]
    assert sum(certified["stages"]) > 0 and certified["rejected"] == 0
