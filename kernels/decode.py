"""Split-K decode attention over certkv's Tier-1 layout, and its torch reference, side by side.

Layout (the ``paper`` policy, ``CertConfig()``): keys INT8 with one 16-bit scale and zero point per
(group of ``KEY_GROUP`` tokens, channel); values INT4, two per byte (even channel in the low nibble),
one 16-bit scale and zero point per (token, group of ``VALUE_GROUP`` channels); FP16/BF16 sink and
window tokens. One launch: programs (batch row x KV head, split) walk their share of the quantized
tokens, dequantizing in registers, with the GQA query heads of the KV head together; one extra
split per (row, head) takes the sink and window tokens. (Folding the key scales into the query so
q.k runs on the integer codes, and the value scales into the weights, measured slower on the H100:
docs/benchmarks.md.) Each program leaves an online-softmax
partial (running max m, sum l, weighted sum acc, binary32, log2 units); ``combine`` merges them.

Status: this computes the stage-0 *output* only. It is not yet used to serve certified steps: the
certificate of a step served by this kernel needs its own fused statistics (per-group masses and
radii, p-weighted value radii) and a rounding analysis of the split-K arithmetic (issue 4), so
certkv keeps serving through ``certkv.attention`` until those land. The kernel is measured against
PyTorch SDPA in ``benchmarks/decode_bench.py`` and checked against ``decode_reference`` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from certkv.quant import QuantizedTensor

KEY_GROUP = 128
VALUE_GROUP = 64
LOG2E = 1.4426950408889634


@dataclass
class Tier1:
    """One layer's Tier-1 tensors, contiguous, KV heads unexpanded (B, H = batch, KV heads; n tokens).

    kc uint8 [B, H, n, D]; ks, kz [B, H, n / KEY_GROUP, D]; vc uint8 [B, H, n, D / 2];
    vs, vz [B, H, n, D / VALUE_GROUP]; sink_k/v and win_k/v [B, H, *, D] (16-bit, possibly empty)."""

    kc: torch.Tensor
    ks: torch.Tensor
    kz: torch.Tensor
    vc: torch.Tensor
    vs: torch.Tensor
    vz: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor

    def quantized_keys(self) -> QuantizedTensor:
        return QuantizedTensor(self.kc, self.ks, self.kz, 8, "token", KEY_GROUP, self.kc.shape[-1])

    def quantized_values(self) -> QuantizedTensor:
        return QuantizedTensor(self.vc, self.vs, self.vz, 4, "channel", VALUE_GROUP, self.kc.shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


@triton.jit
def _to_float(x, DT: tl.constexpr):
    """Unsigned integer codes (< 256) to DT exactly, without integer-to-float conversion instructions
    (they run at a fraction of the FMA rate): OR the code into the mantissa of 2^10 (FP16) or 2^23
    (binary32) and subtract that power of two, both exact."""
    if DT == tl.float16:  # noqa: SIM300 (DT is a constexpr argument, not a constant)
        return (x.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return (x.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _dequant_keys(kc_ptr, ks_ptr, kz_ptr, n0, rows, d, D: tl.constexpr, DT: tl.constexpr):
    """Keys of tokens n0 + rows, [BLOCK_N, D] in DT (binary32, or FP16 arithmetic for FP16 operands);
    a block never straddles a key group. Coalesced rows; group scales broadcast in registers."""
    tok = n0 + rows
    c = _to_float(tl.load(kc_ptr + tok[:, None] * D + d[None, :]), DT)
    g = n0 // 128
    return c * tl.load(ks_ptr + g * D + d).to(DT)[None, :] + tl.load(kz_ptr + g * D + d).to(DT)[None, :]


@triton.jit
def _dequant_nibbles(code, vs, vz, BLOCK_N: tl.constexpr, C: tl.constexpr, GROUPS: tl.constexpr):
    """code [BLOCK_N, C] with ``GROUPS`` equal scale groups along C; vs, vz [BLOCK_N, GROUPS]."""
    x = tl.reshape(code, (BLOCK_N, GROUPS, C // GROUPS)) * vs[:, :, None] + vz[:, :, None]
    return tl.reshape(x, (BLOCK_N, C))


@triton.jit
def _value_bytes(vc_ptr, vs_ptr, vz_ptr, n0, rows, D: tl.constexpr, DT: tl.constexpr):
    """Packed value bytes [BLOCK_N, D/2] of tokens n0 + rows and their scales and zero points
    [BLOCK_N, D/64] in DT; coalesced rows."""
    tok = n0 + rows
    half = tl.arange(0, D // 2)
    byte = tl.load(vc_ptr + tok[:, None] * (D // 2) + half[None, :])
    groups = tl.arange(0, D // 64)
    at = tok[:, None] * (D // 64) + groups[None, :]
    return byte, tl.load(vs_ptr + at).to(DT), tl.load(vz_ptr + at).to(DT)


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr):
    """a @ b with binary32 accumulation; operands binary32 ("ieee"), TF32 ("tf32") or rounded to FP16 ("fp16")
    on tensor cores, or binary32 products summed on the CUDA cores ("fma": broadcast and reduce in
    registers, no shared-memory round trip and no padding of the GQA rows to 16)."""
    if PRECISION == "fma":
        return tl.sum(a[:, :, None].to(tl.float32) * b[None, :, :].to(tl.float32), axis=1)
    elif PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, wk_ptr, wv_ptr,
    m_ptr, l_ptr, acc_ptr,
    n_quant, n_sink, n_win, chunk, qk_scale,
    SPLITS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, DEQ16: tl.constexpr, SPLIT_V: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    gi = tl.arange(0, GP)
    d = tl.arange(0, D)
    rows = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + bh * G * D + gi[:, None] * D + d[None, :], mask=gi[:, None] < G, other=0.0).to(tl.float32)
    m = tl.full((GP,), -float("inf"), tl.float32)
    l_sum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    acc_lo = tl.zeros((GP, D // 2), tl.float32)  # SPLIT_V: even and odd channels
    acc_hi = tl.zeros((GP, D // 2), tl.float32)
    DT: tl.constexpr = tl.float16 if DEQ16 else tl.float32
    if split < SPLITS:
        kc = kc_ptr + bh * n_quant * D
        ks = ks_ptr + bh * (n_quant // 128) * D
        kz = kz_ptr + bh * (n_quant // 128) * D
        vc = vc_ptr + bh * n_quant * (D // 2)
        vs = vs_ptr + bh * n_quant * (D // 64)
        vz = vz_ptr + bh * n_quant * (D // 64)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_quant)
        for n0 in range(lo, hi, BLOCK_N):
            k = _dequant_keys(kc, ks, kz, n0, rows, d, D, DT)
            t = _mma(q, tl.trans(k), PRECISION) * qk_scale
            m_new = tl.maximum(m, tl.max(t, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(t - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, 1)
            byte, v_s, v_z = _value_bytes(vc, vs, vz, n0, rows, D, DT)
            if SPLIT_V:
                # channel 2i (low nibble) and 2i + 1 (high) both lie in scale group i // 32: two
                # accumulators, no interleave in registers
                v_lo = _dequant_nibbles(_to_float(byte & 15, DT), v_s, v_z, BLOCK_N, D // 2, D // 64)
                v_hi = _dequant_nibbles(_to_float(byte >> 4, DT), v_s, v_z, BLOCK_N, D // 2, D // 64)
                acc_lo = acc_lo * alpha[:, None] + _mma(p, v_lo, PRECISION)
                acc_hi = acc_hi * alpha[:, None] + _mma(p, v_hi, PRECISION)
            else:
                # even channel in the low nibble: join -> [BLOCK_N, D/2, 2] -> [BLOCK_N, D] is channel order
                code = _to_float(tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, D)), DT)
                v = _dequant_nibbles(code, v_s, v_z, BLOCK_N, D, D // 64)
                acc = acc * alpha[:, None] + _mma(p, v, PRECISION)
            m = m_new
    else:
        for seg in tl.static_range(2):
            if seg == 0:
                kp = sk_ptr + bh * n_sink * D
                vp = sv_ptr + bh * n_sink * D
                count = n_sink
            else:
                kp = wk_ptr + bh * n_win * D
                vp = wv_ptr + bh * n_win * D
                count = n_win
            for n0 in range(0, count, BLOCK_N):
                tok = n0 + rows
                ok = tok < count
                k = tl.load(kp + tok[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                v = tl.load(vp + tok[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                t = _mma(q, tl.trans(k), PRECISION) * qk_scale
                t = tl.where(ok[None, :], t, -float("inf"))
                m_new = tl.maximum(m, tl.max(t, 1))
                # a row that has seen no token yet keeps m = -inf: exp2(-inf - -inf) would be NaN
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_safe)
                p = tl.exp2(t - m_safe[:, None])
                l_sum = l_sum * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _mma(p, v, PRECISION)
                m = m_new
    out = bh * (SPLITS + 1) + split
    tl.store(m_ptr + out * GP + gi, m)
    tl.store(l_ptr + out * GP + gi, l_sum)
    base = acc_ptr + out * GP * D + gi[:, None] * D
    if SPLIT_V and split < SPLITS:
        half = tl.arange(0, D // 2)
        tl.store(base + 2 * half[None, :], acc_lo)
        tl.store(base + 2 * half[None, :] + 1, acc_hi)
    else:
        tl.store(base + d[None, :], acc)


def splits_for(batch_heads: int, n_quant: int, block: int = 64, target_programs: int = 264) -> int:
    """Splits of the quantized tokens per (row, KV head): enough programs to fill the GPU (about
    two per SM of an H100), never a split shorter than one block."""
    if n_quant == 0:
        return 0
    return max(1, min(math.ceil(target_programs / batch_heads), n_quant // block))


def decode_partials(
    q: torch.Tensor,
    t1: Tier1,
    scale: float,
    splits: int | None = None,
    block: int = 64,
    precision: str = "ieee",
    num_warps: int = 4,
    num_stages: int = 3,
    deq16: bool = False,
    split_v: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel: q [B, H, G, D] (16-bit). Returns m, l [B*H, S+1, GP] and acc [B*H, S+1, GP, D].

    ``precision``: "ieee" (binary32 products, the arithmetic certkv's rounding model assumes), "fma"
    (the same arithmetic on CUDA cores, GQA rows unpadded), "tf32" or
    "fp16" (tensor cores; operands rounded to 10-bit mantissas: faster, not yet covered by any
    certificate; "fp16" also overflows beyond 65504, so it suits FP16 models only). ``deq16``:
    dequantize in FP16 arithmetic (FP16 operands only); ``split_v``: accumulate even and odd value
    channels separately instead of interleaving the nibbles in registers."""
    if deq16 and precision != "fp16":
        raise ValueError("deq16 needs precision='fp16'")
    b, h, g, d = q.shape
    n_quant = t1.kc.shape[2]
    if n_quant % KEY_GROUP or d % VALUE_GROUP or block > KEY_GROUP or KEY_GROUP % block:
        raise ValueError("layout: n_quant must be a multiple of 128, D of 64, and the block divide 128")
    s = splits_for(b * h, n_quant, block) if splits is None else splits
    chunk = math.ceil(n_quant / s / KEY_GROUP) * KEY_GROUP if s else 0
    s = math.ceil(n_quant / chunk) if chunk else 0
    gp = triton.next_power_of_2(g) if precision == "fma" else max(16, triton.next_power_of_2(g))  # tl.dot: >= 16
    m = torch.empty(b * h, s + 1, gp, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h, s + 1, gp, d, dtype=torch.float32, device=q.device)
    _decode_kernel[(b * h, s + 1)](
        q.contiguous(), t1.kc, t1.ks, t1.kz, t1.vc, t1.vs, t1.vz, t1.sink_k, t1.sink_v, t1.win_k, t1.win_v,
        m, l_sum, acc,
        n_quant, t1.sink_k.shape[2], t1.win_k.shape[2], chunk, scale * LOG2E,
        SPLITS=s, G=g, GP=gp, D=d, BLOCK_N=block, PRECISION=precision, DEQ16=deq16, SPLIT_V=split_v,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return m, l_sum, acc


def combine(m: torch.Tensor, l_sum: torch.Tensor, acc: torch.Tensor, g: int) -> torch.Tensor:
    """Merge the splits' partials: [B*H, G, D] binary32."""
    top = m.amax(1, keepdim=True)
    w = torch.exp2(torch.where(torch.isinf(m), -torch.inf, m - top))
    num = (w[..., None] * acc).sum(1)
    den = (w * l_sum).sum(1)
    return (num / den[..., None])[:, :g]


def decode(q: torch.Tensor, t1: Tier1, scale: float, splits: int | None = None, **launch: object) -> torch.Tensor:
    """Attention output [B, H, G, D] in q's dtype over the Tier-1 tokens (stage 0, no certificate);
    ``launch`` options as in ``decode_partials``."""
    b, h, g, d = q.shape
    m, l_sum, acc = decode_partials(q, t1, scale, splits, **launch)  # type: ignore[arg-type]
    return combine(m, l_sum, acc, g).reshape(b, h, g, d).to(q.dtype)


def decode_reference(q: torch.Tensor, t1: Tier1, scale: float) -> torch.Tensor:
    """The same attention in float64 from the same Tier-1 tensors (dequantized exactly), [B, H, G, D]."""
    kc, ks, kz = t1.quantized_keys().exact_parts()
    vc, vs, vz = t1.quantized_values().exact_parts()
    k, v = kc * ks + kz, vc * vs + vz
    keys = torch.cat([t1.sink_k.double(), k, t1.win_k.double()], dim=2)
    values = torch.cat([t1.sink_v.double(), v, t1.win_v.double()], dim=2)
    w = torch.softmax(scale * torch.matmul(q.double(), keys.transpose(-1, -2)), dim=-1)
    return torch.matmul(w, values)


def from_cache(cache: object, layer: int) -> Tier1:
    """The Tier-1 tensors of a ``TieredKVCache`` layer in the kernel's layout (its default layout only)."""
    from certkv.cache import TieredKVCache

    assert isinstance(cache, TieredKVCache)
    st = cache._layers[layer]
    cfg = cache.config
    if not cfg.paper_layout:
        raise ValueError("the decode kernel implements the paper layout (CertConfig() defaults) only")
    if st.promoted:
        raise ValueError("promoted tokens are not handled by the decode kernel yet")
    assert st.qk is not None and st.qv is not None and st.sink_k is not None and st.sink_v is not None
    assert st.win_k is not None and st.win_v is not None
    return Tier1(
        st.qk.codes, st.qk.scale, st.qk.zero, st.qv.codes, st.qv.scale, st.qv.zero,
        st.sink_k, st.sink_v, st.win_k, st.win_v,
    )  # fmt: skip
