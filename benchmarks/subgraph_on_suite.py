"""The Subgraph analyzer on the validation suite's pairs: which way does it point, per truth?

`Subgraph` (issue 12) reads the wrapper question at the level of circuits, with thresholds set by
hand on the demo (``survive`` 0.5, ``rewired`` 0.25, ``enriched`` 1.5), and is not part of
`diagnose()`'s default analyzers or of the fitted rule. This runs it, with its defaults, on the
tuned models a `capwrap validate` run cached and scores it against each record's deletion truth:
how often it points the right way where it points, how often it points at all, its wrong
directions by truth, and how well its two statistics (the capability circuit's weighted overlap
between base and tuned, and the weight change's enrichment on it) separate wrapper from
capability-change truths (AUC; a wrapper should keep more overlap and less enrichment).

    python benchmarks/subgraph_on_suite.py --out /tmp/suite/held-out-51 --threads 1
    python benchmarks/subgraph_on_suite.py --out /tmp/suite/cal-base --cache /tmp/suite/cache
    python benchmarks/subgraph_on_suite.py --out /tmp/suite/held-out-51 --method eap-ig   # before 2026-12-07's default
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from suite_models import scenario_models

from capwrap.analyzers import ModelPair, Subgraph
from capwrap.diagnosis import default_rule
from capwrap.validation import auc, load_records, scenarios
from capwrap.validation.scenarios import record_truth, scenario_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a `capwrap validate` results folder (its records)")
    parser.add_argument("--cache", type=Path, help="its cache folder (default OUT/cache)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="auto", help="Subgraph's method (default auto: exact on compiled Tracr "
                                                         "models, eap-ig on the others)")  # fmt: skip
    parser.add_argument("only", nargs="*", help="scenario names or glob patterns (default: every record)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or args.out / "cache"
    rule, rows, started = default_rule(), [], time.perf_counter()
    chosen = {s.name for s in scenarios("all", args.only)} if args.only else None
    for record in load_records(args.out):
        s = scenario_of(record)
        if chosen is not None and s.name not in chosen:
            continue
        truth = record_truth(record, rule)["deletion"]
        folder = cache / "tuned" / s.key()
        if truth not in ("wrapper", "capability_change") or not (folder / "model.safetensors").exists():
            continue
        base, tuned, capability, downstream = scenario_models(s, cache)
        t = time.perf_counter()
        ev = Subgraph(method=args.method, seed=0)(ModelPair(base, tuned), capability, downstream, eval_size=512, seed=0)
        h = ev.headline
        rows.append({"scenario": s.name, "truth": truth, "method": ev.details["method"], "direction": ev.direction,
                     "strength": round(ev.strength, 3),
                     "overlap": h["capability_overlap"], "jaccard": h["capability_jaccard"],
                     "enrichment": h["weight_change_enrichment"], "finetune_inside": h["finetune_inside"],
                     "seconds": round(time.perf_counter() - t, 1)})  # fmt: skip
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    want = np.where(table["truth"] == "wrapper", "wrapper", "change")
    pointing = table["direction"] != "neutral"
    right = pointing & (table["direction"] == want)
    wrapper, change = table["truth"] == "wrapper", table["truth"] == "capability_change"
    with pd.option_context("display.width", 250, "display.max_rows", None, "display.precision", 3):
        print(table.to_string(index=False))
        print(pd.crosstab(table["truth"], table["direction"]))
    print(f"{len(table)} scored pairs ({wrapper.sum()} wrapper, {change.sum()} capability_change), "
          f"{time.perf_counter() - started:.0f} s; points somewhere on {pointing.mean():.0%}; right where it points: "
          f"{right.sum()} of {pointing.sum()}; wrong on wrapper {(pointing & ~right & wrapper).sum()}, "
          f"wrong on change {(pointing & ~right & change).sum()}")  # fmt: skip
    print(f"AUC overlap (higher = wrapper) {auc(table.overlap[wrapper], table.overlap[change]):.2f}; "
          f"AUC enrichment (lower = wrapper) {auc(-table.enrichment[wrapper], -table.enrichment[change]):.2f}")


if __name__ == "__main__":
    main()
