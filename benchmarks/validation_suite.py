"""The verdict's measured accuracy: run a half of the validation suite, time it, perturb the rule.

1. Runs the split (default: held-out) with local worker processes into OUT (cold: a fresh OUT and
   cache), timed — the target is at most 30 minutes for the held-out half with 2 workers on the
   project's 2-core machine.
2. Prints the accuracy, the confusion table and each analyzer's accuracy and AUC (as
   ``capwrap validate`` does) and writes OUT/validation.json and OUT/validation.html.
3. Sensitivity: every number of the shipped rule — thresholds, anchor points, gates, weights — ×0.8 and
   ×1.2; how many verdicts flip (target: none).
   Written to OUT/sensitivity.csv.
4. With ``--ray``: the same scenarios on a local Ray cluster into OUT/ray (the tuned models and
   revival controls come from the first run's cache — OUT/cache, or ``--cache`` where
   ``capwrap validate --cache`` put them — so this checks the Ray path, not the training again);
   the verdicts must be the same.

5. With ``--cross-validate CAL_OUT``: leave-one-scenario-out cross-validation of the rule's fit on
   the calibration records in CAL_OUT (a ``capwrap validate --split calibration`` folder), instead of
   steps 1-4.

    python benchmarks/validation_suite.py --out /tmp/validation_heldout [--split held-out] [--workers 2] [--ray] [--cache DIR]
    python benchmarks/validation_suite.py --cross-validate /tmp/validation_calibration
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from capwrap.diagnosis import default_rule
from capwrap.validation import ValidationResult, cross_validate, load_records, run_suite, scenarios, sensitivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--cross-validate", metavar="CAL_OUT", help="leave-one-scenario-out CV of the fit instead")
    parser.add_argument("--split", default="held-out", choices=["calibration", "held-out", "all"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also run on a local Ray cluster and compare verdicts")
    parser.add_argument("--cache", help="the tuned models' cache (default OUT/cache; give the one capwrap validate --cache used)")
    args = parser.parse_args()
    if args.cross_validate:
        records = [r for r in load_records(Path(args.cross_validate)) if r["scenario"]["split"] == "calibration"]
        rows = cross_validate(records)
        right = int((rows["truth"] == rows["verdict"]).sum())
        print(rows[rows["truth"] != rows["verdict"]].to_string(index=False))
        print(f"leave-one-scenario-out: {right} of {len(rows)} findings right ({right / len(rows):.1%}), "
              f"{len(records)} calibration scenarios")  # fmt: skip
        return
    if not args.out:
        parser.error("--out is required (or --cross-validate CAL_OUT)")
    out = Path(args.out)
    chosen = scenarios(args.split)
    rule = default_rule()

    started = time.perf_counter()
    cache = Path(args.cache) if args.cache else out / "cache"
    records = run_suite(chosen, out, workers=args.workers, cache=cache, progress=False, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - started
    result = ValidationResult.from_records(records, rule, split=args.split, wall_seconds=round(wall, 1))
    print(result.summary_text())
    print(f"\n{len(records)} scenarios ({args.split}) in {wall / 60:.1f} min with {args.workers} workers")
    result.write(out)

    table = sensitivity(records, rule)
    table.to_csv(out / "sensitivity.csv", index=False)
    flips = table[table["flips"] > 0]
    print(f"\nsensitivity: {len(table)} perturbations (each threshold, anchor point, gate and weight x0.8 and x1.2; "
          f"a threshold at 0: +0.025; an anchor weight of 1: x0.8 only), {len(flips)} flip a verdict")  # fmt: skip
    if len(flips):
        print(flips.to_string(index=False))

    if args.ray:
        started = time.perf_counter()
        ray_records = run_suite(chosen, out / "ray", ray_address="local", cache=cache, progress=False)
        ray_wall = time.perf_counter() - started
        ray_rows = ValidationResult.from_records(ray_records, rule).rows.set_index(["name", "question"])["verdict"]
        local_rows = result.rows.set_index(["name", "question"])["verdict"]
        differ = (ray_rows != local_rows.reindex(ray_rows.index)).sum()
        print(f"\nRay (local cluster, cached models): {len(ray_records)} scenarios in {ray_wall / 60:.1f} min; "
              f"{differ} verdicts differ from the local run")  # fmt: skip
        pd.DataFrame({"local": local_rows, "ray": ray_rows}).to_csv(out / "ray_vs_local.csv")


if __name__ == "__main__":
    main()
