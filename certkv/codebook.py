"""Scalar codebooks (non-uniform quantization) with per-code error radii, and the quantizer using them.

A codebook is a strictly increasing table of levels b_0 < ... < b_{m-1} in [0, 1] (binary32 values). A
group of values x (float64, each within ``x_err`` of the exact original x*) is stored as a 16-bit zero
point z <= min x, a 16-bit scale s >= max x - z and, per element, the code c of the level nearest to
t = (x - z) / s; the exact dequantized value is z + s * b_c. Elements outside the group's outlier
thresholds (dense-and-sparse, as KVQuant) are left out of min and max and kept in a sparse list with
their 16-bit value and their own error radius.

Guarantee (docs/theory.md, "Codebook radius"; proofs/ lemma 7): for every element that is not an
outlier, with w_c the half-width of code c's cell clipped to [0, 1] (cells are split at the midpoints
of neighbouring levels; the first starts at 0, the last ends at 1),

    |z + s * b_c - x*| <= s * (w_c + BOOK_SLACK)               (exact real arithmetic)

because the scale is kept >= 2^20 * (x_err + 2.01 u64 (|x| + |z|)) over the group's inliers: the
float64 evaluation of t (two roundings) moves it by at most 2.01 u64 (|x| + |z|) / s from the exact
(x - z)/s, which lies in [0, 1], and the input error moves t* = (x* - z)/s by at most x_err / s; the
clamp to [0, 1] only brings t closer to (x - z)/s, so |clamp(t) - t*| <= 2^-20 = BOOK_SLACK.
``radius()`` returns binary32 upper bounds of those per-element quantities (outliers: their stored radius).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from certkv import errors
from certkv.quant import DEQUANT_REL, QuantizedTensor, expand_groups, pack, round_to, slice_groups, unpack
from certkv.rounding import U64

BOOK_SLACK = 2.0**-20
SCALE_FLOOR = 1 / BOOK_SLACK  # s >= SCALE_FLOOR * (x_err + 2.01 u64 (|x| + |z|)) keeps |clamp(t) - t*| <= BOOK_SLACK
TINY32 = 2.0**-149  # smallest positive binary32: absorbs subnormal rounding when a bound is stored in binary32


def up32(x64: torch.Tensor) -> torch.Tensor:
    """A binary32 tensor >= the float64 tensor ``x64`` (>= 0) elementwise."""
    return (x64 * (1 + 2.0**-20) + TINY32).float()


@dataclass(frozen=True)
class Codebook:
    """Levels b_0 < ... < b_{m-1} in [0, 1] (binary32, m = 2^bits)."""

    levels: torch.Tensor  # float32 [m]

    def __post_init__(self) -> None:
        lv = self.levels
        if lv.dim() != 1 or lv.dtype != torch.float32 or lv.numel() < 2:
            raise errors.ConfigError(
                f"a codebook is a 1-D float32 table of >= 2 levels, got {tuple(lv.shape)} {lv.dtype}"
            )
        if not bool(torch.isfinite(lv).all()) or float(lv[0]) < 0 or float(lv[-1]) > 1:
            raise errors.ConfigError("codebook levels must be finite and lie in [0, 1]")
        if not bool((lv[1:] > lv[:-1]).all()):
            raise errors.ConfigError("codebook levels must be strictly increasing")

    @property
    def bits(self) -> int:
        return int(self.levels.numel()).bit_length() - 1

    def edges(self) -> torch.Tensor:
        """float64 cell edges [m + 1]: 0, the midpoints (exact: binary32 levels), 1."""
        lv = self.levels.double()
        mid = (lv[1:] + lv[:-1]) / 2
        return torch.cat([lv.new_zeros(1), mid, lv.new_ones(1)])

    def half_widths(self) -> torch.Tensor:
        """w_c = max(b_c - lower edge, upper edge - b_c), float64 [m] (exact: dyadic operands)."""
        e, lv = self.edges(), self.levels.double()
        return torch.maximum(lv - e[:-1], e[1:] - lv)

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        """Code of the cell holding clamp(t, 0, 1) (ties go up), int64."""
        mid = self.edges()[1:-1].to(t.device)
        return torch.searchsorted(mid, t.clamp(0.0, 1.0).contiguous(), right=True)


def uniform(bits: int) -> Codebook:
    """Evenly spaced levels k / (2^bits - 1): the uniform quantizer as a codebook."""
    m = 1 << bits
    return Codebook((torch.arange(m, dtype=torch.float64) / (m - 1)).float())


def lloyd_max(samples: torch.Tensor, weights: torch.Tensor, bits: int, seed: int, iters: int = 60) -> Codebook:
    """Weighted Lloyd-Max (1-D k-means) levels for samples t in [0, 1]: minimises sum w (t - b_c)^2.

    Deterministic given ``seed`` (the subsample of at most 2^17 samples is drawn with it); initial
    levels at the weighted quantiles."""
    t = samples.double().flatten().clamp(0.0, 1.0)
    w = weights.double().flatten().clamp(min=0.0)
    if t.numel() != w.numel() or t.numel() == 0:
        raise errors.ConfigError(f"lloyd_max needs as many weights as samples, got {t.numel()} and {w.numel()}")
    gen = torch.Generator().manual_seed(seed)
    if t.numel() > 1 << 17:
        pick = torch.randperm(t.numel(), generator=gen)[: 1 << 17]
        t, w = t[pick], w[pick]
    if float(w.sum()) <= 0:
        w = torch.ones_like(t)
    m = 1 << bits
    order = torch.argsort(t)
    ts, cw = t[order], torch.cumsum(w[order], 0)
    targets = (torch.arange(m, dtype=torch.float64) + 0.5) / m * cw[-1]
    levels = ts[torch.searchsorted(cw, targets).clamp(max=ts.numel() - 1)]
    for _ in range(iters):
        mid = (levels[1:] + levels[:-1]) / 2
        cell = torch.searchsorted(mid, t, right=True)
        mass = torch.zeros(m, dtype=torch.float64).index_add_(0, cell, w)
        moment = torch.zeros(m, dtype=torch.float64).index_add_(0, cell, w * t)
        levels = torch.where(mass > 0, moment / mass.clamp(min=1e-300), levels)
        levels, _ = torch.sort(levels)
    return Codebook(_strictly_increasing(levels.float()))


def _strictly_increasing(lv: torch.Tensor) -> torch.Tensor:
    """Sorted binary32 levels in [0, 1], nudged up by ulps where rounding made neighbours equal."""
    out = lv.clamp(0.0, 1.0).sort().values.clone()
    for i in range(1, out.numel()):
        if out[i] <= out[i - 1]:
            out[i] = torch.nextafter(out[i - 1], torch.tensor(2.0))
    if float(out[-1]) > 1.0:  # only if the top levels were crowded at 1: spread them downwards
        out = torch.linspace(0, 1, out.numel(), dtype=torch.float64).float()
    return out


@functools.lru_cache(maxsize=8)
def gaussian_lloyd_max(bits: int, group: int = 64) -> Codebook:
    """The default non-uniform codebook: Lloyd-Max for groups of ``group`` Gaussian values normalised
    to [0, 1] by their min and max (what rotated coordinates look like); fixed seed, reproducible."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, group, generator=gen, dtype=torch.float64)
    mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    t = (x - mn) / (mx - mn)
    return lloyd_max(t, torch.ones_like(t), bits, seed=0)


@dataclass
class BookTensor:
    """A [B, H, T, D] tensor quantized with a codebook; groups as ``QuantizedTensor`` (``axis="token"``:
    one scale per (group of tokens, channel); ``"channel"``: per (token, group of channels)).

    Outliers: ``o_flat`` int32 [m], their flat positions in [B, H, T, D]; ``o_value`` their 16-bit values
    and ``o_radius`` 16-bit bounds on |o_value - x*|. Every tensor held counts in ``nbytes``."""

    codes: torch.Tensor  # uint8 packed [B, H, T, D * bits / 8]
    scale: torch.Tensor
    zero: torch.Tensor
    book: Codebook
    axis: Literal["token", "channel"]
    group_size: int
    head_dim: int
    o_flat: torch.Tensor
    o_value: torch.Tensor
    o_radius: torch.Tensor

    @property
    def bits(self) -> int:
        return self.book.bits

    @property
    def num_tokens(self) -> int:
        return int(self.codes.shape[2])

    def _expand(self, g: torch.Tensor) -> torch.Tensor:
        return expand_groups(g, self.axis, self.group_size)

    def _code_index(self) -> torch.Tensor:
        return unpack(self.codes, self.bits).long()

    def _outliers(self) -> tuple[torch.Tensor, ...]:
        """(batch, head, token, channel) index vectors of the outliers."""
        b, h, t, _ = self.codes.shape
        return _unravel(self.o_flat.to(self.codes.device).long(), (b, h, t, self.head_dim))

    def dequantize(self) -> torch.Tensor:
        """binary32 fl32(fl32(b_c * s) + z), outliers replaced by their stored values, [B, H, T, D]."""
        lv = self.book.levels.to(self.codes.device)[self._code_index()]
        out = lv * self._expand(self.scale).float() + self._expand(self.zero).float()
        out[self._outliers()] = self.o_value.float()
        return out

    def radius(self) -> torch.Tensor:
        """binary32 upper bound on |exact dequantized - x*| per element (module guarantee)."""
        w = (self.book.half_widths() + BOOK_SLACK).to(self.codes.device)[self._code_index()]
        r = up32(w * self._expand(self.scale).double())
        r[self._outliers()] = self.o_radius.float()
        return r

    def dequantized_radius(self) -> torch.Tensor:
        """float64 bound on |binary32 dequantized - x*| per element: the radius plus the binary32
        dequantization error (what a key transform carries back to the original basis)."""
        return self.radius().double() + DEQUANT_REL * self.magnitude()

    def magnitude(self) -> torch.Tensor:
        """float64 >= |b_c * s| + |z| (outliers: |value|) per element: bounds the exact and binary32
        dequantized values and, times DEQUANT_REL, the binary32 dequantization error."""
        top = float(self.book.levels[-1])
        mag = self._expand(top * self.scale.double() + self.zero.double().abs()).clone()
        mag[self._outliers()] = self.o_value.double().abs()
        return mag

    def exact_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(level, scale, zero) per element as float64, exact: level * scale + zero is the exact
        dequantized value (outliers: 0, 0, value)."""
        c = self.book.levels.double().to(self.codes.device)[self._code_index()]
        s, z = self._expand(self.scale.double()).clone(), self._expand(self.zero.double()).clone()
        o = self._outliers()
        c[o], s[o], z[o] = 0.0, 0.0, self.o_value.double()
        return c, s, z

    def nbytes(self) -> int:
        """Codes, scales, zero points, the codebook and, per outlier, an int32 position, a 16-bit value
        and a 16-bit radius (8 bytes)."""
        held = (self.codes, self.scale, self.zero, self.book.levels, self.o_flat, self.o_value, self.o_radius)
        return sum(t.numel() * t.element_size() for t in held)

    def slice(self, heads: torch.Tensor | None, start: int, end: int) -> BookTensor:
        """Tokens [start, end) of the heads ``heads`` (all if None), outliers included; with token-axis
        groups, start and end must fall on group boundaries."""
        parts = slice_groups((self.codes, self.scale, self.zero), self.axis, self.group_size, heads, start, end)
        b, h, d = self.codes.shape[0], self.codes.shape[1], self.head_dim
        sel = torch.arange(h, device=self.codes.device) if heads is None else heads.to(self.codes.device)
        ob, oh, ot, od = self._outliers()
        new_h = torch.full((h,), -1, dtype=torch.long, device=self.codes.device)
        new_h[sel] = torch.arange(len(sel), device=self.codes.device)
        keep = (new_h[oh] >= 0) & (ot >= start) & (ot < end)
        flat = _ravel((ob[keep], new_h[oh[keep]], ot[keep] - start, od[keep]), (b, len(sel), end - start, d))
        return BookTensor(
            *parts, self.book, self.axis, self.group_size, d, flat.to(torch.int32), self.o_value[keep],
            self.o_radius[keep],
        )  # fmt: skip

    def cat(self, other: BookTensor) -> BookTensor:
        """Concatenate along tokens (same layout and codebook)."""
        b, h, t1, _ = self.codes.shape
        shape = (b, h, t1 + other.num_tokens, self.head_dim)
        mine, theirs = self._outliers(), other._outliers()
        flat = torch.cat([_ravel(mine, shape), _ravel((*theirs[:2], theirs[2] + t1, theirs[3]), shape)])
        return BookTensor(
            torch.cat([self.codes, other.codes], dim=2),
            torch.cat([self.scale, other.scale], dim=2),
            torch.cat([self.zero, other.zero], dim=2),
            self.book,
            self.axis,
            self.group_size,
            self.head_dim,
            flat.to(torch.int32),
            torch.cat([self.o_value, other.o_value]),
            torch.cat([self.o_radius, other.o_radius]),
        )


def join(a: QuantizedTensor | BookTensor, b: QuantizedTensor | BookTensor) -> QuantizedTensor | BookTensor:
    """Quantized blocks of one layer concatenated along tokens (a layer keeps one quantizer)."""
    if isinstance(a, BookTensor) and isinstance(b, BookTensor):
        return a.cat(b)
    if isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor):
        return a.cat(b)
    raise ValueError(f"cannot join {type(a).__name__} and {type(b).__name__}: a layer keeps one quantizer")


def grouped(x: torch.Tensor, axis: str, g: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, T/g, D, g] (token groups) or [B, H, T, D/g, g] (channel groups)."""
    b, h, t, d = x.shape
    if axis == "token":
        return x.reshape(b, h, t // g, g, d).transpose(3, 4)
    return x.reshape(b, h, t, d // g, g)


def ungrouped(xg: torch.Tensor, axis: str) -> torch.Tensor:
    """Inverse of ``grouped``."""
    b, h, a, c, g = xg.shape
    if axis == "token":
        return xg.transpose(3, 4).reshape(b, h, a * g, c)
    return xg.reshape(b, h, a, c * g)


def inlier_range(xg: torch.Tensor, inlier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of the inliers of each group (last axis of ``grouped`` tensors); 0, 0 for a group
    without inliers."""
    big = torch.finfo(xg.dtype).max
    mn = torch.where(inlier, xg, big).amin(-1)
    mx = torch.where(inlier, xg, -big).amax(-1)
    empty = ~inlier.any(-1)
    return torch.where(empty, 0.0, mn), torch.where(empty, 0.0, mx)


def outlier_mask(
    x: torch.Tensor, axis: str, group_size: int, fraction: float, bounds: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Elements kept exactly: outside calibrated per-channel ``bounds`` (lo, hi [H, D]) when given,
    otherwise the round(fraction * group_size) (at least one) farthest from their group's median."""
    if fraction <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if bounds is not None:
        lo, hi = (b.to(x.device, torch.float64)[None, :, None, :] for b in bounds)
        return (x < lo) | (x > hi)
    count = min(max(1, round(fraction * group_size)), group_size - 1)  # a group keeps one inlier
    if count == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    xg = grouped(x, axis, group_size)
    dist = (xg - xg.median(-1, keepdim=True).values).abs()
    top = dist.topk(count, dim=-1).indices
    mask = torch.zeros_like(xg, dtype=torch.bool).scatter_(-1, top, True)
    return ungrouped(mask, axis)


def quantize_book(
    x: torch.Tensor,
    x_err: torch.Tensor,
    book: Codebook,
    axis: Literal["token", "channel"],
    group_size: int,
    dtype: torch.dtype,
    outliers: torch.Tensor,
) -> BookTensor:
    """Quantize float64 x [B, H, T, D] (each within ``x_err`` of the exact original); scales, zero
    points and outlier values are stored in ``dtype``; ``outliers`` marks the elements kept exactly."""
    b, h, t, d = x.shape
    xg, eg, og = (grouped(a, axis, group_size) for a in (x, x_err, outliers))
    inl = ~og
    mn, mx = inlier_range(xg, inl)
    zero = round_to(mn, dtype, up=False)
    z64 = zero.double()
    need = (mx - z64) * (1.0 + 2.0**-50)
    ax = torch.where(inl, xg.abs(), 0.0).amax(-1)
    floor = SCALE_FLOOR * (torch.where(inl, eg, 0.0).amax(-1) + 2.01 * U64 * (ax + z64.abs())) * (1 + 2.0**-40)
    scale = round_to(torch.maximum(need, floor), dtype, up=True)
    if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(zero).all())):
        raise errors.NonFiniteError(f"values exceed the range of {dtype} in the quantization basis")
    s64 = scale.double().unsqueeze(-1)
    tt = torch.where(s64 > 0, (xg - z64.unsqueeze(-1)) / torch.where(s64 > 0, s64, 1.0), 0.0)
    codes = ungrouped(book.encode(tt), axis)
    if b * h * t * d >= 2**31:
        raise errors.ConfigError(f"a block of {b}x{h}x{t}x{d} values is too large for int32 outlier positions")
    flat = outliers.flatten().nonzero().flatten().to(torch.int32)
    ox = x[outliers]
    value = ox.to(dtype)
    if not bool(torch.isfinite(value).all()):
        raise errors.NonFiniteError(f"an outlier exceeds the range of {dtype}")
    # |value - x| is exact in float64 (the error of rounding x to a shorter format)
    radius = round_to(((value.double() - ox).abs() + x_err[outliers]) * (1.0 + 2.0**-50), dtype, up=True)
    return BookTensor(
        pack(codes.to(torch.uint8), book.bits),
        scale,
        zero,
        book,
        axis,
        group_size,
        d,
        flat,
        value,
        radius,
    )


def _unravel(flat: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat = flat // size
    return tuple(reversed(out))


def _ravel(index: tuple[torch.Tensor, ...], shape: tuple[int, int, int, int]) -> torch.Tensor:
    flat = torch.zeros_like(index[0])
    for i, size in zip(index, shape, strict=True):
        flat = flat * size + i
    if flat.numel() and int(flat.max()) >= 2**31:
        raise errors.ConfigError("too many values for int32 outlier positions")
    return flat
