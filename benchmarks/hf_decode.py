"""Greedy decoding through transformers with certkv's cache, warm: tokens/s per method and context.

Each method decodes ``--new`` tokens after a prompt of each context length, three times on one model:
the first run compiles and warms, the second is timed, the third runs under cProfile (its top
functions go to ``prof_<method>_<context>.txt`` with ``--profile``). Reports the cache's stage counts
and ``kernel_steps`` (layer-steps the decode kernel tried, served without the torch ladder, fetched
rows for, served a row dense, and of those certified by ``certified_step`` as well).

    PYTHONPATH=. python benchmarks/hf_decode.py --contexts 2048 4096 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from certkv.codec import TextCodec
from certkv.evaluate import method_config
from certkv.hf import CertifiedCache, register

DATA = Path(__file__).resolve().parent.parent / "certkv" / "data"


def decode(
    model: Any, ids: torch.Tensor, method: str, new: int, prof: cProfile.Profile | None = None
) -> dict[str, Any]:
    cfg = method_config(method, model.config)
    cache = DynamicCache(config=model.config) if cfg is None else CertifiedCache(model.config, cfg)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    torch.cuda.synchronize()
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"seconds": seconds, "tokens_per_s": new / seconds}
    if cfg is not None:
        rep = cache.report()
        row |= {"kernel_steps": rep.kernel_steps, "stages": rep.stages, "tier1_ratio": rep.memory.ratio}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DATA / "tinylm"))
    ap.add_argument("--text", default=str(DATA / "heldout_sample.txt"))
    ap.add_argument("--methods", nargs="+", default=["dense", "certified", "certified-torch"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[2048])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--json", default="hf_decode.json", help="file name of the results under --out")
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, attn_implementation=register())
    model = model.cuda().eval()
    ids = TextCodec(model, args.model).encode(Path(args.text).read_text(), bos=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ctx in args.contexts:
        x = torch.tensor([ids[:ctx]], device="cuda")
        for method in args.methods:
            decode(model, x, method, args.new)  # compile and warm
            row = {"context": ctx, "method": method} | decode(model, x, method, args.new)
            if args.profile:
                prof = cProfile.Profile()
                decode(model, x, method, args.new, prof)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(50)
                (out / f"prof_{method}_{ctx}.txt").write_text(text.getvalue())
            print(json.dumps(row), flush=True)
            rows.append(row)
    device = torch.cuda.get_device_name()
    (out / args.json).write_text(json.dumps({"device": device, "new_tokens": args.new, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
