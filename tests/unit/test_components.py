"""The component map: names, slices and vectorized norms."""

from __future__ import annotations

import pytest
import torch

from capwrap.errors import ConfigError
from capwrap.models import ComponentMap, ModelSpec


@pytest.fixture
def cmap() -> ComponentMap:
    return ComponentMap.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=2, d_model=8, n_heads=2, d_mlp=6))


def test_counts(cmap):
    assert cmap.counts() == {
        "embed": 1,
        "pos_embed": 1,
        "unembed": 1,
        "norm": 5,
        "attn": 2,
        "head": 4,
        "mlp": 2,
        "neuron": 12,
    }


def test_head_and_neuron_slices(small_model):
    w = small_model.weights()
    head = small_model.components["L1H3"]
    assert {s.param for s in head.slices} >= {"blocks.1.attn.W_Q", "blocks.1.attn.W_O"}
    assert torch.equal(head.slices[0].of(w), w["blocks.1.attn.W_Q"][3])
    neuron = small_model.components["L0N7"]
    w_in = next(s for s in neuron.slices if s.param.endswith("W_in"))
    assert torch.equal(w_in.of(w), w["blocks.0.mlp.W_in"][:, 7])


@pytest.mark.parametrize("kind", ["head", "neuron", "attn", "mlp", "norm", "embed"])
def test_vectorized_norms_equal_the_per_component_loop(small_model, kind):
    w = small_model.weights()
    fast = small_model.components.sq_norms(w, kind)
    slow = torch.tensor(
        [
            sum(float(s.of(w).detach().double().pow(2).sum()) for s in c.slices)
            for c in small_model.components.select(kind)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-8)


def test_norms_of_several_kinds_at_once_equal_one_kind_at_a_time(small_model):
    w = small_model.weights()
    kinds = ["neuron", "head", "attn", "mlp", "embed"]
    together = small_model.components.sq_norms_by_kind(w, kinds)
    assert list(together) == kinds
    for kind in kinds:
        torch.testing.assert_close(together[kind].double(), small_model.components.sq_norms(w, kind), rtol=1e-6, atol=0)
    layer0 = {k: v for k, v in w.items() if k.startswith("blocks.0.")}  # partial: the rest counts 0
    part = small_model.components.sq_norms_by_kind(layer0, ["head"], partial=True)["head"]
    heads = small_model.components.select("head")
    assert all((part[i] > 0) == (c.layer == 0) for i, c in enumerate(heads))
    with pytest.raises(ConfigError, match="not a string"):
        small_model.components.sq_norms_by_kind(w, "head")


def test_unknown_names_and_kinds(cmap):
    with pytest.raises(ConfigError, match="L1H1"):
        cmap["L1H9x"]
    with pytest.raises(ConfigError, match="choose one of"):
        cmap.select("neurons")
