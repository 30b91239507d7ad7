"""Append kernel: quantize and pack whole blocks of new tokens into the paper's Tier-1 layout in one
launch, beside its torch reference (``certkv.quant.quantize``), which it reproduces bit for bit.

Layout (``CertConfig()``): keys INT8 per channel over groups of 128 tokens, values INT4 per token over
groups of 64 channels (two codes per byte, the even channel in the low nibble), 16-bit scales and
zero points. Each program takes one 128-token key group of one (batch row, KV head) and writes its
key and value codes, scales, zero points and the binary32 radii the bounds use (s * RADIUS_FACTOR).

The arithmetic is the reference's, step for step: the zero point is the group minimum (exact); the
scale is (max - min)(1 + 2^-50) / L in float64, converted to 16 bits through binary32 (as torch
converts float64 to a 16-bit type) and raised by one unit where that fell below; codes are
fl32(fl32(x - z) / s) rounded half to even (adding and subtracting 2^23) and clamped to [0, L].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from certkv.quant import RADIUS_FACTOR, QuantizedTensor

from .decode import EXACT_OPS
from .launch import launcher

KEY_GROUP = 128
VALUE_GROUP = 64


@triton.jit
def _scale_up(mx, mn, LEVELS: tl.constexpr, DT: tl.constexpr, UT: tl.constexpr):
    """The smallest-found 16-bit scale with LEVELS * scale >= max - min, as ``quant.round_to(..., up=True)``."""
    need = (mx.to(tl.float64) - mn.to(tl.float64)) * (1.0 + 2.0**-50) / LEVELS
    y = need.to(tl.float32).to(DT)
    low = y.to(tl.float64) < need
    return tl.where(low, (y.to(UT, bitcast=True) + 1).to(DT, bitcast=True), y)


@triton.jit
def _codes(x, z, s, LEVELS: tl.constexpr):
    """round_half_even(fl32(fl32(x - z) / s)) clamped to [0, LEVELS]; 0 where s = 0."""
    s32 = s.to(tl.float32)
    # div_rn: the correctly rounded quotient torch computes (a plain "/" may lower to an approximate one)
    t = tl.where(s32 > 0, tl.math.div_rn(x.to(tl.float32) - z.to(tl.float32), tl.where(s32 > 0, s32, 1.0)), 0.0)
    r = (t + 8388608.0) - 8388608.0  # binary32 addition rounds to nearest, ties to even, for 0 <= t < 2^22
    return tl.minimum(tl.maximum(r, 0.0), LEVELS).to(tl.uint8)


@triton.jit
def _append_kernel(
    k_ptr, v_ptr, kc_ptr, ks_ptr, kz_ptr, kr_ptr, vc_ptr, vs_ptr, vz_ptr, vr_ptr, n,
    D: tl.constexpr, DT: tl.constexpr, UT: tl.constexpr, RADIUS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    g = tl.program_id(1)
    rows = g * 128 + tl.arange(0, 128)
    d = tl.arange(0, D)
    at = bh * n * D + rows[:, None] * D + d[None, :]
    # keys: per channel over the 128 tokens
    k = tl.load(k_ptr + at)
    k_mn = tl.min(k, 0)
    k_s = _scale_up(tl.max(k, 0), k_mn, 255, DT, UT)
    tl.store(kc_ptr + at, _codes(k, k_mn[None, :], k_s[None, :], 255))
    grp = (bh * (n // 128) + g) * D + d
    tl.store(ks_ptr + grp, k_s)
    tl.store(kz_ptr + grp, k_mn)
    tl.store(kr_ptr + grp, k_s.to(tl.float32) * RADIUS)
    # values: per token over groups of 64 channels
    v = tl.reshape(tl.load(v_ptr + at), (128, D // 64, 64))
    v_mn = tl.min(v, 2)
    v_s = _scale_up(tl.max(v, 2), v_mn, 15, DT, UT)
    codes = tl.reshape(_codes(v, v_mn[:, :, None], v_s[:, :, None], 15), (128, D // 2, 2))
    lo, hi = tl.split(codes)
    half = tl.arange(0, D // 2)
    tl.store(vc_ptr + bh * n * (D // 2) + rows[:, None] * (D // 2) + half[None, :], lo | (hi << 4))
    vg = bh * n * (D // 64) + rows[:, None] * (D // 64) + tl.arange(0, D // 64)[None, :]
    tl.store(vs_ptr + vg, v_s)
    tl.store(vz_ptr + vg, v_mn)
    tl.store(vr_ptr + vg, v_s.to(tl.float32) * RADIUS)


def append_block(
    k: torch.Tensor, v: torch.Tensor
) -> tuple[QuantizedTensor, QuantizedTensor, torch.Tensor, torch.Tensor]:
    """Quantize k, v [B, H, n, D] (16-bit, n a multiple of 128, D of 64) in one launch. Returns the
    keys and values as ``QuantizedTensor`` (paper layout) and the binary32 radii per key group
    [B, H, n/128, D] and per value group [B, H, n, D/64]."""
    b, h, n, d = k.shape
    if n % KEY_GROUP or d % VALUE_GROUP or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError("append_block: k and v [B, H, n, D] alike, n a multiple of 128, D of 64")
    if k.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"append_block: 16-bit keys and values, got {k.dtype}")
    dt = tl.float16 if k.dtype == torch.float16 else tl.bfloat16
    kc = torch.empty(b, h, n, d, dtype=torch.uint8, device=k.device)
    ks = torch.empty(b, h, n // KEY_GROUP, d, dtype=k.dtype, device=k.device)
    kz, kr = torch.empty_like(ks), torch.empty_like(ks, dtype=torch.float32)
    vc = torch.empty(b, h, n, d // 2, dtype=torch.uint8, device=k.device)
    vs = torch.empty(b, h, n, d // VALUE_GROUP, dtype=k.dtype, device=k.device)
    vz, vr = torch.empty_like(vs), torch.empty_like(vs, dtype=torch.float32)
    launcher(_append_kernel)[(b * h, n // KEY_GROUP)](
        k.contiguous(), v.contiguous(), kc, ks, kz, kr, vc, vs, vz, vr, n,
        D=d, DT=dt, UT=tl.uint16, RADIUS=RADIUS_FACTOR, **EXACT_OPS,
    )  # fmt: skip
    keys = QuantizedTensor(kc, ks, kz, 8, "token", KEY_GROUP, d)
    values = QuantizedTensor(vc, vs, vz, 4, "channel", VALUE_GROUP, d)
    return keys, values, kr, vr
