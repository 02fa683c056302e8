"""A store knows the weights its run went through: the run's own tuned model is taken (in any precision it
was saved in), another run's model and a checkpoint saved before the end are refused, naming why."""

from __future__ import annotations

import shutil

import pytest
import torch

from capwrap.analyzers import ModelPair
from capwrap.analyzers.base import check_store_matches
from capwrap.errors import CapwrapWarning, ConfigError
from capwrap.models import load_model, save_model
from capwrap.recording import Recorder, RunStore
from capwrap.recording.weight_sample import ARRAY, PER_TENSOR, match_steps
from capwrap.tasks import answer_loss
from capwrap.training import TrainConfig, train


def _run(model, task, path, seed: int = 0, steps: int = 6):
    recorder = Recorder(model, path, hooks=(), every=3)
    train(model, task, TrainConfig(steps=steps, batch_size=8, lr=1e-2, progress=False, seed=seed), recorder=recorder)
    return RunStore.open(path)


def _weights_of(model):
    weights = model.weights()
    return weights.__getitem__


def test_the_store_samples_every_weight_tensor_at_each_full_record(small_model, small_task, tmp_path):
    base = small_model.clone()
    store = _run(small_model, small_task, tmp_path / "run")
    assert store.array_steps(ARRAY) == [0, 3, 6]
    assert len(store.meta[ARRAY]) == len(set(map(id, base.weights().values()))) - base.spec.tie_embeddings
    assert all(len(flat) == min(PER_TENSOR, base.weights()[name].numel()) for name, flat in store.meta[ARRAY].items())
    assert match_steps(store, _weights_of(base)).steps == [0]
    assert match_steps(store, _weights_of(small_model)).steps == [6]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_run_s_own_model_is_taken_in_the_precision_it_was_saved_in(small_model, small_task, tmp_path, dtype):
    base = small_model.clone()
    store = _run(small_model, small_task, tmp_path / "run")
    saved = {"base": save_model(base, tmp_path / "base"), "tuned": save_model(small_model, tmp_path / "tuned")}
    pair = ModelPair(load_model(saved["base"], dtype=dtype), load_model(saved["tuned"], dtype=dtype))
    check_store_matches(pair, store)
    match = match_steps(store, _weights_of(pair.tuned))
    assert match.ends_the_run and match.mismatched == 0 and match.precision == dtype


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_another_run_s_model_is_refused(small_model, small_task, tmp_path, dtype):
    """The same base, the same task and settings, another data order: another run."""
    other = small_model.clone()
    store = _run(small_model, small_task, tmp_path / "run")
    _run(other, small_task, tmp_path / "other", seed=1)
    pair = ModelPair(load_model(save_model(small_model, tmp_path / "tuned"), dtype=dtype),
                     load_model(save_model(other, tmp_path / "other_tuned"), dtype=dtype))  # fmt: skip
    with pytest.raises(ConfigError, match=r"recorded from another run: .* sampled weights differ from its last "
                                          rf"step's, at step 6, by more than {dtype} rounding"):  # fmt: skip
        check_store_matches(pair, store)
    match = match_steps(store, _weights_of(pair.tuned))
    assert match.steps == [] and match.mismatched > match.sampled / 2


def test_a_checkpoint_saved_before_the_end_of_the_run_is_refused_naming_its_step(small_model, small_task, tmp_path):
    checkpoints = {}
    with Recorder(small_model, tmp_path / "run", hooks=(), every=2) as recorder:
        optimizer = torch.optim.AdamW(small_model.parameters(), lr=1e-2)
        for step in range(1, 6):
            batch = small_task.sample(8, seed=step)
            answer_loss(small_model(batch.tokens), batch).backward()
            optimizer.step()
            recorder.step(final=step == 5)
            optimizer.zero_grad()
            checkpoints[step] = small_model.clone()
    store = RunStore.open(tmp_path / "run")
    assert store.array_steps(ARRAY) == [0, 2, 4, 5]
    with pytest.raises(ConfigError, match="had at step 4, but the store goes on to step 5"):
        check_store_matches(ModelPair(checkpoints[5], checkpoints[4]), store)
    with pytest.raises(ConfigError, match="recorded from another run"):  # a step the store did not sample
        check_store_matches(ModelPair(checkpoints[5], checkpoints[3]), store)
    check_store_matches(ModelPair(checkpoints[1], checkpoints[5]), store)
    shutil.copytree(tmp_path / "run", tmp_path / "until4")  # the recipe the error gives
    with RunStore.resume(tmp_path / "until4") as copy:
        copy.rollback(4)
    check_store_matches(ModelPair(checkpoints[5], checkpoints[4]), RunStore.open(tmp_path / "until4"))


def test_a_resumed_recording_samples_the_same_positions(small_model, small_task, tmp_path):
    first = _run(small_model, small_task, tmp_path / "run", steps=3)
    positions = first.meta[ARRAY]
    recorder = Recorder(small_model, tmp_path / "run", resume=True)
    with recorder:
        batch = small_task.sample(8, seed=0)
        answer_loss(small_model(batch.tokens), batch).backward()
        torch.optim.SGD(small_model.parameters(), lr=1e-2).step()
        recorder.step(final=True)
    store = RunStore.open(tmp_path / "run")
    assert store.meta[ARRAY] == positions and store.array_steps(ARRAY) == [0, 3, 4]
    assert match_steps(store, _weights_of(small_model)).ends_the_run


def test_a_store_recorded_without_sampled_weights_cannot_tell_and_is_taken(small_model, small_task, tmp_path):
    """Stores recorded before weights were sampled (and stores written without a Recorder) hold no
    sample: the check is the shape's, as it was."""
    with RunStore.create(tmp_path / "old", meta={"spec": small_model.spec.to_dict()}) as store:
        store.append(0, scalars={"loss": 1.0})
    store = RunStore.open(tmp_path / "old")
    assert match_steps(store, _weights_of(small_model)) is None
    check_store_matches(ModelPair(small_model, small_model.clone()), store)


def test_a_store_whose_last_step_was_not_measured_is_taken_with_a_warning(small_model, small_task, tmp_path):
    """A loop of one's own that passed neither final=True nor finish(), or a run that stopped without
    closing its recorder: the model it ends with was never sampled, so the store cannot be checked
    (it was refused as another run's)."""
    base = small_model.clone()
    batch = small_task.sample(8, seed=1)
    optimizer = torch.optim.SGD(small_model.parameters(), lr=1e-1)
    with Recorder(small_model, tmp_path / "run", hooks=(), every=4) as recorder:
        for _ in range(3):
            answer_loss(small_model(batch.tokens), batch).backward()
            optimizer.step()
            recorder.step()
            optimizer.zero_grad()
    store = RunStore.open(tmp_path / "run")
    assert store.last_step == 3 and store.array_steps(ARRAY) == [0]
    with pytest.warns(CapwrapWarning, match="its last step 3 was not measured"):
        check_store_matches(ModelPair(base, small_model), store)
