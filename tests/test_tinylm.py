"""The bundled tinylm model loads on the CPU and has learned the held-out text."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from certkv.capture import DEFAULT_MODEL  # noqa: E402
from certkv.tinylm.data import BOS, encode  # noqa: E402
from certkv.tinylm.measure import unigram_bpb  # noqa: E402

SAMPLE = Path(DEFAULT_MODEL).parent / "heldout_sample.txt"


def test_tinylm_beats_a_unigram_byte_model_on_held_out_text():
    model = transformers.LlamaForCausalLM.from_pretrained(DEFAULT_MODEL)
    model.eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (6, 512, 4, 2)
    assert cfg.head_dim == 128 and cfg.vocab_size == 258
    ids = np.array([BOS, *encode(SAMPLE.read_text(encoding="utf-8"))[:4095]])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)[None]).logits.float()
    bpb = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])).item() / math.log(2)
    # the unigram model is fitted on the sample itself, which only flatters it
    unigram = unigram_bpb(ids, ids)
    assert bpb < 0.5 * unigram, (bpb, unigram)
