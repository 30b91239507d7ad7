"""Train the tinylm byte-level Llama on one GPU, then measure it (see ``measure.py``).

A scaled-down Llama 3: hidden 512, 6 layers, 4 query heads and 2 KV heads of head_dim 128 (GQA),
SwiGLU 1536, RoPE theta 500000, sequence length 4096, bf16 autocast with fp32 master weights.
The budget is fixed wall-clock seconds (``--max-seconds``, default 330 s on one H100), with the cosine
learning-rate schedule laid over it; ``--steps`` caps the step count for a step-exact rerun.

5% of training sequences are passkey sequences built from *training* text (the held-out split is
never trained on): a tiny model trained for minutes does not otherwise learn long-range copying,
and certkv needs sharp retrieval heads to be measured on.

Usage (GPU): ``python -m certkv.tinylm.train --corpus .corpus --out OUTDIR``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from certkv.tinylm.data import BOS, EOS, VOCAB_SIZE, load_split, passkey_example

SEED = 1234
SEQ_LEN = 4096
PASSKEY_SHARE = 0.05


def model_config():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=SEQ_LEN,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def batches(train: np.ndarray, batch: int, rng: random.Random):  # type: ignore[no-untyped-def]
    while True:
        rows = []
        for _ in range(batch):
            if rng.random() < PASSKEY_SHARE:
                length = rng.choice([512, 1024, 2048, 4000])
                ids, key = passkey_example(train, length, rng, depth=rng.random())
                ids = ids + [ord(c) for c in key] + [ord("."), EOS]
                start = rng.randrange(0, len(train) - SEQ_LEN - 2)
                ids = (ids + train[start : start + SEQ_LEN + 1].tolist())[: SEQ_LEN + 1]
                rows.append(ids)
            else:
                start = rng.randrange(0, len(train) - SEQ_LEN - 2)
                rows.append(train[start : start + SEQ_LEN + 1].tolist())
        yield torch.tensor(rows, dtype=torch.long)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path(".corpus"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-seconds", type=float, default=330.0)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.backends.cuda.matmul.allow_tf32 = True
    rng = random.Random(SEED)
    dev = torch.device(args.device)
    train = load_split(args.corpus, "train")
    model = LlamaForCausalLM(model_config()).to(dev)
    model.config.use_cache = False
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda"
    )
    warmup = 100

    def lr_at(step: int, progress: float) -> float:
        # cosine to 10% over the budget, whichever of steps or seconds runs out first
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    log = []
    t0 = time.time()
    data = batches(train, args.batch, rng)
    done = 0
    for step in range(args.steps):
        progress = max(step / args.steps, (time.time() - t0) / args.max_seconds)
        if progress >= 1.0:
            print(f"budget reached at step {step}", flush=True)
            break
        x = next(data).to(dev, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done += 1
        if step % 50 == 0 or step == args.steps - 1:
            bpb = loss.item() / math.log(2)
            log.append({"step": step, "bpb": bpb, "seconds": time.time() - t0})
            print(f"step {step} train bpb {bpb:.3f} t={time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size="15MB", safe_serialization=True)
    train_info = {
        "steps_done": done,
        "steps_planned": args.steps,
        "batch": args.batch,
        "seq_len": SEQ_LEN,
        "tokens_seen": done * args.batch * SEQ_LEN,
        "train_seconds": seconds,
        "lr": args.lr,
        "seed": SEED,
        "passkey_share": PASSKEY_SHARE,
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "log": log,
    }
    from certkv.tinylm.measure import measure

    figures = measure(model, args.corpus, dev)
    (args.out / "metrics.json").write_text(json.dumps({"train": train_info, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
