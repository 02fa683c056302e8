"""The training loop: learning, schedule, optimizers, noise, divergence, bad configs."""

from __future__ import annotations

import math

import pytest
import torch

from capwrap.errors import ConfigError, TrainingDivergedError
from capwrap.models import build_model
from capwrap.recording import Recorder, RunStore
from capwrap.tasks import accuracy
from capwrap.training import TrainConfig, add_weight_noise, lr_at, train


def test_training_lowers_the_loss(small_model, small_task):
    result = train(small_model, small_task, TrainConfig(steps=60, batch_size=32, lr=3e-3, progress=False, seed=1))
    first, last = result.history["loss"].iloc[:5].mean(), result.history["loss"].iloc[-5:].mean()
    assert last < 0.8 * first


def test_same_seed_same_run(small_spec, small_task, backend):
    cfg = TrainConfig(steps=5, batch_size=8, lr=1e-3, progress=False, seed=3)
    runs = [train(build_model(small_spec, backend=backend, seed=0), small_task, cfg).history["loss"] for _ in range(2)]
    assert runs[0].tolist() == pytest.approx(runs[1].tolist(), rel=1e-5)


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.2, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1 / 20)
    assert lr_at(19, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(20, 99))


def test_sgd_with_momentum_and_eval_metrics(small_model, small_task):
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, optimizer="sgd", eval_every=3, eval_size=32, progress=False)
    result = train(small_model, small_task, cfg, eval_tasks={"count": small_task})
    assert result.history["acc/count"].dropna().index.tolist() == [3, 6]
    assert result.final_metrics["acc/count"] == pytest.approx(
        accuracy(small_model, small_task.sample(32, seed=cfg.seed + 7919))
    )


def test_weight_noise_is_reproducible(small_spec):
    a, b = build_model(small_spec, seed=0), build_model(small_spec, seed=0)
    add_weight_noise(a, 1e-3, seed=1)
    add_weight_noise(b, 1e-3, seed=1)
    base = build_model(small_spec, seed=0)
    wa, wb, w0 = a.weights()["blocks.0.attn.W_Q"], b.weights()["blocks.0.attn.W_Q"], base.weights()["blocks.0.attn.W_Q"]
    assert torch.equal(wa, wb) and 0 < (wa - w0).std() < 2e-3


def test_callbacks_see_every_step(small_model, small_task):
    seen = []
    train(
        small_model,
        small_task,
        TrainConfig(steps=4, batch_size=4, progress=False),
        callbacks=[lambda i: seen.append(i.step)],
    )
    assert seen == [1, 2, 3, 4]


def test_non_finite_loss_stops_with_the_step_and_a_consistent_store(small_model, small_task, tmp_path):
    def poison(info):
        if info.step == 3:
            with torch.no_grad():
                small_model.weights()["embed.W_E"].fill_(float("nan"))

    rec = Recorder(small_model, tmp_path / "run", hooks=(), every=2)
    with pytest.raises(TrainingDivergedError, match="at step 4 of 10") as err:
        train(
            small_model,
            small_task,
            TrainConfig(steps=10, batch_size=4, progress=False),
            recorder=rec,
            callbacks=[poison],
        )
    assert err.value.step == 4
    store = RunStore.open(tmp_path / "run")
    assert store.steps == [0, 1, 2, 3]
    assert not rec.is_open


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr must be a positive"),
        ({"lr": -1e-3}, "lr must be a positive"),
        ({"lr": float("nan")}, "lr must be a positive"),
        ({"steps": 0}, "steps must be a positive"),
        ({"steps": 2.5}, "steps must be a positive"),
        ({"batch_size": -4}, "batch_size must be a positive"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"warmup": 1.0}, "warmup"),
        ({"grad_clip": 0.0}, "grad_clip"),
        # momentum was never checked: -1 was torch's bare ValueError once training started, 1.5 trained silently
        ({"momentum": -1.0, "optimizer": "sgd"}, r"TrainConfig.momentum .* in \[0, 1\)"),
        ({"momentum": 1.5, "optimizer": "sgd"}, r"TrainConfig.momentum .* in \[0, 1\)"),
        ({"momentum": 1.0}, r"TrainConfig.momentum .* in \[0, 1\)"),
        ({"momentum": float("nan")}, r"TrainConfig.momentum .* in \[0, 1\)"),
        ({"momentum": "0.9"}, r"TrainConfig.momentum .* in \[0, 1\)"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_recorder_of_another_model_is_refused(small_model, small_spec, small_task, tmp_path):
    other = build_model(small_spec, seed=1)
    rec = Recorder(other, tmp_path / "run", hooks=())
    with pytest.raises(ConfigError, match="another model"):
        train(small_model, small_task, TrainConfig(steps=1, progress=False), recorder=rec)


def test_a_configs_identity_keeps_keys_made_before_later_fields():
    """Kept runs (the shipped revival controls) are keyed by ``identity()``: the fields of a default
    config are those every TrainConfig had when the first caches were made, and a field that does
    not change the result (recomputation) never enters it."""
    legacy = {"steps", "batch_size", "lr", "optimizer", "weight_decay", "momentum", "warmup", "min_lr_ratio",
              "grad_clip", "weight_noise", "seed", "eval_every", "eval_size", "progress", "checkpoint_every"}  # fmt: skip
    assert set(TrainConfig().identity()) == legacy
    assert TrainConfig().identity() == {  # the values too: the shipped controls' keys hash them
        "steps": 1000, "batch_size": 96, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.01, "momentum": 0.9,
        "warmup": 0.2, "min_lr_ratio": 0.0, "grad_clip": 1.0, "weight_noise": 0.0, "seed": 0, "eval_every": 0,
        "eval_size": 512, "progress": True, "checkpoint_every": 0}  # fmt: skip
    assert TrainConfig(recompute_activations=True).identity() == TrainConfig().identity()
    low = TrainConfig().low_memory().identity()
    assert low["step_in_backward"] is True and low["optimizer"] == "adafactor" and "recompute_activations" not in low


def test_momentum_in_range_is_taken():
    assert TrainConfig(optimizer="sgd", momentum=0.0).momentum == 0.0
    assert TrainConfig(optimizer="sgd", momentum=0.99).momentum == 0.99


def test_real_number_takes_numpy_numbers_and_refuses_bools_tensors_and_non_finite_values():
    """The one check behind TrainConfig.momentum and the unlearning methods' retain_weight."""
    import numpy as np

    from capwrap.errors import real_number

    assert real_number(np.float32(0.5), "x", minimum=0, below=1) == 0.5 and real_number(np.int64(3), "x") == 3.0
    assert real_number(0, "x", minimum=0, below=1) == 0.0 and real_number(-1e300, "x") == -1e300
    for bad in (True, torch.tensor(0.5), "0.5", None, float("nan"), float("inf"), 10**400):  # (an OverflowError)
        with pytest.raises(ConfigError, match=r"^x must be a finite number, got "):
            real_number(bad, "x")
    with pytest.raises(ConfigError, match=r"^x must be a number in \[0, 1\), got 1; e\.g\. 0\.9$"):
        real_number(1, "x", minimum=0, below=1, hint="; e.g. 0.9")
    with pytest.raises(ConfigError, match=r"^x must be a finite number < 2, got 2\.5$"):
        real_number(2.5, "x", below=2)


def test_a_numpy_momentum_is_kept_as_a_float_a_checkpoint_can_write():
    """TrainConfig kept the NumPy number it was given: a recorded SGD run then failed at its first
    checkpoint ("Object of type float32 is not JSON serializable")."""
    import json

    import numpy as np

    config = TrainConfig(optimizer="sgd", momentum=np.float32(0.5), steps=2)
    assert type(config.momentum) is float and config.momentum == 0.5
    assert json.loads(json.dumps(config.to_dict()))["momentum"] == 0.5
