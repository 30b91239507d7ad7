"""Command line: ``certkv demo`` (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from safetensors import safe_open

import certkv
from certkv.certificate import STAGE_NAMES
from certkv.reference.verify import verify_step

DEMO_DATA = Path(__file__).parent / "data" / "demo_step.safetensors"


def demo(args: argparse.Namespace) -> int:
    """Replay bundled real attention (tinylm layer 3) as decode steps through a certified cache, and
    check every certificate against the exact reference."""
    console = Console(width=max(150, Console().width))
    with safe_open(str(args.data), framework="pt") as fh:
        q, k, v = (fh.get_tensor(name) for name in ("q", "k", "v"))
        scaling = float(fh.metadata()["scaling"])
    steps = q.shape[2]
    n0 = k.shape[2] - steps
    cfg = certkv.CertConfig(window=args.window, max_stage=args.max_stage)
    cache = certkv.TieredKVCache(1, k.shape[1], k.shape[-1], config=cfg)
    cache.append(0, k[:, :, : n0 + 1], v[:, :, : n0 + 1])
    table = Table(title=f"certkv demo: {DEMO_DATA.name}, {steps} decode steps, context {n0 + 1}-{n0 + steps}")
    for col in (
        "step",
        "head",
        "stage",
        "tv bound",
        "key",
        "value",
        "cross",
        "rounding",
        "bound",
        "actual",
        "bound/actual",
        "held",
    ):
        table.add_column(col, justify="right")
    violations = 0
    for t in range(steps):
        if t:
            cache.append(0, k[:, :, n0 + t : n0 + t + 1], v[:, :, n0 + t : n0 + t + 1])
        qt = q[:, :, t : t + 1]
        res = cache.attend(0, qt, scale=scaling)
        ko, vo = cache.originals(0)
        kp, vp = cache.dequantized_exact(0)
        for chk in verify_step(qt, ko, vo, kp, vp, res, scale=scaling, prec=args.precision):
            c, e = chk.claimed, chk.exact
            actual = e["output_bound"]
            violations += bool(chk.violations)
            table.add_row(
                str(t),
                str(chk.head),
                f"{chk.stage} {STAGE_NAMES[chk.stage]}",
                f"{c['tv_bound']:.2e}",
                f"{c['key_term']:.2e}",
                f"{c['value_term']:.2e}",
                f"{c['cross_term']:.2e}",
                f"{c['rounding_term']:.2e}",
                f"{c['output_bound']:.2e}",
                f"{actual:.2e}",
                f"{c['output_bound'] / actual:.1f}" if actual > 0 else "inf",
                "[green]yes[/]" if not chk.violations else f"[red]NO: {','.join(chk.violations)}[/]",
            )
    console.print(table)
    rep = cache.memory_report()
    console.print(
        f"Tier-1 {rep.tier1_bytes:,} B, Tier-2 {rep.tier2_bytes:,} B, Tier-1/FP16 = {rep.ratio:.3f} "
        f"(context {rep.tokens}; the FP16 window is a large share at this length)"
    )
    console.print(
        "[green]every certificate held[/]" if not violations else f"[red]{violations} violated certificates[/]"
    )
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="certkv", description=certkv.__doc__)
    parser.add_argument("--version", action="version", version=f"certkv {certkv.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="certified attention on bundled real attention, checked exactly")
    p_demo.add_argument("--data", type=Path, default=DEMO_DATA)
    p_demo.add_argument(
        "--window", type=int, default=16, help="FP16 recent window (small, so most tokens are quantized)"
    )
    p_demo.add_argument("--max-stage", type=int, default=3)
    p_demo.add_argument("--precision", type=int, default=128, help="bits of the exact reference")
    p_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
