"""Pruning: scores, nested top-K sweeps, reviving a planted wrapper, bad input."""

from __future__ import annotations

import pytest
import torch

from capwrap.analyzers import ModelPair, Pruning, prune, unit_scores
from capwrap.analyzers.pruning import unit_gradient_scores
from capwrap.errors import ConfigError
from capwrap.models import build_model
from capwrap.tasks import accuracy
from capwrap.training import TrainConfig, train


def test_scores_order_and_granularities(small_model, small_task):
    mag = unit_scores(small_model, small_task, "magnitude", "neuron", n=32)
    assert len(mag) == len(small_model.components.select("neuron"))
    assert mag["score"].is_monotonic_increasing  # magnitude prunes the smallest first
    gxw = unit_scores(small_model, small_task, "grad_x_weight", "head", n=32)
    assert gxw["score"].is_monotonic_decreasing and len(gxw) == 8  # the paper's score prunes the highest first
    wanda = unit_scores(small_model, small_task, "wanda", "weight", n=32)
    assert wanda["unit"].iloc[0].startswith("blocks.") and (wanda["score"] >= 0).all()
    assert not any(p.grad is not None for p in small_model.parameters())  # scoring leaves no gradients behind


def test_gradient_scores_in_passes_that_fit_the_budget_equal_one_pass(small_model, small_task, monkeypatch):
    """With a pass budget of a few sequences the loss gradient is summed over passes: same scores."""
    import capwrap.models.model

    whole = unit_scores(small_model, small_task, "grad_x_weight", "neuron", n=24).set_index("unit")["score"]
    monkeypatch.setattr(capwrap.models.model, "PASS_BUDGET", 1)  # one sequence per pass
    assert small_model.rows_per_pass(small_task.seq_len, backward=True) == 1
    chunked = unit_scores(small_model, small_task, "grad_x_weight", "neuron", n=24).set_index("unit")["score"]
    torch.testing.assert_close(torch.tensor(chunked[whole.index].to_numpy()), torch.tensor(whole.to_numpy()),
                               rtol=1e-4, atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("kind", ["head", "neuron"])
def test_unit_scores_from_activations_equal_gradient_times_weight(small_model, small_task, kind,
                                                                  weight_gradient_unit_scores):  # fmt: skip
    """Heads and neurons are scored from activations and their gradients (no weight gradient is
    held): the same numbers as Σ gradient ⊙ weight, on capwrap's models and on a compiled Tracr model."""
    from capwrap.tasks.spec import task_from_spec
    from capwrap.validation.bases import load_base

    tracr = load_base("tracr-counter")
    for model, task in ((small_model, small_task), (tracr, task_from_spec("tracr=counter,operand=a", model=tracr))):
        batch = task.sample(16, seed=3)
        new = unit_gradient_scores(model, batch, kind)
        reference = weight_gradient_unit_scores(model, batch, kind)
        scale = max(abs(v) for v in reference.values())
        assert new.keys() == reference.keys() and scale > 0
        torch.testing.assert_close(torch.tensor([new[k] for k in reference]), torch.tensor(list(reference.values())),
                                   rtol=1e-4, atol=1e-5 * scale)  # fmt: skip
        assert not any(p.grad is not None for p in model.parameters())


def test_grad_x_weight_is_the_first_order_loss_change(small_spec, small_task):
    """Zeroing the top-scored neuron lowers the capability loss about as much as its score says."""
    from capwrap.tasks import answer_loss

    model = build_model(small_spec, seed=0)
    train(model, small_task, TrainConfig(steps=30, batch_size=32, lr=3e-3, progress=False))
    scores = unit_scores(model, small_task, "grad_x_weight", "neuron", n=256, seed=4)
    batch = small_task.sample(256, seed=4)
    with torch.no_grad():
        before = float(answer_loss(model(batch.tokens), batch))
        after = float(answer_loss(prune(model.clone(), [scores["unit"].iloc[0]])(batch.tokens), batch))
    assert after < before
    assert 0.2 < (before - after) / scores["score"].iloc[0] < 5  # first-order: right sign and size


def test_pruning_a_planted_wrapper_revives_the_capability(small_spec, small_task, backend):
    base = build_model(small_spec, backend=backend, seed=0)
    train(base, small_task, TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))
    base_acc = accuracy(base, small_task.sample(512, seed=1))
    # the "wrapper": two neurons whose output rows push every answer towards one wrong token
    tuned = base.clone()
    w = tuned.weights()
    with torch.no_grad():
        wrong = small_task.vocab["<none>"]
        for n in (3, 9):
            w["blocks.1.mlp.b_in"][n] = 50.0
            w["blocks.1.mlp.W_out"][n] = 2.0 * w["unembed.W_U"][:, wrong] / w["unembed.W_U"][:, wrong].norm()
    assert accuracy(tuned, small_task.sample(512, seed=1)) < 0.5 * base_acc
    ev = Pruning(ks=(0, 1, 2, 4), score_size=256)(ModelPair(base, tuned), small_task, small_task, eval_size=512)
    assert ev.value > 0.9 and ev.intervals["value"][0] > 0.8  # nearly all of the loss comes back
    assert ev.direction == "wrapper"
    assert ev.headline["k_to_revive"] <= 2
    assert set(ev.details["top_units"][i]["unit"] for i in range(2)) == {"L1N3", "L1N9"}


def test_bad_input(small_model, small_task):
    pair = ModelPair(small_model, small_model.clone())
    for ks in ((), (0,)):  # nothing pruned: the recovered share would read nan%
        with pytest.raises(ConfigError, match="ks needs a K above 0"):
            Pruning(ks=ks)
    with pytest.raises(ConfigError, match=r"every K in ks \(units to prune\) must be a whole number >= 0, got 1.0"):
        Pruning(ks=(0, 1.0))
    with pytest.raises(ConfigError, match="ks is a list of unit counts"):
        Pruning(ks=5)
    assert Pruning(ks=[0, 2]).ks == (0, 2)
    with pytest.raises(ConfigError, match="larger than the 8 head units"):
        Pruning(granularity="head", ks=(0, 9), score_size=8)(pair, small_task, small_task, eval_size=8)
    with pytest.raises(ConfigError, match="unknown pruning method"):
        unit_scores(small_model, small_task, "random", "neuron")  # type: ignore[arg-type]


def test_pruning_single_weights_of_a_compiled_model():
    """Weight granularity on views that are not contiguous (a Tracr model on TransformerLens's native
    module): the named entry, and only it, becomes zero."""
    from capwrap.tasks.spec import task_from_spec
    from capwrap.validation.bases import load_base

    model = load_base("tracr-counter")
    task = task_from_spec("tracr=counter,operand=a", model=model)
    scores = unit_scores(model, task, "grad_x_weight", "weight", n=64)
    before = {k: v.detach().clone() for k, v in model.weights().items()}
    for unit in scores["unit"].iloc[:3]:
        name, index = unit[:-1].split("[")
        prune(model, [unit])
        assert model.weights()[name].flatten()[int(index)] == 0.0
    changed = sum(int((model.weights()[k] != v).sum()) for k, v in before.items())
    assert changed == sum(float(before[u[:-1].split("[")[0]].flatten()[int(u[:-1].split("[")[1])]) != 0
                          for u in scores["unit"].iloc[:3])  # fmt: skip


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_wanda_scales_a_model_without_normalization_by_its_raw_residual_stream(granularity):
    """A compiled Tracr model has no normalization: Wanda looked for ``ln1.hook_normalized`` and
    stopped with a HookNameError (the error Pruning gives for Tracr models recommends
    granularity='weight'). Its attention reads the residual stream before the block, its MLP the one
    between attention and MLP."""
    from capwrap.tasks.spec import task_from_spec
    from capwrap.validation.bases import load_base

    model = load_base("tracr-counter")
    task = task_from_spec("tracr=counter,operand=a", model=model)
    scores = unit_scores(model, task, "wanda", granularity, n=32, seed=0).set_index("unit")["score"]
    tokens = task.sample(32, seed=0).tokens
    acts = model.capture(tokens, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"])
    mid = torch.linalg.vector_norm(acts["blocks.0.hook_resid_mid"].float(), dim=(0, 1))
    w_in = model.weights()["blocks.0.mlp.W_in"].detach().abs()  # [d_model, d_mlp]
    if granularity == "weight":
        assert scores["blocks.0.mlp.W_in[0]"] == pytest.approx(float(w_in[0, 0] * mid[0]), rel=1e-5)
    else:
        assert len(scores) == model.spec.d_mlp and scores.notna().all()
