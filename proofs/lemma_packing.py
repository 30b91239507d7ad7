"""Lemma 2: INT4/INT2 pack -> unpack is the identity over all codes (bit-vectors, every code)."""

from __future__ import annotations

import torch
import z3

from certkv.quant import pack, unpack

LEMMA = "for bits in {2, 4}: unpack(pack(c)) == c for every tuple of 8/bits codes c < 2^bits"
THEORY = "QF_BV (8-bit vectors)"


def _roundtrip(bits: int, mask: int) -> tuple[list[z3.BitVecRef], list[z3.BitVecRef]]:
    """The byte layout of certkv.quant: code k in bits [bits*k, bits*(k+1)), lowest index lowest."""
    per = 8 // bits
    codes = [z3.BitVec(f"c{k}", 8) for k in range(per)]
    byte = z3.BitVecVal(0, 8)
    for k, c in enumerate(codes):
        byte = byte | (c << (bits * k))
    return codes, [z3.LShR(byte, bits * k) & mask for k in range(per)]


def _solve(bits: int, mask: int) -> tuple[z3.CheckSatResult, z3.ModelRef | None, list[z3.BitVecRef]]:
    codes, back = _roundtrip(bits, mask)
    s = z3.Solver()
    s.add(*[z3.ULT(c, 1 << bits) for c in codes])
    s.add(z3.Or(*[b != c for b, c in zip(back, codes)]))
    r = s.check()
    return r, (s.model() if r == z3.sat else None), codes


def prove() -> z3.CheckSatResult:
    results = [_solve(bits, (1 << bits) - 1)[0] for bits in (2, 4)]
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened: unpack with the mask 2^bits instead of 2^bits - 1 (an off-by-one)."""
    bits = 4
    r, model, codes = _solve(bits, 1 << bits)
    if model is None:
        return r, "no counterexample"
    cex = torch.tensor([[model.eval(c, model_completion=True).as_long() for c in codes]], dtype=torch.uint8)
    packed = pack(cex, bits)  # certkv's own packer
    real = unpack(packed, bits)  # certkv's own unpacker: exact
    wrong = torch.stack([(packed >> (bits * k)) & (1 << bits) for k in range(8 // bits)], -1).reshape(cex.shape)
    assert torch.equal(real, cex) and not torch.equal(wrong, cex)
    return r, f"codes {cex.tolist()} pack to {packed.tolist()}; the mutated mask unpacks {wrong.tolist()}"
