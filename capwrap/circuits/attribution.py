"""Edge attribution: how much would ablating each edge change a metric? EAP and EAP-IG.

An edge ``u -> d`` is ablated by giving downstream node ``d`` the ablated output ``ã_u`` of upstream
node ``u`` (its mean, zero, or its output on corrupted inputs: :data:`~capwrap.circuits.nodes.ABLATIONS`)
in place of ``u``'s own output ``a_u``, everything else untouched. Its **score** is the change of the
metric, averaged over the batch; to first order (attribution patching, *EAP*; Syed et al. 2023)

    ``score(u, d) = mean over sequences of  Σ_positions (ã_u − a_u) · ∂metric/∂(input of d)``

— every edge of the model from one forward and one backward pass. *EAP-IG* (Hanna et al. 2024)
averages the gradient over ``ig_steps`` points on the straight path from the ablated input
embeddings to the real ones, which follows the metric better where it is far from linear.
*EAP-IG on nodes* (``eap-ig-nodes``) integrates along each upstream output's own path instead: the
edges of a node take the gradients averaged while its output alone moves from the ablated ``ã`` to
the real ``a`` (the paths of :func:`ig_paths`: the input, each layer's heads together, which one
hook holds, and each MLP: ``2 * n_layers + 1`` paths of ``ig_steps`` passes). The scores of a path's
edges then add up to the exact effect of ablating all of them, up to the integral's resolution
(integrated gradients' completeness: every downstream input reads the output additively); EAP-IG's
single input path guarantees that for the input's edges only. It differs from the EAP-IG library's
"EAP-IG-activations", which averages every node's gradients over all the paths.
Positive scores mean ablating the edge would raise the metric. Circuit-tuning ranks edges by
``|score|`` (the absolute value of the batch mean).

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=16, n_heads=2))
    >>> scores = attribute(model, task.sample(16, seed=0), method="eap", ablation="mean")
    >>> scores.values.shape, scores.graph.n_edges
    (torch.Size([46]), 46)
    >>> list(scores.table().columns[:4])
    ['edge', 'upstream', 'downstream', 'score']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from capwrap.circuits.graph import Graph
from capwrap.circuits.metrics import DEFAULT_METRIC, Metric, metric_values, resolve_metric
from capwrap.circuits.nodes import (
    UPSTREAM_HOOKS,
    Ablation,
    HeadWrites,
    NodeCapture,
    NodeValues,
    ablated_values,
    capture_values,
    check_ablation,
    check_readable,
    upstream_hook,
)
from capwrap.errors import ConfigError, whole_number
from capwrap.models import CapModel
from capwrap.tasks.base import TaskBatch

__all__ = ["EdgeScores", "ScoreAccumulator", "attribute", "ig_paths", "METHODS"]

#: Attribution methods: plain attribution patching, with integrated gradients along the input's
#: path, and along each node's own path (see the module docstring).
METHODS: tuple[str, ...] = ("eap", "eap-ig", "eap-ig-nodes")
Method = Literal["eap", "eap-ig", "eap-ig-nodes"]


@dataclass
class EdgeScores:
    """A score for every edge of a model's graph.

    Attributes:
        graph: the graph (edge order).
        values: per-edge scores ``[n_edges]``: the estimated (or, from :func:`~capwrap.circuits.exact.exact_scores`,
            measured) change of the metric when the edge is ablated, averaged over the batch.
        method: ``eap``, ``eap-ig``, ``eap-ig-nodes``, ``exact``.
        ablation: how edges were ablated.
        info: further settings (metric, sequences, IG steps).
    """

    graph: Graph
    values: Float[Tensor, " n_edges"]
    method: str
    ablation: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.shape != (self.graph.n_edges,):
            raise ConfigError(f"expected {self.graph.n_edges} edge scores, got shape {tuple(self.values.shape)}")
        self.values = self.values.detach().float().cpu()

    def table(self) -> pd.DataFrame:
        """One row per edge: ``edge, upstream, downstream, score, abs_score`` and the nodes' kinds, layers and
        components, sorted by ``abs_score`` (largest first)."""
        frame = self.graph.edges_frame()
        frame.insert(3, "score", self.values.numpy())
        frame.insert(4, "abs_score", self.values.abs().numpy())
        return frame.sort_values("abs_score", ascending=False, kind="stable").reset_index(drop=True)

    def matrix(self) -> Float[Tensor, "n_up n_down"]:
        """Scores as an ``[n_up, n_down]`` matrix (NaN where there is no edge)."""
        return self.graph.to_matrix(self.values)

    def correlation(self, other: EdgeScores, absolute: bool = False) -> float:
        """Pearson correlation with another scoring of the same graph (of ``|score|`` with ``absolute``),
        over the edges both score (an edge NaN in either, as :func:`~capwrap.circuits.exact_scores`
        leaves the edges it was not asked for, is left out)."""
        if other.graph.spec != self.graph.spec:
            raise ConfigError("the two scorings belong to models of different shapes")
        a, b = (self.values.abs(), other.values.abs()) if absolute else (self.values, other.values)
        both = a.isfinite() & b.isfinite()
        if int(both.sum()) < 2:
            raise ConfigError(f"the two scorings share {int(both.sum())} scored edges; a correlation needs at least 2")
        stacked = torch.stack([a[both], b[both]]).double()
        return float(torch.corrcoef(stacked)[0, 1])

    def node_scores(self) -> pd.Series:
        """Each component's total ``|score|`` over the edges it takes part in (as upstream or downstream)."""
        frame = self.graph.edges_frame()
        frame["abs_score"] = self.values.abs().numpy()
        up = frame.groupby("up_component")["abs_score"].sum()
        down = frame.groupby("down_component")["abs_score"].sum()
        return up.add(down, fill_value=0.0).reindex(self.graph.components, fill_value=0.0)


class ScoreAccumulator:
    """Running sums from which edge scores follow, batch chunk by batch chunk.

    ``score(u, d) = Σ (ã_u − a_u) · g_d`` splits into ``Σ ã_u · g_d − Σ a_u · g_d``; with mean
    ablation ``ã_u`` is a constant vector (per position with ``mean_positional``), so only the
    gradients' sums are needed for the first term — and the means themselves may be those of the
    very batch being scored, known only after its last chunk. One forward and one backward pass per
    chunk is all it takes.

    Args:
        graph: the model's graph.
        ablation: how edges are ablated.
        ablated: the ablated values when known in advance (a reference batch's means, zeros); for
            ``mean``/``mean_positional`` without it, the means of the scored values are used.
    """

    def __init__(self, graph: Graph, ablation: Ablation, ablated: NodeValues | None = None):
        self.graph, self.ablation, self.ablated = graph, ablation, ablated
        n_up, n_down = len(graph.upstream), len(graph.downstream)
        self.value_grad = torch.zeros(n_up, n_down, dtype=torch.float64)
        self.ablated_grad = torch.zeros(n_up, n_down, dtype=torch.float64)
        self.grad_sum: Tensor | None = None  # Σ g over the mean's dimensions
        self.value_sum: Tensor | None = None  # Σ a over the mean's dimensions
        self.count = 0

    @property
    def _mean_dims(self) -> tuple[int, ...]:
        return (1, 2) if self.ablation == "mean" else (1,)

    def add(
        self,
        values: NodeValues,
        grads: Float[Tensor, "n_down batch pos d_model"],
        writes: HeadWrites,
        ablated: NodeValues | None = None,
    ) -> None:
        """Add one chunk: its (clean) upstream values, its downstream input gradients, the model's
        :class:`~capwrap.circuits.nodes.HeadWrites`, and for ``corrupted`` its ablated values."""
        up = values.upstream(writes)  # [n_up, batch, pos, d_model]
        grads = grads.to(up.dtype)
        self.value_grad += (up.flatten(1) @ grads.flatten(1).T).double().cpu()
        if self.ablation == "corrupted":
            if ablated is None:
                raise ConfigError("corrupted ablation needs each chunk's corrupted values")
            corrupt = ablated.upstream(writes).expand_as(up)
            self.ablated_grad += (corrupt.flatten(1) @ grads.flatten(1).T).double().cpu()
        elif self.ablation in ("mean", "mean_positional"):
            g = grads.sum(self._mean_dims).double()
            self.grad_sum = g if self.grad_sum is None else self.grad_sum + g
            if self.ablated is None:
                a = up.sum(self._mean_dims).double()
                self.value_sum = a if self.value_sum is None else self.value_sum + a
                self.count += up.shape[1] * (up.shape[2] if self.ablation == "mean" else 1)

    def scores(self, writes: HeadWrites, n_sequences: int | float = 1) -> Float[Tensor, " n_edges"]:
        """Per-edge scores (edge order), divided by ``n_sequences`` (the batch size when the backward
        pass was of the metric's sum; 1 when it was of a mean, such as a training loss)."""
        return self.graph.from_matrix(self.matrix(writes, n_sequences)).float()

    def matrix(self, writes: HeadWrites, n_sequences: int | float = 1) -> Float[Tensor, "n_up n_down"]:
        """:meth:`scores` as an ``[n_up, n_down]`` matrix (float64; pairs that are not edges included)."""
        ablated_grad = self.ablated_grad
        if self.ablation in ("mean", "mean_positional"):
            if self.grad_sum is None:
                raise ConfigError("no chunk was added")
            if self.ablated is not None:
                means = self.ablated.upstream(writes).double()  # [n_up, 1, 1|pos, d]
                means = means.flatten(1, 2) if self.ablation == "mean_positional" else means.flatten(1, 3)
            else:
                means = self.value_sum / self.count
            g = self.grad_sum.to(means.device)
            ablated_grad = torch.einsum("u...,d...->ud", means, g).cpu()
        return (ablated_grad - self.value_grad) / n_sequences


def _chunks(batch: TaskBatch, batch_size: int | None) -> list[TaskBatch]:
    size = batch_size or len(batch)
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def _node_gradients(
    model: CapModel, graph: Graph, batch: TaskBatch, metric: Metric, overrides: dict[str, Tensor] | None = None
) -> tuple[NodeValues, Tensor]:
    """One forward and one backward pass: the upstream values and the downstream input gradients of
    ``metric(...).sum()``, with ``overrides`` replacing upstream outputs (see :class:`NodeCapture`).
    The model's parameter gradients are left untouched."""
    capture = NodeCapture(model, graph, grads=True, overrides=overrides)
    with torch.enable_grad(), model.hooks(capture.hooks()):
        logits = model(batch.tokens)
        total = metric_values(metric, logits, batch, differentiable=True).sum()
    names = list(capture.shifts)
    grads = torch.autograd.grad(total, [capture.shifts[n] for n in names], allow_unused=True)
    grads = {
        n: (g if g is not None else torch.zeros_like(capture.shifts[n])) for n, g in zip(names, grads, strict=True)
    }
    return capture.values(), capture.gradients(grads)


def ig_paths(graph: Graph) -> list[tuple[str, list[int]]]:
    """The paths of ``eap-ig-nodes``, the upstream outputs it moves one at a time: ``(hook name,
    upstream node indices)`` for the input, each layer's heads (together: one hook holds them all)
    and each MLP, in the order of the first node of each.

    Example:
        >>> from capwrap.circuits import Graph
        >>> from capwrap.models import ModelSpec
        >>> [hook for hook, _ in ig_paths(Graph.from_spec(ModelSpec(n_layers=1, n_heads=2, d_model=8, d_vocab=5, n_ctx=4)))]
        ['blocks.0.hook_resid_pre', 'blocks.0.attn.hook_z', 'blocks.0.hook_mlp_out']
    """
    rows: dict[str, list[int]] = {}
    for i, node in enumerate(graph.upstream):
        rows.setdefault(upstream_hook(node), []).append(i)
    return list(rows.items())


def _integrated(
    model: CapModel, graph: Graph, chunk: TaskBatch, metric: Metric, start: Tensor, end: Tensor, hook: str, steps: int,
    bar: Any,
) -> Tensor:  # fmt: skip
    """The downstream input gradients averaged over ``steps`` midpoints of the straight path from
    ``start`` to ``end``, the output held at ``hook``."""
    grads: Tensor | None = None
    for k in range(steps):
        alpha = (k + 0.5) / steps
        _, g = _node_gradients(model, graph, chunk, metric, {hook: start + alpha * (end - start)})
        grads = g / steps if grads is None else grads + g / steps
        bar.update()
    assert grads is not None
    return grads


def attribute(
    model: CapModel,
    batch: TaskBatch,
    *,
    metric: Metric | str = DEFAULT_METRIC,
    method: Method = "eap",
    ablation: Ablation = "mean",
    corrupted: Tensor | None = None,
    reference: TaskBatch | None = None,
    ig_steps: int = 5,
    batch_size: int | None = None,
    progress: bool = False,
) -> EdgeScores:
    """Score every edge of ``model``'s graph on ``batch``.

    Args:
        model: the model (left unchanged; its parameter gradients too).
        batch: the sequences (answers and answer positions for the metric).
        metric: ``metric(logits, batch) -> [batch]``, or the name of one of capwrap's
            (:mod:`capwrap.circuits.metrics`; default the answer's log-probability,
            :data:`~capwrap.circuits.metrics.DEFAULT_METRIC`).
        method: ``eap``: one forward and one backward pass per chunk; ``eap-ig``: ``ig_steps`` of
            each, the gradient averaged on the path from the ablated input to the real one;
            ``eap-ig-nodes``: ``ig_steps`` per upstream path (``2 * n_layers + 1`` paths), each
            node's edges scored on its own path (see the module docstring).
        ablation: ``mean`` (over the batch and positions), ``mean_positional``, ``zero``, ``corrupted``.
        corrupted: for ``corrupted``: token ids shaped like ``batch.tokens``.
        reference: for the means: take them over these sequences instead of ``batch``.
        ig_steps: integration points of ``eap-ig`` and ``eap-ig-nodes`` (midpoints of ``ig_steps``
            equal intervals).
        batch_size: sequences per forward/backward pass (bounds memory); default all at once.
        progress: show a progress bar.

    Returns:
        :class:`EdgeScores`: per edge, the estimated change of the batch-mean metric on ablation.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}")
    metric = resolve_metric(metric)
    ig_steps = whole_number(ig_steps, "ig_steps (integration points)", minimum=1)
    check_ablation(ablation, batch, corrupted, reference)
    if len(batch) == 0:
        raise ConfigError("the batch is empty; sample at least one sequence")
    if batch_size is not None:
        batch_size = whole_number(batch_size, "batch_size (sequences per pass)", minimum=1)
    graph = Graph.from_spec(model.spec)
    check_readable(model, graph)
    batch = batch.to(model.device)
    was_training = model.module.training
    model.eval()
    try:
        known: NodeValues | None = None
        if ablation == "zero" or reference is not None or (method != "eap" and ablation != "corrupted"):
            known = ablated_values(model, graph, ablation, batch, reference=reference)
        # one path for eap and eap-ig (the input's), one per upstream output for eap-ig-nodes
        paths = ig_paths(graph) if method == "eap-ig-nodes" else [(UPSTREAM_HOOKS["input"], list(range(len(graph.upstream))))]
        accs = [ScoreAccumulator(graph, ablation, known) for _ in paths]
        chunks = _chunks(batch, batch_size)
        corrupt_chunks = [None] * len(chunks) if corrupted is None else _chunks(
            TaskBatch(corrupted.to(model.device), batch.answer_pos, batch.answers), batch_size
        )  # fmt: skip
        steps = 1 if method == "eap" else ig_steps
        bar = tqdm(total=len(chunks) * steps * len(paths), desc=method, disable=not progress, leave=False)
        writes = HeadWrites(model)
        for chunk, corrupt in zip(chunks, corrupt_chunks, strict=True):
            corrupt_values = None if corrupt is None else capture_values(model, corrupt.tokens, graph)
            if method == "eap":
                values, grads = _node_gradients(model, graph, chunk, metric)
                bar.update()
                accs[0].add(values, grads, writes, corrupt_values)
                continue
            values = capture_values(model, chunk.tokens, graph)
            ablated = corrupt_values or known
            assert ablated is not None
            for acc, (hook, _) in zip(accs, paths, strict=True):
                end = values.at(hook)
                grads = _integrated(model, graph, chunk, metric, ablated.at(hook).expand_as(end), end, hook, steps, bar)
                acc.add(values, grads, writes, corrupt_values)
        bar.close()
        matrix = torch.zeros(len(graph.upstream), len(graph.downstream), dtype=torch.float64)
        for acc, (_, rows) in zip(accs, paths, strict=True):
            matrix[rows] = acc.matrix(writes, n_sequences=len(batch))[rows]
        scores = graph.from_matrix(matrix).float()
    finally:
        model.train(was_training)
    info = {"metric": getattr(metric, "__name__", repr(metric)), "sequences": len(batch)}
    if method != "eap":
        info["ig_steps"] = ig_steps
    return EdgeScores(graph, scores, method, ablation, info)
