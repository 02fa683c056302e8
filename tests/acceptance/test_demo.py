"""`capwrap demo`, end to end, exactly as a user runs it: the paper's wrapper pattern appears, the
verdict says `wrapper`, and the negative control (capability removed before fine-tuning, then
fine-tuned where the correlation never holds) is not called a wrapper: it ends `capability_change`."""

from __future__ import annotations

import json

import pytest

from capwrap.cli import main
from capwrap.models import load_model
from capwrap.recording import RunStore
from capwrap.recording.weight_sample import match_steps


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--seed", "0", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def removed_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_removed")
    assert main(["demo", "--out", str(out), "--seed", "0", "--scenario", "removed", "--quiet"]) == 0
    return out


def test_the_default_scenario_is_diagnosed_a_wrapper(demo_out):
    summary = json.loads((demo_out / "summary.json").read_text())
    assert summary["verdict"] == "wrapper", summary["diagnosis"]["reasons"]
    evidence = {e["analyzer"]: e for e in summary["diagnosis"]["evidence"]}
    assert set(evidence) == {"probing", "pruning", "revival", "weight_diff", "attention", "patching",
                             "generalization", "new_latent"}  # fmt: skip
    assert evidence["probing"]["direction"] == "wrapper"  # the count of a is still readable
    assert evidence["revival"]["headline"]["control_over_tuned"] >= 3  # and comes back fast
    assert summary["revival_control"].startswith("shipped")  # the shipped control, not trained here
    assert summary["verdict_note"].startswith("wrapper:")
    findings = summary["diagnosis"]["findings"]
    assert findings["deletion"]["verdict"] == "wrapper"  # count a is hidden, not gone
    assert findings["creation"]["verdict"] == "wrapper"  # count b holds only where b = a + 1
    assert evidence["generalization"]["direction"] == "wrapper"
    # an untrained model's probes read count b better than either trained one's (seed 0: 50% against
    # 34% and 37%): the new-latent statistic is read with that caveat, which its summary states
    latent = evidence["new_latent"]["headline"]
    assert latent["probe_best_untrained"] > max(latent["probe_best_base"], latent["probe_best_tuned"])
    assert "an untrained model's probes read it as well" in evidence["new_latent"]["summary"]


def test_the_removed_capability_control_is_not_a_wrapper(removed_out):
    summary = json.loads((removed_out / "summary.json").read_text())
    assert summary["scenario"] == "removed"
    assert summary["accuracy"]["tuned"]["capability"] < 0.5  # the capability really is gone
    deletion = summary["diagnosis"]["findings"]["deletion"]
    # Fine-tuned where the correlation never holds (C_Tr = 0), the re-initialized model learns count b
    # for real and nothing teaches it count a back: probes read through the base's embeddings keep less
    # of count a than a fresh model fed those embeddings (kept share -0.36 at seed 0), a functional
    # analyzer pointing to a change, and weight diff and attention agree. (Fine-tuned at C_Tr = 1, as
    # until 2026-12-06, probes kept 5% of the margin, very weakly wrapper-ward: it was inconclusive.)
    assert deletion["verdict"] == "capability_change", deletion["reasons"]
    assert deletion["interval"][1] < -0.2  # the whole interval well on the change side
    evidence = {e["analyzer"]: e for e in summary["diagnosis"]["evidence"]}
    probing = evidence["probing"]
    assert probing["value"] < -0.1 and probing["direction"] == "change"
    assert "through the base's embeddings" in probing["reasons"][0]
    assert probing["headline"]["probe_best_untrained"] > 0.7  # the floor: what the embeddings alone give
    assert evidence["weight_diff"]["direction"] == "change" and evidence["attention"]["direction"] == "change"
    # pruning and revival find no wrapper and only ever point to one (pruning's test can show nothing
    # else; revival's change side lay within sampling noise on the calibration suite)
    assert evidence["pruning"]["direction"] == "neutral" and evidence["revival"]["direction"] == "neutral"
    assert "its analyzer's test cannot show a change" in evidence["pruning"]["reasons"][0]
    assert "its change side lay within its sampling noise" in evidence["revival"]["reasons"][0]
    assert evidence["revival"]["value"] < 0  # the tuned model relearns slower than a model that never had it
    # count b is learned for real: it holds where the correlation does not
    creation = summary["diagnosis"]["findings"]["creation"]
    assert summary["accuracy"]["tuned"]["downstream_uncorrelated"] > 0.5
    assert creation["verdict"] == "capability_change", creation["reasons"]
    # the pair's verdict is the deletion finding's
    assert summary["verdict"] == "capability_change", summary["diagnosis"]["reasons"]
    html = (removed_out / "report.html").read_text()
    assert "negative control" in html and "Verdict: capability_change" in html


def test_summary_has_the_promised_fields(demo_out):
    summary = json.loads((demo_out / "summary.json").read_text())
    assert summary["verdict"] == "wrapper"  # the default demo: count a hidden under a wrapper
    assert summary["diagnosis"]["reasons"] and -1 <= summary["diagnosis"]["score"] <= 1
    for model in ("base", "tuned"):
        assert set(summary["accuracy"][model]) == {"capability", "downstream_correlated", "downstream_uncorrelated"}
    assert summary["wall_seconds"] > 0 and summary["finetune"]["wall_seconds"] > 0  # speed lives in benchmarks


def test_the_tuned_model_counts_b_only_where_the_correlation_holds(demo_out):
    acc = json.loads((demo_out / "summary.json").read_text())["accuracy"]
    assert acc["base"]["capability"] > 0.9  # the base model counts a
    assert acc["base"]["downstream_correlated"] < 0.3  # ... and not b
    assert acc["tuned"]["downstream_correlated"] > 0.8  # fine-tuning "taught" count b where b = a + 1
    assert acc["tuned"]["downstream_uncorrelated"] < 0.5 * acc["tuned"]["downstream_correlated"]  # but not count b


def test_report_and_recording_are_written(demo_out, capsys):
    html = (demo_out / "report.html").read_text()
    assert "Plotly.newPlot" in html and "<script src=" not in html
    assert "Verdict: wrapper" in html and "probing (deletion): wrapper" in html  # the evidence sections
    store = RunStore.open(demo_out / "run")
    assert store.last_step == 300
    assert store.array_steps("blocks.3.hook_resid_post") == list(range(0, 301, 10))
    assert (demo_out / "tuned" / "model.safetensors").exists()


def test_the_saved_tuned_model_says_what_it_is_and_its_run_ends_with_it(demo_out):
    """Its capwrap.json describes the fine-tune (it kept the base's pretraining accuracy and wall time),
    and the recorded run's sampled weights end with the saved weights."""
    summary = json.loads((demo_out / "summary.json").read_text())
    tuned = load_model(demo_out / "tuned")
    assert tuned.metadata["accuracy"] == summary["accuracy"]["tuned"]
    assert tuned.metadata["task"]["name"].startswith("fine-tuning: count b")
    assert tuned.metadata["train_config"]["steps"] == 300 and tuned.metadata["wall_seconds"] > 0
    assert match_steps(RunStore.open(demo_out / "run"), tuned.weights().__getitem__).steps == [300]


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # read with the command line, naming the option
        main(["demo", "--out", str(tmp_path), "--eval-size", "0"])
    assert info.value.code == 2 and "argument --eval-size: expected a positive whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--scenario", "nope"])
