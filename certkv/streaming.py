"""The certificate of a step served by the split-K decode kernel, from the statistics it streams.

The kernel (``certkv.kernels.decode``, ``cert=True``) reads each Tier-1 byte once and leaves, beside
its online-softmax partials, per block of tokens the sum of its binary32 weights and the frame they
were computed in, and per split the rescales of its running sums (docs/theory.md section 8). This module turns
them into the same guarantee as ``certkv.attention.certified_step``: for each (batch row, query head)

    output_bound >= max_j |output_j - o_j|,  o = exact attention over the FP16/BF16 originals,

with the kernel's own arithmetic (binary32 exp2 and sums, tensor-core products, FP16 operands where
the precision rounds to them) in the rounding term. The terms take their total-variation forms
(the per-token forms of the torch path need the output before the pass), the TV bounds come from
``certkv.tv.tv_bound`` over block masses (divisible: a block may be split), and everything below is
float64 on [B*H, G] rows. ``certify`` is the reference of the fused epilogue
(``certkv.kernels.epilogue``, five Triton launches) that ``kernel_step`` serves with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from certkv.certificate import Certificate
from certkv.quant import RADIUS_FACTOR
from certkv.rounding import EXP_REL, TC_U, U32, U64, gamma, inflate, quotient_bound
from certkv.tv import sum_radius, tanh_bound, tv_bound

U16 = 2.0**-11  # unit roundoff of FP16
BF16_INTO_FP16 = 2.0**-25  # |fl16(x) - x| for BF16 x, |x| <= 65504 (proofs/lemma_fp16_inputs)
# |exp2(fl(x)) - 2^x| <= ALPHA1 * 2^x + BETA1 for every computed argument fl(x) of an exact x <= 0:
# the exp2 routine's own error (EXP_REL, EXP_ABS, measured) plus the rounding of the argument
# (relative U32, which moves 2^x by at most a factor 2^(128 U32) while |x| <= 128; below 2^-128 the
# error is absolute).
ALPHA1 = EXP_REL * 2.0 ** (128 * U32) + math.expm1(128 * U32 * math.log(2)) * 1.01
BETA1 = 2.0**-125
LOG1P_ALPHA1_BETA1 = math.log1p(ALPHA1 + BETA1)
LIVE = 2.0**20  # a block is live when its mass exceeds LIVE x its absolute error
DUST_RADIUS_MAX = 16.0  # above this radius the dust bound e^(2R) D is not used (TV taken as 1)


@dataclass(frozen=True)
class Arithmetic:
    """The rounding model of one kernel configuration, per element. A quantized key or value with
    code c, scale s and zero z (exact dequantized c s + z, L the largest code) enters the products as
    an operand within ``step`` * L|s| + ``mag`` * max(|z|, |z + L s|) + ``abs`` of c s + z (one rounding
    of c s, one of the sum, each relative to its own result); the weights fed to the value product
    within ``p_rel`` * p + ``p_abs`` of p; every operand stays below ``limit`` (FP16: 65504); the
    products accumulate with unit roundoff ``dot_u``; and the query enters the products within
    ``q_rel`` * |q| + ``q_abs`` of q (0: exactly, as an FP16 query into FP16 products; a BF16 query
    rounded to FP16: 0 and 2^-25, proofs/lemma_fp16_inputs: exact in FP16's normal range, half the
    subnormal spacing below), and the exact tokens (sink, window, promoted) within ``x_abs`` of
    themselves (BF16 into FP16: 2^-25 by the same lemma; the values' share is inside ``abs``, which
    every token's value operand is allowed)."""

    step: float
    mag: float
    abs: float
    p_rel: float
    p_abs: float
    limit: float
    dot_u: float
    q_rel: float = 0.0
    q_abs: float = 0.0
    x_abs: float = 0.0

    @property
    def rounds_inputs(self) -> bool:
        """Whether the query or the exact tokens are rounded into the products' format."""
        return bool(self.q_rel or self.q_abs or self.x_abs)


# binary32 dequantization, products on FMAs ("ieee" and "fma" run on the CUDA cores); FP16 operands on
# tensor cores (TC_U), dequantized in FP16 (deq16: two FP16 roundings) or in binary32 and rounded to
# FP16 once; FP16 subnormals are absolute errors (2^-25 per rounding)
BINARY32 = Arithmetic(U32, 1.0001 * U32, 2.0**-148, 0.0, 0.0, math.inf, U32)
ARITHMETIC = {
    ("ieee", False): BINARY32,
    ("fma", False): BINARY32,
    ("fp16", False): Arithmetic(U32, U16 + 2.01 * U32, 2.0**-24, U16, 2.0**-25, 65504.0, TC_U),
    ("fp16", True): Arithmetic(U16, 1.001 * U16, 2.0**-24, U16, 2.0**-25, 65504.0, TC_U),
}


def product_error(
    factors: torch.Tensor, alpha1: float = ALPHA1, beta1: float = BETA1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(relative, absolute) error of a product of ``factors`` computed factors, each within
    alpha1 * f + beta1 of an exact f in [0, 1]: |prod f~ - prod f| <= ((1 + alpha1)^k - 1) prod f
    + k beta1 (1 + alpha1 + beta1)^(k-1) (proofs/ lemma 9). float64, rounded up. (1 + alpha1)^k - 1
    = e^y - 1 <= y e^y for y = k log1p(alpha1) >= 0: exp only, so the fused epilogue
    (``certkv.kernels.epilogue``) evaluates the same formula."""
    y = factors * math.log1p(alpha1)
    rel = y * torch.exp(y) * (1 + 2.0**-40)
    absolute = factors * beta1 * torch.exp((factors - 1) * math.log1p(alpha1 + beta1)) * (1 + 2.0**-40)
    return rel, absolute


def mass_error(blk: int) -> tuple[float, float]:
    """(c1, b): a block of ``blk`` tokens' binary32 weight sum sigma against its exact S = sum 2^(t_i - mu),
    |sigma - S| <= c1 S + b (docs/theory.md section 8, "Block masses"; float64, rounded up). In the frame of
    the row's top logit the absolute part is b 2^(mu - top)."""
    c1 = (ALPHA1 + gamma(blk) * (1 + ALPHA1)) * (1 + 4 * U64) + 4 * U64
    return c1, blk * BETA1 * (1 + gamma(blk)) * (1 + 4 * U64)


def _upper(computed: torch.Tensor, rel: float | torch.Tensor, absolute: torch.Tensor) -> torch.Tensor:
    """X >= 0 with |computed - X| <= rel X + absolute: X <= (computed + absolute) / (1 - rel)."""
    return (computed + absolute) * inflate(4) / (1 - rel)


def _block_max(x: torch.Tensor, blk: int) -> torch.Tensor:
    """Max over consecutive blocks of ``blk`` along the last dim (zero-padded to whole blocks; x >= 0)."""
    pad = -x.shape[-1] % blk
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, blk)).amax(-1)


def arithmetic(q: torch.Tensor, t1: object, precision: str, deq16: bool) -> Arithmetic:
    """The rounding model of a launch, refusing those without one: "tf32", and "fp16" with ``deq16``
    (dequantization in FP16 arithmetic) over anything but FP16 queries, scales and exact tokens. "fp16"
    over BF16: the dequantized operands round to FP16 as over FP16 scales (c·s is exact in binary32 for
    any 16-bit s), and a BF16 query and BF16 exact tokens round to FP16 (``q_rel``, ``q_abs``,
    ``x_abs``; beyond 65504 the step is not certified)."""
    from certkv.kernels.decode import Tier1

    assert isinstance(t1, Tier1)
    if (precision, deq16) not in ARITHMETIC:
        raise ValueError(f"precision {precision!r} (deq16={deq16}) has no rounding model: {sorted(ARITHMETIC)}")
    model = ARITHMETIC[precision, deq16]
    if precision != "fp16":
        return model
    exact = [sk for sk, _ in t1.exact_segments() if sk.shape[2]]
    dtypes = {x.dtype for x in (q, t1.ks, t1.vs, *exact)}
    if not dtypes <= {torch.float16, torch.bfloat16}:
        raise ValueError(f"precision 'fp16' takes FP16 or BF16 queries, scales and exact tokens, not {dtypes}")
    if deq16 and dtypes != {torch.float16}:
        raise ValueError("deq16 dequantizes in FP16 arithmetic: it is certified for FP16 caches and queries only")
    if q.dtype != torch.float16:
        model = dataclasses.replace(model, q_abs=BF16_INTO_FP16)
    if any(x.dtype != torch.float16 for x in exact):
        model = dataclasses.replace(model, x_abs=BF16_INTO_FP16)
    return model


def certify(
    q: torch.Tensor,
    t1: object,
    partials: object,
    scale: float,
    precision: str,
    v_min: torch.Tensor,
    v_max: torch.Tensor,
    out_dtype: torch.dtype,
    deq16: bool = False,
) -> tuple[torch.Tensor, Certificate]:
    """Output [B, H, G, D] in ``out_dtype`` and its certificate (fields [B, H, G]) for q [B, H, G, D]
    over ``t1`` (``certkv.kernels.decode.Tier1``) from ``partials`` (``decode_partials(cert=True)``).
    v_min, v_max [B, H, D]: the range of the original values over all tokens (the cache keeps it)."""
    from certkv.kernels.decode import KEY_GROUP, VALUE_GROUP, Partials, Tier1, block_count

    assert isinstance(t1, Tier1) and isinstance(partials, Partials) and partials.bmass is not None
    ar = arithmetic(q, t1, precision, deq16)
    segments = [(sk, sv) for sk, sv in t1.exact_segments() if sk.shape[2]]  # sink, window, promoted
    p = partials
    assert p.bframe is not None and p.resc is not None
    b, h, g, d = q.shape
    bh = b * h
    n_quant = t1.kc.shape[2]
    n_exact = sum(sk.shape[2] for sk, _ in segments)
    n = n_quant + n_exact  # >= the tokens served (promoted ones are counted twice)
    blk = p.block
    s_up = float(torch.tensor(scale, dtype=torch.float32)) * (1 + 2 * U32)
    absq = q.reshape(bh, g, d).double().abs()

    # ---- combine the splits in float64: y = acc / l over exact weights W_i = 2^(t_i - top) ----
    m = p.m[:, :, :g].double()  # [BH, S+1, G]
    top = m.amax(1)  # the largest computed logit: its token has W = 1, so L = sum W >= 1
    w = torch.where(torch.isinf(m), torch.zeros_like(m), torch.exp2(m - top[:, None]))
    acc = (w[..., None] * p.acc[:, :, :g].double()).sum(1)  # [BH, G, D]
    l_sum = (w * p.l[:, :, :g].double()).sum(1)
    y = acc / l_sum[..., None]
    out = y.float().to(out_dtype)  # through binary32, rounding to nearest at each step (as the fused epilogue)

    # ---- logit radii per block: quantization eps, rounding rho (computed vs exact dequantized) ----
    q_dot = gamma(d + 5, ar.dot_u)
    ks, kz = t1.ks.double().reshape(bh, -1, d), t1.kz.double().reshape(bh, -1, d)
    k_rad = (t1.ks.float() * RADIUS_FACTOR).double().reshape(bh, -1, d)  # the quantizer's guarantee
    k_max = torch.maximum(kz.abs(), (kz + 255 * ks).abs()) * (1 + 2 * U64)  # >= |c s + z|, 0 <= c <= 255
    k_err = (ar.step * 255 * ks.abs() + ar.mag * k_max + ar.abs) * (1 + 2 * U64)  # >= |operand - (c s + z)|
    k_used = k_max + k_err  # >= |key operand|
    eps_g = s_up * torch.einsum("rgd,rkd->rgk", absq, k_rad) * inflate(d)
    rho_g = s_up * torch.einsum("rgd,rkd->rgk", absq, k_used * q_dot + k_err) * inflate(d)
    dq = (ar.q_rel * absq + ar.q_abs) * (1 + 2 * U64)  # >= |q~ - q|, the query's rounding; |q~| <= |q| + dq
    if ar.rounds_inputs:
        rho_q16 = s_up * torch.einsum("rgd,rkd->rgk", dq, k_used * (1 + q_dot)) * inflate(d)
        rho_g = (rho_g + rho_q16) * (1 + 2 * U64)
    per_group = KEY_GROUP // blk
    eps_q = eps_g.repeat_interleave(per_group, -1)
    rho_q = rho_g.repeat_interleave(per_group, -1)
    if ar.rounds_inputs:  # exact tokens rounded into the products too: |k~ - k| <= x_abs
        wq = absq * q_dot + dq * (1 + q_dot)
        xq = ar.x_abs * absq.sum(-1, keepdim=True)
        exact_rho = [
            _block_max(s_up * (torch.einsum("rgd,rkd->rgk", wq, sk.double().abs().reshape(bh, -1, d) + ar.x_abs) + xq),
                       blk) * inflate(d) * (1 + 8 * U64)
            for sk, _ in segments
        ]  # fmt: skip
    else:  # exact tokens: the dot product's rounding only (operands exact: FP16 stays FP16)
        exact_rho = [
            _block_max(s_up * torch.einsum("rgd,rkd->rgk", absq, sk.double().abs().reshape(bh, -1, d)), blk)
            * q_dot
            * inflate(d)
            for sk, _ in segments
        ]
    rho = torch.cat([rho_q, *exact_rho], dim=-1)  # [BH, G, NB]
    eps = torch.cat([eps_q, *(torch.zeros_like(r) for r in exact_rho)], dim=-1)
    r_p = (eps + rho) * (1 + 2 * U64)  # original vs computed logits
    r_h = rho  # exact dequantized vs computed

    # ---- block masses M (float64) in the frame of top, their accuracy lambda, and the dust ----
    bmass = p.bmass[:, :, :g].double().transpose(1, 2)  # [BH, G, NB]
    frame = torch.exp2(p.bframe[:, :, :g].double().transpose(1, 2) - top[..., None])
    mass = bmass * frame
    c1, b_unit = mass_error(blk)
    b_abs = b_unit * frame
    live = mass >= LIVE * b_abs
    lam = torch.where(live, 2 * (c1 + b_abs / mass.clamp(min=1e-300)) * (1 + 2.0**-40), torch.zeros_like(mass))
    dust = torch.where(live, torch.zeros_like(mass), (mass + b_abs) / (1 - c1)).sum(-1) * inflate(mass.shape[-1])
    m_live = torch.where(live, mass, torch.zeros_like(mass))

    rp_max, rh_max = r_p.amax(-1), r_h.amax(-1)
    grow_p = torch.where(rp_max <= DUST_RADIUS_MAX, torch.exp(2 * rp_max), torch.full_like(rp_max, math.inf))
    grow_h = torch.where(rh_max <= DUST_RADIUS_MAX, torch.exp(2 * rh_max), torch.full_like(rh_max, math.inf))
    # TV(p, pi) and TV(p_hat, pi) over the live block masses, in one call. TV(p~, pi) has the radii
    # lambda alone, all within one bin of the largest, where the divisible bound is the tanh bound
    # (docs/theory.md section 8): that is taken directly
    radii = torch.stack([r_p, r_h]) + lam
    nb_all = mass.shape[-1]
    tvs = tv_bound(m_live.expand_as(radii).reshape(-1, nb_all), radii.reshape(-1, nb_all), divisible=True)
    tv_p, tv_h = tvs.reshape(radii.shape[:-1])
    tv_0 = tanh_bound(lam.amax(-1) + sum_radius(nb_all))
    one = torch.ones_like(tv_p)
    tv_pi = torch.minimum(tv_p + grow_p * dust, one)  # TV(p, pi), pi the live block masses' weights
    tv_key = torch.minimum(tanh_bound(eps.amax(-1)), tv_p + tv_h + (grow_p + grow_h) * dust).clamp(max=1.0)
    tv_hat = torch.minimum(tanh_bound(rh_max), tv_0 + tv_h + (1 + grow_h) * dust).clamp(max=1.0)

    # ---- the kernel's weights against exact ones: K rescales, nb blocks per split ----
    n_resc = p.resc[:, :, :g].amax(1).double()  # [BH, G]
    nb = max(p.chunk // blk, block_count(0, tuple(sk.shape[2] for sk, _ in segments), blk), 1)
    alpha_k, beta_k = product_error(n_resc + 1)
    comb = gamma(2 * p.splits + 8, U64)
    g_sum = gamma(blk + 2 * nb + 8)  # binary32 running sum l
    g_acc = gamma(blk + 2 * nb + 8, ar.dot_u)  # the value products and their running sum
    c_l = (1 + alpha_k) * (1 + g_sum) * (1 + comb) - 1
    l_w = _upper(l_sum, c_l, n * beta_k)  # >= L = sum W
    err_l = c_l * l_w + n * beta_k * (1 + comb)
    # per block: the largest |v_hat| and value radius per channel group (exact tokens: |v|, 0);
    # sums over tokens weighted by W are bounded through the blocks' exact masses M* <= m_up
    m_up = (mass + b_abs) / (1 - c1) * (1 + 2.0**-40)  # [BH, G, NB]
    vmag_blk, eta_blk = _block_values(t1, [sv for _, sv in segments], blk)  # [BH, NB], [BH, NB, groups]
    vmag_max = vmag_blk.amax(-1)[:, None]  # [BH, 1]
    s_w = (m_up * vmag_blk[:, None, :]).sum(-1) * inflate(nb_all)  # >= sum W |v_hat|
    # |operand - v_hat| <= step 15|s| + mag |v_hat|max + abs, and 15|s| <= |z| + |z + 15 s| <= 2 vmag
    v_rel = 2 * ar.step + ar.mag
    v_used = s_w * (1 + v_rel) + ar.abs * l_w  # >= sum W |value operand|
    c_n = (1 + ar.p_rel) * (1 + alpha_k) * (1 + g_acc) * (1 + comb) - 1
    weight_abs = ((1 + ar.p_rel) * beta_k + ar.p_abs * torch.exp(n_resc * LOG1P_ALPHA1_BETA1)) * (1 + g_acc)
    err_n = (c_n * v_used + v_rel * s_w + ar.abs * l_w + n * weight_abs * (vmag_max * (1 + v_rel) + ar.abs)) * (
        1 + 2.0**-40
    )
    quotient = quotient_bound(acc.abs(), err_n[..., None], err_l[..., None], l_sum[..., None])
    division = 2 * U64 * y.abs()
    cast = (out.double() - y).abs()

    # ---- value radii eta per channel group: extremes, and sum_i pi_i eta_i ----
    eta_hi = eta_blk.amax(1)  # [BH, groups]
    vs = t1.vs.reshape(bh, n_quant, -1)
    eta_lo = (vs.amin(1).float() * RADIUS_FACTOR).double() if n_quant else torch.zeros_like(eta_hi)
    if n_exact:
        eta_lo = torch.zeros_like(eta_lo)  # exact tokens carry no value error
    w_eta = torch.einsum("rgb,rbc->rgc", m_up, eta_blk) * inflate(nb_all)  # >= sum W eta
    live_sum = m_live.sum(-1) / (1 + gamma(m_live.shape[-1], U64))
    pi_eta = w_eta * torch.exp(lam.amax(-1))[..., None] * (1 + 4 * U64) / live_sum[..., None]
    pi_eta = torch.where(live_sum[..., None] > 0, pi_eta, eta_hi[:, None, :].expand_as(pi_eta))

    def per_channel(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(VALUE_GROUP, -1)

    eta_max = per_channel(eta_hi)[:, None, :]  # [BH, 1, D]
    eta_min = per_channel(eta_lo)[:, None, :]
    v_range = (v_max.double() - v_min.double()).reshape(bh, 1, d)
    key_j = tv_key[..., None] * v_range
    value_j = per_channel(pi_eta) + tv_pi[..., None] * (eta_max - eta_min)
    cross_j = tv_key[..., None] * 2 * eta_max
    round_j = (cast + division + quotient + tv_hat[..., None] * (v_range + 2 * eta_max)) * (1 + 2.0**-40)
    # the four terms split output - o through p_hat (exact dequantized keys), which counts the rounding
    # radius rho three times; through p~ (exact softmax of the computed logits) it counts once:
    # output - o = [output - sum p~ v_hat] + sum (p~ - p) v + sum p~ (v_hat - v), no cross term
    tv_direct = torch.minimum(tanh_bound(rp_max), tv_p + tv_0 + (grow_p + 1) * dust).clamp(max=1.0)
    tv_tilde = (tv_0 + dust).clamp(max=1.0)  # TV(p~, pi)
    direct_j = (
        cast
        + division
        + quotient
        + tv_direct[..., None] * v_range
        + per_channel(pi_eta)
        + tv_tilde[..., None] * (eta_max - eta_min)
    ) * (1 + 2.0**-40)
    total_j = torch.minimum((key_j + value_j + cross_j + round_j) * (1 + 2.0**-40), direct_j)

    # operands that would overflow the precision, or a non-finite result: nothing is certified
    too_big = (k_used.amax((-1, -2)) > ar.limit) | (vmag_max[:, 0] * (1 + v_rel) > ar.limit)
    if ar.rounds_inputs:  # a query rounded to the operands' format must fit it
        too_big |= absq.amax((-1, -2)) > ar.limit
    for sk, sv in segments:
        big = torch.maximum(sk.abs().reshape(bh, -1).amax(-1), sv.abs().reshape(bh, -1).amax(-1))
        too_big |= big.double() > ar.limit
    broken = too_big[:, None] | ~torch.isfinite(y).all(-1) | ~(l_sum > 0) | ~torch.isfinite(total_j).all(-1)
    inf = torch.full_like(tv_key, math.inf)

    def field(x: torch.Tensor) -> torch.Tensor:
        return torch.where(broken, inf, x).reshape(b, h, g)

    cert = stage0_certificate(
        {
            "tv_bound": field(tv_key),
            "key_term": field(key_j.amax(-1)),
            "value_term": field(value_j.amax(-1)),
            "cross_term": field(cross_j.amax(-1)),
            "rounding_term": field(round_j.amax(-1)),
            "output_bound": field(total_j.amax(-1)),
            "tv_tanh": tanh_bound(rp_max).reshape(b, h, g),
            "logit_radius": rp_max.reshape(b, h, g),
        }
    )
    return out.reshape(b, h, g, d), cert


BOUND_FIELDS = (
    "tv_bound",
    "key_term",
    "value_term",
    "cross_term",
    "rounding_term",
    "output_bound",
    "tv_tanh",
    "logit_radius",
)


# the certificate's fields beside BOUND_FIELDS, all zero (False) at stage 0
STAGE0_COUNTS = ("stage", "fetched_values", "fetched_keys")  # int64


def stage0_certificate(bounds: dict[str, torch.Tensor], zeros: dict[str, torch.Tensor] | None = None) -> Certificate:
    """A stage-0 certificate from its ``BOUND_FIELDS`` (float64 [B, H, G]): nothing fetched, not yet
    held to a tolerance (the cache sets ``tolerance`` and ``accepted``). ``zeros``: those fields and
    ``STAGE0_COUNTS`` already zero (the fused epilogue writes them in its last launch; made here they
    cost five more launches a step)."""
    if zeros is None:
        ref = bounds["output_bound"]
        zeros = {name: torch.zeros(ref.shape, dtype=torch.int64, device=ref.device) for name in STAGE0_COUNTS}
        zeros["tolerance"] = torch.zeros_like(ref)
        zeros["accepted"] = torch.zeros(ref.shape, dtype=torch.bool, device=ref.device)
    return Certificate(**bounds, **zeros)


def serving_launch(dtype: torch.dtype, head_dim: int = 128) -> dict[str, object]:
    """The decode-kernel launch certkv serves a cache of ``dtype`` (FP16 or BF16) with
    (``decode_partials`` options; measured on the H100 at ``head_dim`` 128: docs/benchmarks.md): FP16
    tensor-core products, 128-token blocks, the logits over two chunks of channels with registers
    capped at 168 (three programs per SM instead of two) and splits for 396 programs, none shorter than four
    blocks where that still fills them (8K, B >= 2: the kernel 3-17% faster, launch_probe_d128_least.json),
    two pipeline stages, the codes through TMA where it pays (``tma="auto"``: the kernel 17-18% faster at 128K;
    dequantizing in FP16 arithmetic, ``deq16``, made the step 2-6% faster and the median bound 12-14%
    looser). BF16 caches take the same launch: their query and exact tokens round into FP16, within
    2^-25 (``arithmetic``; the median bound 8-16% looser); until then they were served by binary32
    products on the CUDA cores ("fma", 16-token blocks): the kernel 2.2-4.8x slower, the step 0.23-0.27x
    SDPA.

    Other head sizes (powers of two from 64): above D = 128 the tiles keep their bytes, blocks of
    128·128 / D tokens (the D = 128 tiles at D = 256 need 143 KB of shared memory, more than many GPUs
    have, and spill registers), with no register cap or program target (measured at D = 256: without
    TMA, one key chunk or more programs no faster, ``launch_sweep_d256.json``) and splits of at least six
    blocks where the programs fill the GPU (D = 256, B = 8, 8K: the kernel 5.5% faster, elsewhere within
    1%; ``launch_probe_d256_least.json``; D = 64 keeps one block: six were 4% slower at B = 8, 8K). At D = 64, 64-token
    blocks on two warps with splits for 1,584 programs and the codes by pointer, not TMA (its tiles of
    16 to 32 bytes a row cost more than they save): the kernel 1.2-2.2x faster than the D = 128 launch
    there (``launch_sweep_d64.json``, ``launch_probe_d64_blocks.json``)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the decode kernel serves FP16 and BF16 caches, not {dtype}")
    launch: dict[str, object] = dict(precision="fp16", block=128, key_chunks=2, num_stages=2, num_warps=4, tma="auto")
    if head_dim == 128:
        return launch | dict(maxnreg=168, programs=396, least_blocks=4)
    if head_dim == 64:
        return launch | dict(block=64, num_warps=2, programs=1584, tma="off")
    return launch | dict(block=max(16, min(128, 128 * 128 // head_dim)), least_blocks=6)


def kernel_step(
    q: torch.Tensor,
    t1: object,
    scale: float,
    v_min: torch.Tensor,
    v_max: torch.Tensor,
    launch: dict[str, object] | None = None,
) -> tuple[torch.Tensor, Certificate]:
    """Stage 0 through the decode kernel: one launch with ``cert=True`` (``serving_launch``, or
    ``launch``), then this module's epilogue fused into five more (``certkv.kernels.epilogue``, which
    ``certify`` above is the reference of). q [B, H_kv, G, D] (16-bit); returns the output in q's dtype
    and the certificate (fields [B, H_kv, G]).

    The launches run one after another on the current stream. (The epilogue's first launch needs only
    the query and the cache; on a second stream beside the kernel it made the step 9-20 us slower as a
    CUDA graph on the H100: docs/benchmarks.md.)"""
    out, cert, _ = kernel_step_partials(q, t1, scale, v_min, v_max, launch)
    return out, cert


def kernel_step_partials(
    q: torch.Tensor,
    t1: object,
    scale: float,
    v_min: torch.Tensor,
    v_max: torch.Tensor,
    launch: dict[str, object] | None = None,
) -> tuple[torch.Tensor, Certificate, object]:
    """``kernel_step``, and the decode launch's partials (``certkv.kernels.decode.Partials``: the ladder's
    stage 2 takes the softmax's normaliser from them)."""
    from certkv.kernels import epilogue
    from certkv.kernels.decode import decode_partials

    launch = serving_launch(q.dtype, q.shape[-1]) if launch is None else launch
    partials = decode_partials(q, t1, scale, cert=True, **launch)  # type: ignore[arg-type]
    precision, deq16 = str(launch["precision"]), bool(launch.get("deq16", False))
    out, cert = epilogue.certify(q, t1, partials, scale, precision, v_min, v_max, q.dtype, deq16)  # type: ignore[arg-type]
    return out, cert, partials


def _block_values(t1: object, exact_v: list[torch.Tensor], blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``blk`` tokens in the kernel's order (quantized, then ``exact_v``: the non-empty
    sink, window and promoted values), float64: the largest |v_hat| of its tokens [BH, NB]
    (max(|z|, |z + 15 s|) per channel group, exact for 16-bit s and z) and the largest value radius
    per channel group [BH, NB, D/64] (0 for exact tokens)."""
    from certkv.kernels.decode import Tier1

    assert isinstance(t1, Tier1)
    b, h, n_quant = t1.vs.shape[:3]
    bh = b * h
    vs, vz = t1.vs.double().reshape(bh, n_quant // blk, blk, -1), t1.vz.double().reshape(bh, n_quant // blk, blk, -1)
    vmag = [torch.maximum(vz.abs(), (vz + 15 * vs).abs()).amax((-1, -2))]
    vmag += [_block_max(sv.double().abs().amax(-1).reshape(bh, -1), blk) for sv in exact_v]
    radius = (t1.vs.float() * RADIUS_FACTOR).double().reshape(bh, n_quant // blk, blk, -1).amax(2)
    zeros = radius.new_zeros(bh, sum(x.shape[1] for x in vmag[1:]), radius.shape[-1])
    return torch.cat(vmag, 1), torch.cat([radius, zeros], 1)
