"""Key transforms: the basis a policy quantizes keys in, with the bounds that carry its error back.

A transform is an invertible linear map per token, k = T_i x. Keys are quantized in the basis x
(``to_basis``), and the step uses k_used = fl32(T_i x_hat) (``from_basis``). For the logit,

    q . k_used - q . k = q . (k_used - T_i x_hat) + (T_i^T q) . (x_hat - x*)

The first term is bounded per element by ``from_basis``'s ``delta`` (original basis, paired with |q|);
the second by ``dual(q) . pair(r)`` for any |x_hat - x*| <= r elementwise (docs/theory.md, "Key
transforms"; proofs/ lemma 7 checks the pairing inequality of RoPE).

* ``RoPE``: pre-RoPE keys (KVQuant): T_i is the rotation of pairs (j, j + D/2) by position i times
  theta^(-2j/D), with binary32 cos/sin entries. Position-free bound: per pair,
  |u . e| <= ||M_i|| ||q_pair|| ||r_pair||, ||M_i|| <= 1 + 2^-20.
* ``Hadamard``: a randomized Hadamard rotation (signs from a seed): x = H diag(sigma) k / n1 with H the
  Sylvester +-1 matrix and n1 = 2^ceil(log2(D) / 2), so T = diag(sigma) H^T n1 / D exactly (dyadic).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from certkv import errors
from certkv.codebook import TINY32, up32
from certkv.rounding import U32, U64, gamma


class KeyTransform(Protocol):
    def to_basis(self, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 x [B, H, T, D] and x_err >= |x - x*| with T_i x* = k exactly (k 16-bit, pos [T])."""
        ...

    def from_basis(self, x: torch.Tensor, pos: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """binary32 k_used = fl32(T'_i x) [B, H, T, D] (x binary32) and binary32
        delta >= |k_used - T'_i x| + |(T'_i - T_i) x*| for every x* with |x - x*| <= r."""
        ...

    def dual(self, q: torch.Tensor) -> torch.Tensor:
        """float64 a [..., D] >= 0 with |(T_i^T q) . e| <= a . pair(r) for every i and |e| <= r."""
        ...

    def pair(self, r: torch.Tensor) -> torch.Tensor:
        """float64 radii in the pairing ``dual`` expects, [..., D]."""
        ...

    def sensitivity(self, q: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of (T^T q)_j^2 in the basis, [..., D] (calibration weights, not a bound)."""
        ...


class RoPE:
    """Rotary position embedding (rotate-half convention), token position = cache index.

    The cos/sin table is recomputed at each call. Two float64 evaluations of cos or sin at the same
    angle can differ by an ulp (torch's vectorised and scalar paths), so the binary32 tables of two
    calls can differ by one binary32 ulp: |c' - c| <= 2^-23 |c| + 2^-149 <= TABLE_GAP, provided each
    float64 evaluation is faithful (within an ulp; ``tests/test_transforms.py`` measures it against
    mpmath). ``from_basis`` charges (M' - M) x* to delta."""

    TABLE_GAP = 2.0**-22

    def __init__(self, head_dim: int, theta: float) -> None:
        if head_dim % 2:
            raise errors.ConfigError(f"pre-RoPE keys need an even head_dim, got {head_dim}")
        self.half = head_dim // 2
        self.theta = theta

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """binary32 cos and sin [T, D/2], widened to float64 (the same numbers every call)."""
        j = torch.arange(self.half, dtype=torch.float64, device=pos.device)
        angle = pos.to(torch.float64)[:, None] * self.theta ** (-2.0 * j / (2 * self.half))
        return torch.cos(angle).float().double(), torch.sin(angle).float().double()

    def to_basis(self, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = self._cos_sin(pos)
        k1, k2 = k.double().split(self.half, dim=-1)
        norm = c * c + s * s
        # c*k1 and s*k2 are exact (24 x 11 or 8 bits); one rounding each for the sum, the norm and the
        # quotient: relative 3.01 u64 of (|c k1| + |s k2|) / norm, norm >= 1 - 2^-21
        x = torch.cat([(c * k1 + s * k2) / norm, (c * k2 - s * k1) / norm], dim=-1)
        err = 4 * U64 * (k1.abs() + k2.abs())
        return x, torch.cat([err, err], dim=-1)

    def from_basis(self, x: torch.Tensor, pos: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = self._cos_sin(pos)
        x1, x2 = x.double().split(self.half, dim=-1)
        # products exact (24 x 24 bits), one float64 rounding of the difference, then the binary32 cast
        k = torch.cat([c * x1 - s * x2, s * x1 + c * x2], dim=-1).float()
        pair = 1.01 * U64 * (x1.abs() + x2.abs())
        # a table one ulp off the one to_basis used: every entry of M' - M is <= TABLE_GAP
        r1, r2 = r.double().split(self.half, dim=-1)
        pair = pair + self.TABLE_GAP * (x1.abs() + r1 + x2.abs() + r2) * (1 + 2.0**-40)
        delta = 1.0001 * U32 * k.double().abs() + torch.cat([pair, pair], dim=-1) + TINY32
        return k, up32(delta)

    def dual(self, q: torch.Tensor) -> torch.Tensor:
        q1, q2 = q.double().split(self.half, dim=-1)
        norm = torch.sqrt(q1 * q1 + q2 * q2) * ((1 + 2.0**-20) * (1 + 2.0**-50))
        return torch.cat([norm, torch.zeros_like(norm)], dim=-1)

    def pair(self, r: torch.Tensor) -> torch.Tensor:
        r1, r2 = r.double().split(self.half, dim=-1)
        norm = torch.sqrt(r1 * r1 + r2 * r2) * (1 + 2.0**-50)
        return torch.cat([norm, torch.zeros_like(norm)], dim=-1)

    def sensitivity(self, q: torch.Tensor) -> torch.Tensor:
        q1, q2 = q.double().split(self.half, dim=-1)
        energy = (q1 * q1 + q2 * q2) / 2  # a rotation spreads a pair's energy over both coordinates
        return torch.cat([energy, energy], dim=-1).flatten(0, -2).mean(0)


class Hadamard:
    """Randomized Hadamard rotation of keys; ``seed`` draws the signs."""

    def __init__(self, head_dim: int, seed: int) -> None:
        if head_dim < 2 or head_dim & (head_dim - 1):
            raise errors.ConfigError(f"the Hadamard transform needs a power-of-two head_dim, got {head_dim}")
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < head_dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        self.h = h
        gen = torch.Generator().manual_seed(seed)
        self.sign = (torch.randint(0, 2, (head_dim,), generator=gen) * 2 - 1).double()
        self.d = head_dim
        self.n1 = 2.0 ** math.ceil(math.log2(head_dim) / 2)

    def _apply(self, y: torch.Tensor, transpose: bool) -> torch.Tensor:
        h = self.h.to(y.device)
        return torch.matmul(y, h if transpose else h.T)

    def to_basis(self, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kd = k.double()
        x = self._apply(kd * self.sign.to(k.device), transpose=False) / self.n1  # /n1 exact
        err = gamma(self.d, U64) * kd.abs().sum(-1, keepdim=True) / self.n1
        return x, err.expand_as(x)

    def from_basis(self, x: torch.Tensor, pos: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # T' = T exactly (integer matrix, power-of-two scaling): r is not needed
        xd = x.double()
        factor = self.n1 / self.d  # a power of two
        k = (self._apply(xd, transpose=True) * self.sign.to(x.device) * factor).float()
        summed = gamma(self.d, U64) * xd.abs().sum(-1, keepdim=True) * factor
        return k, up32(1.0001 * U32 * k.double().abs() + summed + TINY32)

    def dual(self, q: torch.Tensor) -> torch.Tensor:
        qd = q.double()
        y = self._apply(qd * self.sign.to(q.device), transpose=False).abs()
        err = gamma(self.d, U64) * qd.abs().sum(-1, keepdim=True)
        return (y + err) * (self.n1 / self.d) * (1 + 4 * U64)

    def pair(self, r: torch.Tensor) -> torch.Tensor:
        return r.double()

    def sensitivity(self, q: torch.Tensor) -> torch.Tensor:
        y = self._apply(q.double() * self.sign.to(q.device), transpose=False) * (self.n1 / self.d)
        return (y * y).flatten(0, -2).mean(0)


def make(kind: str, head_dim: int, rope_theta: float, seed: int) -> KeyTransform | None:
    """The transform a ``CertConfig.key_transform`` names (None for ``"none"``)."""
    if kind == "none":
        return None
    if kind == "rope":
        return RoPE(head_dim, rope_theta)
    if kind == "hadamard":
        return Hadamard(head_dim, seed)
    raise errors.ConfigError(f"key_transform={kind!r}: must be 'none', 'rope' or 'hadamard'")
