"""Lemma 4: o_hat - o = (dW.V) + (W.dV) + (dW.dV) exactly, and the TV forms of the key and cross
bounds dominate their terms (real arithmetic, every n up to N tokens)."""

from __future__ import annotations

import mpmath
import z3

LEMMA = (
    "for p, p_hat distributions on n tokens, v_i in [lo, hi], |v_hat_i - v_i| <= eta_i <= eta_max: "
    "sum p_hat v_hat - sum p v = sum (p_hat-p) v + sum p (v_hat-v) + sum (p_hat-p)(v_hat-v); "
    "|sum (p_hat-p) v| <= TV (hi - lo); |sum (p_hat-p)(v_hat-v)| <= TV * 2 eta_max"
)
THEORY = "nonlinear real arithmetic (NRA), n = 1..N tokens"
N = 3


def _setup(n: int) -> dict:
    p = [z3.Real(f"p{i}") for i in range(n)]
    ph = [z3.Real(f"ph{i}") for i in range(n)]
    v = [z3.Real(f"v{i}") for i in range(n)]
    vh = [z3.Real(f"vh{i}") for i in range(n)]
    eta = [z3.Real(f"eta{i}") for i in range(n)]
    a = [z3.Real(f"a{i}") for i in range(n)]  # a_i = |p_hat_i - p_i|
    lo, hi, emax, tv = z3.Reals("lo hi emax tv")
    hyp = [z3.Sum(p) == 1, z3.Sum(ph) == 1, lo <= hi, tv == z3.Sum(a) / 2]
    for i in range(n):
        hyp += [p[i] >= 0, ph[i] >= 0, lo <= v[i], v[i] <= hi, eta[i] >= 0, eta[i] <= emax]
        hyp += [vh[i] - v[i] <= eta[i], v[i] - vh[i] <= eta[i]]
        hyp += [a[i] >= ph[i] - p[i], a[i] >= p[i] - ph[i], z3.Or(a[i] == ph[i] - p[i], a[i] == p[i] - ph[i])]
    return dict(p=p, ph=ph, v=v, vh=vh, eta=eta, lo=lo, hi=hi, emax=emax, tv=tv, hyp=hyp)


def _terms(x: dict) -> tuple:
    n = len(x["p"])
    key = z3.Sum([(x["ph"][i] - x["p"][i]) * x["v"][i] for i in range(n)])
    val = z3.Sum([x["p"][i] * (x["vh"][i] - x["v"][i]) for i in range(n)])
    cross = z3.Sum([(x["ph"][i] - x["p"][i]) * (x["vh"][i] - x["v"][i]) for i in range(n)])
    total = z3.Sum([x["ph"][i] * x["vh"][i] - x["p"][i] * x["v"][i] for i in range(n)])
    return key, val, cross, total


def _abs_le(e: z3.ArithRef, b: z3.ArithRef) -> z3.BoolRef:
    return z3.And(e <= b, -e <= b)


def prove() -> z3.CheckSatResult:
    for n in range(1, N + 1):
        x = _setup(n)
        key, val, cross, total = _terms(x)
        claim = z3.And(
            total == key + val + cross,
            _abs_le(key, x["tv"] * (x["hi"] - x["lo"])),
            _abs_le(cross, x["tv"] * 2 * x["emax"]),
        )
        s = z3.Solver()
        s.set("timeout", 120_000)
        s.add(*x["hyp"], z3.Not(claim))
        r = s.check()
        if r != z3.unsat:
            return r
    return z3.unsat


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened: drop the cross term, claiming |o_hat - o| <= TV (hi - lo) + sum p eta. The
    counterexample (found with a margin of 1/1000, so float64 cannot decide the replay) is replayed
    through the runtime's ``certkv.attention.tv_terms`` with pi = p: key + value alone is violated,
    key + value + cross holds."""
    import torch

    from certkv.attention import tv_terms

    x = _setup(2)
    _, _, _, total = _terms(x)
    bound = x["tv"] * (x["hi"] - x["lo"]) + z3.Sum([x["p"][i] * x["eta"][i] for i in range(2)])
    s = z3.Solver()
    s.add(*x["hyp"], z3.Not(_abs_le(total, bound + z3.RealVal("0.001"))))
    r = s.check()
    if r != z3.sat:
        return r, "no counterexample"
    m = s.model()

    def val(e: z3.ArithRef) -> mpmath.mpf:
        f = m.eval(e, model_completion=True).as_fraction()
        return mpmath.mpf(f.numerator) / f.denominator

    p, ph = [val(t) for t in x["p"]], [val(t) for t in x["ph"]]
    v, vh, eta = [val(t) for t in x["v"]], [val(t) for t in x["vh"]], [val(t) for t in x["eta"]]
    actual = abs(sum(a * b for a, b in zip(ph, vh)) - sum(a * b for a, b in zip(p, v)))
    tv = sum(abs(a - b) for a, b in zip(p, ph)) / 2

    def f64(y: mpmath.mpf) -> torch.Tensor:
        return torch.tensor(float(y), dtype=torch.float64)

    key, value, cross = tv_terms(
        f64(tv), f64(0), f64(val(x["hi"]) - val(x["lo"])), f64(sum(a * e for a, e in zip(p, eta))),
        f64(val(x["emax"])), f64(min(eta)),
    )  # fmt: skip
    weak, full = float(key + value), float(key + value + cross)
    assert actual > weak * (1 + 1e-12), "the runtime bound without its cross term should be violated"
    assert actual <= full * (1 + 1e-12), "the runtime bound must hold"
    return r, (
        f"p={p} p_hat={ph} v={v} v_hat={vh}: |o_hat - o| = {actual} > runtime key + value = {weak} "
        f"(with the cross term: {full})"
    )
