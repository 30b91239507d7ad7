"""Lemma 5: the floating-point error model behind ``rounding_term`` and the logit radius rho.

Every binary32 operation is taken as correctly rounded: fl(a op b) = (a op b)(1 + d), |d| <= u = 2^-24
(the IEEE standard model; lemma 1 checks one instance bit-exactly with FPA). Under it, in real
arithmetic:

(i)   recursive summation of n <= 3 terms errs by at most gamma_n * sum |x_i| (gamma_n = nu/(1 - nu));
(ii)  dequantization fl(fl(c*s) + z) is within 2.0001 u (|c*s| + |z|) of c*s + z;
(iii) the normalisation used by certkv: if |acc - N| <= E_N, |l - L| <= E_L, L >= 1 and l > 0, then
      |acc/l - N/L| <= (E_N + (|acc| + E_N) E_L / max(1, l - E_L)) / l.
The accuracy of exp (EXP_REL, EXP_ABS) is an assumption measured by tests/test_rounding.py, not proven.
"""

from __future__ import annotations

import mpmath
import z3

LEMMA = "gamma_n summation (n <= 3), two-rounding dequantization, and the quotient bound of rounding_term"
THEORY = "nonlinear real arithmetic (NRA) over the IEEE standard model |d| <= 2^-24"
U = z3.RealVal(2) ** -24


def _abs(x: z3.ArithRef) -> z3.ArithRef:
    return z3.If(x >= 0, x, -x)


def _delta(s: z3.Solver, name: str) -> z3.ArithRef:
    d = z3.Real(name)
    s.add(d <= U, -d <= U)
    return d


def _summation(n: int) -> z3.CheckSatResult:
    s = z3.Solver()
    s.set("timeout", 60_000)
    xs = [z3.Real(f"x{i}") for i in range(n)]
    acc = xs[0]
    for i in range(1, n):
        acc = (acc + xs[i]) * (1 + _delta(s, f"d{i}"))
    gamma = n * U / (1 - n * U)
    s.add(_abs(acc - z3.Sum(xs)) > gamma * z3.Sum([_abs(x) for x in xs]))
    return s.check()


def _dequantization() -> z3.CheckSatResult:
    s = z3.Solver()
    c, sc, z = z3.Reals("c s z")
    got = (c * sc * (1 + _delta(s, "d1")) + z) * (1 + _delta(s, "d2"))
    s.add(c >= 0, _abs(got - (c * sc + z)) > z3.RealVal("2.0001") * U * (_abs(c * sc) + _abs(z)))
    return s.check()


def _quotient(form: str) -> tuple[z3.CheckSatResult, z3.Solver]:
    """The bound of ``certkv.rounding.quotient_bound`` ("full"); two weakened forms: without its E_L
    term ("no_el", with a margin of 1/1000 so the replay in float64 cannot be decided by rounding), and
    with E_L over l where the bound divides by max(1, l - E_L) ("over_l": L taken as l)."""
    s = z3.Solver()
    acc, big_n, l_, big_l, e_n, e_l = z3.Reals("acc N l L EN EL")
    s.add(e_n >= 0, e_l >= 0, big_l >= 1, l_ > 0, _abs(acc - big_n) <= e_n, _abs(l_ - big_l) <= e_l)
    floor = {"full": z3.If(l_ - e_l > 1, l_ - e_l, z3.RealVal(1)), "over_l": l_}.get(form)  # L >= max(1, l - E_L)
    if floor is None:
        s.add(_abs(acc / l_ - big_n / big_l) > e_n / l_ + z3.RealVal("0.001"))
    else:
        s.add(_abs(acc / l_ - big_n / big_l) > (e_n + (_abs(acc) + e_n) * e_l / floor) / l_)
    return s.check(), s


def prove() -> z3.CheckSatResult:
    results = [_summation(n) for n in (2, 3)] + [_dequantization(), _quotient("full")[0]]
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened: ignore the error of the denominator l (E_L = 0). The counterexample is replayed
    through the runtime's own ``certkv.rounding.quotient_bound``: with E_L dropped it is violated,
    with E_L it holds. Also refuted: the E_L term over l instead of max(1, l - E_L)."""
    import torch

    from certkv.rounding import quotient_bound

    if _quotient("over_l")[0] != z3.sat:  # the denominator of the E_L term cannot be l itself
        return z3.unsat, "no counterexample to E_L / l"
    r, s = _quotient("no_el")
    if r != z3.sat:
        return r, "no counterexample"
    m = s.model()

    def val(name: str) -> mpmath.mpf:
        f = m.eval(z3.Real(name), model_completion=True).as_fraction()
        return mpmath.mpf(f.numerator) / f.denominator

    acc, big_n, l_, big_l, e_n, e_l = (val(x) for x in ("acc", "N", "l", "L", "EN", "EL"))
    actual = abs(acc / l_ - big_n / big_l)

    def runtime(err_den: mpmath.mpf) -> float:
        t = [torch.tensor(float(x), dtype=torch.float64) for x in (abs(acc), e_n, err_den, l_)]
        return float(quotient_bound(*t))

    weak, full = runtime(mpmath.mpf(0)), runtime(e_l)
    assert actual > weak * (1 + 1e-12), "the mutated runtime bound should be violated"
    assert actual <= full * (1 + 1e-12), "the runtime bound must hold"
    return r, (
        f"acc={acc}, N={big_n}, l={l_}, L={big_l}, E_N={e_n}, E_L={e_l}: |acc/l - N/L| = {actual} > "
        f"quotient_bound without E_L = {weak} (with E_L: {full})"
    )
