"""Tracr: compiled RASP programs loaded into TransformerLens compute the programs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tracr", reason="the tracr extra is not installed")

from capwrap.errors import ConfigError  # noqa: E402
from capwrap.models import available_backends, load_model, save_model  # noqa: E402
from capwrap.tasks import accuracy  # noqa: E402
from capwrap.tasks.tracr import (  # noqa: E402
    TracrCounterTask,
    TracrMaxIdentifierTask,
    compile_counter,
    compile_max_identifier,
)
from capwrap.training import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def counter():
    return compile_counter("a", letters="abcd", max_seq_len=6)


@pytest.fixture(scope="module")
def max_identifier():
    return compile_max_identifier(rank=2, letters="abcdefg", max_seq_len=5)


def _decoded(program, model, tokens):
    with torch.no_grad():
        out = model(tokens).argmax(-1)
    return [[program.output_values[i] for i in row[1:]] for row in out.tolist()]


@pytest.mark.parametrize("backend", available_backends())
def test_counter_model_computes_the_program(counter, backend):
    model = counter.to_model(backend)
    assert model.spec.architecture == "tracr" and model.spec.d_vocab_out == 7
    texts = [list("abca"), list("dddd"), list("aaaa"), list("bacada")[:4]]
    tokens = counter.encode(texts)
    for text, got in zip(texts, _decoded(counter, model, tokens), strict=True):
        assert got == counter.evaluate(text)  # the RASP program itself
        assert got == counter.compiled.apply(["BOS", *text]).decoded[1:]  # tracr's JAX model
    assert accuracy(model, TracrCounterTask(counter).sample(300, seed=0)) == 1.0


@pytest.mark.parametrize("backend", available_backends())
def test_max_identifier_model_computes_the_program(max_identifier, backend):
    model = max_identifier.to_model(backend)
    task = TracrMaxIdentifierTask(max_identifier, rank=2)
    batch = task.sample(200, seed=1)
    assert accuracy(model, batch) == 1.0
    text = list("gaceb")
    assert (
        _decoded(max_identifier, model, max_identifier.encode([text]))[0] == max_identifier.evaluate(text) == ["e"] * 5
    )
    # another rank is another task: the compiled model fails it
    assert accuracy(model, TracrMaxIdentifierTask(max_identifier, rank=4).sample(200, seed=1)) < 0.3


def test_counter_fine_tuning_with_sgd_and_weight_noise(counter):
    model = counter.to_model()
    task = TracrCounterTask(counter, operand="b", correlation=1.0)
    batch = task.sample(500, seed=2)
    assert (batch.labels["count_b"] == batch.labels["count_a"] + 1).all()
    before = accuracy(model, batch)
    cfg = TrainConfig(steps=30, batch_size=32, lr=1e-2, optimizer="sgd", weight_noise=1e-3, warmup=0.1, progress=False)
    train(model, task, cfg)
    assert before < 0.3 and accuracy(model, batch) > before


def test_tracr_checkpoints_round_trip(counter, tmp_path):
    model = counter.to_model()
    save_model(model, tmp_path / "counter")
    assert not (tmp_path / "counter" / "config.json").exists()  # no Hugging Face equivalent
    tokens = counter.encode([list("abcabc")])
    for backend in available_backends():
        torch.testing.assert_close(
            load_model(tmp_path / "counter", backend=backend)(tokens), model(tokens), atol=1e-4, rtol=1e-4
        )


def test_tracr_bad_arguments(counter):
    with pytest.raises(ConfigError, match="operand"):
        compile_counter("z", letters="abc")
    with pytest.raises(ConfigError, match="rank"):
        compile_max_identifier(rank=9, max_seq_len=5)
    with pytest.raises(ConfigError, match="length"):
        TracrCounterTask(counter, length=40)


@pytest.mark.parametrize("backend", available_backends())
def test_functional_forward_of_a_compiled_program(counter, backend):
    from capwrap.models.functional import Functional

    model = counter.to_model(backend)
    tokens = counter.encode([list("abca"), list("dada")])
    trace = Functional(model).trace(tokens)  # bidirectional attention, no norm, ReLU
    torch.testing.assert_close(trace.logits, model(tokens), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", available_backends())
def test_resumed_patching_of_a_bidirectional_model_equals_the_hooks_engine(counter, backend):
    # tracr's attention sees later positions too: a patch changes every position, not just the
    # ones from where it enters on, so the resumed engine must recompute them all
    from capwrap.analyzers.patching import activation_patching

    model = counter.to_model(backend)
    task = TracrCounterTask(counter)
    clean, corrupt = task.sample(8, seed=0), task.sample(8, seed=1)
    # answers read early in the sequence, so that patches after them still change them
    answer_pos = torch.ones_like(clean.answer_pos)
    corrupt = type(corrupt)(corrupt.tokens, answer_pos, clean.answers, {})
    kwargs = dict(source_tokens=clean.tokens, positions="both", progress=False)
    fast = activation_patching(model, corrupt, engine="resumed", **kwargs)
    hooks = activation_patching(model, corrupt, engine="hooks", **kwargs)
    torch.testing.assert_close(fast.values, hooks.values, atol=1e-5, rtol=0)
    assert float(fast.table["effect"].abs().max()) > 0.01  # the patches do something
