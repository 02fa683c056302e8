"""How well the verdict does on the suite: one row per scenario and question, the confusion table,
each analyzer's accuracy and AUC against the truth, JSON and a self-contained HTML report.

Examples:
    >>> auc([0.9, 0.8, 0.7], [0.1, 0.2])  # every wrapper value above every change value
    1.0
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capwrap.diagnosis.rule import VerdictRule
from capwrap.files import write_text_atomic
from capwrap.report import Report
from capwrap.validation.runner import findings_from_record
from capwrap.validation.scenarios import record_truth, scenario_of

__all__ = ["ValidationResult", "auc", "score_records"]

VERDICTS = ("wrapper", "capability_change", "inconclusive")


def auc(wrapper: Sequence[float], change: Sequence[float]) -> float:
    """P(a wrapper value > a change value) + half the ties (the Mann-Whitney AUC); NaN without both."""
    w, c = np.asarray(wrapper, dtype=float), np.asarray(change, dtype=float)
    w, c = w[np.isfinite(w)], c[np.isfinite(c)]
    if not len(w) or not len(c):
        return math.nan
    greater = (w[:, None] > c[None, :]).sum() + 0.5 * (w[:, None] == c[None, :]).sum()
    return float(greater / (len(w) * len(c)))


def score_records(records: Sequence[dict[str, Any]], rule: VerdictRule) -> pd.DataFrame:
    """One row per scenario and question under ``rule``: truth, verdict, score, interval, confidence,
    and each analyzer's statistic and signed strength."""
    rows = []
    for record in records:
        scenario = scenario_of(record)
        truth = record_truth(record, rule)
        findings = findings_from_record(record, rule)
        for question, finding in findings.items():
            row = {
                "name": scenario.name, "split": scenario.split, "family": scenario.family, "kind": scenario.kind,
                "question": question, "truth": truth[question], "verdict": finding.verdict,
                "score": finding.score, "low": finding.interval[0], "high": finding.interval[1],
                "confidence": finding.confidence, "reason": finding.reasons[0],
            }  # fmt: skip
            for ev in finding.evidence:
                row[f"value:{ev.analyzer}"] = ev.value
                row[f"signed:{ev.analyzer}"] = ev.signed_strength
                row[f"statistic:{ev.analyzer}"] = ev.statistic
            rows.append(row)
    return pd.DataFrame(rows)


def relearning(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per scenario: the capability's accuracy before and after, and the steps reverse fine-tuning
    took to bring it back to 90% of the base's, for the tuned model and for a model that never had
    it (the metric the unlearning literature reports)."""
    rows = []
    for record in records:
        revival = next((e for e in record["evidence"] if e["statistic"] == "revival_speedup_log2"), None)
        head = (revival or {}).get("headline", {})
        rows.append({
            "name": record["scenario"]["name"], "kind": scenario_of(record).kind,
            "capability_base": record["accuracy"]["base"]["capability"],
            "capability_tuned": record["accuracy"]["tuned"]["capability"],
            "relearn_steps_tuned": head.get("steps_tuned"), "relearn_steps_control": head.get("steps_control"),
            "budget": head.get("budget"),
        })  # fmt: skip
    return pd.DataFrame(rows)


@dataclass
class ValidationResult:
    """The suite's rows under one rule, and what they add up to."""

    rows: pd.DataFrame
    rule: VerdictRule
    meta: dict[str, Any] = field(default_factory=dict)
    relearning: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], rule: VerdictRule, **meta: Any) -> ValidationResult:
        """Score ``records`` under ``rule``."""
        return cls(score_records(records, rule), rule, meta, relearning(records))

    def unknown(self) -> pd.DataFrame:
        """The scenarios of unknown truth on both questions (large learning rates, unlearning
        recipes, partial re-initializations, fine-tunes that did not learn their task): both
        verdicts, and how fast the capability is relearned by the tuned model and by a never-had-it
        control."""
        if not len(self.rows):
            return pd.DataFrame()
        known = set(self.rows.loc[self.rows["truth"] != "unknown", "name"])
        part = self.rows[~self.rows["name"].isin(known)]
        verdicts = part.pivot(index="name", columns="question", values="verdict").add_suffix(" verdict")
        return verdicts.join(self.relearning.set_index("name")).reset_index()

    @property
    def scored(self) -> pd.DataFrame:
        """The rows whose truth is known."""
        return self.rows[self.rows["truth"] != "unknown"] if len(self.rows) else self.rows

    @property
    def accuracy(self) -> float:
        """Share of scored rows whose verdict equals the truth."""
        scored = self.scored
        return float((scored["verdict"] == scored["truth"]).mean()) if len(scored) else math.nan

    def confusion(self) -> pd.DataFrame:
        """Truth (rows) by verdict (columns), counts of scored rows."""
        scored = self.scored
        table = pd.crosstab(scored["truth"], scored["verdict"]) if len(scored) else pd.DataFrame()
        return table.reindex(index=[v for v in VERDICTS if v in set(scored.get("truth", []))], columns=VERDICTS,
                             fill_value=0)  # fmt: skip

    def targets(self) -> dict[str, Any]:
        """The issue's targets: accuracy, wrapper verdicts on removed scenarios, capability-change
        verdicts on wrapper scenarios, kept scenarios all inconclusive."""
        s = self.scored
        removed = s[(s["kind"] == "removed") & (s["truth"] == "capability_change")]
        wrappers = s[s["truth"] == "wrapper"]
        kept = s[s["kind"] == "kept"]
        return {
            "accuracy": self.accuracy,
            "scored": len(s),
            "wrapper_on_removed": int((removed["verdict"] == "wrapper").sum()),
            "change_on_wrapper": int((wrappers["verdict"] == "capability_change").sum()),
            "kept_inconclusive": bool((kept["verdict"] == "inconclusive").all()),
        }

    def analyzers(self) -> pd.DataFrame:
        """Per analyzer: how often its direction matches the truth where it points somewhere
        (``accuracy``), how often it points somewhere (``coverage``), its wrong directions on wrapper
        findings (``wrong_on_wrapper``: pointing to change where the truth is a wrapper; the suite asks
        for none — right or neutral) and on capability-change findings (``wrong_on_change``), and the
        AUC of its statistic separating wrapper from capability-change truths (oriented as its anchor)."""
        s = self.scored
        rows = []
        for col in [c for c in s.columns if c.startswith("signed:")]:
            name = col.removeprefix("signed:")
            part = s[s[col].notna() & s["truth"].isin(["wrapper", "capability_change"])]
            if not len(part):
                continue
            want = np.where(part["truth"] == "wrapper", 1.0, -1.0)
            signed = part[col].to_numpy()
            pointing = signed != 0
            right = (np.sign(signed) == want) & pointing
            values = part[f"value:{name}"].to_numpy(dtype=float)
            stat = part[f"statistic:{name}"].dropna()
            anchor = self.rule.anchors.get(stat.iloc[0]) if len(stat) else None
            flip = 1.0 if anchor is None or anchor.higher_is_wrapper else -1.0
            rows.append({
                "analyzer": name, "question": part["question"].iloc[0], "statistic": stat.iloc[0] if len(stat) else None,
                "rows": len(part), "coverage": float(pointing.mean()),
                "accuracy": float(right.sum() / pointing.sum()) if pointing.any() else math.nan,
                "wrong_on_wrapper": int((pointing & ~right & (want > 0)).sum()),
                "wrong_on_change": int((pointing & ~right & (want < 0)).sum()),
                "auc": auc(flip * values[want > 0], flip * values[want < 0]),
            })  # fmt: skip
        return pd.DataFrame(rows)

    def summary_text(self) -> str:
        """The terminal's view: confusion table, targets, analyzers."""
        t = self.targets()
        lines = [
            f"accuracy {t['accuracy']:.1%} on {t['scored']} scored findings; wrapper verdicts on removed scenarios: "
            f"{t['wrapper_on_removed']}; capability-change verdicts on wrapper scenarios: {t['change_on_wrapper']}; "
            f"kept scenarios all inconclusive: {t['kept_inconclusive']}",
            "",
            "truth \\ verdict",
            self.confusion().to_string(),
            "",
            self.analyzers().to_string(index=False, float_format=lambda v: f"{v:.2f}"),
        ]
        unknown = self.unknown()
        if len(unknown):
            lines += [
                "",
                "unknown truth (reported, not scored):",
                unknown.to_string(index=False, float_format=lambda v: f"{v:.3g}"),
            ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``validation.json`` holds."""
        cols = [
            "name",
            "split",
            "family",
            "kind",
            "question",
            "truth",
            "verdict",
            "score",
            "low",
            "high",
            "confidence",
            "reason",
        ]
        scenarios = [{k: _clean(v) for k, v in row.items()} for row in self.rows[cols].to_dict(orient="records")]
        return {
            "scenarios": scenarios,
            "targets": {k: _clean(v) for k, v in self.targets().items()},
            "confusion": {t: {v: int(n) for v, n in row.items()} for t, row in self.confusion().iterrows()},
            "analyzers": [{k: _clean(v) for k, v in r.items()} for r in self.analyzers().to_dict(orient="records")],
            "unknown": [{k: _clean(v) for k, v in r.items()} for r in self.unknown().to_dict(orient="records")],
            "rule": self.rule.provenance,
            **self.meta,
        }

    def write(self, out: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``validation.json`` and ``validation.html`` to ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "validation.json", json.dumps(self.to_dict(), indent=2))
        self.report().write(out / "validation.html")
        return out / "validation.json", out / "validation.html"

    def report(self) -> Report:
        """A self-contained HTML report."""
        import plotly.graph_objects as go

        t = self.targets()
        report = Report("capwrap validate: the verdict against known truths")
        report.add_text(None, f"Accuracy {t['accuracy']:.1%} on {t['scored']} scored findings", css_class="verdict")
        report.add_text("Targets", f"Wrapper verdicts on removed scenarios: {t['wrapper_on_removed']}. Capability-change "
                        f"verdicts on wrapper scenarios: {t['change_on_wrapper']}. Kept scenarios all inconclusive: "
                        f"{t['kept_inconclusive']}.")  # fmt: skip
        report.add_text("Confusion", "Truth (rows) against verdict (columns), per scenario and question.")
        report.add_table(self.confusion().reset_index())
        report.add_text("Analyzers", "How often each analyzer points the right way where it points at all, how often it "
                        "does, and how well its statistic separates wrapper from capability-change truths (AUC).")  # fmt: skip
        report.add_table(self.analyzers())
        fig = go.Figure()
        for truth, part in self.rows.groupby("truth"):
            fig.add_trace(go.Box(x=part["question"], y=part["score"], name=truth, boxpoints="all", text=part["name"]))
        fig.update_layout(boxmode="group", height=420, yaxis_title="score", xaxis_title="question",
                          title="finding scores by truth")  # fmt: skip
        report.add_figure(fig)
        if len(self.unknown()):
            report.add_text("Unknown truth", "Large learning rates and unlearning recipes: what diagnose says, and how "
                            "fast the capability is relearned (steps to 90% of the base) by the tuned model and by a "
                            "model that never had it.")  # fmt: skip
            report.add_table(self.unknown())
        report.add_text("Scenarios", "Every scenario and question: truth, verdict, score and its interval.")
        report.add_table(
            self.rows[["name", "question", "kind", "truth", "verdict", "score", "low", "high", "confidence"]]
        )
        report.add_text(
            "Rule", json.dumps(self.rule.provenance, indent=1) if self.rule.provenance else "(no provenance)"
        )
        return report


def _clean(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return round(float(value), 4) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
