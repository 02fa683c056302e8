"""Attention comparison: how much did each head's attention pattern change, base vs tuned?

On the capability task's sequences, every head's pattern (``blocks.L.attn.hook_pattern``,
``[batch, head, query, key]``) is compared between the two models by total variation distance
(half the L1 distance between the two attention distributions of a query; 0 = identical, 1 =
disjoint), averaged over sequences — at the answer position, where the task is read out, and over
all query positions.

Examples:
    >>> from capwrap.analyzers import ModelPair
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> base = build_model(spec, seed=0)
    >>> ev = AttentionComparison(n=32)(ModelPair(base, base.clone()), task, task, eval_size=32)
    >>> float(ev.table["tv_answer"].max())
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch
from torch import Tensor

from capwrap.analyzers.base import Analyzer, Context, Evidence, Kind
from capwrap.errors import ConfigError

__all__ = ["AttentionComparison"]


@dataclass
class AttentionComparison(Analyzer):
    """Per-head change of attention patterns on the capability task.

    Statistic ``attention_change``: the total variation between base and tuned attention at the
    answer position, averaged over heads and sequences (0: every head attends as before; 1: every
    head attends elsewhere). The interval resamples the sequences.

    Args:
        n: sequences compared (the first ``n`` of the diagnosis's capability evaluation set).
        changed_threshold: a head counts as changed (in ``heads_changed``) when its answer-position
            distance exceeds this.
    """

    n: int = 256
    changed_threshold: float = 0.1
    name: str = "attention"
    kind: ClassVar[Kind] = "structural"
    statistic: ClassVar[str | None] = "attention_change"

    def __post_init__(self) -> None:
        if self.n <= 0 or not 0 < self.changed_threshold < 1:
            raise ConfigError("n must be positive and changed_threshold in (0, 1)")

    def analyze(self, context: Context) -> Evidence:
        pair = context.pair
        batch = context.eval.batches["capability"][: self.n]
        pattern = "blocks.*.attn.hook_pattern"
        base = pair.base.capture(batch.tokens.to(pair.base.device), pattern, batch_size=128,
                                 reduce=lambda name, act, rows: act.float().cpu())  # fmt: skip
        answer_pos = batch.answer_pos.cpu()

        def distance(name: str, act: Tensor, rows: slice) -> Tensor:
            """Per pass of the tuned model: each head's total variation from the base's pattern
            ``[batch, head, query]`` (the tuned patterns are never held all at once)."""
            return 0.5 * (base[name][rows] - act.float().cpu()).abs().sum(-1)

        tvs = pair.tuned.capture(batch.tokens.to(pair.tuned.device), pattern, batch_size=128, reduce=distance)
        base.clear()  # what is left is the distances
        rows_idx = torch.arange(len(batch))
        rows, per_sequence = [], []
        for layer, tv in enumerate(tvs.values()):  # [batch, head, query]
            answer = tv[rows_idx, :, answer_pos]  # [batch, head]
            per_sequence.append(answer)
            at_answer, overall = answer.mean(0), tv.mean((0, 2))
            for head in range(tv.shape[1]):
                rows.append((f"L{layer}H{head}", layer, head, float(at_answer[head]), float(overall[head])))
        table = pd.DataFrame(rows, columns=["component", "layer", "head", "tv_answer", "tv_all"])
        table = table.sort_values("tv_answer", ascending=False, ignore_index=True)
        per_head = torch.cat(per_sequence, 1)  # [batch, layer * head]
        per_seq = per_head.mean(1)  # [batch]: mean over every head
        value = float(per_seq.mean())
        idx = context.resample(len(per_seq), self.name)
        reps = per_seq[idx].mean(1).numpy()
        head_reps = per_head[idx].mean(1)  # [n_boot, layer * head]
        changed = int((table["tv_answer"] > self.changed_threshold).sum())
        headline = {
            "attention_change": value,
            "max_tv_answer": float(table["tv_answer"].max()),
            "median_tv_answer": float(table["tv_answer"].median()),
            "mean_tv_all": float(table["tv_all"].mean()),
            "heads_changed": float(changed),
            "heads": float(len(table)),
        }
        top = table.iloc[0]
        summary = (f"attention at the answer position moved by {value:.1%} (total variation, mean over heads); "
                   f"{changed} of {len(table)} heads moved more than {self.changed_threshold:.0%} "
                   f"(most: {top.component}, {top.tv_answer:.0%})")  # fmt: skip
        return Evidence(self.name, headline, table, plot=_plot, value=value, replicates=reps,
                        intervals={"attention_change": context.interval(reps),
                                   "max_tv_answer": context.interval(head_reps.max(1).values.numpy()),
                                   "median_tv_answer": context.interval(head_reps.median(1).values.numpy())},
                        summary=summary)  # fmt: skip


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
