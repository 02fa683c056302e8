"""The verdict rule: anchors, judging, weighing with its boundaries, gates, confidence, files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from capwrap.analyzers import Evidence
from capwrap.diagnosis import Anchor, QuestionRule, VerdictRule, default_rule, gates
from capwrap.errors import ConfigError

ANCHOR = Anchor(wrapper_cut=0.8, wrapper_full=1.0, change_cut=0.4, change_full=0.0)
RULE = VerdictRule(
    anchors={"f": ANCHOR, "g": ANCHOR, "s": Anchor(-1.0, -2.0, -0.5, 0.0)},
    deletion=QuestionRule(wrapper_threshold=0.3, change_threshold=0.3),
    creation=QuestionRule(wrapper_threshold=0.3, change_threshold=0.3),
)


def _ev(name, value, statistic="f", kind="functional", question="deletion", spread=0.0, n=200):
    reps = np.full(n, value) + np.linspace(-spread, spread, n)
    return RULE.judge(Evidence(name, {}, pd.DataFrame(), kind=kind, question=question, statistic=statistic,
                               value=value, replicates=reps, summary=f"{name} measured {value}"))  # fmt: skip


@pytest.mark.parametrize(
    "value, signed",
    [(1.2, 1.0), (1.0, 1.0), (0.9, 0.5), (0.8, 0.0), (0.6, 0.0), (0.4, 0.0), (0.2, -0.5), (0.0, -1.0), (-3, -1.0)],
)
def test_anchor_maps_values_to_signed_strengths(value, signed):
    assert ANCHOR.signed(value) == pytest.approx(signed)


def test_a_descending_anchor_reads_small_values_as_wrapper():
    low = Anchor(wrapper_cut=-1.0, wrapper_full=-2.0, change_cut=-0.5, change_full=0.0)
    assert not low.higher_is_wrapper
    assert low.signed(-1.5) == pytest.approx(0.5) and low.signed(-0.25) == pytest.approx(-0.5)
    assert low.signed(-0.75) == 0.0 and low.signed(float("nan")) == 0.0


def test_anchors_refuse_disorder_and_bad_weights():
    with pytest.raises(ConfigError, match="ordered"):
        Anchor(wrapper_cut=0.2, wrapper_full=1.0, change_cut=0.4, change_full=0.0)
    with pytest.raises(ConfigError, match="weight"):
        Anchor(0.8, 1.0, 0.4, 0.0, weight=1.5)


def test_a_one_sided_anchor_points_only_its_way_and_says_why():
    wrapper_only = Anchor(0.8, 1.0, 0.4, 0.0, sides="wrapper")
    assert wrapper_only.signed(0.9) == pytest.approx(0.5) and wrapper_only.signed(0.0) == 0.0
    change_only = Anchor(0.8, 1.0, 0.4, 0.0, sides="change")
    assert change_only.signed(1.0) == 0.0 and change_only.signed(0.2) == pytest.approx(-0.5)
    rule = VerdictRule(anchors={"f": wrapper_only})
    ev = rule.judge(Evidence("pruning", {}, pd.DataFrame(), kind="functional", question="deletion", statistic="f",
                             value=0.1, replicates=np.full(20, 0.1), summary="pruning measured 0.1"))  # fmt: skip
    assert (ev.direction, ev.strength) == ("neutral", 0.0)
    assert "not beyond the wrapper cut 0.8" in ev.reasons[0] and "only points to a wrapper" in ev.reasons[0]
    # a rule file written before anchors had sides reads as two-sided; a bad value is refused
    data = rule.to_dict()
    assert data["anchors"]["f"]["sides"] == "wrapper"
    del data["anchors"]["f"]["sides"]
    assert VerdictRule.from_dict(data).anchors["f"].sides == "both"
    with pytest.raises(ConfigError, match="sides"):
        Anchor(0.8, 1.0, 0.4, 0.0, sides="neither")


def test_judge_honours_the_directions_an_analyzer_declares():
    """A hand-written rule may give pruning's statistic two sides; pruning's test cannot show a change
    (``Pruning.shows``), so its low value stays neutral, counts for nothing in the score, and says why."""
    both = Anchor(0.8, 1.0, 0.4, 0.0)
    two_sided = VerdictRule(anchors={"pruning_recovered_share": both, "revival_speedup_log2": both},
                            deletion=QuestionRule(0.1, 0.1))  # fmt: skip
    ev = two_sided.judge(Evidence("pruning", {}, pd.DataFrame(), kind="functional", question="deletion",
                                  statistic="pruning_recovered_share", value=0.0, replicates=np.full(20, 0.0),
                                  summary="pruning measured 0"))  # fmt: skip
    assert (ev.direction, ev.strength) == ("neutral", 0.0)
    assert "only points to a wrapper: its analyzer's test cannot show a change" in ev.reasons[0]
    finding = two_sided.weigh("deletion", [ev])
    assert finding.verdict == "inconclusive" and finding.score == 0.0 and finding.interval == (0.0, 0.0)
    # the same value of a statistic whose analyzer can show both directions points to a change
    ev = two_sided.judge(dataclasses.replace(ev, statistic="revival_speedup_log2", analyzer="revival"))
    assert (ev.direction, ev.strength) == ("change", 1.0)
    nowhere = VerdictRule(anchors={"f": Anchor(0.8, 1.0, 0.4, 0.0, weight=0.0, sides="none")})
    ev = nowhere.judge(Evidence("x", {}, pd.DataFrame(), kind="functional", question="deletion", statistic="f",
                                value=0.0, replicates=np.full(20, 0.0), summary="x measured 0"))  # fmt: skip
    assert ev.direction == "neutral" and "points nowhere" in ev.reasons[0] and "sampling noise" in ev.reasons[0]


def test_a_statistic_that_can_point_nowhere_does_not_dilute_the_score():
    """A hand-written rule gives pruning's statistic only a change side, with weight 1; pruning
    declares it can show only a wrapper, so the anchor points nowhere: it weighs 0, and revival's
    wrapper evidence alone decides the score (before, it was halved)."""
    rule = VerdictRule(anchors={"pruning_recovered_share": Anchor(0.8, 1.0, 0.4, 0.0, sides="change"),
                                "revival_speedup_log2": Anchor(0.8, 1.0, 0.4, 0.0)},
                       deletion=QuestionRule(0.1, 0.1))  # fmt: skip
    evidence = [rule.judge(Evidence(name, {}, pd.DataFrame(), kind="functional", question="deletion",
                                    statistic=statistic, value=1.0, replicates=np.full(20, 1.0)))
                for name, statistic in (("pruning", "pruning_recovered_share"), ("revival", "revival_speedup_log2"))]  # fmt: skip
    assert [rule.weight(e) for e in evidence] == [0.0, 1.0]
    finding = rule.weigh("deletion", evidence)
    assert finding.score == pytest.approx(1.0) and finding.verdict == "wrapper"


def test_judge_sets_direction_strength_and_cites_the_cut():
    ev = _ev("probing", 0.9)
    assert (ev.direction, ev.strength) == ("wrapper", pytest.approx(0.5))
    assert "probing measured 0.9" in ev.reasons[0] and "wrapper cut 0.8" in ev.reasons[0]
    assert _ev("probing", 0.6).direction == "neutral"
    nan = _ev("probing", float("nan"))
    assert nan.direction == "neutral" and not nan.applicable and nan.reasons == ["probing measured nan"]
    unknown = _ev("x", 0.9, statistic="nobody")
    assert unknown.direction == "neutral" and "no anchor" in unknown.reasons[0]


def test_the_score_is_the_weighted_mean_and_decides_at_the_threshold():
    # functional weight 1, structural 0.5: (1 * 0.5 + 0.5 * 0) / 1.5 = 0.333 >= 0.3
    evidence = [_ev("a", 0.9), _ev("b", -1.0, statistic="s", kind="structural")]
    assert evidence[1].direction == "neutral" and evidence[1].applicable  # -1.0 sits at the wrapper cut
    finding = RULE.weigh("deletion", evidence)
    assert finding.score == pytest.approx(0.5 / 1.5)
    assert finding.verdict == "wrapper" and finding.confidence == 1.0
    # just under the threshold: inconclusive, saying so
    under = RULE.weigh("deletion", [_ev("a", 0.88), _ev("b", -1.0, statistic="s", kind="structural")])
    assert under.score < 0.3 and under.verdict == "inconclusive" and "does not reach a threshold" in under.reasons[0]


def test_a_change_needs_functional_support_and_a_low_enough_score():
    finding = RULE.weigh("deletion", [_ev("a", 0.1), _ev("b", 0.2)])
    assert finding.verdict == "capability_change" and finding.score == pytest.approx(-0.625)
    structural_only = RULE.weigh("deletion", [_ev("w", 0.0, statistic="s", kind="structural")])
    assert structural_only.verdict == "inconclusive" and "no functional analyzer" in structural_only.reasons[0]
    # the structural evidence carries the score past the change threshold, but no functional analyzer
    # points to a change: inconclusive, and the reason says exactly that
    silent = RULE.weigh("deletion", [_ev("a", 0.6), _ev("w", 0.0, statistic="s", kind="structural")])
    assert silent.score == pytest.approx(-0.5 / 1.5) and silent.verdict == "inconclusive"
    assert "points to a change" in silent.reasons[0] and "no functional analyzer does" in silent.reasons[0]
    against = RULE.weigh("deletion", [_ev("a", 0.81), *[_ev(w, 0.0, statistic="s", kind="structural") for w in "vw"]])
    assert against.verdict == "inconclusive" and "a points the other way" in against.reasons[0]
    # a rule that only asks the functional evidence not to object names the objection instead
    lenient = dataclasses.replace(RULE, deletion=QuestionRule(0.3, 0.3, "not_against"))
    objected = lenient.weigh("deletion", [_ev("a", 0.35), *[_ev(w, -2.0, statistic="s", kind="structural") for w in "uvw"]])
    assert objected.score >= 0.3 and objected.verdict == "inconclusive"
    assert "points to a wrapper" in objected.reasons[0] and objected.reasons[0].endswith("but a points the other way")


def test_disagreeing_functional_evidence_is_inconclusive():
    finding = RULE.weigh("deletion", [_ev("a", 1.0), _ev("b", 0.0)])
    assert finding.verdict == "inconclusive" and "disagrees" in finding.reasons[0]


def test_an_interval_straddling_the_threshold_falls_back_to_inconclusive():
    # point score 0.5 (>= 0.3), but the replicates spread from 0.0 to 1.0
    wide = RULE.weigh("deletion", [_ev("a", 0.9, spread=0.15)])
    assert wide.score == pytest.approx(0.5) and wide.interval[0] < 0.3
    assert wide.verdict == "inconclusive" and "interval reaches below the wrapper threshold" in wide.reasons[0]
    # the confidence is the inconclusive finding's: the share of replicates that are inconclusive
    # themselves, not the share that reach the wrapper verdict turned down (which the reason gives)
    leaning = int(wide.reasons[0].split("; ")[1].split("%")[0])
    assert 0 < wide.confidence < 0.5 < leaning / 100
    assert wide.confidence == pytest.approx(1 - leaning / 100, abs=0.01)  # no replicate reaches a change here
    narrow = RULE.weigh("deletion", [_ev("a", 0.9, spread=0.01)])
    assert narrow.verdict == "wrapper"


def test_gates_come_first_and_questions_stay_apart():
    gate = "fine-tuning kept the capability"
    finding = RULE.weigh("deletion", [_ev("a", 1.0), _ev("c", 0.0, question="creation")], gate=gate)
    assert finding.verdict == "inconclusive" and finding.reasons[0] == gate
    assert [e.analyzer for e in finding.evidence] == ["a"]  # creation evidence is not weighed here


@pytest.mark.parametrize(
    "tuned_capability, tuned_downstream, deletion, creation",
    [
        (0.95, 0.9, "kept the capability", None),
        (0.85, 0.9, None, None),  # below 90% of 1.0: lost
        (0.5, 0.25, None, "gained"),  # +15% < 20%
    ],
)
def test_gate_boundaries(tuned_capability, tuned_downstream, deletion, creation):
    acc = {"base": {"capability": 1.0, "downstream": 0.1},
           "tuned": {"capability": tuned_capability, "downstream": tuned_downstream}}  # fmt: skip
    g = gates(RULE, acc, floor=0.5)
    assert (g["deletion"] is None) == (deletion is None) and (deletion is None or deletion in g["deletion"])
    assert (g["creation"] is None) == (creation is None) and (creation is None or creation in g["creation"])
    assert (
        "barely has"
        in gates(RULE, {"base": {"capability": 0.3, "downstream": 0.1}, "tuned": acc["tuned"]}, 0.5)["deletion"]
    )


def test_rules_round_trip_through_json_and_refuse_garbage(tmp_path):
    path = tmp_path / "rule.json"
    RULE.save(path)
    assert VerdictRule.load(path) == RULE
    data = json.loads(path.read_text())
    data["surprise"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unknown VerdictRule fields"):
        VerdictRule.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        VerdictRule.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        VerdictRule.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="kept_fraction"):
        VerdictRule(kept_fraction=0.0)


def test_the_shipped_rule_is_fitted_and_covers_every_statistic():
    from capwrap.diagnosis.run import default_analyzers

    rule = default_rule()
    statistics = {type(a).statistic for a in default_analyzers()}
    assert statistics <= set(rule.anchors)
    assert rule.provenance.get("fitted") is True and "capwrap validate" in rule.provenance.get("command", "")
