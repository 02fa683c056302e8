"""`capwrap validate` end to end on named scenarios of both halves of the suite, with their verdicts
pinned: a textbook wrapper (count b learned through count a + 1 at a small learning rate) and a
removed capability (a model of the base's shape retrained from scratch without counting b, the
unlearning literature's gold standard, then given the same fine-tune). The two run side by side, one
worker each; the suite's other removal recipes are exercised by `capwrap validate` itself
(benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import pytest

from capwrap.cli import main

WRAPPER = "cal/count-b/adamw-small-c1/s1"
REMOVED = "held/removed-count-b/retrained/s53"


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    argv = ["validate", "--split", "all", "--out", str(out), "--workers", "2", "--quiet"]
    for name in (WRAPPER, REMOVED):
        argv += ["--scenario", name]
    assert main(argv) == 0
    data = json.loads((out / "validation.json").read_text())
    return out, {(row["name"], row["question"]): row for row in data["scenarios"]}, data


def test_the_textbook_wrapper_is_a_wrapper_on_both_questions(validated):
    _, rows, _ = validated
    assert rows[(WRAPPER, "deletion")]["truth"] == "wrapper"
    assert rows[(WRAPPER, "deletion")]["verdict"] == "wrapper"
    assert rows[(WRAPPER, "creation")]["verdict"] == "wrapper"


def test_a_removed_capability_is_a_capability_change(validated):
    _, rows, _ = validated
    assert rows[(REMOVED, "deletion")]["truth"] == "capability_change"
    assert rows[(REMOVED, "deletion")]["verdict"] == "capability_change", rows[(REMOVED, "deletion")]["reason"]
    # a model that never learned to count does not learn count a from this fine-tune (downstream 39% -> 34%
    # on seed 53): there is no gain to explain
    assert rows[(REMOVED, "creation")]["truth"] == "inconclusive"
    assert rows[(REMOVED, "creation")]["verdict"] == "inconclusive"


def test_validate_writes_its_report_and_resumes(validated, capsys):
    out, _, data = validated
    assert data["targets"]["accuracy"] == 1.0 and data["targets"]["wrapper_on_removed"] == 0
    assert (out / "validation.html").read_text().count("Plotly.newPlot") >= 1
    # each record says which software made its numbers, and which made its tuned model
    from capwrap.validation import scenarios
    from capwrap.validation.runner import record_path

    record = json.loads(record_path(out, scenarios("all", [WRAPPER])[0]).read_text())
    for env in (record["environment"], record["made"]["environment"]):
        assert {"transformer_lens", "transformers", "torch", "device"} <= set(env)
    # a second run finds every record and reruns nothing
    argv = ["validate", "--split", "all", "--out", str(out), "--scenario", WRAPPER]
    assert main(argv) == 0
    assert "1 of 1 scenarios already have records" in capsys.readouterr().out
