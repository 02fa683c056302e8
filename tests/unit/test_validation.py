"""The validation suite's registry, truths, fit, results and runner bookkeeping (no model runs here;
tests/acceptance/test_validation_suite.py runs named scenarios end to end)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capwrap.cli import main
from capwrap.diagnosis import Anchor, VerdictRule
from capwrap.diagnosis.rule import Finding, decide
from capwrap.errors import CapwrapError, ConfigError
from capwrap.files import write_json_atomic
from capwrap.validation import (
    SUITE,
    ValidationResult,
    fit_anchor,
    fit_rule,
    load_records,
    run_suite,
    scenario,
    scenarios,
    sensitivity,
)
from capwrap.validation.fit import KIND_WEIGHT_GRID
from capwrap.validation.runner import record_path


def test_the_suite_is_big_enough_and_splits_by_seed_and_family():
    assert len(SUITE) >= 40 and len({s.name for s in SUITE}) == len(SUITE)
    cal, held = scenarios("calibration"), scenarios("held-out")
    assert {s.seed for s in cal}.isdisjoint({s.seed for s in held})
    tasks = lambda ss: {(s.base, s.capability, s.downstream) for s in ss if s.kind == "wrapper"}  # noqa: E731
    assert tasks(cal).isdisjoint(tasks(held))  # held-out wrappers use other families, operands or bases
    for split in (cal, held):
        kinds = {s.kind for s in split}
        assert kinds == {"wrapper", "removed", "genuine", "kept", "unknown"}
        assert {s.recipe.optimizer for s in split if s.kind == "wrapper"} == {"adamw", "sgd"}
        assert {s.recipe.reinit for s in split if s.kind == "removed"} >= {"blocks"}
    assert any(s.family == "tracr-counter" for s in cal) and any(s.family == "tracr-max" for s in held)
    # the rule is fitted on wrapper scenarios of both PCFG task families and of a Tracr program, and the
    # held-out half has such scenarios too
    for split in (cal, held):
        assert {s.family for s in split if s.kind == "wrapper"} >= {"pcfg-count", "pcfg-index", "tracr-counter"}
    assert any(s.recipe.method == "npo" for s in SUITE) and any(s.recipe.method == "gradient_ascent" for s in SUITE)


def test_truth_follows_the_kind_and_the_gates():
    wrapper = scenario("cal/count-b/adamw-small-c1/s1")
    assert wrapper.truth({"deletion": None, "creation": None}) == {"deletion": "wrapper", "creation": "wrapper"}
    assert wrapper.truth({"deletion": "kept", "creation": None})["deletion"] == "inconclusive"
    removed = scenario("cal/removed-count-a/reinit-blocks/s3")
    assert removed.truth({"deletion": None, "creation": None}) == {
        "deletion": "capability_change",
        "creation": "unknown",
    }
    unknown = scenario("cal/unlearn/npo/s4")
    assert set(unknown.truth({"deletion": None, "creation": None}).values()) == {"unknown"}
    assert scenario(wrapper.name).key() == wrapper.key() != removed.key()


def test_a_removed_capability_is_fine_tuned_where_the_correlation_never_holds():
    """A removed scenario's fine-tune has C_Tr = 0, so its labels carry nothing of the capability and
    cannot teach it back (with C_Tr = 1, three re-initialized held-out models relearned it as their
    downstream answer's latent); its downstream task, which diagnose evaluates and the never-had-it
    control learns, is the family's C_Tr = 1 task, as the wrappers'."""
    from capwrap.tasks.spec import parse_spec

    removed = scenarios("all", kinds=["removed"])
    assert {s.base.split("-")[0] for s in removed} == {"pcfg", "tracr"} and len(removed) >= 10
    for s in removed:
        tune, down = parse_spec(s.recipe.task), parse_spec(s.downstream)
        assert tune.pop("correlation") == "0" and down.pop("correlation") == "1", s.name
        assert tune == down, s.name  # the same task otherwise: operand, source, offset
    wrapper = scenario("cal/count-b/adamw-small-c1/s1")
    assert parse_spec(wrapper.recipe.task)["correlation"] == "1"


def test_every_scenarios_never_had_it_control_ships_with_its_runs():
    """The shipped cache holds the control of every scenario, under the key the runner computes (a
    spec field added later must not change it: the controls were retrained on every run while the
    key included ``features``), and nothing else."""
    from capwrap.tasks.spec import task_from_spec
    from capwrap.validation.bases import SUITE_ASSETS, load_base
    from capwrap.validation.build import control_key
    from capwrap.validation.runner import CONTROL_STEPS

    bases: dict = {}
    needed = set()
    for s in scenarios("all"):
        base = bases.setdefault(s.base, load_base(s.base))
        needed.add(control_key(base.spec, task_from_spec(s.downstream, model=base), CONTROL_STEPS, 0))
    shipped = SUITE_ASSETS / "cache" / "controls"
    assert {folder.name for folder in shipped.iterdir()} == needed
    assert all((shipped / key / "model.safetensors").is_file() for key in needed)


def test_selecting_scenarios():
    assert [s.name for s in scenarios("all", ["cal/kept/*"])] == ["cal/kept/noop/s4", "cal/kept/tiny/s4"]
    assert {s.kind for s in scenarios("held-out", kinds=["removed"])} == {"removed"}
    with pytest.raises(ConfigError, match="closest"):
        scenario("cal/count-b/adamw-smal-c1/s1")
    with pytest.raises(ConfigError, match="unknown split"):
        scenarios("train")


def test_fit_anchor_puts_cuts_where_the_other_truth_stops():
    # overlapping: wrapper values reach down to 0.5, change values up to 0.6
    anchor = fit_anchor(np.array([0.5, 0.9, 0.95, 1.0]), np.array([0.0, 0.1, 0.2, 0.6]), None)
    assert (anchor.wrapper_cut, anchor.change_cut) == (0.6, 0.5)
    assert anchor.wrapper_full == pytest.approx(0.925) and anchor.change_full == pytest.approx(0.15)
    assert anchor.weight == pytest.approx(2 * (15 / 16) - 1)
    # a statistic where small values mean wrapper
    low = fit_anchor(np.array([-2.0, -1.5]), np.array([0.0, -0.2]), None)
    assert not low.higher_is_wrapper and low.signed(-1.8) > 0 and low.signed(0.0) < 0
    # too few findings: the fallback anchor, with no weight
    assert fit_anchor(np.array([1.0]), np.array([0.0, 0.1]), Anchor(0.8, 1.0, 0.4, 0.0)).weight == 0.0


def test_fit_anchor_keeps_only_sides_that_stand_out_from_the_sampling_noise():
    wrapper, change = np.array([0.03, 0.1, 0.2, 0.3]), np.array([0.0, 0.02, 0.025, 0.03])
    # without noise, the change side (median 0.0225) lies beyond every wrapper value
    assert fit_anchor(wrapper, change, None).sides == "both"
    # the lowest wrapper value's interval reaches down to 0.01, past the change median: change side dropped
    noisy = np.array([[0.01, 0.05], [0.08, 0.12], [0.18, 0.22], [0.28, 0.32]])
    anchor = fit_anchor(wrapper, change, None, wrapper_intervals=noisy)
    assert anchor.sides == "wrapper" and anchor.weight > 0
    assert anchor.signed(0.0) == 0.0 and anchor.signed(0.3) == 1.0
    # mirrored for a statistic whose small values mean wrapper; NaN interval ends fall back to the value
    mirrored = fit_anchor(-wrapper, -change, None, wrapper_intervals=-noisy[:, ::-1])
    assert mirrored.sides == "wrapper" and not mirrored.higher_is_wrapper
    assert fit_anchor(wrapper, change, None, wrapper_intervals=np.full((4, 2), np.nan)).sides == "both"
    # when noise swallows both sides the statistic does not separate: no weight
    both = fit_anchor(np.array([0.4, 0.5, 0.6]), np.array([0.3, 0.35, 0.45]), None,
                      wrapper_intervals=np.array([[0.0, 1.0]] * 3), change_intervals=np.array([[0.0, 1.0]] * 3))  # fmt: skip
    assert both.weight == 0.0


def _record(name, values, accuracy):
    s = scenario(name)
    evidence = [{"analyzer": a, "question": q, "kind": "functional", "statistic": stat, "value": v,
                 "replicates": [v] * 20, "summary": f"{a} = {v}", "direction": "neutral", "strength": 0.0, "headline": {}}
                for a, q, stat, v in values]  # fmt: skip
    return {"scenario": s.to_dict(), "accuracy": accuracy, "capability_floor": 0.5, "evidence": evidence,
            "n_boot": 20, "findings": {}, "seconds": {}}  # fmt: skip


LOST = {"base": {"capability": 1.0, "downstream": 0.0, "downstream_free": 0.2},
        "tuned": {"capability": 0.4, "downstream": 0.9, "downstream_free": 0.1}}  # fmt: skip
KEPT = {"base": {"capability": 1.0, "downstream": 0.0}, "tuned": {"capability": 1.0, "downstream": 0.0}}


@pytest.fixture
def records():
    wrappers = [f"cal/count-b/adamw-{s}-c{c}/s1" for s in ("small", "medium") for c in ("1", "0.8")]
    removed = [f"cal/removed-count-a/{w}/s3" for w in ("reinit-blocks", "reinit-blocks-small", "retrained", "retrained-small")]
    out = [_record(n, [("probing", "deletion", "probe_kept_share", 0.9 + 0.02 * i),
                       ("generalization", "creation", "gain_without_correlation", -0.1 + 0.05 * i)], LOST)
           for i, n in enumerate(wrappers)]  # fmt: skip
    out += [
        _record(n, [("probing", "deletion", "probe_kept_share", 0.1 + 0.1 * i)], LOST) for i, n in enumerate(removed)
    ]
    genuine = ["cal/count-b/adamw-large-c0/s1", "cal/count-b/adamw-medium-c0/s1"]
    out += [_record(n, [("generalization", "creation", "gain_without_correlation", 0.8 + 0.1 * i)], LOST)
            for i, n in enumerate(genuine)]  # fmt: skip
    out.append(_record("cal/kept/noop/s4", [("probing", "deletion", "probe_kept_share", 1.0)], KEPT))
    return out


def test_fit_rule_separates_a_separable_suite_and_records_its_provenance(records):
    rule = fit_rule(records, start=VerdictRule(), command="capwrap validate --split calibration --fit rule.json")
    probe = rule.anchors["probe_kept_share"]
    assert probe.wrapper_cut == probe.change_cut == pytest.approx((0.4 + 0.9) / 2) and probe.weight == 1.0
    result = ValidationResult.from_records(records, rule)
    assert result.accuracy == 1.0 and result.targets()["wrapper_on_removed"] == 0
    assert result.confusion().loc["wrapper", "wrapper"] == 8  # 4 scenarios x 2 questions
    assert result.confusion().loc["capability_change", "capability_change"] == 6  # 4 removed + 2 genuine
    assert rule.provenance["fitted"] and rule.provenance["calibration_accuracy"] == 1.0
    assert "capwrap validate" in rule.provenance["command"]
    data = result.to_dict()
    assert {"name", "question", "truth", "verdict", "score"} <= set(data["scenarios"][0])
    table = result.analyzers().set_index("analyzer")
    assert table.loc["probing", "auc"] == 1.0 and table.loc["probing", "accuracy"] == 1.0


def test_the_accuracy_per_family_and_base_counts_wrong_directions(records):
    rule = fit_rule(records, start=VerdictRule())
    records[0]["evidence"][0]["value"] = 0.1  # a wrapper whose probes read like a removed capability's
    records[0]["evidence"][0]["replicates"] = [0.1] * 20
    result = ValidationResult.from_records(records, rule)
    families = result.families()
    assert families[["family", "base"]].values.tolist() == [["pcfg-count", "pcfg-a"]]  # the fixture's one group
    row = families.iloc[0]
    assert (row["scenarios"], row["findings"], row["right"]) == (11, len(result.scored), len(result.scored) - 1)
    assert row["wrong_direction"] == 1 and row["accuracy_low"] < row["accuracy"] < 1.0
    assert result.to_dict()["families"][0]["wrong_direction"] == 1 and "wrong_direction" in result.summary_text()


def test_the_suites_figures_carry_intervals_over_whole_scenarios(records):
    """Both questions of a scenario are resampled together; a miss widens the accuracy's interval
    below the point, and the same records give the same interval in any order."""
    rule = fit_rule(records, start=VerdictRule())
    perfect = ValidationResult.from_records(records, rule)
    assert perfect.accuracy_interval == (1.0, 1.0)
    pairs = perfect.scored[perfect.scored["name"].duplicated(keep=False)].reset_index(drop=True)  # both questions
    partner = [pairs.index[(pairs["name"] == n) & (pairs.index != i)][0] for i, n in enumerate(pairs["name"])]

    def split_pairs(at):  # 1 when some scenario's two rows were drawn a different number of times
        counts = np.bincount(at, minlength=len(pairs))
        return float((counts != counts[partner]).any())

    assert perfect.interval(pairs, split_pairs) == (0.0, 0.0)
    records[0]["evidence"][0] |= {"value": 0.0, "replicates": [0.0] * 20}  # one wrapper now reads as a loss
    missed = ValidationResult.from_records(records, rule)
    lo, hi = missed.targets()["accuracy_interval"]
    assert lo < missed.accuracy < 1.0 and hi == 1.0
    assert missed.accuracy_interval == ValidationResult.from_records(records[::-1], rule).accuracy_interval
    probing = missed.analyzers().set_index("analyzer").loc["probing"]
    assert probing["accuracy_low"] < probing["accuracy"] <= probing["accuracy_high"] == 1.0
    assert probing["auc_low"] < probing["auc"] <= probing["auc_high"]
    assert "accuracy_interval" in missed.to_dict()["targets"]


def test_the_analyzer_table_counts_wrong_directions_on_each_truth(records):
    rule = fit_rule(records, start=VerdictRule())
    wrapper, removed = records[0], records[4]
    assert wrapper["scenario"]["kind"] == "wrapper" and removed["scenario"]["kind"] == "removed"
    wrapper["evidence"][0] |= {"value": 0.0, "replicates": [0.0] * 20}  # probing reads a loss on a wrapper
    table = ValidationResult.from_records(records, rule).analyzers().set_index("analyzer")
    assert table.loc["probing", ["wrong_on_wrapper", "wrong_on_change"]].tolist() == [1, 0]
    removed["evidence"][0] |= {"value": 1.0, "replicates": [1.0] * 20}  # and keeps it on a removed capability
    table = ValidationResult.from_records(records, rule).analyzers().set_index("analyzer")
    assert table.loc["probing", ["wrong_on_wrapper", "wrong_on_change"]].tolist() == [1, 1]
    assert table.loc["generalization", ["wrong_on_wrapper", "wrong_on_change"]].tolist() == [0, 0]


def test_the_fit_puts_each_threshold_halfway_between_zero_and_its_sides_nearest_interval(records):
    """Every grid choice in the dead zone is equally accurate on these records; the fit keeps a score
    of 0 (balanced evidence) inconclusive with as much room as the nearest calibration interval gets."""
    # spread the replicates so that intervals differ from the points
    for record in records:
        for e in record["evidence"]:
            e["replicates"] = list(e["value"] + np.linspace(-0.05, 0.05, 20))
    rule = fit_rule(records, start=VerdictRule())
    scores = ValidationResult.from_records(records, rule).rows.query(
        "question == 'deletion' and truth in ('wrapper', 'capability_change')"
    )
    nearest_wrapper = scores.loc[scores["score"] > 0, "low"].min()
    nearest_change = -scores.loc[scores["score"] < 0, "high"].max()
    assert nearest_wrapper < scores.loc[scores["score"] > 0, "score"].min()
    grid_step = 0.025
    assert abs(rule.deletion.wrapper_threshold - nearest_wrapper / 2) <= grid_step / 2 + 1e-9
    assert abs(rule.deletion.change_threshold - nearest_change / 2) <= grid_step / 2 + 1e-9
    assert rule.deletion.wrapper_threshold > 0 and rule.deletion.change_threshold > 0
    # so a balanced finding (a score within a grid step of 0) is inconclusive whatever its interval
    balanced = Finding("deletion", "inconclusive", -0.003, (-0.004, -0.002), 1.0, [],
                       support={"functional": True, "wrapper": False, "change": True})  # fmt: skip
    assert decide(rule.deletion, balanced) == "inconclusive"


def test_a_side_the_analyzer_cannot_show_is_never_fitted():
    """Pruning is a sufficient test of a wrapper: however cleanly its values separate on the records,
    its statistic never points to a change."""
    from capwrap.analyzers import Pruning, Revival, analyzer_of

    assert analyzer_of("pruning_recovered_share") is Pruning and Pruning.shows == ("wrapper",)
    assert analyzer_of("revival_speedup_log2") is Revival and set(Revival.shows) == {"wrapper", "change"}
    assert analyzer_of("no_such_statistic") is None
    wrappers = [f"cal/count-b/adamw-{s}-c{c}/s1" for s in ("small", "medium") for c in ("1", "0.8")]
    removed = [f"cal/removed-count-a/{w}/s3" for w in ("reinit-blocks", "reinit-blocks-small", "retrained", "retrained-small")]
    records = [_record(n, [("pruning", "deletion", "pruning_recovered_share", 0.6 + 0.1 * i),
                           ("revival", "deletion", "revival_speedup_log2", 3.0 + i)], LOST)
               for i, n in enumerate(wrappers)]  # fmt: skip
    records += [_record(n, [("pruning", "deletion", "pruning_recovered_share", 0.01 * i),
                            ("revival", "deletion", "revival_speedup_log2", -0.5 * i)], LOST)
                for i, n in enumerate(removed)]  # fmt: skip
    assert fit_anchor(np.array([0.6, 0.7, 0.8, 0.9]), np.array([0.0, 0.01, 0.02, 0.03]), None).sides == "both"
    rule = fit_rule(records, start=VerdictRule())
    pruning, revival = rule.anchors["pruning_recovered_share"], rule.anchors["revival_speedup_log2"]
    assert pruning.sides == "wrapper" and pruning.weight == 1.0 and pruning.signed(0.0) == 0.0
    assert revival.sides == "both" and revival.signed(-1.0) < 0  # revival's slowness does show a change


def test_one_statistic_is_measured_by_one_analyzer_with_valid_shows():
    """The registry behind :func:`analyzer_of` does not depend on which classes were imported first:
    a second, unrelated class claiming a statistic is refused when it is defined, and so is a bare
    string for ``shows`` (``"wrapper"`` would read as the letters w, r, a, ...)."""
    from capwrap.analyzers import Analyzer, Pruning, analyzer_of

    with pytest.raises(TypeError, match="already measures"):
        type("Copycat", (Analyzer,), {"statistic": "pruning_recovered_share", "analyze": lambda self, c: None})
    with pytest.raises(TypeError, match="must be a tuple"):
        type("Bare", (Analyzer,), {"statistic": "bare_statistic", "shows": "wrapper", "analyze": lambda self, c: None})
    with pytest.raises(TypeError, match="one statistic has one set of directions"):
        type("Louder", (Pruning,), {"shows": ("wrapper", "change")})

    class QuieterPruning(Pruning):
        """A subclass inherits the statistic and its directions."""

    assert analyzer_of("pruning_recovered_share") is Pruning and QuieterPruning.statistic == Pruning.statistic


def test_the_fit_narrows_every_anchor_to_its_analyzers_declared_sides():
    """Whatever the anchor's weight: a weight-0 anchor fitted to point to a change is still switched
    off for pruning (sides ``none``), and a statistic no analyzer measures keeps its sides."""
    from capwrap.validation.fit import _declared

    change_only = Anchor(0.8, 1.0, 0.4, 0.0, weight=0.0, sides="change")
    assert _declared("pruning_recovered_share", change_only).sides == "none"
    assert _declared("pruning_recovered_share", dataclasses.replace(change_only, weight=0.6)).weight == 0.0
    assert _declared("pruning_recovered_share", Anchor(0.8, 1.0, 0.4, 0.0, weight=0.5)) == Anchor(
        0.8, 1.0, 0.4, 0.0, weight=0.5, sides="wrapper"
    )
    assert _declared("revival_speedup_log2", change_only) == change_only
    assert _declared("no_such_statistic", change_only) == change_only
    # a statistic whose sides both lie within the other truth's noise points nowhere
    noisy = np.array([[-1.0, 2.0]] * 4)
    anchor = fit_anchor(np.array([0.6, 0.7, 0.8, 0.9]), np.array([0.3, 0.4, 0.5, 0.55]), None,
                        wrapper_intervals=noisy, change_intervals=noisy)  # fmt: skip
    assert anchor.sides == "none" and anchor.weight == 0.0 and anchor.signed(0.0) == anchor.signed(1.0) == 0.0


def test_a_side_without_calibration_findings_gets_the_largest_threshold():
    from capwrap.validation.fit import _margins

    only_wrappers = np.array([0.3, 0.5])
    # the change side has no finding: its margin is the threshold itself, so the grid's largest wins
    assert _margins(only_wrappers, 0.15, 0.6) == (0.15, 0.75)
    assert _margins(only_wrappers, 0.15, 0.6)[1] > _margins(only_wrappers, 0.15, 0.3)[1]
    # a finding on the wrapper side never limits the change threshold, however close to it
    assert _margins(np.array([0.3, 0.02]), 0.01, 0.3) == (0.01, 0.31)


def test_a_calibration_interval_ending_next_to_zero_forces_a_zero_threshold_and_says_so(records):
    """A wrapper finding whose interval ends within one grid step of 0 leaves no room for a dead zone:
    the wrapper threshold must be 0 to call it, and the fit warns."""
    probe = fit_rule(records, start=VerdictRule()).anchors["probe_kept_share"]
    barely = probe.wrapper_cut + 0.01 * (probe.wrapper_full - probe.wrapper_cut)  # a strength of 0.01
    for record in records[:4]:  # the wrappers: intervals reaching down to a score of about +0.01
        e = record["evidence"][0]
        e["replicates"] = [barely] * 4 + [e["value"]] * 16
    with pytest.warns(UserWarning, match="deletion wrapper threshold is 0"):
        rule = fit_rule(records, start=VerdictRule())
    assert rule.deletion.wrapper_threshold == 0.0


def test_cross_validation_leaves_each_scenario_out_of_its_own_fit(records):
    from capwrap.validation import cross_validate

    rows = cross_validate(records, start=VerdictRule())
    assert len(rows) == 14 + 2  # the scored findings of every scenario, each scored by a fit without it
    assert (rows["truth"] == rows["verdict"]).mean() >= 0.75
    # a lone removed scenario left out: its probe value 0.1 is still on the change side of the others' cut
    assert rows.set_index(["name", "question"]).loc[("cal/removed-count-a/reinit-blocks/s3", "deletion"), "verdict"] == (
        "capability_change"
    )


def test_the_fit_chooses_the_structural_weight_that_predicts_left_out_scenarios(records):
    """Structural evidence that one wrapper contradicts: every weight fits the calibration findings, but
    with that wrapper left out its weight change reads as a change, and the more the structural kind
    weighs, the further it drags the wrapper's score from the wrapper threshold. The fit picks by
    left-out accuracy (from a start of 1.0) and keeps every candidate's accuracies."""
    wrappers = records[:4]
    for record, value in zip(wrappers + records[4:8], [0.1, 0.1, 0.1, 0.95] + [0.9] * 4, strict=True):
        record["evidence"].append({"analyzer": "weight_diff", "question": "deletion", "kind": "structural",
                                   "statistic": "relative_weight_change", "value": value, "replicates": [value] * 20,
                                   "summary": "", "direction": "neutral", "strength": 0.0, "headline": {}})  # fmt: skip
    start = VerdictRule(kind_weights={"functional": 1.0, "structural": 1.0})
    rule = fit_rule(records, start=start)
    table = pd.DataFrame(rule.provenance["kind_weight_fit"]).set_index("structural")
    assert list(table.index) == list(KIND_WEIGHT_GRID) and (table["calibration_accuracy"] == 1.0).all()
    assert table.loc[1.0, "loo_accuracy"] < table["loo_accuracy"].max()
    assert rule.kind_weights["structural"] == table["loo_accuracy"].idxmax() < 1.0
    assert ValidationResult.from_records(records, rule).accuracy == 1.0
    assert fit_rule(records, start=start, kind_weights=None).kind_weights["structural"] == 1.0  # held
    # without structural evidence every weight ties: the starting one stays
    functional = [{**r, "evidence": [e for e in r["evidence"] if e["kind"] != "structural"]} for r in records]
    assert fit_rule(functional, start=start).kind_weights["structural"] == 1.0
    # structural evidence that agrees everywhere: every weight ties, and a start off the grid stays
    wrappers[3]["evidence"][-1]["value"] = 0.1
    wrappers[3]["evidence"][-1]["replicates"] = [0.1] * 20
    off_grid = VerdictRule(kind_weights={"functional": 1.0, "structural": 0.6})
    tied = fit_rule(records, start=off_grid)
    assert tied.kind_weights["structural"] == 0.6
    assert [c["structural"] for c in tied.provenance["kind_weight_fit"]] == sorted({*KIND_WEIGHT_GRID, 0.6})
    # nothing scored (a large-rate fine-tune's truth is unknown): nothing to fit, and it says so
    unknown = _record("cal/count-b/adamw-large-c1/s1", [("probing", "deletion", "probe_kept_share", 0.5)], LOST)
    unknown["evidence"].append({**wrappers[0]["evidence"][-1]})
    with pytest.raises(ConfigError, match="nothing to fit"):
        fit_rule([unknown], start=off_grid)


def test_sensitivity_counts_flips_per_number(records):
    rule = fit_rule(records, start=VerdictRule())
    table = sensitivity(records, rule)
    anchors = {f"{stat}.{point}" for stat in ("probe_kept_share", "gain_without_correlation")
               for point in ("change_full", "change_cut", "wrapper_cut", "wrapper_full")}  # fmt: skip
    thresholds = {f"{q}.{t}_threshold" for q in ("deletion", "creation") for t in ("wrapper", "change")}
    numbers = anchors | thresholds | {"kept_fraction", "min_gain", "kind_weights.structural"}  # (only their ratio counts)
    moved = {(n, f) for n in numbers for f in ("x0.8", "x1.2")}
    moved |= {("probe_kept_share.weight", "x0.8"), ("gain_without_correlation.weight", "x0.8")}  # weights of 1: down only
    assert rule.anchors["probe_kept_share"].weight == rule.anchors["gain_without_correlation"].weight == 1.0
    assert set(zip(table["number"], table["perturbation"], strict=True)) == moved
    assert len(table) == len(moved) and (table["flips"] >= 0).all()
    # moving the kept bar to 72% of the base still calls a 40% model a loss: no flip from that number
    assert table[(table["number"] == "kept_fraction") & (table["perturbation"] == "x0.8")]["flips"].iloc[0] == 0


def test_sensitivity_moves_a_threshold_at_zero_by_one_grid_step(records):
    """±20% of 0 is 0: a zero threshold is moved by one step of the fit's grid, which flips a wrapper
    verdict whose score lies within that step of 0 (and only that one)."""
    rule = fit_rule(records, start=VerdictRule())
    rule = dataclasses.replace(rule, deletion=dataclasses.replace(rule.deletion, wrapper_threshold=0.0))
    probe = rule.anchors["probe_kept_share"]
    barely = probe.wrapper_cut + 0.01 * (probe.wrapper_full - probe.wrapper_cut)  # a deletion score of about +0.01
    records = [*records, _record("cal/count-c/adamw-small-c1/s1", [("probing", "deletion", "probe_kept_share", barely)], LOST)]
    rows = ValidationResult.from_records(records, rule).rows.set_index(["name", "question"])
    assert rows.loc[("cal/count-c/adamw-small-c1/s1", "deletion"), "verdict"] == "wrapper"
    assert 0 < rows.loc[("cal/count-c/adamw-small-c1/s1", "deletion"), "score"] < 0.025
    table = sensitivity(records, rule).set_index(["number", "perturbation"])
    assert ("deletion.wrapper_threshold", "x1.2") not in table.index
    moved = table.loc[("deletion.wrapper_threshold", "+0.025")]
    assert moved["flips"] == 1
    assert moved["flipped"] == "cal/count-c/adamw-small-c1/s1 (deletion): wrapper -> inconclusive"


def test_the_runner_resumes_from_existing_records(tmp_path, records):
    chosen = scenarios("calibration", ["cal/count-b/adamw-small-c1/s1"])
    record_path(tmp_path, chosen[0]).parent.mkdir(parents=True)
    write_json_atomic(record_path(tmp_path, chosen[0]), records[0])
    logged = []
    out = run_suite(chosen, tmp_path, workers=2, progress=False, log=logged.append, n_boot=20)
    assert out == [records[0]] and "already have records" in logged[0]
    with pytest.raises(ConfigError, match="memory='normal', not 'low'"):  # (a record without the field is normal)
        run_suite(chosen, tmp_path, workers=1, progress=False, memory="low", n_boot=20)
    # nor are records made with other bootstrap or thread settings taken as this run's (they were, silently)
    with pytest.raises(ConfigError, match="n_boot=20, not 200; give that n_boot to go on"):
        run_suite(chosen, tmp_path, workers=1, progress=False)
    with pytest.raises(ConfigError, match="threads=1, not 2"):  # (a record without the field: 1, the default)
        run_suite(chosen, tmp_path, workers=1, progress=False, n_boot=20, threads=2)


def test_ray_without_its_extra_says_how_to_install_it_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as where the extra is not installed
    chosen = scenarios("calibration", ["cal/count-b/adamw-small-c1/s1"])
    with pytest.raises(ConfigError, match=r"pip install 'capwrap\[ray\]'"):
        run_suite(chosen, tmp_path, ray_address="local", progress=False)
    assert not list((tmp_path / "scenarios").iterdir())


def test_on_ray_the_driver_writes_each_record_and_each_failure(tmp_path, monkeypatch, records):
    """Ray tasks return their records and the driver writes them (the nodes share no file system with
    it); a task that fails leaves an error record and the others are kept. Ray's API as the runner
    uses it (init, remote, wait, get), run in this process, with the scenario's work stubbed."""
    import types

    import capwrap.validation.runner as runner

    calls = []

    class Ref:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

    def remote(**options):
        return lambda fn: types.SimpleNamespace(remote=lambda *args: Ref(fn, args))

    def get(ref):
        return ref.fn(*ref.args)

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw), remote=remote, get=get,
                                 wait=lambda refs, num_returns: (refs[:1], refs[1:]),
                                 nodes=lambda: [{"Resources": {"CPU": 2.0}}])  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray", fake)
    good, bad = "cal/count-b/adamw-small-c1/s1", "cal/count-b/adamw-small-c0.8/s1"

    def run_scenario(scenario, cache, rule, n_boot, threads, memory):
        assert Path(cache).is_absolute() and (Path(cache) / "controls").exists()  # seeded on the node
        if scenario.name == bad:
            raise RuntimeError("out of memory on the node")
        return records[0]

    monkeypatch.setattr(runner, "run_scenario", run_scenario)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CapwrapError, match="1 scenarios failed"):
        run_suite(scenarios("calibration", [good, bad]), "out", ray_address="local", progress=False)
    assert calls == [{"address": None, "ignore_reinit_error": True, "log_to_driver": False}]
    written = load_records(tmp_path / "out")
    assert written == [records[0]]
    error = json.loads(record_path(tmp_path / "out", scenarios("calibration", [bad])[0]).with_suffix(".error.json").read_text())
    assert "out of memory on the node" in error["error"]
    with pytest.raises(ConfigError, match="asks for 4 CPUs .* largest node has 2: its tasks could never start"):
        run_suite(scenarios("calibration", [good]), "out2", ray_address="local", progress=False, threads=4)


def test_relearning_says_when_the_budget_ran_out(records):
    from capwrap.validation.results import relearning

    revival = {"analyzer": "revival", "question": "deletion", "kind": "functional", "statistic": "revival_speedup_log2",
               "value": 1.0, "replicates": [1.0], "summary": "", "direction": "wrapper", "strength": 0.5,
               "headline": {"steps_tuned": 45.0, "steps_control": None, "budget": 200.0}}  # fmt: skip
    record = {**records[0], "evidence": [*records[0]["evidence"], revival]}
    row = relearning([record, records[1]]).iloc[0]
    assert (row["relearn_steps_tuned"], row["relearn_steps_control"]) == (45, ">200")
    assert relearning([records[1]]).iloc[0]["relearn_steps_tuned"] is None  # no revival: nothing to say


def test_validate_lists_and_refuses_bad_input(capsys, tmp_path):
    assert main(["validate", "--list", "--split", "held-out"]) == 0
    listed = capsys.readouterr().out
    assert "held/tracr-max/sgd-small-c1/s95" in listed and "cal/" not in listed
    assert main(["validate", "--scenario", "no/such/scenario", "--out", str(tmp_path)]) == 2
    assert "no scenario named" in capsys.readouterr().err


def test_truth_is_by_construction_and_needs_a_fine_tune_that_learned():
    """Removed means every block re-initialized or never learned; a partial re-initialization is not
    scored (what it leaves may still compute the capability), nor a wrapper fine-tune that did not
    learn its task; a record made before a correction is judged by the corrected registry."""
    from capwrap.diagnosis.rule import VerdictRule
    from capwrap.validation.scenarios import LEARNED, record_truth

    assert {s.recipe.reinit or "retrained" for s in SUITE if s.kind == "removed"} == {"blocks", "retrained"}
    assert all(s.kind == "unknown" for s in SUITE if s.recipe.reinit in ("attention", "mlp", "latent"))
    failed = {"base": {"capability": 1.0, "downstream": 0.0}, "tuned": {"capability": 0.4, "downstream": LEARNED - 0.01}}
    wrapper = _record("cal/count-b/adamw-small-c1/s1", [], failed)
    assert record_truth(wrapper, VerdictRule()) == {"deletion": "unknown", "creation": "unknown"}
    assert record_truth(_record("cal/count-b/adamw-small-c1/s1", [], LOST), VerdictRule())["deletion"] == "wrapper"
    old = _record("cal/removed-count-a/reinit-mlp/s3", [], LOST)
    old["scenario"]["kind"] = "removed"  # as the first suite recorded it
    assert record_truth(old, VerdictRule()) == {"deletion": "unknown", "creation": "unknown"}


def test_a_record_of_another_definition_of_its_scenario_is_refused_not_reused(tmp_path, records):
    """A record made before the suite changed a scenario (its recipe, its kind) would be scored as the
    new definition; the runner names it instead of reusing it."""
    chosen = scenarios("calibration", ["cal/count-b/adamw-small-c1/s1"])
    stale = {**records[0], "scenario": {**records[0]["scenario"], "kind": "removed"}}
    record_path(tmp_path, chosen[0]).parent.mkdir(parents=True)
    write_json_atomic(record_path(tmp_path, chosen[0]), stale)
    with pytest.raises(ConfigError, match=r"made from another definition of them \(\['cal/count-b/adamw-small-c1/s1'\]\)"):
        run_suite(chosen, tmp_path, workers=1, progress=False)
    with pytest.raises(ConfigError, match="scenarios must be a list of Scenario"):
        run_suite(chosen[0], tmp_path)
    with pytest.raises(ConfigError, match=r"n_boot \(bootstrap replicates\) must be a whole number >= 1, got 0"):
        run_suite(chosen, tmp_path, n_boot=0)  # before any scenario is built
    with pytest.raises(ConfigError, match="n_boot=5 bootstrap replicates cannot place the ends of a 90% interval"):
        run_suite(chosen, tmp_path, n_boot=5)


def test_a_record_of_too_few_replicates_says_to_run_it_again():
    from capwrap.diagnosis.rule import default_rule
    from capwrap.validation.runner import findings_from_record

    record = _record("cal/count-b/adamw-small-c1/s1", [("probing", "deletion", "probe_kept_share", 0.9)], LOST)
    assert set(findings_from_record(record, default_rule())) == {"deletion", "creation"}
    record["n_boot"] = 5  # written before n_boot had a minimum: its intervals cannot be placed
    with pytest.raises(ConfigError, match=r"holds 5 bootstrap replicates, too few for the rule's 90% intervals \(at "
                                          r"least 20\); run the scenario again"):  # fmt: skip
        findings_from_record(record, default_rule())


def test_a_rule_is_fitted_only_on_calibration_records_with_both_truths(records):
    held = [{**r, "scenario": {**r["scenario"], "split": "held-out"}} for r in records]
    with pytest.raises(ConfigError, match="held-out scenarios .*Fit on the calibration half"):
        fit_rule(held)
    kept_only = [r for r in records if r["scenario"]["kind"] == "kept"]
    with pytest.raises(ConfigError, match="nothing to fit: no finding of the 1 records has the truth wrapper or "
                                          "capability_change"):  # fmt: skip
        fit_rule(kept_only)
    with pytest.raises(ConfigError, match="load_records"):
        fit_rule("out/validation")


def test_scenarios_are_checked_when_made_and_named_with_their_split():
    from capwrap.validation.scenarios import Recipe, Scenario

    with pytest.raises(ConfigError, match="unknown PCFG family 'cnt'"):
        Recipe("pcfg=cnt", 1e-3)
    with pytest.raises(ConfigError, match="Recipe.lr must be a number >= 0.0, got '3e-5'"):
        Recipe("pcfg=count,operand=a", "3e-5")
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        Recipe("pcfg=count,operand=a", 1e-3, optimizer="adam")
    good = scenario("cal/count-b/adamw-small-c1/s1")
    with pytest.raises(ConfigError, match="unknown split 'heldout'"):
        Scenario(**{**dataclasses.asdict(good), "recipe": good.recipe, "split": "heldout"})
    with pytest.raises(ConfigError, match=r"is in the calibration split, not the held-out one: pass --split calibration"):
        scenarios("held-out", ["cal/kept/*"])


def test_validate_keeps_each_splits_result_and_says_when_nothing_matches(capsys, tmp_path, monkeypatch, records):
    import capwrap.validation

    monkeypatch.setattr(capwrap.validation, "run_suite", lambda *args, **kwargs: records)  # (records made above)
    write_json_atomic(tmp_path / "validation.json", {"split": "held-out", "scenarios": []})
    # calibration, then held-out (which kept the calibration result aside), now calibration again
    write_json_atomic(tmp_path / "validation.calibration.json", {"split": "calibration", "stale": True})
    (tmp_path / "validation.calibration.html").write_text("stale")
    assert main(["validate", "--split", "calibration", "--scenario", "cal/kept/noop/s4", "--out", str(tmp_path), "--quiet"]) == 0
    assert json.loads((tmp_path / "validation.held-out.json").read_text())["split"] == "held-out"
    assert json.loads((tmp_path / "validation.json").read_text())["split"] == "calibration"
    # the older calibration result beside the fresh one is gone (it was left, stale, until 2026-12-07)
    assert sorted(p.name for p in tmp_path.glob("validation*")) == [
        "validation.held-out.json", "validation.html", "validation.json"]
    assert "kept the held-out split's result as validation.held-out.json" in capsys.readouterr().out
    assert main(["validate", "--kind", "removed", "--scenario", "held/kept/noop/s94", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("capwrap: error: no scenario matches")


def test_cross_validation_needs_two_scenarios_of_each_truth(records):
    from capwrap.validation import cross_validate

    one_wrapper = [r for i, r in enumerate(records) if i == 0 or r["scenario"]["kind"] != "wrapper"]
    with pytest.raises(ConfigError, match="leave-one-scenario-out needs at least 2 scenarios with each truth; wrapper"):
        cross_validate(one_wrapper, start=VerdictRule())


def test_a_suite_without_scored_findings_says_so_instead_of_printing_empty_tables(records):
    kept = [r for r in records if r["scenario"]["kind"] == "kept"]
    result = ValidationResult.from_records(kept, VerdictRule())
    text = result.summary_text()
    assert "Empty DataFrame" not in text
    assert "(no scored finding has the truth wrapper or capability_change, so no analyzer is compared with the truth)" in text
    assert "(no scored findings)" in result.report().to_html()


def test_the_html_table_shows_integer_columns_as_integers():
    from capwrap.report import Report

    report = Report("counts")
    report.add_table(pd.DataFrame({"family": ["pcfg-count"], "scenarios": [1], "wrong_direction": [0]}))
    html = report.to_html()
    assert "<td>1</td>" in html and "<td>0</td>" in html and "<td>1.000</td>" not in html


def test_validate_list_into_a_closed_pipe_exits_quietly():
    import subprocess

    done = subprocess.run(f"{sys.executable} -m capwrap validate --list --split all | head -1", shell=True,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.startswith("cal/") and done.stderr == ""


def test_a_terminated_suite_stops_its_workers_too(tmp_path):
    """``kill PID`` (SIGTERM to the main process alone, as a scheduler sends it) stops ``capwrap
    validate`` as Ctrl-C does: it says so, exits 143 (as a process SIGTERM ended; 130 until 2026-12-07, which
    a scheduler read as a Ctrl-C), and its worker processes, at work on their
    scenarios, do not run on (they did, orphaned, writing records minutes later)."""
    import signal
    import subprocess

    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("reads the worker processes from /proc/PID/task/PID/children (Linux)")
    command = [sys.executable, "-m", "capwrap", "validate", "--split", "calibration", "--quiet", "--workers", "2",
               "--scenario", "cal/count-c/adamw-small-c1/s1", "--scenario", "cal/count-c/adamw-small-c0.8/s1",
               "--out", str(tmp_path / "out")]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        workers: list[int] = []
        # at work: past their imports (a few CPU seconds), into training their scenario
        while not (len(workers) == 2 and all(_cpu_seconds(w) > 10 for w in workers)) and time.monotonic() < deadline:
            workers = _children(process.pid)
            time.sleep(0.2)
        assert len(workers) == 2 and all(_cpu_seconds(w) > 10 for w in workers), "the workers never got to work"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143 and "capwrap: terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert "leaked" not in err  # the workers exit cleanly, not killed holding their locks
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
    assert not list((tmp_path / "out" / "scenarios").glob("*.json"))  # nothing half-written either


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The worker processes (spawned by multiprocessing) among ``pid``'s children, read from /proc."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        return []
    out = []
    for child in path.read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(int(child))
        except OSError:  # gone meanwhile
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
