"""Attention comparison: how much did each head's attention pattern change, base vs tuned?

On the capability task's sequences, every head's pattern (``blocks.L.attn.hook_pattern``,
``[batch, head, query, key]``) is compared between the two models by total variation distance
(half the L1 distance between the two attention distributions of a query; 0 = identical, 1 =
disjoint), averaged over sequences — at the answer position, where the task is read out, and over
all query positions.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> base = build_model(spec, seed=0)
    >>> ev = AttentionComparison(n=32)(ModelPair(base, base.clone()), task, task)
    >>> float(ev.table["tv_answer"].max())
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from capwrap.analyzers.base import Analyzer, Evidence, Kind, ModelPair
from capwrap.errors import ConfigError
from capwrap.recording import RunStore
from capwrap.tasks.base import Task

__all__ = ["AttentionComparison"]


@dataclass
class AttentionComparison(Analyzer):
    """Per-head change of attention patterns on the capability task.

    Args:
        n: sequences compared.
        seed: seed of the sequences.
        changed_threshold: a head counts as changed when its answer-position distance exceeds this.
    """

    n: int = 256
    seed: int = 0
    changed_threshold: float = 0.1
    name: str = "attention"
    kind: ClassVar[Kind] = "structural"

    def __post_init__(self) -> None:
        if self.n <= 0 or not 0 < self.changed_threshold < 1:
            raise ConfigError("n must be positive and changed_threshold in (0, 1)")

    def analyze(self, pair: ModelPair, capability: Task, downstream: Task, store: RunStore | None = None) -> Evidence:
        batch = capability.sample(self.n, seed=self.seed)
        pattern = "blocks.*.attn.hook_pattern"
        base = pair.base.capture(batch.tokens.to(pair.base.device), pattern, batch_size=128)
        tuned = pair.tuned.capture(batch.tokens.to(pair.tuned.device), pattern, batch_size=128)
        rows_idx = torch.arange(len(batch))
        rows = []
        for layer, name in enumerate(base):
            pb, pt = base[name].float().cpu(), tuned[name].float().cpu()  # [batch, head, query, key]
            tv = 0.5 * (pb - pt).abs().sum(-1)  # [batch, head, query]
            at_answer = tv[rows_idx, :, batch.answer_pos].mean(0)  # [head]
            overall = tv.mean((0, 2))
            for head in range(pb.shape[1]):
                rows.append((f"L{layer}H{head}", layer, head, float(at_answer[head]), float(overall[head])))
        table = pd.DataFrame(rows, columns=["component", "layer", "head", "tv_answer", "tv_all"])
        table = table.sort_values("tv_answer", ascending=False, ignore_index=True)
        changed = int((table["tv_answer"] > self.changed_threshold).sum())
        headline = {
            "max_tv_answer": float(table["tv_answer"].max()),
            "median_tv_answer": float(table["tv_answer"].median()),
            "mean_tv_all": float(table["tv_all"].mean()),
            "heads_changed": float(changed),
            "heads": float(len(table)),
        }
        top = table.iloc[0]
        share = changed / len(table)
        if changed == 0:
            direction, strength = "neutral", 0.1
            reason = f"no head's attention at the answer position moved by more than {self.changed_threshold:.0%} (largest: {top.component}, {top.tv_answer:.1%})"
        elif share <= 0.25:
            direction, strength = "wrapper", 0.25
            reason = f"{changed} of {len(table)} heads changed where they attend at the answer position (most: {top.component}, {top.tv_answer:.0%}); the rest kept their patterns"
        else:
            direction, strength = "change", 0.25 + 0.2 * min(1.0, share)
            reason = f"{changed} of {len(table)} heads changed where they attend at the answer position (most: {top.component}, {top.tv_answer:.0%})"
        return Evidence(self.name, headline, table, direction, strength, [reason], plot=_plot)


def _plot(evidence: Evidence):
    import plotly.graph_objects as go

    grid = evidence.table.pivot(index="layer", columns="head", values="tv_answer").sort_index()
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=[f"H{h}" for h in grid.columns],
            y=[f"L{layer}" for layer in grid.index],
            colorscale="Viridis",
            zmin=0,
            colorbar=dict(title="total<br>variation"),
        )
    )
    fig.update_layout(
        height=340, title=f"attention change at the answer position (total variation): {evidence.direction}",
        xaxis_title="head", yaxis_title="layer",
    )  # fmt: skip
    return fig
