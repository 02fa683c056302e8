"""`Diagnosis`: the two findings of :func:`capwrap.diagnose`, the evidence behind them, and its forms
(table, JSON, HTML report)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from capwrap.analyzers.base import Evidence
from capwrap.diagnosis.rule import Finding, Verdict
from capwrap.files import write_text_atomic
from capwrap.report import Report

__all__ = ["Diagnosis"]

#: Rows of each analyzer's table an HTML report shows (it says when there are more).
REPORT_ROWS = 12

_QUESTIONS = {
    "deletion": "Did the capability survive under a thin change, or is it gone?",
    "creation": "Is the new behaviour a genuine capability, or a wrapper over an old one?",
}


@dataclass
class Diagnosis:
    """The verdicts and the evidence behind them.

    Attributes:
        deletion: the finding on the capability in question (hidden or gone?).
        creation: the finding on the downstream behaviour (genuine or a wrapper?).
        accuracy: ``{"base"|"tuned": {test set: accuracy}}`` on the one evaluation set.
        intervals: the same accuracies' bootstrap intervals.
        tasks: the tasks' descriptions.
        seconds: per analyzer.
        rule: the provenance of the verdict rule that weighed the evidence.
        weights: per analyzer, its weight in its finding's score.
        resumed: the analyzers whose evidence was read back from an earlier, interrupted call
            (``diagnose(..., evidence_dir=...)``); their ``seconds`` are that call's.
    """

    deletion: Finding
    creation: Finding
    accuracy: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rule: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        """Both findings, deletion first."""
        return [self.deletion, self.creation]

    @property
    def headline_finding(self) -> Finding:
        """The finding that gives the pair its one word: deletion's, unless fine-tuning lost
        nothing of the capability (deletion has nothing to explain), then creation's — a model that
        kept the capability and learned a wrapper is a ``wrapper``. A capability that was lost and
        whose fate is undecided leaves the pair ``inconclusive``, whatever the creation finding says."""
        if self.deletion.verdict == "inconclusive" and self.deletion.support.get("gated"):
            return self.creation
        return self.deletion

    @property
    def verdict(self) -> Verdict:
        """One word for the pair: :attr:`headline_finding`'s verdict."""
        return self.headline_finding.verdict

    @property
    def score(self) -> float:
        """The score of the finding that gave :attr:`verdict`."""
        return self.headline_finding.score

    @property
    def confidence(self) -> float:
        """The confidence of the finding that gave :attr:`verdict`."""
        return self.headline_finding.confidence

    @property
    def reasons(self) -> list[str]:
        """A headline sentence naming both findings, then each finding's reasons."""
        head = f"{self.verdict}: deletion — {self.deletion.reasons[0]}; creation — {self.creation.reasons[0]}"
        return [head, *(f"[{f.question}] {r}" for f in self.findings for r in f.reasons[1:])]

    @property
    def evidence(self) -> list[Evidence]:
        """Every analyzer's evidence, deletion first."""
        return [e for f in self.findings for e in f.evidence]

    def summary(self) -> pd.DataFrame:
        """One row per analyzer: question, kind, statistic, value and interval, direction, strength,
        weight, signed contribution to its finding's score, first reason."""
        rows = []
        for ev in self.evidence:
            weight = self.weights.get(ev.analyzer, 0.0)
            lo, hi = ev.intervals.get("value", (math.nan, math.nan))
            rows.append({
                "question": ev.question, "analyzer": ev.analyzer, "kind": ev.kind, "statistic": ev.statistic,
                "value": ev.value, "low": lo, "high": hi, "direction": ev.direction, "strength": round(ev.strength, 3),
                "weight": round(weight, 3), "contribution": round(weight * ev.signed_strength, 3),
                "reason": ev.reasons[0] if ev.reasons else "",
            })  # fmt: skip
        columns = ["question", "analyzer", "kind", "statistic", "value", "low", "high", "direction", "strength",
                   "weight", "contribution", "reason"]  # fmt: skip
        return pd.DataFrame(rows, columns=columns)

    def __getitem__(self, analyzer: str) -> Evidence:
        """The evidence of one analyzer, by name."""
        for ev in self.evidence:
            if ev.analyzer == analyzer:
                return ev
        raise KeyError(f"no evidence from {analyzer!r}; have {[e.analyzer for e in self.evidence]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "verdict": self.verdict,
            "score": round(self.score, 4),
            "confidence": round(self.confidence, 4),
            "reasons": self.reasons,
            "findings": {f.question: f.to_dict() for f in self.findings},
            "accuracy": self.accuracy,
            "accuracy_intervals": {m: {k: list(v) for k, v in d.items()} for m, d in self.intervals.items()},
            "tasks": self.tasks,
            "evidence": [ev.to_dict(max_rows=20) for ev in self.evidence],
            "seconds": self.seconds,
            "resumed": self.resumed,
            "rule": self.rule,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The diagnosis as JSON; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=json_default)
        if path is not None:
            write_text_atomic(path, text)
        return text

    # ---- the report ---------------------------------------------------------------------------------
    def report(self, title: str = "capwrap diagnosis", provenance: dict[str, Any] | None = None) -> Report:
        """The report: both findings, accuracies, the summary and each analyzer's figure and table,
        and ``provenance`` (:func:`capwrap.provenance.run_provenance`; software and date when omitted)."""
        report = Report(title, provenance=dict(provenance or {}))
        self.add_verdict(report)
        if self.tasks:
            roles = {"capability": "the capability (deletion question)", "downstream": "the fine-tuning task as tested",
                     "downstream_free": "the fine-tuning task without its spurious correlation"}  # fmt: skip
            report.add_list("Tasks", [f"{roles.get(role, role)}: {task.get('name', task.get('kind', '?'))}"
                                      for role, task in self.tasks.items()])  # fmt: skip
        if self.resumed:
            report.add_text("Resumed", f"The evidence of {', '.join(self.resumed)} was read back from an earlier run of "
                                       "this diagnosis that was interrupted (same models, tasks and settings); their "
                                       "seconds are that run's.")  # fmt: skip
        report.add_text("Accuracy", "Base and tuned model on each test set of the one evaluation set (90% intervals).")
        report.add_table(self.accuracy_table(), float_format="{:.1%}")
        self.add_evidence(report)
        return report

    def accuracy_table(self) -> pd.DataFrame:
        """Accuracy of base and tuned on each test set, with intervals."""
        rows = []
        for which in self.accuracy.get("base", {}):
            row = {"test set": which}
            for model in ("base", "tuned"):
                lo, hi = self.intervals.get(model, {}).get(which, (math.nan, math.nan))
                row[model] = self.accuracy[model][which]
                row[f"{model} interval"] = f"[{lo:.1%}, {hi:.1%}]"
            rows.append(row)
        return pd.DataFrame(rows)

    def add_verdict(self, report: Report) -> None:
        """Append the verdict and both findings with their reasons to ``report``."""
        report.add_text(None, f"Verdict: {self.verdict} (score {self.score:+.2f}, confidence {self.confidence:.0%})",
                        css_class="verdict")  # fmt: skip
        for finding in self.findings:
            lo, hi = finding.interval
            report.add_heading(f"{finding.question.capitalize()}: {finding.verdict} "
                               f"(score {finding.score:+.2f} [{lo:+.2f}, {hi:+.2f}])")  # fmt: skip
            report.add_text(None, _QUESTIONS[finding.question])
            report.add_list(None, finding.reasons)

    def add_evidence(self, report: Report) -> None:
        """Append the evidence summary and each analyzer's figure and table to ``report``."""
        report.add_text("Evidence", "Each analyzer's statistic, direction and strength, and its weight in its finding.")
        report.add_table(self.summary().drop(columns=["reason"]))
        for ev in self.evidence:
            report.add_heading(f"{ev.analyzer} ({ev.question}): {ev.direction} ({ev.strength:.2f})")
            report.add_list(None, ev.reasons)
            report.add_figure(ev.figure(), empty_note="No data to plot.")
            report.add_table(ev.table.head(REPORT_ROWS))
            if len(ev.table) > REPORT_ROWS:
                report.add_text(None, f"(The first {REPORT_ROWS} of {len(ev.table)} rows; "
                                f"{ev.analyzer}'s evidence holds them all.)")  # fmt: skip

    def to_html(
        self,
        path: str | os.PathLike | None = None,
        title: str = "capwrap diagnosis",
        provenance: dict[str, Any] | None = None,
    ) -> str:
        """A self-contained HTML report (plotly inlined, readable offline); written atomically to ``path``."""
        report = self.report(title, provenance)
        if path is not None:
            report.write(path)
        return report.to_html()


def json_default(value: Any) -> Any:
    """``json.dumps``'s fallback for numpy scalars and other non-JSON values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None
