"""Solver-checked lemmas behind certkv's runtime bounds (z3). ``python -m proofs`` runs them all.

Each lemma module exposes ``LEMMA`` (its statement), ``THEORY`` (the solver theory used), ``prove()``
(returns the z3 result of the negated claim; ``unsat`` means proven) and ``mutation()`` (a weakened
claim that must be ``sat``; its counterexample is replayed through certkv's own code, which must show
the violation). Lemmas: quantizer radius (1), packing (2), softmax perturbation (3), the error decomposition (4),
rounding (5) and the ladder (6); each module's docstring says what is proven generally and what only
up to a size.
"""
