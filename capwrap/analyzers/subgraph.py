"""Subgraph: does fine-tuning sit on top of the capability's circuit, or rewire it?

Circuit-level reading of the wrapper question (Li et al., "Fine-Tuning is Subgraph Search"):

1. the **capability circuit**: the top edges of the capability task by edge attribution
   (:func:`capwrap.circuits.attribute`), in the base model and in the tuned model, and how much they
   overlap (edge Jaccard, and weighted by each edge's share of the circuit's attribution);
2. the **fine-tuning subgraph**: the edges fine-tuning trained, from the run's recorded subgraphs
   when the run was circuit-tuned (:class:`~capwrap.methods.CircuitTuning` records them; an edge counts
   when it was kept in at least half of the recorded steps), otherwise found from the downstream task:
   the top edges of the downstream task's attribution in the tuned model;
3. where fine-tuning acted, relative to the capability circuit: the share of the fine-tuning
   subgraph *inside* the circuit (its edges), *attached* to it (sharing a component) or *outside*; the
   share of the weight change on the circuit's nodes, against their share of the parameters (the
   *enrichment*: 1 when the change is spread evenly, above 1 when it concentrates in the circuit); the
   share of the tuned model's downstream attribution the circuit's edges carry.

Wrapper evidence: the capability circuit survives fine-tuning (its weighted overlap stays at or above
``survive``) and the change sits at its edges, not inside it (enrichment below ``enriched``). Change
evidence: the circuit itself is rewired (overlap at or below ``rewired``), or the change concentrates
inside it. The thresholds are first guesses on the demo setting, to be fitted with the other
analyzers' on a calibration suite.

Examples:
    >>> from capwrap.analyzers import ModelPair
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> cap = PCFGTask("count", "a", config=PCFGConfig(length=8, window=4))
    >>> down = PCFGTask("count", "b", config=PCFGConfig(length=8, window=4))
    >>> base = build_model(ModelSpec(d_vocab=cap.d_vocab, n_ctx=cap.seq_len, n_layers=2, d_model=16, n_heads=2))
    >>> evidence = Subgraph(n=16, method="eap")(ModelPair(base, base.clone()), cap, down)
    >>> evidence.direction, evidence.headline["capability_jaccard"]   # nothing changed
    ('neutral', 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import pandas as pd
import torch
from torch import Tensor

from capwrap.analyzers.base import Analyzer, Context, Evidence, Kind, ModelPair
from capwrap.circuits import Circuit, EdgeScores, Graph, attribute, exact_scores, negative_loss
from capwrap.circuits.attribution import METHODS, Method
from capwrap.circuits.nodes import SELF_ABLATIONS
from capwrap.errors import ConfigError, whole_number
from capwrap.models import ModelSpec, ParamSlice
from capwrap.models.layouts import canonical_names
from capwrap.recording import RunStore

__all__ = ["Subgraph", "RECORDED_EDGES"]

#: The RunStore array in which :class:`~capwrap.methods.CircuitTuning` records each step's subgraph.
RECORDED_EDGES = "circuit_tuning.edges"


@dataclass
class Subgraph(Analyzer):
    """The capability's circuit in base and tuned, and where fine-tuning's subgraph lies against it.

    Args:
        top_share: size of every circuit, as a share of the model's edges (at least 5 edges).
        method: how edges are scored: ``auto`` (default): ``exact`` on compiled Tracr models
            (:attr:`ModelSpec.compiled <capwrap.models.ModelSpec.compiled>`), whose saturated softmaxes
            and ReLUs hide their essential edges from gradients (on the shipped Counter, EAP-IG sees one
            of its three), ``eap-ig`` on every other model; edge attribution, ``eap-ig``, ``eap-ig-nodes``
            or ``eap`` (:func:`~capwrap.circuits.attribute`); or ``exact``: each edge ablated in its own
            pass (:func:`~capwrap.circuits.exact_scores`), for small models (one forward pass per edge
            and sequence chunk: 479 edges of the demo model take about a minute per 64 sequences on a
            CPU). The evidence's ``details["method"]`` says which one scored.
        ig_steps: integration steps of ``eap-ig`` and ``eap-ig-nodes``.
        ablation: ``mean_positional`` (default: each position's mean over the batch, which keeps what a
            fixed-format sequence says by position), ``mean`` or ``zero``.
        n: sequences of each task.
        seed: seed of the sequences; ``None`` (default): derived from the diagnosis's seed
            (:meth:`Context.seed_for <capwrap.analyzers.Context.seed_for>`), as every analyzer's random
            choices are. (Until 2026-12-07 it was 0 whatever the diagnosis's seed; ``seed=0`` gives the
            sequences the published figures were measured on.)
        survive: weighted overlap of the base and tuned capability circuits at or above which the
            circuit counts as having survived fine-tuning.
        rewired: weighted overlap at or below which the circuit counts as rewired.
        enriched: weight-change enrichment of the circuit's nodes (their share of ‖ΔW‖² over their share
            of the parameters) at or above which the change counts as sitting inside the circuit.
    """

    top_share: float = 0.05
    method: Method | Literal["exact", "auto"] = "auto"
    ig_steps: int = 5
    ablation: Literal["mean", "mean_positional", "zero"] = "mean_positional"
    n: int = 256
    seed: int | None = None
    survive: float = 0.5
    rewired: float = 0.25
    enriched: float = 1.5
    name: str = "subgraph"
    kind: ClassVar[Kind] = "structural"

    def __post_init__(self) -> None:
        if not 0 < self.top_share <= 1:
            raise ConfigError(f"Subgraph.top_share must be in (0, 1], got {self.top_share}")
        if self.ablation not in SELF_ABLATIONS:
            raise ConfigError(f"Subgraph.ablation must be one of {list(SELF_ABLATIONS)}, got {self.ablation!r} "
                              "(a corrupted ablation needs corrupted sequences the tasks do not give)")  # fmt: skip
        at_least = 2 if self.ablation == "mean_positional" else 1  # one sequence is its own positional mean
        self.n = whole_number(self.n, "Subgraph.n (sequences of each task)", minimum=at_least)
        self.ig_steps = whole_number(self.ig_steps, "Subgraph.ig_steps", minimum=1)
        if self.method not in (*METHODS, "exact", "auto"):
            raise ConfigError(f"Subgraph.method must be one of {['auto', *METHODS, 'exact']}, got {self.method!r}")
        if not 0 <= self.rewired <= self.survive <= 1:
            raise ConfigError(f"Subgraph needs 0 <= rewired <= survive <= 1, got {self.rewired} and {self.survive}")

    # ---- the analysis --------------------------------------------------------------------------------
    def scoring(self, spec: ModelSpec) -> Method | Literal["exact"]:
        """The method that scores edges of models of ``spec``: ``method``, with ``auto`` resolved."""
        if self.method == "auto":
            return "exact" if spec.compiled else "eap-ig"
        return self.method

    def _scores(self, model, batch) -> EdgeScores:
        method = self.scoring(model.spec)
        if method == "exact":
            return exact_scores(model, batch, metric=negative_loss, ablation=self.ablation)
        return attribute(model, batch, metric=negative_loss, method=method, ablation=self.ablation,
                         ig_steps=self.ig_steps, batch_size=64)  # fmt: skip

    def analyze(self, context: Context) -> Evidence:
        pair, capability, downstream, store = context.pair, context.capability, context.downstream, context.store
        graph = Graph.from_spec(pair.spec)
        size = max(5, round(self.top_share * graph.n_edges))
        seed = self.seed if self.seed is not None else context.seed_for(self.name, "sequences")
        cap_batch = capability.sample(self.n, seed=seed)
        down_batch = downstream.sample(self.n, seed=seed + 1)
        cap_base, cap_tuned = self._scores(pair.base, cap_batch), self._scores(pair.tuned, cap_batch)
        base_circuit = Circuit.from_scores(cap_base, size)
        tuned_circuit = Circuit.from_scores(cap_tuned, size)
        down_tuned = self._scores(pair.tuned, down_batch)

        recorded = _recorded_subgraphs(store, graph)
        if recorded is not None:
            frequency = recorded.mean(0)
            finetune = frequency >= 0.5
            finetune_weight, source = frequency, "recorded circuit-tuning subgraphs"
        else:
            finetune = Circuit.from_scores(down_tuned, size).mask
            finetune_weight, source = down_tuned.values.abs(), "downstream task's circuit in the tuned model"
        where = _placement(graph, base_circuit, finetune, finetune_weight)
        change = _weight_change_shares(pair, graph, base_circuit)
        down_abs = down_tuned.values.abs()
        down_inside = (
            float(down_abs[base_circuit.mask].sum() / down_abs.sum()) if float(down_abs.sum()) > 0 else math.nan
        )

        headline = {
            "circuit_edges": float(size),
            "capability_jaccard": base_circuit.jaccard(tuned_circuit),
            "capability_overlap": base_circuit.weighted_overlap(tuned_circuit),
            "capability_node_jaccard": base_circuit.node_jaccard(tuned_circuit),
            "finetune_edges": float(finetune.sum()),
            "finetune_inside": where["inside"],
            "finetune_attached": where["attached"],
            "finetune_outside": where["outside"],
            "weight_change_inside": change["inside"],
            "param_share_inside": change["params_inside"],
            "weight_change_enrichment": change["enrichment"],
            "weight_change_off_graph": change["off_graph"],
            "downstream_attribution_inside": down_inside,
        }
        table = _edge_table(
            graph, cap_base, cap_tuned, down_tuned, base_circuit, tuned_circuit, finetune, finetune_weight
        )
        direction, strength, reasons = self._judge(headline, change["total"], source)
        details = {"finetune_source": source, "method": self.scoring(pair.spec),
                   "per_step": _per_step_overlap(recorded, base_circuit)}
        summary = (
            f"capability circuit overlap (weighted) {headline['capability_overlap']:.2f} between base and tuned; "
            f"weight-change enrichment on it {headline['weight_change_enrichment']:.2f}"
        )
        return Evidence(self.name, headline, table, direction, strength, reasons, details, plot=_plot, summary=summary)

    def _judge(self, h: dict[str, float], weight_total: float, source: str) -> tuple[str, float, list[str]]:
        overlap, enrichment = h["capability_overlap"], h["weight_change_enrichment"]
        circuit = (
            f"the capability circuit ({int(h['circuit_edges'])} edges) keeps {overlap:.0%} of its attribution-weighted "
            f"edges after fine-tuning (edge Jaccard {h['capability_jaccard']:.2f})"
        )
        change = (
            f"{h['weight_change_inside']:.0%} of the weight change lies on the circuit's nodes, which hold "
            f"{h['param_share_inside']:.0%} of the parameters (enrichment {enrichment:.2f})"
        )
        placed = (
            f"of the fine-tuning subgraph ({int(h['finetune_edges'])} edges, the {source}) {h['finetune_inside']:.0%} "
            f"lies inside the circuit, {h['finetune_attached']:.0%} attached to its components, "
            f"{h['finetune_outside']:.0%} outside"
        )
        if weight_total == 0:
            return "neutral", 0.0, ["the tuned model's weights equal the base's: fine-tuning changed nothing"]
        if overlap <= self.rewired:
            return (
                "change",
                0.3 + 0.4 * (1 - overlap / max(self.rewired, 1e-9)),
                [f"{circuit}: it was rewired", change, placed],
            )
        inside = not math.isnan(enrichment) and enrichment >= self.enriched
        if overlap >= self.survive and not inside:
            spread = 1.0 if math.isnan(enrichment) else max(0.0, 1 - enrichment / self.enriched)
            return (
                "wrapper",
                0.2 + 0.4 * overlap * spread,
                [f"{circuit}: it survived", f"{change}: the change sits at its edges", placed],
            )
        if overlap >= self.survive:
            return "change", 0.2, [f"{circuit}, but the change concentrates inside it", change, placed]
        return "neutral", 0.1, [f"{circuit}: between surviving and rewired", change, placed]


def _recorded_subgraphs(store: RunStore | None, graph: Graph) -> Tensor | None:
    """The subgraphs a circuit-tuning run recorded, ``[steps, n_edges]`` (None if it recorded none)."""
    if store is None or RECORDED_EDGES not in store.array_names or not store.array_steps(RECORDED_EDGES):
        return None
    kept = torch.as_tensor(store.array(RECORDED_EDGES)).float()
    if kept.shape[1] != graph.n_edges:
        raise ConfigError(f"the store's recorded subgraphs have {kept.shape[1]} edges, the model {graph.n_edges}")
    return kept


def _placement(graph: Graph, circuit: Circuit, finetune: Tensor, weight: Tensor) -> dict[str, float]:
    """Weighted shares of the fine-tuning subgraph inside the circuit, attached to its components, outside."""
    components = set(circuit.components) - {"input", "logits"}
    up = torch.tensor([graph.upstream[u].component in components for u in graph.edge_up.tolist()])
    down = torch.tensor([graph.downstream[d].component in components for d in graph.edge_down.tolist()])
    w = torch.where(finetune, weight.clamp_min(0), torch.zeros(()))
    total = float(w.sum())
    if total == 0:
        return {"inside": math.nan, "attached": math.nan, "outside": math.nan}
    inside = circuit.mask
    attached = ~inside & (up | down)
    return {
        "inside": float(w[inside].sum()) / total,
        "attached": float(w[attached].sum()) / total,
        "outside": float(w[~inside & ~attached].sum()) / total,
    }


def _weight_change_shares(pair: ModelPair, graph: Graph, circuit: Circuit) -> dict[str, float]:
    """Where the weight change ‖ΔW‖² lies: the share of the nodes' change on the circuit's nodes, those
    nodes' share of the nodes' parameters, their ratio (enrichment), the share of all change on weights
    of no node (embeddings, norms, unembedding, attention output bias), and the total."""
    kept_up, kept_down = set(graph.edge_up[circuit.mask].tolist()), set(graph.edge_down[circuit.mask].tolist())
    pieces: dict[str, list[tuple[ParamSlice, bool]]] = {}  # weight -> (a node's piece of it, whether the node is kept)
    for nodes, chosen in ((graph.upstream, kept_up), (graph.downstream, kept_down)):
        for i, node in enumerate(nodes):
            for piece in graph.node_params(node):
                pieces.setdefault(piece.param, []).append((piece, i in chosen))
    total = 0.0
    change = {"nodes": 0.0, "circuit": 0.0}
    params = {"nodes": 0, "circuit": 0}
    for name in canonical_names(pair.spec):  # one weight of each model at a time
        base = pair.weight(pair.base, name).detach().float().cpu()
        delta = {name: pair.weight(pair.tuned, name).detach().float().cpu() - base}
        total += float(delta[name].square().sum())
        for piece, kept in pieces.get(name, []):
            part = piece.of(delta)
            sq, count = float(part.square().sum()), part.numel()
            change["nodes"] += sq
            params["nodes"] += count
            if kept:
                change["circuit"] += sq
                params["circuit"] += count
    inside = change["circuit"] / change["nodes"] if change["nodes"] > 0 else math.nan
    params_inside = params["circuit"] / params["nodes"] if params["nodes"] else math.nan
    return {
        "inside": inside,
        "params_inside": params_inside,
        "enrichment": inside / params_inside if params_inside and not math.isnan(inside) else math.nan,
        "off_graph": max(0.0, (total - change["nodes"]) / total) if total > 0 else math.nan,
        "total": total,
    }


def _edge_table(graph, cap_base, cap_tuned, down_tuned, base_circuit, tuned_circuit, finetune, weight) -> pd.DataFrame:
    frame = graph.edges_frame()[["edge", "upstream", "downstream", "up_component", "down_component"]]
    frame = frame.assign(
        capability_base=cap_base.values.numpy(),
        capability_tuned=cap_tuned.values.numpy(),
        downstream_tuned=down_tuned.values.numpy(),
        in_base_circuit=base_circuit.mask.numpy(),
        in_tuned_circuit=tuned_circuit.mask.numpy(),
        in_finetune=finetune.numpy(),
        finetune_weight=weight.numpy(),
    )
    keep = frame["in_base_circuit"] | frame["in_tuned_circuit"] | frame["in_finetune"]
    order = frame["capability_base"].abs() + frame["capability_tuned"].abs()
    return (
        frame[keep].assign(_o=order[keep]).sort_values("_o", ascending=False).drop(columns="_o").reset_index(drop=True)
    )


def _per_step_overlap(recorded: Tensor | None, circuit: Circuit) -> list[dict[str, float]]:
    """For each recorded subgraph: its edge Jaccard with the base capability circuit and its share inside it."""
    if recorded is None:
        return []
    out = []
    base = circuit.mask
    for i, row in enumerate(recorded.bool()):
        union = int((row | base).sum())
        out.append({
            "record": i,
            "jaccard": int((row & base).sum()) / union if union else 1.0,
            "inside": int((row & base).sum()) / max(1, int(row.sum())),
        })  # fmt: skip
    return out


def _plot(evidence: Evidence):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    h = evidence.headline
    per_step = evidence.details.get("per_step", [])
    fig = make_subplots(rows=1, cols=2 if per_step else 1, column_widths=[0.55, 0.45] if per_step else None,
                        subplot_titles=("where fine-tuning acted", "recorded subgraphs vs the capability circuit")[: 2 if per_step else 1])  # fmt: skip
    names = ["capability_overlap", "capability_jaccard", "finetune_inside", "finetune_attached", "finetune_outside",
             "weight_change_inside", "param_share_inside", "downstream_attribution_inside"]  # fmt: skip
    fig.add_trace(go.Bar(x=names, y=[h[n] for n in names], showlegend=False), row=1, col=1)
    if per_step:
        steps = [p["record"] for p in per_step]
        fig.add_trace(go.Scatter(x=steps, y=[p["jaccard"] for p in per_step], name="edge Jaccard"), row=1, col=2)
        fig.add_trace(go.Scatter(x=steps, y=[p["inside"] for p in per_step], name="share inside"), row=1, col=2)
    fig.update_yaxes(tickformat=".0%", range=[0, 1])
    fig.update_layout(height=380, title=f"subgraph: {evidence.direction} ({evidence.strength:.2f})")
    return fig
