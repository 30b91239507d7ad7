"""Solver-checked lemmas behind certkv's runtime bounds (z3). ``python -m proofs`` runs them all.

Each lemma module exposes ``LEMMA`` (its statement), ``THEORY`` (the solver theory used), ``prove()``
(returns the z3 result of the negated claim; ``unsat`` means proven) and ``mutation()`` (a weakened
claim that must be ``sat``; its counterexample is replayed through certkv's own code, which must show
the violation). Lemmas present so far: quantizer radius (1), packing (2), softmax perturbation (3), the error
decomposition (4) and the ladder (6); the rounding lemma (5) of the proofs issue is still open.
"""
