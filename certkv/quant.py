"""Asymmetric uniform quantization with rigorous per-element error radii.

``QuantizedTensor`` holds codes (INT4/INT2 bit-packed along the last axis), the 16-bit scale and zero
point of every group, and everything a bound needs, so that no bound can be computed from the wrong
scale.

Guarantee (docs/theory.md, "Quantizer radius"; proofs/ lemma 1): for every element x of the input,
with s, z the stored 16-bit scale and zero point of its group and c its code,

    |c * s + z - x| <= s * (1/2 + QUANT_SLACK)           (exact real arithmetic on the stored values)

and ``radius()`` returns a binary32 number >= that. It holds because the scale is rounded *up* so that
z + L*s >= max(group) exactly (L = 2^bits - 1, z = min(group) exactly, as z is stored in the input's own
16-bit format): every x maps to t = (x - z)/s in [0, L], and the binary32 evaluation of t, rounding
to nearest and clamping to [0, L] move the code at most 1/2 + QUANT_SLACK from t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from certkv.rounding import QUANT_SLACK, U32

# s * RADIUS_FACTOR rounded to binary32 is >= s * (1/2 + QUANT_SLACK): the extra 2^-20 absorbs the
# product's own rounding (relative 2^-24).
RADIUS_FACTOR = 0.5 + QUANT_SLACK + 2.0**-20
# |fl32(fl32(c*s) + z) - (c*s + z)| <= DEQUANT_REL * (|c*s| + |z|): two binary32 roundings.
DEQUANT_REL = 2.0001 * U32


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) along the last axis, 8/bits per byte, lowest index in the low bits."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for k in range(per):
        out |= c[..., k] << (bits * k)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 codes, last axis 8/bits times longer."""
    if bits == 8:
        return packed
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * k)) & mask for k in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def round_to(x64: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """The value of ``dtype`` nearest to float64 x64 on one side: the smallest >= x64 (``up``) or the
    largest <= x64."""
    y = x64.to(dtype)
    off = y.double() < x64 if up else y.double() > x64
    if bool(off.any()):
        y = torch.where(off, torch.nextafter(y, torch.full_like(y, math.inf if up else -math.inf)), y)
    return y


def expand_groups(g: torch.Tensor, axis: str, group_size: int) -> torch.Tensor:
    """Broadcast a per-group tensor ([B, H, T/G, D] or [B, H, T, D/G]) to [B, H, T, D]."""
    return g.repeat_interleave(group_size, dim=2 if axis == "token" else 3)


def slice_groups(
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    axis: str,
    group_size: int,
    heads: torch.Tensor | None,
    start: int,
    end: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of tokens [start, end) and the KV heads ``heads`` (all if None); with
    token-axis groups, start and end must fall on group boundaries (the cache quantizes whole blocks)."""
    g = group_size if axis == "token" else 1
    if start % g or end % g:
        raise ValueError(f"token slice [{start}, {end}) does not fall on groups of {g}")
    sel = slice(None) if heads is None else heads
    codes, scale, zero = parts
    return (
        codes[:, sel, start:end].contiguous(),
        scale[:, sel, start // g : end // g].contiguous(),
        zero[:, sel, start // g : end // g].contiguous(),
    )


@dataclass
class QuantizedTensor:
    """Quantized [B, H, T, D] tensor; groups of ``group_size`` along tokens (``axis="token"``: one
    scale per (group of tokens, channel)) or along channels (``axis="channel"``: one scale per
    (token, group of channels)). ``scale``/``zero`` are [B, H, T/G, D] or [B, H, T, D/G]."""

    codes: torch.Tensor  # uint8 [B, H, T, D * bits / 8]
    scale: torch.Tensor  # 16-bit
    zero: torch.Tensor  # 16-bit
    bits: int
    axis: Literal["token", "channel"]
    group_size: int
    head_dim: int

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.codes.shape[2])

    def _expand(self, g: torch.Tensor) -> torch.Tensor:
        return expand_groups(g, self.axis, self.group_size)

    def unpacked_codes(self) -> torch.Tensor:
        return unpack(self.codes, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The binary32 values the runtime computes: fl32(fl32(c * s) + z), [B, H, T, D]."""
        c = self.unpacked_codes().float()
        return c * self._expand(self.scale).float() + self._expand(self.zero).float()

    def radius(self) -> torch.Tensor:
        """binary32 upper bound on |c*s + z - x| per element, [B, H, T, D] (module guarantee)."""
        return self._expand(self.scale.float() * RADIUS_FACTOR)

    def magnitude(self) -> torch.Tensor:
        """float64 upper bound L*s + |z| >= |c*s| + |z| per element, [B, H, T, D]: bounds both the
        exact dequantized value and, times DEQUANT_REL, the binary32 dequantization error."""
        s = self.scale.double()
        return self._expand(self.levels * s + self.zero.double().abs())

    def exact_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero) expanded to [B, H, T, D] as float64, each exact: the exact dequantized
        value is codes * scale + zero in real arithmetic."""
        return self.unpacked_codes().double(), self._expand(self.scale.double()), self._expand(self.zero.double())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def cat(self, other: QuantizedTensor) -> QuantizedTensor:
        """Concatenate along tokens (both must share layout)."""
        return QuantizedTensor(
            torch.cat([self.codes, other.codes], dim=2),
            torch.cat([self.scale, other.scale], dim=2),
            torch.cat([self.zero, other.zero], dim=2),
            self.bits,
            self.axis,
            self.group_size,
            self.head_dim,
        )

    def slice(self, heads: torch.Tensor | None, start: int, end: int) -> QuantizedTensor:
        """Tokens [start, end) of the KV heads ``heads`` (all if None); see ``slice_groups``."""
        parts = slice_groups((self.codes, self.scale, self.zero), self.axis, self.group_size, heads, start, end)
        return QuantizedTensor(*parts, self.bits, self.axis, self.group_size, self.head_dim)


def quantize(x: torch.Tensor, bits: int, axis: Literal["token", "channel"], group_size: int) -> QuantizedTensor:
    """Quantize a finite float16/bfloat16 [B, H, T, D] tensor; T (token axis) or D (channel axis) must
    be a multiple of ``group_size``. Scales and zero points are stored in ``x.dtype``."""
    b, h, t, d = x.shape
    levels = (1 << bits) - 1
    xd = x.double()
    if axis == "token":
        grouped = xd.reshape(b, h, t // group_size, group_size, d)
        mn, mx = grouped.amin(dim=3), grouped.amax(dim=3)
    else:
        grouped = xd.reshape(b, h, t, d // group_size, group_size)
        mn, mx = grouped.amin(dim=4), grouped.amax(dim=4)
    zero = mn.to(x.dtype)  # exact: mn is a value of x
    # L*s >= mx - z must hold exactly; the float64 difference is within 2^-53 relative of it.
    need = (mx - zero.double()) * (1.0 + 2.0**-50) / levels
    scale = round_to(need, x.dtype, up=True)
    qt = QuantizedTensor(torch.empty(0), scale, zero, bits, axis, group_size, d)
    s32, z32 = qt._expand(scale).float(), qt._expand(zero).float()
    t32 = torch.where(s32 > 0, (x.float() - z32) / torch.where(s32 > 0, s32, torch.ones_like(s32)), 0.0)
    codes = torch.round(t32).clamp_(0, levels)
    qt.codes = pack(codes.to(torch.uint8), bits)
    return qt
