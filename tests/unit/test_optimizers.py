"""Optimizers from a TrainConfig, and the update run inside the backward pass (low-memory training)."""

from __future__ import annotations

import pytest
import torch

from capwrap.errors import ConfigError, StoreError
from capwrap.methods import CircuitTuning
from capwrap.models import build_model
from capwrap.optimizers import StepInBackward, make_optimizer
from capwrap.recording import Recorder
from capwrap.recording.train_state import load_train_state, save_train_state
from capwrap.tasks import task_loss
from capwrap.training import TrainConfig, train

BASE = dict(steps=5, batch_size=16, lr=3e-3, warmup=0.2, seed=2, progress=False, grad_clip=None)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_the_update_inside_backward_is_the_update_after_it(small_spec, small_task, backend, optimizer):
    """Same weights and gradient norms either way, on both backends — the bridge's query/key/value
    weights are views of one fused tensor, which must be updated together."""
    runs = {}
    for in_backward in (False, True):
        model = build_model(small_spec, backend=backend, seed=0)
        config = TrainConfig(**BASE, optimizer=optimizer, step_in_backward=in_backward)
        runs[in_backward] = (model, train(model, small_task, config).history)
    (after, history_after), (inside, history_inside) = runs[False], runs[True]
    for name, weight in after.weights().items():
        torch.testing.assert_close(inside.weights()[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert (after.weights()["blocks.0.attn.W_Q"] != build_model(small_spec, backend=backend, seed=0).weights()[
        "blocks.0.attn.W_Q"]).any()  # fmt: skip
    torch.testing.assert_close(history_inside["grad_norm"].to_numpy(), history_after["grad_norm"].to_numpy(), rtol=1e-5, atol=0)
    torch.testing.assert_close(history_inside["loss"].to_numpy(), history_after["loss"].to_numpy(), rtol=1e-5, atol=0)


def test_no_gradient_is_left_and_later_backward_passes_update_nothing(small_model, small_task):
    train(small_model, small_task, TrainConfig(**BASE).low_memory())
    assert all(p.grad is None for p in small_model.parameters())
    before = {k: v.clone() for k, v in small_model.weights().items()}
    batch = small_task.sample(8, seed=0)
    task_loss(small_model(batch.tokens), batch).backward()  # the hooks are gone: gradients only
    assert any(p.grad is not None for p in small_model.parameters())
    for name, weight in small_model.weights().items():
        assert torch.equal(weight, before[name]), name


def test_stale_gradients_are_not_applied_and_no_gradient_outlives_a_backward_pass(small_spec, small_task, backend):
    config = TrainConfig(**BASE).low_memory()
    clean, stale = build_model(small_spec, backend=backend, seed=0), build_model(small_spec, backend=backend, seed=0)
    for p in stale.parameters():
        p.grad = torch.ones_like(p)  # left over from the user's own backward pass
    train(clean, small_task, config)
    train(stale, small_task, config)
    for name, weight in clean.weights().items():
        assert torch.equal(stale.weights()[name], weight), name
    # after the first step it is known which parameters get gradients (not a fused weight the
    # backend only reads through views): every later update happens inside backward()
    optimizer = make_optimizer(clean.parameters(), config)
    batch = small_task.sample(8, seed=0)
    for step in range(2):
        optimizer.zero_grad()
        task_loss(clean(batch.tokens), batch).backward()
        held = [tuple(p.shape) for p in clean.parameters() if p.grad is not None]
        assert step == 0 or not held, held
        optimizer.step()
    optimizer.remove()


def test_hooks_are_removed_when_training_fails_before_its_first_step(small_model, small_task, tmp_path):
    Recorder(small_model.clone(), tmp_path / "run", hooks=()).open().close()
    with pytest.raises(StoreError):  # the store exists: the recorder refuses to open it
        train(small_model, small_task, TrainConfig(**BASE).low_memory(), recorder=Recorder(small_model, tmp_path / "run", hooks=()))
    before = {k: v.clone() for k, v in small_model.weights().items()}
    batch = small_task.sample(8, seed=0)
    task_loss(small_model(batch.tokens), batch).backward()
    assert all(torch.equal(w, before[k]) for k, w in small_model.weights().items())


def test_adafactor_keeps_far_less_state_than_adamw(small_model):
    params = small_model.parameters()
    sizes = {}
    for name in ("adamw", "adafactor"):
        optimizer = make_optimizer(params, TrainConfig(optimizer=name, grad_clip=None, step_in_backward=True))
        for p in params:
            p.grad = torch.ones_like(p)
        for group in optimizer.inner:
            group.step()
        sizes[name] = sum(t.numel() for state in optimizer.state_dict()["per_group"] for s in state["state"].values()
                          for t in s.values() if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
        optimizer.remove()
    n_params = sum(p.numel() for p in params)
    assert sizes["adamw"] >= 2 * n_params * 0.99  # two moments per weight (over the trained views)
    assert sizes["adafactor"] < 0.3 * n_params  # one row and one column vector per matrix


def test_a_resumed_low_memory_run_ends_where_an_uninterrupted_one_does(small_spec, small_task, tmp_path):
    config = TrainConfig(**{**BASE, "steps": 6, "checkpoint_every": 3}).low_memory()

    def crash(info):
        if info.step == 4:
            raise KeyboardInterrupt

    model = build_model(small_spec, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train(model, small_task, config, recorder=Recorder(model, tmp_path / "run", hooks=()), callbacks=[crash])
    state = load_train_state(tmp_path / "run")  # a checkpoint written before step_in_backward existed
    state["config"].pop("step_in_backward")
    save_train_state(tmp_path / "run", state)
    resumed = build_model(small_spec, seed=5)
    with pytest.raises(ConfigError, match=r"step_in_backward \(False vs True\)"):  # the missing field: its default
        train(resumed, small_task, config, recorder=Recorder(resumed, tmp_path / "run", resume=True))
    state["config"]["step_in_backward"] = True
    save_train_state(tmp_path / "run", state)
    train(resumed, small_task, config, recorder=Recorder(resumed, tmp_path / "run", resume=True))
    whole = build_model(small_spec, seed=0)
    train(whole, small_task, config, recorder=Recorder(whole, tmp_path / "whole", hooks=()))
    for name, weight in whole.weights().items():
        assert torch.equal(resumed.weights()[name], weight), name


def test_update_inside_backward_refuses_what_it_cannot_do(small_model, small_task):
    with pytest.raises(ConfigError, match="grad_clip=None"):
        TrainConfig(step_in_backward=True)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="circuit_tuning method edits the gradients"):
        train(small_model, small_task, TrainConfig(**BASE).low_memory(), method=CircuitTuning(top_n=3))
    assert isinstance(make_optimizer(small_model.parameters(), TrainConfig(**BASE).low_memory()), StepInBackward)


def test_weight_decay_is_applied_by_every_optimizer_and_defaults_by_optimizer():
    """An explicit weight decay reaches every rule (SGD as an L2 term, as the circuit-tuning protocol's
    "SGD, momentum 0.9, weight decay 1e-4" needs); left out, AdamW and Adafactor decay by 0.01 and
    SGD not at all (the paper's Tracr runs; until 2026-12-07 SGD dropped any weight decay, unsaid)."""
    params = [torch.nn.Parameter(torch.ones(3))]
    for optimizer, default in (("adamw", 0.01), ("adafactor", 0.01), ("sgd", 0.0)):
        assert TrainConfig(optimizer=optimizer).applied_weight_decay == default
        made = make_optimizer(params, TrainConfig(optimizer=optimizer, weight_decay=1e-4))
        assert made.param_groups[0]["weight_decay"] == 1e-4, optimizer
    sgd = make_optimizer(params, TrainConfig(optimizer="sgd", momentum=0.9, weight_decay=1e-4, lr=0.1))
    params[0].grad = torch.zeros(3)
    sgd.step()  # no gradient: only the decay moves the weights, by lr * wd * w
    torch.testing.assert_close(params[0].detach(), torch.full((3,), 1 - 0.1 * 1e-4))
    with pytest.raises(ConfigError, match="weight_decay must not be negative"):
        TrainConfig(weight_decay=-1.0)
