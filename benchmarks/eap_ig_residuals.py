"""Benchmark: where EAP-IG departs from exact edge patching on the demo model.

Scores every edge of the shipped demo base on one sample of the count-`a` task exactly (each edge
ablated alone) and by EAP-IG, then splits the squared residual (EAP-IG − exact) by the kind of the
edge's downstream input (a head's query, key or value input, an MLP's input, the logits) and lists
the edges it misses most. The correlation ``benchmarks/circuits.py`` reports is the summary of this.

    python benchmarks/eap_ig_residuals.py [--seed 5] [--size 256] [--ig-steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import capwrap
from capwrap.circuits import metrics
from capwrap.circuits.attribution import attribute
from capwrap.circuits.exact import exact_scores
from capwrap.demo import DEMO_BASE, demo_tasks


def downstream_kind(name: str) -> str:
    """``q``, ``k``, ``v`` (a head's inputs), ``mlp`` or ``logits``, from a downstream node's name."""
    if name == "logits":
        return "logits"
    return name.rsplit(".", 1)[-1] if name.endswith((".q", ".k", ".v")) else "mlp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ig-steps", type=int, default=20)
    parser.add_argument("--metric", default="answer_logodds")
    parser.add_argument("--ablation", default="mean_positional")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = capwrap.load_model(str(DEMO_BASE)).eval()
    batch = demo_tasks()["capability"].sample(args.size, seed=args.seed)
    metric = getattr(metrics, args.metric)
    exact = exact_scores(model, batch, metric=metric, ablation=args.ablation)
    ig = attribute(model, batch, metric=metric, method="eap-ig", ablation=args.ablation, ig_steps=args.ig_steps)
    table = exact.table()[["edge", "downstream"]].assign(exact=exact.values.numpy(), eap_ig=ig.values.numpy())
    table["kind"] = [downstream_kind(d) for d in table["downstream"]]
    residual = table["eap_ig"] - table["exact"]
    total = float((residual**2).sum())
    by_kind = {}
    for kind, part in table.groupby("kind"):
        rest = table[table["kind"] != kind]
        by_kind[kind] = {
            "edges": len(part),
            "share_of_squared_residual": round(float(((part["eap_ig"] - part["exact"]) ** 2).sum()) / total, 3),
            "pearson_within": round(float(np.corrcoef(part["eap_ig"], part["exact"])[0, 1]), 3),
            "pearson_without_them": round(float(np.corrcoef(rest["eap_ig"], rest["exact"])[0, 1]), 3),
        }
    worst = table.assign(miss=residual.abs()).nlargest(args.top, "miss")
    print(json.dumps({
        "seed": args.seed, "sequences": args.size, "ig_steps": args.ig_steps, "metric": args.metric,
        "ablation": args.ablation, "pearson": round(ig.correlation(exact), 4), "by_downstream_kind": by_kind,
        "largest_misses": [{"edge": r.edge, "exact": round(r.exact, 3), "eap_ig": round(r.eap_ig, 3)}
                           for r in worst.itertuples()],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
