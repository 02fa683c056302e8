"""Weight-diff localization: where did fine-tuning change the weights, and do those changes carry
the new behaviour?

Compares the raw (unprocessed: no layer-norm folding) canonical weights of the pair:

* per-component change, absolute ``‖ΔW‖`` and relative ``‖ΔW‖ / ‖W_base‖``, for heads, neurons,
  attention and MLP layers, embeddings;
* concentration: the share of the units' (heads', neurons') squared change held by the most-changed
  units (per weight) that make up 1% / 10% of their weights (an even spread gives 1% / 10%; ranked by
  their whole change, in which a head outweighs a neuron a hundredfold, it gave 34% / 41%; a change
  confined to units holding 16% of the weights reads about 60% at 10%);
* the effective rank (exp of the entropy of the normalized singular values) of each weight matrix's
  change: a wrapper tends to be low-rank;
* grafting: the base model with only the most-changed units making up k% of the units' weights
  copied from the tuned model, and the share of the downstream accuracy gain they carry;
* with a :class:`~capwrap.recording.RunStore`: when each unit moved (the step at which it reached
  half its final change).

Examples:
    >>> import torch
    >>> from capwrap.analyzers import ModelPair
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> base = build_model(spec, seed=0)
    >>> tuned = base.clone()
    >>> with torch.no_grad():
    ...     tuned.weights()["blocks.0.attn.W_V"][1] += 0.5  # change one head only
    >>> ev = WeightDiff(graft_fractions=(0.1,))(ModelPair(base, tuned), task, task, eval_size=32)
    >>> ev.table.iloc[0]["component"], round(ev.headline["top1pct_share"], 2)
    ('L0H1', 1.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from capwrap.analyzers.base import Analyzer, Context, Evidence, Kind, ModelPair
from capwrap.errors import ConfigError, as_list
from capwrap.models import CapModel, ComponentMap, ModelSpec
from capwrap.models.layouts import canonical_names
from capwrap.recording import RunStore
from capwrap.tasks.base import accuracy

__all__ = [
    "Changes",
    "WeightDiff",
    "accumulate_changes",
    "change_ranks",
    "change_summary",
    "copy_components",
    "effective_rank",
    "graft",
    "layer_groups",
    "weight_change_table",
]

_KINDS = ("head", "kv_head", "neuron", "attn", "mlp", "embed", "pos_embed", "unembed")
_UNIT_KINDS = ("head", "kv_head", "neuron")


def effective_rank(matrix: Tensor, rank_bound: int | None = None) -> float:
    """exp(entropy of the normalized singular values): 1 for a rank-one change, up to min(shape).

    ``rank_bound``: the matrix's rank is known to be at most this (a LoRA change's ``r``); its
    singular values are then found in ``O(rows · cols · r)`` instead of a full SVD."""
    matrix = matrix.detach().float()
    if rank_bound is not None and rank_bound + _OVERSAMPLE < min(matrix.shape):
        s = _low_rank_svdvals(matrix, rank_bound + _OVERSAMPLE)
    else:
        s = torch.linalg.svdvals(matrix)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


_OVERSAMPLE = 8


def _low_rank_svdvals(matrix: Tensor, k: int) -> Tensor:
    """The singular values of a matrix of rank at most ``k``: project it onto its column space,
    found from ``k`` random combinations of its columns (fixed seed), then one small SVD."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(matrix.shape[1], k, generator=gen, dtype=matrix.dtype).to(matrix.device)
    basis, _ = torch.linalg.qr(matrix @ probe)
    return torch.linalg.svdvals(basis.T @ matrix)


def weight_change_table(base: CapModel, tuned: CapModel, kinds: Sequence[str] = _KINDS) -> pd.DataFrame:
    """One row per component of ``kinds``: absolute and relative change, sorted by change."""
    return accumulate_changes(base.spec, _layer_changes(ModelPair(base, tuned)), kinds, with_ranks=False).table


#: One group of canonical weights (the embeddings, or one block): the base's, and their change.
GroupChange = tuple[Mapping[str, Tensor], Mapping[str, Tensor]]


@dataclass
class Changes:
    """What :func:`accumulate_changes` sums over the groups of a model's weights.

    Attributes:
        table: per component (``component, kind, layer, index, change, relative_change``), sorted by change.
        ranks: effective rank of each changed matrix (:func:`change_ranks`).
        total_sq: the summed squared change of every canonical weight (a tied unembedding, the
            embedding's transpose, counted once).
        base_sq: the summed squared base weight of every canonical weight (the same).
    """

    table: pd.DataFrame
    ranks: pd.DataFrame
    total_sq: float
    base_sq: float


def accumulate_changes(
    spec: ModelSpec,
    groups: Iterable[GroupChange],
    kinds: Sequence[str] = _KINDS,
    with_ranks: bool = True,
    rank_bound: int | None = None,
) -> Changes:
    """Every component's change and norm, summed over groups of canonical weights that are seen one
    at a time (so that only one group of the two models need be in memory): the models' own weights
    (:class:`WeightDiff`), or checkpoint files read a layer at a time
    (:func:`~capwrap.analyzers.streaming.stream_weight_diff`). A weight missing from a group's
    change did not change. ``rank_bound``: see :func:`change_ranks`."""
    cmap = ComponentMap.from_spec(spec)
    present = [k for k in kinds if k in cmap.counts()]
    # A tied unembedding is the embedding's transpose: one tensor, counted once in the totals.
    tied = {"unembed.W_U"} if spec.tie_embeddings else set()
    change_sq = {k: torch.zeros(len(cmap.select(k)), dtype=torch.float64) for k in present}
    norm_sq = {k: torch.zeros(len(cmap.select(k)), dtype=torch.float64) for k in present}
    sizes = {k: torch.zeros(len(cmap.select(k)), dtype=torch.float64) for k in present if k in _UNIT_KINDS}
    rank_frames, total_sq, base_sq = [], 0.0, 0.0
    for wb, delta in groups:
        # the units' sizes, as squared norms of ones (a block's weights: a layer's memory, as the change)
        ones = {n: torch.ones_like(w, dtype=torch.float32) for n, w in wb.items() if n.startswith("blocks.")} if sizes else {}
        for kind in present:
            change_sq[kind] += cmap.sq_norms(delta, kind, partial=True)
            norm_sq[kind] += cmap.sq_norms(wb, kind, partial=True)
            if kind in sizes:
                sizes[kind] += cmap.sq_norms(ones, kind, partial=True)
        total_sq += sum(float(d.float().square().sum()) for n, d in delta.items() if n not in tied)
        base_sq += sum(float(w.detach().float().square().sum()) for n, w in wb.items() if n not in tied)
        once = {n: d for n, d in delta.items() if n not in tied}
        if with_ranks and len(frame := change_ranks(once, rank_bound=rank_bound)):
            rank_frames.append(frame)  # (empty frames would make the columns' dtype object)
    rows = []
    for kind in present:
        counts = sizes[kind].tolist() if kind in sizes else [math.nan] * len(cmap.select(kind))  # (units only)
        per = zip(cmap.select(kind), change_sq[kind].tolist(), norm_sq[kind].tolist(), counts, strict=True)
        for comp, c2, n2, size in per:
            c, n = math.sqrt(c2), math.sqrt(n2)
            rows.append((comp.name, kind, comp.layer, comp.index, c, c / n if n > 0 else math.nan, size))
    columns = ["component", "kind", "layer", "index", "change", "relative_change", "weights"]
    table = pd.DataFrame(rows, columns=columns)
    ranks = pd.concat(rank_frames, ignore_index=True) if rank_frames else change_ranks({})
    return Changes(table.sort_values("change", ascending=False, ignore_index=True), ranks, total_sq, base_sq)


#: A tensor of one layer, by name: checkpoint names (``transformer.h.3.``, ``model.layers.3.``) or
#: canonical ones (``blocks.3.``).
_LAYER = re.compile(r"(?:^|\.)(?:h|layers|blocks)\.(\d+)\.")


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Tensor names grouped by layer (in order), the rest (embeddings, final norm, unembedding)
    first: the groups a weight diff reads one at a time."""
    by_layer: dict[int, list[str]] = {}
    rest = []
    for name in names:
        m = _LAYER.search(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
        else:
            rest.append(name)
    return [rest] + [by_layer[k] for k in sorted(by_layer)]


def _layer_changes(pair: ModelPair) -> Iterator[GroupChange]:
    """The pair's weights and their change, a layer (:func:`layer_groups`) at a time, read with
    :meth:`ModelPair.weight` (so that with a residency only one model need be in memory)."""
    for names in layer_groups(canonical_names(pair.spec)):
        wb = {n: pair.weight(pair.base, n).detach() for n in names}
        yield wb, {n: pair.weight(pair.tuned, n).detach().to(wb[n].device).float() - wb[n].float() for n in names}


def change_summary(table: pd.DataFrame, ranks: pd.DataFrame, total_sq: float) -> dict[str, float]:
    """Headline numbers of a change table (:func:`weight_change_table`) and its matrices' ranks
    (:func:`change_ranks`): the total change (from ``total_sq``, the summed squared change of every
    weight), the share of the units' (heads', neurons') squared change held by the most-changed units
    making up 1% and 10% of their weights (:func:`most_changed`), and the median effective rank of the matrices' change relative to the largest possible."""
    units = table[table["kind"].isin(_UNIT_KINDS)]
    total = float((units["change"] ** 2).sum())

    def share(fraction: float) -> float:
        return float((most_changed(units, fraction)["change"] ** 2).sum() / total) if total > 0 else math.nan

    ratio = (ranks["effective_rank"] / ranks["max_rank"]).median() if len(ranks) else math.nan
    return {
        "total_change": math.sqrt(total_sq),
        "top1pct_share": share(0.01),
        "top10pct_share": share(0.10),
        "median_effective_rank_ratio": float(ratio),
    }


def most_changed(units: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """The most-changed units of a change table that hold ``fraction`` of the units' weights (at least
    one unit), most changed per weight first (root mean square change, ``change / sqrt(weights)``): a
    head holds many times a neuron's weights, so units ranked by their whole change put every head
    first, and an even spread of the change gave the "top 10% of units" 41% of it; here it gives 10%."""
    order = units.assign(_rms=units["change"] / np.sqrt(units["weights"])).sort_values("_rms", ascending=False)
    before = order["weights"].cumsum().shift(fill_value=0)  # the weights of the units ranked above each
    return order[(before < fraction * order["weights"].sum()) | (before == 0)].drop(columns="_rms")


def graft(base: CapModel, tuned: CapModel, components: Sequence[str], into: CapModel | None = None) -> CapModel:
    """``base`` with the named components' weights taken from ``tuned``.

    Args:
        base: the model to start from.
        tuned: the model whose components are copied.
        components: component names (``L0H1``, ``L2N17``, ``L1.mlp`` ...).
        into: a model of the same shape to overwrite (reused across grafts to avoid rebuilding
            one); default: a fresh copy of ``base``.
    """
    out = into.copy_weights_from(base) if into is not None else base.clone()
    copy_components(out, tuned.weights().__getitem__, components)
    return out


@torch.no_grad()
def copy_components(into: CapModel, source: Callable[[str], Tensor], components: Sequence[str]) -> None:
    """Overwrite the named components of ``into`` with ``source``'s (``source(name)``: a canonical
    weight of the other model), reading each weight of the other model once."""
    slices: dict[str, list] = {}
    for name in components:
        for sl in into.components[name].slices:
            slices.setdefault(sl.param, []).append(sl)
    w_out = into.weights()
    for param, parts in slices.items():
        src = {param: source(param)}
        for sl in parts:
            sl.of(w_out).copy_(sl.of(src))


def change_ranks(delta: Mapping[str, Tensor], rank_bound: int | None = None) -> pd.DataFrame:
    """Effective rank of each weight matrix's change (``weight, effective_rank, max_rank``); heads'
    Q/K/V and O matrices are read as the whole layer's ``[d_model, heads*d_head]`` map. Unchanged
    matrices and bias tables are left out. ``rank_bound``: see :func:`effective_rank`."""
    rows = []
    for name, d in delta.items():
        if d.ndim < 2 or ".b_" in name:  # matrices only, not per-head bias tables
            continue
        if name.endswith(("W_Q", "W_K", "W_V")):  # [head, d_model, d_head] -> [d_model, head*d_head]
            d = d.permute(1, 0, 2).flatten(1)
        elif name.endswith("W_O"):  # [head, d_head, d_model] -> [head*d_head, d_model]
            d = d.flatten(0, 1)
        if float(d.abs().max()) == 0:
            continue
        rows.append((name, effective_rank(d, rank_bound), min(d.shape)))
    return pd.DataFrame(rows, columns=["weight", "effective_rank", "max_rank"])


@dataclass
class WeightDiff(Analyzer):
    """Weight-diff localization and grafting.

    Statistic ``relative_weight_change``: log10 of the size of the whole change relative to the base
    weights, ``log10(‖W_tuned − W_base‖ / ‖W_base‖)`` over every canonical weight (a tied embedding
    once). A wrapper is a small change on top of the base; re-initialized or retrained components
    move by about their own size (log10 near 0). It is computed from the weights alone (its interval
    is the point). The table, concentration and grafting figures say *where* the change sits.

    Args:
        graft_fractions: shares of units (heads and neurons) to graft, most-changed first.
    """

    graft_fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25)
    name: str = "weight_diff"
    kind: ClassVar[Kind] = "structural"
    statistic: ClassVar[str | None] = "relative_weight_change"

    def __post_init__(self) -> None:
        self.graft_fractions = tuple(as_list(self.graft_fractions, "graft_fractions is a list of shares in (0, 1], e.g. (0.01, 0.1)"))
        if not self.graft_fractions or any(
            isinstance(f, bool) or not isinstance(f, Real) or not 0 < f <= 1 for f in self.graft_fractions
        ):
            raise ConfigError(
                f"graft_fractions must be a non-empty list of shares in (0, 1], got {self.graft_fractions}"
            )

    def analyze(self, context: Context) -> Evidence:
        pair, store = context.pair, context.store
        changes = accumulate_changes(pair.spec, _layer_changes(pair))
        table, ranks, total_sq, base_sq = changes.table, changes.ranks, changes.total_sq, changes.base_sq
        units = table[table["kind"].isin(_UNIT_KINDS)].reset_index(drop=True)
        grafts = self._grafts(context, units)
        if store is not None:
            table = table.merge(_movement_times(store), on="component", how="left")
        headline = change_summary(table, ranks, total_sq)
        relative = math.sqrt(total_sq / base_sq) if base_sq > 0 else math.nan
        headline["relative_change"] = relative
        value = math.log10(relative) if relative > 0 else -12.0
        for row in grafts.itertuples():
            key = (
                f"top{row.fraction:g}"
                if not math.isnan(row.fraction)
                else row.graft.replace(" + ", "+").replace(" ", "_")
            )
            headline[f"graft_{key}_carried"] = row.carried
        if store is not None and "t50_step" in table:
            top = most_changed(table[table["kind"].isin(_UNIT_KINDS)], 0.1)
            headline["t50_top10pct_units"] = float(top["t50_step"].median())
            headline["t50_all_units"] = float(table.loc[table["kind"].isin(_UNIT_KINDS), "t50_step"].median())
        carried = grafts.dropna(subset=["fraction"]).set_index("fraction")["carried"]
        small = carried[carried.index <= 0.1].dropna()
        graft_text = (
            f"; grafting the most-changed units holding {float(small.idxmax()):.0%} of the units' weights into the base carries "
            f"{float(small.max()):.0%} of the downstream gain"
            if len(small)
            else ""
        )
        if total_sq == 0:
            summary = "the weights did not change: the tuned model's are the base's"
        else:
            summary = (f"the weights moved by {relative:.1%} of their norm; the most-changed units holding 10% of "
                       f"the units' weights hold {headline['top10pct_share']:.0%} of their squared change (an even "
                       f"spread: 10%){graft_text}")  # fmt: skip
        if store is not None and (first := int(store.meta.get("first_step", 0))) > 0:
            summary += (f"; the run store starts at step {first} (a run resumed from a checkpoint into a new store): "
                        f"its movement times count the change from step {first}'s weights, not from the base's")  # fmt: skip
        return Evidence(
            analyzer=self.name, headline=headline, table=table,
            details={"grafts": grafts.to_dict(orient="records"), "ranks": ranks.to_dict(orient="records")},
            plot=_plot, value=value, replicates=np.full(context.n_boot, value), intervals={"value": (value, value)},
            summary=summary,
        )  # fmt: skip

    def _grafts(self, context: Context, units: pd.DataFrame) -> pd.DataFrame:
        pair = context.pair
        down, cap = context.eval.batches["downstream"], context.eval.batches["capability"]
        base_down = context.eval.accuracy("base", "downstream")
        gain = context.eval.accuracy("tuned", "downstream") - base_down
        cmap = pair.base.components
        layers = {kind: [c.name for c in cmap.select(kind)] for kind in ("attn", "mlp")}
        present = set(cmap.counts())
        plans = [
            (f"top {f:g} of units", f, most_changed(units, f)["component"].tolist())
            for f in self.graft_fractions
        ]
        plans += [
            ("attention layers", math.nan, layers["attn"]),
            ("MLP layers", math.nan, layers["mlp"]),
            ("attention + MLP layers", math.nan, layers["attn"] + layers["mlp"]),
            ("embeddings", math.nan, [k for k in ("embed", "pos_embed", "unembed") if k in present]),
        ]  # fmt: skip
        rows = []
        with pair.scratch(pair.base) as work:
            for what, fraction, names in plans:
                pair.revert(work, pair.base)
                copy_components(work, lambda name: pair.weight(pair.tuned, name), names)
                acc_down = accuracy(work, down)
                carried = (acc_down - base_down) / gain if abs(gain) > 0.02 else math.nan
                rows.append((what, fraction, len(names), acc_down, accuracy(work, cap), carried))
        return pd.DataFrame(
            rows, columns=["graft", "fraction", "components", "downstream_accuracy", "capability_accuracy", "carried"]
        )


def _movement_times(store: RunStore) -> pd.DataFrame:
    """Per unit: the first recorded step at which its change reached half its final change."""
    comps = store.meta.get("components", {})
    frames = []
    for kind in _UNIT_KINDS:
        name = f"weight_delta.{kind}"
        if name not in store.array_names or kind not in comps:
            continue
        arr = store.array(name).numpy()  # [record, component]
        steps = np.asarray(store.array_steps(name))
        final = arr[-1]
        reached = arr >= 0.5 * final[None, :]
        first = np.where(final > 0, steps[reached.argmax(0)], np.nan)
        frames.append(pd.DataFrame({"component": comps[kind], "t50_step": first}))
    if not frames:
        raise ConfigError(
            f"the RunStore at {store.path} has no weight-change records; record with component_kinds including 'head' or 'neuron'"
        )
    return pd.concat(frames, ignore_index=True)


def _plot(evidence: Evidence):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from capwrap.report import error_bars

    table = evidence.table
    fig = make_subplots(rows=1, cols=2, subplot_titles=("change per layer", "grafting the most-changed units"))
    for kind, label in (("attn", "attention"), ("mlp", "MLP")):
        part = table[table["kind"] == kind].sort_values("layer")
        fig.add_trace(go.Bar(x=part["component"], y=part["relative_change"], name=f"{label} layers",
                             error_y=error_bars(part, "relative_change")), row=1, col=1)  # fmt: skip
    grafts = pd.DataFrame(evidence.details["grafts"]).dropna(subset=["fraction"])
    fig.add_trace(
        go.Scatter(x=grafts["fraction"], y=grafts["carried"], mode="lines+markers", name="downstream gain carried",
                   error_y=error_bars(grafts, "carried")),
        row=1, col=2,
    )  # fmt: skip
    fig.update_xaxes(title_text="component", row=1, col=1)
    fig.update_yaxes(title_text="relative change ‖ΔW‖/‖W‖", row=1, col=1)
    fig.update_xaxes(title_text="share of units grafted", tickformat=".0%", row=1, col=2)
    fig.update_yaxes(title_text="downstream gain carried", tickformat=".0%", row=1, col=2)
    fig.update_layout(height=380, title=f"weight diff: {evidence.direction} ({evidence.strength:.2f})")
    return fig
