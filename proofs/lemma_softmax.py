"""Lemma 3: softmax perturbation. For p_i proportional to pi_i u_i with u_i in [e^-R_i, e^R_i]
(every logit moved by at most its radius; E_i = e^R_i is treated as a free real >= 1, so exp needs no
enclosure: the ratio form):

(a) worst case per set, the basis of certkv.tv: p(A) <= a/(a+b), a = sum_A pi E, b = sum_{not A} pi / E,
    for every set A; proven for n <= 4 tokens (NRA). For larger n the same inequality follows by merging:
    p(A) = P_A U_A / (P_A U_A + P_B U_B) is increasing in U_A and decreasing in U_B, and each group's
    weighted mean u lies within its E-range, which is the n = 2 case.
(b) the supremum over bins split fractionally is a maximum over the greedy's edges (docs/theory.md
    section 3): (b1) the greedy's weights w(t) = (1 - t) E + t / E have no strict interior maximum over
    three ascending E (so the bins filled first are those below i and above j); (b2) along an edge
    (bin f moving in, theta in [0, 1]) F = A/(A + B) - M lies below its tangent at any theta_hat, which
    is what certkv evaluates (NRA, all real parameters). The step between them (a fractional knapsack
    is solved greedily) is the textbook exchange argument; the whole chain for three bins, every x in
    [0, 1]^3 against all nine edges, did not finish in ten minutes.
(c) the uniform-radius baseline TV(p, pi) <= tanh(R/2) = (E - 1)/(E + 1), proven for n = 2 (n = 3 does
    not finish in a minute; the general case is the classical argument with the worst set of mass
    1/(1 + E)).
"""

from __future__ import annotations

import mpmath
import torch
import z3

from certkv.tv import tanh_bound, tv_bound

LEMMA = "TV(p, pi) <= certkv's bounds when every logit moves by at most its radius (set form, greedy edges, tanh)"
THEORY = "nonlinear real arithmetic (NRA); n <= 4 tokens (a), three bins and any edge (b), n = 2 (c)"


def _solver() -> z3.Solver:
    s = z3.Solver()
    s.set("timeout", 60_000)
    return s


def _family(s: z3.Solver, n: int, uniform: bool) -> tuple[list, list, list]:
    pi = [z3.Real(f"pi{i}") for i in range(n)]
    u = [z3.Real(f"u{i}") for i in range(n)]
    e = [z3.Real("E")] * n if uniform else [z3.Real(f"E{i}") for i in range(n)]
    s.add(z3.Sum(pi) == 1, *[p >= 0 for p in pi], *[x >= 1 for x in e])
    s.add(*[u[i] * e[i] >= 1 for i in range(n)], *[u[i] <= e[i] for i in range(n)])
    return pi, u, e


def _set_form(n: int) -> z3.CheckSatResult:
    s = _solver()
    pi, u, e = _family(s, n, uniform=False)
    inv = [z3.Real(f"inv{i}") for i in range(n)]
    s.add(*[inv[i] * e[i] == 1 for i in range(n)])
    member = [z3.Bool(f"A{i}") for i in range(n)]
    total = z3.Sum([pi[i] * u[i] for i in range(n)])
    p_a = z3.Sum([z3.If(member[i], pi[i] * u[i], 0) for i in range(n)])
    a = z3.Sum([z3.If(member[i], pi[i] * e[i], 0) for i in range(n)])
    b = z3.Sum([z3.If(member[i], 0, pi[i] * inv[i]) for i in range(n)])
    s.add(z3.Or(*member), p_a * (a + b) > a * total)  # p(A) > a / (a + b)
    return s.check()


def _valley() -> z3.CheckSatResult:
    s = _solver()
    e0, e1, e2, t = z3.Reals("E0 E1 E2 t")
    s.add(e0 >= 1, e1 >= e0, e2 >= e1, t >= 0, t <= 1)

    def w(e: z3.ArithRef) -> z3.ArithRef:
        return (1 - t) * e + t / e

    s.add(w(e1) > w(e0), w(e1) > w(e2))
    return s.check()


def _edge_tangent() -> z3.CheckSatResult:
    s = _solver()
    a0, b_r, m0, af, bf, mf, th, hat = z3.Reals("a0 b_r m0 af bf mf theta theta_hat")
    s.add(a0 >= 0, b_r >= 0, m0 >= 0, bf >= 0, af >= bf, mf >= 0, a0 + b_r + bf > 0)
    s.add(th >= 0, th <= 1, hat >= 0, hat <= 1)

    def ends(x: z3.ArithRef) -> tuple[z3.ArithRef, z3.ArithRef]:
        return a0 + x * af, a0 + x * af + b_r + (1 - x) * bf  # A and S = A + B at x

    (a1, s1), (a2, s2) = ends(th), ends(hat)
    kappa = af * (b_r + bf) + a0 * bf  # F'(x) = kappa / S(x)^2 - mf
    # F(theta) > F(theta_hat) + F'(theta_hat)(theta - theta_hat), the M terms cancelled and S1 S2^2 > 0
    # multiplied out
    s.add(a1 * s2 * s2 - a2 * s1 * s2 > kappa * (th - hat) * s1)
    return s.check()


def _tanh(factor: z3.ArithRef | float) -> tuple[z3.CheckSatResult, z3.Solver, list, list, list]:
    s = _solver()
    pi, u, e = _family(s, 2, uniform=True)
    total = pi[0] * u[0] + pi[1] * u[1]
    gain = pi[0] * u[0] / total - pi[0]  # the set {0}; {1} is symmetric, the others give 0
    s.add(gain > factor * (e[0] - 1) / (e[0] + 1))
    return s.check(), s, pi, u, e


def prove() -> z3.CheckSatResult:
    results = [_set_form(n) for n in (1, 2, 3, 4)] + [_valley(), _edge_tangent(), _tanh(1)[0]]
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened: tanh(R/2) / 2 as the uniform-radius bound."""
    r, s, pi, u, e = _tanh(z3.RealVal(1) / 2)
    if r != z3.sat:
        return r, "no counterexample"
    m = s.model()

    def val(v: z3.ArithRef) -> float:
        f = m.eval(v, model_completion=True).as_fraction()
        return float(mpmath.mpf(f.numerator) / f.denominator)

    pis, us, big_e = [val(v) for v in pi], [val(v) for v in u], val(e[0])
    total = sum(a * b for a, b in zip(pis, us))
    tv = sum(abs(a * b / total - a) for a, b in zip(pis, us)) / 2
    radius = torch.tensor([[mpmath.log(big_e)] * 2], dtype=torch.float64)
    # replay through certkv.tv: its real bounds cover the counterexample, the halved one does not
    real_tanh = float(tanh_bound(radius.amax(-1))[0])
    real_tv = float(tv_bound(torch.tensor([pis], dtype=torch.float64), radius)[0])
    assert tv > real_tanh / 2 and tv <= real_tv + 1e-12 and tv <= real_tanh + 1e-12
    return r, (
        f"pi={pis}, u={us}, e^R={big_e}: TV = {tv:.6g} > tanh(R/2)/2 = {real_tanh / 2:.6g}; "
        f"certkv's bound {real_tv:.6g}"
    )
