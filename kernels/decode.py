"""Split-K decode attention over certkv's Tier-1 layout, and its torch reference, side by side.

Layout (the ``paper`` policy, ``CertConfig()``): keys INT8 with one 16-bit scale and zero point per
(group of ``KEY_GROUP`` tokens, channel); values INT4, two per byte (even channel in the low nibble),
one 16-bit scale and zero point per (token, group of ``VALUE_GROUP`` channels); FP16/BF16 sink and
window tokens. One launch: programs (batch row x KV head, split) walk their share of the quantized
tokens, dequantizing in registers, with the GQA query heads of the KV head together; one extra
split per (row, head) takes the sink and window tokens. The code tiles come by pointer or through
the tensor memory accelerator (``code_descriptors``; the same bytes, so the same results). (Folding
the key scales into the query so q.k runs on the integer codes, and the value scales into the
weights, measured slower on the H100 before the bit-trick conversion and 4-10% faster after it, but
outside the rounding model: docs/benchmarks.md.) Each program leaves an online-softmax partial
(running max m, sum l, weighted sum acc, binary32, log2 units); ``combine`` merges them.

With ``cert=True`` the same pass also stores, per block of tokens, the binary32 sum of its weights
and the frame they were computed in, and counts each split's rescales: all ``certkv.streaming``
needs besides the scales it reads itself to certify the step (docs/theory.md section 8). The cache
serves stage 0 through it on CUDA (``CertConfig.decode_kernel``). ``decode_reference`` and
``partials_reference`` are the float64 torch references the tests hold the kernel to; the kernel is
measured against PyTorch SDPA in ``benchmarks/decode_bench.py`` and ``benchmarks/certified_decode.py``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from certkv.quant import QuantizedTensor

from .launch import launcher

KEY_GROUP = 128
VALUE_GROUP = 64
LOG2E = 1.4426950408889634
# Every certkv launch compiles without floating-point contraction: the certificate's rounding model
# (docs/theory.md section 8) follows each operation as written, as Triton's interpreter runs them. With
# contraction the compiler fused the logit scaling into the exp2 argument (sm_90 PTX:
# exp2(fma(dot, c, -m)), while the running maximum read the rounded logit fl(dot * c)), so one logit
# had two values, which the model does not allow for.
EXACT_OPS = {"enable_fp_fusion": False}


@dataclass
class Tier1:
    """One layer's Tier-1 tensors, contiguous, KV heads unexpanded (B, H = batch, KV heads; n tokens).

    kc uint8 [B, H, n, D]; ks, kz [B, H, n / KEY_GROUP, D]; vc uint8 [B, H, n, D / 2];
    vs, vz [B, H, n, D / VALUE_GROUP]; sink_k/v and win_k/v [B, H, *, D] (16-bit, possibly empty).
    Promoted tokens (the cache's adaptive precision): prom_k/v [B, H, P, D] exact copies of quantized
    tokens, prom_idx [B, H, P] their index among the quantized tokens (-1: free slot) and prom_mask
    uint8 [B, H, n] (1: promoted, so the quantized copy is skipped)."""

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
    prom_k: torch.Tensor | None = None
    prom_v: torch.Tensor | None = None
    prom_idx: torch.Tensor | None = None
    prom_mask: torch.Tensor | None = None

    @staticmethod
    def of_originals(k: torch.Tensor, v: torch.Tensor) -> Tier1:
        """No quantized token: the originals k, v [B, H, n, D] (16-bit) served exactly, as window tokens
        (empty scales and zero points in their dtype, as the cache stores them)."""
        b, h, _, d = k.shape

        def empty(width: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(b, h, 0, width, dtype=dtype, device=k.device)

        codes = (empty(d, torch.uint8), empty(d, k.dtype), empty(d, k.dtype), empty(d // 2, torch.uint8))
        scales = (empty(d // VALUE_GROUP, k.dtype), empty(d // VALUE_GROUP, k.dtype))
        return Tier1(*codes, *scales, k[:, :, :0], v[:, :, :0], k.contiguous(), v.contiguous())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tier1:
        """The same tensors through ``fn`` (e.g. ``.cpu()``, a head slice)."""
        return Tier1(**{name: None if x is None else fn(x) for name, x in vars(self).items()})

    @property
    def n_promoted(self) -> int:
        return 0 if self.prom_k is None else int(self.prom_k.shape[2])

    def exact_segments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) of the exact tokens in the kernel's order after the quantized ones: sink,
        window, promoted slots (free slots are zero rows); each possibly empty."""
        segments = [(self.sink_k, self.sink_v), (self.win_k, self.win_v)]
        if self.prom_k is not None and self.prom_v is not None:
            segments.append((self.prom_k, self.prom_v))
        return segments

    def quantized_keys(self, rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
        """The quantized keys; ``rows`` (batch, KV head index vectors): only those pairs, as a batch of
        one KV head each."""
        kc, ks, kz = (x if rows is None else x[rows][:, None] for x in (self.kc, self.ks, self.kz))
        return QuantizedTensor(kc, ks, kz, 8, "token", KEY_GROUP, self.kc.shape[-1])

    def served(self) -> torch.Tensor:
        """Which tokens a step serves, bool [B, H, N] in the kernel's order (quantized, then
        ``exact_segments``): not the quantized copies of promoted tokens, not free promotion slots."""
        n = self.kc.shape[2] + sum(sk.shape[2] for sk, _ in self.exact_segments())
        served = torch.ones(*self.kc.shape[:2], n, dtype=torch.bool, device=self.kc.device)
        if self.prom_idx is not None and self.prom_mask is not None:
            served[:, :, : self.kc.shape[2]] = self.prom_mask == 0
            served[:, :, n - self.n_promoted :] = self.prom_idx >= 0
        return served

    def quantized_values(self) -> QuantizedTensor:
        return QuantizedTensor(self.vc, self.vs, self.vz, 4, "channel", VALUE_GROUP, self.kc.shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if t is not None)


def _prmt(dt: str) -> tuple[tl.constexpr, tl.constexpr]:
    """PTX (and its register constraints) for ``_to_float`` on four code bytes at once (Triton packs four
    uint8 elements into one 32-bit register): each byte becomes the low byte of 2^23 + code (binary32:
    one ``prmt`` per code, taking the byte and then bytes 0, 0, 0x4B of 0x4B000000) or of 2^10 + code
    (FP16: one ``prmt`` per two codes, each byte beside a 0x64 of 0x64646464). The output registers hold
    the elements in order, FP16 two per register, low half first."""
    fill, sel = ("0x4B000000", [0x7540 + i for i in range(4)]) if dt == "f32" else ("0x64646464", [0x4140, 0x4342])
    x = f"${len(sel)}"  # the input register follows the outputs
    code = " ".join(f"prmt.b32 ${i}, {x}, {fill}, {c:#06x};" for i, c in enumerate(sel))
    return tl.constexpr(code), tl.constexpr(",".join(["=r"] * len(sel) + ["r"]))


BYTES_F32, BYTES_F32_C = _prmt("f32")
BYTES_F16, BYTES_F16_C = _prmt("f16")


@triton.jit
def _to_float(x, DT: tl.constexpr, PTX: tl.constexpr):
    """Unsigned integer codes (< 256) to DT exactly, without integer-to-float conversion instructions
    (they run at a fraction of the FMA rate): the code in the mantissa of 2^10 (FP16) or 2^23 (binary32),
    that power of two subtracted, both exact. PTX: four codes per ``prmt`` sequence (``_prmt``; the
    same bits as OR-ing each code in, with fewer integer instructions; used for the key codes, which
    arrive four to a register; Triton's interpreter has no inline assembly, so it runs the other
    branch)."""
    if PTX:
        if DT == tl.float16:  # noqa: SIM300
            biased = tl.inline_asm_elementwise(BYTES_F16, BYTES_F16_C, [x], dtype=tl.float16, is_pure=True, pack=4)
        else:
            biased = tl.inline_asm_elementwise(BYTES_F32, BYTES_F32_C, [x], dtype=tl.float32, is_pure=True, pack=4)
    elif DT == tl.float16:  # noqa: SIM300
        biased = (x.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        biased = (x.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True)
    if DT == tl.float16:  # noqa: SIM300
        return biased - 1024.0
    else:
        return biased - 8388608.0


@triton.jit
def _code_rows(src, first, n0, rows, c0, W: tl.constexpr, WC: tl.constexpr, TMA: tl.constexpr):
    """Codes [BLOCK_N, WC] (uint8) of tokens n0 + rows, bytes c0 ... c0 + WC of their W. TMA: ``src`` is a
    tensor descriptor over every (row, head)'s codes as one [B * H * n, W] matrix with [BLOCK_N, WC]
    tiles and ``first`` = this (row, head)'s first row (the tile arrives in shared memory by the copy
    engine, with no per-thread addresses); otherwise ``src`` points at this (row, head)'s codes."""
    if TMA:
        return src.load([first + n0, c0])
    else:
        return tl.load(src + (n0 + rows)[:, None] * W + c0 + tl.arange(0, WC)[None, :])


@triton.jit
def _key_chunk(src, ks_ptr, kz_ptr, first, n0, rows, ok, c: tl.constexpr, D: tl.constexpr, KCH: tl.constexpr,
               DT: tl.constexpr, QUANTIZED: tl.constexpr, TMA: tl.constexpr, PTX: tl.constexpr):  # fmt: skip
    """Keys [BLOCK_N, D / KCH] (channels of chunk ``c``) of tokens n0 + rows. QUANTIZED: dequantized in
    DT from their codes (``_code_rows``; a block never straddles a key group, so the group's scales
    broadcast; c·s is exact in binary32 (8 x at most 11 bits), so the FMA rounds as c·s + z does); otherwise
    the exact 16-bit keys at ``src`` ([count, D], rows masked by ``ok``) in binary32."""
    W: tl.constexpr = D // KCH
    dc = c * W + tl.arange(0, W)
    if QUANTIZED:
        codes = _to_float(_code_rows(src, first, n0, rows, c * W, D, W, TMA), DT, PTX)
        g = n0 // 128
        return tl.fma(codes, tl.load(ks_ptr + g * D + dc).to(DT)[None, :], tl.load(kz_ptr + g * D + dc).to(DT)[None, :])
    else:
        return tl.load(src + (n0 + rows)[:, None] * D + dc[None, :], mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _value_bytes(src, vs_ptr, vz_ptr, first, n0, rows, ok, b0: tl.constexpr, NB: tl.constexpr, D: tl.constexpr,
                 DT: tl.constexpr, QUANTIZED: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """Values of channels 2·b0 ... 2·(b0 + NB) of tokens n0 + rows as their even and odd channels, two
    [BLOCK_N, NB]. QUANTIZED: from the packed code bytes b0 ... b0 + NB (even channel in the low nibble,
    so the split costs no data movement in registers); the bytes lie in NB / 32 scale groups of 64
    channels (at least one: with D = 64 a quarter of the bytes is half a group). Otherwise the exact
    16-bit values at ``src`` ([count, D], rows masked by ``ok``) in binary32."""
    BLOCK_N: tl.constexpr = rows.shape[0]
    if QUANTIZED:
        GN: tl.constexpr = max(NB // 32, 1)
        byte = _code_rows(src, first, n0, rows, b0, D // 2, NB, TMA)
        at = (n0 + rows)[:, None] * (D // 64) + (b0 // 32 + tl.arange(0, GN))[None, :]
        v_s, v_z = tl.load(vs_ptr + at).to(DT), tl.load(vz_ptr + at).to(DT)
        # Triton's own integer operations for the nibbles: the value bytes reach the MMA operand layout one
        # shared-memory load each, and packing them four to a register for ``prmt`` cost more than it saved
        # (H100: the kernel 0.5-3.9% slower, docs/benchmarks.md)
        even = _dequant_nibbles(_to_float(byte & 15, DT, False), v_s, v_z, BLOCK_N, NB, GN)
        odd = _dequant_nibbles(_to_float(byte >> 4, DT, False), v_s, v_z, BLOCK_N, NB, GN)
        return even, odd
    else:
        at = src + (n0 + rows)[:, None] * D + 2 * b0 + tl.arange(0, 2 * NB)[None, :]
        v = tl.load(at, mask=ok[:, None], other=0.0).to(tl.float32)
        return tl.split(tl.reshape(v, (BLOCK_N, NB, 2)))


@triton.jit
def _dequant_nibbles(code, vs, vz, BLOCK_N: tl.constexpr, C: tl.constexpr, GROUPS: tl.constexpr):
    """code [BLOCK_N, C] with ``GROUPS`` equal scale groups along C; vs, vz [BLOCK_N, GROUPS]."""
    x = tl.fma(tl.reshape(code, (BLOCK_N, GROUPS, C // GROUPS)), vs[:, :, None], vz[:, :, None])
    return tl.reshape(x, (BLOCK_N, C))


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, acc=None):
    """acc + a @ b with binary32 accumulation (acc None: 0); operands binary32 ("ieee"), TF32 ("tf32") or
    rounded to FP16 ("fp16") on tensor cores, or binary32 products summed on the CUDA cores ("fma":
    broadcast and reduce in registers, no shared-memory round trip and no padding of the GQA rows to 16).
    On tensor cores a chained accumulator continues the same sequence of MMAs as one longer product."""
    if PRECISION == "fma":
        out = tl.sum(a[:, :, None].to(tl.float32) * b[None, :, :].to(tl.float32), axis=1)
        return out if acc is None else acc + out
    elif PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc, out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _q_chunk(q_ptr, bh, gi, c: tl.constexpr, G: tl.constexpr, D: tl.constexpr, KCH: tl.constexpr):
    """Query rows [GP, D / KCH] (channels of chunk ``c``), binary32; padding rows 0."""
    dc = c * (D // KCH) + tl.arange(0, D // KCH)
    return tl.load(q_ptr + bh * G * D + gi[:, None] * D + dc[None, :], mask=gi[:, None] < G, other=0.0).to(tl.float32)


@triton.jit
def _block(q0, q1, m, l_sum, a0, a1, a2, a3, resc, k_src, ks, kz, v_src, vs, vz, first, n0, rows, ok, skip,
           bmass_ptr, bframe_ptr, at, real, qk_scale,
           D: tl.constexpr, KCH: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr, HALVES: tl.constexpr,
           QUANTIZED: tl.constexpr, MASKED: tl.constexpr, CERT: tl.constexpr, TMA: tl.constexpr,
           PTX: tl.constexpr):  # fmt: skip
    """One block of tokens into the online softmax: logits over KCH chunks of channels on one chained
    accumulator (only a [BLOCK_N, D / KCH] key tile live at a time), the running maximum, sum and the
    value accumulators: HALVES (the tensor-core launches) four, the even and odd channels of each half of
    the channels; otherwise ("fma") one in channel order (four ran 1.8x slower there). MASKED: tokens where
    ``skip`` is set (promoted, padding, free slots) get no weight. CERT: the block's weight sum and frame
    go to ``at`` (the rows where ``real``) and the rescale is counted (docs/theory.md section 8)."""
    k0 = _key_chunk(k_src, ks, kz, first, n0, rows, ok, 0, D, KCH, DT, QUANTIZED, TMA, PTX)
    t = _mma(q0, tl.trans(k0), PRECISION)
    if KCH == 2:
        k1 = _key_chunk(k_src, ks, kz, first, n0, rows, ok, 1, D, KCH, DT, QUANTIZED, TMA, PTX)
        t = _mma(q1, tl.trans(k1), PRECISION, t)
    t = t * qk_scale
    if MASKED:
        t = tl.where(skip[None, :], -float("inf"), t)
        m_new = tl.maximum(m, tl.max(t, 1))
        # a row that has seen no token yet keeps m = -inf: exp2(-inf - -inf) would be NaN
        m_frame = tl.where(m_new == -float("inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m, tl.max(t, 1))
        m_frame = m_new
    # alpha is exactly 1 unless the maximum moved: the certificate counts the rescales
    alpha = tl.where(m_new > m, tl.exp2(m - m_frame), 1.0)
    p = tl.exp2(t - m_frame[:, None])
    block_sum = tl.sum(p, 1)
    l_sum = l_sum * alpha + block_sum
    # each block's products summed from zero, then added to the rescaled sums: the rounding model's
    # count (docs/theory.md section 8: per later block one multiply and one add)
    if HALVES:
        even, odd = _value_bytes(v_src, vs, vz, first, n0, rows, ok, 0, D // 4, D, DT, QUANTIZED, TMA)
        a0 = a0 * alpha[:, None] + _mma(p, even, PRECISION)
        a1 = a1 * alpha[:, None] + _mma(p, odd, PRECISION)
        even, odd = _value_bytes(v_src, vs, vz, first, n0, rows, ok, D // 4, D // 4, D, DT, QUANTIZED, TMA)
        a2 = a2 * alpha[:, None] + _mma(p, even, PRECISION)
        a3 = a3 * alpha[:, None] + _mma(p, odd, PRECISION)
    else:  # one accumulator [GP, D]; a1-a3 pass through unchanged
        even, odd = _value_bytes(v_src, vs, vz, first, n0, rows, ok, 0, D // 2, D, DT, QUANTIZED, TMA)
        values = tl.reshape(tl.join(even, odd), (rows.shape[0], D))  # [BLOCK_N, D/2, 2]: channel order
        a0 = a0 * alpha[:, None] + _mma(p, values, PRECISION)
    if CERT:
        tl.store(bmass_ptr + at, block_sum, mask=real)
        tl.store(bframe_ptr + at, m_frame, mask=real)
        resc += ((m_new > m) & (m > -float("inf"))).to(tl.int32)
    return m_new, l_sum, a0, a1, a2, a3, resc


# The exact-token counts, the block count and the split count change with the context and the batch:
# not specialised (Triton compiles a variant per integer value that is 1 or divisible by 16, and a
# constexpr split count compiled one per value).
@triton.jit(do_not_specialize=["n_sink", "n_win", "n_prom", "n_blocks", "n_splits"])
def _decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sk_ptr, sv_ptr, wk_ptr, wv_ptr,
    pk_ptr, pv_ptr, pidx_ptr, pmask_ptr,
    m_ptr, l_ptr, acc_ptr,
    bmass_ptr, bframe_ptr, resc_ptr,
    n_quant, n_sink, n_win, n_prom, chunk, qk_scale, n_blocks, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, DEQ16: tl.constexpr, KCH: tl.constexpr, HALVES: tl.constexpr, CERT: tl.constexpr,
    PROMOTED: tl.constexpr, TMA: tl.constexpr, PTX: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    gi = tl.arange(0, GP)
    real = gi < G  # the GQA rows; the padding rows' results are not stored (no reader)
    rows = tl.arange(0, BLOCK_N)
    # the query's channel chunks, loaded once (KCH = 1: q1 unused)
    q0 = _q_chunk(q_ptr, bh, gi, 0, G, D, KCH)
    q1 = _q_chunk(q_ptr, bh, gi, KCH - 1, G, D, KCH)
    m = tl.full((GP,), -float("inf"), tl.float32)
    l_sum = tl.zeros((GP,), tl.float32)
    # value accumulators: even and odd channels of the first half, then of the second (not HALVES: a0 is
    # all D channels in order)
    a0 = tl.zeros((GP, D // 4 if HALVES else D), tl.float32)
    a1 = tl.zeros((GP, D // 4), tl.float32)
    a2 = tl.zeros((GP, D // 4), tl.float32)
    a3 = tl.zeros((GP, D // 4), tl.float32)
    # CERT (docs/theory.md section 8): each block's weight sum and frame are stored; the running sums'
    # rescales are counted
    resc = tl.zeros((GP,), tl.int32)
    DT: tl.constexpr = tl.float16 if DEQ16 else tl.float32
    every = rows >= 0
    if split < n_splits:
        if TMA:  # descriptors over all (row, head)s: this one's tokens start at row bh * n_quant
            kc = kc_ptr
            vc = vc_ptr
        else:
            kc = kc_ptr + bh * n_quant * D
            vc = vc_ptr + bh * n_quant * (D // 2)
        ks = ks_ptr + bh * (n_quant // 128) * D
        kz = kz_ptr + bh * (n_quant // 128) * D
        vs = vs_ptr + bh * n_quant * (D // 64)
        vz = vz_ptr + bh * n_quant * (D // 64)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_quant)
        for n0 in range(lo, hi, BLOCK_N):
            # promoted tokens are served from their exact copies in the last split
            skip = tl.load(pmask_ptr + bh * n_quant + n0 + rows) != 0 if PROMOTED else rows < 0
            at = (bh * n_blocks + n0 // BLOCK_N) * GP + gi
            m, l_sum, a0, a1, a2, a3, resc = _block(
                q0, q1, m, l_sum, a0, a1, a2, a3, resc, kc, ks, kz, vc, vs, vz, bh * n_quant, n0, rows, every,
                skip, bmass_ptr, bframe_ptr, at, real, qk_scale,
                D, KCH, DT, PRECISION, HALVES, True, PROMOTED, CERT, TMA, PTX,
            )  # fmt: skip
    else:
        first = n_quant // BLOCK_N
        for seg in tl.static_range(3 if PROMOTED else 2):
            if seg == 0:
                kp = sk_ptr + bh * n_sink * D
                vp = sv_ptr + bh * n_sink * D
                count = n_sink
            elif seg == 1:
                kp = wk_ptr + bh * n_win * D
                vp = wv_ptr + bh * n_win * D
                count = n_win
            else:
                kp = pk_ptr + bh * n_prom * D
                vp = pv_ptr + bh * n_prom * D
                count = n_prom
            for n0 in range(0, count, BLOCK_N):
                ok = n0 + rows < count
                if seg == 2:  # free promotion slots hold no token
                    ok = ok & (tl.load(pidx_ptr + bh * n_prom + n0 + rows, mask=ok, other=-1) >= 0)
                at = (bh * n_blocks + first + n0 // BLOCK_N) * GP + gi
                m, l_sum, a0, a1, a2, a3, resc = _block(
                    q0, q1, m, l_sum, a0, a1, a2, a3, resc, kp, ks_ptr, kz_ptr, vp, vs_ptr, vz_ptr, 0, n0, rows,
                    ok, ~ok, bmass_ptr, bframe_ptr, at, real, qk_scale,
                    D, KCH, DT, PRECISION, HALVES, False, True, CERT, False, PTX,
                )  # fmt: skip
            if seg == 0:
                first += (n_sink + BLOCK_N - 1) // BLOCK_N
            elif seg == 1:
                first += (n_win + BLOCK_N - 1) // BLOCK_N
    out = bh * (n_splits + 1) + split
    tl.store(m_ptr + out * GP + gi, m, mask=real)
    tl.store(l_ptr + out * GP + gi, l_sum, mask=real)
    row = acc_ptr + out * GP * D + gi[:, None] * D
    if not HALVES:
        tl.store(row + tl.arange(0, D)[None, :], a0, mask=real[:, None])
    else:
        even = 2 * tl.arange(0, D // 4)[None, :]
        tl.store(row + even, a0, mask=real[:, None])
        tl.store(row + even + 1, a1, mask=real[:, None])
        tl.store(row + D // 2 + even, a2, mask=real[:, None])
        tl.store(row + D // 2 + even + 1, a3, mask=real[:, None])
    if CERT:
        tl.store(resc_ptr + out * GP + gi, resc, mask=real)


def splits_for(
    batch_heads: int,
    n_quant: int,
    block: int = 64,
    per_head: int = 33,
    target_programs: int = 264,
    least_blocks: int = 1,
) -> int:
    """Splits of the quantized tokens per (row, KV head): at least ``target_programs`` programs in all
    (two per SM of an H100), and otherwise ``per_head`` (shorter loops per program ran faster on the
    H100 at B = 1 and 8 alike, and 33 beat 16-96: ``benchmarks/results/launch_sweep.json``), but no
    more than leave ``least_blocks`` blocks a split; never a split shorter than one block."""
    if n_quant == 0:
        return 0
    n_blocks = n_quant // block
    fill = math.ceil(target_programs / batch_heads)
    return max(1, min(max(fill, min(per_head, n_blocks // least_blocks)), n_blocks))


@dataclass
class Partials:
    """One launch's output: per (row x KV head, split) online-softmax partials ``m``, ``l`` [BH, S+1, GP]
    (binary32, log2 units) and ``acc`` [BH, S+1, GP, D]; the last split holds the sink and window tokens.
    With ``cert``: per block of ``block`` tokens (quantized blocks first, then sink, then window blocks)
    the binary32 sum ``bmass`` of its weights in the frame ``bframe`` (the running maximum after it)
    [BH, NB, GP], and per split the rescales ``resc`` [BH, S+1, GP] of the running sums. Only the first
    G of the GP rows are written (the others pad the GQA group for the tensor cores and hold nothing).
    ``certkv.streaming`` turns them into the step's certificate."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the sum of the weights, as in the papers)
    acc: torch.Tensor
    block: int
    splits: int
    chunk: int
    bmass: torch.Tensor | None = None
    bframe: torch.Tensor | None = None
    resc: torch.Tensor | None = None


def block_count(n_quant: int, exact: tuple[int, ...], block: int) -> int:
    """Blocks of the certificate's mass table: quantized, then sink, window and promoted blocks
    (``exact``: their token counts)."""
    return n_quant // block + sum(-(-c // block) for c in exact)


# "auto" loads the codes through TMA inside a CUDA graph, where the descriptors cost nothing at replay,
# and eagerly from this many code bytes (B * H * n * 3D/2) on, where the kernel's GPU time exceeds the
# ~50 µs of host time a launch's two descriptors take (H100: docs/benchmarks.md, section "Codes by TMA")
TMA_EAGER_BYTES = 1 << 28
TMA_MODES = ("off", "auto", "on")


def code_descriptors(
    t1: Tier1, block: int, mode: str = "on", key_chunks: int = 1, value_halves: bool = True
) -> tuple[TensorDescriptor, TensorDescriptor] | None:
    """Tensor descriptors over the key and value codes as [B * H * n, W] matrices with the kernel's tiles
    ([block, D / key_chunks] keys; value bytes [block, D / 4], one channel half, or [block, D / 2] with
    ``value_halves`` False, the kernel's HALVES), so that they arrive in shared memory by the copy
    engine (TMA, Hopper and later), or None: ``mode`` "off", or "auto" outside a CUDA graph below
    ``TMA_EAGER_BYTES``, or where the copy engine cannot take them (no quantized tokens, a GPU without
    TMA, codes not contiguous or not 16-byte aligned). On the CPU (Triton's interpreter) descriptors are
    emulated, so tests run this path."""
    if mode not in TMA_MODES:
        raise ValueError(f"tma mode {mode!r}: one of {TMA_MODES}")
    kc, vc = t1.kc, t1.vc
    if mode == "off" or kc.shape[2] == 0 or not (kc.is_contiguous() and vc.is_contiguous()):
        return None
    if kc.is_cuda and torch.cuda.get_device_capability(kc.device)[0] < 9:
        return None
    capturing = kc.is_cuda and torch.cuda.is_current_stream_capturing()
    if mode == "auto" and not capturing and kc.numel() + vc.numel() < TMA_EAGER_BYTES:
        return None
    if kc.data_ptr() % 16 or vc.data_ptr() % 16:
        return None
    return (
        TensorDescriptor.from_tensor(kc.reshape(-1, kc.shape[-1]), [block, kc.shape[-1] // key_chunks]),
        TensorDescriptor.from_tensor(vc.reshape(-1, vc.shape[-1]), [block, vc.shape[-1] // (2 if value_halves else 1)]),
    )


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
    key_chunks: int = 1,
    cert: bool = False,
    tma: str = "off",
    maxnreg: int | None = None,
    programs: int = 264,
    per_head: int = 33,
    least_blocks: int = 1,
    ptx: bool | None = None,
) -> Partials:
    """Launch the kernel: q [B, H, G, D] (16-bit); ``cert`` adds the certificate's statistics.

    ``precision``: "ieee" (binary32 products), "fma" (the same arithmetic on CUDA cores, GQA rows
    unpadded), "tf32" or "fp16" (tensor cores; operands rounded to 10-bit mantissas; "fp16" overflows
    beyond 65504, which the certificate checks; over BF16 the query and exact tokens round to FP16,
    which it models). ``certkv.streaming`` certifies "ieee", "fma" and "fp16", not "tf32". ``deq16``:
    dequantize in FP16 arithmetic (FP16 operands only); ``key_chunks`` (1 or 2): the logits of a block
    over that many chunks of channels, chained on one accumulator, so that only a [block, D /
    key_chunks] key tile is live (the same MMAs, fewer registers).
    ``tma``: "on" loads the key and value codes through the tensor memory accelerator where the device
    has one, "auto" where it also pays (``code_descriptors``), "off" never; the same bytes, so the same
    results bit for bit. ``maxnreg``: a cap on registers per thread (more programs per SM);
    ``programs``, ``per_head`` and ``least_blocks``: the split count's rule (``splits_for``) where
    ``splits`` is None. ``ptx``: key codes to floats by inline ``prmt`` instructions, four at a time (the
    same values bit for bit; None: on NVIDIA GPUs, not in Triton's interpreter, which has no inline
    assembly)."""
    if deq16 and precision != "fp16":
        raise ValueError("deq16 needs precision='fp16'")
    if key_chunks not in (1, 2):
        raise ValueError(f"key_chunks {key_chunks}: 1 or 2")
    b, h, g, d = q.shape
    n_quant = t1.kc.shape[2]
    if n_quant % KEY_GROUP or d < VALUE_GROUP or d & (d - 1) or block > KEY_GROUP or KEY_GROUP % block:
        raise ValueError("layout: n_quant must be a multiple of 128, D a power of two >= 64, and the block divide 128")
    s = splits_for(b * h, n_quant, block, per_head, programs, least_blocks) if splits is None else splits
    chunk = math.ceil(n_quant / s / KEY_GROUP) * KEY_GROUP if s else 0
    s = math.ceil(n_quant / chunk) if chunk else 0
    gp = triton.next_power_of_2(g) if precision == "fma" else max(16, triton.next_power_of_2(g))  # tl.dot: >= 16
    dev = q.device
    m = torch.empty(b * h, s + 1, gp, dtype=torch.float32, device=dev)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h, s + 1, gp, d, dtype=torch.float32, device=dev)
    n_sink, n_win, n_prom = t1.sink_k.shape[2], t1.win_k.shape[2], t1.n_promoted
    nb = block_count(n_quant, tuple(sk.shape[2] for sk, _ in t1.exact_segments()), block) if cert else 0
    out = Partials(m, l_sum, acc, block, s, chunk)
    if cert:
        out.bmass = torch.empty(b * h, nb, gp, dtype=torch.float32, device=dev)
        out.bframe = torch.empty_like(out.bmass)
        out.resc = torch.empty(b * h, s + 1, gp, dtype=torch.int32, device=dev)
    stats = [out.bmass, out.bframe, out.resc]
    prom = [t1.prom_k, t1.prom_v, t1.prom_idx, t1.prom_mask]
    # the value layout, one rule for the code tiles and the kernel: halves (four accumulators) on tensor
    # cores, channel order on the CUDA cores
    halves = precision != "fma"
    descriptors = code_descriptors(t1, block, tma, key_chunks, halves)
    kc, vc = descriptors or (t1.kc, t1.vc)
    launcher(_decode_kernel)[(b * h, s + 1)](
        q.contiguous(), kc, t1.ks, t1.kz, vc, t1.vs, t1.vz, t1.sink_k, t1.sink_v, t1.win_k, t1.win_v,
        *(t1.kc if x is None else x for x in prom),
        m, l_sum, acc, *(m if x is None else x for x in stats),
        n_quant, n_sink, n_win, n_prom, chunk, scale * LOG2E, nb, s,
        G=g, GP=gp, D=d, BLOCK_N=block, PRECISION=precision, DEQ16=deq16, KCH=key_chunks,
        HALVES=halves, CERT=cert, PROMOTED=n_prom > 0, TMA=descriptors is not None,
        PTX=(q.is_cuda and torch.version.hip is None) if ptx is None else ptx,
        num_warps=num_warps, num_stages=num_stages,
        **EXACT_OPS, **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )  # fmt: skip
    return out


def combine(p: Partials, g: int) -> torch.Tensor:
    """Merge the splits' partials: [B*H, G, D] binary32 (the padding rows are not stored)."""
    m, l_sum, acc = p.m[:, :, :g], p.l[:, :, :g], p.acc[:, :, :g]
    top = m.amax(1, keepdim=True)
    w = torch.exp2(torch.where(torch.isinf(m), -torch.inf, m - top))
    num = (w[..., None] * acc).sum(1)
    den = (w * l_sum).sum(1)
    return num / den[..., None]


def decode(q: torch.Tensor, t1: Tier1, scale: float, splits: int | None = None, **launch: object) -> torch.Tensor:
    """Attention output [B, H, G, D] in q's dtype over the Tier-1 tokens (stage 0, no certificate);
    ``launch`` options as in ``decode_partials``."""
    b, h, g, d = q.shape
    partials = decode_partials(q, t1, scale, splits, **launch)  # type: ignore[arg-type]
    return combine(partials, g).reshape(b, h, g, d).to(q.dtype)


def decode_reference(q: torch.Tensor, t1: Tier1, scale: float) -> torch.Tensor:
    """The same attention in float64 from the same Tier-1 tensors (dequantized exactly), [B, H, G, D]."""
    keys, values, served = _exact_tokens(t1)
    t = scale * torch.matmul(q.double(), keys.transpose(-1, -2))
    w = torch.softmax(torch.where(served[:, :, None, :], t, -math.inf), dim=-1)
    return torch.matmul(w, values)


def _exact_tokens(t1: Tier1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values [B, H, N, D] in the kernel's order (quantized, sink, window, promoted slots),
    float64 and exact, and which of them a step serves [B, H, N] (not the quantized copies of promoted
    tokens, not free promotion slots)."""
    kc, ks, kz = t1.quantized_keys().exact_parts()
    vc, vs, vz = t1.quantized_values().exact_parts()
    segments = t1.exact_segments()
    keys = torch.cat([kc * ks + kz, *(sk.double() for sk, _ in segments)], dim=2)
    values = torch.cat([vc * vs + vz, *(sv.double() for _, sv in segments)], dim=2)
    return keys, values, t1.served()


def partials_reference(q: torch.Tensor, t1: Tier1, scale: float, block: int = 64) -> Partials:
    """The kernel's ``cert=True`` output computed in float64 from the exactly dequantized Tier-1 tensors,
    one split for the quantized tokens and one for the exact ones, blocks in the kernel's order: what
    every statistic would be without rounding (tests compare certificates from both)."""
    b, h, g, d = q.shape
    bh = b * h
    n_quant = t1.kc.shape[2]
    keys, values, served = _exact_tokens(t1)
    keys, values, served = keys.reshape(bh, -1, d), values.reshape(bh, -1, d), served.reshape(bh, 1, -1)
    t = scale * LOG2E * torch.einsum("rgd,rnd->rgn", q.double().reshape(bh, g, d), keys)
    t = torch.where(served, t, -math.inf)
    ends = list(itertools.accumulate((sk.shape[2] for sk, _ in t1.exact_segments()), initial=n_quant))
    spans = ([(0, n_quant)] if n_quant else []) + list(itertools.pairwise(ends))
    splits = 1 if n_quant else 0
    m = torch.full((bh, splits + 1, g), -math.inf, dtype=torch.float64)
    l_sum, resc = torch.zeros_like(m), torch.zeros_like(m)
    acc = torch.zeros(bh, splits + 1, g, d, dtype=torch.float64)
    bmass, bframe = [], []
    for index, (lo, hi) in enumerate(spans):
        s = 0 if n_quant and index == 0 else splits
        for n0 in range(lo, hi, block):
            sl = slice(n0, min(n0 + block, hi))
            m_new = torch.maximum(m[:, s], t[:, :, sl].amax(-1))
            frame = torch.where(torch.isinf(m_new), 0.0, m_new)
            alpha = torch.where(m_new > m[:, s], torch.exp2(m[:, s] - frame), 1.0)
            p = torch.exp2(t[:, :, sl] - frame[..., None])
            resc[:, s] += (m_new > m[:, s]) & ~torch.isinf(m[:, s])
            l_sum[:, s] = l_sum[:, s] * alpha + p.sum(-1)
            acc[:, s] = acc[:, s] * alpha[..., None] + torch.einsum("rgn,rnd->rgd", p, values[:, sl])
            bmass.append(p.sum(-1))
            bframe.append(frame)
            m[:, s] = m_new
    return Partials(
        m, l_sum, acc, block, splits, n_quant,
        bmass=torch.stack(bmass, 1), bframe=torch.stack(bframe, 1), resc=resc.int(),
    )  # fmt: skip


def from_cache(cache: object, layer: int) -> Tier1:
    """The Tier-1 tensors of a ``TieredKVCache`` layer in the kernel's layout (its default layout only)."""
    from certkv.cache import TieredKVCache

    assert isinstance(cache, TieredKVCache)
    st = cache._layers[layer]
    cfg = cache.config
    if not cfg.paper_layout:
        raise ValueError("the decode kernel implements the paper layout (CertConfig() defaults) only")
    assert st.qk is not None and st.qv is not None
    empty = st.qk.scale.new_zeros(*st.qk.codes.shape[:2], 0, st.qk.codes.shape[-1])

    def exact(x: torch.Tensor | None) -> torch.Tensor:
        return empty if x is None else x

    t1 = Tier1(
        st.qk.codes, st.qk.scale, st.qk.zero, st.qv.codes, st.qv.scale, st.qv.zero,
        exact(st.sink_k), exact(st.sink_v), exact(st.win_k), exact(st.win_v),
    )  # fmt: skip
    if st.promoted:
        t1.prom_k, t1.prom_v, t1.prom_idx = st.promoted["k"], st.promoted["v"], st.promoted["idx"]
        t1.prom_mask = cache._promoted_mask(st).to(torch.uint8)
    return t1
