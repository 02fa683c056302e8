"""The analyzer interface: a `ModelPair` in, `Evidence` out.

Every analyzer takes the pair (base, tuned), the capability task, the downstream task and,
optionally, the :class:`~capwrap.recording.RunStore` of the fine-tuning run, and returns
:class:`Evidence`: headline numbers, a per-component table, the direction the evidence points
(``wrapper``: the capability is still there under a thin change; ``change``: the capability itself
changed; ``neutral``) with a strength in [0, 1], the reasons in words, and a plotly figure.
Analyzers hold only their settings, so any subset runs in any order.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> spec = ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2)
    >>> pair = ModelPair(build_model(spec, seed=0), build_model(spec, seed=1))
    >>> pair.spec.n_layers
    1
    >>> ModelPair(build_model(spec), build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=16, n_heads=2)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    capwrap.errors.ConfigError: the base and tuned models differ in n_layers (1 vs 2); ...
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pandas as pd

from capwrap.errors import ConfigError
from capwrap.models import CapModel, ModelSpec
from capwrap.recording import RunStore
from capwrap.tasks.base import Task, check_task_fits

__all__ = ["Analyzer", "Direction", "Kind", "Evidence", "ModelPair", "check_store_matches"]

Direction = Literal["wrapper", "change", "neutral"]
#: ``functional``: tests what the model can still do (read, release, revive the capability);
#: ``structural``: says where and how widely the model changed.
Kind = Literal["functional", "structural"]


@dataclass
class ModelPair:
    """A base model and a fine-tuned version of it, of the same architecture and shape."""

    base: CapModel
    tuned: CapModel

    def __post_init__(self) -> None:
        detail = self.base.spec.differences(self.tuned.spec)
        if detail:
            raise ConfigError(
                f"the base and tuned models differ in {detail}; a pair must share architecture and shape "
                "(was one of them fine-tuned from the other?)"
            )

    @property
    def spec(self) -> ModelSpec:
        """The shared spec."""
        return self.base.spec

    def check_tasks(self, *tasks: Task) -> None:
        """Raise a clear error if the models cannot embed a task's tokens or sequences."""
        for task in tasks:
            check_task_fits(self.base, task)


def check_store_matches(pair: ModelPair, store: RunStore) -> None:
    """Raise if ``store`` was recorded from a model of another shape than ``pair``'s."""
    recorded = store.meta.get("spec")
    if not pair.spec.same_as(recorded):
        raise ConfigError(
            f"the RunStore at {store.path} was recorded from another model ({recorded}); "
            "pass the store of the run that produced this tuned model"
        )


@dataclass
class Evidence:
    """What one analyzer found.

    Attributes:
        analyzer: the analyzer's name.
        headline: a few named numbers (JSON-serializable floats).
        table: per-component (or per-setting) results.
        direction: ``wrapper``, ``change`` or ``neutral``.
        strength: how strongly it points there, in [0, 1].
        reasons: sentences that cite the numbers behind ``direction``.
        details: further data for figures and reports (curves, matrices), JSON-serializable.
        kind: the analyzer's :data:`Kind` (set from the analyzer's class attribute).
    """

    analyzer: str
    headline: dict[str, float]
    table: pd.DataFrame
    direction: Direction
    strength: float
    reasons: list[str]
    details: dict[str, Any] = field(default_factory=dict)
    plot: Callable[[Evidence], Any] | None = field(default=None, repr=False, compare=False)
    kind: Kind = "structural"

    def __post_init__(self) -> None:
        if self.direction not in ("wrapper", "change", "neutral"):
            raise ConfigError(f"direction must be 'wrapper', 'change' or 'neutral', got {self.direction!r}")
        if self.kind not in ("functional", "structural"):
            raise ConfigError(f"kind must be 'functional' or 'structural', got {self.kind!r}")
        self.strength = float(min(1.0, max(0.0, self.strength)))

    def figure(self) -> Any:
        """A plotly figure of the evidence."""
        if self.plot is None:
            import plotly.graph_objects as go

            return go.Figure(
                go.Table(header=dict(values=list(self.headline)), cells=dict(values=list(self.headline.values())))
            )
        return self.plot(self)

    def to_dict(self, max_rows: int = 50) -> dict[str, Any]:
        """JSON-serializable summary (the table truncated to ``max_rows`` rows)."""
        return {
            "analyzer": self.analyzer,
            "kind": self.kind,
            "direction": self.direction,
            "strength": round(self.strength, 4),
            "headline": {k: _jsonable(v) for k, v in self.headline.items()},
            "reasons": list(self.reasons),
            "table": self.table.head(max_rows).to_dict(orient="records"),
        }


def _jsonable(value: Any) -> Any:
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return value


class Analyzer(ABC):
    """Base class of analyzers: settings in the constructor, the work in :meth:`analyze`."""

    #: Short name used in reports and in ``Diagnosis``.
    name: str = "analyzer"
    #: What the evidence is about (:data:`Kind`); every analyzer declares it.
    kind: ClassVar[Kind]

    @abstractmethod
    def analyze(self, pair: ModelPair, capability: Task, downstream: Task, store: RunStore | None = None) -> Evidence:
        """Run the analysis and return its evidence."""

    def __call__(self, pair: ModelPair, capability: Task, downstream: Task, store: RunStore | None = None) -> Evidence:
        pair.check_tasks(capability, downstream)
        if store is not None:
            check_store_matches(pair, store)
        evidence = self.analyze(pair, capability, downstream, store)
        evidence.kind = type(self).kind
        return evidence

    def settings(self) -> dict[str, Any]:
        """The analyzer's settings (for reports)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
