"""Generalization: does the new behaviour hold without the spurious correlation it was learned with?

The paper's test of a wrapper gained in fine-tuning: a model fine-tuned to count ``b`` on data where
count(b) = count(a) + 1 may have learned "count ``a``, add one". Then it counts ``b`` only where the
correlation holds (C_Te = 1) and fails where it does not (C_Te = 0). A genuinely new capability
holds on both.

Examples:
    >>> from capwrap.analyzers import ModelPair
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> config = PCFGConfig(length=8, window=4)
    >>> capability, downstream = PCFGTask("count", "a", config=config), PCFGTask("count", "b", correlation=1.0, config=config)
    >>> spec = ModelSpec(d_vocab=capability.d_vocab, n_ctx=capability.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> base = build_model(spec, seed=0)
    >>> ev = Generalization()(ModelPair(base, base.clone()), capability, downstream, eval_size=64)
    >>> ev.direction, ev.summary.startswith("the tuned model gained")  # an unchanged model gained nothing
    ('neutral', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from capwrap.analyzers.base import Analyzer, Context, Evidence, Kind, Question
from capwrap.report import signed_percent

__all__ = ["Generalization"]


@dataclass
class Generalization(Analyzer):
    """Creation: the share of the downstream gain that survives without the spurious correlation.

    Statistic ``gain_without_correlation``: ``(tuned − base on C_Te=0) / (tuned − base on the
    downstream task as tested)``, from the diagnosis's evaluation set. Near 1: the new behaviour
    holds where the correlation does not (a genuine capability); near 0 or below: it holds only
    through the correlation (a wrapper over the capability the correlation ties it to). Not
    applicable without a correlation-free variant of the downstream task, or when the tuned model
    gained less than ``min_gain`` on the downstream task. The interval resamples the sequences.

    Args:
        min_gain: the statistic applies when the downstream accuracy rose by at least this much.
    """

    min_gain: float = 0.05
    name: str = "generalization"
    kind: ClassVar[Kind] = "functional"
    question: ClassVar[Question] = "creation"
    statistic: ClassVar[str | None] = "gain_without_correlation"

    def analyze(self, context: Context) -> Evidence:
        ev = context.eval
        acc = {(m, k): ev.accuracy(m, k) for m in ("base", "tuned") for k in ev.batches}
        gain = acc["tuned", "downstream"] - acc["base", "downstream"]
        table = pd.DataFrame(
            [(k, acc["base", k], acc["tuned", k]) for k in ev.batches], columns=["test_set", "base", "tuned"]
        )
        headline = {"gain_downstream": gain}
        if "downstream_free" not in ev.batches:
            summary = (f"the tuned model gained {signed_percent(gain)} on {context.downstream.name!r}, which has no "
                       "correlation-free variant to test it on")  # fmt: skip
            return Evidence(self.name, headline, table, summary=summary)
        free_gain = acc["tuned", "downstream_free"] - acc["base", "downstream_free"]
        headline["gain_downstream_free"] = free_gain
        reps_gain = context.accuracy_replicates("tuned", "downstream") - context.accuracy_replicates(
            "base", "downstream"
        )
        reps_free = context.accuracy_replicates("tuned", "downstream_free") - context.accuracy_replicates(
            "base", "downstream_free"
        )
        intervals = {
            "gain_downstream": context.interval(reps_gain),
            "gain_downstream_free": context.interval(reps_free),
        }
        if gain < self.min_gain:
            summary = f"the tuned model gained only {signed_percent(gain)} on {context.downstream.name!r}: nothing new to test"
            return Evidence(self.name, headline, table, intervals=intervals, summary=summary)
        value = free_gain / gain
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = np.where(reps_gain > 0, reps_free / reps_gain, np.nan)
        headline["gain_without_correlation"] = value
        intervals["gain_without_correlation"] = context.interval(reps)
        summary = (f"the tuned model gained {signed_percent(gain)} where the spurious correlation holds "
                   f"({acc['base', 'downstream']:.0%} → {acc['tuned', 'downstream']:.0%}) and {signed_percent(free_gain)} where it "
                   f"does not ({acc['base', 'downstream_free']:.0%} → {acc['tuned', 'downstream_free']:.0%}): "
                   f"{value:.0%} of the gain survives without it")  # fmt: skip
        return Evidence(self.name, headline, table, plot=_plot, value=value, replicates=reps, intervals=intervals,
                        summary=summary)  # fmt: skip


def _plot(evidence: Evidence):
    import plotly.graph_objects as go

    t = evidence.table
    labels = {
        "capability": "capability",
        "downstream": "downstream (as tested)",
        "downstream_free": "downstream, correlation-free",
    }
    fig = go.Figure([go.Bar(name=m, x=[labels.get(k, k) for k in t["test_set"]], y=t[m]) for m in ("base", "tuned")])
    fig.update_layout(barmode="group", height=360, yaxis=dict(title="accuracy", tickformat=".0%", range=[0, 1.02]),
                      title=f"generalization: {evidence.direction} ({evidence.strength:.2f})")  # fmt: skip
    return fig
