"""Lemma 9: the three facts behind the decode kernel's certificate (docs/theory.md section 8).

(i)   A product of k computed factors, each within a*f + b of an exact f in [0, 1] (a, b >= 0), is
      within A_k prod f + B_k of the exact product, A_k = (1 + a)^k - 1, B_k = k b (1 + a + b)^(k-1):
      the weight of a token after its own exp2 and k - 1 rescales (``certkv.streaming.product_error``).
      Checked for k = 1, 2 (k = 3, and the induction step below in general form, do not finish in a
      minute). Larger k by induction, on paper: from |P~ - P| <= A P + B (P in [0, 1]) one more factor
      gives ((1+A)(1+a) - 1) P f + b(1 + A) + B(1 + a + b), and b(1 + A_k) + B_k(1 + a + b) <= B_(k+1)
      since (1 + a)^k <= (1 + a + b)^k.
(ii)  Block masses: if |M - M*| <= c M* + b, M >= 2^20 b > 0 and c <= 2^-10, then with x = c + b/M,
      1 - x <= M*/M <= 1/(1 - x), so |log(M*/M)| <= -log(1 - x) <= 2x (the last step is the scalar
      inequality -log(1 - x) <= x/(1 - x) for x <= 1/2).
(iii) Dust: for weights w_i with sum w >= 1 and any u_i in [1/r, r] (r = e^R), the share of a set T
      under w u is at most r^2 w(T): p(dust) <= e^(2R) D. Checked for two and three tokens.
"""

from __future__ import annotations

import z3

LEMMA = "streamed certificate: product of perturbed factors (k <= 2), block-mass log-ratio, dust share"
THEORY = "nonlinear real arithmetic (NRA)"


def _abs(x: z3.ArithRef) -> z3.ArithRef:
    return z3.If(x >= 0, x, -x)


def _product(k: int, absolute_term: bool) -> tuple[z3.CheckSatResult, z3.Solver, list[z3.ArithRef]]:
    s = z3.Solver()
    s.set("timeout", 60_000)
    a, b = z3.Reals("a b")
    s.add(a >= 0, b >= 0, a <= z3.RealVal(1) / 4, b <= z3.RealVal(1) / 4)
    fs = [z3.Real(f"f{i}") for i in range(k)]
    gs = [z3.Real(f"g{i}") for i in range(k)]
    for f, g in zip(fs, gs):
        s.add(f >= 0, f <= 1, _abs(g - f) <= a * f + b)
    exact, got = z3.RealVal(1), z3.RealVal(1)
    for f, g in zip(fs, gs):
        exact, got = exact * f, got * g
    bound = ((1 + a) ** k - 1) * exact
    if absolute_term:
        bound = bound + k * b * (1 + a + b) ** (k - 1)
    s.add(_abs(got - exact) > bound)
    return s.check(), s, [a, b, *fs, *gs]


def _log_ratio() -> z3.CheckSatResult:
    s = z3.Solver()
    m, m_star, c, b = z3.Reals("M Mstar c b")
    s.add(b > 0, m >= 2**20 * b, c >= 0, c <= z3.RealVal(2) ** -10, m_star >= 0, _abs(m - m_star) <= c * m_star + b)
    x = c + b / m
    s.add(z3.Or(m_star / m < 1 - x, m_star / m > 1 / (1 - x)))
    return s.check()


def _dust(n: int) -> z3.CheckSatResult:
    s = z3.Solver()
    r = z3.Real("r")
    s.add(r >= 1)
    w = [z3.Real(f"w{i}") for i in range(n)]
    u = [z3.Real(f"u{i}") for i in range(n)]
    for wi, ui in zip(w, u):
        s.add(wi >= 0, ui * r >= 1, ui <= r)
    s.add(z3.Sum(w) >= 1)
    share = w[0] * u[0] / z3.Sum([wi * ui for wi, ui in zip(w, u)])  # token 0 is the dust
    s.add(share > r * r * w[0])
    return s.check()


def prove() -> z3.CheckSatResult:
    results = [_product(k, True)[0] for k in (1, 2)] + [_log_ratio()] + [_dust(n) for n in (2, 3)]
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened: the product bound without its absolute term. The solver's counterexample is replayed
    through ``certkv.streaming.product_error``: the mutated (relative-only) bound is below the error,
    the runtime's bound is above it."""
    import torch

    from certkv.streaming import product_error

    r, s, (a, b, *rest) = _product(2, False)
    if r != z3.sat:
        return r, "no counterexample"
    model = s.model()

    def val(x: z3.ArithRef) -> float:
        v = model.eval(x, model_completion=True)
        return float(v.as_fraction()) if z3.is_rational_value(v) else float(v.approx(20).as_fraction())

    fs, gs = [val(x) for x in rest[:2]], [val(x) for x in rest[2:]]
    err = abs(gs[0] * gs[1] - fs[0] * fs[1])
    rel, absolute = product_error(torch.tensor(2.0, dtype=torch.float64), val(a), val(b))
    mutated = float(rel) * fs[0] * fs[1]
    runtime = mutated + float(absolute)
    assert mutated < err <= runtime, (mutated, err, runtime)
    return r, (
        f"f = {fs}, f~ = {gs}, a = {val(a):.3g}, b = {val(b):.3g}: |error| = {err:.4g} > relative-only "
        f"{mutated:.4g}; product_error's bound {runtime:.4g} holds"
    )
