"""Probing read through the base's input embeddings, against probing the tuned model as it is.

For suite scenarios whose tuned models a `capwrap validate` run cached (``OUT/cache/tuned/<key>``),
runs :class:`~capwrap.analyzers.Probing` twice — ``embeddings="tuned"`` (the tuned model as it is)
and ``embeddings="base"`` (the default since the ninth session, what the shipped verdict rule is
fitted with) — and prints each one's kept share
and floor. Written for the SGD index scenario (benchmarks/RESULTS.md, issue 9), whose fine-tune
rewrote the operand tokens' embedding rows: does reading the tuned model's layers through the base's
embeddings bring the latent back there, while removed capabilities stay removed?

    python benchmarks/probing_embeddings.py --cache /tmp/suite/held-out-41/cache --threads 1 \\
        'held/index-b/*' 'held/removed-*'
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from suite_models import scenario_models, scenario_parser

from capwrap.analyzers import ModelPair, Probing
from capwrap.validation import scenarios


def compare(name: str, cache: Path, eval_size: int) -> list[dict]:
    """One row per setting of ``embeddings`` for the scenario ``name``."""
    (s,) = scenarios("all", [name])
    base, tuned, capability, downstream = scenario_models(s, cache)
    rows = []
    for embeddings in ("tuned", "base"):
        probing = Probing(n=1024, steps=200, embeddings=embeddings)  # the suite's settings (runner.suite_analyzers)
        ev = probing(ModelPair(base, tuned), capability, downstream, eval_size=eval_size, seed=0)
        h = ev.headline
        rows.append({"scenario": name, "kind": s.kind, "embeddings": embeddings, "kept_share": ev.value,
                     "probe_base": h["probe_best_base"], "probe_tuned": h["probe_best_tuned"],
                     "floor_untrained": h["probe_best_untrained"], "direction": ev.direction})  # fmt: skip
    return rows


def main() -> None:
    parser = scenario_parser(__doc__.split("\n")[0])
    parser.add_argument("--eval-size", type=int, default=512, help="as the suite's (runner.EVAL_SIZE)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [s.name for s in scenarios("all", args.scenarios) if s.kind in ("wrapper", "removed")]
    cached = [n for n in names if (args.cache / "tuned" / scenarios("all", [n])[0].key()).exists()]
    started, rows = time.perf_counter(), []
    for name in cached:
        rows += compare(name, args.cache, args.eval_size)
    table = pd.DataFrame(rows).pivot(index=["scenario", "kind"], columns="embeddings",
                                     values=["kept_share", "floor_untrained", "direction"])  # fmt: skip
    with pd.option_context("display.width", 250, "display.max_rows", None, "display.max_columns", None, "display.precision", 3):
        print(table)
    print(f"{len(cached)} scenarios with cached tuned models ({len(names) - len(cached)} without), "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
