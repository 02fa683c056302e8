"""The ``capwrap`` command line: thin wrappers over the Python API.

Examples:
    $ capwrap demo --out demo_out --seed 0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from capwrap.errors import CapwrapError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from capwrap.demo import run_demo

    result = run_demo(
        args.out,
        seed=args.seed,
        scenario=args.scenario,
        backend=args.backend,
        pretrain=args.pretrain,
        finetune_steps=args.steps,
        eval_size=args.eval_size,
        progress=not args.quiet,
        log=print,
    )
    table = result.accuracy_table()
    print()
    print(table.to_string(float_format=lambda v: f"{v:6.1%}"))
    print()
    print(f"verdict: {result.summary['verdict']}  ({result.summary.get('verdict_note', '')})")
    print(f"done in {result.summary['wall_seconds']:.0f} s; outputs in {result.out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capwrap",
        description="Did fine-tuning change a capability, or only wrap it? Analyses on TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune a small PCFG counting model with recording, and report")
    demo.add_argument("--out", default="capwrap_demo", help="output folder (default: capwrap_demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of fine-tuning data and test sets (default 0)")
    demo.add_argument("--scenario", default="default", choices=["default"], help="which study to run")
    demo.add_argument("--backend", choices=["hooked", "bridge"], default=None, help="TransformerLens backend")
    demo.add_argument("--pretrain", action="store_true", help="pretrain the base model here (about 15 min)")
    demo.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300)")
    demo.add_argument("--eval-size", type=int, default=2048, help="sequences per test set (default 2048)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CapwrapError as exc:
        print(f"capwrap: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
