"""The ``capwrap`` command line: thin wrappers over the Python API.

Examples:
    $ capwrap demo --out demo_out --seed 0
    $ capwrap info ../shared/data/tinystories/stories260K --json
    $ capwrap diagnose BASE TUNED --capability "pcfg=count,operand=a" --downstream "pcfg=count,operand=b,correlation=1" --out diag
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
        diagnose_pair=not args.no_diagnose,
        progress=not args.quiet,
        log=print,
    )
    table = result.accuracy_table()
    print()
    print(table.to_string(float_format=lambda v: f"{v:6.1%}"))
    print()
    if result.diagnosis is not None:
        evidence = result.diagnosis.summary()[["analyzer", "kind", "direction", "strength", "contribution"]]
        print(evidence.to_string(index=False))
        print()
    print(f"verdict: {result.summary['verdict']}  ({result.summary.get('verdict_note', '')})")
    print(f"done in {result.summary['wall_seconds']:.0f} s; outputs in {result.out}/")
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from capwrap.models import describe_model, load_model

    info = describe_model(load_model(args.source, backend=args.backend, allow_pickle=args.allow_pickle))
    info["source"] = args.source
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    spec = info["spec"]
    print(f"{args.source}: {spec['architecture']} ({info['family']}), {info['parameters']:,} parameters, "
          f"backend {info['backend']}")  # fmt: skip
    print(f"  blocks: {info['blocks']}")
    print(f"  layers {spec['n_layers']}, d_model {spec['d_model']}, heads {spec['n_heads']} "
          f"(kv {spec['n_key_value_heads']}), d_head {spec['d_head']}, d_mlp {spec['d_mlp']}, "
          f"vocab {spec['d_vocab']}, context {spec['n_ctx']}")  # fmt: skip
    local = [i for i, kind in enumerate(spec["attention_layers"]) if kind == "local"]
    if local:
        print(f"  local attention (window {spec['window_size']}) in layers {', '.join(map(str, local))}")
    print("  components: " + ", ".join(f"{n:,} {k}" for k, n in info["components"].items()))
    if info["not_in_fast_engine"]:
        print(f"  patching: hooks engine only ({'; '.join(info['not_in_fast_engine'])})")
    else:
        print("  patching: fast engine (resumed) and hooks engine")
    print(f"  tokenizer: {info['tokenizer'] or 'none'}")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from capwrap.diagnosis import diagnose_checkpoints

    diagnosis = diagnose_checkpoints(
        args.base, args.tuned, args.capability, args.downstream, out=args.out, backend=args.backend,
        quick=args.quick, store=args.store, seed=args.seed, allow_pickle=args.allow_pickle, progress=not args.quiet,
    )  # fmt: skip
    print(diagnosis.summary()[["analyzer", "kind", "direction", "strength", "contribution"]].to_string(index=False))
    print()
    acc = diagnosis.accuracy
    print(f"capability accuracy {acc['base']['capability']:.1%} (base) -> {acc['tuned']['capability']:.1%} (tuned); "
          f"downstream {acc['base']['downstream']:.1%} -> {acc['tuned']['downstream']:.1%}")  # fmt: skip
    print(f"verdict: {diagnosis.verdict}  ({diagnosis.reasons[0]})")
    if args.out:
        print(f"wrote {args.out}/summary.json and {args.out}/report.html")
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
    demo.add_argument(
        "--scenario",
        default="default",
        choices=["default", "removed"],
        help="default: the study; removed: the negative control (capability re-initialized before fine-tuning)",
    )
    demo.add_argument("--backend", choices=["hooked", "bridge"], default=None, help="TransformerLens backend")
    demo.add_argument("--pretrain", action="store_true", help="pretrain the base model here (about 15 min)")
    demo.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300)")
    demo.add_argument("--eval-size", type=int, default=2048, help="sequences per test set (default 2048)")
    demo.add_argument("--no-diagnose", action="store_true", help="skip diagnose() (no verdict)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="architecture and component counts of a checkpoint (folder or hub name)")
    info.add_argument("source", help="a checkpoint folder or a Hugging Face hub name")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--backend", choices=["hooked", "bridge"], default=None, help="TransformerLens backend")
    info.add_argument("--allow-pickle", action="store_true", help="also read pytorch_model.bin (weights_only)")
    info.set_defaults(func=_info)

    diag = sub.add_parser("diagnose", help="did fine-tuning change a capability, or wrap it? (any compatible pair)")
    diag.add_argument("base", help="the base checkpoint (folder or hub name)")
    diag.add_argument("tuned", help="the fine-tuned checkpoint (folder or hub name)")
    diag.add_argument(
        "--capability",
        required=True,
        help="task spec of the capability, e.g. pcfg=count,operand=a or text=stories.txt,feature=word:Lily",
    )
    diag.add_argument("--downstream", required=True,
                      help="task spec of the fine-tuning task, e.g. pcfg=count,operand=b,correlation=1 or text=stories.txt,without=word:Lily")  # fmt: skip
    diag.add_argument("--out", default=None, help="folder for summary.json and report.html")
    diag.add_argument("--store", default=None, help="the fine-tuning run's RunStore folder, if recorded")
    diag.add_argument("--quick", action="store_true", help="smaller samples and budgets (minutes instead of more)")
    diag.add_argument("--seed", type=int, default=0)
    diag.add_argument("--backend", choices=["hooked", "bridge"], default=None, help="TransformerLens backend")
    diag.add_argument("--allow-pickle", action="store_true", help="also read pytorch_model.bin (weights_only)")
    diag.add_argument("--quiet", action="store_true", help="no progress bars")
    diag.set_defaults(func=_diagnose)
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
