"""Revival: how fast does reverse fine-tuning bring the capability back, compared with a model that
never had it?

The tuned model is fine-tuned back on the capability task, with accuracy checked every few steps
until it reaches a threshold (default: 90% of the base model's). The same loop runs from a
*control* that never had the capability — by default a freshly initialized model of the same shape
trained on the downstream task alone for the same budget as the fine-tuning, or a model you pass.
If fine-tuning only wrapped the capability, the tuned model revives many times faster than the
control learns it (the paper: 100–1K steps against ~4.5K).

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> model = build_model(spec, seed=0)
    >>> ev = Revival(max_steps=4, eval_every=2, eval_size=32, control_steps=2)(ModelPair(model, model.clone()), task, task)
    >>> sorted(set(ev.table["model"]))
    ['control', 'tuned']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd

from capwrap.analyzers.base import Analyzer, Evidence, Kind, ModelPair
from capwrap.errors import ConfigError
from capwrap.models import CapModel, build_model
from capwrap.recording import RunStore
from capwrap.tasks.base import Task, accuracy
from capwrap.training import StepInfo, StopTraining, TrainConfig, train

__all__ = ["Revival", "steps_to_threshold"]


def steps_to_threshold(
    model: CapModel, task: Task, threshold: float, config: TrainConfig, eval_every: int, eval_size: int, seed: int
) -> tuple[float, pd.DataFrame]:
    """Train ``model`` on ``task`` until its accuracy reaches ``threshold`` (checked every
    ``eval_every`` steps); returns (the step it did, or NaN within ``config.steps``; the curve)."""
    batch = task.sample(eval_size, seed=seed)
    curve = [(0, accuracy(model, batch))]
    if curve[0][1] >= threshold:
        return 0.0, pd.DataFrame(curve, columns=["step", "accuracy"])

    def check(info: StepInfo) -> None:
        if info.step % eval_every == 0 or info.step == config.steps:
            acc = accuracy(model, batch)
            curve.append((info.step, acc))
            if acc >= threshold:
                raise StopTraining

    train(model, task, config, callbacks=[check], description="revive")
    reached = [s for s, a in curve if a >= threshold]
    return (float(reached[0]) if reached else math.nan), pd.DataFrame(curve, columns=["step", "accuracy"])


@dataclass
class Revival(Analyzer):
    """Reverse fine-tuning of the tuned model against a control that never had the capability.

    Args:
        max_steps: budget of reverse fine-tuning steps.
        lr: reverse fine-tuning learning rate (the paper uses a smaller one than pretraining).
        batch_size: sequences per step.
        eval_every: check the accuracy every this many steps.
        eval_size: sequences per check.
        threshold_fraction: revival = this share of the base model's capability accuracy.
        control: a model that never had the capability; default: one built and trained here.
        control_steps: steps the default control trains on the downstream task (the fine-tuning budget).
        seed: seed of data and the control's initialization.
    """

    max_steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 96
    eval_every: int = 10
    eval_size: int = 512
    threshold_fraction: float = 0.9
    control: CapModel | None = field(default=None, repr=False)
    control_steps: int = 300
    seed: int = 0
    name: str = "revival"
    kind: ClassVar[Kind] = "functional"

    def __post_init__(self) -> None:
        for attr in ("max_steps", "batch_size", "eval_every", "eval_size", "control_steps"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"Revival.{attr} must be positive, got {getattr(self, attr)}")
        if not 0 < self.threshold_fraction <= 1:
            raise ConfigError(f"threshold_fraction must be in (0, 1], got {self.threshold_fraction}")

    def settings(self) -> dict:
        return {k: v for k, v in super().settings().items() if k != "control"}

    def analyze(self, pair: ModelPair, capability: Task, downstream: Task, store: RunStore | None = None) -> Evidence:
        if self.control is not None:
            ModelPair(pair.base, self.control)  # same shape, or a clear error
        base_acc = accuracy(pair.base, capability.sample(self.eval_size, seed=self.seed + 5))
        threshold = self.threshold_fraction * base_acc
        config = TrainConfig(
            steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, warmup=0.0, seed=self.seed, progress=False
        )
        tuned_steps, tuned_curve = steps_to_threshold(
            pair.tuned.clone(), capability, threshold, config, self.eval_every, self.eval_size, self.seed
        )
        control = self.control.clone() if self.control is not None else self._make_control(pair, downstream)
        control_steps, control_curve = steps_to_threshold(
            control, capability, threshold, config, self.eval_every, self.eval_size, self.seed
        )
        table = pd.concat([tuned_curve.assign(model="tuned"), control_curve.assign(model="control")], ignore_index=True)
        ratio = _ratio(tuned_steps, control_steps, self.max_steps)
        headline = {
            "threshold": threshold,
            "steps_tuned": tuned_steps,
            "steps_control": control_steps,
            "control_over_tuned": ratio,
            "budget": float(self.max_steps),
        }
        direction, strength, reasons = _judge(headline)
        return Evidence(self.name, headline, table, direction, strength, reasons, plot=_plot)

    def _make_control(self, pair: ModelPair, downstream: Task) -> CapModel:
        """A model of the same shape that never saw the capability task: trained on the downstream task only."""
        control = build_model(pair.spec, backend=pair.base.backend, seed=self.seed + 1000).to(pair.base.device)
        train(
            control,
            downstream,
            TrainConfig(
                steps=self.control_steps, batch_size=self.batch_size, lr=1e-3, seed=self.seed + 1, progress=False
            ),
        )
        return control


def _ratio(tuned: float, control: float, budget: int) -> float:
    if math.isnan(tuned):
        return math.nan
    control_or_budget = budget if math.isnan(control) else control  # a lower bound when the control never got there
    return control_or_budget / max(tuned, 1.0)


def _judge(h: dict[str, float]) -> tuple[str, float, list[str]]:
    tuned, control, budget, ratio = h["steps_tuned"], h["steps_control"], int(h["budget"]), h["control_over_tuned"]
    control_text = (
        f"{control:.0f} steps" if not math.isnan(control) else f"more than {budget} steps (not within the budget)"
    )
    if math.isnan(tuned):
        return (
            "change",
            0.5,
            [
                f"reverse fine-tuning did not bring the capability back to {h['threshold']:.0%} within {budget} steps (control: {control_text})"
            ],
        )
    if ratio >= 3:
        return (
            "wrapper",
            min(1.0, 0.5 + 0.1 * math.log2(ratio)),
            [
                f"reverse fine-tuning revives the capability in {tuned:.0f} steps; a model that never had it needs {control_text} "
                f"({'at least ' if math.isnan(control) else ''}{ratio:.1f}x longer)"
            ],
        )
    if ratio < 1.5:
        return (
            "change",
            0.4,
            [
                f"the tuned model relearns the capability no faster than a control that never had it ({tuned:.0f} vs {control_text})"
            ],
        )
    return (
        "neutral",
        0.2,
        [
            f"the tuned model relearns the capability {ratio:.1f}x faster than the control ({tuned:.0f} vs {control_text})"
        ],
    )


def _plot(evidence: Evidence):
    import plotly.graph_objects as go

    from capwrap.report import error_bars

    fig = go.Figure()
    for model, part in evidence.table.groupby("model"):
        fig.add_trace(go.Scatter(x=part["step"], y=part["accuracy"], mode="lines+markers", name=f"{model} model",
                                 error_y=error_bars(part, "accuracy")))  # fmt: skip
    fig.add_hline(y=evidence.headline["threshold"], line_dash="dot", annotation_text="revival threshold")
    fig.update_layout(height=360, xaxis_title="reverse fine-tuning step", yaxis=dict(title="capability accuracy", tickformat=".0%", range=[0, 1.02]),
                      title=f"revival: {evidence.direction} ({evidence.strength:.2f})")  # fmt: skip
    return fig
