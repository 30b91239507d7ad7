"""One decode step of attention over a mix of quantized and exact tokens, and its certificate.

The computation (binary32, the order the Triton kernel follows):
    z = fl(fl(q . k_i) * s);  m = max_i z_i;  e_i = exp(z_i - m);  l = sum e_i;  acc = sum e_i v_i;
    y = acc / l;  output = cast(y)
and, beside it, the bound of each term of  output - o  (docs/theory.md derives every line):

    output - o = [output - sum p_hat v_hat]   rounding term
               + sum (p_hat - p) v            key term      <= TV(p, p_hat) * range(v), or a per-token form
               + sum p (v_hat - v)            value term    <= sum pi eta + TV(p, pi) * range(eta)
               + sum (p_hat - p)(v_hat - v)   cross term    <= TV(p, p_hat) * 2 max eta

with logit radii eps_i = s * sum_j |q_j| r_ij (quantizer radii r) plus rho_i, the binary32 rounding of
the logit, and TV bounded by ``certkv.tv.tv_bound`` from the computed weights. Everything is computed
from Tier-1 data and q alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from certkv.certificate import Certificate
from certkv.rounding import EXP_ABS, EXP_REL, U32, U64, gamma, inflate, quotient_bound
from certkv.tv import tanh_bound, tv_bound

# Tokens whose weight is below e^-TAIL_GAP of the largest are bounded as a block (float64 exp would
# underflow): their mass under p and p_hat is at most n_tail * e^(-TAIL_GAP + 2 R_max).
TAIL_GAP = 690.0
PER_TOKEN_MAX = 30.0
# tokens per block of the served computation's two-level sums (``_served``)
SUM_BLOCK = 256
# the served computation's version: its bits changed with the blocked sums (2); traces record it, and an
# audit compares stage-3 outputs bit for bit only against the version that served them
DENSE_PATH = 2


@dataclass
class StepTokens:
    """All tokens of one layer as one step sees them, in cache order, KV heads unexpanded.

    k, v: binary32 [B, Hkv, n, D], the values the computation uses (dequantized or exact).
    k_radius, v_radius: binary32 [B, Hkv, n, D], upper bounds on |used-exact dequantized - original|
    (0 for exact tokens). k_mag: float64 [B, Hkv, n, D] >= |c*s| + |z| (>= |k| for exact tokens):
    bounds the exact and binary32 key values and the dequantization error (times DEQUANT_REL).
    v_mag: float64 [B, Hkv, n] >= max_j of |v_hat_ij| and |v_ij used|; v_dq: float64 [B, Hkv, n]
    >= max_j |binary32 dequantized - exact dequantized| (0 for exact tokens).
    v_min, v_max: binary32 [B, Hkv, D], the exact range of the originals over all tokens.
    kb_radius, dual: keys quantized in another basis (``certkv.transforms``): float64 [B, Hkv, n, D]
    radii paired with ``dual(q)``, so that |q . (k_used - k)| <= |q| . k_radius + dual(q) . kb_radius
    (``k`` then holds the binary32 keys rotated back, and k_radius the rounding of that rotation).
    """

    k: torch.Tensor
    k_radius: torch.Tensor
    k_mag: torch.Tensor
    v: torch.Tensor
    v_radius: torch.Tensor
    v_mag: torch.Tensor
    v_dq: torch.Tensor
    v_min: torch.Tensor
    v_max: torch.Tensor
    kb_radius: torch.Tensor | None = None
    dual: Callable[[torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def exact(k: torch.Tensor, v: torch.Tensor) -> StepTokens:
        """Tokens known exactly (FP16/BF16 originals): zero radii."""
        kf, vf = k.float(), v.float()
        zeros = torch.zeros_like(kf)
        return StepTokens(
            k=kf,
            k_radius=zeros,
            k_mag=kf.double().abs(),
            v=vf,
            v_radius=torch.zeros_like(vf),
            v_mag=vf.double().abs().amax(-1),
            v_dq=torch.zeros(vf.shape[:-1], dtype=torch.float64, device=vf.device),
            v_min=vf.amin(2),
            v_max=vf.amax(2),
        )

    def with_exact(
        self,
        rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> StepTokens:
        """A copy with the (batch, kv head, token) ``rows`` served from exact originals: keys ``k`` and/or
        values ``v`` ([m, D], 16-bit) replace the quantized rows, and their radii become zero."""
        b, h, i = rows
        out = replace(self)
        if k is not None:
            kf = k.float()
            out.k, out.k_radius, out.k_mag = self.k.clone(), self.k_radius.clone(), self.k_mag.clone()
            out.k[b, h, i], out.k_radius[b, h, i], out.k_mag[b, h, i] = kf, 0.0, kf.double().abs()
            if self.kb_radius is not None:
                out.kb_radius = self.kb_radius.clone()
                out.kb_radius[b, h, i] = 0.0
        if v is not None:
            vf = v.float()
            out.v, out.v_radius, out.v_mag, out.v_dq = (
                self.v.clone(),
                self.v_radius.clone(),
                self.v_mag.clone(),
                self.v_dq.clone(),
            )
            out.v[b, h, i], out.v_radius[b, h, i] = vf, 0.0
            out.v_mag[b, h, i], out.v_dq[b, h, i] = vf.double().abs().amax(-1), 0.0
        return out


@dataclass
class StepDetail:
    """Per-token quantities the ladder needs to pick tokens: weights pi [B, Hkv, G, n] (float64,
    normalised), logit radii eps + rho [B, Hkv, G, n], and the per-token value radius max_j eta_ij."""

    weights: torch.Tensor
    radius: torch.Tensor
    value_radius: torch.Tensor


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


@contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """The rounding model assumes binary32 accumulation: no TF32 or bf16 passes inside matmul."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass
class _Served:
    """The served computation's intermediates, binary32: logits z, their maximum, weights e, their sum,
    the weighted sum acc, y = acc / l_sum, and the output (y in the output dtype)."""

    z: torch.Tensor
    zmax: torch.Tensor
    e: torch.Tensor
    l_sum: torch.Tensor
    acc: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor


def sum_chain(n: int) -> int:
    """The most binary32 additions any term of ``_served``'s sums passes through: within its block of
    ``SUM_BLOCK`` tokens, then across the blocks; gamma of it bounds those sums in any order."""
    return min(n, SUM_BLOCK) + -(-n // SUM_BLOCK)


def _served(q32: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s32: torch.Tensor, out_dtype: torch.dtype) -> _Served:
    """The served computation (binary32, the order the module docstring gives), one function for the
    certified step and the dense path alone, so that the two agree bit for bit. The weights and the
    weighted values are summed over blocks of ``SUM_BLOCK`` tokens and then across the blocks (zeros
    pad the last block: adding them is exact), so that each sum's error is gamma(``sum_chain(n)``), not
    gamma(n): a 4K-token sum 15x and a 128K one 170x tighter."""
    z = torch.matmul(q32, k.transpose(-1, -2)) * s32  # [B, Hkv, G, n]
    zmax = z.amax(-1, keepdim=True)
    e = torch.exp(z - zmax)
    n = e.shape[-1]
    nb = -(-n // SUM_BLOCK)
    e_b = torch.nn.functional.pad(e, (0, nb * SUM_BLOCK - n)).unflatten(-1, (nb, SUM_BLOCK))  # [B, Hkv, G, nb, S]
    v_b = torch.nn.functional.pad(v, (0, 0, 0, nb * SUM_BLOCK - n)).unflatten(-2, (nb, SUM_BLOCK))  # [B, Hkv, nb, S, D]
    l_sum = e_b.sum(-1).sum(-1, keepdim=True)
    acc = torch.matmul(e_b.transpose(-3, -2), v_b).sum(-3)  # [B, Hkv, nb, G, D] summed over the blocks
    y = acc / l_sum
    return _Served(z, zmax, e, l_sum, acc, y, y.to(out_dtype))


def served_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """What ``certified_step`` over exact tokens serves, without its certificate: q [B, Hkv, G, D] over
    the originals k, v [B, Hkv, n, D] (16-bit), the output [B, Hkv, G, D] in ``out_dtype``, bit for bit
    ``certified_step(q, StepTokens.exact(k, v), scale, out_dtype)[0]``."""
    with _full_fp32_matmul():
        s32 = torch.tensor(scale, dtype=torch.float32)
        return _served(q.float(), k.float(), v.float(), s32, out_dtype).out


def certified_step(
    q: torch.Tensor, tokens: StepTokens, scale: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, Certificate, StepDetail]:
    """Attention of q [B, Hkv, G, D] (binary32, exact copies of 16-bit queries) over ``tokens``.

    Returns the output [B, Hkv, G, D] in ``out_dtype``, the certificate (fields [B, Hkv, G]; stage 0,
    tolerance fields unset) and the per-token detail for the ladder. ``scale`` is taken as an exact
    real number (the default 1/sqrt(D) is irrational; its binary32 rounding is in the rounding term).
    """
    with _full_fp32_matmul():
        return _certified_step(q, tokens, scale, out_dtype)


def _certified_step(
    q: torch.Tensor, tokens: StepTokens, scale: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, Certificate, StepDetail]:
    """The step itself; see ``certified_step``."""
    d = q.shape[-1]
    n = tokens.k.shape[2]
    s32 = torch.tensor(scale, dtype=torch.float32)
    s_up = float(s32) * (1 + 2 * U32)  # >= the exact scale, whichever of the two was rounded
    q32 = q.float()
    absq = q32.abs()
    served = _served(q32, tokens.k, tokens.v, s32, out_dtype)
    z, zmax, e, l_sum, acc, y, out = served.z, served.zmax, served.e, served.l_sum, served.acc, served.y, served.out

    # ---- logit radii: quantization (eps) and binary32 rounding of the logit (rho) ----
    eps = s_up * torch.matmul(absq.double(), tokens.k_radius.double().transpose(-1, -2)) * inflate(d)
    if tokens.kb_radius is not None and tokens.dual is not None:
        # keys quantized in another basis: the pairing term, and 2 u64 for the float64 addition
        basis = s_up * torch.matmul(tokens.dual(q32), tokens.kb_radius.transpose(-1, -2)) * inflate(d)
        eps = (eps + basis) * (1 + 2 * U64)
    qa = torch.matmul(absq.double(), tokens.k_mag.transpose(-1, -2)) * inflate(d)
    rho = s_up * gamma(d + 5) * qa
    z64, zmax64 = z.double(), zmax.double()
    gap = zmax64 - z64  # exact in float64 up to 2^-53 relative
    tail = gap > TAIL_GAP
    mass = torch.where(tail, torch.zeros_like(gap), torch.exp(-gap))
    # float64 exp and subtraction: relative error of each mass taken as a logit radius
    eta64 = 4 * U64 * (1 + gap)
    r_p = eps + rho + eta64  # p relative to the computed float64 weights pi
    r_hat = rho + eta64  # p_hat relative to pi
    lead = mass.shape[:-1]
    flat = (-1, n)
    # both radius sets in one call: tv_bound is row by row, and half the launches of two calls
    both = tv_bound(mass.reshape(flat).repeat(2, 1), torch.cat([r_p.reshape(flat), r_hat.reshape(flat)]))
    tv_p, tv_h = both.reshape(2, *lead)
    n_tail = tail.sum(-1).double()
    r_max = r_p.amax(-1)
    tail_mass = 2 * n_tail * torch.exp((-TAIL_GAP + 2 * r_max).clamp(max=0.0))
    tv_pp = (tv_p + tail_mass).clamp(max=1.0)  # TV(p, pi)
    tv = (tv_p + tv_h + 2 * tail_mass).clamp(max=1.0)  # TV(p, p_hat) <= TV(p, pi) + TV(pi, p_hat)
    pi = mass / mass.sum(-1, keepdim=True)

    # ---- the three terms, per output coordinate j: min of a TV form and a per-token form ----
    v_range = (tokens.v_max.double() - tokens.v_min.double()).unsqueeze(2)  # [B, Hkv, 1, D]
    eta = tokens.v_radius.double()
    eta_max = eta.amax(2).unsqueeze(2)
    eta_min = eta.amin(2).unsqueeze(2)
    # |p_i - pi_i| <= pi_i g_p,i and |p_hat_i - pi_i| <= pi_i g_h,i (per-token ratio bounds)
    # beyond radius PER_TOKEN_MAX the per-token form is useless (and e^R overflows): TV form only
    per_token = (r_max <= PER_TOKEN_MAX).unsqueeze(-1)
    ratios = [_ratios(pi, r.clamp(max=PER_TOKEN_MAX)) for r in (r_p, r_hat)]  # p, then p_hat, relative to pi
    g_p, g_h = (_ratio_excess(r) for r in ratios)
    spread = pi * (g_p + g_h)  # >= |p_hat_i - p_i|
    centre = y.double()  # any centre is sound (the weight differences sum to zero); the output is close
    # sum_i w_i (|v_used - c| + eta + dq) for w = spread, pi (e^R_p - 1), pi (e^R_h - 1) and pi; sum pi (v_used - c)
    weights = torch.stack([spread, ratios[0].pi_up, ratios[1].pi_up, pi])
    (deviation, *centred_devs, pi_dev), signed = _weighted_deviation(weights, tokens, centre)
    far = torch.maximum(tokens.v_max.double().unsqueeze(2) - centre, centre - tokens.v_min.double().unsqueeze(2))
    tail_key = 2 * tail_mass.unsqueeze(-1) * far
    pi_eta = torch.matmul(pi, eta)
    # >= |sum pibar (v - c)|, pibar = pi normalised exactly: the signed sum's rounding, then v_used vs v
    shift = signed.abs() + gamma(n + 4, U64) * pi_dev + pi_eta + (pi * tokens.v_dq.unsqueeze(2)).sum(-1, keepdim=True)
    # >= |sum (p - pibar)(v - c)| + |sum (p_hat - pibar)(v - c)| >= |sum (p_hat - p) v|
    centred = (_centred(ratios[0], centred_devs[0], shift) + _centred(ratios[1], centred_devs[1], shift)) * (
        1 + 2 * U64
    )
    key_tok = torch.minimum(deviation * inflate(n), centred) + tail_key
    key_tv, value_tv, cross_tv = tv_terms(
        tv.unsqueeze(-1), tv_pp.unsqueeze(-1), v_range, pi_eta * inflate(n), eta_max, eta_min
    )
    key_j = torch.where(per_token, torch.minimum(key_tv, key_tok), key_tv)
    value_tok = torch.matmul(pi * (1 + g_p), eta) * inflate(n) + tail_mass.unsqueeze(-1) * eta_max
    value_j = torch.where(per_token, torch.minimum(value_tv, value_tok), value_tv)
    cross_tok = torch.matmul(spread, eta) * inflate(n) + 2 * tail_mass.unsqueeze(-1) * eta_max
    cross_j = torch.where(per_token, torch.minimum(cross_tv, cross_tok), cross_tv)

    # ---- rounding: |output - sum p_hat v_hat| ----
    alpha = EXP_REL + 1.01 * U32 * gap.clamp(max=110.0).amax(-1)  # [B, Hkv, G]
    beta = EXP_ABS
    e64 = e.double()
    gn = gamma(sum_chain(n))  # the blocked sums of l and acc (``_served``)
    s1 = (e64 * tokens.v_mag.unsqueeze(2)).sum(-1) * inflate(n)
    s_dq = (e64 * tokens.v_dq.unsqueeze(2)).sum(-1) * inflate(n)
    s_a = tokens.v_mag.sum(-1).unsqueeze(2) * inflate(n)
    s_m = e64.sum(-1) * inflate(n)
    s_w = (s1 + beta * s_a) / (1 - alpha)  # >= sum w_i v_mag_i, w = exact exp(z - m)
    l_w = (s_m + n * beta) / (1 - alpha)  # >= sum w_i
    err_num = gn * s1 + s_dq + alpha * s_w + beta * s_a
    err_den = gn * s_m + alpha * l_w + n * beta
    l64 = l_sum.double()  # >= 1: the largest token contributes exp(0) = 1
    y64 = y.double()
    quotient = quotient_bound(acc.double().abs(), err_num.unsqueeze(-1), err_den.unsqueeze(-1), l64)
    division = 1.01 * U32 * y64.abs()
    cast = (out.double() - y64).abs()
    # p_hat vs the exact softmax of the computed logits: TV <= tanh(max rho / 2)
    hat_vs_computed = tanh_bound(rho.amax(-1)).unsqueeze(-1) * (v_range + 2 * eta_max)
    round_j = (cast + division + quotient + hat_vs_computed) * (1 + 2.0**-40)

    total_j = (key_j + value_j + cross_j + round_j) * (1 + 2.0**-40)
    zeros = torch.zeros_like(tv)
    cert = Certificate(
        tv_bound=tv,
        key_term=key_j.amax(-1),
        value_term=value_j.amax(-1),
        cross_term=cross_j.amax(-1),
        rounding_term=round_j.amax(-1),
        output_bound=total_j.amax(-1),
        stage=torch.zeros(tv.shape, dtype=torch.int64, device=tv.device),
        tv_tanh=tanh_bound(r_max),
        logit_radius=r_max,
        tolerance=zeros,
        accepted=torch.zeros(tv.shape, dtype=torch.bool, device=tv.device),
        fetched_values=torch.zeros(tv.shape, dtype=torch.int64, device=tv.device),
        fetched_keys=torch.zeros(tv.shape, dtype=torch.int64, device=tv.device),
    )
    detail = StepDetail(weights=pi, radius=r_p, value_radius=eta.amax(-1))
    return out, cert, detail


def tv_terms(
    tv: torch.Tensor,
    tv_pi: torch.Tensor,
    v_range: torch.Tensor,
    pi_eta: torch.Tensor,
    eta_max: torch.Tensor,
    eta_min: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The TV forms of the three terms, per output coordinate (docs/theory.md section 4; proofs/ lemma 4):

    key <= TV(p, p_hat) * range(v);  value <= sum pi eta + TV(p, pi) * (eta_max - eta_min);
    cross <= TV(p, p_hat) * 2 eta_max
    for any distribution pi (``pi_eta`` = sum_i pi_i eta_i, ``tv_pi`` >= TV(p, pi))."""
    return tv * v_range, pi_eta + tv_pi * (eta_max - eta_min), tv * 2 * eta_max


@dataclass
class _Ratios:
    """For p proportional to pi e^delta, |delta_i| <= R_i: up = e^R - 1, down = 1 - e^-R >= 0 (expm1, no
    cancellation), pi_up = pi up, and the float64 sums up_sum = sum pi up, down_sum = sum pi down (the
    per-token and centred forms both take them)."""

    up: torch.Tensor
    down: torch.Tensor
    pi_up: torch.Tensor
    up_sum: torch.Tensor
    down_sum: torch.Tensor


def _ratios(pi: torch.Tensor, radius: torch.Tensor) -> _Ratios:
    up, down = torch.expm1(radius), -torch.expm1(-radius)
    pi_up = pi * up
    return _Ratios(up, down, pi_up, pi_up.sum(-1, keepdim=True), (pi * down).sum(-1, keepdim=True))


def _ratio_excess(r: _Ratios) -> torch.Tensor:
    """g_i with |p_i - pi_i| <= pi_i g_i for every p proportional to pi e^delta, |delta| <= radius.

    p_i / pi_i = e^delta_i / S with S = sum pi e^delta in [m_lo, m_hi] = [sum pi e^-R, sum pi e^R], so
    g_i = max(e^R_i / m_lo - 1, 1 - e^-R_i / m_hi), evaluated with expm1 (no cancellation) and inflated
    for its float64 rounding."""
    m_lo = 1 - r.down_sum
    m_hi = 1 + r.up_sum
    above = (r.up + r.down_sum) / m_lo
    below = (r.up_sum + r.down) / m_hi
    n = r.up.shape[-1]
    return torch.maximum(above, below) * (1 + 8 * gamma(n + 8, U64)) + 4 * U64


TOKEN_CHUNK = 4096  # bounds the [G, chunk, D] working set of the per-token key term


def _weighted_deviation(
    weights: torch.Tensor, tokens: StepTokens, centre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each weight set w of ``weights`` [K, B, Hkv, G, n]: sum_i w_i (|v_used_ij - c_j| + eta_ij + dq_i)
    >= sum_i w_i |v_ij - c_j|, [K, B, Hkv, G, D] (as computed: sums of non-negative terms); and the
    signed sum_i w_i (v_used_ij - c_j) for the last set, [B, Hkv, G, D]."""
    total = weights.new_zeros(*weights.shape[:-1], centre.shape[-1])
    signed = torch.zeros_like(centre)
    for lo in range(0, weights.shape[-1], TOKEN_CHUNK):
        hi = lo + TOKEN_CHUNK
        diff = tokens.v[:, :, lo:hi].double().unsqueeze(2) - centre.unsqueeze(-2)  # [B, Hkv, G, c, D]
        dev = diff.abs() + tokens.v_radius[:, :, lo:hi].double().unsqueeze(2)
        dev = dev + tokens.v_dq[:, :, lo:hi].unsqueeze(2).unsqueeze(-1)
        w = weights[..., lo:hi].movedim(0, -2)  # [B, Hkv, G, K, c]
        total = total + torch.matmul(w, dev).movedim(-2, 0)
        signed = signed + torch.matmul(w[..., -1:, :], diff).squeeze(-2)
    return total, signed


def _centred(r: _Ratios, deviation: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """>= |sum_i (p_i - pibar_i)(v_ij - c_j)| for every p proportional to pi e^delta, |delta| <= radius
    (``r`` = ``_ratios(pi, radius)``), where pi are weights normalised in float64 (sum pi = 1 within
    gamma_n) and pibar = pi / sum pi exactly (docs/theory.md section 4, proofs/ lemma 12). With
    Z = sum pibar e^delta,

        sum (p - pibar)(v - c) = (sum pibar (e^delta - 1)(v - c) - (Z - 1) sum pibar (v - c)) / Z,

    |e^delta - 1| <= e^R - 1 = up, |Z - 1| <= sum pibar (e^R - 1) and Z >= 1 - sum pibar (1 - e^-R): so
    it is at most (``deviation`` + sum pi up * ``shift``) / (1 - sum pi (1 - e^-R)), where
    deviation >= sum pi up |v - c| and shift >= |sum pibar (v - c)| (float64 sums; ``inflate`` covers
    their rounding and the normalisation of pi, as in ``_ratio_excess``; inf where Z's bound is not
    positive)."""
    infl = inflate(2 * r.up.shape[-1] + 16)
    z_lo = (1 - r.down_sum * infl) * (1 - 4 * U64)
    bound = (deviation * infl + r.up_sum * infl * shift * infl) / z_lo * (1 + 8 * U64)
    return torch.where(z_lo > 0, bound, torch.full_like(bound, math.inf))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """certkv's dense FP16 path: the same binary32 computation over exact keys and values.

    q: [B, H_q, 1, D]; k, v: [B, H_kv, n, D]. Stage 3 of the ladder serves exactly this output.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    out = served_attention(qg, k, v, default_scale(d) if scale is None else scale, q.dtype)
    return out.reshape(b, hq, 1, d)
