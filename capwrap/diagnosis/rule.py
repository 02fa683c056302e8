"""The verdict rule: every threshold and weight of :func:`capwrap.diagnose` in one dataclass.

How evidence becomes a verdict, for each of the two questions (``deletion``: is a capability that
seems lost hidden or gone? ``creation``: is a behaviour that seems new genuine, or a wrapper?):

1. **Gates.** Deletion: the base must have the capability (accuracy at least the task's
   ``capability_floor``) and the tuned model must have lost some of it (below ``kept_fraction`` of
   the base's accuracy); otherwise there is nothing to explain and the finding is ``inconclusive``.
   Creation: the tuned model must have gained at least ``min_gain`` accuracy on the downstream task.
2. **Strengths.** Each analyzer measures one statistic (e.g. Probing: the share of the base's
   above-floor probe accuracy that the tuned model keeps). Its :class:`Anchor` turns the statistic
   into a *signed strength* in [-1, 1]: beyond ``wrapper_cut`` it points to a wrapper, beyond
   ``change_cut`` to a change, in between it is neutral (0); the strength grows linearly from 0 at
   the cut to 1 at ``wrapper_full`` / ``change_full``. The cuts are where, on the calibration
   suite, the statistic stops being seen on the other side's scenarios, and the "full" points are
   the typical (median) value of the side's scenarios, so **a strength means the same thing for every
   analyzer: how far the statistic lies beyond the values seen on scenarios of the other truth,
   relative to where typical scenarios of its own truth lie.**
   A statistic whose side did not stand out from the other truth's scenarios by more than its own
   sampling noise on the calibration suite points only the other way (the anchor's ``sides``).
3. **Score.** The weighted mean of the applicable analyzers' signed strengths; an analyzer's weight
   is its kind's weight (functional evidence counts fully, structural evidence, which says where the
   model changed rather than what it can do, counts ``kind_weights["structural"]``) times its
   anchor's ``weight`` (its separating power on the calibration suite).
4. **Verdict.** ``wrapper`` when the score reaches the question's ``wrapper_threshold`` and at least
   one functional analyzer points to a wrapper; ``capability_change`` when the score reaches
   ``-change_threshold`` and a functional analyzer points to a change; else ``inconclusive``.
5. **Confidence.** The score is recomputed on every bootstrap replicate of the analyzers'
   statistics; when its ``level`` interval straddles the threshold that decided the verdict, the
   finding falls back to ``inconclusive`` and says so. The confidence is the share of replicates
   that reach the verdict reported — after a fall-back, the share that reach ``inconclusive`` (the
   reason gives the share that reach the verdict turned down).

The fitted rule ships as ``capwrap/assets/verdict_rule.json`` (:func:`default_rule`); how it is fitted
is in :mod:`capwrap.validation.fit`, which a user can rerun on a suite of their own.

Examples:
    >>> anchor = Anchor(wrapper_cut=0.8, wrapper_full=1.0, change_cut=0.4, change_full=0.0)
    >>> [round(anchor.signed(x), 2) for x in (1.0, 0.9, 0.6, 0.2, 0.0)]
    [1.0, 0.5, 0.0, -0.5, -1.0]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from capwrap.analyzers.bootstrap import check_n_boot
from capwrap.errors import ConfigError, check_fields
from capwrap.files import write_text_atomic

if TYPE_CHECKING:
    from capwrap.analyzers.base import Evidence, Question

__all__ = ["Anchor", "Finding", "QuestionRule", "Verdict", "VerdictRule", "decide", "default_rule", "RULE_FILE"]

Verdict = Literal["wrapper", "capability_change", "inconclusive"]
#: Where the fitted rule ships.
RULE_FILE = resources.files("capwrap") / "assets" / "verdict_rule.json"


@dataclass(frozen=True)
class Anchor:
    """How one statistic becomes a signed strength (see the module docstring).

    The side whose ``*_full`` is larger is the side of large values. The four points must be
    ordered: ``change_full <= change_cut <= wrapper_cut <= wrapper_full`` (or the reverse).

    Args:
        wrapper_cut: beyond it (towards ``wrapper_full``) the statistic points to a wrapper.
        wrapper_full: where the wrapper strength reaches 1.
        change_cut: beyond it (towards ``change_full``) the statistic points to a change.
        change_full: where the change strength reaches 1.
        weight: the statistic's separating power on the calibration suite (``2 AUC - 1``, in [0, 1]).
        sides: the directions the statistic may point: ``both``; only ``wrapper`` or ``change``
            when, on the calibration suite, the other side was not separated from the opposite truth
            by more than the statistic's sampling noise, or the statistic's analyzer declares that
            its test cannot show it (:attr:`Analyzer.shows <capwrap.analyzers.base.Analyzer.shows>`);
            ``none`` when neither side is left (the points are kept, for the record).

    Examples:
        >>> one_sided = Anchor(0.12, 0.2, 0.028, 0.019, sides="wrapper")
        >>> one_sided.signed(0.0), one_sided.signed(0.2)
        (0.0, 1.0)
    """

    wrapper_cut: float
    wrapper_full: float
    change_cut: float
    change_full: float
    weight: float = 1.0
    sides: Literal["both", "wrapper", "change", "none"] = "both"

    def __post_init__(self) -> None:
        points = [self.change_full, self.change_cut, self.wrapper_cut, self.wrapper_full]
        if not all(math.isfinite(p) for p in points):
            raise ConfigError(f"anchor points must be finite, got {points}")
        if points != sorted(points) and points != sorted(points, reverse=True):
            raise ConfigError(
                f"anchor points must be ordered change_full <= change_cut <= wrapper_cut <= wrapper_full "
                f"(or the reverse), got {points}"
            )
        if not 0 <= self.weight <= 1:
            raise ConfigError(f"an anchor's weight must be in [0, 1], got {self.weight}")
        if self.sides not in ("both", "wrapper", "change", "none"):
            raise ConfigError(f"an anchor's sides must be 'both', 'wrapper', 'change' or 'none', got {self.sides!r}")

    def points_to(self, direction: str) -> bool:
        """Whether the statistic may point to ``direction`` (``wrapper`` or ``change``)."""
        return self.sides in ("both", direction)

    @property
    def directions(self) -> frozenset[str]:
        """The directions the statistic may point (``sides`` as a set)."""
        return frozenset(d for d in ("wrapper", "change") if self.points_to(d))

    def restricted_to(self, directions: Iterable[str]) -> Anchor:
        """This anchor pointing only in ``directions`` as well (e.g. an analyzer's ``shows``).

        Examples:
            >>> Anchor(0.8, 1.0, 0.4, 0.0).restricted_to(["wrapper"]).sides
            'wrapper'
            >>> Anchor(0.8, 1.0, 0.4, 0.0, sides="change").restricted_to(["wrapper"]).sides
            'none'
        """
        kept = self.directions & set(directions)
        sides = "both" if len(kept) == 2 else next(iter(kept)) if kept else "none"
        return self if sides == self.sides else dataclasses.replace(self, sides=sides)

    @property
    def higher_is_wrapper(self) -> bool:
        """Whether large values of the statistic point to a wrapper."""
        return self.wrapper_full > self.change_full or (
            self.wrapper_full == self.change_full and self.wrapper_cut >= self.change_cut
        )

    def signed(self, value: float) -> float:
        """The signed strength of one value (+: wrapper, -: change, 0: neutral or NaN)."""
        return float(self.signed_array(np.asarray([value], dtype=np.float64))[0])

    def signed_array(self, values: np.ndarray) -> np.ndarray:
        """:meth:`signed` of many values (NaN gives 0)."""
        x = np.asarray(values, dtype=np.float64)
        flip = 1.0 if self.higher_is_wrapper else -1.0
        x, wc, wf, cc, cf = (
            flip * v for v in (x, self.wrapper_cut, self.wrapper_full, self.change_cut, self.change_full)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            up = np.where(wf > wc, (x - wc) / (wf - wc), 1.0)
            down = np.where(cc > cf, (cc - x) / (cc - cf), 1.0)
        wrapper = np.where(x > wc, np.clip(up, 0, 1), 0.0) * self.points_to("wrapper")
        out = wrapper - np.where(x < cc, np.clip(down, 0, 1), 0.0) * self.points_to("change")
        return np.where(np.isfinite(x), out, 0.0)

    def cut_for(self, direction: str) -> float:
        """The cut a value passed to point in ``direction``."""
        return self.wrapper_cut if direction == "wrapper" else self.change_cut


@dataclass(frozen=True)
class QuestionRule:
    """The score thresholds of one question, and what the functional evidence must say.

    Args:
        wrapper_threshold: the score a ``wrapper`` verdict needs.
        change_threshold: ``-change_threshold`` is the score a ``capability_change`` verdict needs.
        functional_support: ``agree``: a functional analyzer must point the verdict's way;
            ``not_against``: no functional analyzer may point the other way (when the functional
            evidence is silent, the score decides).
    """

    wrapper_threshold: float = 0.2
    change_threshold: float = 0.2
    functional_support: Literal["agree", "not_against"] = "agree"

    def __post_init__(self) -> None:
        if self.functional_support not in ("agree", "not_against"):
            raise ConfigError(f"functional_support must be 'agree' or 'not_against', got {self.functional_support!r}")
        if not (0 <= self.wrapper_threshold <= 1 and 0 <= self.change_threshold <= 1):
            raise ConfigError(
                f"score thresholds must be in [0, 1], got {self.wrapper_threshold} and {self.change_threshold}"
            )


@dataclass
class Finding:
    """The answer to one question.

    Attributes:
        question: ``deletion`` or ``creation``.
        verdict: ``wrapper``, ``capability_change`` or ``inconclusive``.
        score: the weighted mean signed strength, in [-1, 1] (+ = wrapper).
        interval: the score's bootstrap interval.
        confidence: share of bootstrap replicates that reach :attr:`verdict` (1 for a gated question or
            one no functional analyzer measured: nothing is resampled).
        reasons: why, in sentences that cite numbers (the verdict's first).
        evidence: the evidence about this question.
    """

    question: Question
    verdict: Verdict
    score: float
    interval: tuple[float, float]
    confidence: float
    reasons: list[str]
    evidence: list[Evidence] = field(default_factory=list)
    #: ``gated``: nothing to explain; ``wrapper`` / ``change``: a weighted functional analyzer points
    #: that way (what :func:`decide` needs besides the score).
    support: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (the evidence by name)."""
        return {
            "question": self.question, "verdict": self.verdict, "score": _round(self.score),
            "interval": [_round(v) for v in self.interval], "confidence": _round(self.confidence),
            "reasons": list(self.reasons), "analyzers": [e.analyzer for e in self.evidence],
        }  # fmt: skip


def decide(thresholds: QuestionRule, finding: Finding) -> Verdict:
    """The verdict ``finding``'s score, interval and support reach under ``thresholds`` (what
    :meth:`VerdictRule.weigh` decides; refitting thresholds calls this instead of weighing again)."""
    if finding.support.get("gated", False) or not finding.support.get("functional", False):
        return "inconclusive"
    raw = _raw_verdict(thresholds, finding.score, finding.support["wrapper"], finding.support["change"])
    lo, hi = finding.interval
    if raw == "wrapper" and lo < thresholds.wrapper_threshold:
        return "inconclusive"
    if raw == "capability_change" and hi > -thresholds.change_threshold:
        return "inconclusive"
    return raw


def _raw_verdict(thresholds: QuestionRule, score: float, wrapper_support: bool, change_support: bool) -> Verdict:
    if thresholds.functional_support == "agree":
        wrapper_ok, change_ok = wrapper_support, change_support
    else:
        wrapper_ok, change_ok = not change_support, not wrapper_support
    reached = _score_reaches(thresholds, score)
    if reached == "wrapper" and wrapper_ok:
        return "wrapper"
    if reached == "change" and change_ok:
        return "capability_change"
    return "inconclusive"


def _score_reaches(thresholds: QuestionRule, score: float) -> Literal["wrapper", "change"] | None:
    """The side whose threshold ``score`` reaches, whatever the functional evidence says."""
    if score >= thresholds.wrapper_threshold and score > 0:
        return "wrapper"
    if score <= -thresholds.change_threshold and score < 0:
        return "change"
    return None


def _they_point(analyzers: Sequence[str]) -> str:
    """``probing points`` / ``probing, pruning point``: the analyzers as the subject of "point"."""
    return f"{', '.join(analyzers)} point{'s' if len(analyzers) == 1 else ''}"


def _backing(functional: list[Evidence], what: str, evidence: Sequence[Evidence]) -> str:
    """Which analyzers the verdict rests on, in words."""
    if functional:
        return f"{_they_point([e.analyzer for e in functional])} to {what}"
    structural = [e.analyzer for e in evidence if e.kind == "structural" and e.direction != "neutral"]
    return f"the functional evidence is silent and {_they_point(structural or ['the structural evidence'])} to {what}"


def declared_directions(statistic: str) -> frozenset[str]:
    """The directions the analyzer measuring ``statistic`` declares it can show (both when no
    analyzer class measures it): what :meth:`VerdictRule.judge` and the fit restrict anchors to."""
    from capwrap.analyzers import analyzer_of  # the package: every built-in analyzer is registered

    cls = analyzer_of(statistic)
    return frozenset(("wrapper", "change") if cls is None else cls.shows)


def _round(value: float) -> float | None:
    return round(float(value), 4) if math.isfinite(value) else None


@dataclass(frozen=True)
class VerdictRule:
    """Every threshold and weight of the verdict (see the module docstring).

    Args:
        anchors: statistic name -> :class:`Anchor`.
        deletion: score thresholds of the deletion question.
        creation: score thresholds of the creation question.
        kind_weights: weight of ``functional`` and ``structural`` evidence.
        kept_fraction: the tuned model kept the capability when its accuracy is at least this share
            of the base's (nothing was lost: the deletion finding is ``inconclusive``).
        min_gain: the tuned model learned something new when its downstream accuracy exceeds the
            base's by at least this (otherwise the creation finding is ``inconclusive``).
        level: coverage of the score interval that decides the fallback to ``inconclusive``.
        provenance: where the numbers come from (command, suite, date, calibration accuracy).
    """

    anchors: dict[str, Anchor] = field(default_factory=dict)
    deletion: QuestionRule = field(default_factory=QuestionRule)
    creation: QuestionRule = field(default_factory=QuestionRule)
    kind_weights: dict[str, float] = field(default_factory=lambda: {"functional": 1.0, "structural": 0.5})
    kept_fraction: float = 0.9
    min_gain: float = 0.2
    level: float = 0.9
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if set(self.kind_weights) != {"functional", "structural"} or min(self.kind_weights.values()) < 0:
            raise ConfigError(f"kind_weights needs non-negative 'functional' and 'structural', got {self.kind_weights}")
        if not 0 < self.kept_fraction <= 1 or not 0 <= self.min_gain <= 1 or not 0 < self.level < 1:
            raise ConfigError("kept_fraction must be in (0, 1], min_gain in [0, 1] and level in (0, 1)")

    def thresholds(self, question: Question) -> QuestionRule:
        """The score thresholds of ``question``."""
        return self.deletion if question == "deletion" else self.creation

    # ---- judging one analyzer's evidence -------------------------------------------------------
    def judge(self, evidence: Evidence) -> Evidence:
        """Set ``evidence``'s direction, strength and reasons from its statistic (in place; returned)."""
        if evidence.statistic is None:  # an analyzer that judges itself
            if not evidence.reasons and evidence.summary:
                evidence.reasons = [evidence.summary]
            return evidence
        summary = evidence.summary or f"{evidence.statistic} = {evidence.value:.3g}"
        if not evidence.applicable:
            evidence.direction, evidence.strength, evidence.reasons = "neutral", 0.0, [summary]
            return evidence
        anchor = self._declared_anchor(evidence.statistic)
        if anchor is None:
            evidence.direction, evidence.strength = "neutral", 0.0
            evidence.reasons = [f"{summary}; this rule has no anchor for {evidence.statistic!r} (refit it on a suite)"]
            return evidence
        declared = declared_directions(evidence.statistic)
        signed = anchor.signed(evidence.value)
        evidence.direction = "wrapper" if signed > 0 else "change" if signed < 0 else "neutral"
        evidence.strength = abs(signed)
        lo, hi = evidence.intervals.get("value", (math.nan, math.nan))
        measured = f"{evidence.statistic} {evidence.value:.3g}" + (
            f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else ""
        )
        if evidence.direction == "neutral" and anchor.sides != "both":
            why_not = "; ".join(
                f"its analyzer's test cannot show a {side} (it declares shows={tuple(sorted(declared))})"
                if side not in declared else
                f"on the calibration suite its {side} side lay within its sampling noise"
                for side in ("wrapper", "change") if not anchor.points_to(side)
            )  # fmt: skip
            if anchor.sides == "none":
                judged = f"{measured}: neutral (this statistic points nowhere: {why_not})"
            else:
                side = anchor.sides
                judged = (f"{measured} is not beyond the {side} cut {anchor.cut_for(side):.3g}: neutral "
                          f"(this statistic only points to a {side}: {why_not})")  # fmt: skip
        elif evidence.direction == "neutral":
            judged = f"{measured} lies between the cuts ({anchor.change_cut:.3g} change, {anchor.wrapper_cut:.3g} wrapper): neutral"
        else:
            judged = (
                f"{measured} is beyond the {evidence.direction} cut {anchor.cut_for(evidence.direction):.3g}: "
                f"{evidence.direction} ({evidence.strength:.2f})"
            )
        evidence.reasons = [f"{summary}; {judged}"]
        return evidence

    def weight(self, evidence: Evidence) -> float:
        """The evidence's weight in the score: 0 when not applicable, without an anchor, or when its
        anchor, restricted to the directions the analyzer declares, points nowhere (a statistic that
        can never point anywhere must not dilute the score, whatever weight a hand-written rule gives it)."""
        if not evidence.applicable:
            return 0.0
        if evidence.statistic is None:
            return self.kind_weights[evidence.kind]
        anchor = self._declared_anchor(evidence.statistic)
        if anchor is None or anchor.sides == "none":
            return 0.0
        return self.kind_weights[evidence.kind] * anchor.weight

    def _declared_anchor(self, statistic: str | None) -> Anchor | None:
        """The anchor of ``statistic``, restricted to the directions its analyzer declares it can
        show (``None`` when the rule has none): the one anchor judging, weighing and the bootstrap use."""
        anchor = self.anchors.get(statistic) if statistic is not None else None
        return None if anchor is None else anchor.restricted_to(declared_directions(statistic))

    def _signed_replicates(self, evidence: Evidence, n: int) -> np.ndarray:
        point = evidence.signed_strength
        anchor = self._declared_anchor(evidence.statistic)
        reps = evidence.replicates
        if anchor is None or len(reps) == 0:
            return np.full(n, point)
        reps = np.resize(reps, n)  # analyzers with fewer replicates (seeds) repeat them
        signed = anchor.signed_array(reps)
        return np.where(np.isfinite(reps), signed, point)

    # ---- weighing the evidence of one question ---------------------------------------------------
    def weigh(
        self, question: Question, evidence: Sequence[Evidence], gate: str | None = None, n_boot: int = 200
    ) -> Finding:
        """The finding of ``question`` from its evidence. ``gate``: a reason there is nothing to explain
        (the finding is then ``inconclusive``, with that reason first)."""
        n_boot = check_n_boot(n_boot, self.level)
        evidence = [e for e in evidence if e.question == question]
        detail = [f"{e.analyzer}: {r}" for e in evidence for r in e.reasons]
        weights = np.array([self.weight(e) for e in evidence])
        total = float(weights.sum())
        point = (
            float(sum(w * e.signed_strength for w, e in zip(weights, evidence, strict=True)) / total) if total else 0.0
        )
        if total:
            reps = np.stack([self._signed_replicates(e, n_boot) for e in evidence])  # [analyzer, replicate]
            score_reps = (weights[:, None] * reps).sum(0) / total
        else:
            score_reps = np.zeros(n_boot)
        tail = (1 - self.level) / 2 * 100
        interval = (float(np.percentile(score_reps, tail)), float(np.percentile(score_reps, 100 - tail)))
        functional = [e for e in evidence if e.kind == "functional" and self.weight(e) > 0]
        support = {d: [e for e in functional if e.direction == d] for d in ("wrapper", "change")}
        flags = {"gated": gate is not None, "functional": bool(functional), "wrapper": bool(support["wrapper"]),
                 "change": bool(support["change"])}  # fmt: skip

        def finding(verdict: Verdict, confidence: float, head: str) -> Finding:
            return Finding(question, verdict, point, interval, confidence, [head, *detail], list(evidence), flags)

        if gate is not None:
            return finding("inconclusive", 1.0, gate)
        if not functional:
            return finding(
                "inconclusive",
                1.0,
                "no functional analyzer could measure this pair, and structural evidence alone cannot tell",
            )
        rule = self.thresholds(question)
        verdict = _raw_verdict(rule, point, flags["wrapper"], flags["change"])
        raw = [_raw_verdict(rule, s, flags["wrapper"], flags["change"]) for s in score_reps]
        confidence = float(np.mean([v == verdict for v in raw]))
        names = lambda es: _they_point([e.analyzer for e in es])  # noqa: E731
        span = f"score {point:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]"
        # a verdict the interval turns down: the confidence is that of the inconclusive finding reported
        undecided = float(np.mean([v == "inconclusive" for v in raw]))
        if verdict == "wrapper":
            if interval[0] < rule.wrapper_threshold:
                return finding("inconclusive", undecided,
                               f"inconclusive: the evidence leans towards a wrapper ({span}; {confidence:.0%} of the "
                               f"replicates reach it) but its {self.level:.0%} interval reaches below the wrapper "
                               f"threshold {rule.wrapper_threshold:+.2f}")  # fmt: skip
            return finding("wrapper", confidence, f"wrapper ({span}, confidence {confidence:.0%}): "
                           + _backing(support["wrapper"], "a wrapper", evidence))  # fmt: skip
        if verdict == "capability_change":
            if interval[1] > -rule.change_threshold:
                return finding("inconclusive", undecided,
                               f"inconclusive: the evidence leans towards a change ({span}; {confidence:.0%} of the "
                               f"replicates reach it) but its {self.level:.0%} interval reaches above the change "
                               f"threshold {-rule.change_threshold:+.2f}")  # fmt: skip
            return finding("capability_change", confidence, f"capability change ({span}, confidence {confidence:.0%}): "
                           + _backing(support["change"], "a change", evidence))  # fmt: skip
        reached = _score_reaches(rule, point)
        if support["wrapper"] and support["change"]:
            why = (f"the functional evidence disagrees: {names(support['wrapper'])} to a wrapper, "
                   f"{names(support['change'])} to a change ({span})")  # fmt: skip
        elif reached is not None and not support[reached]:
            other = support["change" if reached == "wrapper" else "wrapper"]
            why = f"the score points to {'a wrapper' if reached == 'wrapper' else 'a change'} ({span}) but " + (
                "no functional analyzer does, and the verdict needs one" + (f"; {names(other)} the other way" if other else "")
                if rule.functional_support == "agree" else f"{names(other)} the other way")  # fmt: skip
        elif not (support["wrapper"] or support["change"]):
            why = f"no functional analyzer points either way ({span})"
        else:
            why = f"the evidence does not reach a threshold ({span}; wrapper at {rule.wrapper_threshold:+.2f}, change at {-rule.change_threshold:+.2f})"
        return finding("inconclusive", confidence, f"inconclusive: {why}")

    # ---- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (what :meth:`from_dict` reads)."""
        data = dataclasses.asdict(self)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerdictRule:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: a field is unknown or a value invalid.
        """
        check_fields(cls, data)
        try:
            data = dict(data)
            anchors = data.get("anchors", {})
            for anchor in anchors.values():
                check_fields(Anchor, anchor)
            data["anchors"] = {k: Anchor(**v) for k, v in anchors.items()}
            for q in ("deletion", "creation"):
                if q in data:
                    check_fields(QuestionRule, data[q])
                    data[q] = QuestionRule(**data[q])
            return cls(**data)
        except (TypeError, AttributeError) as err:
            raise ConfigError(f"not a VerdictRule: {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the rule as JSON (atomically)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> VerdictRule:
        """Read a rule written by :meth:`save`.

        Raises:
            ConfigError: the file is missing, not JSON, or not a rule.
        """
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except OSError as err:
            raise ConfigError(f"cannot read the verdict rule {path}: {err.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"the verdict rule {path} is not JSON ({err.msg} at line {err.lineno})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"the verdict rule {path}: {err}") from None


_DEFAULT: VerdictRule | None = None


def default_rule() -> VerdictRule:
    """The fitted rule that ships with capwrap (``capwrap/assets/verdict_rule.json``)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = VerdictRule.load(str(RULE_FILE))
    return _DEFAULT
