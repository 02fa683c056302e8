"""Training methods: the default equals the plain loop; gradient ascent and NPO unlearn what they should."""

from __future__ import annotations

import math

import pytest
import torch

from capwrap.errors import ConfigError
from capwrap.methods import NPO, FineTune, GradientAscent, TrainingMethod, step_seed
from capwrap.models import build_model
from capwrap.tasks import PCFGTask, accuracy, task_loss
from capwrap.training import TrainConfig, train


def _loss_on(model, task, seed=123):
    batch = task.sample(64, seed=seed)
    with torch.no_grad():
        return float(task_loss(model(batch.tokens), batch))


def test_finetune_is_the_default(small_spec, small_task):
    cfg = TrainConfig(steps=4, batch_size=8, progress=False, seed=2)
    a, b = build_model(small_spec, seed=0), build_model(small_spec, seed=0)
    plain = train(a, small_task, cfg).history["loss"].tolist()
    explicit = train(b, small_task, cfg, method=FineTune()).history["loss"].tolist()
    assert plain == explicit


def test_gradient_ascent_raises_the_forget_loss_and_logs_both_terms(small_spec, small_task):
    model = build_model(small_spec, seed=0)
    train(model, small_task, TrainConfig(steps=40, batch_size=32, lr=3e-3, progress=False))  # learn a little first
    before = _loss_on(model, small_task)
    retain = PCFGTask("index", "a", config=small_task.config)
    result = train(model, small_task, TrainConfig(steps=20, batch_size=16, lr=3e-3, warmup=0.0, progress=False),
                   method=GradientAscent(retain=retain))  # fmt: skip
    assert _loss_on(model, small_task) > before + 0.5
    assert {"method/forget_loss", "method/retain_loss"} <= set(result.history.columns)
    assert (result.history["method/forget_loss"] < 0).all()  # the negated loss


def test_npo_starts_at_its_reference_value_and_lowers_the_answer_likelihood(small_spec, small_task):
    model = build_model(small_spec, seed=0)
    train(model, small_task, TrainConfig(steps=60, batch_size=32, lr=3e-3, progress=False))
    acc_before = accuracy(model, small_task.sample(256, seed=5))
    beta = 0.5
    result = train(model, small_task, TrainConfig(steps=30, batch_size=32, lr=3e-3, warmup=0.0, progress=False),
                   method=NPO(beta=beta))  # fmt: skip
    first = result.history["method/forget_loss"].iloc[0]
    assert first == pytest.approx(2 / beta * math.log(2), rel=1e-4)  # model == reference at the first step
    assert result.history["method/forget_loss"].iloc[-1] < first
    assert accuracy(model, small_task.sample(256, seed=5)) < acc_before


def test_npo_resumes_from_its_state(small_spec, small_task):
    model = build_model(small_spec, seed=0)
    method = NPO()
    method.setup(model, small_task, TrainConfig(progress=False))
    state = method.state_dict()
    other = NPO()
    other.setup(build_model(small_spec, seed=1), small_task, TrainConfig(progress=False))
    other.load_state_dict(state)
    tokens = small_task.sample(4, seed=0).tokens
    assert torch.equal(other._reference(tokens), model(tokens))


def test_seed_streams_are_distinct_and_the_training_stream_is_unchanged():
    cfg = TrainConfig(seed=3)
    assert step_seed(cfg, 7) == 3 * 1_000_003 + 7
    seeds = {step_seed(cfg, s, stream) for s in range(50) for stream in ("train", "retain", "method")}
    assert len(seeds) == 150
    with pytest.raises(ConfigError, match="unknown seed stream"):
        step_seed(cfg, 0, "forget")


def test_bad_methods_are_refused(small_model, small_task):
    with pytest.raises(ConfigError, match="TrainingMethod"):
        train(small_model, small_task, TrainConfig(steps=1, progress=False), method="npo")
    for beta in (0, True, float("inf")):  # (True was taken as beta 1)
        with pytest.raises(ConfigError, match=r"NPO's beta must be a finite number > 0, got .*; 0.1 is usual"):
            NPO(beta=beta)
    with pytest.raises(ConfigError, match="retain_weight"):
        GradientAscent(retain_weight=-1)
    assert isinstance(FineTune(), TrainingMethod)


@pytest.mark.parametrize("method", [GradientAscent, NPO])
def test_a_retain_task_of_weight_zero_logs_no_retain_loss(method, small_spec, small_task):
    """With ``retain_weight=0`` the retain loss is never computed: it used to be logged as 0.0 every
    step, which reads as perfect retention."""
    retain = PCFGTask("index", "a", config=small_task.config)
    cfg = TrainConfig(steps=2, batch_size=8, progress=False)
    unweighted = method(retain=retain, retain_weight=0)
    history = train(build_model(small_spec, seed=0), small_task, cfg, method=unweighted).history
    assert "method/retain_loss" not in history.columns and "method/forget_loss" in history.columns
    weighted = train(build_model(small_spec, seed=0), small_task, cfg, method=method(retain=retain, retain_weight=0.5))
    assert (weighted.history["method/retain_loss"] > 0).all()  # computed and logged when it counts


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0, "1", True])
@pytest.mark.parametrize("method", [GradientAscent, NPO])
def test_retain_weight_must_be_a_finite_number_at_least_zero(method, weight):
    """NaN passed the ``< 0`` check and the run failed at step 1 with advice to lower the learning rate."""
    with pytest.raises(ConfigError, match=rf"{method.__name__}'s retain_weight .* must be a finite number >= 0"):
        method(retain_weight=weight)
    assert method(retain_weight=0).retain_weight == 0.0
