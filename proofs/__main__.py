"""Run every lemma and its mutation check; exit 1 if a lemma is not proven or a mutation survives."""

from __future__ import annotations

import sys
import time

import z3

from proofs import (
    lemma_centred_key,
    lemma_codebook,
    lemma_decomposition,
    lemma_dense_transfer,
    lemma_fp16_inputs,
    lemma_ladder,
    lemma_packing,
    lemma_quant_radius,
    lemma_rounding,
    lemma_softmax,
    lemma_streaming,
    lemma_transforms,
)

LEMMAS = (lemma_quant_radius, lemma_packing, lemma_softmax, lemma_decomposition, lemma_rounding, lemma_ladder,
          lemma_codebook, lemma_transforms, lemma_streaming, lemma_fp16_inputs, lemma_dense_transfer,
          lemma_centred_key)  # fmt: skip


def main() -> int:
    failed = 0
    for mod in LEMMAS:
        t0 = time.time()
        proved = mod.prove()
        mut, detail = mod.mutation()
        ok = proved == z3.unsat and mut == z3.sat
        failed += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {mod.__name__}: {mod.LEMMA}")
        print(f"    theory: {mod.THEORY}; claim: {proved} (unsat = proven); mutation: {mut}; {time.time() - t0:.1f}s")
        print(f"    mutation counterexample: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
