"""Quantization policies from the literature as named ``CertConfig`` presets, each certified by the
same machinery (its radii come from its own bit widths and groups; docs/policies.md).

* ``paper``: INT8 keys per channel (token groups of 128), INT4 values per token (channel groups of 64),
  FP16 window of 128 and 4 sinks: certkv's default.
* ``kivi`` / ``kivi:4``: KIVI's asymmetric 2-bit (or 4-bit) layout: keys per channel, values per
  token, groups of 32, an FP16 residual window of 128 recent tokens, no sinks.
* ``key-favoured:K4V2`` (any ``K<bits>V<bits>`` with bits in 2, 4, 8): more bits for keys than values,
  keys per channel and values per token in groups of 32 (the "more for keys" layout), window 128.
* ``progressive:512`` / ``progressive:128``: 2-bit keys and values for older tokens, the last k tokens
  in full precision, 4 FP16 attention sinks.
* ``kvquant`` / ``kvquant:2`` / ``kvquant:8`` (4 bits by default): KVQuant's layout: keys quantized per
  channel *before* RoPE (token groups of 128), values per token (channel groups of 64), non-uniform
  sensitivity-weighted codebooks (``nuq``, fitted by ``certkv calibrate``), 1% dense-and-sparse outliers
  kept exactly in keys and values, the first token in FP16, no recent window beyond a partial block.
* ``rotated`` / ``rotated:2`` / ``rotated:8`` (4 bits): keys rotated by a randomized Hadamard transform,
  then per-token groups of 64 rotated coordinates with a Lloyd-Max codebook (the HIGGS / TurboQuant
  family); values per token with the same codebook kind, unrotated; FP16 window of 128.
* composition: ``keys=<policy>,values=<policy>`` takes every key field from the first policy and every
  value field from the second; window and sinks are the larger of the two (e.g.
  ``keys=kvquant:8,values=kivi``: 8-bit pre-RoPE keys with KIVI's 2-bit values).

Each policy's radii come from its own quantizer: uniform ones from ``certkv.quant``, codebook ones from
``certkv.codebook`` (per-code cell widths) and, for transformed keys, ``certkv.transforms``.
"""

from __future__ import annotations

import re
from typing import Any

from certkv.errors import ConfigError

NAMES = ("paper", "kivi", "key-favoured", "progressive", "kvquant", "rotated")
KEY_FIELDS = ("key_bits", "key_group_axis", "key_group_size", "key_codebook", "key_transform", "key_outliers")
VALUE_FIELDS = ("value_bits", "value_group_axis", "value_group_size", "value_codebook", "value_outliers")


def preset(policy: str) -> dict[str, Any]:
    """The ``CertConfig`` fields a policy name fixes (``name``, ``name:argument`` or a composition)."""
    if "=" in policy:
        return _compose(policy)
    name, _, arg = policy.partition(":")
    if name == "paper" and not arg:
        return {}
    if name == "kivi":
        bits = int(arg) if arg in ("2", "4") else 2 if not arg else None
        if bits is None:
            raise ConfigError(f"policy {policy!r}: KIVI takes 2 or 4 bits (kivi, kivi:4)")
        return dict(
            key_bits=bits, key_group_axis="token", key_group_size=32,
            value_bits=bits, value_group_axis="channel", value_group_size=32, window=128, sinks=0,
        )  # fmt: skip
    if name == "key-favoured":
        m = re.fullmatch(r"K([248])V([248])", arg or "K4V2")
        if m is None:
            raise ConfigError(f"policy {policy!r}: expected key-favoured:K<bits>V<bits> with bits 2, 4 or 8")
        return dict(
            key_bits=int(m[1]), key_group_axis="token", key_group_size=32,
            value_bits=int(m[2]), value_group_axis="channel", value_group_size=32, window=128,
        )  # fmt: skip
    if name == "progressive":
        window = int(arg) if arg.isdigit() else 512 if not arg else -1
        if window < 0:
            raise ConfigError(f"policy {policy!r}: expected progressive:<window tokens>, e.g. progressive:128")
        return dict(
            key_bits=2, key_group_axis="token", key_group_size=32,
            value_bits=2, value_group_axis="channel", value_group_size=32, window=window, sinks=4,
        )  # fmt: skip
    if name in ("kvquant", "rotated"):
        bits = int(arg) if arg in ("2", "4", "8") else 4 if not arg else None
        if bits is None:
            raise ConfigError(f"policy {policy!r}: {name} takes 2, 4 or 8 bits ({name}, {name}:2)")
        if name == "kvquant":
            return dict(
                key_bits=bits, key_group_axis="token", key_group_size=128, key_codebook="nuq",
                key_transform="rope", key_outliers=0.01, value_bits=bits, value_group_axis="channel",
                value_group_size=64, value_codebook="nuq", value_outliers=0.01, window=0, sinks=1,
            )  # fmt: skip
        return dict(
            key_bits=bits, key_group_axis="channel", key_group_size=64, key_codebook="lloyd-max",
            key_transform="hadamard", value_bits=bits, value_group_axis="channel", value_group_size=64,
            value_codebook="lloyd-max", window=128, sinks=0,
        )  # fmt: skip
    raise ConfigError(f"unknown policy {policy!r}; known: {', '.join(NAMES)} (see certkv.policies)")


def _compose(policy: str) -> dict[str, Any]:
    """``keys=<policy>,values=<policy>``: key fields from one, value fields from the other."""
    from certkv.config import CertConfig

    parts = dict(p.partition("=")[::2] for p in policy.split(","))
    if set(parts) != {"keys", "values"} or policy.count(",") != 1:
        raise ConfigError(f"policy {policy!r}: a composition reads keys=<policy>,values=<policy>")
    if any("=" in p for p in parts.values()):
        raise ConfigError(f"policy {policy!r}: compositions do not nest")
    keys, values = (CertConfig(policy=parts[role]) for role in ("keys", "values"))
    out = {f: getattr(keys, f) for f in KEY_FIELDS} | {f: getattr(values, f) for f in VALUE_FIELDS}
    out["window"] = max(keys.window, values.window)
    out["sinks"] = max(keys.sinks, values.sinks)
    return out
