"""diagnose(): the verdict rule, and the Diagnosis's table, JSON and HTML, on real analyzers."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from capwrap.analyzers import AttentionComparison, Evidence, Patching, Probing, Pruning, Revival, WeightDiff
from capwrap.diagnosis import diagnose, weigh
from capwrap.errors import ConfigError
from capwrap.models import ModelSpec, build_model
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train

LOST = {"base": {"capability": 1.0, "downstream": 0.1}, "tuned": {"capability": 0.4, "downstream": 0.95}}


def _ev(name: str, direction: str, strength: float) -> Evidence:
    kind = "functional" if name in ("probing", "pruning", "revival") else "structural"
    return Evidence(name, {}, pd.DataFrame(), direction, strength, [f"{name} says {direction}"], kind=kind)


def test_functional_evidence_of_the_capability_makes_a_wrapper():
    verdict, score, reasons = weigh(
        [_ev("probing", "wrapper", 0.9), _ev("revival", "wrapper", 0.7), _ev("weight_diff", "change", 0.4)], LOST
    )
    assert verdict == "wrapper" and score > 0.15
    assert reasons[0].startswith("wrapper:") and "100% (base) → 40% (tuned)" in reasons[0]
    assert any(r.startswith("weight_diff:") for r in reasons)  # every analyzer's reason is cited


def test_functional_evidence_of_loss_makes_a_capability_change():
    verdict, score, _ = weigh(
        [_ev("probing", "change", 0.7), _ev("revival", "change", 0.4), _ev("patching", "wrapper", 0.5)], LOST
    )
    assert verdict == "capability_change" and score < 0


def test_structural_evidence_alone_never_makes_a_wrapper():
    verdict, _, reasons = weigh([_ev("weight_diff", "wrapper", 1.0), _ev("patching", "wrapper", 1.0)], LOST)
    assert verdict == "inconclusive" and "no functional analyzer" in reasons[0]


def test_disagreeing_functional_evidence_is_inconclusive():
    verdict, _, reasons = weigh([_ev("probing", "wrapper", 0.9), _ev("revival", "change", 0.6)], LOST)
    assert verdict == "inconclusive" and "disagrees" in reasons[0]


def test_no_loss_or_no_capability_is_inconclusive():
    kept = {"base": {"capability": 1.0, "downstream": 0.1}, "tuned": {"capability": 0.97, "downstream": 0.9}}
    assert weigh([_ev("probing", "wrapper", 0.9)], kept)[0] == "inconclusive"
    never = {"base": {"capability": 0.2, "downstream": 0.1}, "tuned": {"capability": 0.1, "downstream": 0.9}}
    verdict, _, reasons = weigh([_ev("probing", "wrapper", 0.9)], never)
    assert verdict == "inconclusive" and "barely has the capability" in reasons[0]


@pytest.fixture(scope="module")
def trained_pair():
    """A small counter (count a), then fine-tuned hard to count b: a real pair to diagnose."""
    capability = PCFGTask("count", "a", config=PCFGConfig(length=10, window=5, occurrence=2))
    downstream = PCFGTask("count", "b", config=capability.config)
    spec = ModelSpec(d_vocab=capability.d_vocab, n_ctx=capability.seq_len, n_layers=2, d_model=32, n_heads=4)
    base = build_model(spec, seed=0)
    train(base, PCFGTask("count", None, prior=(0.5, 0.5, 0.0), config=capability.config),
          TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))  # fmt: skip
    tuned = base.clone()
    train(tuned, downstream, TrainConfig(steps=40, batch_size=64, lr=3e-3, seed=1, progress=False))
    return base, tuned, capability, downstream


def test_diagnose_runs_analyzers_and_writes_json_and_html(trained_pair, tmp_path):
    base, tuned, capability, downstream = trained_pair
    analyzers = [Probing(n=300, steps=100), Revival(max_steps=30, eval_every=10, eval_size=128, control_steps=20),
                 WeightDiff(graft_fractions=(0.1,), eval_size=128), AttentionComparison(n=64), Patching(n=32)]  # fmt: skip
    d = diagnose(base, tuned, capability, downstream, analyzers=analyzers, eval_size=256, progress=False)
    assert d.verdict in ("wrapper", "capability_change", "inconclusive")
    assert [e.analyzer for e in d.evidence] == ["probing", "revival", "weight_diff", "attention", "patching"]
    table = d.summary()
    assert list(table["kind"]) == ["functional", "functional", "structural", "structural", "structural"]
    assert set(d.seconds) == set(table["analyzer"])
    assert d["revival"].headline["budget"] == 30
    data = json.loads(d.to_json(tmp_path / "diagnosis.json"))
    assert data["verdict"] == d.verdict and len(data["evidence"]) == 5
    assert json.loads((tmp_path / "diagnosis.json").read_text()) == data
    d.to_html(tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert f"Verdict: {d.verdict}" in html and html.count("Plotly.newPlot") == 5 and "<script src=" not in html


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
    analyzers = [Probing(n=256, steps=50), Pruning(ks=(0, 2), eval_size=128, score_size=128),
                 Revival(max_steps=20, eval_every=10, eval_size=128, control_steps=10),
                 WeightDiff(graft_fractions=(0.1,), eval_size=128), AttentionComparison(n=64), Patching(n=16)]  # fmt: skip
    d = diagnose(base, tuned, capability, downstream, analyzers=analyzers, eval_size=128, progress=False)
    assert [e.analyzer for e in d.evidence] == ["probing", "pruning", "revival", "weight_diff", "attention", "patching"]
    assert d.verdict in ("wrapper", "capability_change", "inconclusive")
    changed = d["weight_diff"].table.set_index("component")
    assert "L1H3" in changed.index and changed.loc["L1.attn", "change"] > 0  # heads without q/k/v biases
    assert len(d["attention"].table) == 8 and len(d["patching"].table) > 0
