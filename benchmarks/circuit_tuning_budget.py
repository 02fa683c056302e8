"""Benchmark: circuit-tuning at a LoRA-sized parameter budget against full fine-tuning, per learning rate.

The demo's PCFG setting as in tutorials/05_circuit_tuning.ipynb (the shipped base counts ``a``;
fine-tuned on count ``b`` with count(b) = count(a) + 1 in every sequence, C_Tr = 1; batch 96,
warmup 20% then cosine, seed 1): full fine-tuning and circuit-tuning whose kept edges are capped at
what LoRA with rank 8 on every attention and MLP matrix would train (9.1% of the parameters), each at
the learning rates given. Reports downstream accuracy (C_Te = 1), capability retention (count ``a``)
on 2,048-sequence test sets, and the share of parameters trained per step and at any step.

    python benchmarks/circuit_tuning_budget.py [--lrs 1e-4 3e-4 1e-3] [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import capwrap
from capwrap.circuits import Graph
from capwrap.demo import DEMO_BASE, demo_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = capwrap.load_model(str(DEMO_BASE))
    tasks = demo_tasks()
    tests = {"count a": tasks["capability"].sample(args.eval_size, seed=123),
             "count b, C_Te=1": tasks["downstream_correlated"].sample(args.eval_size, seed=123)}  # fmt: skip
    spec, graph = base.spec, Graph.from_spec(base.spec)
    lora_r8 = spec.n_layers * 8 * (4 * (2 * spec.d_model) + 2 * (spec.d_model + spec.d_mlp))
    out: dict = {"steps": args.steps, "lora_r8_params": lora_r8, "lora_r8_share": lora_r8 / spec.n_params,
                 "base": {k: capwrap.accuracy(base, b) for k, b in tests.items()}, "runs": []}  # fmt: skip
    for lr in args.lrs:
        config = capwrap.TrainConfig(steps=args.steps, batch_size=96, lr=lr, warmup=0.2, seed=1, progress=False)
        for name, method in (("full fine-tuning", capwrap.FineTune()),
                             ("circuit-tuning, LoRA r=8 budget",
                              capwrap.CircuitTuning(top_n=graph.n_edges, max_params=lora_r8))):  # fmt: skip
            model = base.clone()
            start = time.perf_counter()
            history = capwrap.train(model, tasks["downstream_correlated"], config, method=method).history
            row = {"method": name, "lr": lr, "seconds": round(time.perf_counter() - start, 1),
                   **{k: capwrap.accuracy(model, b) for k, b in tests.items()},
                   "trained_per_step": float(history["method/trainable_ratio"].mean())
                   if "method/trainable_ratio" in history else 1.0,
                   "trained_at_any_step": float(history["method/trained_ever_ratio"].iloc[-1])
                   if "method/trained_ever_ratio" in history else 1.0}  # fmt: skip
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
