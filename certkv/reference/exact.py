"""Exact reference for one attention step of one head, in high precision (mpmath plus exact integers).

Every input is a binary floating-point number (FP16, BF16 or FP32, possibly held in float64), hence
an integer multiple of 2^-149; logits q.k are computed as exact integers, the
scale (1/sqrt(D) or a given float) and the exponentials in mpmath at ``prec`` bits, and every weighted
sum of values as an exact integer dot product of the weights rounded to 2^-(2*prec). The result is
not exact: ``ExactStep.err`` bounds its error per term (each weight is within a relative
eps_r = 4 (n + 16 + A) 2^-(prec-16) of the true one, A the largest |exponent| evaluated; rounding to
2^-(2 prec) adds 2n 2^-(2 prec) in all; with one token everything is exact), so a claim is decided
only when it clears the reference's own error; ``certkv.reference.verify`` raises the precision until
it does. (A head where one token holds all but 1e-79 of the mass needs ~300 bits: at 128 the sink's
weight rounds to 1.)

Quantities (one head; o = sum p v, p = softmax(s q.K), p_hat = softmax(s q.K_hat)):
  tv = TV(p, p_hat); key_j = sum (p_hat - p) v_j; value_j = sum p (v_hat - v)_j;
  cross_j = sum (p_hat - p)(v_hat - v)_j; error_j = served_j - o_j; rounding_j = served_j - sum p_hat v_hat_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import numpy as np
import torch

EXP = 149  # every FP16, BF16 and FP32 number is an integer multiple of 2^-149
# float64 magnitudes below 2^FAST_BITS (in units of 2^-EXP, after removing a common power of two)
# convert through int64 without loss; wider tensors take the per-element path.
FAST_BITS = 62


def _ints(x: torch.Tensor) -> np.ndarray:
    """Exact integers x * 2^EXP of a float tensor (any float dtype; converted exactly to float64).

    Vectorised: frexp splits every float64 into a 53-bit integer mantissa and an exponent; the tensor's
    lowest set bit (its 2-adic valuation V, in units of 2^-EXP) is factored out so the rest fits int64,
    and V is applied once as a Python-integer factor. Exact: every step is an integer identity."""
    a = x.detach().double().cpu().reshape(-1).numpy()
    mant, expo = np.frexp(a)  # a = mant * 2^expo, 0.5 <= |mant| < 1 (0 for 0)
    mi = np.ldexp(mant, 53).astype(np.int64)  # exact
    shift = expo.astype(np.int64) - 53 + EXP  # a * 2^EXP = mi * 2^shift
    nz = mi != 0
    if not bool(nz.any()):
        return np.zeros(tuple(x.shape), dtype=object)
    low = np.abs(mi[nz])
    trailing = np.log2(low & -low).astype(np.int64)  # exact: a power of two below 2^53
    valuation = shift[nz] + trailing
    if int(valuation.min()) < 0:
        bad = a[nz][int(np.argmin(valuation))]
        raise ValueError(f"{bad!r} is not a multiple of 2^-{EXP}: not a 16- or 32-bit float")
    v = int(valuation.min())
    rel = shift - v  # mi * 2^rel is an integer for every nonzero element
    top = np.floor(np.log2(low)).astype(np.int64) + rel[nz]
    if int(top.max()) >= FAST_BITS:
        return _ints_slow(a).reshape(tuple(x.shape))
    r = np.where(rel >= 0, mi << np.clip(rel, 0, None), mi >> np.clip(-rel, 0, None))
    out = r.astype(object)
    if v:
        out = out * (1 << v)
    return out.reshape(tuple(x.shape))


def _ints_slow(a: np.ndarray) -> np.ndarray:
    out = np.empty(len(a), dtype=object)
    for i, val in enumerate(a.tolist()):
        num, den = float(val).as_integer_ratio()
        if den > 1 << EXP:
            raise ValueError(f"{val!r} is not a multiple of 2^-{EXP}: not a 16- or 32-bit float")
        out[i] = num * ((1 << EXP) // den)
    return out


def _parts_to_ints(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> np.ndarray:
    """Exact integers of codes * scale + zero (float64 parts, each exact).

    When codes * scale + zero is exact in float64 (checked element-wise with an error-free two-sum;
    always so for 16-bit scales and 8-bit codes unless the zero point dwarfs the step by > 2^30) the
    float64 result is converted directly; otherwise each part is converted and combined in integers."""
    codes, scale, zero = (p.double() for p in parts)
    if codes.numel() and float(codes.abs().max()) >= 2**16:
        raise ValueError("codes must be integers below 2^16")
    prod = codes * scale  # exact: an integer below 2^16 times a 16-bit float (at most 27 bits)
    total = prod + zero
    zz = total - prod
    err = (prod - (total - zz)) + (zero - zz)  # two-sum: total + err == prod + zero exactly
    if not bool((err != 0).any()):
        return _ints(total)
    c = np.array([int(t) for t in codes.reshape(-1).tolist()], dtype=object).reshape(tuple(codes.shape))
    return c * _ints(scale) + _ints(zero)


@dataclass
class ExactStep:
    """High-precision quantities of one head (mpmath numbers; vectors as lists over j or i)."""

    o: list[mpmath.mpf]
    p: list[mpmath.mpf]
    p_hat: list[mpmath.mpf]
    tv: mpmath.mpf
    key: list[mpmath.mpf]
    value: list[mpmath.mpf]
    cross: list[mpmath.mpf]
    error: list[mpmath.mpf]
    rounding: list[mpmath.mpf]
    err: dict[str, mpmath.mpf]  # bound on the reference's own error in each term (key, value, cross,
    # rounding, error, tv): zero where the term is exact by construction (e.g. one token)

    @staticmethod
    def max_abs(xs: list[mpmath.mpf]) -> mpmath.mpf:
        return max(abs(x) for x in xs)

    def magnitude(self, term: str) -> mpmath.mpf:
        """tv, or max_j |term_j| for key, value, cross, rounding and error (the keys of ``err``)."""
        return self.tv if term == "tv" else self.max_abs(getattr(self, term))


def exact_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_hat: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    v_hat: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    served: torch.Tensor,
    scale: float | None = None,
    prec: int = 128,
) -> ExactStep:
    """q [D]; k, v [n, D] originals; k_hat, v_hat (codes, scale, zero) float64 [n, D] each (exact tokens:
    codes 0, scale 0, zero the value); served [D]. ``scale`` None means exactly 1/sqrt(D)."""
    if prec < 100:
        raise ValueError(f"prec={prec}: the exact reference needs at least 100 bits")
    d = q.shape[-1]
    qi, ki, vi = _ints(q), _ints(k), _ints(v)
    khi, vhi = _parts_to_ints(k_hat), _parts_to_ints(v_hat)
    with mpmath.workprec(prec):
        s = 1 / mpmath.sqrt(d) if scale is None else mpmath.mpf(scale)
        unit = mpmath.ldexp(1, -2 * EXP)

        def softmax(logit_ints: np.ndarray) -> list[mpmath.mpf]:
            top = max(logit_ints)
            ex = [mpmath.exp(s * mpmath.mpf(int(x - top)) * unit) for x in logit_ints]
            total = mpmath.fsum(ex)
            return [e / total for e in ex]

        logits, logits_hat = ki.dot(qi), khi.dot(qi)  # exact integers, used twice below
        p = softmax(logits)
        p_hat = softmax(logits_hat)
        frac_bits = 2 * prec
        scale_w = 1 << frac_bits

        def weighted(w: list[mpmath.mpf], vals: np.ndarray) -> np.ndarray:
            ints = [int(mpmath.nint(x * scale_w)) for x in w]
            # the rounded weights sum to exactly 1, like the real ones: sums of (p_hat - p) * c vanish
            # exactly for constant c, and every error stays below n * 2^-frac_bits * max|v|
            top = max(range(len(ints)), key=ints.__getitem__)
            ints[top] += scale_w - sum(ints)
            return np.array(ints, dtype=object).dot(vals)  # integers in units of 2^-(frac_bits + EXP)

        to_mp = mpmath.ldexp(1, -(frac_bits + EXP))
        pv, phv, pvh, phvh = (weighted(w, vals) for w, vals in ((p, vi), (p_hat, vi), (p, vhi), (p_hat, vhi)))
        served_i = _ints(served) * scale_w
        o = [mpmath.mpf(int(x)) * to_mp for x in pv]
        key = [mpmath.mpf(int(a - b)) * to_mp for a, b in zip(phv, pv)]
        value = [mpmath.mpf(int(a - b)) * to_mp for a, b in zip(pvh, pv)]
        cross = [mpmath.mpf(int(a - b - c + e)) * to_mp for a, b, c, e in zip(phvh, phv, pvh, pv)]
        error = [mpmath.mpf(int(a - b)) * to_mp for a, b in zip(served_i, pv)]
        rounding = [mpmath.mpf(int(a - b)) * to_mp for a, b in zip(served_i, phvh)]
        tv = mpmath.fsum(abs(a - b) for a, b in zip(p, p_hat)) / 2
        n = len(p)
        both = [int(x) for x in (*logits, *logits_hat)]
        widest = s * mpmath.mpf(max(both) - min(both)) * unit  # the largest |exponent| evaluated
        eps_r = 4 * (n + 16 + widest) * mpmath.ldexp(1, -(prec - 16))
        # total weight error sum_i |w_i - p_i| of the rounded weights (relative error, then rounding to
        # 2^-frac_bits and renormalising); the weights sum to 1 like the true ones, so a sum of w * x
        # errs by at most that times half the range of x over tokens (x - c for the best centre c)
        delta = eps_r + 2 * n * mpmath.ldexp(1, -frac_bits) if n > 1 else mpmath.mpf(0)

        # ranges as float64 upper bounds (an error bound only needs to be large enough): relative
        # inflation for the one rounding of a float64 difference of exact values, and, where some
        # value is quantized, an absolute 2^-50 max|v_hat| for the float64 rounding of c*s + z (exact
        # values keep a zero bound where the term is exactly zero, e.g. constant values)
        v64 = v.double()
        vh64 = v_hat[0].double() * v_hat[1].double() + v_hat[2].double()
        slack = 2.0**-50 * float(vh64.abs().max()) if bool((v_hat[1] != 0).any()) else 0.0

        def spread(x: torch.Tensor, extra: float) -> mpmath.mpf:
            return mpmath.mpf(float((x.amax(0) - x.amin(0)).max()) * (1 + 2.0**-40) + extra)

        dv = mpmath.mpf(float((vh64 - v64).abs().max()) * (1 + 2.0**-40) + slack)
        err = {
            "key": delta * spread(v64, 0.0),
            "value": delta * dv,
            "cross": 2 * delta * dv,
            "rounding": delta * spread(vh64, slack) / 2,
            "error": delta * spread(v64, 0.0) / 2,
            "tv": eps_r if n > 1 else mpmath.mpf(0),
        }
    return ExactStep(o, p, p_hat, tv, key, value, cross, error, rounding, err)
