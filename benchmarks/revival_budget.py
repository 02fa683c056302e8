"""Revival at another budget: which suite scenarios relearn, and how fast, against the never-had-it control?

Reruns :class:`~capwrap.analyzers.Revival` on suite scenarios whose tuned models a ``capwrap
validate`` run cached, at the suite's settings (``runner.suite_analyzers``: 200 reverse fine-tuning
steps) or another budget, and prints the steps of the tuned model and of the control and the
statistic. Reverse fine-tuning runs at a constant rate, so a larger budget only lets slower runs
finish (until 2026-12-06 the rate fell along a cosine over the budget, and at 200 steps no
never-had-it control relearned: benchmarks/RESULTS.md).

    python benchmarks/revival_budget.py --cache /tmp/suite/cache --max-steps 200 --threads 2 \\
        'held/removed-count-b/retrained/s63' 'held/tracr-counter/reinit-blocks/s68'
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from suite_models import scenario_models, scenario_parser

from capwrap.analyzers import ModelPair, Revival
from capwrap.validation import scenarios
from capwrap.validation.build import make_control
from capwrap.validation.runner import CONTROL_STEPS, EVAL_SIZE


def revive(name: str, cache: Path, max_steps: int) -> dict:
    """Revival of the scenario ``name`` at ``max_steps``, with the suite's control and settings."""
    (s,) = scenarios("all", [name])
    base, tuned, capability, downstream = scenario_models(s, cache)
    control = make_control(base, downstream, CONTROL_STEPS, seed=0, cache=cache)
    revival = Revival(max_steps=max_steps, check_size=256, control=control, seeds=2, cache=str(cache))
    started = time.perf_counter()
    ev = revival(ModelPair(base, tuned), capability, downstream, eval_size=EVAL_SIZE, seed=0)
    h = ev.headline
    return {"scenario": name, "kind": s.kind, "budget": max_steps, "steps_tuned": h["steps_tuned"],
            "steps_control": h["steps_control"], "speedup_log2": ev.value,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    parser = scenario_parser(__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=200, help="reverse fine-tuning budget (default: the suite's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [s.name for s in scenarios("all", args.scenarios)]
    rows = []
    for name in names:
        rows.append(revive(name, args.cache, args.max_steps))
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    print()
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
