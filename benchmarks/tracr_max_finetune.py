"""Can the suite's Tracr Max-identifier base be fine-tuned at all? Accuracy after each recipe.

The held-out half's Tracr Max-identifier wrappers (name the 4th-largest letter where it is tied to
the 5th-largest, shifted by one) never learn their task, so their truth is `unknown`. This runs the
scenario's fine-tune with other learning rates, optimizers, step counts and weight noise, and prints
the capability (rank 5), the downstream task with its correlation (C_Te = 1) and without it, and the
final training loss. Each recipe is ``LR:STEPS:OPTIMIZER:NOISE``.

    python benchmarks/tracr_max_finetune.py 1e-9:1:sgd:0.001 1e-9:1:sgd:0 3e-3:300:sgd:0 1e-3:300:adamw:0
    python benchmarks/tracr_max_finetune.py 1e-9:1:sgd:0.001 --seeds 71 72 73 74 75   # the noise's draw

``--seeds``: run each recipe with these training seeds (the weight noise's draw among them) in place
of the scenario's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from capwrap.tasks import accuracy
from capwrap.tasks.spec import task_from_spec
from capwrap.validation import scenario
from capwrap.validation.bases import load_base
from capwrap.validation.build import make_tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", metavar="LR:STEPS:OPTIMIZER:NOISE")
    parser.add_argument("--scenario", default="held/tracr-max/sgd-small-c1/s95")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the scenario's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = scenario(args.scenario)
    base = load_base(chosen.base)
    capability = task_from_spec(chosen.capability, model=base)
    downstream = task_from_spec(chosen.downstream, model=base)
    tests = {"capability": capability.sample(1024, seed=123), "downstream": downstream.sample(1024, seed=123),
             "downstream, C_Te=0": downstream.correlation_free().sample(1024, seed=123)}  # fmt: skip
    print("base:", {k: round(accuracy(base, b), 3) for k, b in tests.items()}, flush=True)
    for text in args.recipes:
        lr, steps, optimizer, noise = text.split(":")
        recipe = dataclasses.replace(chosen.recipe, lr=float(lr), steps=int(steps), optimizer=optimizer,
                                     weight_noise=float(noise))  # fmt: skip
        for seed in args.seeds or [chosen.seed]:
            started = time.perf_counter()
            tuned, made = make_tuned(dataclasses.replace(chosen, recipe=recipe, seed=seed), base, capability, None)
            accs = {k: round(accuracy(tuned, b), 3) for k, b in tests.items()}
            print(f"{text} (seed {seed}): {accs}, final loss {made.get('final_loss', float('nan')):.3f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
