"""Faithfulness: how much of the model's behaviour does a circuit carry on its own?

Keep a circuit, ablate every other edge (:func:`~capwrap.circuits.exact.ablated_metric`), and measure
the metric. The share of the behaviour the circuit recovers is

    ``recovered = (metric(circuit) − metric(nothing)) / (metric(model) − metric(nothing))``

where *nothing* ablates every edge and *model* none. A curve over circuit sizes shows how many
edges the behaviour needs.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> from capwrap.circuits import attribute
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> batch = task.sample(8, seed=0)
    >>> curve = faithfulness(model, batch, attribute(model, batch), ns=[0, 13])
    >>> curve.table["recovered"].round(6).tolist()  # no edge: nothing; every edge: everything
    [0.0, 1.0]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import pandas as pd
import torch
from torch import Tensor

from capwrap.circuits.attribution import EdgeScores
from capwrap.circuits.circuit import Circuit, Selection
from capwrap.circuits.exact import ablated_metric
from capwrap.circuits.graph import Graph
from capwrap.circuits.metrics import DEFAULT_METRIC, METRICS, Metric, resolve_metric
from capwrap.circuits.nodes import Ablation, ablated_values
from capwrap.errors import CapwrapWarning, ConfigError, as_list, whole_number
from capwrap.models import CapModel
from capwrap.tasks.base import TaskBatch

__all__ = ["FaithfulnessCurve", "faithfulness", "circuit_metric", "default_sizes"]


@dataclass
class FaithfulnessCurve:
    """Metric and recovered share per circuit size.

    Attributes:
        table: one row per size: ``n`` (edges, or components with ``select="nodes"``), ``edges``
            (edges kept), ``metric`` (batch mean with the rest ablated), ``recovered``.
        model_metric: the metric with nothing ablated.
        empty_metric: the metric with every edge ablated.
        select: how circuits were chosen.
    """

    table: pd.DataFrame
    model_metric: float
    empty_metric: float
    select: str

    def smallest(self, share: float = 0.9) -> int | None:
        """The smallest size on the curve that recovers at least ``share`` (None if none does)."""
        hits = self.table[self.table["recovered"] >= share]
        return int(hits["n"].min()) if len(hits) else None

    def figure(self, title: str | None = None) -> Any:
        """Recovered share against circuit size (log x axis)."""
        import plotly.graph_objects as go

        t = self.table[self.table["n"] > 0]
        fig = go.Figure(go.Scatter(x=t["edges"], y=t["recovered"], mode="lines+markers", name="recovered",
                                   hovertext=[f"n={n}" for n in t["n"]]))  # fmt: skip
        fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
        fig.update_layout(
            title=title or f"faithfulness ({self.select}): metric recovered with the rest ablated",
            xaxis=dict(title="edges in the circuit", type="log"), yaxis=dict(title="recovered", tickformat=".0%"),
            height=360,
        )  # fmt: skip
        return fig


def default_sizes(n_edges: int, points: int = 12) -> list[int]:
    """Circuit sizes spaced evenly on a log scale from 1 to ``n_edges`` (with 0 and ``n_edges``).

    Examples:
        >>> default_sizes(100, points=5)
        [0, 1, 3, 10, 32, 100]
    """
    sizes = {0, n_edges} | {round(n_edges ** (i / (points - 1))) for i in range(points)}
    return sorted(s for s in sizes if 0 <= s <= n_edges)


def circuit_metric(
    model: CapModel,
    batch: TaskBatch,
    circuits: Sequence[Circuit],
    *,
    metric: Metric | str = DEFAULT_METRIC,
    ablation: Ablation = "mean",
    corrupted: Tensor | None = None,
    reference: TaskBatch | None = None,
    memory_mb: float = 256.0,
) -> Tensor:
    """The batch-mean metric of each circuit with every edge outside it ablated, ``[len(circuits)]``."""
    if not circuits:
        raise ConfigError("no circuits to measure: give at least one Circuit")
    metric = resolve_metric(metric)
    graph = Graph.from_spec(model.spec)
    for c in circuits:
        if c.graph.spec != model.spec:
            raise ConfigError("a circuit of another model shape cannot be evaluated on this model")
    ablated = ablated_values(model, graph, ablation, batch, corrupted, reference)
    masks = torch.stack([~c.mask for c in circuits])
    return ablated_metric(model, batch, masks, ablated, metric, memory_mb).mean(1)


def faithfulness(
    model: CapModel,
    batch: TaskBatch,
    scores: EdgeScores,
    *,
    ns: Sequence[int] | None = None,
    select: Selection = "edges",
    metric: Metric | str | None = None,
    ablation: Ablation | None = None,
    corrupted: Tensor | None = None,
    reference: TaskBatch | None = None,
    memory_mb: float = 256.0,
) -> FaithfulnessCurve:
    """Faithfulness of the circuits ``scores`` chooses at each size in ``ns`` (default: :func:`default_sizes`).

    Args:
        model: the model.
        batch: the sequences the metric is measured on.
        scores: edge scores (from :func:`~capwrap.circuits.attribute` or :func:`~capwrap.circuits.exact_scores`).
        ns: circuit sizes: edges (``select="edges"``/``"greedy"``) or components (``"nodes"``).
        select: how circuits are chosen (:meth:`Circuit.from_scores`).
        metric: as in :func:`~capwrap.circuits.attribute`; default: the one the scores were computed
            with (``scores.info["metric"]``, when it is one of :data:`~capwrap.circuits.metrics.METRICS`;
            else :data:`~capwrap.circuits.metrics.DEFAULT_METRIC`). Another one is measured, with a
            warning, as for ``ablation``.
        ablation: as in :func:`~capwrap.circuits.attribute`; default: the one the scores were computed
            with (another one is measured, with a warning: circuits chosen under one ablation are
            judged under another).
        corrupted: as in :func:`~capwrap.circuits.attribute`.
        reference: as in :func:`~capwrap.circuits.attribute`.
        memory_mb: memory budget of one batched forward pass.
    """
    if not isinstance(scores, EdgeScores):
        raise ConfigError(
            f"faithfulness takes edge scores (attribute(...) or exact_scores(...)) and chooses its circuits from them, "
            f"got a {type(scores).__name__}; to measure circuits you already have, use circuit_metric(model, batch, [circuit])"
        )
    if scores.graph.spec != model.spec:
        raise ConfigError("the scores belong to a model of another shape")
    scored_by = scores.info.get("metric")
    if metric is None:
        metric = METRICS.get(scored_by, DEFAULT_METRIC)
    metric = resolve_metric(metric)
    if scored_by in METRICS and getattr(metric, "__name__", None) != scored_by:
        warnings.warn(f"the scores were computed with metric {scored_by!r} and the circuits are measured with "
                      f"{getattr(metric, '__name__', metric)!r}; leave metric unset to measure them as they were scored",
                      CapwrapWarning, stacklevel=2)  # fmt: skip
    if ns is not None:
        ns = as_list(ns, "ns is a list of circuit sizes, e.g. ns=[5, 10, 20]")
    if ablation is None:
        ablation = cast(Ablation, scores.ablation)
    elif ablation != scores.ablation:
        warnings.warn(f"the scores were computed with ablation={scores.ablation!r} and the circuits are measured "
                      f"with ablation={ablation!r}; leave ablation unset to measure them as they were scored",
                      CapwrapWarning, stacklevel=2)  # fmt: skip
    graph = scores.graph
    scored = int(scores.values.isfinite().sum())
    limit = len(graph.components) - 2 if select == "nodes" else scored
    sizes = default_sizes(limit) if ns is None else [whole_number(n, "a circuit size") for n in ns]
    circuits = [Circuit.from_scores(scores, n, select) for n in sizes]
    full = Circuit(graph, torch.ones(graph.n_edges, dtype=torch.bool), scores.values)
    empty = Circuit(graph, torch.zeros(graph.n_edges, dtype=torch.bool), scores.values)
    values = circuit_metric(
        model, batch, [full, empty, *circuits], metric=metric, ablation=ablation, corrupted=corrupted,
        reference=reference, memory_mb=memory_mb,
    ).tolist()  # fmt: skip
    model_metric, empty_metric, per = values[0], values[1], values[2:]
    gap = model_metric - empty_metric
    table = pd.DataFrame(
        {
            "n": sizes,
            "edges": [c.n_edges for c in circuits],
            "metric": per,
            "recovered": [(v - empty_metric) / gap if abs(gap) > 1e-9 else math.nan for v in per],
        }
    )
    return FaithfulnessCurve(table, model_metric, empty_metric, select)
