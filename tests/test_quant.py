"""Quantizer: radius soundness (exact arithmetic), packing, dequantization rounding, layouts."""

import itertools

import pytest
import torch

from certkv.quant import DEQUANT_REL, pack, quantize, unpack
from certkv.rounding import QUANT_SLACK


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_is_identity_over_all_codes(bits):
    per = 8 // bits
    codes = torch.tensor(list(itertools.product(range(1 << bits), repeat=per)), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)


def _cases():
    gen = torch.Generator().manual_seed(3)
    for dtype, bits, (axis, group) in itertools.product(
        (torch.float16, torch.bfloat16), (2, 4, 8), (("token", 8), ("channel", 8), ("channel", 16))
    ):
        x = torch.randn(2, 2, 16, 16, generator=gen) * torch.logspace(-3, 2, 16)
        x[0, 0, :, 1] = 7.0  # a constant group: scale 0, radius 0
        x[1, 1, 3, :] *= 100  # an outlier token (finite in FP16)
        assert torch.isfinite(x.to(dtype)).all()
        yield x.to(dtype), bits, axis, group


@pytest.mark.parametrize("x,bits,axis,group", list(_cases()))
def test_radius_bounds_the_exact_dequantization_error(x, bits, axis, group):
    qt = quantize(x, bits, axis, group)
    c, s, z = qt.exact_parts()
    # codes*scale+zero is exact in float64 for 16-bit scales of moderate exponent range
    err = (c * s + z - x.double()).abs()
    assert bool((err <= s * (0.5 + QUANT_SLACK)).all())
    assert bool((err <= qt.radius().double()).all())
    assert bool((qt.unpacked_codes() <= qt.levels).all())


def test_radius_is_half_a_step_not_more():
    x = torch.randn(1, 1, 64, 32).half()
    qt = quantize(x, 4, "channel", 32)
    ratio = (qt.radius().double() / (qt._expand(qt.scale).double() / 2)).max().item()
    assert 1.0 <= ratio < 1.001


def test_dequantization_rounding_within_its_bound():
    x = (torch.randn(2, 3, 32, 64) * 5 + 40).half()  # zero points far from 0: cancellation in c*s+z
    qt = quantize(x, 8, "token", 32)
    c, s, z = qt.exact_parts()
    got = qt.dequantize().double()
    assert bool(((got - (c * s + z)).abs() <= DEQUANT_REL * qt.magnitude()).all())


def test_scale_covers_the_group_range_exactly():
    # values whose range needs the scale rounded up to be covered
    x = torch.tensor([0.0, 1.0 + 2**-10, 2.0 - 2**-10, 3.0 - 2**-9], dtype=torch.float16).reshape(1, 1, 1, 4)
    qt = quantize(x, 2, "channel", 4)
    s, z = qt.scale.double(), qt.zero.double()
    assert bool((z + qt.levels * s >= x.double().amax(-1, keepdim=True)).all())


def test_bit_packed_storage_sizes():
    x = torch.randn(1, 2, 128, 64).half()
    for bits, per_elem in ((8, 1.0), (4, 0.5), (2, 0.25)):
        qt = quantize(x, bits, "channel", 64)
        assert qt.codes.numel() == int(x.numel() * per_elem)
