"""certkv.hf: the certified cache inside transformers models (tiny trained model and tiny random ones)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

import certkv
from certkv import errors
from certkv.audit import audit
from certkv.capture import DEFAULT_MODEL, capture
from certkv.hf import CertifiedCache, register
from certkv.trace import TraceReader
from tests.helpers import small_config


def tiny_model(kind: type, seed: int = 0) -> torch.nn.Module:
    cfg = kind(
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=96,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register(), dtype=torch.bfloat16)
    return model.eval()


def run_cached(model, ids, cfg, recorder=None):
    """Prefill 40 tokens, chunked-prefill 10, decode the rest one by one; logits of every position."""
    cache = CertifiedCache(model.config, cfg, recorder=recorder)
    parts = [model(ids[:, :40], past_key_values=cache, use_cache=True).logits]
    parts.append(model(ids[:, 40:50], past_key_values=cache, use_cache=True).logits)
    for t in range(50, ids.shape[1]):
        parts.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(parts, dim=1).float(), cache


@pytest.mark.parametrize("kind", [LlamaConfig, Qwen2Config, MistralConfig])
@torch.no_grad()
def test_prefill_chunk_and_decode_are_certified_and_wired_like_dense(kind, tmp_path):
    model = tiny_model(kind)
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    dense = model(ids, use_cache=False).logits.float()  # no cache: SDPA everywhere
    with certkv.TraceRecorder(tmp_path / "t") as rec:
        got, cache = run_cached(model, ids, small_config(), rec)
    # the prefill is exact attention: bit for bit what the model computes without certkv
    assert torch.equal(got[:, :40], model(ids[:, :40], use_cache=False).logits.float())
    assert cache.get_seq_length() == 64
    report = cache.report()
    assert report.head_steps == 2 * 2 * 4 * 24  # layers x batch x query heads x certified positions
    trace_report = audit(tmp_path / "t")
    assert len(trace_report.steps) == 2 * 24 and not trace_report.violations
    # zero tolerance sends every head to stage 3 (binary32 attention over the originals): the logits
    # then differ from SDPA's only by rounding, which checks positions, RoPE and causality end to end
    exact, cache = run_cached(model, ids, small_config(out_tol=0.0, out_rtol=0.0, tv_tol=0.0))
    assert cache.report().stages[3] == report.head_steps
    assert float((exact - dense).abs().max()) < 0.1 * float(dense.std())  # a wiring error moves them ~1 std
    assert float((got - dense).abs().max()) > float((exact - dense).abs().max())  # quantization shows


@torch.no_grad()
def test_tiny_trained_model_queries_reach_certkv_at_the_right_positions(tmp_path):
    register()
    model = AutoModelForCausalLM.from_pretrained(str(DEFAULT_MODEL), attn_implementation="certkv").eval()
    text = (DEFAULT_MODEL.parent / "heldout_sample.txt").read_text()[:400]
    ids = torch.tensor([[256, *text.encode()]])
    with certkv.TraceRecorder(tmp_path / "t", certkv.TraceSample(layers=(0,))) as rec:
        cache = CertifiedCache(model.config, certkv.CertConfig(window=16), recorder=rec)
        out = model.generate(
            ids[:, :300], attention_mask=torch.ones_like(ids[:, :300]), past_key_values=cache,
            max_new_tokens=6, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    # layer 0's q, k, v depend only on the tokens and positions: they must equal a dense capture of
    # the same sequence exactly, step by step
    cap = capture(model, out)
    steps = [e for e in TraceReader(tmp_path / "t").entries() if e.kind == "step"]
    tokens = [e for e in TraceReader(tmp_path / "t").entries() if e.kind == "tokens"]
    assert [s.meta["length"] for s in steps] == list(range(301, 306))
    for s in steps:
        pos = s.meta["length"] - 1
        assert torch.equal(s.tensors["q"][:, :, :], cap.q[0][:, :, pos])
    k_all = torch.cat([t.tensors["k"] for t in tokens], dim=2)
    assert torch.equal(k_all, cap.k[0][:, :, : k_all.shape[2]])
    assert not audit(tmp_path / "t").violations
    assert cache.report().memory.ratio < 1


@torch.no_grad()
def test_padding_and_missing_attention_function_are_refused():
    model = tiny_model(LlamaConfig)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    cache = CertifiedCache(model.config, small_config())
    model(ids[:, :29], attention_mask=mask[:, :29], past_key_values=cache, use_cache=True)
    with pytest.raises(errors.ConfigError, match="padding"):
        model(ids[:, 29:], attention_mask=mask, past_key_values=cache, use_cache=True)

    with pytest.raises(errors.ConfigError, match="attn_implementation"):
        model.config._attn_implementation = "sdpa"
        CertifiedCache(model.config, small_config())
    # switched after the cache was made: the second update of a layer finds its tokens unconsumed
    model.config._attn_implementation = "certkv"
    cache = CertifiedCache(model.config, small_config())
    model.config._attn_implementation = "sdpa"
    model(ids[:, :20], past_key_values=cache, use_cache=True)
    with pytest.raises(errors.ConfigError, match="never reached certkv"):
        model(ids[:, 20:], past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_float32_models_and_sliding_windows_get_typed_errors():
    model = tiny_model(LlamaConfig).float()
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    with pytest.raises(errors.DTypeError, match="float16 or bfloat16"):
        model(ids, past_key_values=CertifiedCache(model.config, small_config()), use_cache=True)
    mistral = tiny_model(MistralConfig)
    mistral.config.sliding_window = 24
    cache = CertifiedCache(mistral.config, small_config())
    mistral(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(errors.ConfigError, match="sliding window"):
        mistral(torch.zeros(1, 5, dtype=torch.long), past_key_values=cache, use_cache=True)
