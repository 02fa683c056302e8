"""Two checks of how capwrap's edge scores relate to the circuit-tuning protocol, on the demo base.

* **positions**: circuit-tuning scores an edge over every position of the training batch
  (attribution patching's estimate of ablating the edge everywhere); the protocol records the
  activation differences "at the positions the metric reads". The edge Jaccard overlap of the top-N
  edges scored both ways (mean ablation, the training loss of count ``b`` with C_Tr = 1, as a
  circuit-tuning step scores), for N in ``--tops``.
* **integrated gradients under zero ablation**: ``eap-ig-nodes`` promises that a path's edge scores
  add up to the exact effect of ablating them all, up to the integral's resolution. The sum over the
  input's edges at each of ``--steps`` integration steps, against the exact effect of zero-ablating
  every edge out of the input, on the capability task (count ``a``).

    python benchmarks/circuit_protocol_checks.py [--sequences 16] [--tops 20 50 100] [--steps 5 20 100 400]

Prints one JSON object; the figures and the command are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json

import torch

import capwrap
from capwrap.circuits import Circuit, EdgeScores, Graph, attribute
from capwrap.circuits.exact import ablated_metric
from capwrap.circuits.nodes import NodeCapture, ablated_values
from capwrap.demo import DEMO_BASE
from capwrap.tasks.base import task_loss


def position_overlap(model: capwrap.CapModel, n: int, tops: list[int]) -> dict[int, float]:
    """Top-N edge Jaccard of training-loss scores over every position against the answer position only."""
    graph = Graph.from_spec(model.spec)
    batch = capwrap.PCFGTask("count", "b", correlation=1.0).sample(n, seed=0)
    capture = NodeCapture(model, graph)
    with model.hooks(capture.hooks()):
        loss = task_loss(model(batch.tokens), batch)
    loss.backward()
    model.module.zero_grad(set_to_none=True)
    up = capture.values().upstream(capture.writes).double()  # [upstream, batch, pos, d_model]
    grads = capture.gradients().double()  # [downstream, batch, pos, d_model]
    delta = up - up.mean((1, 2), keepdim=True)  # mean ablation over the batch and positions
    rows = torch.arange(n)
    every = torch.einsum("ubpd,vbpd->uv", delta, grads)
    answer = torch.einsum("ubd,vbd->uv", delta[:, rows, batch.answer_pos], grads[:, rows, batch.answer_pos])
    scores = [EdgeScores(graph, graph.from_matrix(m).abs().float(), "eap", "mean") for m in (every, answer)]
    return {k: round(Circuit.from_scores(scores[0], k).jaccard(Circuit.from_scores(scores[1], k)), 3) for k in tops}


def input_path_completeness(model: capwrap.CapModel, n: int, steps: list[int]) -> dict[str, float]:
    """The exact effect of zero-ablating every edge out of the input, and eap-ig-nodes' sum over them."""
    graph = Graph.from_spec(model.spec)
    batch = capwrap.PCFGTask("count", "a").sample(n, seed=5)
    from_input = graph.edge_up == 0
    masks = torch.stack([torch.zeros(graph.n_edges, dtype=torch.bool), from_input])
    values = ablated_metric(model, batch, masks, ablated_values(model, graph, "zero", batch)).mean(1)
    out = {"exact": round(float(values[1] - values[0]), 4)}
    for k in steps:
        scores = attribute(model, batch, method="eap-ig-nodes", ablation="zero", ig_steps=k)
        out[f"eap-ig-nodes, {k} steps"] = round(float(scores.values[from_input].sum()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--tops", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 100, 400])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = capwrap.load_model(str(DEMO_BASE))
    print(json.dumps({
        "top_n_jaccard_every_position_vs_answer_position": position_overlap(model, args.sequences, args.tops),
        "input_path_sum_under_zero_ablation": input_path_completeness(model, args.sequences, args.steps),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
