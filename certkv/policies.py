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

Not yet here (issue 8): KVQuant's pre-RoPE non-uniform keys with dense-and-sparse outliers, and the
rotated (randomized Hadamard + Lloyd-Max) family; both need new quantizers with their own radii.
"""

from __future__ import annotations

import re
from typing import Any

from certkv.errors import ConfigError

NAMES = ("paper", "kivi", "key-favoured", "progressive")


def preset(policy: str) -> dict[str, Any]:
    """The ``CertConfig`` fields a policy name fixes (``name`` or ``name:argument``)."""
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
    raise ConfigError(f"unknown policy {policy!r}; known: {', '.join(NAMES)} (see certkv.policies)")
