"""Fitting the verdict rule on a suite's records, and how sensitive its verdicts are to each number.

The procedure (:func:`fit_rule`), on the *calibration* records:

1. **Truths.** Each record's truth per question follows from its scenario's kind and the gates of the
   starting rule (``kept_fraction``, ``min_gain`` and the task's capability floor are definitions of
   the questions, not fitted).
2. **Anchors, per statistic.** Take the statistic's values on findings whose truth is ``wrapper``
   (W) and ``capability_change`` (C). The side of W's median is the wrapper side. The *wrapper cut*
   is the most wrapper-like value seen among C, the *change cut* the most change-like value seen
   among W: beyond its cut a value was only ever seen with one truth; between the cuts it is neutral.
   When W and C do not overlap, both cuts sit halfway between them. The *full* points are W's and C's
   medians (never inside the cuts). The anchor's weight is its separating power, ``2 AUC − 1``
   (0 when the statistic does not separate). A statistic with fewer than two findings of either truth
   keeps the starting rule's anchor with weight 0.
   **Noise.** A side is kept only when its truth's median lies beyond the other truth's bootstrap
   intervals (at the rule's ``level``): the change side needs C's median beyond the farthest
   change-ward end of W's intervals, the wrapper side W's median beyond the farthest wrapper-ward end
   of C's. A side that fails points nowhere (the anchor's ``sides``): a gap that sampling noise alone
   could close is not evidence. (Pruning's change side, fitted on a 0.009 gap inside intervals
   0.02–0.2 wide, pointed to change on three held-out wrappers before this step.)
   **What the test can show.** A side the statistic's analyzer does not declare in its
   :attr:`~capwrap.analyzers.Analyzer.shows` is switched off too: pruning and patching are
   sufficient tests of a wrapper, and their failure to restore the capability shows nothing (the
   noise step alone let pruning's change side back in on the seventh session's records).
3. **Thresholds, per question.** With those anchors and weights, the wrapper and change score
   thresholds are chosen on a grid (0 to 0.6, step 0.025) to maximize the calibration accuracy of
   the whole rule (confidence fallback included), never allowing a ``wrapper`` verdict on a removed
   scenario or a ``capability_change`` verdict on a wrapper scenario; among equally accurate
   choices, each threshold goes as far as it can from both the calibration scores and a score of
   0 (evidence that balances: it must stay ``inconclusive``), the nearer side first — in effect
   halfway between 0 and the nearest calibration interval on its side (:func:`_margins`; a verdict
   needs the whole interval beyond its threshold, so the interval's end nearest to 0 counts). A
   functional analyzer must point the verdict's way (``functional_support="agree"``;
   leave-one-scenario-out on the calibration half preferred it to ``not_against``, see
   ``_SUPPORT_MODES``).
4. **Kind weights.** Steps 2–3 are run for each structural weight of :data:`KIND_WEIGHT_GRID` and the
   starting rule's (the functional kind's weight stays the starting rule's, 1 in the shipped rule:
   the score is a weighted mean, so only the ratio counts). The weight whose rule is right most often
   on the calibration findings wins; among equally accurate weights, the one whose fit predicts
   left-out scenarios best (leave-one-scenario-out, as :func:`cross_validate`, with the weight held);
   among those, the one nearest the starting rule's (the lower of two equally near).
   Every candidate's two accuracies are kept in the rule's provenance (``kind_weight_fit``).

:func:`sensitivity` perturbs each number of a rule by ±20% (a score threshold at 0 by one grid step,
since ±20% of 0 is 0) and counts the verdicts that flip.

Examples:
    >>> import numpy as np
    >>> anchor = fit_anchor(np.array([0.9, 0.95, 1.0]), np.array([0.1, 0.3, 0.5]), None)
    >>> anchor.wrapper_cut, anchor.change_cut, anchor.weight
    (0.7, 0.7, 1.0)
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from capwrap.analyzers.bootstrap import percentile_interval
from capwrap.diagnosis.rule import Anchor, Finding, QuestionRule, VerdictRule, decide, declared_directions, default_rule
from capwrap.errors import ConfigError
from capwrap.validation.results import ValidationResult, auc
from capwrap.validation.runner import findings_from_record
from capwrap.validation.scenarios import is_scored, record_truth, scenario_of

__all__ = ["KIND_WEIGHT_GRID", "PROCEDURE", "cross_validate", "fit_anchor", "fit_rule", "sensitivity"]

PROCEDURE = (
    "anchors: cuts at the most extreme value seen with the other truth (halfway when the truths do not overlap), "
    "full points at each truth's median, weight 2*AUC-1; a side is kept only when its truth's median lies beyond "
    "the other truth's bootstrap intervals; thresholds: grid 0..0.6 step 0.025 maximizing calibration "
    "accuracy with no wrapper verdict on a removed scenario and no capability_change verdict on a wrapper scenario, "
    "ties broken by each threshold's distance to the calibration intervals and to a score of 0, the nearer side first; "
    "structural kind weight from a grid by calibration accuracy, then leave-one-scenario-out accuracy, then "
    "nearness to the starting weight"
)
_GRID = np.round(np.arange(0.0, 0.6001, 0.025), 4)
#: What the functional evidence must say, as the fit chooses it. Only ``agree``: on the calibration
#: half, leaving one scenario out at a time, a fit that could also choose ``not_against`` predicted
#: the left-out scenario right 92.7% of the time, one that keeps ``agree`` 95.1% (records of
#: 2026-12-02; see benchmarks/RESULTS.md).
_SUPPORT_MODES: tuple[str, ...] = ("agree",)
#: The structural kind's weights the fit chooses among, besides the starting rule's (step 4).
KIND_WEIGHT_GRID: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


def fit_anchor(
    wrapper: np.ndarray,
    change: np.ndarray,
    fallback: Anchor | None,
    tolerance: float = 0.0,
    wrapper_intervals: np.ndarray | None = None,
    change_intervals: np.ndarray | None = None,
) -> Anchor:
    """The anchor of one statistic from its values on wrapper-truth and change-truth findings.

    Args:
        wrapper: the statistic on findings whose truth is ``wrapper``.
        change: the statistic on findings whose truth is ``capability_change``.
        fallback: the anchor kept (with weight 0) when either side has fewer than two findings.
        tolerance: the share of the other truth's findings a cut may leave beyond it (0: the cut is
            the most extreme value seen with the other truth; 0.2: its 80th percentile).
        wrapper_intervals: ``[n, 2]`` bootstrap intervals (low, high) of ``wrapper``'s values; None:
            no sampling noise. A side is kept only beyond the other truth's intervals (module docstring).
        change_intervals: the same for ``change``.

    Examples:
        >>> noisy = np.array([[0.0, 0.2], [0.1, 0.3], [0.2, 0.4]])
        >>> fit_anchor(np.array([0.1, 0.2, 0.3]), np.array([0.05, 0.06, 0.07]), None,
        ...            wrapper_intervals=noisy).sides
        'wrapper'
    """
    w, c = np.asarray(wrapper, dtype=float), np.asarray(change, dtype=float)
    w_int = _intervals(w, wrapper_intervals)
    c_int = _intervals(c, change_intervals)
    keep_w, keep_c = np.isfinite(w), np.isfinite(c)
    w, c, w_int, c_int = w[keep_w], c[keep_c], w_int[keep_w], c_int[keep_c]
    if len(w) < 2 or len(c) < 2:
        base = fallback or Anchor(1.0, 1.0, 0.0, 0.0)
        return dataclasses.replace(base, weight=0.0)
    flip = 1.0 if np.median(w) >= np.median(c) else -1.0
    w, c = flip * w, flip * c
    # in the flipped frame (wrapper = large values): how far each truth's intervals reach towards the other
    w_reach = float(np.quantile(np.minimum(flip * w_int[:, 0], flip * w_int[:, 1]), tolerance))
    c_reach = float(np.quantile(np.maximum(flip * c_int[:, 0], flip * c_int[:, 1]), 1 - tolerance))
    kept = [side for side, keep in (("wrapper", np.median(w) > c_reach), ("change", np.median(c) < w_reach)) if keep]
    top_c, bottom_w = float(np.quantile(c, 1 - tolerance)), float(np.quantile(w, tolerance))
    if top_c < bottom_w:
        cut_w = cut_c = (top_c + bottom_w) / 2
    else:
        cut_w, cut_c = top_c, bottom_w
    # strength 1 at the side's median; where the median sits at the cut, at the side's extreme
    full_w = float(np.median(w)) if np.median(w) > cut_w else max(float(w.max()), cut_w)
    full_c = float(np.median(c)) if np.median(c) < cut_c else min(float(c.min()), cut_c)
    weight = max(0.0, 2 * auc(w, c) - 1) if kept else 0.0  # no side beyond the noise: the statistic points nowhere
    return Anchor(flip * cut_w, flip * full_w, flip * cut_c, flip * full_c, weight=round(weight, 4)).restricted_to(kept)


def _declared(statistic: str, anchor: Anchor) -> Anchor:
    """``anchor`` pointing only in the directions its analyzer's test can establish
    (:attr:`Analyzer.shows <capwrap.analyzers.base.Analyzer.shows>`), whatever its weight; no side
    left: sides ``none`` and weight 0."""
    narrowed = anchor.restricted_to(declared_directions(statistic))
    return dataclasses.replace(narrowed, weight=0.0) if narrowed.sides == "none" else narrowed


def _intervals(values: np.ndarray, intervals: np.ndarray | None) -> np.ndarray:
    """``[n, 2]`` intervals, each value's own point where none (or a non-finite end) is given."""
    point = np.stack([values, values], axis=1)
    if intervals is None:
        return point
    given = np.asarray(intervals, dtype=float).reshape(len(values), 2)
    return np.where(np.isfinite(given), given, point)


def _values(records: Sequence[dict[str, Any]], rule: VerdictRule) -> dict[str, dict[str, list[tuple[float, ...]]]]:
    """statistic -> truth side (``wrapper`` / ``change``) -> (value, interval low, interval high) per
    finding; the interval is the bootstrap's at the rule's level (NaN ends without replicates)."""
    out: dict[str, dict[str, list[tuple[float, ...]]]] = {}
    for record in records:
        truth = record_truth(record, rule)
        for e in record["evidence"]:
            if (
                e["statistic"] is None
                or e["value"] is None
                or truth[e["question"]] not in ("wrapper", "capability_change")
            ):
                continue
            side = "wrapper" if truth[e["question"]] == "wrapper" else "change"
            replicates = np.array([math.nan if r is None else r for r in e.get("replicates") or []], dtype=float)
            interval = percentile_interval(replicates, rule.level)
            out.setdefault(e["statistic"], {"wrapper": [], "change": []})[side].append((float(e["value"]), *interval))
    return out


def fit_rule(
    records: Sequence[dict[str, Any]],
    start: VerdictRule | None = None,
    command: str = "",
    kind_weights: Sequence[float] | None = KIND_WEIGHT_GRID,
) -> VerdictRule:
    """Fit anchors, weights and thresholds on ``records`` (see the module docstring).

    Args:
        records: calibration records (:func:`~capwrap.validation.runner.load_records`).
        start: the rule whose question definitions (gates, level) are kept, and whose anchors stand
            in for statistics without enough findings (default: the shipped rule).
        command: the command that produced the fit (kept in the rule's provenance).
        kind_weights: the structural kind's weights to choose among besides ``start``'s (step 4);
            ``None`` or empty, or records without structural evidence: keep ``start``'s.

    Raises:
        ConfigError: ``records`` are not records, hold held-out scenarios, or have no finding whose
            truth is ``wrapper`` or none whose truth is ``capability_change``.
    """
    start = start or default_rule()
    _check_fittable(records, start)
    if any(w <= 0 for w in kind_weights or ()):
        raise ValueError(f"kind weights must be positive, got {list(kind_weights or ())}")
    if not kind_weights or not any(e.get("kind") == "structural" for r in records for e in r["evidence"]):
        rule = _fit_with_weights(records, start)  # no structural evidence: its weight cannot matter
        return dataclasses.replace(rule, provenance=_provenance(records, rule, command, None))
    candidates = []
    for weight in sorted({*kind_weights, start.kind_weights["structural"]}):
        weighted = dataclasses.replace(start, kind_weights={**start.kind_weights, "structural": float(weight)})
        rule = _fit_with_weights(records, weighted)
        candidates.append({"structural": float(weight), "calibration_accuracy": _accuracy(records, rule),
                           "loo_accuracy": None, "start": weighted, "rule": rule})  # fmt: skip

    def nearest_start(candidate: dict[str, Any]) -> float:
        return abs(candidate["structural"] - start.kind_weights["structural"])

    best = max(c["calibration_accuracy"] for c in candidates)
    if math.isnan(best):  # nothing scored: no weight can be told from another, the start's stays
        chosen = min(candidates, key=nearest_start)["rule"]
        return dataclasses.replace(chosen, provenance=_provenance(records, chosen, command, None))
    tied = [c for c in candidates if c["calibration_accuracy"] >= best - 1e-12]
    if len(tied) > 1 and len(records) > 1:
        for c in tied:
            rows = cross_validate(records, c["start"], kind_weights=None)
            c["loo_accuracy"] = float((rows["truth"] == rows["verdict"]).mean()) if len(rows) else math.nan
        best_loo = max(-1.0 if math.isnan(c["loo_accuracy"]) else c["loo_accuracy"] for c in tied)
        tied = [c for c in tied if c["loo_accuracy"] >= best_loo - 1e-12] or tied  # (NaN: never best)
    chosen = min(tied, key=nearest_start)["rule"]
    table = [{k: (_round(v) if isinstance(v, float) else v) for k, v in c.items() if k not in ("start", "rule")}
             for c in candidates]  # fmt: skip
    return dataclasses.replace(chosen, provenance=_provenance(records, chosen, command, table))


def _check_fittable(records: Any, start: VerdictRule, per_truth: int = 1) -> None:
    """Raise a clear error for records a rule should not be fitted on: not records, held-out ones
    (fitting on them would make the held-out half calibration data), or fewer than ``per_truth``
    scenarios whose truth is ``wrapper`` or ``capability_change`` (none: nothing to place a cut
    between; leave-one-scenario-out needs two, so that every fold keeps one)."""
    if isinstance(records, (str, bytes, os.PathLike)) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(
            "records must be a list of validation records: load them with "
            "capwrap.validation.load_records(OUT, capwrap.validation.scenarios('calibration'))"
        )
    held = sorted(r["scenario"]["name"] for r in records if r.get("scenario", {}).get("split") == "held-out")
    if held:
        raise ConfigError(
            f"{len(held)} of the records are of held-out scenarios ({', '.join(held[:2])}{', ...' if len(held) > 2 else ''}): "
            "a rule fitted on them would turn the held-out half into calibration data, and its held-out accuracy "
            "would measure nothing. Fit on the calibration half (capwrap validate --split calibration --fit RULE)"
        )
    holders: dict[str, set[str]] = {"wrapper": set(), "capability_change": set()}
    for r in records:
        for truth in record_truth(r, start).values():
            holders.get(truth, set()).add(r["scenario"]["name"])
    if missing := [t for t, names in holders.items() if not names]:
        raise ConfigError(
            f"nothing to fit: no finding of the {len(records)} records has the truth {' or '.join(missing)}, so no cut "
            "can be placed between the truths; fit on records with both (the calibration half: --split calibration)"
        )
    if lone := [t for t, names in holders.items() if len(names) < per_truth]:
        raise ConfigError(
            f"leave-one-scenario-out needs at least {per_truth} scenarios with each truth; {' and '.join(lone)} has "
            "fewer: cross-validate on a suite with more (the calibration half)"
        )


def _fit_with_weights(records: Sequence[dict[str, Any]], start: VerdictRule) -> VerdictRule:
    """Steps 2 and 3 (anchors, then thresholds) with ``start``'s kind weights."""
    values = _values(records, start)
    anchors = dict(start.anchors)
    for statistic, sides in values.items():
        w, c = (np.array(sides[side], dtype=float).reshape(-1, 3) for side in ("wrapper", "change"))
        anchors[statistic] = _declared(
            statistic,
            fit_anchor(w[:, 0], c[:, 0], start.anchors.get(statistic), wrapper_intervals=w[:, 1:], change_intervals=c[:, 1:]),
        )
    rule = dataclasses.replace(start, anchors=anchors)
    for question in ("deletion", "creation"):
        rule = _fit_thresholds(records, rule, question)
    return rule


def _round(value: float) -> float | None:
    """``value`` to 4 places for the rule's JSON (``None`` for NaN, which JSON lacks)."""
    return round(value, 4) if math.isfinite(value) else None


def _accuracy(records: Sequence[dict[str, Any]], rule: VerdictRule) -> float:
    result = ValidationResult.from_records(records, rule)
    return float(result.accuracy) if len(result.scored) else math.nan


def _provenance(
    records: Sequence[dict[str, Any]], rule: VerdictRule, command: str, kind_weight_fit: list[dict[str, Any]] | None
) -> dict[str, Any]:
    result = ValidationResult.from_records(records, rule)
    values = _values(records, rule)
    return {
        "fitted": True,
        "command": command,
        "date": datetime.date.today().isoformat(),
        "procedure": PROCEDURE,
        "records": len(records),
        "scored_findings": int(len(result.scored)),
        "calibration_accuracy": round(result.accuracy, 4),
        "kind_weight_fit": kind_weight_fit,
        "scenarios": sorted({r["scenario"]["name"] for r in records}),
        "findings_per_statistic": {k: {s: len(v) for s, v in d.items()} for k, d in values.items()},
        "software": _software(records),
    }


def _software(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The distinct library versions the records were made with (records written before the seventh
    session carry none)."""
    keys = ("capwrap", "transformer_lens", "transformers", "torch", "python")
    found = {tuple((k, str(r["environment"].get(k))) for k in keys) for r in records if "environment" in r}
    return [dict(versions) for versions in sorted(found)]


def _fit_thresholds(records: Sequence[dict[str, Any]], rule: VerdictRule, question: str) -> VerdictRule:
    """The question's thresholds by grid search (see the module docstring); findings are weighed once,
    then each candidate only re-decides them (:func:`~capwrap.diagnosis.rule.decide`)."""
    cases = []
    for record in records:
        scenario = scenario_of(record)
        truth = record_truth(record, rule)[question]
        if truth == "unknown":  # (not weighed for nothing: the fit weighs every record once per candidate rule)
            continue
        finding = findings_from_record(record, rule)[question]
        if is_scored(scenario.kind, truth, bool(finding.support.get("gated"))):
            cases.append((scenario.kind, truth, finding))
    if not cases:
        return rule
    ends = np.array([_end_nearest_zero(f) for _, t, f in cases if t in ("wrapper", "capability_change")])
    best: tuple[tuple[float, ...], QuestionRule] | None = None
    for mode, tw, tc in itertools.product(_SUPPORT_MODES, _GRID, _GRID):
        thresholds = QuestionRule(float(tw), float(tc), mode)
        verdicts = [decide(thresholds, f) for _, _, f in cases]
        right = np.mean([v == t for v, (_, t, _) in zip(verdicts, cases, strict=True)])
        bad = sum((k == "removed" and v == "wrapper") or (t == "wrapper" and v == "capability_change")
                  for v, (k, t, _) in zip(verdicts, cases, strict=True))  # fmt: skip
        key = (float(right) - 10.0 * bad, float(mode == "agree"), *_margins(ends, float(tw), float(tc)))
        if best is None or key > best[0]:
            best = (key, thresholds)
    assert best is not None
    chosen = best[1]
    for side, threshold, near in (("wrapper", chosen.wrapper_threshold, ends[ends > 0]),
                                  ("change", chosen.change_threshold, -ends[ends < 0])):  # fmt: skip
        if threshold == 0 and len(near) and near.min() < _GRID[1]:
            warnings.warn(
                f"the {question} {side} threshold is 0: a calibration finding's interval ends at "
                f"{near.min():.3g}, within one grid step ({_GRID[1]:g}) of 0, so no margin around a score of 0 "
                f"fits and the sign of a score near 0 decides; more or longer evaluation sets narrow the intervals",
                stacklevel=3,
            )
    return dataclasses.replace(rule, **{question: chosen})


def _end_nearest_zero(finding: Finding) -> float:
    """What a threshold must stay clear of for ``finding``: a verdict needs the score's whole interval
    beyond the threshold, so the interval's end nearest to 0 (the score itself when that is nearer,
    or when the interval is unknown; 0 when the interval straddles 0)."""
    lo, hi = finding.interval
    if finding.score > 0:
        return max(min(finding.score, lo) if math.isfinite(lo) else finding.score, 0.0)
    return min(max(finding.score, hi) if math.isfinite(hi) else finding.score, 0.0)


def _margins(ends: np.ndarray, wrapper_threshold: float, change_threshold: float) -> tuple[float, float]:
    """How far each threshold lies from what it must separate — the calibration findings on its side
    (:func:`_end_nearest_zero`: positive ends for the wrapper threshold, negative ones for the change
    threshold), and a score of 0 (evidence that balances, which must stay ``inconclusive``): (the
    smaller of the two sides' margins, their sum). Maximizing the first, then the second, puts each
    threshold halfway between 0 and the nearest calibration interval on its side; without the 0, the
    farthest thresholds from every score would be 0 and 0 — a dead zone of width 0, where a score
    of +0.001 or -0.001 decides. A side without any calibration finding gets the grid's largest
    threshold: a verdict the calibration half never showed needs the strongest evidence.

    Examples:
        >>> _margins(np.array([0.4, -0.2]), 0.2, 0.1)
        (0.1, 0.30000000000000004)
    """
    wrapper_side, change_side = ends[ends > 0], -ends[ends < 0]
    wrapper = min(wrapper_threshold, float(np.abs(wrapper_side - wrapper_threshold).min())) if len(wrapper_side) else wrapper_threshold
    change = min(change_threshold, float(np.abs(change_side - change_threshold).min())) if len(change_side) else change_threshold
    return min(wrapper, change), wrapper + change


def _perturbations(rule: VerdictRule) -> list[tuple[str, str, VerdictRule]]:
    """(number, how it was moved, the rule with it moved) for every number of the rule that can change
    a verdict — thresholds, anchor points, gates and weights: each ×0.8 and ×1.2; an anchor point is
    kept within its neighbours so the anchor stays ordered. A score threshold at 0 is moved by one step of the fit's grid instead (×1.2 of 0 is 0:
    the perturbation would test nothing where a score closest to a flip lies)."""
    out = []
    for stat, anchor in rule.anchors.items():
        order = ["change_full", "change_cut", "wrapper_cut", "wrapper_full"]
        points = [getattr(anchor, f) for f in order]
        pointing = _declared(stat, anchor)
        for i, name in enumerate(order):
            if not pointing.points_to(name.split("_")[0]):
                continue  # the points of a side the statistic does not point to change nothing
            for factor in (0.8, 1.2):
                value = points[i] * factor
                lo_n = points[i - 1] if i > 0 else -math.inf
                hi_n = points[i + 1] if i < 3 else math.inf
                if points[0] > points[-1]:  # a descending anchor
                    lo_n, hi_n = (points[i + 1] if i < 3 else -math.inf), (points[i - 1] if i > 0 else math.inf)
                value = min(max(value, lo_n), hi_n)
                variant = dataclasses.replace(anchor, **{name: value})
                out.append((f"{stat}.{name}", f"x{factor:g}", dataclasses.replace(rule, anchors={**rule.anchors, stat: variant})))
    for question in ("deletion", "creation"):
        thresholds = rule.thresholds(question)
        for name in ("wrapper_threshold", "change_threshold"):
            value = getattr(thresholds, name)
            moves = {f"x{f:g}": min(1.0, value * f) for f in (0.8, 1.2)} if value else {f"+{_GRID[1]:g}": float(_GRID[1])}
            for how, moved in moves.items():
                out.append((f"{question}.{name}", how,
                            dataclasses.replace(rule, **{question: dataclasses.replace(thresholds, **{name: moved})})))  # fmt: skip
    for name in ("kept_fraction", "min_gain"):
        value = getattr(rule, name)
        out += [(name, f"x{f:g}", dataclasses.replace(rule, **{name: min(1.0, value * f)})) for f in (0.8, 1.2)]
    # the weights: the structural kind's against the functional one's (the score is a weighted mean, so
    # only their ratio matters; step 4 of the fit chose it) and each anchor's (at most 1: a weight of
    # 1 is moved down only, which is every other anchor's x1.25)
    structural = rule.kind_weights["structural"]
    out += [("kind_weights.structural", f"x{f:g}", dataclasses.replace(rule, kind_weights={**rule.kind_weights,
             "structural": structural * f})) for f in (0.8, 1.2)]  # fmt: skip
    for stat, anchor in rule.anchors.items():
        for f in (0.8, 1.2):
            if 0 < anchor.weight * f <= 1:
                variant = dataclasses.replace(anchor, weight=anchor.weight * f)
                out.append((f"{stat}.weight", f"x{f:g}", dataclasses.replace(rule, anchors={**rule.anchors, stat: variant})))
    return out


def cross_validate(
    records: Sequence[dict[str, Any]],
    start: VerdictRule | None = None,
    kind_weights: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Leave-one-scenario-out cross-validation of the fit: for each scenario, fit the rule on the
    other records and score the left-out one's findings. How often the fitted procedure is right on
    a scenario it did not see — on the calibration half, an estimate of the held-out accuracy.

    Args:
        records: calibration records.
        start: the starting rule of every fold's fit.
        kind_weights: the structural weights each fold's fit chooses among; default ``None``: each
            fold keeps ``start``'s (choosing it needs a leave-one-out of its own inside each fold,
            which costs as many fits again per candidate).

    Returns:
        One row per scored finding of the left-out scenarios: ``name``, ``question``, ``truth``,
        ``verdict`` (``(rows.truth == rows.verdict).mean()`` is the cross-validated accuracy).

    Raises:
        ConfigError: some truth (``wrapper``, ``capability_change``) is held by one scenario only,
            so the fold that leaves it out has nothing to fit (or the records cannot be fitted at all).
    """
    start = start or default_rule()
    _check_fittable(records, start, per_truth=2)
    rows = []
    for i, record in enumerate(records):
        rule = fit_rule([r for j, r in enumerate(records) if j != i], start, kind_weights=kind_weights)
        scored = ValidationResult.from_records([record], rule).scored
        rows += scored[["name", "question", "truth", "verdict"]].to_dict(orient="records")
    return pd.DataFrame(rows, columns=["name", "question", "truth", "verdict"])


def sensitivity(records: Sequence[dict[str, Any]], rule: VerdictRule) -> pd.DataFrame:
    """For every number of ``rule``, ×0.8 and ×1.2 (a score threshold at 0: one grid step up), how many
    verdicts of ``records`` flip, and which.

    Returns:
        One row per perturbation: ``number`` (e.g. ``deletion.change_threshold``), ``perturbation``
        (``x0.8``, ``x1.2`` or ``+0.025``), ``flips`` and ``flipped`` (which verdicts, from -> to).
    """
    base = ValidationResult.from_records(records, rule).rows.set_index(["name", "question"])["verdict"]
    rows = []
    for name, how, variant in _perturbations(rule):
        verdicts = ValidationResult.from_records(records, variant).rows.set_index(["name", "question"])["verdict"]
        flipped = verdicts[verdicts != base]
        rows.append({"number": name, "perturbation": how, "flips": len(flipped),
                     "flipped": ", ".join(f"{n} ({q}): {base[(n, q)]} -> {v}" for (n, q), v in flipped.items())})  # fmt: skip
    return pd.DataFrame(rows, columns=["number", "perturbation", "flips", "flipped"])
