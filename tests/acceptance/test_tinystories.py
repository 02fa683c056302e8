"""`capwrap diagnose` on the real stories260K and a fine-tune of it made by capwrap: the paper's
filtering protocol removes dialogue from what the model writes; diagnose reports what remains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import capwrap
from capwrap.cli import main
from capwrap.tasks import TextTask, feature_frequency, filter_out, load_texts

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories"
TEXT = SHARED / "text" / "train_head.txt"
MODEL = SHARED / "stories260K"
SEQ_LEN = 64  # half the tutorial's 128: the same effect in half the arithmetic

# Backend-independent end to end (stories260K loads and writes the same story on every backend:
# tests/unit/test_models.py), so it runs on the TransformerLens 4.x line only.


@pytest.fixture(scope="module")
def suppressed(tmp_path_factory):
    if not (MODEL / "model.safetensors").exists() or not TEXT.exists():
        pytest.skip("the shared TinyStories folder is absent")
    root = tmp_path_factory.mktemp("tinystories")
    base = capwrap.load_model(MODEL)
    texts = load_texts(TEXT)
    without = TextTask(filter_out(texts, "dialogue"), base.tokenizer, seq_len=SEQ_LEN)
    tuned = base.clone()
    capwrap.train(tuned, without, capwrap.TrainConfig(steps=200, batch_size=32, lr=1e-3, warmup=0.1, progress=False))
    capwrap.save_model(tuned, root / "tuned")
    return base, tuned, root


def test_filtering_suppresses_dialogue_in_what_the_model_writes(suppressed):
    base, tuned, _ = suppressed
    before, _ = feature_frequency(base, "dialogue", n=48, max_new_tokens=100, seed=1)
    after, _ = feature_frequency(tuned, "dialogue", n=48, max_new_tokens=100, seed=1)
    assert before > 0.1 and after < 0.5 * before


def test_capwrap_diagnose_on_stories260k_and_its_fine_tune(suppressed, capsys):
    _, _, root = suppressed
    out = root / "diagnosis"
    code = main(["diagnose", str(MODEL), str(root / "tuned"), "--capability", f"text={TEXT},feature=dialogue,seq_len={SEQ_LEN}",
                 "--downstream", f"text={TEXT},without=dialogue,seq_len={SEQ_LEN}", "--out", str(out), "--quick", "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed
    summary = json.loads((out / "summary.json").read_text())
    acc = summary["accuracy"]
    assert acc["base"]["capability"] > 0.5 > acc["tuned"]["capability"]  # it stopped opening quotes
    evidence = {e["analyzer"]: e for e in summary["evidence"]}
    assert evidence["revival"]["headline"]["steps_tuned"] < 100  # comes back within a few reverse steps
    # the paper's TinyStories finding: the suppressed capability is hidden, not deleted — pruning
    # releases it and reverse fine-tuning revives it
    assert summary["findings"]["deletion"]["verdict"] == "wrapper", summary["findings"]["deletion"]["reasons"]
    assert evidence["pruning"]["direction"] == "wrapper" and evidence["revival"]["direction"] == "wrapper"
    assert summary["verdict"] == "wrapper"
    assert "Plotly.newPlot" in (out / "report.html").read_text()
