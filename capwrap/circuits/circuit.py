"""Circuits as data: a set of a model's edges with their scores — chosen, compared, saved, drawn.

A :class:`Circuit` is chosen from :class:`~capwrap.circuits.attribution.EdgeScores` in one of three ways
(:data:`SELECTIONS`):

* ``edges``: the ``n`` edges with the largest ``|score|``;
* ``nodes``: the ``n`` components (heads, key/value heads, MLPs) with the largest total ``|score|``
  over their edges; the circuit is every edge between kept components (``input`` and ``logits`` are
  always kept);
* ``greedy``: grown from the logits backwards, ``n`` times adding the highest ``|score|`` edge into a
  node the circuit already reaches, so every edge lies on a path to the logits.

Circuits of one model shape compare edge by edge (:meth:`Circuit.jaccard`,
:meth:`Circuit.weighted_overlap`), save to and load from JSON, and draw as a plotly figure.

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec
    >>> from capwrap.circuits import EdgeScores, Graph
    >>> graph = Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=8, n_heads=2))
    >>> scores = EdgeScores(graph, torch.linspace(0, 1, graph.n_edges), "eap", "mean")
    >>> circuit = Circuit.from_scores(scores, 3)
    >>> circuit.edge_names
    ['L0H1->L0.mlp', 'L0H1->logits', 'L0.mlp->logits']
    >>> circuit.jaccard(Circuit.from_scores(scores, 2))
    0.6666666666666666
"""

from __future__ import annotations

import heapq
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from capwrap.circuits.attribution import EdgeScores
from capwrap.circuits.graph import Graph
from capwrap.errors import CheckpointError, ConfigError, whole_number
from capwrap.files import write_json_atomic
from capwrap.models import ModelSpec

__all__ = ["Circuit", "SELECTIONS", "Selection"]

Selection = Literal["edges", "nodes", "greedy"]
SELECTIONS: tuple[str, ...] = ("edges", "nodes", "greedy")
_FORMAT = "capwrap.circuit"


@dataclass
class Circuit:
    """A subset of a model's edges, with the scores it was chosen by.

    Attributes:
        graph: the model's graph.
        mask: which edges belong to the circuit, ``[n_edges]`` (edge order).
        scores: the edges' scores ``[n_edges]`` (all edges, not only the circuit's).
        info: how it was found (method, ablation, selection, ``n`` ...).
    """

    graph: Graph
    mask: Bool[Tensor, " n_edges"]
    scores: Float[Tensor, " n_edges"]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.graph.n_edges
        if self.mask.shape != (n,) or self.scores.shape != (n,):
            raise ConfigError(
                f"a circuit of this graph needs a mask and scores of {n} edges, got {tuple(self.mask.shape)} "
                f"and {tuple(self.scores.shape)}"
            )
        self.mask = self.mask.detach().bool().cpu()
        self.scores = self.scores.detach().float().cpu()

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_scores(cls, scores: EdgeScores, n: int, select: Selection = "edges") -> Circuit:
        """The circuit of ``n`` edges (``edges``, ``greedy``) or ``n`` components (``nodes``) chosen by
        ``|score|`` (see the module docstring)."""
        if select not in SELECTIONS:
            raise ConfigError(f"unknown selection {select!r}; choose one of {list(SELECTIONS)}")
        n = whole_number(n, f"n (a number of {'components' if select == 'nodes' else 'edges'})")
        scored = int(scores.values.isfinite().sum())
        if select != "nodes" and scored < scores.graph.n_edges and n > scored:  # (a size past every edge: all of them)
            raise ConfigError(f"a circuit of {n} edges exceeds the {scored} edges the scores measure (the others are "
                              f"NaN, as exact_scores(edges=...) leaves them): choose at most {scored}")  # fmt: skip
        weight = torch.nan_to_num(scores.values.abs(), nan=-1.0)
        mask = {"edges": _top_edges, "nodes": _top_nodes, "greedy": _greedy}[select](scores.graph, weight, n)
        info = {"method": scores.method, "ablation": scores.ablation, "select": select, "n": n, **scores.info}
        return cls(scores.graph, mask, scores.values, info)

    @classmethod
    def from_edges(cls, graph: Graph, edges: list[str], scores: Tensor | None = None, **info: Any) -> Circuit:
        """The circuit of the named edges (``"L0H1->L1.mlp"``); scores default to NaN."""
        if isinstance(edges, str):
            raise ConfigError(f"edges must be a list of edge names, got the string {edges!r}: write [{edges!r}]")
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        mask[[graph.edge_index(e) for e in edges]] = True
        scores = torch.full((graph.n_edges,), math.nan) if scores is None else scores
        return cls(graph, mask, scores, dict(info))

    # ---- reading -----------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        """Edges in the circuit."""
        return int(self.mask.sum())

    @property
    def edge_names(self) -> list[str]:
        """The circuit's edges, in edge order."""
        names = self.graph.edge_names
        return [names[i] for i in self.mask.nonzero().flatten().tolist()]

    @property
    def components(self) -> list[str]:
        """Components (``L0H1``, ``L2.mlp``, ``input``, ``logits``) with at least one edge in the circuit, in model order."""
        up = {self.graph.upstream[i].component for i in self.graph.edge_up[self.mask].tolist()}
        down = {self.graph.downstream[i].component for i in self.graph.edge_down[self.mask].tolist()}
        return [c for c in self.graph.components if c in up | down]

    def table(self) -> pd.DataFrame:
        """The circuit's edges with their scores: ``edge, upstream, downstream, score, abs_score`` and the
        nodes' kinds, layers and components, largest ``|score|`` first."""
        frame = self.graph.edges_frame()
        frame.insert(3, "score", self.scores.numpy())
        frame.insert(4, "abs_score", self.scores.abs().numpy())
        frame = frame[self.mask.numpy()]
        return frame.sort_values("abs_score", ascending=False, kind="stable").reset_index(drop=True)

    # ---- comparing ---------------------------------------------------------------------------------
    def _check_same_graph(self, other: Circuit) -> None:
        if other.graph.spec != self.graph.spec:
            raise ConfigError("the circuits belong to models of different shapes; compare circuits of one architecture")

    def jaccard(self, other: Circuit) -> float:
        """Edge Jaccard index ``|A ∩ B| / |A ∪ B|`` (1 for two empty circuits)."""
        self._check_same_graph(other)
        union = int((self.mask | other.mask).sum())
        return int((self.mask & other.mask).sum()) / union if union else 1.0

    def node_jaccard(self, other: Circuit) -> float:
        """Jaccard index of the two circuits' components."""
        self._check_same_graph(other)
        a, b = set(self.components), set(other.components)
        return len(a & b) / len(a | b) if a | b else 1.0

    def weights(self) -> Float[Tensor, " n_edges"]:
        """Each edge's share of the circuit's total ``|score|`` (0 outside the circuit; uniform when the
        scores are unknown or all zero)."""
        w = torch.where(self.mask, torch.nan_to_num(self.scores.abs(), nan=0.0), torch.zeros(()))
        total = float(w.sum())
        if total <= 0:
            w = self.mask.float()
            total = max(1.0, float(w.sum()))
        return w / total

    def weighted_overlap(self, other: Circuit) -> float:
        """Weighted Jaccard index of the two circuits' score shares, ``Σ min(w_a, w_b) / Σ max(w_a, w_b)``:
        1 when the same edges carry the same shares, 0 when no edge is shared."""
        self._check_same_graph(other)
        a, b = self.weights(), other.weights()
        top = float(torch.maximum(a, b).sum())
        return float(torch.minimum(a, b).sum()) / top if top else 1.0

    # ---- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as JSON (atomically): the model spec, the kept edges, every edge's score, the info."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give the circuit's file path, e.g. {path / 'circuit.json'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": _FORMAT,
            "version": 1,
            "spec": self.graph.spec.to_dict(),
            "info": self.info,
            "edges": self.edge_names,
            "scores": [None if math.isnan(s) else s for s in self.scores.tolist()],
        }
        try:
            write_json_atomic(path, doc)
        except TypeError as exc:
            raise ConfigError(f"the circuit's info is not JSON-serializable: {exc}") from exc
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read a circuit written by :meth:`save`."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"no circuit file at {path}") from None
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); was it written by Circuit.save?") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise CheckpointError(
                f"{path} is not a capwrap circuit (no format {_FORMAT!r}); write one with Circuit.save"
            )
        missing = [k for k in ("spec", "edges", "scores") if k not in doc]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is not a whole circuit file; write it again "
                                  "with Circuit.save")  # fmt: skip
        graph = Graph.from_spec(ModelSpec.from_dict(doc["spec"]))
        scores = torch.tensor([math.nan if s is None else s for s in doc["scores"]], dtype=torch.float32)
        if len(scores) != graph.n_edges:
            raise CheckpointError(f"{path} holds {len(scores)} edge scores but its model has {graph.n_edges} edges")
        return cls.from_edges(graph, doc["edges"], scores, **doc.get("info", {}))

    # ---- figure ------------------------------------------------------------------------------------
    def figure(self, title: str | None = None) -> Any:
        """The circuit drawn layer by layer: components as nodes (heads of a layer side by side, the
        MLP above them), edges as lines whose width follows ``|score|`` (blue: ablating the edge would
        lower the metric, red: raise it); hover shows each edge and its score."""
        import plotly.graph_objects as go

        spec = self.graph.spec
        pos = _positions(self.graph)
        table = self.table()
        fig = go.Figure()
        top = float(table["abs_score"].max()) if len(table) and table["abs_score"].notna().any() else 1.0
        mids_x, mids_y, hover = [], [], []
        for row in table.itertuples():
            (x0, y0), (x1, y1) = pos[row.up_component], pos[row.down_component]
            share = row.abs_score / top if top and not math.isnan(row.abs_score) else 0.5
            color = "rgba(214,39,40,0.55)" if row.score > 0 else "rgba(31,119,180,0.55)"
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                     line=dict(width=0.5 + 5 * share, color=color)))  # fmt: skip
            mids_x.append((x0 + x1) / 2)
            mids_y.append((y0 + y1) / 2)
            hover.append(f"{row.edge}<br>score {row.score:.4g}")
        fig.add_trace(go.Scatter(x=mids_x, y=mids_y, mode="markers", marker=dict(size=6, opacity=0),
                                 hovertext=hover, hoverinfo="text", showlegend=False))  # fmt: skip
        shown = self.components
        fig.add_trace(
            go.Scatter(
                x=[pos[c][0] for c in shown], y=[pos[c][1] for c in shown], mode="markers+text", text=shown,
                textposition="middle right", marker=dict(size=11, color="black"), hoverinfo="text", showlegend=False,
            )
        )  # fmt: skip
        fig.update_layout(
            title=title or f"circuit: {self.n_edges} edges, {len(shown)} components",
            xaxis=dict(visible=False),
            yaxis=dict(title="layer", tickvals=list(range(-1, spec.n_layers + 1)),
                       ticktext=["input", *map(str, range(spec.n_layers)), "logits"]),
            height=max(360, 110 * (spec.n_layers + 2)), plot_bgcolor="white",
        )  # fmt: skip
        return fig


def _positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """Plot coordinates of every component: x across a layer's heads, y = layer (MLPs half a layer up)."""
    spec = graph.spec
    out: dict[str, tuple[float, float]] = {
        "input": (spec.n_heads / 2, -1.0),
        "logits": (spec.n_heads / 2, float(spec.n_layers)),
    }
    for node in graph.upstream + graph.downstream:
        if node.component in out:
            continue
        if node.kind in ("mlp", "mlp_in"):
            out[node.component] = (spec.n_heads / 2, node.layer + 0.5)
        elif node.component.startswith(f"L{node.layer}KV"):
            out[node.component] = (spec.n_heads + 1 + node.index, node.layer - 0.2)
        else:
            out[node.component] = (float(node.index), float(node.layer))
    return out


def _top_edges(graph: Graph, weight: Tensor, n: int) -> Tensor:
    mask = torch.zeros(graph.n_edges, dtype=torch.bool)
    order = torch.argsort(weight, descending=True, stable=True)
    mask[order[: min(n, graph.n_edges)]] = True
    return mask


def _top_nodes(graph: Graph, weight: Tensor, n: int) -> Tensor:
    per_component: dict[str, float] = dict.fromkeys(graph.components, 0.0)
    clean = weight.clamp_min(0).tolist()
    for w, u, d in zip(clean, graph.edge_up.tolist(), graph.edge_down.tolist(), strict=True):
        per_component[graph.upstream[u].component] += w
        per_component[graph.downstream[d].component] += w
    inner = [c for c in graph.components if c not in ("input", "logits")]
    ranked = sorted(inner, key=lambda c: (-per_component[c], inner.index(c)))
    kept = {"input", "logits", *ranked[:n]}
    up_ok = torch.tensor([graph.upstream[u].component in kept for u in range(len(graph.upstream))])
    down_ok = torch.tensor([graph.downstream[d].component in kept for d in range(len(graph.downstream))])
    return up_ok[graph.edge_up] & down_ok[graph.edge_down]


def _greedy(graph: Graph, weight: Tensor, n: int) -> Tensor:
    """Grow from the logits: repeatedly add the best edge into a downstream node the circuit reaches."""
    # The downstream nodes an upstream node opens up once it is in the circuit: its own inputs.
    opens: dict[int, list[int]] = {}
    for d, node in enumerate(graph.downstream):
        for u, up in enumerate(graph.upstream):
            feeds = up.component == node.component or (
                node.kind in ("k", "v") and up.kind == "head" and up.layer == node.layer
                and up.index // (graph.spec.n_heads // graph.spec.n_key_value_heads) == node.index
                and graph.spec.n_key_value_heads != graph.spec.n_heads
            )  # fmt: skip
            if feeds and up.kind != "input":
                opens.setdefault(u, []).append(d)
    into: dict[int, list[int]] = {}
    for e, d in enumerate(graph.edge_down.tolist()):
        into.setdefault(d, []).append(e)
    up_of = graph.edge_up.tolist()
    w = weight.tolist()
    mask = torch.zeros(graph.n_edges, dtype=torch.bool)
    heap: list[tuple[float, int]] = []
    reached: set[int] = set()
    added: set[int] = set()

    def reach(d: int) -> None:
        if d not in reached:
            reached.add(d)
            for e in into.get(d, []):
                heapq.heappush(heap, (-w[e], e))

    reach(len(graph.downstream) - 1)
    while heap and len(added) < n:
        _, e = heapq.heappop(heap)
        if e in added:
            continue
        added.add(e)
        mask[e] = True
        for d in opens.get(up_of[e], []):
            reach(d)
    return mask
