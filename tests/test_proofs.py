"""The solver-checked lemmas run under pytest too: each is proven and each mutation is caught."""

import pytest
import z3

from proofs.__main__ import LEMMAS


@pytest.mark.parametrize("lemma", LEMMAS, ids=lambda m: m.__name__)
def test_lemma_is_proven_and_its_mutation_is_caught(lemma):
    assert lemma.prove() == z3.unsat
    result, detail = lemma.mutation()
    assert result == z3.sat, detail
