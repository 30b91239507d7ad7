"""Lemma 6: a mixed-precision (ladder) step is certified by the same formulas with the fetched tokens'
radii set to zero.

A fetched token serves its original row, so its logit moves by exactly 0 (u_i = 1) and its value error
is 0: the per-set worst case of lemma 3 holds with E_i = 1 for those tokens, proven for n <= 3 tokens
with any subset fetched (NRA). In code, ``certkv.ladder`` builds the stage's tokens with the originals
substituted and calls the same ``certified_step`` (checked by tests/test_cache.py and the property
suites at every stage).

Mutation: zero the radii *without* substituting the originals (the quantized row is still served).
The solver finds u_i != 1 with E_i = 1 violating the set bound; the replay runs certkv's own
``certified_step`` on such tokens and the exact reference shows a violated ``tv_bound``.
"""

from __future__ import annotations

import torch
import z3

from certkv.attention import certified_step
from certkv.cache import TieredKVCache
from certkv.config import CertConfig
from certkv.reference.exact import exact_step

LEMMA = "stage bounds = the formulas with fetched tokens' radii zero (set form with E_i = 1, n <= 3)"
THEORY = "nonlinear real arithmetic (NRA), n <= 3 tokens, every fetched subset"


def _check(n: int, substitute: bool) -> z3.CheckSatResult:
    s = z3.Solver()
    s.set("timeout", 60_000)
    pi = [z3.Real(f"pi{i}") for i in range(n)]
    u = [z3.Real(f"u{i}") for i in range(n)]
    e = [z3.Real(f"E{i}") for i in range(n)]  # the radius the bound uses
    e_true = [z3.Real(f"T{i}") for i in range(n)]  # the quantized token's real radius
    inv = [z3.Real(f"inv{i}") for i in range(n)]
    fetched = [z3.Bool(f"F{i}") for i in range(n)]
    member = [z3.Bool(f"A{i}") for i in range(n)]
    s.add(z3.Sum(pi) == 1, *[p >= 0 for p in pi])
    for i in range(n):
        s.add(e_true[i] >= 1, inv[i] * e[i] == 1)
        s.add(e[i] == z3.If(fetched[i], 1, e_true[i]))
        moved = 1 if substitute else e_true[i]  # fetched: the original row (u = 1) or still quantized
        s.add(
            z3.If(
                fetched[i], z3.And(u[i] * moved >= 1, u[i] <= moved), z3.And(u[i] * e_true[i] >= 1, u[i] <= e_true[i])
            )
        )
    total = z3.Sum([pi[i] * u[i] for i in range(n)])
    p_a = z3.Sum([z3.If(member[i], pi[i] * u[i], 0) for i in range(n)])
    a = z3.Sum([z3.If(member[i], pi[i] * e[i], 0) for i in range(n)])
    b = z3.Sum([z3.If(member[i], 0, pi[i] * inv[i]) for i in range(n)])
    s.add(z3.Or(*member), p_a * (a + b) > a * total)
    return s.check()


def prove() -> z3.CheckSatResult:
    results = [_check(n, substitute=True) for n in (1, 2, 3)]
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def mutation() -> tuple[z3.CheckSatResult, str]:
    r = _check(2, substitute=False)
    if r != z3.sat:
        return r, "no counterexample"
    # replay: INT2 keys, every key radius zeroed while the quantized keys are still served
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 64, 16, generator=gen).half()
    v = torch.randn(1, 1, 64, 16, generator=gen).half()
    q = (torch.randn(1, 1, 1, 16, generator=gen) * 4).half()
    cache = TieredKVCache(
        1, 1, 16, config=CertConfig(key_bits=2, key_group_size=16, value_group_size=16, window=0, sinks=0)
    )
    cache.append(0, k, v)
    tokens = cache.tokens(0)
    tokens.k_radius.zero_()
    _, cert, _ = certified_step(q, tokens, 0.25, torch.float16)
    kp, vp = cache.dequantized_exact(0)
    ex = exact_step(
        q[0, 0, 0], k[0, 0], v[0, 0], tuple(x[0, 0] for x in kp), tuple(x[0, 0] for x in vp), q[0, 0, 0], 0.25
    )
    claimed = float(cert.tv_bound.flatten()[0])
    assert claimed < float(ex.tv)
    return r, f"radii zeroed, quantized keys kept: certkv claims TV <= {claimed:.3g}, exact TV = {float(ex.tv):.3g}"
