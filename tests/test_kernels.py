"""The decode kernel against its torch reference (float64 from the same Tier-1 tensors) and against
certkv's own stage-0 torch path. On the CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from certkv.kernels.decode import (
    BYTES_F16,
    BYTES_F32,
    code_descriptors,
    combine,
    decode,
    decode_partials,
    decode_reference,
    from_cache,
    splits_for,
)

import certkv
from certkv.streaming import serving_launch
from tests.helpers import make_kv, make_q

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def filled_cache(b: int, hkv: int, n: int, dtype: torch.dtype, seed: int = 0, d: int = 128) -> certkv.TieredKVCache:
    k, v = make_kv(b=b, hkv=hkv, n=n, d=d, dtype=dtype, seed=seed, outlier=6.0)
    cache = certkv.TieredKVCache(1, hkv, d, config=certkv.CertConfig(max_stage=0), device=DEVICE)
    cache.append(0, k.to(DEVICE), v.to(DEVICE))
    return cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, hkv, g, n, splits", [(1, 1, 4, 400, None), (2, 2, 2, 700, 3), (1, 2, 1, 390, 1)])
def test_kernel_matches_float64_reference(dtype, b, hkv, g, n, splits):
    cache = filled_cache(b, hkv, n, dtype)
    t1 = from_cache(cache, 0)
    q = make_q(b=b, hq=hkv * g, d=128, dtype=dtype, seed=3, scale=2.0).to(DEVICE).reshape(b, hkv, g, 128)
    scale = 128**-0.5
    got = combine(decode_partials(q, t1, scale, splits), g).reshape(b, hkv, g, 128)
    want = decode_reference(q.cpu(), on_cpu(t1), scale)
    err = (got.double().cpu() - want).abs().max() / want.abs().max()
    assert err < 2e-6, err  # binary32 arithmetic throughout, against float64 on identical inputs


def on_cpu(t1):

    return t1.map(lambda t: t.cpu())


def test_kernel_output_agrees_with_certkvs_stage0_path():
    cache = filled_cache(1, 2, 650, torch.bfloat16, seed=5)
    q = make_q(b=1, hq=4, d=128, dtype=torch.bfloat16, seed=6, scale=2.0).to(DEVICE)
    served = cache.attend(0, q)
    assert bool((served.certificate.stage == 0).all())
    out = decode(q.reshape(1, 2, 2, 128), from_cache(cache, 0), 128**-0.5).reshape(1, 4, 1, 128)
    # both are binary32 computations of the same attention, rounded to BF16: at most a BF16 ulp apart
    assert torch.allclose(out.float(), served.output.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize(
    "precision, tol, options",
    [("tf32", 4e-3, {}), ("fp16", 4e-3, {}), ("fp16", 4e-3, {"deq16": True}), ("fp16", 4e-3, {"key_chunks": 2}),
     ("ieee", 2e-6, {"key_chunks": 2}), ("fma", 2e-6, {}), ("fma", 2e-6, {"key_chunks": 2})],
)  # fmt: skip
def test_tensor_core_variants_stay_close(precision, tol, options):
    # operands rounded to 10-bit mantissas (on the CPU interpreter: exact binary32 for tf32); key_chunks
    # only splits each logit's sum over channels in two
    cache = filled_cache(1, 2, 520, torch.float16, seed=9)
    q = make_q(b=1, hq=4, d=128, dtype=torch.float16, seed=2, scale=2.0).to(DEVICE).reshape(1, 2, 2, 128)
    t1 = from_cache(cache, 0)
    partials = decode_partials(q, t1, 128**-0.5, precision=precision, block=32, **options)
    got = combine(partials, 2).reshape(1, 2, 2, 128)
    want = decode_reference(q.cpu(), on_cpu(t1), 128**-0.5)
    assert float((got.double().cpu() - want).abs().max() / want.abs().max()) < tol


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize(
    "dtype, launch", [(torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, {"block": 64})]
)
def test_head_dims_other_than_128(d, dtype, launch):
    # the serving launches at D = 64 (one value scale group: both channel halves, and for "fma" all the
    # bytes, share it) and D = 256 (two groups per half; on a GPU the FP16 tiles must fit its shared
    # memory), and binary32 products on tensor cores ("ieee")
    launch = serving_launch(dtype, d) if launch is None else {"precision": "ieee", **launch}
    cache = filled_cache(1, 2, 390, dtype, seed=13, d=d)
    t1 = from_cache(cache, 0)
    q = make_q(b=1, hq=4, d=d, dtype=dtype, seed=14, scale=2.0).to(DEVICE).reshape(1, 2, 2, d)
    got = combine(decode_partials(q, t1, d**-0.5, 2, **launch), 2).reshape(1, 2, 2, d)
    want = decode_reference(q.cpu(), on_cpu(t1), d**-0.5)
    tol = 4e-3 if launch["precision"] == "fp16" else 2e-6  # FP16 operands: 10-bit mantissas
    assert float((got.double().cpu() - want).abs().max() / want.abs().max()) < tol


@pytest.mark.parametrize(
    "dtype, launch",
    [(torch.float16, dict(precision="fp16", block=128, key_chunks=2, num_stages=2)),
     (torch.bfloat16, dict(precision="fma", block=16, num_stages=2)),
     (torch.bfloat16, dict(precision="ieee", block=64))],
)  # fmt: skip
def test_codes_through_tma_descriptors_give_the_same_partials_bit_for_bit(dtype, launch):
    # the serving launches of both dtypes and a third: the same bytes by the copy engine or by pointer
    cache = filled_cache(2, 2, 430, dtype, seed=11)
    t1 = from_cache(cache, 0)
    tma_device = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert (code_descriptors(t1, launch["block"], key_chunks=2) is not None) == tma_device
    # "auto" leaves eager launches this small to pointers (descriptors cost host time); bad modes are refused
    assert code_descriptors(t1, launch["block"], "auto") is None
    with pytest.raises(ValueError, match="tma mode"):
        code_descriptors(t1, launch["block"], "yes")
    q = make_q(b=2, hq=4, d=128, dtype=dtype, seed=12, scale=2.0).to(DEVICE).reshape(2, 2, 2, 128)
    by_tma, by_pointer = (decode_partials(q, t1, 128**-0.5, 3, cert=True, tma=m, **launch) for m in ("on", "off"))
    assert_same_partials(by_tma, by_pointer, 2)


def assert_same_partials(a, b, g: int) -> None:
    """Every partial and statistic of two launches equal bit for bit on the g GQA rows (the padding rows
    are not written)."""
    for name in ("m", "l", "acc", "bmass", "bframe", "resc"):
        assert torch.equal(getattr(a, name)[:, :, :g], getattr(b, name)[:, :, :g]), name


def run_ptx(asm: str, word: int) -> list[int]:
    """The output registers of the kernel's ``prmt.b32`` PTX for the input register ``word``: a model of
    the instruction from the PTX manual (byte i of d is byte sel_i of the eight of {b, a}), so that the
    CPU checks the selectors the GPU test can only check through whole kernels."""
    regs: dict[str, int] = {}
    statements = [x.strip() for x in asm.split(";") if x.strip()]
    n_out = len(statements)
    regs[f"${n_out}"] = word  # the input register follows the outputs
    for x in statements:
        op, args = x.split(None, 1)
        assert op == "prmt.b32", op
        d, a, b, sel = (t.strip() for t in args.split(","))
        pool = (regs[a] if a in regs else int(a, 0)) | int(b, 0) << 32  # bytes 0-3 of a, then 4-7 of b
        regs[d] = sum(((pool >> 8 * (int(sel, 0) >> 4 * i & 7)) & 255) << 8 * i for i in range(4))
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("asm, bits", [(BYTES_F32, 32), (BYTES_F16, 16)])
def test_prmt_assembly_gives_each_code_its_biased_float_in_element_order(asm, bits):
    # four code bytes in one register, element i in byte i (Triton's packing); out: per element the bits
    # of 2^23 + code (binary32) or 2^10 + code (FP16, two a register, low half first)
    bias = 0x4B000000 if bits == 32 else 0x6400
    gen = torch.Generator().manual_seed(0)
    words = [0, 0xFFFFFFFF, 0x0F1E2D3C, *torch.randint(0, 2**32, (200,), generator=gen).tolist()]
    for word in words:
        codes = [word >> 8 * i & 255 for i in range(4)]
        regs = run_ptx(asm.value, word)
        got = [r >> bits * h & (1 << bits) - 1 for r in regs for h in range(32 // bits)]
        assert got == [bias | c for c in codes], hex(word)


@pytest.mark.skipif(DEVICE == "cpu", reason="inline PTX: Triton's interpreter has none")
@pytest.mark.parametrize(
    "dtype, d, launch",
    [(torch.float16, 128, None), (torch.bfloat16, 128, None), (torch.float16, 64, None), (torch.float16, 256, None),
     (torch.float16, 128, serving_launch(torch.float16) | {"tma": "on"}),
     (torch.float16, 128, dict(precision="fp16", deq16=True, block=64)),
     (torch.bfloat16, 128, dict(precision="ieee", block=64)), (torch.bfloat16, 128, dict(precision="fma", block=16))],
)  # fmt: skip
def test_codes_unpacked_by_prmt_give_the_same_partials_bit_for_bit(dtype, d, launch):
    # the key codes of every dequantization the kernel has (binary32 and FP16 arithmetic, tensor-core and
    # "fma" launches, code tiles through TMA and by pointer, the serving launches of three head sizes):
    # the inline PTX against Triton's own integer operations
    launch = serving_launch(dtype, d) if launch is None else launch
    cache = filled_cache(2, 2, 1100, dtype, seed=17, d=d)
    t1 = from_cache(cache, 0)
    q = make_q(b=2, hq=8, d=d, dtype=dtype, seed=18, scale=2.0).to(DEVICE).reshape(2, 2, 4, d)
    by_ptx, plain = (decode_partials(q, t1, d**-0.5, 3, cert=True, ptx=p, **launch) for p in (True, False))
    assert_same_partials(by_ptx, plain, 4)


def test_serving_tiles_never_exceed_the_bytes_of_the_d128_tiles():
    # shared memory per stage grows with block x D: above D = 128 the serving blocks shrink so that the
    # tiles measured to fit at D = 128 bound them (D = 256 at 128-token blocks needs 143 KB), and no
    # further than that (twice the block would exceed it); D = 64 takes smaller tiles still (measured
    # faster); FP16 and BF16 caches take the same launch
    for d in (64, 128, 256, 512, 1024):
        block = serving_launch(torch.float16, d)["block"]
        assert isinstance(block, int) and 128 % block == 0
        assert block * max(d, 128) <= 128 * 128
        if d >= 128:
            assert 2 * block * d > 128 * 128
        assert serving_launch(torch.bfloat16, d) == serving_launch(torch.float16, d)
    with pytest.raises(ValueError, match="FP16 and BF16"):
        serving_launch(torch.float32)


def test_split_count_fills_the_gpu_and_never_splits_below_a_block():
    # at least 33 splits per (row, head), at least 264 programs, never a split below one block
    assert splits_for(8, 131072) == 33 and splits_for(64, 131072) == 33 and splits_for(1, 131072) == 264
    assert splits_for(8, 1024) == 16 and splits_for(1, 128) == 2 and splits_for(4, 0) == 0
    # splits of at least 4 blocks (62 at 8K) unless the programs would not fill the target; never empty
    assert splits_for(64, 7936, 128, 33, 396, 4) == 15 and splits_for(8, 7936, 128, 33, 396, 4) == 50
    assert splits_for(64, 256, 128, 33, 396, 4) == 2 and splits_for(64, 131072, 128, 33, 396, 4) == 33


def test_layouts_the_kernel_does_not_implement_are_refused():
    k, v = make_kv(b=1, hkv=1, n=400, d=128, dtype=torch.float16)
    cache = certkv.TieredKVCache(1, 1, 128, config=certkv.CertConfig(policy="kivi"))
    cache.append(0, k, v)
    with pytest.raises(ValueError, match="paper layout"):
        from_cache(cache, 0)
