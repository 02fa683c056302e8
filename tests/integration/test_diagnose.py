"""diagnose(): both findings from real analyzers on real pairs, one evaluation set, the Diagnosis's
table, JSON and HTML, and bad input. (The rule itself: test_rule.py.)"""

from __future__ import annotations

import json

import pytest

from capwrap.analyzers import (
    AttentionComparison,
    Generalization,
    NewLatentProbing,
    Patching,
    Probing,
    Pruning,
    Revival,
    WeightDiff,
)
from capwrap.diagnosis import diagnose
from capwrap.errors import ConfigError
from capwrap.models import ModelSpec, build_model
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train


@pytest.fixture(scope="module")
def trained_pair():
    """A small counter (count a), then fine-tuned hard to count b: a real pair to diagnose."""
    capability = PCFGTask("count", "a", config=PCFGConfig(length=10, window=5, occurrence=2))
    downstream = PCFGTask("count", "b", correlation=1.0, config=capability.config)
    spec = ModelSpec(d_vocab=capability.d_vocab, n_ctx=capability.seq_len, n_layers=2, d_model=32, n_heads=4)
    base = build_model(spec, seed=0)
    train(base, PCFGTask("count", None, prior=(0.9, 0.1, 0.0), config=capability.config),
          TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))  # fmt: skip
    tuned = base.clone()
    train(tuned, downstream, TrainConfig(steps=40, batch_size=64, lr=3e-3, seed=1, progress=False))
    return base, tuned, capability, downstream


def test_diagnose_runs_analyzers_and_writes_json_and_html(trained_pair, tmp_path):
    base, tuned, capability, downstream = trained_pair
    analyzers = [Generalization(), Probing(n=300, steps=100), Revival(max_steps=30, eval_every=10, check_size=128,
                 control_steps=20, seeds=1), WeightDiff(graft_fractions=(0.1,)), AttentionComparison(n=64),
                 Patching(n=32), NewLatentProbing(n=300, steps=100)]  # fmt: skip
    d = diagnose(base, tuned, capability, downstream, analyzers=analyzers, eval_size=256, progress=False)
    # deletion evidence first, creation evidence after it, each in the order given
    assert [e.analyzer for e in d.evidence] == ["probing", "revival", "weight_diff", "attention", "patching",
                                                "generalization", "new_latent"]  # fmt: skip
    table = d.summary()
    assert list(table["kind"]) == ["functional", "functional", "structural", "structural", "structural",
                                   "functional", "functional"]  # fmt: skip
    assert list(table["question"]) == ["deletion"] * 5 + ["creation"] * 2
    assert set(d.seconds) == set(table["analyzer"])
    # one evaluation set: every number that cites an accuracy cites the same one
    assert set(d.accuracy["base"]) == {"capability", "downstream", "downstream_free"}  # C_Te=0 found by itself
    acc = d.accuracy
    gen = d["generalization"].headline
    assert gen["gain_downstream"] == pytest.approx(acc["tuned"]["downstream"] - acc["base"]["downstream"])
    assert d["probing"].headline["capability_accuracy_tuned"] == acc["tuned"]["capability"]
    assert d["revival"].headline["budget"] == 30
    for finding in d.findings:
        lo, hi = finding.interval
        assert lo <= finding.score <= hi and 0 <= finding.confidence <= 1 and finding.reasons
    # count a falls 99% -> 18%: a capability was lost, so the pair's word is the deletion finding's,
    # whatever the creation finding (count b only where b = a + 1: a wrapper) says. On a model this
    # small a fresh model fed the base's embeddings reads count a at ~91% against the base's 100%, so
    # probes cannot tell, and no other functional analyzer points either way: inconclusive, saying why.
    assert d.deletion.verdict == "inconclusive" and not d.deletion.support["gated"], d.deletion.reasons
    assert "no functional analyzer points either way" in d.deletion.reasons[0]
    assert "cannot tell" in d["probing"].reasons[0] and d["probing"].direction == "neutral"
    assert d.creation.verdict == "wrapper" and d.verdict == "inconclusive"
    data = json.loads(d.to_json(tmp_path / "diagnosis.json"))
    assert data["verdict"] == d.verdict and len(data["evidence"]) == 7
    assert set(data["findings"]) == {"deletion", "creation"}
    assert json.loads((tmp_path / "diagnosis.json").read_text()) == data
    d.to_html(tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert f"Verdict: {d.verdict}" in html and "Deletion:" in html and "Creation:" in html
    assert html.count("Plotly.newPlot") >= 6 and "<script src=" not in html


def test_diagnose_bad_input(trained_pair):
    base, tuned, capability, downstream = trained_pair
    with pytest.raises(ConfigError, match="no analyzers"):
        diagnose(base, tuned, capability, downstream, analyzers=[], progress=False)
    with pytest.raises(ConfigError, match="names repeat"):
        diagnose(base, tuned, capability, downstream, analyzers=[AttentionComparison(), AttentionComparison()])
    small = build_model(ModelSpec(d_vocab=capability.d_vocab, n_ctx=capability.seq_len, n_layers=1, d_model=32,
                                  n_heads=4))  # fmt: skip
    with pytest.raises(ConfigError, match="n_layers"):
        diagnose(base, small, capability, downstream, progress=False)
    wide = PCFGTask("count", "a", config=PCFGConfig(length=40, window=5, occurrence=2))
    with pytest.raises(ConfigError, match="embeds only"):  # tokens the model cannot embed
        diagnose(base, tuned, wide, downstream, progress=False)


def test_every_analyzer_works_on_a_gpt_neo_pair(tmp_path):
    """The TinyStories architecture (local attention layers, unscaled scores) through all six analyzers."""
    capability = PCFGTask("count", "a", config=PCFGConfig(length=10, window=5, occurrence=2))
    downstream = PCFGTask("count", "b", config=capability.config)
    spec = ModelSpec(d_vocab=capability.d_vocab, n_ctx=capability.seq_len, n_layers=2, d_model=32, n_heads=4,
                     architecture="gpt_neo", attention_layers=("global", "local"), window_size=4,
                     tie_embeddings=True)  # fmt: skip
    base = build_model(spec, seed=0)
    train(base, capability, TrainConfig(steps=60, batch_size=64, lr=3e-3, progress=False))
    tuned = base.clone()
    train(tuned, downstream, TrainConfig(steps=20, batch_size=64, lr=3e-3, seed=1, progress=False))
    analyzers = [Probing(n=256, steps=50), Pruning(ks=(0, 2), score_size=128),
                 Revival(max_steps=20, eval_every=10, check_size=128, control_steps=10, seeds=1),
                 WeightDiff(graft_fractions=(0.1,)), AttentionComparison(n=64), Patching(n=16)]  # fmt: skip
    d = diagnose(base, tuned, capability, downstream, analyzers=analyzers, eval_size=128, progress=False)
    assert [e.analyzer for e in d.evidence] == ["probing", "pruning", "revival", "weight_diff", "attention", "patching"]
    # a large learning rate (3e-3) on a small model: count a falls 72% -> 23%; probes keep 31% of the
    # base's margin (their interval reaches 0.56), which the rule fitted with index wrappers in its
    # calibration half (2026-12-06) reads as weakly wrapper-ward; no functional analyzer points to a
    # change and the score stays between the thresholds. The downstream task gains too little for a
    # creation finding.
    assert d.deletion.verdict == "inconclusive", d.deletion.reasons
    assert "does not reach a threshold" in d.deletion.reasons[0]
    assert 0.2 < d["probing"].value < 0.45 and d["probing"].direction == "wrapper"
    assert d.creation.verdict == "inconclusive" and d.verdict == "inconclusive"
    changed = d["weight_diff"].table.set_index("component")
    assert "L1H3" in changed.index and changed.loc["L1.attn", "change"] > 0  # heads without q/k/v biases
    assert len(d["attention"].table) == 8 and len(d["patching"].table) > 0
