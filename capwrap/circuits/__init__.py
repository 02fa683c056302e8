"""Circuits: the computational graph of a model, edge attribution, circuits as data, faithfulness.

* :class:`Graph`: upstream nodes (the input, heads, MLPs) and downstream nodes (query/key/value
  inputs, MLP inputs, the logits) of a model, and the edges between them;
* :func:`attribute`: edge scores by attribution patching (EAP) or with integrated gradients (EAP-IG),
  with mean, zero or corrupted-input ablation, for any metric;
* :func:`exact_scores`: the same scores measured by ablating each edge (the reference);
* :class:`Circuit`: a set of edges chosen by score (top edges, top components, greedy), compared
  (Jaccard, weighted overlap), saved, loaded and drawn;
* :func:`faithfulness`: how much of the metric each circuit recovers with the rest ablated.
"""

from capwrap.circuits.attribution import EdgeScores, attribute
from capwrap.circuits.circuit import SELECTIONS, Circuit
from capwrap.circuits.exact import ablated_metric, exact_scores, split_input_eap
from capwrap.circuits.faithfulness import FaithfulnessCurve, circuit_metric, faithfulness
from capwrap.circuits.graph import Graph, Node
from capwrap.circuits.metrics import (
    answer_logit,
    answer_logodds,
    answer_logprob,
    answer_prob,
    metric_values,
    negative_loss,
)
from capwrap.circuits.nodes import ABLATIONS

__all__ = [
    "ABLATIONS",
    "Circuit",
    "EdgeScores",
    "FaithfulnessCurve",
    "Graph",
    "Node",
    "ablated_metric",
    "answer_logit",
    "answer_logodds",
    "answer_logprob",
    "answer_prob",
    "SELECTIONS",
    "attribute",
    "circuit_metric",
    "exact_scores",
    "faithfulness",
    "metric_values",
    "negative_loss",
    "split_input_eap",
]
