"""`capwrap validate` end to end on named scenarios of both halves of the suite, with their verdicts
pinned: a textbook wrapper (count b learned through count a + 1 at a small learning rate); removed
capabilities built two ways (a model of the base's shape retrained from scratch without counting b,
the unlearning literature's gold standard, and a base whose every block was re-initialized, each then
given the same fine-tune); the paper's own setting, compiled Tracr programs (a Counter wrapper and a
Max-identifier whose blocks were re-initialized, never a wrapper but left `inconclusive`: the rule's
known gap); and a fine-tune too small to change anything
(20 steps at lr 1e-6), which must stay `inconclusive`; and an index wrapper whose probes lose the
latent. They run two at a time; the rest of the suite is measured by `capwrap validate`
itself (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import pytest

from capwrap.cli import main
from capwrap.validation import scenario
from capwrap.validation.runner import record_path

WRAPPER = "cal/count-b/adamw-small-c1/s1"
REMOVED = "held/removed-count-b/retrained/s93"
REINITIALIZED = "cal/removed-count-a/reinit-blocks/s3"
TRACR_WRAPPER = "cal/tracr-counter/sgd-small-c1/s5"
TRACR_REMOVED = "held/tracr-max/reinit-blocks/s95"
KEPT = "held/kept/tiny/s94"
INDEX_WRAPPER = "held/index-a/adamw-small-c1/s96"
PINNED = (WRAPPER, REMOVED, REINITIALIZED, TRACR_WRAPPER, TRACR_REMOVED, KEPT, INDEX_WRAPPER)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    argv = ["validate", "--split", "all", "--out", str(out), "--workers", "2", "--quiet"]
    for name in PINNED:
        argv += ["--scenario", name]
    assert main(argv) == 0
    data = json.loads((out / "validation.json").read_text())
    return out, {(row["name"], row["question"]): row for row in data["scenarios"]}, data


def _record(out, name: str) -> dict:
    """The validation record ``capwrap validate`` wrote for the scenario ``name`` into ``out``."""
    return json.loads(record_path(out, scenario(name)).read_text())


def _evidence(out, name: str, analyzer: str) -> dict:
    """One analyzer's evidence in that record."""
    return next(e for e in _record(out, name)["evidence"] if e["analyzer"] == analyzer)


def test_the_textbook_wrapper_is_a_wrapper_on_both_questions(validated):
    _, rows, _ = validated
    assert rows[(WRAPPER, "deletion")]["truth"] == "wrapper"
    assert rows[(WRAPPER, "deletion")]["verdict"] == "wrapper"
    assert rows[(WRAPPER, "creation")]["verdict"] == "wrapper"


def test_a_removed_capability_is_a_capability_change(validated):
    _, rows, _ = validated
    assert rows[(REMOVED, "deletion")]["truth"] == "capability_change"
    assert rows[(REMOVED, "deletion")]["verdict"] == "capability_change", rows[(REMOVED, "deletion")]["reason"]
    # a model that never learned to count, fine-tuned where the correlation never holds, gains nothing on
    # count a where it holds (downstream 39% in the base -> 17% on seed 73): there is no gain to explain,
    # and a removed scenario's creation question is not scored, gated or not (until 2026-12-07 the gate
    # made its truth "inconclusive", counted right by construction)
    assert rows[(REMOVED, "creation")]["truth"] == "unknown"
    assert rows[(REMOVED, "creation")]["verdict"] == "inconclusive"


def test_a_capability_whose_blocks_were_reinitialized_is_a_capability_change(validated):
    _, rows, _ = validated
    row = rows[(REINITIALIZED, "deletion")]
    assert row["truth"] == "capability_change"
    assert row["verdict"] == "capability_change", row["reason"]
    assert row["high"] < 0  # the whole interval on the change side, not just the point


def test_a_reinitialized_tracr_program_is_never_a_wrapper_and_a_change_only_with_a_functional_analyzer(validated):
    """The rule's known gap: a compiled Max-identifier whose blocks were re-initialized, then fine-tuned.
    Weight diff and attention carry the score to the change side, but the functional analyzers barely
    show the change: the tuned model and the never-had-it control both stay below the revival
    threshold for the whole budget (statistic 0), and probes keep about none of the base's margin,
    right at the change cut of -0.02 that the calibration half's index wrappers set (-0.01 on seeds
    65, 75 and 85; on 95 -0.02 on the machines of earlier sessions, -0.028 on an AMD EPYC on
    2026-12-07: two of 256 held-out sequences, so the side of the cut is the CPU's floating point).
    The rule asks a functional analyzer to agree before it calls a change: on this pair probing is
    the only one that can (revival is 0), and its point has the whole score interval on the change
    side behind it, so the finding is `capability_change` when probing points to a change and
    `inconclusive` when it does not."""
    out, rows, _ = validated
    row = rows[(TRACR_REMOVED, "deletion")]
    assert row["truth"] == "capability_change"
    assert row["high"] < 0  # the whole interval of the score lies on the change side
    revival = _evidence(out, TRACR_REMOVED, "revival")
    assert revival["value"] == 0.0 and revival["direction"] == "neutral"  # neither model relearned
    probing = _evidence(out, TRACR_REMOVED, "probing")
    assert -0.05 < probing["value"] < 0.0  # about none of the margin kept
    if probing["direction"] == "change":
        assert row["verdict"] == "capability_change" and "probing points to a change" in row["reason"]
    else:
        assert row["verdict"] == "inconclusive" and "no functional analyzer does" in row["reason"]


def test_a_tracr_counter_wrapper_is_a_wrapper_on_both_questions(validated):
    """The paper's own setting: a compiled Counter, fine-tuned with SGD at a small rate."""
    _, rows, _ = validated
    for question in ("deletion", "creation"):
        assert rows[(TRACR_WRAPPER, question)]["truth"] == "wrapper"
        assert rows[(TRACR_WRAPPER, question)]["verdict"] == "wrapper", rows[(TRACR_WRAPPER, question)]["reason"]


def test_an_index_wrapper_whose_probes_lose_most_of_the_latent_is_a_wrapper(validated):
    """Index a learned through index b + 1 on the pcfg-b base: probes find little of index b where they
    read it (kept share about 0.17 on seed 76, 0.24 on seed 86, 0.01 on seed 96, below the 0.355 change cut of the rule fitted on
    counting alone), but reverse fine-tuning brings it back fast. Left `inconclusive` by that rule; a
    wrapper since the calibration half has an index family, whose wrappers keep -0.02 to 0.95
    (benchmarks/RESULTS.md, 2026-12-06)."""
    out, rows, _ = validated
    for question in ("deletion", "creation"):
        assert rows[(INDEX_WRAPPER, question)]["truth"] == "wrapper"
        assert rows[(INDEX_WRAPPER, question)]["verdict"] == "wrapper", rows[(INDEX_WRAPPER, question)]["reason"]
    probing = _evidence(out, INDEX_WRAPPER, "probing")
    assert probing["value"] < 0.355  # the old rule's change cut: probing pointed to change there
    assert probing["direction"] != "change"


def test_a_fine_tune_too_small_to_change_anything_is_inconclusive(validated):
    _, rows, _ = validated
    for question in ("deletion", "creation"):
        assert rows[(KEPT, question)]["truth"] == rows[(KEPT, question)]["verdict"] == "inconclusive"


def test_validate_writes_its_report_and_resumes(validated, capsys):
    out, rows, data = validated
    # every pinned finding is right but perhaps the re-initialized Tracr program's (inconclusive where its
    # probes keep a hair more than the change cut, above)
    scored = [key for key, row in rows.items() if row["truth"] != "unknown"]
    assert (TRACR_REMOVED, "deletion") in scored
    missed = int(rows[(TRACR_REMOVED, "deletion")]["verdict"] == "inconclusive")
    assert data["targets"]["accuracy"] == pytest.approx((len(scored) - missed) / len(scored), abs=1e-4)  # (rounded)
    assert data["targets"]["wrapper_on_removed"] == 0 and data["scenario_seconds"] > 0
    assert (out / "validation.html").read_text().count("Plotly.newPlot") >= 1
    # each record says which software made its numbers, and which made its tuned model
    record = _record(out, WRAPPER)
    for env in (record["environment"], record["made"]["environment"]):
        assert {"transformer_lens", "transformers", "torch", "device"} <= set(env)
    # a second run finds every record and reruns nothing
    argv = ["validate", "--split", "all", "--out", str(out), "--scenario", WRAPPER]
    assert main(argv) == 0
    assert "1 of 1 scenarios already have records" in capsys.readouterr().out
