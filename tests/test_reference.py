"""The exact reference's integer conversion: the vectorised path equals the per-element definition."""

import numpy as np
import pytest
import torch

from certkv.reference.exact import EXP, _ints, _ints_slow, _parts_to_ints


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("wide", [False, True])
def test_fast_integer_conversion_is_exact(dtype, wide):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 16, generator=gen) * 3).to(dtype)
    x[0, :3] = torch.tensor([0.0, -0.0, 1.0])
    if wide and dtype != torch.float16:  # a span no int64 holds: the per-element path takes over
        x[1, 0], x[1, 1] = 1e30, 1e-30
    if dtype != torch.float16:
        x[2, 0] = torch.finfo(dtype).tiny / 2**3  # subnormal
    got = _ints(x)
    want = _ints_slow(x.double().reshape(-1).numpy()).reshape(x.shape)
    assert got.dtype == object and (got == want).all()
    assert int(got[0, 2]) == 1 << EXP


def test_non_float32_values_are_rejected():
    with pytest.raises(ValueError, match="not a multiple"):
        _ints(torch.tensor([2.0**-160], dtype=torch.float64))


def test_dequantized_parts_exact_in_both_paths():
    codes = torch.tensor([[0.0, 255.0, 7.0]], dtype=torch.float64)
    scale = torch.tensor([[2.0**-10, 2.0**-10, 3.0]], dtype=torch.float64)
    zero = torch.tensor([[1.5, -(2.0**-20), 2.0**60]], dtype=torch.float64)  # last: not exact in float64
    got = _parts_to_ints((codes, scale, zero))
    want = np.array(
        [[int(codes[0, j]) * _ints_slow(scale[0].numpy())[j] + _ints_slow(zero[0].numpy())[j] for j in range(3)]],
        dtype=object,
    )
    assert (got == want).all()
