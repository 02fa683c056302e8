"""Tracr tasks from the shipped compiled checkpoints (no tracr or JAX needed): the programs' tasks,
the planted correlations (counter: count = source + offset; max-identifier: the paper's shift by q),
and their specs."""

from __future__ import annotations

import pytest
import torch

from capwrap.errors import ConfigError
from capwrap.tasks import accuracy
from capwrap.tasks.spec import task_from_spec
from capwrap.tasks.tracr import CompiledProgram, TracrCounterTask, TracrMaxIdentifierTask
from capwrap.validation.bases import load_base


@pytest.fixture(scope="module")
def counter():
    return load_base("tracr-counter")


@pytest.fixture(scope="module")
def max_identifier():
    return load_base("tracr-max")


def test_saved_programs_keep_their_vocabularies_and_still_compute(counter, max_identifier):
    program = CompiledProgram.from_model(counter)
    assert program.name == "counter" and program.input_tokens[0] == "BOS" and program.output_values[:3] == [0, 1, 2]
    assert accuracy(counter, TracrCounterTask(program, "a").sample(256, seed=0)) == 1.0
    maxid = CompiledProgram.from_model(max_identifier)
    assert accuracy(max_identifier, TracrMaxIdentifierTask(maxid, rank=5).sample(256, seed=0)) == 1.0
    with pytest.raises(ConfigError, match="keeps no RASP program"):
        program.evaluate(list("abc"))


def test_the_held_out_counter_base_counts_b_and_its_fine_tuning_task_needs_a_wrapper():
    """The Tracr base of the held-out half's counter family: compiled to count b, right on count b,
    and never right on its fine-tuning task (count c = count b - 1 in every sequence), which it must learn."""
    model = load_base("tracr-counter-b")
    assert accuracy(model, task_from_spec("tracr=counter,operand=b", model=model).sample(256, seed=0)) == 1.0
    assert accuracy(model, task_from_spec("tracr=counter,operand=a", model=model).sample(256, seed=0)) < 0.5
    down = task_from_spec("tracr=counter,operand=c,correlation=1,source=b,offset=-1", model=model)
    assert accuracy(model, down.sample(256, seed=0)) == 0.0


@pytest.mark.parametrize("source, offset", [("a", 1), ("c", -1), ("d", 2)])
def test_counter_correlation_with_any_source_and_offset(counter, source, offset):
    task = TracrCounterTask(CompiledProgram.from_model(counter), "b", correlation=1.0, source=source, offset=offset)
    for c in (1.0, 0.0):
        batch = (task if c == 1.0 else task.correlation_free()).sample(500, seed=3)
        held = (batch.labels["count_b"] == batch.labels[f"count_{source}"] + offset).float().mean()
        assert float(held) == c
    assert task.probe_label == "count_b"


def test_max_identifier_shift_rule(max_identifier):
    program = CompiledProgram.from_model(max_identifier)
    task = TracrMaxIdentifierTask(program, rank=4, correlation=1.0, source_rank=5, shift=2)
    for c in (1.0, 0.0, 0.5):
        batch = TracrMaxIdentifierTask(program, 4, correlation=c, source_rank=5, shift=2).sample(600, seed=1)
        held = (batch.labels["rank4_letter"] - batch.labels["rank5_letter"] == 2).float().mean()
        assert abs(float(held) - c) < 0.06
        assert torch.equal(batch.labels["answer_letter"], batch.labels["rank4_letter"])
        tokens = batch.tokens[:, 1:]  # distinct letters in every sequence
        assert all(len(set(row.tolist())) == len(row) for row in tokens)
    assert task.probe_label == "rank4_letter" and task.correlation_free().correlation == 0.0
    with pytest.raises(ConfigError, match="cannot hold"):
        TracrMaxIdentifierTask(program, rank=4, correlation=1.0, source_rank=5, shift=-1)


def test_tracr_specs(counter, max_identifier):
    task = task_from_spec("tracr=counter,operand=b,correlation=1,source=a,offset=1", model=counter)
    assert isinstance(task, TracrCounterTask) and task.correlation == 1.0
    maxid = task_from_spec("tracr=max_identifier,rank=4,correlation=0.8,source_rank=5,shift=1", model=max_identifier)
    assert (maxid.rank, maxid.source_rank, maxid.shift) == (4, 5, 1)
    with pytest.raises(ConfigError, match="compiled from the counter program"):
        task_from_spec("tracr=max_identifier,rank=4", model=counter)
    with pytest.raises(ConfigError, match="needs the compiled model"):
        task_from_spec("tracr=counter,operand=b")
    with pytest.raises(ConfigError, match="unknown keys"):
        task_from_spec("tracr=counter,rank=3", model=counter)
    with pytest.raises(ConfigError, match=r"length must be in \[1, "):  # 0 is not "the full length" (it was)
        task_from_spec("tracr=counter,length=0", model=counter)
    with pytest.raises(ConfigError, match="the operand defaults to 'a'\\): give operand=b"):  # 1 is a valid correlation
        task_from_spec("tracr=counter,correlation=1", model=counter)


def test_the_help_texts_tracr_examples_parse(counter, max_identifier):
    from capwrap.tasks.spec import SPEC_EXAMPLES

    models = {"counter": counter, "max_identifier": max_identifier}
    for example in SPEC_EXAMPLES["tracr"]:
        program = example.split(",")[0].split("=")[1]
        assert task_from_spec(example, model=models[program]).seq_len > 0


def test_tracr_models_that_read_other_letters_are_not_a_pair(counter, max_identifier):
    """Compiled with another alphabet, a model has the same shape (even the same weights) while its
    token ids mean other letters: diagnosing the two as a pair is refused (it ran without a word)."""
    from capwrap.analyzers import Generalization, ModelPair
    from capwrap.diagnosis import diagnose

    other = counter.clone()
    other.metadata["input_tokens"] = [("z" if t == "i" else t) for t in counter.metadata["input_tokens"]]
    program = CompiledProgram.from_model(counter)
    tasks = (TracrCounterTask(program, "a"), TracrCounterTask(program, "b", 1.0))
    with pytest.raises(ConfigError, match="different input tokens"):
        diagnose(counter, other, *tasks, analyzers=[Generalization()], eval_size=16, progress=False)
    with pytest.raises(ConfigError, match="different input tokens"):  # any pair an analyzer is given
        ModelPair(counter, other)
    # other letters, and so another shape: the letters are the reason given, not the shapes they make
    with pytest.raises(ConfigError, match="different input tokens") as refused:
        ModelPair(counter, max_identifier)
    assert "d_vocab" not in str(refused.value)
    assert diagnose(counter, counter.clone(), *tasks, analyzers=[Generalization()], eval_size=16, progress=False)
