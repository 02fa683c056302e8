"""PCFG tasks: grammar, sequence format, latent labels, priors and the planted correlation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capwrap.errors import ConfigError
from capwrap.tasks import PCFGConfig, PCFGTask, TaskBatch, accuracy, check_task_fits
from capwrap.tasks.pcfg import GRAMMAR, generate_strings
from capwrap.tasks.spec import task_from_spec

#: The token sum of PCFGTask("count", "b", correlation=1.0).sample(64, seed=0) as capwrap 0.1.0 drew it.
PINNED_TOKEN_SUM = 25431


def _derivable(s: str) -> bool:
    """CYK-style check that the grammar derives the (un-subsampled) string ``s``."""
    from functools import cache

    @cache
    def derives(symbol: str, lo: int, hi: int) -> bool:
        if symbol in "abc":
            return hi - lo == 1 and s[lo] == symbol
        for option in GRAMMAR[symbol]:
            if _split(option.split(), lo, hi):
                return True
        return False

    @cache
    def _split_cached(parts: tuple[str, ...], lo: int, hi: int) -> bool:
        if len(parts) == 1:
            return derives(parts[0], lo, hi)
        return any(derives(parts[0], lo, mid) and _split_cached(parts[1:], mid, hi) for mid in range(lo + 1, hi))

    def _split(parts, lo, hi):
        return _split_cached(tuple(parts), lo, hi)

    return derives("s", 0, len(s))


def test_full_strings_are_derivable_by_the_grammar():
    rng = np.random.default_rng(0)
    for _ in range(3):
        full = generate_strings(1, 64, rng)  # subsampling keeps order; check the generator itself below
        assert full.shape == (1, 64) and set(np.unique(full)) <= {0, 1, 2}
    # Un-subsampled: expand with the same generator logic but keep everything.
    from capwrap.tasks import pcfg

    symbols = np.array([pcfg._SYMBOLS["s"]])
    for _ in range(6):
        kids = pcfg._TABLE[symbols, rng.integers(0, 2, size=len(symbols))]
        symbols = kids[kids >= 0]
    text = "".join("abc"[i - len(GRAMMAR)] for i in symbols)
    assert pcfg.MIN_STRING_LENGTH <= len(text) <= 432
    assert _derivable(text)
    assert not _derivable(text[:-1] + ("a" if text[-1] != "a" else "b") * 2)


def test_sequence_format_and_answers():
    task = PCFGTask(family=("count", "index"), prior="high")
    batch = task.sample(200, seed=3)
    v, L = task.vocab, task.config.length
    assert batch.tokens.shape == (200, task.seq_len)
    for row, ans, fam, op in zip(
        batch.tokens[:50], batch.answers[:50], batch.labels["family"][:50], batch.labels["operand"][:50], strict=False
    ):
        toks = v.decode(row)
        assert toks[0] == "<sos>" and toks[4] == "<sot>" and toks[5 + L] == "<eot>" and toks[6 + L] == "<ans>"
        text = toks[5 : 5 + L]
        operand = "abc"[int(op)]
        if task.families[int(fam)] == "count":
            assert toks[1] == "<count>" and toks[3] == str(task.config.window)
            assert int(v.tokens[int(ans)]) == text[-task.config.window :].count(operand)
        else:
            hits = [i for i, t in enumerate(text) if t == operand]
            k = task.config.occurrence
            expected = str(hits[k - 1]) if len(hits) >= k else "<none>"
            assert v.tokens[int(ans)] == expected
        assert toks[7 + L] == v.tokens[int(ans)]
    assert (batch.answer_pos == task.answer_pos).all()


def test_same_seed_same_batch_and_other_seed_differs():
    task = PCFGTask()
    a, b, c = task.sample(32, 5), task.sample(32, 5), task.sample(32, 6)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_prior_controls_operands():
    assert PCFGTask(prior="low").with_correlation(None).prior == PCFGTask(prior="low").prior  # (not operand a)
    with pytest.raises(ConfigError, match="a planted correlation needs one family and one operand"):
        PCFGTask(prior="low").with_correlation(1.0)
    ops = PCFGTask(prior="low").sample(4000, seed=0).labels["operand"]
    assert (ops == 0).float().mean() > 0.99 and (ops == 2).sum() == 0
    ops = PCFGTask(prior=(0.2, 0.3, 0.5)).sample(4000, seed=0).labels["operand"]
    assert abs((ops == 2).float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("c", [0.0, 0.5, 1.0])
def test_planted_correlation_fraction(c):
    batch = PCFGTask("count", "b", correlation=c).sample(2000, seed=1)
    held = (batch.labels["count_b"] == batch.labels["count_a"] + 1).float().mean().item()
    assert abs(held - c) < 0.04
    assert torch.equal(batch.answers - PCFGTask().vocab.number(0), batch.labels["count_b"])


@pytest.mark.parametrize(
    "family, target, source, offset",
    [("count", "c", "a", 2), ("count", "a", "b", -1), ("index", "b", "a", 1), ("index", "c", "b", -3)],
)
def test_any_target_source_and_offset_can_be_planted(family, target, source, offset):
    task = PCFGTask(family, target, correlation=1.0, source=source, offset=offset)
    for c, expected in ((1.0, 1.0), (0.0, 0.0), (0.5, 0.5)):
        batch = task.with_correlation(c).sample(1000, seed=2)
        held = (batch.labels[f"{family}_{target}"] == batch.labels[f"{family}_{source}"] + offset).float().mean()
        assert abs(float(held) - expected) < 0.05
        assert torch.equal(batch.answers, _answers(task, batch, family, target))  # answers follow the edited text
    free = task.correlation_free()
    assert free.correlation == 0.0 and (free.source, free.offset) == (source, offset)
    assert task.source_label == f"{family}_{source}" and task.probe_label == f"{family}_{target}"
    assert PCFGTask(family, target).correlation_free() is None


def _answers(task, batch, family, target):
    v = task.vocab
    labels = batch.labels[f"{family}_{target}"]
    if family == "count":
        return labels + v.number(0)
    return torch.where(labels >= 0, labels + v.number(0), torch.tensor(v["<none>"]))


def test_the_papers_correlation_draws_what_capwrap_always_drew():
    """count(b) = count(a) + 1 (the default source and offset) keeps its random stream, so runs made
    before the correlation was generalized are reproduced exactly."""
    batch = PCFGTask("count", "b", correlation=1.0).sample(64, seed=0)
    assert int(batch.tokens.sum()) == PINNED_TOKEN_SUM


def test_planted_correlation_specs():
    task = task_from_spec("pcfg=index,operand=c,correlation=0.8,source=b,offset=-2")
    assert (task.families, task.operand, task.correlation, task.source, task.offset) == (("index",), "c", 0.8, "b", -2)
    assert task.name == "index c C=0.8 (c = b - 2)"
    assert task_from_spec("pcfg=count,operand=b,correlation=1").name == "count b C=1"


def test_natural_strings_rarely_hold_the_correlation():
    batch = PCFGTask("count", "b").sample(2000, seed=1)
    assert (batch.labels["count_b"] == batch.labels["count_a"] + 1).float().mean() < 0.3


def test_batch_slicing_keeps_labels():
    batch = PCFGTask().sample(10, seed=0)
    part = batch[2:5]
    assert isinstance(part, TaskBatch) and len(part) == 3 and part.labels["count_a"].shape == (3,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"family": "sort"}, "unknown PCFG family"),
        ({"operand": "z"}, "operand must be one of"),
        ({"prior": "extreme"}, "unknown prior"),
        ({"prior": (0.5, 0.6, 0.1)}, "summing to 1"),
        ({"operand": "b", "correlation": 1.5}, r"correlation must be in \[0, 1\]"),
        ({"operand": "a", "correlation": 0.5}, r"ties operand 'a' to another operand, the source .* got 'a'; e.g. source='b'"),
        ({"family": ("count", "index"), "operand": "b", "correlation": 0.5}, "one family and one operand"),
        ({"family": "index", "operand": "b", "correlation": 1.0, "offset": 0}, "offset other than 0"),
        ({"family": "count", "operand": "b", "correlation": 1.0, "offset": 99}, "cannot hold"),
    ],
)
def test_bad_task_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PCFGTask(**kwargs)


def test_bad_config_and_sizes():
    with pytest.raises(ConfigError, match="window"):
        PCFGConfig(length=10, window=11)
    with pytest.raises(ConfigError, match=r"length must be in \[1, 138\] \(grammar strings have at least 138"):
        PCFGConfig(length=139)
    # every string of the grammar reaches 138 terminals (the cap was 64, on the belief that 64 was the fewest)
    long = PCFGTask(config=PCFGConfig(length=138, window=40, occurrence=6)).sample(64, seed=0)
    assert long.tokens.shape == (64, 138 + 9)
    with pytest.raises(ConfigError, match=r"occurrence must be in \[1, length=8\]"):
        PCFGConfig(length=8, window=4, occurrence=9)  # was accepted, then sampling raised KeyError: '9'
    with pytest.raises(ConfigError, match="a string must hold the a's occurrence 16 .* use a smaller occurrence or a "
                                          "longer length"):  # fmt: skip
        PCFGTask("index", "b", correlation=1.0, config=PCFGConfig(32, 16, 16)).sample(64, seed=0)
    with pytest.raises(ConfigError, match="positive"):
        PCFGTask().sample(0, seed=0)


def test_task_must_fit_the_model(small_model):
    big = PCFGTask(config=PCFGConfig(length=64, window=8))
    with pytest.raises(ConfigError, match="d_vocab >="):
        check_task_fits(small_model, big)


def test_a_task_missing_protocol_members_is_named_before_any_analyzer_runs(small_model, small_task):
    """A duck-typed task without TaskBase's members fails with the missing names, not an AttributeError
    deep in an analyzer."""
    from capwrap.analyzers.base import Context, ModelPair

    class Bare:  # what a user might write: the sampling half of a task only
        name, d_vocab, seq_len = small_task.name, small_task.d_vocab, small_task.seq_len
        sample, describe = small_task.sample, small_task.describe

    with pytest.raises(ConfigError, match="lacks probe_label, capability_floor, probe_task, correlation_free; subclass"):
        Context.build(ModelPair(small_model, small_model), small_task, Bare())
    with pytest.raises(ConfigError, match="Bare is not a capwrap Task: it lacks probe_label"):
        Context.build(ModelPair(small_model, small_model), Bare(), small_task)
    check_task_fits(small_model, Bare())  # training reads only what it samples with
    with pytest.raises(ConfigError, match="it lacks sample; see the Task protocol"):
        check_task_fits(small_model, type("NoSample", (), {"name": "x", "d_vocab": 4, "seq_len": 4, "describe": dict})())


def test_a_task_that_only_samples_trains(small_model, small_task):
    """Training needs no analyzer member: a duck-typed task with the five sampling members trains."""
    from capwrap.training import TrainConfig, train

    class Sampler:
        name, d_vocab, seq_len = small_task.name, small_task.d_vocab, small_task.seq_len
        sample, describe = small_task.sample, small_task.describe

    before = small_model.weights()["blocks.0.mlp.W_in"].clone()
    train(small_model, Sampler(), TrainConfig(steps=2, batch_size=8, lr=1e-2, progress=False))
    assert not torch.equal(before, small_model.weights()["blocks.0.mlp.W_in"])


def test_the_member_lists_are_the_task_protocol():
    """TASK_MEMBERS names exactly the protocol's members: with all of them an object is a Task, and
    without any one of them it is not."""
    from capwrap.tasks import Task
    from capwrap.tasks.base import TASK_MEMBERS

    def having(names):
        return type("T", (), {n: (lambda self: None) for n in names})()

    assert isinstance(having(TASK_MEMBERS), Task)
    for left_out in TASK_MEMBERS:
        assert not isinstance(having([n for n in TASK_MEMBERS if n != left_out]), Task), left_out


def test_accuracy_counts_argmax_hits_at_the_answer_position(small_model, small_task):
    batch = small_task.sample(40, seed=0)
    with torch.no_grad():
        logits = small_model(batch.tokens)[torch.arange(40), batch.answer_pos]
    expected = (logits.argmax(-1) == batch.answers).float().mean().item()
    assert accuracy(small_model, batch, batch_size=7) == pytest.approx(expected)
    # an answer set equal to the model's own predictions scores 1
    oracle = TaskBatch(batch.tokens, batch.answer_pos, logits.argmax(-1))
    assert accuracy(small_model, oracle) == 1.0
    with pytest.raises(ConfigError, match="empty"):
        accuracy(small_model, batch[0:0])


def test_a_large_vocabulary_is_run_a_few_sequences_at_a_time(small_task, monkeypatch):
    """Logits of many sequences over a large vocabulary do not fit one pass: the loops run as many
    sequences as a pass's budget allows, for the same answers."""
    import capwrap.models.model
    from capwrap.models import ModelSpec, build_model
    from capwrap.tasks import correctness

    spec = ModelSpec(d_vocab=small_task.d_vocab + 3000, n_ctx=small_task.seq_len, n_layers=1, d_model=16, n_heads=2)
    model = build_model(spec, seed=0)
    batch = small_task.sample(30, seed=1)
    whole = correctness(model, batch)
    bytes_per_sequence = small_task.seq_len * spec.d_vocab * 4
    monkeypatch.setattr(capwrap.models.model, "PASS_BUDGET", 4 * bytes_per_sequence)
    assert model.rows_per_pass(small_task.seq_len) == 4
    seen = []
    original = model.module.forward
    monkeypatch.setattr(model.module, "forward", lambda tokens, **kw: seen.append(len(tokens)) or original(tokens, **kw))
    assert torch.equal(correctness(model, batch), whole)
    assert max(seen) == 4 and sum(seen) == 30
    captured = model.capture(batch.tokens, "blocks.0.hook_resid_post", batch_size=16)
    assert captured["blocks.0.hook_resid_post"].shape[0] == 30 and max(seen[-8:]) == 4
