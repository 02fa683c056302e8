"""Benchmark: circuit-tuning at a LoRA-sized parameter budget against full fine-tuning and LoRA itself.

The demo's PCFG setting as in tutorials/05_circuit_tuning.ipynb (the shipped base counts ``a``;
fine-tuned on count ``b`` with count(b) = count(a) + 1 in every sequence, C_Tr = 1; batch 96,
warmup 20% then cosine): full fine-tuning; circuit-tuning whose kept edges are capped at what LoRA
with rank 8 on every attention and MLP matrix would train (9.1% of the parameters); and, with
``--lora``, LoRA itself (peft, rank 8, alpha 16, every linear layer), each at the learning rates
and training seeds given. Reports downstream accuracy (C_Te = 1), capability retention (count
``a``) on 2,048-sequence test sets, and the share of parameters trained per step and at any step
(LoRA: its adapter's parameters, as a share of the model's). With ``--revival``, also how many
steps of reverse fine-tuning on count ``a`` (AdamW, lr 1e-4, batch 32, as `Revival`'s defaults)
bring each tuned model back to 90% of the base's accuracy on count ``a``, checked after every step
(`Revival` checks every 10, too coarse to rank these runs).

    python benchmarks/circuit_tuning_budget.py [--lrs 1e-4 3e-4 1e-3] [--seeds 1 2 3] [--lora] [--revival] [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import capwrap
from capwrap.analyzers.revival import steps_to_threshold
from capwrap.circuits import Graph
from capwrap.demo import DEMO_BASE, demo_tasks
from capwrap.methods import LoRA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="training seeds (batches, initial state)")
    parser.add_argument("--lora", action="store_true", help="also fine-tune with LoRA r=8 on every linear layer")
    parser.add_argument("--skip-full", action="store_true", help="leave out full fine-tuning")
    parser.add_argument("--revival", action="store_true", help="also count reverse fine-tuning steps back to count a")
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
    methods = {"full fine-tuning": capwrap.FineTune,
               "circuit-tuning, LoRA r=8 budget": lambda: capwrap.CircuitTuning(top_n=graph.n_edges, max_params=lora_r8),
               "LoRA r=8": lambda: LoRA(r=8, alpha=16, target="all-linear")}  # fmt: skip
    chosen = [m for m in methods if (args.lora or m != "LoRA r=8") and not (args.skip_full and m == "full fine-tuning")]
    for lr in args.lrs:
        for seed in args.seeds:
            config = capwrap.TrainConfig(steps=args.steps, batch_size=96, lr=lr, warmup=0.2, seed=seed, progress=False)
            for name in chosen:
                model, method = base.clone(), methods[name]()
                start = time.perf_counter()
                history = capwrap.train(model, tasks["downstream_correlated"], config, method=method).history
                trained = 1.0
                if isinstance(method, LoRA):
                    trained = sum(p.numel() for p in method._trainable().values()) / spec.n_params
                row = {"method": name, "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - start, 1),
                       **{k: capwrap.accuracy(model, b) for k, b in tests.items()},
                       "trained_per_step": float(history["method/trainable_ratio"].mean())
                       if "method/trainable_ratio" in history else trained,
                       "trained_at_any_step": float(history["method/trained_ever_ratio"].iloc[-1])
                       if "method/trained_ever_ratio" in history else trained}  # fmt: skip
                if args.revival:
                    check = tests["count a"][:512]
                    threshold = 0.9 * out["base"]["count a"]
                    back = capwrap.TrainConfig(steps=100, batch_size=32, lr=1e-4, warmup=0.0, seed=seed, progress=False)
                    first, _, _ = steps_to_threshold(model, tasks["capability"], check, threshold, back, eval_every=1)
                    row["revival_steps"] = first  # NaN: not back within 100 steps
                out["runs"].append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
