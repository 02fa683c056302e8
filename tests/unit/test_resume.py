"""Resumable training: a run killed mid-way and resumed ends bit-identical to one never interrupted."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capwrap.errors import ConfigError, StoreError
from capwrap.methods import NPO, GradientAscent
from capwrap.models import ModelSpec, available_backends, build_model
from capwrap.recording import Recorder, RunStore
from capwrap.recording.train_state import TRAIN_STATE_FILE, load_train_state
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import StopTraining, TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
TASK = dict(family="count", operand="a", config=PCFGConfig(length=8, window=4, occurrence=2))
CONFIG = dict(steps=16, batch_size=8, lr=1e-2, warmup=0.25, seed=3, progress=False, checkpoint_every=4)

RUN = """
import sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from capwrap.models import ModelSpec, build_model
from capwrap.recording import Recorder
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train

task = PCFGTask("count", "a", config=PCFGConfig(length=8, window=4, occurrence=2))
spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
model = build_model(spec, seed=0)
recorder = Recorder(model, {path!r}, hooks="blocks.*.hook_resid_post", probe=task.sample(8, seed=1), every=3)


def report(info):
    print("step", info.step, flush=True)
    if info.step >= 10:  # slow down, so that the kill lands between this step and the next checkpoint
        time.sleep(0.2)


train(model, task, TrainConfig(**{config!r}), recorder=recorder, callbacks=[report])
print("finished", flush=True)
"""


def _task() -> PCFGTask:
    return PCFGTask(**TASK)


def _spec(task: PCFGTask) -> ModelSpec:
    return ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)


def _assert_same_weights(a, b) -> None:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"not bit-identical: {different}"


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = RunStore.open(a), RunStore.open(b)
    assert sa.steps == sb.steps
    assert sa.scalars().equals(sb.scalars())
    for name in sa.array_names:
        assert sa.array_steps(name) == sb.array_steps(name), name
        assert torch.equal(sa.array(name), sb.array(name)), name


@pytest.mark.slow  # a training subprocess: importing TransformerLens in it alone takes seconds
def test_a_killed_run_resumes_to_bit_identical_weights(tmp_path):
    task = _task()
    killed = tmp_path / "killed"
    script = RUN.format(repo=str(REPO), threads=torch.get_num_threads(), path=str(killed), config=CONFIG)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # past the second checkpoint (step 8), mid-way to the third
            if line.split() == ["step", "10"]:
                break
        else:
            pytest.fail(f"the training subprocess ended early (exit code {proc.wait()})")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    checkpoint = load_train_state(killed)
    assert checkpoint["step"] == 8 and not checkpoint["finished"]
    assert RunStore.open(killed).last_step >= checkpoint["step"]

    # a fresh model of the same spec: train() restores the checkpoint's weights into it
    resumed = build_model(_spec(task), seed=123)
    result = train(resumed, task, TrainConfig(**CONFIG), resume=killed)
    assert list(result.history.index) == list(range(1, 17))

    never_stopped = build_model(_spec(task), seed=0)
    recorder = Recorder(never_stopped, tmp_path / "whole", probe=task.sample(8, seed=1), every=3)
    expected = train(never_stopped, task, TrainConfig(**CONFIG), recorder=recorder)
    _assert_same_weights(resumed, never_stopped)
    assert result.history.equals(expected.history)
    _assert_same_store(killed, tmp_path / "whole")
    assert load_train_state(killed)["finished"]


def test_resume_restores_the_method_and_works_on_every_backend(backend, tmp_path):
    """An in-process crash (an exception from a callback) with NPO, whose frozen reference is state."""
    task = _task()
    config = TrainConfig(**{**CONFIG, "steps": 9, "checkpoint_every": 4})

    def crash(info):
        if info.step == 6:
            raise KeyboardInterrupt

    model = build_model(_spec(task), backend=backend, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train(
            model, task, config, method=NPO(), recorder=Recorder(model, tmp_path / "run", hooks=()), callbacks=[crash]
        )
    # the callback crashed in step 6, before the recorder took it: the store ends at 5, the checkpoint at 4
    assert RunStore.open(tmp_path / "run").last_step == 5 and load_train_state(tmp_path / "run")["step"] == 4

    resumed = build_model(_spec(task), backend=backend, seed=7)
    result = train(resumed, task, config, method=NPO(), recorder=Recorder(resumed, tmp_path / "run", resume=True))
    whole = build_model(_spec(task), backend=backend, seed=0)
    expected = train(whole, task, config, method=NPO(), recorder=Recorder(whole, tmp_path / "whole", hooks=()))
    _assert_same_weights(resumed, whole)
    assert result.history.equals(expected.history)
    _assert_same_store(tmp_path / "run", tmp_path / "whole")


def test_resuming_a_finished_or_stopped_run_trains_no_further(tmp_path):
    task = _task()
    config = TrainConfig(**{**CONFIG, "steps": 6})

    def stop(info):
        if info.step == 3:
            raise StopTraining

    model = build_model(_spec(task), seed=0)
    train(model, task, config, recorder=Recorder(model, tmp_path / "run", hooks=()), callbacks=[stop])
    state = load_train_state(tmp_path / "run")
    assert state["step"] == 3 and state["finished"]
    again = build_model(_spec(task), seed=1)
    result = train(again, task, config, resume=tmp_path / "run")
    assert list(result.history.index) == [1, 2, 3]
    _assert_same_weights(again, model)
    assert RunStore.open(tmp_path / "run").last_step == 3


def test_resume_refuses_what_would_not_continue_the_run(tmp_path):
    task = _task()
    config = TrainConfig(**{**CONFIG, "steps": 4, "checkpoint_every": 2})
    model = build_model(_spec(task), seed=0)
    train(model, task, config, recorder=Recorder(model, tmp_path / "run", hooks=()))

    def fresh(spec=None):
        return build_model(spec or _spec(task), seed=0)

    with pytest.raises(ConfigError, match=r"another TrainConfig: lr \(0.01 vs 0.02\)"):
        train(
            fresh(),
            task,
            TrainConfig(**{**CONFIG, "steps": 4, "checkpoint_every": 2, "lr": 2e-2}),
            resume=tmp_path / "run",
        )
    other_spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=32, n_heads=2)
    with pytest.raises(StoreError, match=r"another shape: it differs in d_model \(32 vs 16\)"):  # the recorder says it first
        train(fresh(other_spec), task, config, resume=tmp_path / "run")
    with pytest.raises(ConfigError, match="another task"):
        train(fresh(), PCFGTask("count", "b", config=task.config), config, resume=tmp_path / "run")
    with pytest.raises(ConfigError, match="another method"):
        train(fresh(), task, config, method=GradientAscent(), resume=tmp_path / "run")
    if len(available_backends()) > 1:
        other = build_model(_spec(task), backend=available_backends()[1], seed=0)
        with pytest.raises(ConfigError, match="backend"):
            train(other, task, config, resume=tmp_path / "run")
    with pytest.raises(ConfigError, match="either recorder"):
        train(fresh(), task, config, resume=tmp_path / "run", recorder=Recorder(model, tmp_path / "x", hooks=()))
    with pytest.raises(ConfigError, match="needs a recorder"):
        train(fresh(), task, config)
    # only progress and checkpoint_every may change
    train(fresh(), task, TrainConfig(**{**CONFIG, "steps": 4, "checkpoint_every": 1}), resume=tmp_path / "run")

    # a store recorded without checkpoints says so instead of restarting the schedule
    plain = TrainConfig(**{**CONFIG, "steps": 2, "checkpoint_every": 0})
    unrecorded = fresh()
    train(unrecorded, task, plain, recorder=Recorder(unrecorded, tmp_path / "plain", hooks=()))
    assert not (tmp_path / "plain" / TRAIN_STATE_FILE).exists()
    with pytest.raises(StoreError, match="no training checkpoint"):
        train(fresh(), task, plain, resume=tmp_path / "plain")
    (tmp_path / "run" / TRAIN_STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="not a readable training checkpoint"):
        train(fresh(), task, config, resume=tmp_path / "run")
    with pytest.raises(StoreError, match="does not exist"):
        train(fresh(), task, config, resume=tmp_path / "nowhere")


def test_an_sgd_checkpoint_from_before_sgd_took_weight_decay_resumes(tmp_path):
    """Until 2026-12-07 SGD ignored ``weight_decay`` and checkpoints recorded the field's default,
    0.01: such a run resumes as the run it was (no decay), and an explicit decay is another run."""
    from capwrap.recording.train_state import save_train_state

    task = _task()
    config = TrainConfig(**{**CONFIG, "steps": 4, "checkpoint_every": 2, "optimizer": "sgd"})
    stopped = build_model(_spec(task), seed=0)

    def stop_at_2(info):
        if info.step == 2:
            raise StopTraining

    train(stopped, task, config, recorder=Recorder(stopped, tmp_path / "run", hooks=()), callbacks=[stop_at_2])
    state = load_train_state(tmp_path / "run")
    assert state["config"]["weight_decay"] == 0.0 and state["weight_decay_reaches_sgd"]
    old = {k: v for k, v in state.items() if k != "weight_decay_reaches_sgd"}
    old["config"] = {**state["config"], "weight_decay": 0.01}  # what a checkpoint of the old code recorded
    save_train_state(tmp_path / "run", old)
    train(build_model(_spec(task), seed=0), task, config, resume=tmp_path / "run")  # resumes: no decay either way
    save_train_state(tmp_path / "run", old)
    with pytest.raises(ConfigError, match=r"weight_decay \(0.0 vs 0.01\)"):
        train(build_model(_spec(task), seed=0), task, TrainConfig(**{**CONFIG, "steps": 4, "checkpoint_every": 2,
                                                                     "optimizer": "sgd", "weight_decay": 0.01}),
              resume=tmp_path / "run")  # fmt: skip
