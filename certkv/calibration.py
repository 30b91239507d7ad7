"""Calibration for codebook policies: per-layer codebooks and per-channel outlier thresholds, fitted on
a few sequences of a model's activations, saved as one safetensors file that a ``CertConfig`` names.

Nothing here touches a bound: a codebook only decides which level a value is stored as, and a
threshold only which values are kept exactly; the radii come from the codebook's actual cells
(``certkv.codebook``). Calibration decides how *tight* the certificates are, never whether they hold.

Fitting (reproducible from ``seed``):
* key thresholds: per (KV head, channel) quantiles at f/2 and 1 - f/2 of the keys in the policy's
  basis (pre-RoPE, rotated or as is), f = ``key_outliers``. Value outliers are chosen online per
  vector, as KVQuant does (``certkv.codebook.outlier_mask`` without thresholds), so only their
  effect on the value codebook is fitted here.
* codebooks: weighted Lloyd-Max on the inliers normalised to [0, 1] by their group's min and max, in
  the policy's grouping. ``nuq`` weights a key value by its channel's sensitivity (the mean of
  (T^T q)_j^2: the first-order change of a logit per unit of key error) and a value by the mean
  attention its token receives (the first-order change of the output per unit of value error);
  ``lloyd-max`` weights all values alike.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from certkv import errors, transforms
from certkv.codebook import (
    Codebook,
    gaussian_lloyd_max,
    grouped,
    inlier_range,
    lloyd_max,
    outlier_mask,
    ungrouped,
    uniform,
)
from certkv.config import CertConfig
from certkv.policies import KEY_FIELDS, VALUE_FIELDS

FORMAT = "certkv-calibration"
VERSION = 1
TENSORS = ("key_levels", "value_levels", "key_bounds")


@dataclass
class Calibration:
    """Per layer: key and value codebook levels [L, 2^bits] (absent for uniform codebooks) and key
    outlier thresholds [L, 2, H_kv, D] (lo, hi; absent without key outliers; value outliers are chosen
    per vector at serving time). ``meta`` records what
    produced it (policy fields, seed, data) so a mismatched cache is refused."""

    meta: dict[str, Any]
    key_levels: torch.Tensor | None = None
    value_levels: torch.Tensor | None = None
    key_bounds: torch.Tensor | None = None

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        data = {n: getattr(self, n).contiguous() for n in TENSORS if getattr(self, n) is not None}
        meta = {"format": FORMAT, "version": str(VERSION), "meta": json.dumps(self.meta, sort_keys=True)}
        save_file(data, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT or header.get("version") != str(VERSION):
                    raise errors.ConfigError(f"calibration {path}: not a {FORMAT} v{VERSION} file")
                data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
                meta = json.loads(header["meta"])
        except errors.ConfigError:
            raise
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise errors.ConfigError(f"calibration {path}: cannot be read ({exc})") from None
        return cls(meta, **{k: data.get(k) for k in TENSORS})

    def check(self, cfg: CertConfig, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Refuse a calibration fitted for another layout or model shape."""
        want = _fingerprint(cfg) | {"layers": num_layers, "kv_heads": num_kv_heads, "head_dim": head_dim}
        got = {k: self.meta.get(k) for k in want}
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            raise errors.ConfigError(f"calibration {cfg.calibration} was fitted for another layout: {diff}")

    def books(self, cfg: CertConfig, layer: int) -> tuple[Codebook, Codebook]:
        return (
            _book(cfg.key_codebook, cfg.key_bits, self.key_levels, layer),
            _book(cfg.value_codebook, cfg.value_bits, self.value_levels, layer),
        )

    def bounds(self, role: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Calibrated (lo, hi) outlier thresholds [H_kv, D] of keys; None for values (chosen per vector)."""
        if role != "k" or self.key_bounds is None:
            return None
        return self.key_bounds[layer, 0], self.key_bounds[layer, 1]


def default_books(cfg: CertConfig) -> tuple[Codebook, Codebook]:
    """Codebooks without calibration: evenly spaced, or Lloyd-Max for Gaussian groups."""
    return _book(cfg.key_codebook, cfg.key_bits, None, 0), _book(cfg.value_codebook, cfg.value_bits, None, 0)


def _book(kind: str, bits: int, table: torch.Tensor | None, layer: int) -> Codebook:
    if kind == "uniform":
        return uniform(bits)
    if table is None:
        return gaussian_lloyd_max(bits)
    return Codebook(table[layer].float())


def _fingerprint(cfg: CertConfig) -> dict[str, Any]:
    """The fields a calibration depends on: the key and value layouts and the key basis."""
    return {f: getattr(cfg, f) for f in (*KEY_FIELDS, *VALUE_FIELDS, "rope_theta", "transform_seed")}


def model_rope_theta(config: Any) -> float | None:
    """The RoPE base of a Hugging Face model config (None if it has none)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", None)
    return None if theta is None else float(theta)


def for_model(cfg: CertConfig, model_config: Any, calibrations: tuple[str, ...] = ()) -> CertConfig:
    """``cfg`` adapted to a model: its RoPE base for pre-RoPE keys, and the first calibration file
    fitted for this layout (by the fields it records), if any."""
    theta = model_rope_theta(model_config)
    if cfg.key_transform == "rope" and theta is not None and theta != cfg.rope_theta:
        cfg = dataclasses.replace(cfg, rope_theta=theta)
    for path in calibrations:
        if {k: Calibration.load(path).meta.get(k) for k in _fingerprint(cfg)} == _fingerprint(cfg):
            return dataclasses.replace(cfg, calibration=str(path))
    return cfg


def from_model(
    model: Any, ids: list[int], cfg: CertConfig, sequences: int, length: int, seed: int, source: str = ""
) -> Calibration:
    """Calibrate ``cfg`` on ``sequences`` windows of ``length`` token ids drawn from ``ids`` with ``seed``."""
    from certkv.capture import capture

    if len(ids) < length:
        raise errors.ConfigError(f"calibration text has {len(ids)} tokens, fewer than one window of {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length + 1, (sequences,), generator=gen).tolist()
    dev = next(model.parameters()).device
    batch = torch.tensor([ids[s : s + length] for s in starts], device=dev)
    cap = capture(model, batch)
    cfg = for_model(cfg, model.config)
    q, k, v = ([t.cpu() for t in xs] for xs in (cap.q, cap.k, cap.v))
    return calibrate(q, k, v, cap.scaling, cfg, seed=seed, source=f"{source} starts={starts}")


def _normalised(x: torch.Tensor, inlier: torch.Tensor, axis: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inliers t in [0, 1] by their group's min and max, and a mask of the ones to use, [B, H, T, D]
    (T a whole number of token groups)."""
    xg, ig = grouped(x, axis, g), grouped(inlier, axis, g)
    mn, mx = (m.unsqueeze(-1) for m in inlier_range(xg, ig))
    span = mx - mn
    use = ig & (span > 0)
    tt = torch.where(use, (xg - mn) / torch.where(span > 0, span, 1.0), 0.0)
    return ungrouped(tt, axis), ungrouped(use, axis)


def _thresholds(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """[2, H, D] per (head, channel) quantiles at fraction/2 and 1 - fraction/2 over batch and tokens."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3]).float()
    lo = torch.quantile(flat, fraction / 2, dim=1)
    hi = torch.quantile(flat, 1 - fraction / 2, dim=1)
    return torch.stack([lo, hi])


def calibrate(
    qs: list[torch.Tensor],
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    scalings: list[float],
    cfg: CertConfig,
    seed: int = 0,
    source: str = "",
) -> Calibration:
    """Fit codebooks and thresholds for ``cfg`` from per-layer post-RoPE q [B, H_q, T, D] and k, v
    [B, H_kv, T, D] (``certkv.capture``), with causal attention at ``scalings`` for the value weights."""
    if not (len(qs) == len(ks) == len(vs) == len(scalings)) or not qs:
        raise errors.ShapeError("calibrate needs one q, k, v and scaling per layer")
    _, hkv, t, d = ks[0].shape
    tf = transforms.make(cfg.key_transform, d, cfg.rope_theta, cfg.transform_seed)
    pos = torch.arange(t)
    levels: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    bounds: list[torch.Tensor] = []
    for layer, (q, k, v, scaling) in enumerate(zip(qs, ks, vs, scalings, strict=True)):
        group = q.shape[1] // hkv
        qg = q.double().reshape(q.shape[0], hkv, group, t, d)
        if tf is None:
            x = k.double()
            sens = (qg * qg).mean((0, 2, 3))  # [H_kv, D]
        else:
            x, _ = tf.to_basis(k, pos)
            sens = torch.stack([tf.sensitivity(qg[:, h].transpose(0, 1)) for h in range(hkv)])
        kw = sens[None, :, None, :].expand_as(x) if cfg.key_codebook == "nuq" else torch.ones_like(x)
        logits = torch.matmul(qg, k.double().unsqueeze(2).transpose(-1, -2)) * scaling
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        attn = torch.softmax(logits.masked_fill(~causal, -torch.inf), dim=-1)  # [B, H_kv, G, T, T]
        received = attn.mean((2, 3))  # [B, H_kv, T]: mean attention each token receives
        vx = v.double()
        vw = received.unsqueeze(-1).expand_as(vx) if cfg.value_codebook == "nuq" else torch.ones_like(vx)
        for role, data, weight, kind, bits, axis, size, frac in (
            ("k", x, kw, cfg.key_codebook, cfg.key_bits, cfg.key_group_axis, cfg.key_group_size, cfg.key_outliers),
            ("v", vx, vw, cfg.value_codebook, cfg.value_bits, cfg.value_group_axis, cfg.value_group_size,
             cfg.value_outliers),
        ):  # fmt: skip
            # keys: calibrated thresholds (over every token); values: the serving rule, each group's
            # farthest share from its median
            th = _thresholds(data, frac) if frac > 0 and role == "k" else None
            if th is not None:
                bounds.append(th)
            if axis == "token":  # whole token groups only
                whole = data.shape[2] - data.shape[2] % size
                data, weight = data[:, :, :whole], weight[:, :, :whole]
            inlier = ~outlier_mask(data, axis, size, frac, None if th is None else (th[0], th[1]))
            if kind != "uniform":
                tt, use = _normalised(data, inlier, axis, size)
                levels[role].append(lloyd_max(tt[use], weight[use], bits, seed=seed + 1000 * layer).levels)
    meta = _fingerprint(cfg) | {"layers": len(ks), "kv_heads": hkv, "head_dim": d}
    meta |= {"seed": seed, "source": source, "sequences": int(ks[0].shape[0]), "tokens": int(t)}
    return Calibration(
        meta,
        key_levels=torch.stack(levels["k"]) if levels["k"] else None,
        value_levels=torch.stack(levels["v"]) if levels["v"] else None,
        key_bounds=torch.stack(bounds) if bounds else None,
    )
