"""Greedy decoding through transformers with certkv's cache, warm: tokens/s per method and context.

Each method decodes ``--new`` tokens after a prompt of each context length, three times on one model:
the first run compiles and warms, the second is timed, the third runs under cProfile (its top
functions go to ``prof_<method>_<context>.txt`` with ``--profile``) and, with ``--phases``, a fourth
times the cache's phases (``PHASES``, each between device synchronisations: ms per call, calls).
Reports the cache's stage counts and ``kernel_steps`` (layer-steps the decode kernel tried, served
without the torch ladder, fetched rows for, served a row dense, and of those certified by
``certified_step`` as well).

    PYTHONPATH=. python benchmarks/hf_decode.py --contexts 2048 4096 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import json
import pstats
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from certkv.codec import TextCodec
from certkv.evaluate import method_config
from certkv.hf import CertifiedCache, register

DATA = Path(__file__).resolve().parent.parent / "certkv" / "data"
# (module, class or None, function) of the phases ``--phases`` times: the cache's attend, its kernel
# ladder and that ladder's stages (kernel_step_partials counts the kernel steps of stages 0, 2 and 3,
# kernel_step those of stages 2 and 3; token_shares is stage 2's estimate, one launch)
PHASES = (
    ("certkv.hf", "CertifiedCache", "_attend"),
    ("certkv.cache", "TieredKVCache", "append"),
    ("certkv.cache", "TieredKVCache", "_kernel_ladder"),
    ("certkv.cache", "TieredKVCache", "_count_fetches"),
    ("certkv.streaming", None, "kernel_step_partials"),
    ("certkv.streaming", None, "kernel_step"),
    ("certkv.kernel_ladder", None, "stage2"),
    ("certkv.kernels.shares", None, "token_shares"),
    ("certkv.cache", None, "dense_stage"),
)


@contextlib.contextmanager
def timed_phases(table: dict[str, list[float]]) -> Iterator[None]:
    """Wrap each of ``PHASES`` with a timer between device synchronisations; ``table`` collects the
    seconds of each call under "class.function" or "module.function"."""
    saved = []
    for module_name, cls, name in PHASES:
        module = importlib.import_module(module_name)
        owner = module if cls is None else getattr(module, cls)
        fn = getattr(owner, name)
        key = f"{cls or module_name}.{name}"

        def timer(*args: Any, _fn: Any = fn, _key: str = key, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = _fn(*args, **kwargs)
            torch.cuda.synchronize()
            table.setdefault(_key, []).append(time.perf_counter() - t0)
            return result

        saved.append((owner, name, fn))
        setattr(owner, name, timer)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def decode(
    model: Any, ids: torch.Tensor, method: str, new: int, prof: cProfile.Profile | None = None, config: Any = None
) -> dict[str, Any]:
    """Greedy-decode ``new`` tokens after ``ids`` with ``method``'s cache (``config``: a CertConfig to
    use instead of the method's own); tokens/s and, for certkv, the cache's stage counts."""
    cfg = method_config(method, model.config) if config is None else config
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
    ap.add_argument("--phases", action="store_true", help="time the cache's phases in a further run")
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
            if args.phases and method != "dense":
                table: dict[str, list[float]] = {}
                with timed_phases(table):
                    row["phases_run_s"] = decode(model, x, method, args.new)["seconds"]
                row["phases"] = {k: {"ms_per_call": 1e3 * sum(t) / len(t), "calls": len(t)} for k, t in table.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    device = torch.cuda.get_device_name()
    (out / args.json).write_text(json.dumps({"device": device, "new_tokens": args.new, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
