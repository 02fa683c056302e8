"""Benchmark: does low-memory revival (Adafactor stepped inside the backward pass) tell what AdamW tells?

On the demo's two pairs — the demo fine-tune (a wrapper: count ``b`` learned as count ``a`` + 1) and
every block re-initialized, then the same fine-tune (the demo's negative control until 2026-12-06;
it is fine-tuned where the correlation never holds since) —
runs ``Revival`` with AdamW (its default) and with ``low_memory=True``, the default control built
each time, and prints per pair and mode the median steps of the tuned model and the never-had-it
control to reach 90% of the base's count-``a`` accuracy, the log2 speed-up and its 90% interval.

    python benchmarks/revival_low_memory.py [--seeds 2] [--max-steps 200] [--threads 1]

Prints one JSON line per run; the figures and the command are in RESULTS.md ("Low-memory diagnosis").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import capwrap
from capwrap.analyzers import ModelPair, Revival
from capwrap.demo import DEMO_BASE, FINETUNE_CONFIG, demo_tasks, remove_capability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = demo_tasks()
    base = capwrap.load_model(str(DEMO_BASE))
    finetune = dataclasses.replace(FINETUNE_CONFIG, progress=False)
    pairs = {}
    for name in ("wrapper: the demo fine-tune", "removed: blocks re-initialized, then fine-tuned"):
        tuned = base.clone()
        if name.startswith("removed"):
            remove_capability(tuned, seed=0)
        capwrap.train(tuned, tasks["downstream_correlated"], finetune)
        pairs[name] = tuned
    for name, tuned in pairs.items():
        for low_memory in (False, True):
            start = time.perf_counter()
            revival = Revival(max_steps=args.max_steps, batch_size=32, check_size=256, control_steps=200,
                              seeds=args.seeds, low_memory=low_memory)  # fmt: skip
            evidence = revival(ModelPair(base, tuned), tasks["capability"], tasks["downstream_correlated"], eval_size=256)
            low, high = evidence.intervals["revival_speedup_log2"]
            print(json.dumps({
                "pair": name, "low_memory": low_memory, "steps_tuned": evidence.headline["steps_tuned"],
                "steps_control": evidence.headline["steps_control"], "speedup_log2": round(evidence.value, 2),
                "interval_90": [round(float(low), 2), round(float(high), 2)],
                "seconds": round(time.perf_counter() - start, 1),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
