"""certkv eval: the stress model, the tasks and the paired comparison, on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig

from certkv.capture import DEFAULT_MODEL
from certkv.cli import main
from certkv.evaluate import EvalSpec, MethodResult, add_key_outlier, method_config, paired_difference, run
from tests.test_hf import tiny_model


@torch.no_grad()
def test_key_outlier_changes_the_keys_not_the_model():
    model = tiny_model(LlamaConfig)
    ids = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(4))
    before = model(ids, use_cache=False).logits
    k_before = model.model.layers[0].self_attn.k_proj.weight.clone()
    add_key_outlier(model, 32.0)  # a power of two: every scaling is exact, so q.k is unchanged bit for bit
    assert torch.equal(model(ids, use_cache=False).logits, before)
    ratio = model.model.layers[0].self_attn.k_proj.weight.abs().amax(-1) / k_before.abs().amax(-1)
    assert int((ratio == 32).sum()) == 2 * 2  # one RoPE channel pair per KV head


def test_paired_difference_is_the_mean_and_standard_error_of_differences():
    a = MethodResult("bpb", "s", "x", 0.0, samples=[1.0, 2.0, 4.0])
    b = MethodResult("bpb", "s", "dense", 0.0, samples=[1.0, 1.0, 1.0])
    diff, err = paired_difference(a, b)
    assert diff == pytest.approx(4 / 3)
    assert err == pytest.approx(math.sqrt(((0 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 2 / 3))
    with pytest.raises(ValueError, match="unknown method"):
        method_config("fp4-magic")


def test_outlier_keys_break_naive_int4_and_the_ladder_recovers():
    text = (DEFAULT_MODEL.parent / "heldout_sample.txt").read_text()
    spec = EvalSpec(
        str(DEFAULT_MODEL), text, methods=("dense", "naive-k4", "certified-k4"), bpb_lengths=(384,), bpb_score=64,
        bpb_windows=1, tasks=("bpb",), key_outlier=64.0,
    )  # fmt: skip
    dense, naive, cert = run(spec)
    d_naive, e_naive = paired_difference(naive, dense)
    d_cert, e_cert = paired_difference(cert, dense)
    assert d_naive > 1.0 and d_naive > 3 * e_naive  # per-token INT4 keys lose the other channels: clearly worse
    assert abs(d_cert) <= 2 * e_cert + 1e-3  # certified: equal to dense within the paired noise
    assert naive.rejected > 0 and cert.rejected == 0 and sum(cert.stages[1:]) > 0


def test_eval_cli_writes_markdown_json_and_plot(tmp_path, capsys):
    args = ["eval", "--bpb-lengths", "260", "--bpb-score", "8", "--bpb-windows", "1",
            "--tasks", "bpb", "passkey", "vt", "--lengths", "260",
            "--depths", "0.5", "--trials", "1", "--methods", "dense", "certified", "--quiet",
            "--markdown", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "r.png")]  # fmt: skip
    assert main(args) == 0
    md = (tmp_path / "r.md").read_text()
    assert "certkv eval --bpb-lengths 260" in md and "| ctx 260 | certified |" in md
    assert "| len 260 depth 50% | certified |" in md and "variable tracking" in md
    assert (tmp_path / "r.png").stat().st_size > 5000 and (tmp_path / "r.json").stat().st_size > 100


def test_probes_are_deterministic_and_scored_by_their_answers():
    import random

    from certkv.codec import TextCodec
    from certkv.synthetic import TASKS, make_probe, score

    class Byte:  # the byte-level codec needs only the model's vocabulary size
        config = type("C", (), {"vocab_size": 258})()

    codec = TextCodec(Byte(), "/nonexistent")
    filler = codec.encode((DEFAULT_MODEL.parent / "heldout_sample.txt").read_text())
    for task in TASKS:
        a, b = (make_probe(task, codec, filler, 700, 0.3, random.Random(5)) for _ in range(2))
        assert a == b and abs(len(a.prompt) - 700) <= 10
        text = codec.decode(a.prompt)
        assert all(ans in text for ans in a.answers)
        assert score(a, " ".join(a.answers)) == 1.0 and score(a, "nothing") == 0.0


def test_eval_runs_any_local_checkpoint_with_its_own_tokenizer(tmp_path, capsys):
    """A tiny random Llama saved with a byte-level BPE tokenizer: the generic (non-tinylm) path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(tmp_path / "ckpt")
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=64, intermediate_size=256, vocab_size=len(vocab))  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    args = ["eval", "--model", str(tmp_path / "ckpt"), "--bpb-lengths", "200", "--bpb-score", "16",
            "--bpb-windows", "1", "--tasks", "bpb", "mk-niah", "--lengths", "220", "--trials", "1",
            "--methods", "dense", "naive", "certified", "--quiet", "--markdown", str(tmp_path / "r.md")]  # fmt: skip
    assert main(args) == 0
    md = (tmp_path / "r.md").read_text()
    assert "bits per token" in md and "| ctx 200 | certified |" in md and "| len 220 | naive |" in md


def test_markdown_shows_the_layer_steps_the_kernel_served():
    from certkv.evaluate import to_markdown

    served = MethodResult("bpb", "ctx 2048", "certified-kernel", 1.3, 0.3, [1.3], [9, 1, 1, 0], 0, 0.58, 8.5,
                          {"tried": 378, "served": 185})  # fmt: skip
    torch_path = MethodResult("bpb", "ctx 2048", "certified-torch", 1.3, 0.3, [1.3], [9, 1, 1, 0], 0, 0.58, 7.7)
    rows = [line for line in to_markdown([served, torch_path]).splitlines() if line.startswith("| ctx")]
    assert "| 0.580 | 185/378 | 8.5 |" in rows[0] and "| 0.580 | - | 7.7 |" in rows[1]
    # the kernel ladder's counts, where there are any
    served.kernel_steps = {"tried": 378, "served": 378, "fetched": 120, "dense": 9}
    rows = [line for line in to_markdown([served]).splitlines() if line.startswith("| ctx")]
    assert "| 0.580 | 378/378 (120 fetched, 9 dense) | 8.5 |" in rows[0]
    served.kernel_steps["dense_torch"] = 2  # dense steps whose certificate certified_step made
    rows = [line for line in to_markdown([served]).splitlines() if line.startswith("| ctx")]
    assert "| 0.580 | 378/378 (120 fetched, 9 dense, 2 reproved) | 8.5 |" in rows[0]
