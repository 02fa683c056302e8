"""Revival: a wrapped capability comes back faster than a control learns it."""

from __future__ import annotations

import math

import pytest
import torch

from capwrap.analyzers import ModelPair, Revival
from capwrap.errors import ConfigError
from capwrap.models import ModelSpec, build_model
from capwrap.tasks import PCFGTask, accuracy
from capwrap.training import TrainConfig, train


@pytest.mark.parametrize("low_memory", [False, True], ids=["adamw", "low-memory"])
def test_fine_tuned_capability_revives_faster_than_the_control(small_spec, small_task, backend, low_memory):
    """Count a, fine-tuned to count b with count(b) = count(a) + 1: count a comes back far faster
    than a model that only ever saw the fine-tuning data learns it — with AdamW, and with Adafactor
    stepped inside the backward pass (``low_memory``)."""
    downstream = PCFGTask("count", "b", correlation=1.0, config=small_task.config)
    base = build_model(small_spec, backend=backend, seed=0)
    train(base, small_task, TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))
    tuned = base.clone()
    train(tuned, downstream, TrainConfig(steps=60, batch_size=64, lr=1e-3, progress=False, seed=1))
    assert accuracy(tuned, small_task.sample(256, seed=9)) < 0.5  # the capability looks lost
    revival = Revival(max_steps=300, eval_every=5, check_size=256, lr=1e-3, control_steps=60, batch_size=64, seeds=2,
                      low_memory=low_memory)  # fmt: skip
    ev = revival(ModelPair(base, tuned), small_task, downstream, eval_size=256)
    assert ev.headline["steps_tuned"] <= 100
    assert math.isnan(ev.headline["steps_control"]) or ev.headline["steps_control"] > 1.5 * ev.headline["steps_tuned"]
    assert ev.value == pytest.approx(math.log2(ev.headline["control_over_tuned"])) and ev.value > 0.5
    assert ev.direction in ("wrapper", "neutral") and ev.reasons
    curve = ev.table[(ev.table["model"] == "tuned") & (ev.table["seed"] == 1)]
    assert curve["step"].iloc[0] == 0 and curve["accuracy"].iloc[-1] >= ev.headline["threshold"]
    assert set(ev.table["seed"]) == {0, 1} and ev.figure().data
    # checked after every one of the first 10 steps (then every 5): the count is the run's own
    assert curve["step"].tolist()[:3] == [0, 1, 2] and "lower bound" not in ev.summary


def test_a_model_already_at_the_threshold_has_nothing_to_revive(small_model, small_task, monkeypatch):
    """Reverse fine-tuning would stop before its first step: no speed-up to measure (it read as 2^6 before,
    a strong wrapper, from a count of 0 steps clamped to 1), and neither model trains."""
    import capwrap.analyzers.revival as revival

    monkeypatch.setattr(revival, "steps_to_threshold", lambda *a, **k: pytest.fail("nothing should train"))
    ev = Revival(max_steps=5, eval_every=5, check_size=64, control_steps=1, threshold_fraction=0.01, seeds=1)(
        ModelPair(small_model, small_model.clone()), small_task, small_task, eval_size=64
    )
    assert math.isnan(ev.value) and not ev.applicable and ev.direction == "neutral"
    assert ev.headline["steps_tuned"] == 0.0 and "there is nothing to revive" in ev.summary
    assert all(math.isnan(x) for x in ev.intervals["value"])  # a number that does not apply has no interval


def test_the_budget_only_bounds_the_run(small_spec, small_task, backend):
    """Reverse fine-tuning runs at a constant rate: a run given twice the budget takes the very same
    steps over the first budget (under a cosine over ``max_steps`` the smaller budget's rate falls
    faster, and every run of it is slower), so the steps to the threshold are the model's, not the
    budget's."""
    base = build_model(small_spec, backend=backend, seed=0)
    train(base, small_task, TrainConfig(steps=100, batch_size=64, lr=3e-3, progress=False))
    fresh = build_model(small_spec, backend=backend, seed=1)
    curves = {}
    for budget in (20, 40):
        ev = Revival(max_steps=budget, eval_every=5, check_size=64, lr=3e-3, control=fresh.clone(),
                     threshold_fraction=1.0, seeds=1)(ModelPair(base, fresh), small_task, small_task,
                                                       eval_size=64)  # fmt: skip
        curves[budget] = ev.table[ev.table["model"] == "tuned"].set_index("step")["accuracy"]
    assert list(curves[20].index) == [*range(11), 15, 20]  # never reached the threshold: the whole budget
    assert curves[40].loc[curves[20].index].tolist() == curves[20].tolist()
    assert curves[20].iloc[-1] != curves[20].iloc[0]  # and the run did move


def test_bad_input(small_model, small_task):
    with pytest.raises(ConfigError, match="max_steps must be positive"):
        Revival(max_steps=0)
    with pytest.raises(ConfigError, match="threshold_fraction"):
        Revival(threshold_fraction=1.5)
    other = build_model(
        ModelSpec(d_vocab=small_model.spec.d_vocab, n_ctx=small_model.spec.n_ctx, n_layers=1, d_model=32, n_heads=4)
    )
    with pytest.raises(ConfigError, match="the base and control models differ in n_layers"):  # named as what they are
        Revival(max_steps=2, control=other)(ModelPair(small_model, small_model.clone()), small_task, small_task)


def test_first_reaching_reads_curves_and_censors():
    from capwrap.analyzers.revival import first_reaching

    curves = torch.tensor([[0.1, 0.5, 0.95, 0.99], [0.1, 0.2, 0.3, 0.4], [0.95, 0.9, 0.8, 0.7]])
    steps = torch.tensor([0, 10, 20, 30])
    first = first_reaching(curves, steps, torch.tensor([0.9, 0.9, 0.9]), censored=600.0)
    assert first.tolist() == [20.0, 600.0, 0.0]


def test_a_run_that_stopped_at_the_threshold_is_not_read_as_never_reaching_it(small_model, small_task):
    """The tuned run stops at step 10 with 91% (threshold 90%): in a bootstrap resample where that
    check falls short it reaches the threshold at the next check (step 20), not never (until
    2026-12-07 such replicates, ~28% of them, read as no speed-up at all)."""
    import pandas as pd

    from capwrap.analyzers import Context

    context = Context.build(ModelPair(small_model, small_model.clone()), small_task, small_task, eval_size=16)
    n = 256
    base_correct = torch.ones(n)
    stopped = torch.zeros(2, n, dtype=torch.bool)
    stopped[1, :233] = True  # 91% at step 10
    never = torch.zeros(11, n, dtype=torch.bool)
    runs = {"tuned": [(10.0, pd.DataFrame({"step": [0, 10]}), stopped)],
            "control": [(math.nan, pd.DataFrame({"step": list(range(0, 101, 10))}), never)]}  # fmt: skip
    revival = Revival(max_steps=100, eval_every=10, seeds=1)
    reps = revival._replicates(context, runs, base_correct, censored=200.0)
    at_10, at_20 = (abs(reps - math.log2(200 / s)) < 1e-5 for s in (10, 20))
    assert (at_10 | at_20).all() and at_20.any()  # some resamples fall short at step 10, and reach it at 20
    dense = {"tuned": [(3.0, pd.DataFrame({"step": [0, 1, 2, 3]}), stopped[[0, 0, 0, 1]])],
             "control": runs["control"]}  # fmt: skip
    at_3, at_4 = (abs(revival._replicates(context, dense, base_correct, censored=200.0) - math.log2(200 / s)) < 1e-5
                  for s in (3, 4))  # fmt: skip
    assert (at_3 | at_4).all() and at_4.any()  # within the dense checks, the next check is the next step
    at_the_end = {"tuned": [(100.0, pd.DataFrame({"step": [0, 100]}), stopped)], "control": runs["control"]}
    assert (revival._replicates(context, at_the_end, base_correct, censored=200.0) == 0).any()  # no budget left


def test_a_diagnosis_with_progress_shows_each_reverse_fine_tuning_run(small_spec, small_task, capsys):
    """Revival trains for most of a diagnosis's time; it ran without a sign of life."""
    from capwrap.diagnosis import diagnose

    base = build_model(small_spec, seed=0)
    train(base, small_task, TrainConfig(steps=60, batch_size=64, lr=3e-3, progress=False))
    tuned = build_model(small_spec, seed=1)  # lost the capability: there is something to revive
    revival = Revival(max_steps=4, eval_every=2, check_size=32, control_steps=2, batch_size=8, seeds=1)
    diagnose(base, tuned, small_task, small_task, analyzers=[revival], eval_size=32, progress=True)
    err = capsys.readouterr().err
    assert "revival: reverse fine-tuning the tuned model (seed 0)" in err
    assert "revival: reverse fine-tuning the never-had-it control (seed 0)" in err
    diagnose(base, tuned, small_task, small_task, analyzers=[revival], eval_size=32, progress=False)
    assert "revival" not in capsys.readouterr().err


def test_a_capability_back_after_a_step_is_counted_at_that_step(small_spec, small_task):
    """A wrapped capability can be back after a step or two: checked only every ``eval_every`` steps,
    it read as ``eval_every`` (the demo pair, back at 97% after 1 step, read 10 against the
    control's 60). Revival now checks after every one of the first ``dense_until`` steps: the count
    is the one checks after every step give, and with no dense checks the summary says the count
    is the grid's."""
    downstream = PCFGTask("count", "b", correlation=1.0, config=small_task.config)
    base = build_model(small_spec, seed=0)
    train(base, small_task, TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))
    tuned = base.clone()
    train(tuned, downstream, TrainConfig(steps=60, batch_size=64, lr=1e-3, progress=False, seed=1))
    control = build_model(small_spec, seed=2)
    settings = dict(max_steps=200, check_size=128, lr=1e-3, control=control, batch_size=64, seeds=1)
    steps = {}
    for name, checks in {"every step": dict(eval_every=1, dense_until=0), "dense": dict(eval_every=50, dense_until=60),
                         "grid": dict(eval_every=50, dense_until=0)}.items():  # fmt: skip
        ev = Revival(**settings, **checks)(ModelPair(base, tuned), small_task, downstream, eval_size=128)
        steps[name] = (ev.headline["steps_tuned"], ev.headline["steps_control"], ev.summary)
    assert steps["every step"][0] < 50 and steps["dense"][0] == steps["every step"][0]  # (41 here)
    assert steps["grid"][0] == 50
    assert "first checked after 50 steps, so the tuned model may need fewer and the speed-up is a lower bound" in steps["grid"][2]
    assert "lower bound" not in steps["dense"][2]
    with pytest.raises(ConfigError, match="dense_until must not be negative"):
        Revival(dense_until=-1)
