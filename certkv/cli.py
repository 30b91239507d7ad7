"""Command line: ``certkv audit`` (re-check a recorded trace exactly), ``certkv record``, ``certkv eval``
and ``certkv calibrate``.

Exit codes of ``audit``: 0 every claim held; 1 a claim was violated (the first ones are listed);
2 the trace is unreadable, corrupt, tampered, or incomplete (unless ``--allow-partial``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import certkv
from certkv import errors
from certkv.certificate import STAGE_NAMES

if TYPE_CHECKING:
    import torch

DATA = Path(__file__).parent / "data"
DEFAULT_TRACE = DATA / "trace"
SHOWN_VIOLATIONS = 10


def _model_dtype(name: str) -> torch.dtype | None:
    """``--dtype`` of record and calibrate: None (the checkpoint's own) for "auto", else the torch dtype."""
    import torch

    return {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _audit(args: argparse.Namespace) -> int:
    from certkv.audit import audit, plot

    console = Console(stderr=False)
    err = Console(stderr=True)
    start = time.perf_counter()
    try:
        with Progress(
            TextColumn("auditing"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"), TimeRemainingColumn(),
            console=err, transient=True, disable=args.quiet,
        ) as bar:  # fmt: skip
            task = bar.add_task("audit", total=None)
            report = audit(
                args.trace,
                prec=args.precision,
                jobs=args.jobs,
                progress=lambda d, t: bar.update(task, completed=d, total=t),
            )
    except errors.TraceError as exc:
        print(f"certkv audit: unreadable trace: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    heads = report.heads
    layers = sorted({s.layer for s in report.steps})
    table = Table(title=f"certkv audit: {args.trace}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("recorded steps (layer x decode step)", f"{len(report.steps)}")
    table.add_row("head-steps checked", f"{len(heads)} (layers {layers})")
    counts = report.stage_counts()
    table.add_row("stages", ", ".join(f"{n} {STAGE_NAMES[i]}" for i, n in enumerate(counts)))
    dense = sum(s.dense_checked for s in report.steps)
    table.add_row("stage-3 outputs == dense path", f"{dense} compared" if report.dense_note is None else "not checked")
    ratios = [s.memory_ratio for s in report.steps]
    if ratios:
        table.add_row("Tier-1 / FP16 cache", f"{ratios[-1]:.3f} at the last step (min {min(ratios):.3f})")
    table.add_row("precision / jobs / time", f"{args.precision} bits / {args.jobs} / {elapsed:.1f} s")
    table.add_row("head-steps per second", f"{len(heads) / elapsed:.2f}")
    console.print(table)
    tight = Table(title="bound / exact per head-step (over nonzero exact values)")
    for col in ("term", "median", "p99", "exact = 0"):
        tight.add_column(col, justify="right")
    for name, row in report.tightness().items():
        tight.add_row(name, *(f"{row[k]:.3g}" if math.isfinite(row[k]) else "-" for k in ("median", "p99")),
                      f"{int(row['exact_zero'])}")  # fmt: skip
    console.print(tight)
    if report.dense_note:
        console.print(report.dense_note)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)
    violations = report.violations
    if violations:
        console.print(f"[red]{len(violations)} violated claims[/]; first:")
        for line in violations[:SHOWN_VIOLATIONS]:
            print(f"  {line}")
        return 1
    if not report.complete:
        msg = f"trace incomplete: {report.tail}"
        if not args.allow_partial:
            print(f"certkv audit: {msg} (pass --allow-partial to accept)", file=sys.stderr)
            return 2
        console.print(msg)
    console.print(f"[green]every claim held[/] ({len(heads)} head-steps)")
    return 0


def _record(args: argparse.Namespace) -> int:

    from certkv.record import record
    from certkv.trace import TraceSample

    given = {f: getattr(args, f) for f in ("window", "sinks", "key_bits", "value_bits", "max_stage", "calibration")}
    cfg = certkv.CertConfig(policy=args.policy, **{f: v for f, v in given.items() if v is not None})
    sample = TraceSample(
        layers=tuple(args.layers) if args.layers else None,
        kv_heads=tuple(args.kv_heads) if args.kv_heads else None,
        every=args.every,
    )
    dtype = _model_dtype(args.dtype)
    try:
        summary = record(
            args.model, Path(args.text).read_text(encoding="utf-8"), args.out, args.max_new_tokens,
            args.prompt_tokens, cfg, sample, dtype,
        )  # fmt: skip
    except (errors.CertKVError, OSError) as exc:
        print(f"certkv record: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {summary}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import dataclasses

    from certkv.evaluate import EvalSpec, plot, run, to_markdown

    methods = list(args.methods)
    for policy in args.policy:
        methods += [m for m in (f"naive@{policy}", f"certified@{policy}") if m not in methods]
    spec = EvalSpec(
        model=str(args.model),
        text=Path(args.text).read_text(encoding="utf-8"),
        methods=tuple(methods),
        bpb_lengths=tuple(args.bpb_lengths),
        bpb_score=args.bpb_score,
        bpb_windows=args.bpb_windows,
        tasks=tuple(args.tasks),
        gen_lengths=tuple(args.lengths),
        passkey_depths=tuple(args.depths),
        trials=args.trials,
        key_outlier=args.key_outlier,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        calibrations=tuple(str(p) for p in args.calibration),
    )
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True, disable=args.quiet) as bar:  # fmt: skip
        task = bar.add_task("eval", total=None)
        results = run(spec, progress=lambda label, i, n: bar.update(task, description=label, completed=i, total=n))
    from certkv.capture import DEFAULT_MODEL

    unit = "byte" if Path(args.model).resolve() == DEFAULT_MODEL.resolve() else "token"
    table = to_markdown(results, unit)
    print(table)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.markdown:
        command = "certkv " + shlex.join(args.argv)
        head = (
            f"Model `{args.model}`{f', key outlier x{args.key_outlier}' if args.key_outlier else ''}; text "
            f"`{args.text}`; device {args.device}, {args.dtype}; command `{command}`\n\n"
        )
        Path(args.markdown).write_text(head + table + "\n")
    if args.json:
        payload = {"spec": {**dataclasses.asdict(spec), "text": str(args.text)},
                   "results": [dataclasses.asdict(r) for r in results]}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        plot(results, str(args.plot))
    return 0


def _calibrate(args: argparse.Namespace) -> int:

    from certkv.calibration import from_model
    from certkv.capture import load_model
    from certkv.codec import TextCodec

    dtype = _model_dtype(args.dtype)
    model = load_model(args.model, dtype=dtype).to(args.device)
    cfg = certkv.CertConfig(policy=args.policy)
    if not (cfg.book_keys or cfg.book_values):
        print(f"certkv calibrate: policy {args.policy!r} has no codebook or outliers to calibrate", file=sys.stderr)
        return 2
    ids = TextCodec(model, str(args.model)).encode(Path(args.text).read_text(encoding="utf-8"), bos=False)
    cal = from_model(model, ids, cfg, args.sequences, args.length, args.seed, source=f"{args.model} {args.text}")
    cal.save(args.out)
    print(f"wrote {args.out}: policy {args.policy}, {args.sequences} x {args.length} tokens, seed {args.seed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="certkv", description=certkv.__doc__)
    parser.add_argument("--version", action="version", version=f"certkv {certkv.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("audit", help="re-check every certificate of a recorded trace in exact arithmetic")
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE, help="trace directory (default: bundled)")
    p.add_argument("--precision", type=int, default=128, help="bits of the exact reference (>= 100)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    p.add_argument("--json", type=Path, help="write the full report (every head-step) as JSON")
    p.add_argument("--plot", type=Path, help="write bound vs exact per term and stage use over steps (PNG)")
    p.add_argument("--allow-partial", action="store_true", help="exit 0 on a trace whose tail is missing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_audit)

    r = sub.add_parser("record", help="decode with a Hugging Face model through a certified cache; write a trace")
    r.add_argument("--model", required=True, type=Path, help="local Hugging Face checkpoint directory")
    r.add_argument("--text", required=True, type=Path, help="UTF-8 text file: the prompt")
    r.add_argument("--out", required=True, type=Path, help="trace directory to create")
    r.add_argument("--max-new-tokens", type=int, default=8)
    r.add_argument("--prompt-tokens", type=int, help="keep the first N prompt tokens")
    r.add_argument("--dtype", choices=("auto", "float16", "bfloat16"), default="auto")
    r.add_argument("--policy", help="a quantization policy (docs/policies.md); the options below override it")
    r.add_argument("--calibration", help="a file from certkv calibrate, for a codebook policy")
    r.add_argument("--window", type=int, help=f"default {certkv.CertConfig.window}")
    r.add_argument("--sinks", type=int, help=f"default {certkv.CertConfig.sinks}")
    r.add_argument("--key-bits", type=int, help=f"default {certkv.CertConfig.key_bits}")
    r.add_argument("--value-bits", type=int, help=f"default {certkv.CertConfig.value_bits}")
    r.add_argument("--max-stage", type=int, help=f"default {certkv.CertConfig.max_stage}")
    r.add_argument("--layers", type=int, nargs="+", help="record these layers only")
    r.add_argument("--kv-heads", type=int, nargs="+", help="record these KV heads only")
    r.add_argument("--every", type=int, default=1, help="record every N-th step of each layer")
    r.set_defaults(func=_record)

    from certkv.capture import DEFAULT_MODEL
    from certkv.evaluate import DEFAULT_METHODS

    e = sub.add_parser(
        "eval", help="quality of dense, naive and certified caches on bpb, passkey and RULER-style tasks"
    )
    e.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local checkpoint (default: bundled tinylm)")
    e.add_argument("--text", type=Path, default=DATA / "heldout_sample.txt", help="UTF-8 text: bpb windows, filler")
    e.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="dense naive certified certified-strict naive-k4 certified-k4")  # fmt: skip
    e.add_argument("--policy", nargs="+", default=[],
                   help="add naive@P and certified@P for each policy P (docs/policies.md)")  # fmt: skip
    e.add_argument("--bpb-lengths", type=int, nargs="*", default=[512, 1024])
    e.add_argument("--bpb-score", type=int, default=128, help="scored (certified) tokens at the end of each window")
    e.add_argument("--bpb-windows", type=int, default=2)
    e.add_argument("--tasks", nargs="+", default=["bpb", "passkey"], help="bpb passkey mk-niah vt cwe")
    e.add_argument("--lengths", type=int, nargs="+", default=[1024], help="prompt lengths of the generation tasks")
    e.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey depths")
    e.add_argument("--trials", type=int, default=4)
    e.add_argument("--key-outlier", type=float, help="stress model: one key channel pair scaled by this")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--markdown", type=Path, help="write the tables with model, data and command")
    e.add_argument("--json", type=Path)
    e.add_argument("--plot", type=Path)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--calibration", type=Path, nargs="*", default=[],
                   help="files from certkv calibrate; each policy uses the one fitted for its layout")  # fmt: skip
    e.set_defaults(func=_eval)

    c = sub.add_parser("calibrate", help="fit a policy's codebooks and outlier thresholds on a model's activations")
    c.add_argument("--policy", required=True, help="a codebook policy: kvquant, rotated, keys=...,values=...")
    c.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local checkpoint (default: bundled tinylm)")
    c.add_argument(
        "--text",
        type=Path,
        default=DATA / "calibration_sample.txt",
        help="UTF-8 calibration text, apart from the eval text (default: bundled, CPython's argparse.py)",
    )
    c.add_argument("--out", type=Path, required=True, help="calibration file to write (safetensors)")
    c.add_argument("--sequences", type=int, default=4)
    c.add_argument("--length", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=("auto", "float16", "bfloat16"), default="auto")
    c.set_defaults(func=_calibrate)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except errors.ConfigError as exc:
        print(f"certkv {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
