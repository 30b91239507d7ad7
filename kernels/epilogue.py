"""The decode kernel's step certificate in five Triton launches; its torch reference is
``certkv.streaming.certify``.

``certify`` there spends ~500 small float64 torch launches per step (7-13 ms eager on the H100,
whatever the context): more than the decode kernel itself. Here the same float64 arithmetic
(docs/theory.md section 8) runs in five launches, each spread over the GPU:

1. ``_scales_kernel`` (batch row x KV head, key group): what the certificate takes from the scales,
   one record per quantized block: logit radii from |q| and the key scales, the largest key operand,
   value magnitudes and radii (no block masses: small programs, few registers);
2. ``_blocks_kernel`` (batch row x KV head, part: a chunk of quantized blocks or one block of sink,
   window or promoted tokens): the records (or, for exact tokens, |q|.|k| and |v|), block masses and
   their accuracy, the dust, value magnitudes and radii weighted by the masses. Per block the radii,
   accuracy and live mass go to a scratch buffer; per part the partial maxima and sums to another;
3. ``_bins_kernel`` (same grid): each part's blocks binned for the divisible total-variation bound
   of ``certkv.tv.tv_bound`` for the radius sets of p and p_hat (``EDGE_SETS``; p~'s radii lie within
   one bin of their largest, where that bound is the tanh bound, docs/theory.md section 8), whose bin
   edges need the maxima over all parts (each program reduces the parts' radius-set slots in one pass;
   the first stores them for the next launch);
4. ``_edges_kernel`` (batch row x head x query row, radius set, EDGE_BINS of the bins): the maximum of the
   divisible problem over the edges of the greedy's vertices (``certkv.tv._edges_max``), exact up to
   rounding; the vertices (i, j) with i among the program's bins;
5. ``_final_kernel`` (batch row x head x query row): the splits merged into the output, all the
   parts' statistics reduced in one pass, the TV bounds, the terms per channel and the certificate's
   fields (its stage-0 zeros too: allocated and filled by torch they were five more launches a step).

Partial results are reduced in a fixed order, so the result does not depend on scheduling.
Differences from the torch reference, each a few units of float64 rounding: sums run in another
order (every sum is inflated for any order; the edge maximum's out-ranges by a scan instead of a
masked sum), and tanh(R/2) is evaluated as (1 - e^-R) / (1 + e^-R) with its own margin (``_tanh_up``) because
Triton's interpreter has no tanh. Tests hold the two to each other and both to the exact reference.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from certkv import streaming
from certkv.quant import RADIUS_FACTOR
from certkv.rounding import U32, U64, gamma, inflate
from certkv.tv import BIN_RATIO, BINS, HEAVY, RELAX_MAX_RADIUS

from .decode import EXACT_OPS, KEY_GROUP, VALUE_GROUP, Partials, Tier1, block_count
from .launch import launcher

# the float64 constants' slots in the table the kernel reads (Triton passes float scalars as binary32)
(C_SUP, C_STEP255, C_MAG, C_ABS, C_PREL, C_PABS, C_LIMIT, C_DOTU, C_QDOT, C_INFD, C_C1, C_BABS, C_LIVE, C_DUSTMAX,
 C_L1A, C_L1AB, C_BETA1, C_VREL, C_RF, C_RELAX, C_SLACK, C_INF4, C_U64, C_U32, C_QREL, C_QABS,
 C_XABS, C_RATIO) = map(tl.constexpr, range(28))  # fmt: skip
KGROUP = tl.constexpr(KEY_GROUP)
# the per-chunk partial statistics' slots (then NVG slots each of w_eta, eta_hi, eta_lo)
S_RP, S_RH, S_EPS, S_LAM, S_RLP, S_RLH, S_DUST, S_TOTAL, S_SW, S_VMAG, S_BIG = map(tl.constexpr, range(11))
S_VEC = tl.constexpr(11)
NSUM = tl.constexpr(8)  # slots 0-7 hold all the radius sets need (the binning pass reduces them once)
N_FIELDS = len(streaming.BOUND_FIELDS)
# warps per kernel (measured on the H100, docs/benchmarks.md: four for the edge maximum's [8, 32] tiles,
# one for the final pass; two for the block and binning passes)
WARPS = {"scales": 1, "blocks": 2, "bins": 2, "edges": 4, "final": 1}
# blocks per loop iteration of the block pass (a chunk is a whole number of block steps), exact tokens
# per program of the scales pass
STEP = {"blocks": 16, "bins": 16, "tokens": 8}
PROGRAMS = {"blocks": 528}  # programs of the block and binning passes (about four per SM of an H100)
# quantized blocks per part at the least, and quantized parts per (row, head) at the most: every binning
# program, the edge maximum and the final pass reduce over a (row, head)'s parts, so many parts cost
# (H100, B = 1, 128K: 64 parts of 16 blocks per head binned in 27 us, 32 of 32 in 14), while few parts
# leave the GPU idle where there are few blocks (B = 1, 8K: 4 parts of 16 blocks 7.7 us, 2 of 32 10.0;
# profile_epilogue_chunk.json)
CHUNK_LEAST = 16
MOST_PARTS = 32
# bins i of the edge maximum's vertices (i, j) per program, a divisor of BINS (H100, 4 warps, 8K: 6.2 us at
# B = 1, 26.1 at B = 8; 16 bins 7.6 / 25.5, 4 bins 8.6 / 47.2; profile_epilogue_edges.json)
EDGE_BINS = 8
FINAL_ROWS = 1  # query rows per program of the final pass
# radius sets with an edge maximum: p (r_p + lambda) and p_hat (rho + lambda). p~'s radii are lambda
# alone, live blocks' within a factor (c1 + 2^-20) / c1 < BIN_RATIO of each other, so all fall in the top
# bin and its divisible bound is exactly the tanh bound (docs/theory.md section 8): the final pass takes
# that directly (binning and maximising it was a third of the binning pass and the edge maximum)
EDGE_SETS = tl.constexpr(2)


@functools.lru_cache(maxsize=64)
def _constants(device: torch.device, ar: streaming.Arithmetic, scale: float, d: int, blk: int) -> torch.Tensor:
    """The launch-invariant float64 constants, computed by the same Python expressions as the reference."""
    s_up = float(torch.tensor(scale, dtype=torch.float32)) * (1 + 2 * U32)
    c1, b_abs = streaming.mass_error(blk)
    exps = torch.arange(BINS - 1, -1, -1, dtype=torch.float64)
    values = [
        s_up, ar.step * 255, ar.mag, ar.abs, ar.p_rel, ar.p_abs, ar.limit, ar.dot_u, gamma(d + 5, ar.dot_u),
        inflate(d), c1, b_abs, streaming.LIVE, streaming.DUST_RADIUS_MAX, math.log1p(streaming.ALPHA1),
        streaming.LOG1P_ALPHA1_BETA1, streaming.BETA1, 2 * ar.step + ar.mag,
        RADIUS_FACTOR, RELAX_MAX_RADIUS, 64 * (BINS + HEAVY) * U64, inflate(4), U64, U32, ar.q_rel, ar.q_abs,
        ar.x_abs, *(BIN_RATIO ** (-exps)).tolist(),
    ]  # fmt: skip
    return torch.tensor(values, dtype=torch.float64).to(device)


@triton.jit
def _gamma(n, u):
    """Higham's gamma_n (n an integer below 1/u) in float64, as ``certkv.rounding.gamma``."""
    nu = n * u  # an integer (a tensor, or an int where Triton specialised it) times a float64: exact
    return nu / (1.0 - nu)


@triton.jit
def _inflate(n, u64):
    return 1.0 / (1.0 - _gamma(n + 4, u64)) + 4.0 * u64


@triton.jit
def _tanh_up(r, u64):
    """>= tanh(r / 2) for r >= 0, at most 1: (1 - E) / (1 + E) with E = exp(-r) computed within 2 ulp
    errs by at most 4 units of relative and 4 of absolute rounding; 8 of each are added."""
    e = tl.exp(-r)
    return tl.minimum((1.0 - e) / (1.0 + e) * (1.0 + 8.0 * u64) + 8.0 * u64, 1.0)


@triton.jit
def _round_out(y, DT: tl.constexpr):
    """float64 to DT through binary32, rounding to nearest even at both steps, as the reference's
    ``y.float().to(dtype)`` (BF16 by integer rounding of the binary32 bits: the interpreter truncates)."""
    y32 = y.to(tl.float32)
    if DT == tl.bfloat16:  # noqa: SIM300 (DT is a constexpr argument, not a constant)
        bits = y32.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y32.to(DT)


@triton.jit
def _block_stats(bmass_ptr, bframe_ptr, at, ok, top, c1, babs_c, live_c):
    """Block masses M in the frame of the row's top logit (``top`` broadcast like ``at``), the live
    ones and their log-ratio accuracy lambda, the dust and the masses' upper bounds (as the
    reference's "block masses" step); shaped like ``at``."""
    bm = tl.load(bmass_ptr + at, mask=ok, other=0.0).to(tl.float64)
    bf = tl.load(bframe_ptr + at, mask=ok, other=0.0).to(tl.float64)
    frame = tl.exp2(bf - top)
    mass = tl.where(ok, bm * frame, 0.0)
    b_abs = tl.where(ok, babs_c * frame, 0.0)
    live = ok & (mass >= live_c * b_abs)
    lam = tl.where(live, 2.0 * (c1 + b_abs / tl.maximum(mass, 1e-300)) * (1.0 + 2.0**-40), 0.0)
    dust = tl.where(live | ~ok, 0.0, (mass + b_abs) / (1.0 - c1))
    m_up = (mass + b_abs) / (1.0 - c1) * (1.0 + 2.0**-40)
    return lam, dust, tl.where(live, mass, 0.0), m_up


@triton.jit
def _store4(base, at, stride, a, b, c, e, mask):
    """Four per-block quantities to the scratch rows 0-3."""
    tl.store(base + at, a, mask=mask)
    tl.store(base + stride + at, b, mask=mask)
    tl.store(base + 2 * stride + at, c, mask=mask)
    tl.store(base + 3 * stride + at, e, mask=mask)


@triton.jit
def _bin(radius, m_norm, rm, extra, ratio, BINS: tl.constexpr):
    """Masses [GR, CB] one-hot over the bins of their radius (rounded up to the bin edges rm * ratio,
    searchsorted left): [GR, CB, BINS], summed over the blocks by the caller."""
    r = tl.minimum(radius + extra, rm[:, None])
    edges = rm[:, None] * ratio[None, :]
    k = tl.arange(0, BINS)
    idx = tl.minimum(tl.sum((edges[:, None, :] < r[:, :, None]).to(tl.int32), 2), BINS - 1)
    return tl.where(idx[:, :, None] == k[None, None, :], m_norm[:, :, None], 0.0)


@triton.jit
def _edge_bound(a0, b_rest, m0, af, bf, mf):
    """Upper bound on the maximum of A/(A + B) - M along an edge (``certkv.tv._edge_bound``): bin f moves
    in, A = a0 + theta af, B = b_rest + (1 - theta) bf, M = m0 + theta mf; concave in theta, so its value
    and slope at the maximiser theta_hat (binary32; any point would do: a NaN becomes 0) bound the whole
    edge."""
    kappa = af * (b_rest + bf) + a0 * bf
    # binary32 square root and divisions rounded to nearest, as the reference's
    root = tl.sqrt_rn(tl.div_rn(kappa.to(tl.float32), mf.to(tl.float32)))
    theta32 = tl.div_rn(root - (a0 + b_rest + bf).to(tl.float32), (af - bf).to(tl.float32))
    theta = tl.where(theta32 > 0, tl.where(theta32 < 1, theta32, 1.0), 0.0).to(tl.float64)
    a = a0 + theta * af
    inv = 1.0 / (a + (b_rest + (1.0 - theta) * bf))
    slope = kappa * inv * inv - mf
    return a * inv - (m0 + theta * mf) + tl.maximum(slope, 0.0) * (1.0 - theta) + tl.maximum(-slope, 0.0) * theta


@triton.jit
def _top(m_ptr, bh, n_splits, gi, row, GP: tl.constexpr):
    """The largest split maximum of each row (float64; 0 for padding rows)."""
    PC: tl.constexpr = 64
    top = tl.full(gi.shape, -float("inf"), tl.float64)
    for s0 in range(0, n_splits + 1, PC):
        s = s0 + tl.arange(0, PC)
        ok = (s <= n_splits)[:, None] & row[None, :]
        x = tl.load(m_ptr + (bh * (n_splits + 1) + s[:, None]) * GP + gi[None, :], mask=ok, other=-float("inf"))
        top = tl.maximum(top, tl.max(x.to(tl.float64), 0))
    return tl.where(row, top, 0.0)


@triton.jit
def _reduce_parts(
    p_ptr, bh, n_parts, gi, NSTAT: tl.constexpr, NS: tl.constexpr, NVG: tl.constexpr, GR: tl.constexpr, R: tl.constexpr
):
    """The first NS slots of the parts' partial statistics reduced over the parts in one pass, [NS, R]
    for the R query rows ``gi`` (of GR):
    sums for the dust, live mass, weighted magnitudes and w_eta; minima for eta_lo; maxima for the rest
    (all >= 0). The parts are visited in a fixed order, so the sums do not depend on scheduling."""
    PC: tl.constexpr = 1024 // (NS * R)  # parts per step: tiles of 1024 values
    sl = tl.arange(0, NS)
    is_sum = (sl == S_DUST) | (sl == S_TOTAL) | (sl == S_SW) | ((sl >= S_VEC) & (sl < S_VEC + NVG))
    is_min = sl >= S_VEC + 2 * NVG
    total = tl.zeros((NS, R), tl.float64)
    high = tl.zeros((NS, R), tl.float64)
    low = tl.full((NS, R), float("inf"), tl.float64)
    for c0 in range(0, n_parts, PC):
        c = (c0 + tl.arange(0, PC))[:, None, None]
        ok = (c < n_parts) & (sl < NSTAT)[None, :, None]
        at = ((bh * n_parts + c) * NSTAT + sl[None, :, None]) * GR + gi[None, None, :]
        x = tl.load(p_ptr + at, mask=ok, other=0.0)
        total += tl.sum(x, 0)
        high = tl.maximum(high, tl.max(x, 0))
        low = tl.minimum(low, tl.min(tl.where(ok, x, float("inf")), 0))
    return tl.where(is_sum[:, None], total, tl.where(is_min[:, None], low, high))


@triton.jit
def _row_program(GR: tl.constexpr, R: tl.constexpr):
    """(row x KV head ``bh``, query rows ``gi`` [R]) of a program along axis 0 of a grid that gives
    each (row, head) GR // R programs of R of its GR query rows."""
    return tl.program_id(0) // (GR // R), tl.program_id(0) % (GR // R) * R + tl.arange(0, R)


@triton.jit
def _slot(red, j, NS: tl.constexpr):
    """Slot j [R] of a reduced statistics tile [NS, R]."""
    return tl.sum(tl.where((tl.arange(0, NS) == j)[:, None], red, 0.0), 0)


@triton.jit
def _slots(red, j, NS: tl.constexpr, NVG: tl.constexpr):
    """Slots j .. j + NVG - 1 [R, NVG] of a reduced statistics tile [NS, R]."""
    pick = tl.arange(0, NS)[:, None, None] == j + tl.arange(0, NVG)[None, None, :]
    return tl.sum(tl.where(pick, red[:, :, None], 0.0), 0)


@triton.jit
def _summary_at(bh, gi, GR: tl.constexpr):
    """Where (row, head) ``bh``'s radius-set slots (the first NSUM, reduced by the binning pass) lie."""
    return (bh * NSUM + tl.arange(0, NSUM)[:, None]) * GR + gi[None, :]


@triton.jit
def _radius_sets(red, c_ptr, nb_all, NS: tl.constexpr, BINS: tl.constexpr):
    """Per row: the largest radius of the sets p, p_hat, p~ (r + lambda; ``tv_bound``'s r_max, with its
    rounding allowance ``extra``, ``certkv.tv.sum_radius(nb_all)``, which the reference's p~ bound adds
    too), those of p and p_hat clamped to the edge maximum's range, and the live mass."""
    extra = 4.0 * _gamma(nb_all + BINS + 8, tl.load(c_ptr + C_U64))
    relax = tl.load(c_ptr + C_RELAX)
    r_p = _slot(red, S_RLP, NS) + extra
    r_h = _slot(red, S_RLH, NS) + extra
    r_0 = _slot(red, S_LAM, NS) + extra
    total = _slot(red, S_TOTAL, NS)
    return r_p, r_h, r_0, tl.minimum(r_p, relax), tl.minimum(r_h, relax), extra, total


@triton.jit
def _key_group_stats(ks_ptr, kz_ptr, grp, d, absq, dq, c_ptr, QROUND: tl.constexpr):
    """Logit radii of key group ``grp`` (docs/theory.md section 8, as ``certkv.streaming.certify``),
    float64 per query row of ``absq`` [GR, D] (|q|, padding rows 0): the quantization radius eps =
    s |q|.k_rad, the rounding radius rho = s |q|.(|k used| dot_u-factor + |k error|) (QROUND, the
    query rounded into the products within ``dq``: plus s dq.|k used| (1 + dot_u-factor)), each
    rounded up, and the largest key operand magnitude (the overflow check)."""
    D: tl.constexpr = d.shape[0]
    u64 = tl.load(c_ptr + C_U64)
    ks16 = tl.load(ks_ptr + grp * D + d)
    ks = ks16.to(tl.float64)
    kz = tl.load(kz_ptr + grp * D + d).to(tl.float64)
    k_rad = (ks16.to(tl.float32) * tl.load(c_ptr + C_RF).to(tl.float32)).to(tl.float64)
    k_max = tl.maximum(tl.abs(kz), tl.abs(kz + 255.0 * ks)) * (1.0 + 2.0 * u64)
    k_err = tl.load(c_ptr + C_STEP255) * tl.abs(ks) + tl.load(c_ptr + C_MAG) * k_max + tl.load(c_ptr + C_ABS)
    k_err = k_err * (1.0 + 2.0 * u64)
    k_used = k_max + k_err
    s_up, infl_d = tl.load(c_ptr + C_SUP), tl.load(c_ptr + C_INFD)
    eps = s_up * tl.sum(absq * k_rad[None, :], 1) * infl_d
    q_dot = tl.load(c_ptr + C_QDOT)
    rho = s_up * tl.sum(absq * (k_used * q_dot + k_err)[None, :], 1) * infl_d
    big = tl.max(k_used, 0)
    if QROUND:
        rho_q16 = s_up * tl.sum(dq * (k_used * (1.0 + q_dot))[None, :], 1) * infl_d
        rho = (rho + rho_q16) * (1.0 + 2.0 * u64)
    return eps, rho, big


@triton.jit
def _value_block_stats(vs16, vz16, c_ptr):
    """Blocks' value statistics from their 16-bit scales and zero points [blocks, BLK, D/64], float64:
    per block the largest |v_hat| (max(|z|, |z + 15 s|), exact) [blocks], and the largest and smallest
    value radius per channel group [blocks, D/64]."""
    vs, vz = vs16.to(tl.float64), vz16.to(tl.float64)
    vmag = tl.max(tl.max(tl.maximum(tl.abs(vz), tl.abs(vz + 15.0 * vs)), 2), 1)
    radius = vs16.to(tl.float32) * tl.load(c_ptr + C_RF).to(tl.float32)  # binary32, as the reference
    return vmag, tl.max(radius, 1).to(tl.float64), tl.min(radius, 1).to(tl.float64)


def stat_slots(gr: int, d: int) -> int:
    """float64 slots of a quantized block's record (``_scales_kernel``): eps and rho of its key group per query
    row (``gr`` of them), the largest key operand, the largest |v_hat|, then the largest and smallest
    value radius per channel group."""
    return 2 * gr + 2 + 2 * (d // VALUE_GROUP)


# Integer arguments are not specialised (Triton compiles a variant per value that is 1 or divisible by
# 16): the token and block counts change as the context grows, and each variant costs seconds to
# compile (here and in the passes below). In _scales_kernel it also keeps one type for the segment
# branches.
@triton.jit(do_not_specialize=["n_quant", "n_e0", "n_e1", "n_e2"])
def _scales_kernel(
    q_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, ek0, ev0, ek1, ev1, ek2, ev2, c_ptr, qstat_ptr, erec_ptr,
    n_quant, n_e0, n_e1, n_e2,
    G: tl.constexpr, GR: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr, ETOK: tl.constexpr,
    ESUB: tl.constexpr, NQS: tl.constexpr, QROUND: tl.constexpr,
):  # fmt: skip
    """What the certificate takes from the cache's magnitudes, before the block masses are known; one
    program per (batch row x KV head, key group or ETOK exact tokens). A key group: the records of its
    quantized blocks (``stat_slots``: logit radii from |q| and the key scales, the largest key operand,
    value magnitudes and radii). ETOK tokens of an exact block (sink, window, then promoted slots, each
    segment in whole blocks): their largest s_up |q|.|k| per query row, largest |v| and operand."""
    bh = tl.program_id(0)
    part = tl.program_id(1)
    NVG: tl.constexpr = D // 64
    NBG: tl.constexpr = KGROUP // BLK  # blocks per key group
    d = tl.arange(0, D)
    ri = tl.arange(0, GR)
    absq = tl.abs(tl.load(q_ptr + (bh * G + ri[:, None]) * D + d[None, :], mask=ri[:, None] < G, other=0.0))
    absq = absq.to(tl.float64)
    u64 = tl.load(c_ptr + C_U64)
    # QROUND (certkv.streaming.Arithmetic.rounds_inputs): the query rounds into the products within dq
    # and the exact tokens within x_abs; a query beyond the operands' range is not certified
    dq = (tl.load(c_ptr + C_QREL) * absq + tl.load(c_ptr + C_QABS)) * (1.0 + 2.0 * u64)
    q_big = tl.max(tl.max(absq, 1), 0) if QROUND else 0.0
    n_groups = n_quant // KGROUP
    if part < n_groups:
        k_base = bh * n_groups * D
        eps, rho, big = _key_group_stats(ks_ptr + k_base, kz_ptr + k_base, part, d, absq, dq, c_ptr, QROUND)
        big = tl.maximum(big, q_big)
        vg = tl.arange(0, NVG)
        tok = part * KGROUP + tl.arange(0, KGROUP)
        at = (bh * n_quant + tok)[:, None] * NVG + vg[None, :]
        vs16 = tl.reshape(tl.load(vs_ptr + at), (NBG, BLK, NVG))
        vz16 = tl.reshape(tl.load(vz_ptr + at), (NBG, BLK, NVG))
        vmag, eta_hi, eta_lo = _value_block_stats(vs16, vz16, c_ptr)
        rec = qstat_ptr + (bh * (n_quant // BLK) + part * NBG + tl.arange(0, NBG))[:, None] * NQS  # [NBG, 1]
        zero = tl.zeros((NBG, 1), tl.float64)
        tl.store(rec + ri[None, :], zero + eps[None, :])
        tl.store(rec + GR + ri[None, :], zero + rho[None, :])
        two = tl.arange(0, 2)[None, :]
        tl.store(rec + 2 * GR + two, tl.where(two == 0, zero + big, vmag[:, None]))
        tl.store(rec + 2 * GR + 2 + vg[None, :], eta_hi)
        tl.store(rec + 2 * GR + 2 + NVG + vg[None, :], eta_lo)
    else:
        e = part - n_groups
        eb = e // ESUB
        e0 = tl.cdiv(n_e0, BLK)
        e1 = e0 + tl.cdiv(n_e1, BLK)
        if eb < e0:
            kp, vp, count, first = ek0, ev0, n_e0, 0
        elif eb < e1:
            kp, vp, count, first = ek1, ev1, n_e1, e0
        else:
            kp, vp, count, first = ek2, ev2, n_e2, e1
        t_first = (eb - first) * BLK + e % ESUB * ETOK
        dots = tl.zeros((GR,), tl.float64)
        v_top = tl.zeros((), tl.float64)
        k_top = tl.zeros((), tl.float64)
        s_up = tl.load(c_ptr + C_SUP)
        # QROUND: per token s_up (sum_j wq_j (|k_j| + x_abs) + x_abs sum_j |q_j|) >= s |fl(q~.k~) - q.k| / infl
        q_dot, x_abs = tl.load(c_ptr + C_QDOT), tl.load(c_ptr + C_XABS)
        wq = absq * q_dot + dq * (1.0 + q_dot)
        xq = x_abs * tl.sum(absq, 1)
        # one token at a time: [GR, D] tiles keep the registers of the whole kernel (both branches) low
        for j in range(ETOK):
            on = (d * 0 + t_first + j) < count  # a tensor mask (the interpreter takes no scalar)
            at_t = (bh * count + t_first + j) * D + d
            k = tl.abs(tl.load(kp + at_t, mask=on, other=0.0).to(tl.float64))
            v = tl.abs(tl.load(vp + at_t, mask=on, other=0.0).to(tl.float64))
            if QROUND:
                dots = tl.maximum(dots, s_up * (tl.sum(wq * (k + x_abs)[None, :], 1) + xq))
            else:
                dots = tl.maximum(dots, s_up * tl.sum(absq * k[None, :], 1))
            v_top = tl.maximum(v_top, tl.max(v))
            k_top = tl.maximum(k_top, tl.max(k))
        pair = tl.arange(0, 2)
        rec_t = erec_ptr + (bh * (tl.num_programs(1) - n_groups) + e) * (GR + 2)
        tl.store(rec_t + ri, dots)
        tl.store(rec_t + GR + pair, tl.where(pair == 0, v_top, tl.maximum(tl.maximum(k_top, v_top), q_big)))


@triton.jit(do_not_specialize=["n_quant", "n_splits", "nb_all", "chunk", "n_chunks", "n_parts"])
def _blocks_kernel(
    qstat_ptr, erec_ptr, m_ptr, bmass_ptr, bframe_ptr, c_ptr, scratch_ptr, p_ptr,
    n_quant, n_splits, nb_all, chunk, n_chunks, n_parts,
    G: tl.constexpr, GR: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr,
    CB: tl.constexpr, ESUB: tl.constexpr, NQS: tl.constexpr, NSTAT: tl.constexpr, QROUND: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    part = tl.program_id(1)
    NVG: tl.constexpr = D // 64
    gi = tl.arange(0, GR)
    row = gi < G
    u64 = tl.load(c_ptr + C_U64)
    q_dot, infl_d = tl.load(c_ptr + C_QDOT), tl.load(c_ptr + C_INFD)
    c1, babs_c, live_c = tl.load(c_ptr + C_C1), tl.load(c_ptr + C_BABS), tl.load(c_ptr + C_LIVE)
    top = _top(m_ptr, bh, n_splits, gi, row, GP)
    rp_max = tl.zeros((GR,), tl.float64)
    rh_max = tl.zeros((GR,), tl.float64)
    eps_max = tl.zeros((GR,), tl.float64)
    lam_max = tl.zeros((GR,), tl.float64)
    rlp_max = tl.zeros((GR,), tl.float64)  # max of r_p + lambda
    rlh_max = tl.zeros((GR,), tl.float64)
    dust = tl.zeros((GR,), tl.float64)
    total = tl.zeros((GR,), tl.float64)
    s_w = tl.zeros((GR,), tl.float64)
    w_eta = tl.zeros((GR, NVG), tl.float64)
    vmag_max = tl.zeros((), tl.float64)
    eta_hi = tl.zeros((NVG,), tl.float64)
    eta_lo = tl.full((NVG,), float("inf"), tl.float64)
    big = tl.zeros((), tl.float64)  # the largest operand magnitude (overflow check)
    sc = scratch_ptr + bh * 4 * GR * nb_all
    n_qb = n_quant // BLK
    if part < n_chunks:  # quantized blocks [part * chunk, part * chunk + chunk): the records of _scales_kernel
        cb = tl.arange(0, CB)
        vg = tl.arange(0, NVG)
        hi = tl.minimum(part * chunk + chunk, n_qb)
        # per-block accumulators: elementwise across iterations, reduced across threads once at the end
        a_rp = tl.zeros((GR, CB), tl.float64)
        a_rh = tl.zeros((GR, CB), tl.float64)
        a_eps = tl.zeros((GR, CB), tl.float64)
        a_lam = tl.zeros((GR, CB), tl.float64)
        a_rlp = tl.zeros((GR, CB), tl.float64)
        a_rlh = tl.zeros((GR, CB), tl.float64)
        a_dust = tl.zeros((GR, CB), tl.float64)
        a_total = tl.zeros((GR, CB), tl.float64)
        a_sw = tl.zeros((GR, CB), tl.float64)
        a_weta = tl.zeros((GR, CB, NVG), tl.float64)
        a_vmag = tl.zeros((CB,), tl.float64)
        a_etahi = tl.zeros((CB, NVG), tl.float64)
        a_etalo = tl.full((CB, NVG), float("inf"), tl.float64)
        a_big = tl.zeros((CB,), tl.float64)
        for b0 in range(part * chunk, hi, CB):
            blocks = b0 + cb
            okb = blocks < hi
            ok = row[:, None] & okb[None, :]
            rec = qstat_ptr + (bh * n_qb + blocks) * NQS  # [CB]: eps, rho [GR], big, vmag, eta, eta_lo [NVG]
            eps = tl.load(rec[None, :] + gi[:, None], mask=ok, other=0.0)
            rho = tl.load(rec[None, :] + GR + gi[:, None], mask=ok, other=0.0)
            r_p = (eps + rho) * (1.0 + 2.0 * u64)
            a_big = tl.maximum(a_big, tl.load(rec + 2 * GR, mask=okb, other=0.0))
            vmag = tl.load(rec + 2 * GR + 1, mask=okb, other=0.0)
            eta = tl.load(rec[:, None] + 2 * GR + 2 + vg[None, :], mask=okb[:, None], other=0.0)  # [CB, NVG]
            eta_b = tl.load(rec[:, None] + 2 * GR + 2 + NVG + vg[None, :], mask=okb[:, None], other=float("inf"))
            at_b = (bh * nb_all + blocks[None, :]) * GP + gi[:, None]
            lam, dust_b, m_live, m_up = _block_stats(bmass_ptr, bframe_ptr, at_b, ok, top[:, None], c1, babs_c, live_c)
            a_etalo = tl.minimum(a_etalo, eta_b)
            a_etahi = tl.maximum(a_etahi, eta)
            a_vmag = tl.maximum(a_vmag, vmag)
            a_sw += m_up * vmag[None, :]
            a_weta += m_up[:, :, None] * eta[None, :, :]
            a_rp = tl.maximum(a_rp, tl.where(ok, r_p, 0.0))
            a_rh = tl.maximum(a_rh, tl.where(ok, rho, 0.0))
            a_eps = tl.maximum(a_eps, tl.where(ok, eps, 0.0))
            a_lam = tl.maximum(a_lam, lam)
            a_rlp = tl.maximum(a_rlp, tl.where(ok, r_p + lam, 0.0))
            a_rlh = tl.maximum(a_rlh, tl.where(ok, rho + lam, 0.0))
            a_dust += dust_b
            a_total += m_live
            _store4(sc, gi[:, None] * nb_all + blocks[None, :], GR * nb_all, r_p, rho, lam, m_live, okb[None, :])
        rp_max, rh_max, eps_max, lam_max = tl.max(a_rp, 1), tl.max(a_rh, 1), tl.max(a_eps, 1), tl.max(a_lam, 1)
        rlp_max, rlh_max = tl.max(a_rlp, 1), tl.max(a_rlh, 1)
        dust, total, s_w, w_eta = tl.sum(a_dust, 1), tl.sum(a_total, 1), tl.sum(a_sw, 1), tl.sum(a_weta, 1)
        vmag_max, big = tl.max(a_vmag), tl.max(a_big)
        eta_hi, eta_lo = tl.max(a_etahi, 0), tl.min(a_etalo, 0)
    else:  # one block of exact tokens (sink, window, then promoted slots): its chunks' records
        eb = part - n_chunks
        sub = tl.arange(0, ESUB)
        rec = erec_ptr + (bh * (nb_all - n_qb) * ESUB + eb * ESUB + sub) * (GR + 2)  # [ESUB]
        dots = tl.max(tl.load(rec[:, None] + gi[None, :]), 0)  # the block's largest s_up |q|.|k|
        vmag = tl.max(tl.load(rec + GR))
        big = tl.max(tl.load(rec + GR + 1))
        # QROUND: dots holds the whole rounding bound (_scales_kernel)
        rho = dots * infl_d * (1.0 + 8.0 * u64) if QROUND else dots * q_dot * infl_d
        r_p = rho * (1.0 + 2.0 * u64)
        at_b = (bh * nb_all + n_qb + eb) * GP + gi
        lam, dust, m_live, m_up = _block_stats(bmass_ptr, bframe_ptr, at_b, row, top, c1, babs_c, live_c)
        vmag_max = vmag
        s_w = m_up * vmag
        rp_max, rh_max, lam_max = r_p, rho, lam
        rlp_max = tl.where(row, r_p + lam, 0.0)
        rlh_max = tl.where(row, rho + lam, 0.0)
        total = m_live
        _store4(sc, gi * nb_all + n_qb + eb, GR * nb_all, r_p, rho, lam, m_live, row)
    # this chunk's partial statistics: per row, or per (row, head) broadcast over the rows
    base = p_ptr + (bh * n_parts + part) * NSTAT * GR
    zero = tl.zeros((GR,), tl.float64)
    scalars = (rp_max, rh_max, eps_max, lam_max, rlp_max, rlh_max, dust, total, s_w, zero + vmag_max, zero + big)
    for slot in tl.static_range(11):
        tl.store(base + slot * GR + gi, scalars[slot])
    vg2 = tl.arange(0, NVG)[None, :]
    tl.store(base + (S_VEC + vg2) * GR + gi[:, None], w_eta)
    tl.store(base + (S_VEC + NVG + vg2) * GR + gi[:, None], zero[:, None] + eta_hi[None, :])
    tl.store(base + (S_VEC + 2 * NVG + vg2) * GR + gi[:, None], zero[:, None] + eta_lo[None, :])


@triton.jit(do_not_specialize=["n_quant", "nb_all", "chunk", "n_chunks", "n_parts"])
def _bins_kernel(
    c_ptr, scratch_ptr, p_ptr, s_ptr, bins_ptr, n_quant, nb_all, chunk, n_chunks, n_parts,
    GR: tl.constexpr, BLK: tl.constexpr, CB: tl.constexpr, BINS: tl.constexpr, NSTAT: tl.constexpr,
    NVG: tl.constexpr,
):  # fmt: skip
    """Each chunk's live block masses (normalised) into the bins of the radius sets of p and p_hat. Every
    program reduces the radius-set slots of the parts' statistics (the bin edges need the maxima over
    all parts); the first stores them for the edge maximum."""
    bh = tl.program_id(0)
    part = tl.program_id(1)
    gi = tl.arange(0, GR)
    red = _reduce_parts(p_ptr, bh, n_parts, gi, NSTAT, NSUM, NVG, GR, GR)
    at_s = _summary_at(bh, gi, GR)
    tl.store(s_ptr + at_s, red, mask=at_s * 0 + part == 0)  # a tensor mask: the interpreter takes no scalar
    _, _, _, rm_p, rm_h, extra, total = _radius_sets(red, c_ptr, nb_all, NSUM, BINS)
    ratio = tl.load(c_ptr + C_RATIO + tl.arange(0, BINS))
    norm = tl.where(total > 0, total, 1.0)
    n_qb = n_quant // BLK
    lo = tl.where(part < n_chunks, part * chunk, n_qb + part - n_chunks)  # a chunk, or one exact block
    hi = tl.where(part < n_chunks, tl.minimum(part * chunk + chunk, n_qb), lo + 1)
    sc = scratch_ptr + bh * 4 * GR * nb_all
    bin_p = tl.zeros((GR, CB, BINS), tl.float64)
    bin_h = tl.zeros((GR, CB, BINS), tl.float64)
    for b0 in range(lo, hi, CB):
        blocks = b0 + tl.arange(0, CB)
        at = gi[:, None] * nb_all + blocks[None, :]
        okb = (blocks < hi)[None, :]
        r_p = tl.load(sc + at, mask=okb, other=0.0)
        rho = tl.load(sc + GR * nb_all + at, mask=okb, other=0.0)
        lam = tl.load(sc + 2 * GR * nb_all + at, mask=okb, other=0.0)
        m_norm = tl.where(
            total[:, None] > 0, tl.load(sc + 3 * GR * nb_all + at, mask=okb, other=0.0) / norm[:, None], 0.0
        )
        bin_p += _bin(r_p + lam, m_norm, rm_p, extra, ratio, BINS)
        bin_h += _bin(rho + lam, m_norm, rm_h, extra, ratio, BINS)
    at = ((bh * n_parts + part) * EDGE_SETS * GR + gi[:, None]) * BINS + tl.arange(0, BINS)[None, :]
    tl.store(bins_ptr + at, tl.sum(bin_p, 1))
    tl.store(bins_ptr + at + GR * BINS, tl.sum(bin_h, 1))


@triton.jit
def _in_sums(x, below, above):
    """[i, j]: x summed over the bins below i (``below`` [IB, BINS]) and above j (``above`` [BINS, BINS])."""
    return tl.sum(tl.where(below, x[None, :], 0.0), 1)[:, None] + tl.sum(tl.where(above, x[None, :], 0.0), 1)[None, :]


@triton.jit(do_not_specialize=["nb_all", "n_parts"])
def _edges_kernel(
    c_ptr, s_ptr, bins_ptr, edge_ptr, nb_all, n_parts,
    GR: tl.constexpr, BINS: tl.constexpr, IB: tl.constexpr,
):  # fmt: skip
    """The divisible problem's maximum over the edges of the greedy's vertices (``certkv.tv._edges_max``)
    for one query row and radius set, vertices (i, j) with i among the program's IB bins: bins below i
    and above j in, i..j out; the edges move bin i or bin j in. Every sum is of non-negative terms (the
    out-ranges by a scan along j, not by differences)."""
    bh, gi = _row_program(GR, 1)
    which = tl.program_id(1)
    i0 = tl.program_id(2) * IB
    k = tl.arange(0, BINS)
    red = tl.load(s_ptr + _summary_at(bh, gi, GR))
    _, _, _, rm_p, rm_h, _, _ = _radius_sets(red, c_ptr, nb_all, NSUM, BINS)
    rm = tl.sum(tl.where(which == 0, rm_p, rm_h), 0)
    mass = tl.zeros((BINS,), tl.float64)
    PC: tl.constexpr = 8
    for c0 in range(0, n_parts, PC):
        c = (c0 + tl.arange(0, PC))[:, None]
        at = (((bh * n_parts + c) * EDGE_SETS + which) * GR + tl.sum(gi, 0)) * BINS + k[None, :]
        mass += tl.sum(tl.load(bins_ptr + at, mask=c < n_parts, other=0.0), 0)
    rad = rm * tl.load(c_ptr + C_RATIO + k)
    a, b = mass * tl.exp(rad), mass * tl.exp(-rad)
    i = i0 + tl.arange(0, IB)
    pick = i[:, None] == k[None, :]  # [IB, BINS]: bin i, by a one-hot sum (exact)
    a_i, b_i = tl.sum(tl.where(pick, a[None, :], 0.0), 1), tl.sum(tl.where(pick, b[None, :], 0.0), 1)
    m_i = tl.sum(tl.where(pick, mass[None, :], 0.0), 1)
    b_prev = tl.sum(tl.where(k[:, None] == k[None, :] + 1, b[None, :], 0.0), 1)  # b of bin k - 1 (0 at k = 0)
    below = k[None, :] < i[:, None]  # [IB, BINS]: bins below i
    above = k[None, :] > k[:, None]  # [j, k]: bins above j
    a0 = _in_sums(a, below, above)
    m0 = _in_sums(mass, below, above)
    # [i, j]: sum of b over i < k <= j (bin i moves) and over i <= k < j (bin j moves)
    past_i = k[None, :] > i[:, None]
    out_i = tl.cumsum(tl.where(past_i, b[None, :], 0.0), 1)
    out_j = tl.cumsum(tl.where(past_i, b_prev[None, :], 0.0), 1)
    moved_i = _edge_bound(a0, out_i, m0, a_i[:, None], b_i[:, None], m_i[:, None])
    moved_j = _edge_bound(a0, out_j, m0, a[None, :], b[None, :], mass[None, :])
    best = tl.where(k[None, :] >= i[:, None], tl.maximum(moved_i, moved_j), -float("inf"))
    at = ((bh * EDGE_SETS + which) * (BINS // IB) + tl.program_id(2)) * GR + gi
    tl.store(edge_ptr + at, tl.max(tl.max(best, 1), 0))


@triton.jit
def _tv(edge_ptr, c_ptr, bh, which, r_max, rm, total, gi, GR: tl.constexpr, NG: tl.constexpr):
    """``certkv.tv.tv_bound(..., divisible=True)``: min(tanh bound, edge maximum + float64 slack)."""
    group = tl.arange(0, NG)[:, None]
    edge_max = tl.max(tl.load(edge_ptr + ((bh * EDGE_SETS + which) * NG + group) * GR + gi[None, :]), 0)
    base = _tanh_up(r_max, tl.load(c_ptr + C_U64))
    slack = tl.load(c_ptr + C_SLACK) * tl.exp(2.0 * rm) + 2.0**-45
    use = (r_max <= tl.load(c_ptr + C_RELAX)) & (total > 0)
    return tl.minimum(tl.where(use, tl.minimum(base, tl.maximum(edge_max, 0.0) + slack), base), 1.0)


@triton.jit(do_not_specialize=["n_quant", "n_exact", "n_splits", "nb_split", "nb_all", "n_parts"])
def _final_kernel(
    m_ptr, l_ptr, acc_ptr, resc_ptr, vmin_ptr, vmax_ptr, c_ptr, p_ptr, edge_ptr, out_ptr, fields_ptr, count_ptr,
    accepted_ptr,
    n_quant, n_exact, n_splits, nb_split, nb_all, n_parts,
    G: tl.constexpr, GR: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr,
    BINS: tl.constexpr, NG: tl.constexpr, NSTAT: tl.constexpr, NS2: tl.constexpr,
    N_FIELDS: tl.constexpr, NCOUNT: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    bh, gi = _row_program(GR, R)
    NVG: tl.constexpr = D // 64
    row = gi < G
    d = tl.arange(0, D)
    u64 = tl.load(c_ptr + C_U64)

    # ---- the splits merged in float64: y = acc / l over exact weights 2^(m_s - top) ----
    top = _top(m_ptr, bh, n_splits, gi, row, GP)
    n_resc = tl.zeros((R,), tl.int32)
    acc = tl.zeros((R, D), tl.float64)
    l_sum = tl.zeros((R,), tl.float64)
    SC: tl.constexpr = 32 // R
    for s0 in range(0, n_splits + 1, SC):
        s = s0 + tl.arange(0, SC)
        ok = (s <= n_splits)[:, None] & row[None, :]
        at = (bh * (n_splits + 1) + s[:, None]) * GP + gi[None, :]  # [SC, R]
        n_resc = tl.maximum(n_resc, tl.max(tl.load(resc_ptr + at, mask=ok, other=0), 0))
        m_s = tl.load(m_ptr + at, mask=ok, other=-float("inf")).to(tl.float64)
        w = tl.where(m_s == -float("inf"), 0.0, tl.exp2(m_s - top[None, :]))
        part = tl.load(acc_ptr + at[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0)
        acc += tl.sum(w[:, :, None] * part, 0)
        l_sum += tl.sum(w * tl.load(l_ptr + at, mask=ok, other=0.0), 0)
    y = acc / l_sum[:, None]
    out = _round_out(y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + (bh * G + gi[:, None]) * D + d[None, :], out, mask=row[:, None])
    cast = tl.abs(out.to(tl.float64) - y)

    # ---- the parts' statistics, the three TV bounds ----
    red = _reduce_parts(p_ptr, bh, n_parts, gi, NSTAT, NS2, NVG, GR, R)
    rp_max, rh_max, eps_max = _slot(red, S_RP, NS2), _slot(red, S_RH, NS2), _slot(red, S_EPS, NS2)
    lam_max, vmag_max, big = _slot(red, S_LAM, NS2), _slot(red, S_VMAG, NS2), _slot(red, S_BIG, NS2)
    infl_nb = _inflate(nb_all, u64)
    dust = _slot(red, S_DUST, NS2) * infl_nb
    s_w = _slot(red, S_SW, NS2) * infl_nb
    w_eta = _slots(red, S_VEC, NS2, NVG) * infl_nb
    eta_hi = _slots(red, S_VEC + NVG, NS2, NVG)
    eta_lo = _slots(red, S_VEC + 2 * NVG, NS2, NVG)
    eta_lo = tl.where((n_exact > 0) | (n_quant == 0), 0.0, eta_lo)  # exact tokens carry no value error
    rmax_p, rmax_h, rmax_0, rm_p, rm_h, _, total = _radius_sets(red, c_ptr, nb_all, NS2, BINS)
    tv_p = _tv(edge_ptr, c_ptr, bh, 0, rmax_p, rm_p, total, gi, GR, NG)
    tv_h = _tv(edge_ptr, c_ptr, bh, 1, rmax_h, rm_h, total, gi, GR, NG)
    tv_0 = tl.minimum(_tanh_up(rmax_0, u64), 1.0)  # EDGE_SETS: p~'s divisible bound is its tanh bound

    # ---- the terms: TV forms, the kernel's rounding, per channel; then the fields ----
    dust_max = tl.load(c_ptr + C_DUSTMAX)
    grow_p = tl.where(rp_max <= dust_max, tl.exp(2.0 * rp_max), float("inf"))
    grow_h = tl.where(rh_max <= dust_max, tl.exp(2.0 * rh_max), float("inf"))
    tv_pi = tl.minimum(tv_p + grow_p * dust, 1.0)
    tv_key = tl.minimum(tl.minimum(_tanh_up(eps_max, u64), tv_p + tv_h + (grow_p + grow_h) * dust), 1.0)
    tv_hat = tl.minimum(tl.minimum(_tanh_up(rh_max, u64), tv_0 + tv_h + (1.0 + grow_h) * dust), 1.0)
    tv_direct = tl.minimum(tl.minimum(_tanh_up(rp_max, u64), tv_p + tv_0 + (grow_p + 1.0) * dust), 1.0)
    tv_tilde = tl.minimum(tv_0 + dust, 1.0)

    # the kernel's weights against exact ones: K rescales, nb blocks per split (product_error: y e^y)
    k_f = (n_resc + 1).to(tl.float64)
    y_k = k_f * tl.load(c_ptr + C_L1A)
    alpha_k = y_k * tl.exp(y_k) * (1.0 + 2.0**-40)
    l1ab = tl.load(c_ptr + C_L1AB)
    beta_k = k_f * tl.load(c_ptr + C_BETA1) * tl.exp((k_f - 1.0) * l1ab) * (1.0 + 2.0**-40)
    dot_u, u32 = tl.load(c_ptr + C_DOTU), tl.load(c_ptr + C_U32)
    comb = _gamma(2 * n_splits + 8, u64)
    g_sum = _gamma(BLK + 2 * nb_split + 8, u32)
    g_acc = _gamma(BLK + 2 * nb_split + 8, dot_u)
    n_f = (n_quant + n_exact) * tl.full((R,), 1.0, tl.float64)
    c_l = (1.0 + alpha_k) * (1.0 + g_sum) * (1.0 + comb) - 1.0
    l_w = (l_sum + n_f * beta_k) * tl.load(c_ptr + C_INF4) / (1.0 - c_l)
    err_l = c_l * l_w + n_f * beta_k * (1.0 + comb)
    v_rel, a_abs, p_rel = tl.load(c_ptr + C_VREL), tl.load(c_ptr + C_ABS), tl.load(c_ptr + C_PREL)
    v_used = s_w * (1.0 + v_rel) + a_abs * l_w
    c_n = (1.0 + p_rel) * (1.0 + alpha_k) * (1.0 + g_acc) * (1.0 + comb) - 1.0
    weight_abs = (1.0 + p_rel) * beta_k + tl.load(c_ptr + C_PABS) * tl.exp(n_resc.to(tl.float64) * l1ab)
    weight_abs = weight_abs * (1.0 + g_acc)
    err_n = c_n * v_used + v_rel * s_w + a_abs * l_w + n_f * weight_abs * (vmag_max * (1.0 + v_rel) + a_abs)
    err_n = err_n * (1.0 + 2.0**-40)
    # certkv.rounding.quotient_bound: the error of l divides by L >= max(1, l - err_l) as well
    e_rel = err_l / tl.maximum(l_sum - err_l, 1.0)
    quotient = (err_n[:, None] + (tl.abs(acc) + err_n[:, None]) * e_rel[:, None]) / l_sum[:, None]
    division = 2.0 * u64 * tl.abs(y)

    live_sum = total / (1.0 + _gamma(nb_all, u64))
    pi_eta = w_eta * tl.exp(lam_max)[:, None] * (1.0 + 4.0 * u64) / live_sum[:, None]
    pi_eta = tl.where(live_sum[:, None] > 0, pi_eta, eta_hi)
    # per channel j: its value group j // 64
    pi_eta_j = tl.reshape(tl.broadcast_to(pi_eta[:, :, None], (R, NVG, 64)), (R, D))
    eta_max = tl.reshape(tl.broadcast_to(eta_hi[:, :, None], (R, NVG, 64)), (R, D))
    eta_min = tl.reshape(tl.broadcast_to(eta_lo[:, :, None], (R, NVG, 64)), (R, D))
    v_range = (tl.load(vmax_ptr + bh * D + d).to(tl.float64) - tl.load(vmin_ptr + bh * D + d).to(tl.float64))[None, :]
    key_j = tv_key[:, None] * v_range
    value_j = pi_eta_j + tv_pi[:, None] * (eta_max - eta_min)
    cross_j = tv_key[:, None] * 2.0 * eta_max
    round_j = (cast + division + quotient + tv_hat[:, None] * (v_range + 2.0 * eta_max)) * (1.0 + 2.0**-40)
    direct_j = (
        cast + division + quotient + tv_direct[:, None] * v_range + pi_eta_j + tv_tilde[:, None] * (eta_max - eta_min)
    ) * (1.0 + 2.0**-40)
    total_j = tl.minimum((key_j + value_j + cross_j + round_j) * (1.0 + 2.0**-40), direct_j)

    # operands that would overflow the precision, or a non-finite result: nothing is certified
    limit = tl.load(c_ptr + C_LIMIT)
    too_big = (big > limit).to(tl.int32) + (vmag_max * (1.0 + v_rel) > limit).to(tl.int32)
    bad_y = tl.sum(((tl.abs(y) == float("inf")) | (y != y)).to(tl.int32), 1)
    bad_t = tl.sum(((tl.abs(total_j) == float("inf")) | (total_j != total_j)).to(tl.int32), 1)
    broken = (too_big + bad_y + bad_t + (l_sum > 0).to(tl.int32)) != 1
    inf = float("inf")
    f = fields_ptr + (bh * G + gi) * (N_FIELDS + 1)
    tl.store(f + 0, tl.where(broken, inf, tv_key), mask=row)
    tl.store(f + 1, tl.where(broken, inf, tl.max(key_j, 1)), mask=row)
    tl.store(f + 2, tl.where(broken, inf, tl.max(value_j, 1)), mask=row)
    tl.store(f + 3, tl.where(broken, inf, tl.max(cross_j, 1)), mask=row)
    tl.store(f + 4, tl.where(broken, inf, tl.max(round_j, 1)), mask=row)
    tl.store(f + 5, tl.where(broken, inf, tl.max(total_j, 1)), mask=row)
    tl.store(f + 6, _tanh_up(rp_max, u64), mask=row)
    tl.store(f + 7, rp_max, mask=row)
    # the certificate's other fields at stage 0: tolerance 0 (the last slot), counts 0, not accepted
    tl.store(f + N_FIELDS, tl.zeros((R,), tl.float64), mask=row)
    for i in tl.static_range(NCOUNT):
        tl.store(count_ptr + (bh * G + gi) * NCOUNT + i, tl.zeros((R,), tl.int64), mask=row)
    tl.store(accepted_ptr + bh * G + gi, tl.zeros((R,), tl.int1), mask=row)


def chunks_for(batch_heads: int, n_blocks: int, per: int, target_programs: int, least: int, most_parts: int) -> int:
    """Quantized blocks per program of the block passes: about ``target_programs`` in all, a multiple
    of ``per``, at least ``least`` (itself a multiple of ``per``) and few enough that each of the
    ``batch_heads`` (row, head)s' ``n_blocks`` make at most ``most_parts`` programs."""
    want = max(-(-n_blocks * batch_heads // target_programs), -(-n_blocks // most_parts))
    return max(least, -(-want // per) * per)


def certify(
    q: torch.Tensor,
    t1: Tier1,
    partials: Partials,
    scale: float,
    precision: str,
    v_min: torch.Tensor,
    v_max: torch.Tensor,
    out_dtype: torch.dtype,
    deq16: bool = False,
) -> tuple[torch.Tensor, streaming.Certificate]:
    """``certkv.streaming.certify`` in five launches: the output [B, H, G, D] in ``out_dtype`` and its
    certificate (fields [B, H, G]), with the same guarantee (output_bound >= max_j |output_j - o_j|)."""
    ar = streaming.arithmetic(q, t1, precision, deq16)
    p = partials
    assert p.bmass is not None and p.bframe is not None and p.resc is not None
    b, h, g, d = q.shape
    bh = b * h
    n_quant = t1.kc.shape[2]
    empty = t1.sink_k[:, :, :0]
    segments = t1.exact_segments() + [(empty, empty)] * (3 - len(t1.exact_segments()))
    counts = [sk.shape[2] for sk, _ in segments]
    blk = p.block
    nb_all = p.bmass.shape[1]
    assert nb_all == block_count(n_quant, tuple(counts), blk) and d % VALUE_GROUP == 0
    nb_split = max(p.chunk // blk, block_count(0, tuple(counts), blk), 1)
    chunk = chunks_for(bh, n_quant // blk, STEP["blocks"], PROGRAMS["blocks"], CHUNK_LEAST, MOST_PARTS)
    n_chunks = -(-(n_quant // blk) // chunk)
    n_parts = n_chunks + nb_all - n_quant // blk  # the quantized chunks, then one part per exact block
    gr = triton.next_power_of_2(g)
    nstat = 11 + 3 * (d // VALUE_GROUP)
    dev = q.device
    f64 = dict(dtype=torch.float64, device=dev)
    out = torch.empty(b, h, g, d, dtype=out_dtype, device=dev)
    fields = torch.empty(bh, g, N_FIELDS + 1, **f64)  # type: ignore[arg-type]
    stage0_ints = torch.empty(bh, g, len(streaming.STAGE0_COUNTS), dtype=torch.int64, device=dev)
    accepted = torch.empty(bh, g, dtype=torch.bool, device=dev)
    scratch = torch.empty(bh, 4, gr, max(nb_all, 1), **f64)  # type: ignore[arg-type]
    stats = torch.empty(bh, n_parts, nstat, gr, **f64)  # type: ignore[arg-type]
    summary = torch.empty(bh, NSUM, gr, **f64)  # type: ignore[arg-type]
    bins = torch.empty(bh, n_parts, EDGE_SETS, gr, BINS, **f64)  # type: ignore[arg-type]
    edge = torch.empty(bh, EDGE_SETS, BINS // EDGE_BINS, gr, **f64)  # type: ignore[arg-type]
    consts = _constants(dev, ar, float(scale), d, blk)
    etok = min(STEP["tokens"], blk)  # exact tokens per program of the scales pass
    esub = blk // etok  # exact chunks (scales-pass programs) per exact block
    n_eparts = (nb_all - n_quant // blk) * esub
    nqs = stat_slots(gr, d)
    qstat = torch.empty(bh, n_quant // blk, nqs, **f64)  # type: ignore[arg-type]
    erec = torch.empty(bh, n_eparts, gr + 2, **f64)  # type: ignore[arg-type]
    if n_quant // KEY_GROUP + n_eparts:
        launcher(_scales_kernel)[(bh, n_quant // KEY_GROUP + n_eparts)](
            q.contiguous(), t1.ks, t1.kz, t1.vs, t1.vz, *(x.contiguous() for seg in segments for x in seg),
            consts, qstat, erec, n_quant, *counts,
            G=g, GR=gr, D=d, BLK=blk, ETOK=etok, ESUB=esub, NQS=nqs, QROUND=ar.rounds_inputs,
            num_warps=WARPS["scales"], **EXACT_OPS,
        )  # fmt: skip
    launcher(_blocks_kernel)[(bh, n_parts)](
        qstat, erec, p.m, p.bmass, p.bframe, consts, scratch, stats,
        n_quant, p.splits, nb_all, chunk, n_chunks, n_parts,
        G=g, GR=gr, GP=p.m.shape[-1], D=d, BLK=blk, CB=STEP["blocks"], ESUB=esub, NQS=nqs,
        NSTAT=nstat, QROUND=ar.rounds_inputs, num_warps=WARPS["blocks"], **EXACT_OPS,
    )  # fmt: skip
    launcher(_bins_kernel)[(bh, n_parts)](
        consts, scratch, stats, summary, bins, n_quant, nb_all, chunk, n_chunks, n_parts,
        GR=gr, BLK=blk, CB=STEP["bins"], BINS=BINS, NSTAT=nstat, NVG=d // 64, num_warps=WARPS["bins"],
        **EXACT_OPS,
    )  # fmt: skip
    launcher(_edges_kernel)[(bh * gr, EDGE_SETS, BINS // EDGE_BINS)](
        consts, summary, bins, edge, nb_all, n_parts,
        GR=gr, BINS=BINS, IB=EDGE_BINS, num_warps=WARPS["edges"], **EXACT_OPS,
    )  # fmt: skip
    final_rows = min(FINAL_ROWS, gr)
    launcher(_final_kernel)[(bh * (gr // final_rows),)](
        p.m, p.l, p.acc, p.resc, v_min.contiguous(), v_max.contiguous(), consts, stats, edge, out, fields, stage0_ints,
        accepted,
        n_quant, sum(counts), p.splits, nb_split, nb_all, n_parts,
        G=g, GR=gr, GP=p.m.shape[-1], D=d, BLK=blk, BINS=BINS, NG=BINS // EDGE_BINS, NSTAT=nstat,
        NS2=triton.next_power_of_2(nstat), N_FIELDS=N_FIELDS, NCOUNT=stage0_ints.shape[-1], R=final_rows,
        num_warps=WARPS["final"],
        **EXACT_OPS,
    )  # fmt: skip
    bounds = {name: fields[..., i].reshape(b, h, g) for i, name in enumerate(streaming.BOUND_FIELDS)}
    zeros = {name: stage0_ints[..., i].reshape(b, h, g) for i, name in enumerate(streaming.STAGE0_COUNTS)}
    zeros |= {"tolerance": fields[..., N_FIELDS].reshape(b, h, g), "accepted": accepted.reshape(b, h, g)}
    return out, streaming.stage0_certificate(bounds, zeros)
