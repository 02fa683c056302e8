"""How well the verdict does on the suite: one row per scenario and question, the confusion table,
each analyzer's accuracy and AUC against the truth, JSON and a self-contained HTML report.

The suite's accuracies and AUCs carry intervals too: the scenarios are the sample, so they are
resampled whole (both questions of a scenario together), with the bootstrap every analyzer's interval
uses (:mod:`capwrap.analyzers.bootstrap`; ``LEVEL`` coverage, a fixed seed).

Examples:
    >>> auc([0.9, 0.8, 0.7], [0.1, 0.2])  # every wrapper value above every change value
    1.0
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capwrap.analyzers.bootstrap import LEVEL, percentile_interval, resample
from capwrap.diagnosis.rule import VerdictRule
from capwrap.files import write_text_atomic
from capwrap.report import Report
from capwrap.validation.runner import findings_from_record
from capwrap.validation.scenarios import is_scored, record_truth, scenario_of

__all__ = ["ValidationResult", "auc", "score_records"]

VERDICTS = ("wrapper", "capability_change", "inconclusive")
#: Resamples of the suite's scenarios behind each interval of a :class:`ValidationResult`, and their seed.
N_BOOT, BOOT_SEED = 1000, 0


def auc(wrapper: Sequence[float], change: Sequence[float]) -> float:
    """P(a wrapper value > a change value) + half the ties (the Mann-Whitney AUC); NaN without both."""
    w, c = np.asarray(wrapper, dtype=float), np.asarray(change, dtype=float)
    w, c = w[np.isfinite(w)], c[np.isfinite(c)]
    if not len(w) or not len(c):
        return math.nan
    greater = (w[:, None] > c[None, :]).sum() + 0.5 * (w[:, None] == c[None, :]).sum()
    return float(greater / (len(w) * len(c)))


def score_records(records: Sequence[dict[str, Any]], rule: VerdictRule) -> pd.DataFrame:
    """One row per scenario and question under ``rule``: truth, whether a gate decided the finding
    (``gated``), verdict, score, interval, confidence, and each analyzer's statistic and signed strength."""
    rows = []
    for record in records:
        scenario = scenario_of(record)
        truth = record_truth(record, rule)
        findings = findings_from_record(record, rule)
        for question, finding in findings.items():
            row = {
                "name": scenario.name, "split": scenario.split, "family": scenario.family, "base": scenario.base,
                "kind": scenario.kind, "gated": bool(finding.support.get("gated")),
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
    it (the metric the unlearning literature reports); ``">200"`` where 200 steps did not bring it
    back."""
    rows = []
    for record in records:
        revival = next((e for e in record["evidence"] if e["statistic"] == "revival_speedup_log2"), None)
        head = (revival or {}).get("headline", {})
        rows.append({
            "name": record["scenario"]["name"], "kind": scenario_of(record).kind,
            "capability_base": record["accuracy"]["base"]["capability"],
            "capability_tuned": record["accuracy"]["tuned"]["capability"],
            "relearn_steps_tuned": _steps(head, "steps_tuned"), "relearn_steps_control": _steps(head, "steps_control"),
            "budget": head.get("budget"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _steps(headline: dict[str, Any], key: str) -> int | str | None:
    """Revival's steps to the threshold, ``">budget"`` when the budget ran out first, ``None`` without
    revival or without that run (a tuned model already at the threshold trains no control)."""
    if key not in headline:
        return None
    steps = headline.get(key)
    return int(steps) if steps is not None else f">{headline['budget']:g}"


@dataclass
class ValidationResult:
    """The suite's rows under one rule, and what they add up to."""

    rows: pd.DataFrame
    rule: VerdictRule
    meta: dict[str, Any] = field(default_factory=dict)
    relearning: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], rule: VerdictRule, **meta: Any) -> ValidationResult:
        """Score ``records`` under ``rule``; ``meta`` gains ``scenario_seconds``, the time the records'
        scenarios took to build and diagnose (summed over workers, whenever they ran)."""
        seconds = sum(r.get("seconds", {}).get(k, 0.0) for r in records for k in ("build", "diagnose"))
        meta = {"scenario_seconds": round(seconds, 1), **meta}
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
        """The rows whose truth is known and not decided by the diagnosis's own gates
        (:func:`~capwrap.validation.scenarios.is_scored`)."""
        return self.rows[self._scored_mask()] if len(self.rows) else self.rows

    @property
    def gated(self) -> pd.DataFrame:
        """The rows left out of :attr:`scored` because a gate decided both their truth and their
        verdict (nothing to explain: ``inconclusive`` on both sides, right by construction)."""
        return self.rows[~self._scored_mask() & (self.rows["truth"] != "unknown")] if len(self.rows) else self.rows

    def _scored_mask(self) -> pd.Series:
        """Which rows :func:`~capwrap.validation.scenarios.is_scored` counts (rows built by hand,
        without ``kind`` and ``gated``: those of known truth)."""
        rows = self.rows
        if not {"kind", "gated"} <= set(rows.columns):
            return rows["truth"] != "unknown"
        mask = [is_scored(k, t, g) for k, t, g in zip(rows["kind"], rows["truth"], rows["gated"], strict=True)]
        return pd.Series(mask, index=rows.index, dtype=bool)

    @property
    def accuracy(self) -> float:
        """Share of scored rows whose verdict equals the truth."""
        scored = self.scored
        return float((scored["verdict"] == scored["truth"]).mean()) if len(scored) else math.nan

    def interval(self, rows: pd.DataFrame, statistic: Callable[[np.ndarray], float]) -> tuple[float, float]:
        """The ``LEVEL`` bootstrap interval of ``statistic(positions)`` — a figure computed on the rows at
        those positions of ``rows`` — with the scenarios resampled whole (``N_BOOT`` resamples, seed
        ``BOOT_SEED``): how much the figure owes to which scenarios the suite happens to hold.
        Resamples where the figure is undefined (NaN: no row points anywhere, or an AUC without one
        of the truths) are left out. Scenarios that share a base or a recipe are resampled as if
        independent, so the interval is, if anything, too narrow.

        Example:
            >>> rows = pd.DataFrame({"name": list("abcdefghij"), "verdict": ["wrapper"] * 10,
            ...                      "truth": ["wrapper"] * 9 + ["inconclusive"]})
            >>> right = (rows["verdict"] == rows["truth"]).to_numpy()
            >>> lo, hi = ValidationResult(rows, VerdictRule()).interval(rows, lambda at: right[at].mean())
            >>> 0.6 < lo < 0.9 < hi <= 1.0
            True
        """
        if not len(rows):
            return (math.nan, math.nan)
        codes, names = pd.factorize(rows["name"], sort=True)  # the records' order does not matter
        members = [np.flatnonzero(codes == i) for i in range(len(names))]
        replicates = []
        with np.errstate(all="ignore"):
            for pick in resample(len(names), N_BOOT, BOOT_SEED).numpy():
                replicates.append(float(statistic(np.concatenate([members[i] for i in pick]))))
        return percentile_interval(np.asarray(replicates), LEVEL)

    @property
    def accuracy_interval(self) -> tuple[float, float]:
        """:attr:`accuracy`'s interval over the suite's scenarios (:meth:`interval`)."""
        scored = self.scored
        right = (scored["verdict"] == scored["truth"]).to_numpy()
        return self.interval(scored, lambda at: right[at].mean())

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
            "accuracy_interval": list(self.accuracy_interval),
            "scored": len(s),
            "gated": len(self.gated),
            "wrapper_on_removed": int((removed["verdict"] == "wrapper").sum()),
            "change_on_wrapper": int((wrappers["verdict"] == "capability_change").sum()),
            "kept_inconclusive": bool((kept["verdict"] == "inconclusive").all()),
        }

    def families(self) -> pd.DataFrame:
        """Per task family and base (the groups a held-out half differs from its calibration half in):
        scenarios, scored findings, how many are right, the accuracy with its interval over the
        group's scenarios (:meth:`interval`), and the verdicts in the wrong direction (``wrapper`` on
        a ``capability_change`` truth or the reverse) — whether the verdict generalizes beyond the
        families it was fitted on, group by group.

        Example:
            >>> rows = pd.DataFrame({"name": ["a", "a", "b"], "family": ["pcfg-count"] * 3, "base": ["pcfg-a"] * 3,
            ...                      "truth": ["wrapper", "wrapper", "capability_change"],
            ...                      "verdict": ["wrapper", "inconclusive", "wrapper"]})
            >>> ValidationResult(rows, VerdictRule()).families()[["family", "findings", "right", "wrong_direction"]]
                   family  findings  right  wrong_direction
            0  pcfg-count         3      1                1
        """
        s = self.scored
        out = []
        for (family, base), part in s.groupby(["family", "base"], sort=True) if len(s) else []:
            right = (part["verdict"] == part["truth"]).to_numpy()
            wrong = ((part["verdict"] == "wrapper") & (part["truth"] == "capability_change")) | (
                (part["verdict"] == "capability_change") & (part["truth"] == "wrapper")
            )
            low, high = self.interval(part, lambda at, right=right: right[at].mean())
            out.append({"family": family, "base": base, "scenarios": part["name"].nunique(), "findings": len(part),
                        "right": int(right.sum()), "accuracy": float(right.mean()), "accuracy_low": low,
                        "accuracy_high": high, "wrong_direction": int(wrong.sum())})  # fmt: skip
        columns = ["family", "base", "scenarios", "findings", "right", "accuracy", "accuracy_low", "accuracy_high",
                   "wrong_direction"]  # fmt: skip
        return pd.DataFrame(out, columns=columns)

    def analyzers(self) -> pd.DataFrame:
        """Per analyzer: how often its direction matches the truth where it points somewhere
        (``accuracy``), how often it points somewhere (``coverage``), its wrong directions on wrapper
        findings (``wrong_on_wrapper``: pointing to change where the truth is a wrapper; the suite asks
        for none — right or neutral) and on capability-change findings (``wrong_on_change``), and the
        AUC of its statistic separating wrapper from capability-change truths (oriented as its anchor),
        each rate with its interval over the suite's scenarios (``accuracy_low``/``_high``,
        ``auc_low``/``_high``: :meth:`interval`)."""
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

            # each figure on the rows at some positions: all of them for the point, resamples for the interval
            def accuracy_at(at: np.ndarray, right: np.ndarray = right, pointing: np.ndarray = pointing) -> float:
                return float(right[at].sum() / pointing[at].sum()) if pointing[at].any() else math.nan

            def auc_at(at: np.ndarray, oriented: np.ndarray = flip * values, want: np.ndarray = want) -> float:
                return auc(oriented[at][want[at] > 0], oriented[at][want[at] < 0])

            every = np.arange(len(part))
            acc_low, acc_high = self.interval(part, accuracy_at)
            auc_low, auc_high = self.interval(part, auc_at)
            rows.append({
                "analyzer": name, "question": part["question"].iloc[0], "statistic": stat.iloc[0] if len(stat) else None,
                "rows": len(part), "coverage": float(pointing.mean()),
                "accuracy": accuracy_at(every), "accuracy_low": acc_low, "accuracy_high": acc_high,
                "wrong_on_wrapper": int((pointing & ~right & (want > 0)).sum()),
                "wrong_on_change": int((pointing & ~right & (want < 0)).sum()),
                "auc": auc_at(every), "auc_low": auc_low, "auc_high": auc_high,
            })  # fmt: skip
        return pd.DataFrame(rows)

    def summary_text(self) -> str:
        """The terminal's view: confusion table, targets, analyzers."""
        t = self.targets()
        lo, hi = t["accuracy_interval"]
        lines = [
            f"accuracy {t['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] on {t['scored']} scored findings "
            f"({LEVEL:.0%} interval over scenarios; {_gated_text(t['gated'])}); wrapper verdicts on removed scenarios: "
            f"{t['wrapper_on_removed']}; capability-change verdicts on wrapper scenarios: {t['change_on_wrapper']}; "
            f"kept scenarios all inconclusive: {t['kept_inconclusive']}",
            "",
            self.confusion().to_string(),  # its axes are named: verdict (columns), truth (rows)
            "",
            _table_text(self.families(), "no scored findings, so no accuracy per family"),
            "",
            _table_text(self.analyzers(), "no scored finding has the truth wrapper or capability_change, so no "
                                          "analyzer is compared with the truth"),
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
            "base",
            "kind",
            "gated",
            "question",
            "truth",
            "verdict",
            "score",
            "low",
            "high",
            "confidence",
            "reason",
        ]
        rows = self.rows.assign(gated=self.rows.get("gated", False))  # (rows scored before the column existed)
        scenarios = [{k: _clean(v) for k, v in row.items()} for row in rows[cols].to_dict(orient="records")]
        return {
            "scenarios": scenarios,
            "targets": {k: _clean(v) for k, v in self.targets().items()},
            "confusion": {t: {v: int(n) for v, n in row.items()} for t, row in self.confusion().iterrows()},
            "families": [{k: _clean(v) for k, v in r.items()} for r in self.families().to_dict(orient="records")],
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
        lo, hi = t["accuracy_interval"]
        report.add_text(None, f"Accuracy {t['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] on {t['scored']} scored findings",
                        css_class="verdict")  # fmt: skip
        report.add_text("Targets", f"Wrapper verdicts on removed scenarios: {t['wrapper_on_removed']}. Capability-change "
                        f"verdicts on wrapper scenarios: {t['change_on_wrapper']}. Kept scenarios all inconclusive: "
                        f"{t['kept_inconclusive']}.")  # fmt: skip
        report.add_text("Confusion", "Truth (rows) against verdict (columns), per scenario and question.")
        report.add_table(self.confusion().reset_index())
        report.add_text("Accuracy", f"Share of scored findings whose verdict equals the truth; the brackets give its "
                        f"{LEVEL:.0%} bootstrap interval over the suite's scenarios (resampled whole). Not scored: "
                        f"{_gated_text(t['gated'])}.")  # fmt: skip
        report.add_text("Families", "Per task family and base: scored findings, how many the verdict gets right, "
                        f"the accuracy with its {LEVEL:.0%} interval over the group's scenarios, and verdicts in the "
                        "wrong direction.")  # fmt: skip
        _add_table(report, self.families())
        report.add_text("Analyzers", "How often each analyzer points the right way where it points at all, how often it "
                        "does, and how well its statistic separates wrapper from capability-change truths (AUC), with "
                        f"{LEVEL:.0%} intervals over the suite's scenarios.")  # fmt: skip
        _add_table(report, self.analyzers())
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


def _gated_text(n: int) -> str:
    """What the accuracy leaves out besides unknown truths."""
    return (f"{n} gated finding{'s' if n != 1 else ''} not scored: nothing to explain, so truth and verdict are "
            "both inconclusive by construction")  # fmt: skip


def _add_table(report: Report, frame: pd.DataFrame) -> None:
    """``frame`` as a table of ``report``, or a note when it has no rows."""
    if len(frame):
        report.add_table(frame)
    else:
        report.add_text(None, "(no scored findings)")


def _table_text(frame: pd.DataFrame, empty: str) -> str:
    """``frame`` for the terminal, or ``empty`` when it has no rows."""
    return frame.to_string(index=False, float_format=lambda v: f"{v:.2f}") if len(frame) else f"({empty})"


def _clean(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return round(float(value), 4) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
