"""Benchmark: fitting probes for every layer x recorded step in one batched problem, against a
loop that fits the same probes one at a time (the same solver, so accuracies must agree).

Uses the demo's recorded run (``capwrap demo --out DIR`` first): 4 layers x 31 recorded steps =
124 probes on the 256-sequence probe batch, label ``count_a`` at the answer position.

    python benchmarks/probing_batched.py --run DIR/run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from capwrap.analyzers import fit_probes
from capwrap.recording import RunStore
from capwrap.recording.recorder import load_probe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a RunStore folder, e.g. the demo's OUT/run")
    parser.add_argument("--label", default="count_a")
    args = parser.parse_args()
    store = RunStore.open(args.run)
    probe = load_probe(store)
    rows = torch.arange(len(probe))
    feats = torch.stack(
        [
            store.array(h)[i][rows, probe.answer_pos].float()
            for h in store.meta["hooks"]
            for i in range(len(store.array_steps(h)))
        ]
    )
    labels = probe.labels[args.label]
    t0 = time.perf_counter()
    batched = fit_probes(feats, labels, seed=0).test_accuracy
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    looped = torch.cat([fit_probes(feats[i : i + 1], labels, seed=0).test_accuracy for i in range(len(feats))])
    t_loop = time.perf_counter() - t0
    print(json.dumps({
        "probes": len(feats), "sequences": len(labels), "d": feats.shape[-1],
        "seconds_batched": round(t_batched, 2), "seconds_loop": round(t_loop, 2),
        "speedup": round(t_loop / t_batched, 1),
        "max_accuracy_difference_points": round(100 * float((batched - looped).abs().max()), 2),
        "mean_accuracy": round(float(batched.mean()), 4),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
