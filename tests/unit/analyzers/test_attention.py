"""Attention comparison: identical models show no change; a perturbed head is found."""

from __future__ import annotations

import pytest
import torch

from capwrap.analyzers import AttentionComparison, ModelPair
from capwrap.errors import ConfigError
from capwrap.models import build_model


def test_identical_models_have_identical_patterns(small_model, small_task):
    ev = AttentionComparison(n=32)(ModelPair(small_model, small_model.clone()), small_task, small_task, eval_size=32)
    assert ev.table["tv_answer"].max() == pytest.approx(0.0, abs=1e-6)
    assert ev.headline["heads_changed"] == 0 and ev.value == pytest.approx(0.0, abs=1e-6)
    assert len(ev.table) == small_model.spec.n_layers * small_model.spec.n_heads


def test_a_perturbed_head_is_found_first(small_spec, small_task, backend):
    base = build_model(small_spec, backend=backend, seed=0)
    tuned = base.clone()
    with torch.no_grad():
        tuned.weights()["blocks.1.attn.W_Q"][2] *= 25.0  # sharpen one head's attention
    ev = AttentionComparison(n=64)(ModelPair(base, tuned), small_task, small_task, eval_size=64)
    assert ev.table.iloc[0]["component"] == "L1H2"
    n_heads = small_spec.n_layers * small_spec.n_heads
    assert ev.value == pytest.approx(ev.table["tv_answer"].sum() / n_heads, rel=1e-4)  # the mean over heads
    assert ev.table.iloc[0]["tv_answer"] > 0.02
    others = ev.table[ev.table["component"] != "L1H2"]
    assert others["tv_all"].max() < 1e-5  # other heads' patterns are untouched (layer 0 and layer 1's other heads)
    assert ev.figure().data


def test_bad_settings():
    with pytest.raises(ConfigError, match="n must be positive"):
        AttentionComparison(n=0)
