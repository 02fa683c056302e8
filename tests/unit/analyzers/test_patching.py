"""Activation patching: the same numbers as TransformerLens's `patching`, within and across models."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tl_patching

from capwrap.analyzers import ModelPair, Patching, activation_patching, patch_index
from capwrap.analyzers.patching import EngineSettings, answer_logprob, correlation, engine_settings
from capwrap.errors import ConfigError
from capwrap.models import ModelSpec, build_model
from capwrap.models.functional import Functional
from capwrap.tasks import PCFGConfig, PCFGTask, TaskBatch
from capwrap.tasks.base import answer_logits

ALL_SITES = ("resid_pre", "attn_out", "mlp_out", "head")


@pytest.fixture
def task() -> PCFGTask:
    return PCFGTask(family="count", operand="a", config=PCFGConfig(length=10, window=5, occurrence=2))


def _sharp_model(task, backend, architecture="gpt2", seed=0, n_layers=2):
    """A random model with weights scaled up so that patches have visible effects."""
    extra = {
        "llama": {"n_key_value_heads": 2},
        "gpt_neo": {"attention_layers": ("local", "global"), "window_size": 3},  # TinyStories' layer kinds
    }.get(architecture, {})
    spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=n_layers, d_model=32, n_heads=4,
                     architecture=architecture, **extra)  # fmt: skip
    model = build_model(spec, backend=backend, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.weights().items():
            if name == "unembed.W_U":
                w.mul_(30.0)
            elif w.ndim > 1:
                w.mul_(3.0)
            else:
                w.add_(0.2 * torch.randn(w.shape, generator=gen))
    return model.eval()


def _clean_corrupt(task, n=6):
    clean, corrupt = task.sample(n, seed=0), task.sample(n, seed=1)
    return clean, TaskBatch(corrupt.tokens, clean.answer_pos, clean.answers, corrupt.labels)


@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neo", "llama"])
def test_functional_forward_matches_the_model_hooks(task, backend, architecture):
    model = _sharp_model(task, backend, architecture)
    tokens = task.sample(4, seed=2).tokens
    trace = Functional(model).trace(tokens)
    acts = model.capture(tokens, ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"])
    torch.testing.assert_close(trace.resid_pre[1], acts["blocks.1.hook_resid_pre"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.z[1], acts["blocks.1.attn.hook_z"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.mlp_out[0], acts["blocks.0.hook_mlp_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.logits, model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ["resumed", "hooks"])
@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neo", "llama"])
def test_within_model_patching_equals_transformer_lens(task, backend, architecture, engine):
    model = _sharp_model(task, backend, architecture)
    clean, corrupt = _clean_corrupt(task)
    result = activation_patching(model, corrupt, source_tokens=clean.tokens, sites=ALL_SITES, positions="both",
                                 engine=engine, progress=False)  # fmt: skip

    def metric(logits):
        return answer_logprob(answer_logits(logits, corrupt), corrupt).mean()

    _, cache = model.module.run_with_cache(clean.tokens)
    references = {
        ("resid_pre", False): tl_patching.get_act_patch_resid_pre,
        ("attn_out", False): tl_patching.get_act_patch_attn_out,
        ("mlp_out", False): tl_patching.get_act_patch_mlp_out,
        ("head", False): tl_patching.get_act_patch_attn_head_out_by_pos,
        ("head", True): tl_patching.get_act_patch_attn_head_out_all_pos,
    }
    spread = 0.0
    for (site, all_positions), reference in references.items():
        expected = reference(model.module, corrupt.tokens, cache, metric).detach().cpu()
        got = result.grid(site, all_positions=all_positions)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        spread = max(spread, float(expected.max() - expected.min()))
    assert spread > 0.01  # the patches do something, so agreement means something


def test_across_models_final_residual_restores_the_source_exactly(task, backend):
    base = _sharp_model(task, backend, "llama", seed=0)
    tuned = base.clone()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every block changes; embeddings and unembedding stay
        for name, w in tuned.weights().items():
            if name.startswith("blocks."):
                w.add_(0.3 * torch.randn(w.shape, generator=gen))
    batch = task.sample(8, seed=3)
    result = activation_patching(tuned, batch, source=base, sites=("resid_post", "mlp_out", "head"),
                                 positions="all", progress=False)  # fmt: skip
    last = result.table[(result.table.site == "resid_post") & (result.table.layer == 1)].iloc[0]
    assert abs(last.restored - 1.0) < 1e-4  # the whole final residual stream is the source's
    assert abs(last.value - float(result.source_baseline.mean())) < 1e-4
    hooks = activation_patching(tuned, batch, source=base, sites=("resid_post", "mlp_out", "head"),
                                positions="all", engine="hooks", progress=False)  # fmt: skip
    torch.testing.assert_close(result.values, hooks.values, atol=1e-4, rtol=0)


def test_patching_a_model_with_itself_changes_nothing(task, backend):
    model = _sharp_model(task, backend)
    batch = task.sample(5, seed=4)
    result = activation_patching(model, batch, source=model.clone(), positions="each", progress=False)
    assert float(result.table["effect"].abs().max()) < 1e-6


def test_a_patch_index_of_small_integer_columns_and_repeated_rows(task, backend):
    # a user's own index: int8 columns (torch reads uint8 index tensors as masks, int8 not at all)
    # and the same patch twice; both engines give every row its own value
    model = _sharp_model(task, backend)
    clean, corrupt = _clean_corrupt(task)
    index = patch_index(2, model.spec.n_heads, clean.tokens.shape[1], ("resid_pre", "head"), "both").iloc[::7]
    index = pd.concat([index, index.iloc[:3]]).astype({"layer": "int8", "pos": "int8", "head": "int8"})
    kwargs = dict(source_tokens=clean.tokens, index=index, progress=False)
    fast = activation_patching(model, corrupt, engine="resumed", **kwargs)
    hooks = activation_patching(model, corrupt, engine="hooks", **kwargs)
    torch.testing.assert_close(fast.values, hooks.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.values[-3:], fast.values[:3], atol=0, rtol=0)
    assert float(fast.table["effect"].abs().max()) > 0.01


def test_chunking_to_a_tiny_memory_budget_gives_the_same_numbers(task, backend):
    model = _sharp_model(task, backend)
    clean, corrupt = _clean_corrupt(task)
    big = activation_patching(model, corrupt, source_tokens=clean.tokens, progress=False)
    tiny = activation_patching(model, corrupt, source_tokens=clean.tokens, memory_mb=0.01, progress=False)
    torch.testing.assert_close(big.values, tiny.values, atol=1e-5, rtol=0)


def test_the_device_picks_the_engine_and_its_budget_unless_the_caller_does(task, backend):
    model = _sharp_model(task, backend)
    assert engine_settings(model) == EngineSettings("resumed", 128.0)  # the CPU's (GPU: tests/gpu)
    assert engine_settings(model, "hooks") == EngineSettings("hooks", 128.0)
    assert engine_settings(model, memory_mb=16) == EngineSettings("resumed", 16.0)
    clean, corrupt = _clean_corrupt(task, n=4)
    with pytest.raises(ConfigError, match="engine must be 'auto', 'resumed' or 'hooks', got 'fast'"):
        activation_patching(model, corrupt, source_tokens=clean.tokens, engine="fast", progress=False)
    with pytest.raises(ConfigError, match="memory_mb must be positive, got 0"):
        activation_patching(model, corrupt, source_tokens=clean.tokens, memory_mb=0, progress=False)
    with pytest.raises(ConfigError, match="Patching.memory_mb must be positive"):
        Patching(memory_mb=-1.0)


def test_attribution_patching_tracks_exact_patching(task, backend):
    model = _sharp_model(task, backend)
    clean, corrupt = _clean_corrupt(task, n=8)
    kwargs = dict(source_tokens=clean.tokens, sites=ALL_SITES, positions="each", progress=False)
    exact = activation_patching(model, corrupt, **kwargs)
    approx = activation_patching(model, corrupt, method="attribution", **kwargs)
    assert approx.method == "attribution"
    assert correlation(exact.table["effect"], approx.table["effect"]) > 0.7


def _pair_differing_in_one_head(task, backend, layer, n_layers=2):
    first = _sharp_model(task, backend, n_layers=n_layers)
    second = first.clone()
    with torch.no_grad():
        second.weights()[f"blocks.{layer}.attn.W_O"][2] *= -4.0  # one head is the only difference
    batch = task.sample(32, seed=0)
    with torch.no_grad():
        scores = [float(answer_logprob(answer_logits(m(batch.tokens), batch), batch).mean()) for m in (first, second)]
    return ModelPair(*((first, second) if scores[0] > scores[1] else (second, first)))  # the tuned one lost log-prob


def test_patching_analyzer_finds_a_planted_early_head_change(task, backend):
    ev = Patching(n=32)(_pair_differing_in_one_head(task, backend, layer=0), task, task, eval_size=32)
    assert ev.table.iloc[0]["component"] in ("L0H2", "L0.attn_out")
    assert ev.headline["best_restored"] > 0.99
    assert ev.value > 0.99  # restored from layer 0, with all of layer 1 after it
    assert ev.direction == "wrapper"  # layer 1 of the tuned model still does the rest
    assert ev.figure().data


def test_patching_statistic_is_a_share_and_only_exact_patches_are_weighed(task, backend):
    """The statistic caps each patch's restored share at 1 (a patch can overshoot the base); the
    summary says so; attribution's linear estimates are reported but not weighed (their scale is
    not the exact patches' the rule's anchor was fitted on); swapped models are said to have lost nothing."""
    pair = _pair_differing_in_one_head(task, backend, layer=0)
    exact = Patching(n=32)(pair, task, task, eval_size=32)
    assert 0 < exact.value <= 1 and (exact.replicates <= 1).all()
    estimated = Patching(n=32, method="attribution")(pair, task, task, eval_size=32)
    assert math.isnan(estimated.value) and not estimated.applicable and estimated.direction == "neutral"
    assert estimated.headline["best_restored"] == estimated.table["restored"].max()
    assert "estimated by attribution (linear), which the verdict does not weigh" in estimated.summary
    swapped = Patching(n=32)(ModelPair(pair.tuned, pair.base), task, task, eval_size=32)
    assert "answer log-probability is above the base's" in swapped.summary and math.isnan(swapped.value)


def test_patching_analyzer_does_not_read_a_last_layer_change_as_a_wrapper(task, backend):
    ev = Patching(n=32)(_pair_differing_in_one_head(task, backend, layer=1), task, task, eval_size=32)
    assert ev.table.iloc[0]["component"] in ("L1H2", "L1.attn_out")
    assert ev.headline["best_restored"] > 0.99
    assert ev.value < 0.05  # restoring the read-out says nothing about what lies underneath
    assert ev.direction != "wrapper"


def test_patching_does_not_weigh_a_one_layer_model(task, backend):
    """No component of a one-layer model has a layer after it: the statistic was 0 whatever patching
    restored (a Tracr counter's MLP restores 98% of the gap), and still counted as applicable, diluting
    the other evidence. It is not applicable there, and the summary names the largest restoration."""
    ev = Patching(n=32)(_pair_differing_in_one_head(task, backend, layer=0, n_layers=1), task, task, eval_size=32)
    assert math.isnan(ev.value) and not ev.applicable and ev.direction == "neutral"
    assert ev.headline["best_restored"] > 0.99
    assert "a one-layer model has no layers after any component" in ev.summary
    assert f"largest restoration: {ev.table.iloc[0]['component']}" in ev.summary


def test_patching_bad_input(task, backend):
    model = _sharp_model(task, backend)
    batch = task.sample(4, seed=0)
    with pytest.raises(ConfigError, match="unknown patching sites"):
        activation_patching(model, batch, sites=("resid",), progress=False)
    with pytest.raises(ConfigError, match="outside the sequences"):
        activation_patching(model, batch, positions=[99], progress=False)
    with pytest.raises(ConfigError, match="same shape"):
        activation_patching(model, batch, source_tokens=batch.tokens[:, :-1], progress=False)
    other = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=32, n_heads=4))
    with pytest.raises(ConfigError, match="the source and target models differ in n_layers"):
        activation_patching(model, batch, source=other, progress=False)
    with pytest.raises(ConfigError, match="method"):
        activation_patching(model, batch, method="guess", progress=False)
    with pytest.raises(ConfigError, match="empty"):
        activation_patching(model, batch, index=patch_index(2, 4, 4, ["head"], "all").iloc[:0], progress=False)
