"""The analyzer interface: a :class:`Context` in, :class:`Evidence` out.

Every analyzer answers one of the two questions of :func:`capwrap.diagnose` (its ``question``
class attribute): ``deletion`` — is a capability that seems lost still in the tuned model under a
thin change, or is it gone? — or ``creation`` — is a behaviour that seems new a genuine capability,
or a wrapper over an old one? It declares its ``kind`` (``functional``: tests what the model can
still do; ``structural``: says where and how widely it changed) and the ``statistic`` it measures.

An analyzer reads everything it needs from a :class:`Context`: the pair (base, tuned), the
capability and downstream tasks (and the downstream task without its spurious correlation), the
run store if any, and the one :class:`EvalSet` of the diagnosis — the evaluation sequences and
the base and tuned models' per-sequence correctness on them, measured once — plus the one seed
scheme (:meth:`Context.seed_for`) and bootstrap resamples (:meth:`Context.resample`).
It returns :class:`Evidence`: its statistic with bootstrap replicates and an interval, headline
numbers (each with an interval), a per-component table, a sentence saying what it measured, and a
figure. Which way the evidence points (``wrapper``, ``change`` or ``neutral``) and how strongly is
the :class:`~capwrap.diagnosis.rule.VerdictRule`'s judgement of the statistic, so that strengths
mean the same thing for every analyzer. Analyzers hold only their settings: any subset runs in any
order.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> spec = ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2)
    >>> pair = ModelPair(build_model(spec, seed=0), build_model(spec, seed=1))
    >>> pair.spec.n_layers
    1
    >>> ModelPair(build_model(spec), build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=16, n_heads=2)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    capwrap.errors.ConfigError: the base and tuned models differ in n_layers (1 vs 2); ...
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from jaxtyping import Bool, Int
from torch import Tensor

from capwrap.analyzers.bootstrap import LEVEL, check_n_boot, percentile_interval, resample
from capwrap.errors import CapwrapWarning, ConfigError, whole_number
from capwrap.models import CapModel, ModelSpec
from capwrap.models.residency import Residency
from capwrap.models.vocabulary import shared_vocabulary
from capwrap.recording import RunStore, weight_sample
from capwrap.tasks.base import Task, TaskBatch, check_task, check_task_fits, correctness

if TYPE_CHECKING:
    from capwrap.diagnosis.rule import VerdictRule

__all__ = [
    "Analyzer",
    "Context",
    "Direction",
    "EvalSet",
    "Evidence",
    "Kind",
    "ModelPair",
    "Question",
    "check_same_tokenizer",
    "check_store_matches",
    "correctness",
]

Direction = Literal["wrapper", "change", "neutral"]
#: ``functional``: tests what the model can still do (read, release, revive the capability);
#: ``structural``: says where and how widely the model changed.
Kind = Literal["functional", "structural"]
#: ``deletion``: is a capability that seems lost hidden or gone? ``creation``: is a behaviour that
#: seems new a genuine capability, or a wrapper over an old one?
Question = Literal["deletion", "creation"]
#: The evaluation sets of a diagnosis: the capability, the downstream task, and the downstream
#: task without its spurious correlation (when the task has one).
EVAL_SETS = ("capability", "downstream", "downstream_free")
#: The largest seed a diagnosis takes: the seeds derived from it by offsets stay in every generator's range.
MAX_SEED = 2**31 - 1


def check_models(base: object, tuned: object, roles: tuple[str, str] = ("base", "tuned")) -> None:
    """Raise a clear error unless ``base`` and ``tuned`` are loaded models (:class:`CapModel`): a path
    or a name is not loaded for the caller, and the error says how to load it. ``roles``: what the
    two models are, as the error names them.

    Examples:
        >>> check_models("models/base", "models/adapter")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: base is a str ('models/base'), not a loaded model: ...
    """
    for which, model in zip(roles, (base, tuned), strict=True):
        if not isinstance(model, CapModel):
            shown = f" ({model!r})" if isinstance(model, (str, os.PathLike)) else ""
            raise ConfigError(
                f"{which} is a {type(model).__name__}{shown}, not a loaded model: load it with "
                "capwrap.load_model(PATH_OR_NAME) (a LoRA adapter: load_model(BASE, adapter=ADAPTER_DIR)), or diagnose "
                "two checkpoint folders as they are with capwrap.diagnosis.diagnose_checkpoints(BASE, TUNED, capability, downstream)"
            )


def check_same_tokenizer(base: CapModel, tuned: CapModel, roles: tuple[str, str] = ("base", "tuned")) -> None:
    """Raise if the two models read tokens differently: tokenizers with different vocabularies, or
    compiled Tracr models with different input tokens or output values (the same shape, and even
    the same weights, can mean other letters). ``roles``: what the two models are, as the error
    names them."""
    _check_same_tracr_vocabularies(base, tuned, roles)
    _check_same_hf_tokenizer(base, tuned, roles)


def _check_same_hf_tokenizer(base: CapModel, tuned: CapModel, roles: tuple[str, str]) -> None:
    """Raise if both models have a Hugging Face tokenizer and they read a token id the models have
    differently. Tokens a tokenizer has beyond its model's rows (a fine-tune's added chat tokens on a
    model loaded on its base's vocabulary) no model of the pair can read; tokens one tokenizer adds
    in rows the other's leaves unnamed (a padded embedding's spare rows) the other's texts never hold.
    """
    a, b = base.tokenizer, tuned.tokenizer
    if a is not None and b is not None:
        va, vb = _model_vocabulary(a, base.spec.d_vocab), _model_vocabulary(b, tuned.spec.d_vocab)
        if not (va.items() <= vb.items() or vb.items() <= va.items()):
            differ = len(set(va.items()) ^ set(vb.items()))
            raise ConfigError(
                f"the {roles[0]} and {roles[1]} models use different tokenizers ({len(va)} vs {len(vb)} tokens, {differ} entries "
                "differ); a pair must share its tokenizer (was one of them fine-tuned from the other?)"
            )


def _model_vocabulary(tokenizer: Any, d_vocab: int) -> dict[str, int]:
    """The tokens of ``tokenizer`` whose ids a model of ``d_vocab`` token rows has."""
    return {token: i for token, i in tokenizer.get_vocab().items() if i < d_vocab}


def _check_same_tracr_vocabularies(base: CapModel, tuned: CapModel, roles: tuple[str, str]) -> None:
    """Raise if two compiled Tracr models have different input tokens or output values."""
    for key, what in (("input_tokens", "input tokens"), ("output_values", "output values")):
        ta, tb = base.metadata.get(key), tuned.metadata.get(key)
        if ta is not None and tb is not None and list(ta) != list(tb):
            raise ConfigError(
                f"the {roles[0]} and {roles[1]} Tracr models have different {what} ({list(ta)} vs {list(tb)}): a token id means "
                "another thing in each, so they are not a pair (were they compiled from one program with one vocabulary?)"
            )


def _pair_hint(base: ModelSpec, tuned: ModelSpec, roles: tuple[str, str], adapter: bool = False) -> str:
    """What a pair that differs should do: the common fine-tunes that change a shape named, with their
    way back (``adapter``: the second model is a base with an adapter merged in)."""
    differing = set(base.differing(tuned))
    if shared_vocabulary(base, tuned) is not None:
        load = "BASE, adapter=ADAPTER" if adapter else "PATH"
        return (f"the fine-tune resized the vocabulary ({base.d_vocab} -> {tuned.d_vocab} tokens: tokens added, e.g. a "
                f"pad or chat token, or the embedding padded). Compare it on the {roles[0]}'s tokens: load the "
                f"{roles[1]} model with load_model({load}, d_vocab={base.d_vocab}) (diagnose_checkpoints and "
                "`capwrap diagnose` do so by themselves)")  # fmt: skip
    if shared_vocabulary(base, tuned, base_tokens=0) is not None:
        return (f"the {roles[1]} model has fewer token rows than the {roles[0]} ({base.d_vocab} -> {tuned.d_vocab}): "
                f"were the two swapped? A fine-tune that cut rows no token of the {roles[0]}'s tokenizer uses (a padded "
                f"embedding cut back by resize_token_embeddings(len(tokenizer))) is compared on its rows: load the "
                f"{roles[0]} with load_model(PATH, d_vocab={tuned.d_vocab}) (`capwrap diagnose` does so when the "
                f"{roles[0]}'s tokenizer uses none of the rows cut)")  # fmt: skip
    if differing == {"tie_embeddings"}:
        return ("the fine-tune untied (or tied) the embedding and unembedding. capwrap compares models of one shape: "
                f"save the {roles[1]} model with the {roles[0]}'s tie_word_embeddings setting, if its two matrices are "
                f"still equal, or compare it with an untied copy of the {roles[0]}")  # fmt: skip
    return "a pair must share architecture and shape (was one of them fine-tuned from the other?)"


@dataclass
class ModelPair:
    """A base model and a fine-tuned version of it, of the same architecture and shape, reading tokens
    the same way (:func:`check_same_tokenizer`).

    With a :class:`~capwrap.models.residency.Residency` (``diagnose(..., memory="low")``) the two
    models take turns in memory: analyzers use them one after the other, do a copy's work on the
    model itself (:meth:`scratch`) and read the other model's weights one at a time (:meth:`weight`).
    Without one, both stay in memory and :meth:`scratch` lends a copy.

    Attributes:
        base: the model before fine-tuning.
        tuned: the fine-tuned model.
        residency: the residency both models are members of, or ``None`` (both in memory).
        roles: what the two models are, as errors name them (a pair checked for another use, e.g.
            ``("base", "control")`` or ``("source", "target")``).
    """

    base: CapModel
    tuned: CapModel
    residency: Residency | None = None
    roles: tuple[str, str] = ("base", "tuned")

    def __post_init__(self) -> None:
        roles = self.roles
        check_models(self.base, self.tuned, roles)
        _check_same_tracr_vocabularies(self.base, self.tuned, roles)  # other letters say more than the shapes they give
        detail = self.base.spec.differences(self.tuned.spec)
        if detail:
            raise ConfigError(
                f"the {roles[0]} and {roles[1]} models differ in {detail}; "
                + _pair_hint(self.base.spec, self.tuned.spec, roles, adapter="adapter" in self.tuned.metadata)
            )
        _check_same_hf_tokenizer(self.base, self.tuned, roles)  # with the Tracr check above: check_same_tokenizer
        if self.residency is not None:
            for model in (self.base, self.tuned):
                if model not in self.residency:
                    self.residency.add(model)

    @contextmanager
    def scratch(self, model: CapModel) -> Iterator[CapModel]:
        """A model to change freely (prune, graft into, train) that is ``model`` before the
        changes: a copy, or with a residency ``model`` itself, read back from its file afterwards."""
        if self.residency is None:
            if not model.copyable:
                raise ConfigError(
                    f"{type(model).__name__} is not copied (accelerate spread it over devices), so changes to it need "
                    "a pair that takes turns in memory: ModelPair(base, tuned, Residency()), as diagnose() makes one"
                )
            yield model.clone()
            return
        self.adopt(model)
        with self.residency.scratch(model) as work:
            yield work

    def revert(self, work: CapModel, model: CapModel) -> None:
        """Undo every change made to ``work``, lent by :meth:`scratch` for ``model``."""
        if self.residency is None:
            work.copy_weights_from(model)
        else:
            self.residency.revert(model)

    def adopt(self, model: CapModel) -> CapModel:
        """Let another model of the pair's size (a control) take turns with the pair; returns it."""
        if self.residency is not None and model not in self.residency:
            self.residency.add(model)
        return model

    def make_room(self) -> None:
        """Free the pair's memory before building a model of another origin (with a residency)."""
        if self.residency is not None:
            self.residency.release_all()

    def weight(self, model: CapModel, name: str) -> Tensor:
        """One canonical weight of ``model``, without bringing it into memory (with a residency,
        a released model's weight is read from its file)."""
        if self.residency is None:
            return model.weights()[name]
        return self.residency.read_weight(model, name)

    @property
    def spec(self) -> ModelSpec:
        """The shared spec."""
        return self.base.spec

    def models(self) -> dict[str, CapModel]:
        """``{"base": base, "tuned": tuned}``."""
        return {"base": self.base, "tuned": self.tuned}

    def check_tasks(self, *tasks: Task) -> None:
        """Raise a clear error if the models cannot embed a task's tokens or sequences."""
        for task in tasks:
            check_task_fits(self.base, task)


def check_store_matches(pair: ModelPair, store: RunStore) -> None:
    """Raise if ``store`` holds no step, was recorded from a model of another shape than ``pair``'s, or by a
    run that did not end with the tuned model (where the store sampled its weights: :mod:`~capwrap.recording.weight_sample`)."""
    if not store.steps:
        raise ConfigError(
            f"the RunStore at {store.path} holds no recorded step (its steps.jsonl is empty or ends inside its first "
            "line: the recording stopped before its first step was written); pass the store of a run that recorded "
            "steps, or none"
        )
    if "spec" not in store.meta:
        raise ConfigError(
            f"the RunStore at {store.path} was not written by a Recorder (its meta.json names no model spec), so "
            "the analyzers cannot read it as a fine-tuning run; pass the store a Recorder (capwrap.train, "
            "RecorderCallback) wrote, or none"
        )
    if detail := pair.spec.mismatch(store.meta.get("spec")):
        raise ConfigError(
            f"the RunStore at {store.path} was recorded from another model: it differs in {detail} (this pair's "
            "value first); pass the store of the run that produced this tuned model"
        )
    weights = pair.tuned.weights() if pair.residency is None else None  # (once: a live LoRA model merges each time)
    match = weight_sample.match_steps(
        store, weights.__getitem__ if weights is not None else lambda name: pair.weight(pair.tuned, name)
    )
    if match is None or match.ends_the_run:  # a store recorded without sampled weights cannot tell
        return
    if not match.steps and store.last_step != match.last_step:
        warnings.warn(
            f"the RunStore at {store.path} does not end with a full record (its last step {store.last_step} was "
            f"not measured: a loop that passed neither final=True nor recorder.finish(), or a run that stopped "
            f"without closing its recorder), so it cannot be checked against the tuned model, which is none of the "
            f"steps it measured (the last, {match.last_step}); it is read as this model's run",
            CapwrapWarning,
            stacklevel=3,
        )
        return
    if match.steps:
        raise ConfigError(
            f"the tuned model has the weights the run in the RunStore at {store.path} had at step {match.steps[-1]}, "
            f"but the store goes on to step {match.last_step}, and its later steps would be read as this model's past "
            "(a checkpoint saved before the end, or the best one a Trainer loaded at the end); diagnose the run's "
            f"final model with this store, this model without one, or this model with a copy of the store rolled "
            f"back to its step (RunStore.resume(copy).rollback({match.steps[-1]}))"
        )
    raise ConfigError(
        f"the RunStore at {store.path} was recorded from another run: the tuned model's weights are none of the "
        f"steps it measured in full ({match.mismatched} of {match.sampled} sampled weights differ from its last step's, "
        f"at step {match.last_step}, by more than {match.precision} rounding; the largest by "
        f"{match.largest_difference:.2g} of the value); pass the store of the run that produced this tuned model, "
        "or none"
    )


@dataclass
class EvalSet:
    """The one evaluation set of a diagnosis: sequences of each test set and the base and tuned
    models' per-sequence correctness on them, measured once and shared by every analyzer and
    every reason.

    Attributes:
        batches: test set name (``capability``, ``downstream``, ``downstream_free``) -> sequences.
        correct: ``"base"``/``"tuned"`` -> test set name -> ``[n]`` booleans.
        seed: the seed the sequences were drawn with.
    """

    batches: dict[str, TaskBatch]
    correct: dict[str, dict[str, Bool[Tensor, " n"]]]
    seed: int

    @classmethod
    def measure(cls, pair: ModelPair, tasks: dict[str, Task], size: int, seed: int) -> EvalSet:
        """Sample ``size`` sequences of each task (set ``i`` with seed ``seed * 1000 + 77 + i``) and
        measure both models on them."""
        if size <= 0:
            raise ConfigError(f"the evaluation set needs a positive size, got {size}")
        batches = {k: t.sample(size, seed=seed * 1000 + 77 + i) for i, (k, t) in enumerate(tasks.items())}
        correct = {which: {k: correctness(m, b) for k, b in batches.items()} for which, m in pair.models().items()}
        return cls(batches, correct, seed)

    def accuracy(self, model: str, which: str) -> float:
        """Accuracy of ``model`` (``base`` or ``tuned``) on test set ``which``."""
        return float(self.correct[model][which].float().mean())

    def table(self) -> dict[str, dict[str, float]]:
        """``{model: {test set: accuracy}}``."""
        return {m: {k: self.accuracy(m, k) for k in self.batches} for m in self.correct}


@dataclass
class Context:
    """Everything an analyzer reads: the pair, the tasks, the run store, the shared evaluation set,
    the seed scheme and the bootstrap settings. :func:`capwrap.diagnose` builds one per diagnosis;
    calling an analyzer directly builds one with :meth:`build`.

    Attributes:
        pair: the models.
        capability: the task whose fate is in question (deletion).
        downstream: the fine-tuning task, as tested (e.g. with its spurious correlation, C_Te = 1).
        downstream_free: the downstream task without its spurious correlation (C_Te = 0), if any.
        store: the fine-tuning run's store, if recorded.
        eval: the shared evaluation set.
        seed: the diagnosis's seed; every analyzer derives its own from it (:meth:`seed_for`).
        n_boot: bootstrap resamples per interval.
        level: coverage of the intervals.
        progress: whether analyzers show progress bars of their long work (reverse fine-tuning).
    """

    pair: ModelPair
    capability: Task
    downstream: Task
    downstream_free: Task | None
    store: RunStore | None
    eval: EvalSet
    seed: int = 0
    n_boot: int = 200
    level: float = LEVEL
    progress: bool = False

    @classmethod
    def build(
        cls,
        pair: ModelPair,
        capability: Task,
        downstream: Task,
        store: RunStore | None = None,
        downstream_free: Task | None | Literal["auto"] = "auto",
        eval_size: int = 1024,
        seed: int = 0,
        n_boot: int = 200,
        level: float = LEVEL,
        progress: bool = False,
    ) -> Context:
        """Check the inputs and measure the evaluation set (``downstream_free="auto"``: the
        downstream task's own :meth:`~capwrap.tasks.Task.correlation_free` variant)."""
        eval_size = whole_number(eval_size, "eval_size (sequences per test set)", minimum=1)
        seed = whole_number(seed, f"seed (0 to {MAX_SEED})", minimum=0)
        if seed > MAX_SEED:
            raise ConfigError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
        _check_same_dtype(pair)
        for task in (capability, downstream):
            check_task(task)  # analyzers read the whole protocol
        if downstream_free == "auto":
            downstream_free = downstream.correlation_free()
        tasks = {"capability": capability, "downstream": downstream}
        if downstream_free is not None:
            tasks["downstream_free"] = downstream_free
        pair.check_tasks(*tasks.values())
        if store is not None:
            check_store_matches(pair, store)
        n_boot = check_n_boot(n_boot, level)
        evalset = EvalSet.measure(pair, tasks, eval_size, seed)
        return cls(pair, capability, downstream, downstream_free, store, evalset, seed, n_boot, level, progress)

    def seed_for(self, analyzer: str, purpose: str) -> int:
        """The seed of one random choice of one analyzer (stable across runs and Python versions)."""
        return self.seed * 1_000_003 + zlib.crc32(f"{analyzer}/{purpose}".encode()) % 1_000_003

    def resample(self, n: int, analyzer: str, purpose: str = "bootstrap") -> Int[Tensor, "n_boot n"]:
        """``n_boot`` bootstrap resamples of ``n`` sequence indices."""
        return resample(n, self.n_boot, self.seed_for(analyzer, purpose))

    def eval_resample(self, which: str) -> Int[Tensor, "n_boot n"]:
        """Bootstrap resamples of evaluation set ``which``, shared by every analyzer (paired: the same
        sequences for base and tuned)."""
        return resample(len(self.eval.batches[which]), self.n_boot, self.seed_for("eval", which))

    def accuracy_replicates(self, model: str, which: str) -> np.ndarray:
        """Bootstrap replicates of one accuracy of the evaluation set."""
        correct = self.eval.correct[model][which].float()
        return correct[self.eval_resample(which)].mean(1).numpy()

    def interval(self, replicates: np.ndarray) -> tuple[float, float]:
        """The :attr:`level` percentile interval of ``replicates``."""
        return percentile_interval(replicates, self.level)


@dataclass
class Evidence:
    """What one analyzer found.

    Attributes:
        analyzer: the analyzer's name.
        headline: a few named numbers (JSON-serializable floats).
        table: per-component (or per-setting) results.
        direction: ``wrapper``, ``change`` or ``neutral`` (the rule's judgement of ``value``).
        strength: how strongly it points there, in [0, 1] (see :mod:`capwrap.diagnosis.rule`).
        reasons: sentences that cite the numbers behind ``direction``.
        details: further data for figures and reports (curves, matrices), JSON-serializable.
        kind: the analyzer's :data:`Kind` (set from the analyzer's class attribute).
        question: the :data:`Question` the evidence is about (from the analyzer's class attribute).
        statistic: the name of the analyzer's statistic (``None``: the analyzer judges itself).
        value: the statistic (NaN: not applicable to this pair; ``summary`` says why).
        replicates: bootstrap replicates of ``value`` (the verdict's confidence comes from them).
        intervals: headline name (and ``value``) -> its confidence interval: the bootstrap's where the
            analyzer resamples the number (``value`` always; most numbers measured on sampled
            sequences); the number itself, twice, otherwise — numbers computed exactly (from the
            weights; counts such as ``units`` and ``budget``) and the few measured numbers an analyzer
            does not resample (a graft's accuracy, a majority baseline, a revival's median steps), so
            a zero-width interval does not by itself mean exact. What an analyzer draws once (a
            probe's training data, split and floor model; pruning's scoring sequences) is not varied
            across replicates either: the intervals cover the test sequences' sampling.
        summary: what was measured, in one sentence that cites the numbers.
    """

    analyzer: str
    headline: dict[str, float]
    table: pd.DataFrame
    direction: Direction = "neutral"
    strength: float = 0.0
    reasons: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    plot: Callable[[Evidence], Any] | None = field(default=None, repr=False, compare=False)
    kind: Kind = "structural"
    question: Question = "deletion"
    statistic: str | None = None
    value: float = math.nan
    replicates: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    summary: str = ""

    def __post_init__(self) -> None:
        if self.direction not in ("wrapper", "change", "neutral"):
            raise ConfigError(f"direction must be 'wrapper', 'change' or 'neutral', got {self.direction!r}")
        if self.kind not in ("functional", "structural"):
            raise ConfigError(f"kind must be 'functional' or 'structural', got {self.kind!r}")
        if self.question not in ("deletion", "creation"):
            raise ConfigError(f"question must be 'deletion' or 'creation', got {self.question!r}")
        self.strength = float(min(1.0, max(0.0, self.strength)))
        self.replicates = np.asarray(self.replicates, dtype=np.float64)

    @property
    def signed_strength(self) -> float:
        """``strength`` with the sign of ``direction`` (wrapper +, change −)."""
        return {"wrapper": 1.0, "change": -1.0, "neutral": 0.0}[self.direction] * self.strength

    @property
    def applicable(self) -> bool:
        """Whether the statistic could be measured on this pair (analyzers without a statistic always are)."""
        return self.statistic is None or math.isfinite(self.value)

    def figure(self) -> Any:
        """A plotly figure of the evidence."""
        if self.plot is None:
            import plotly.graph_objects as go

            return go.Figure(
                go.Table(header=dict(values=list(self.headline)), cells=dict(values=list(self.headline.values())))
            )
        return self.plot(self)

    def to_dict(self, max_rows: int = 50) -> dict[str, Any]:
        """JSON-serializable summary (the table truncated to ``max_rows`` rows; ``table_rows`` says how
        many it has)."""
        return {
            "analyzer": self.analyzer,
            "question": self.question,
            "kind": self.kind,
            "statistic": self.statistic,
            "value": _jsonable(self.value),
            "interval": [_jsonable(v) for v in self.intervals.get("value", (math.nan, math.nan))],
            "direction": self.direction,
            "strength": round(self.strength, 4),
            "summary": self.summary,
            "headline": {k: _jsonable(v) for k, v in self.headline.items()},
            "intervals": {k: [_jsonable(a), _jsonable(b)] for k, (a, b) in self.intervals.items()},
            "reasons": list(self.reasons),
            "table": [
                {k: _jsonable(v) for k, v in row.items()} for row in self.table.head(max_rows).to_dict(orient="records")
            ],
            "table_rows": len(self.table),
        }


def _jsonable(value: Any) -> Any:
    """A JSON value: integers stay integers, floats are rounded (non-finite ones become ``None``)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) or value is None:
        return value
    try:
        number = round(float(value), 6)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


class Analyzer(ABC):
    """Base class of analyzers: settings in the constructor, the work in :meth:`analyze`.

    Subclasses declare ``kind``, ``question`` and ``statistic`` as class attributes, and return
    :class:`Evidence` whose ``value`` is that statistic (with its bootstrap ``replicates``) and whose
    ``summary`` says what was measured; the :class:`~capwrap.diagnosis.rule.VerdictRule` turns it
    into a direction and a strength.
    """

    name: str = "analyzer"
    """Short name used in reports and in ``Diagnosis``."""
    kind: ClassVar[Kind]
    """What the evidence is about (:data:`Kind`); every analyzer declares it."""
    question: ClassVar[Question] = "deletion"
    """Which of diagnose's two questions the analyzer answers."""
    statistic: ClassVar[str | None] = None
    """The name of the statistic the analyzer measures: the rule's anchors for it are keyed by this
    name (never by the analyzer's ``name``). ``None``: the analyzer sets its own direction and strength."""
    shows: ClassVar[tuple[Direction, ...]] = ("wrapper", "change")
    """The directions the analyzer's test can establish. A *sufficient* test of a wrapper (pruning
    that brings the capability back shows one; pruning that does not shows nothing) declares
    ``("wrapper",)``: the fitted rule never lets its statistic point to a change, whatever the
    calibration records happen to show (:func:`~capwrap.validation.fit_rule`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the class's ``shows`` and register the statistic it measures (:func:`analyzer_of`)."""
        super().__init_subclass__(**kwargs)
        shows = cls.shows
        if isinstance(shows, str) or not shows or not set(shows) <= {"wrapper", "change"}:
            raise TypeError(
                f"{cls.__name__}.shows must be a tuple naming 'wrapper', 'change' or both, "
                f"e.g. ('wrapper',), got {shows!r}"
            )
        if cls.statistic is not None:
            _register(cls)

    @abstractmethod
    def analyze(self, context: Context) -> Evidence:
        """Run the analysis and return its evidence."""

    def __call__(
        self,
        pair: ModelPair,
        capability: Task,
        downstream: Task,
        store: RunStore | None = None,
        *,
        context: Context | None = None,
        rule: VerdictRule | None = None,
        eval_size: int | None = None,
        seed: int | None = None,
    ) -> Evidence:
        """Analyze ``pair`` and judge the evidence with ``rule`` (default: the fitted rule).

        Called directly, the analyzer measures its own evaluation set of ``eval_size`` sequences
        per task (default 1024, seed ``seed``, default 0); :func:`capwrap.diagnose` passes the
        diagnosis's ``context``, which holds the pair, the tasks, the store and the evaluation set.

        Raises:
            ConfigError: a ``context`` given with another pair, tasks or store than its own, or with
                another ``eval_size``/``seed`` than its evaluation set was drawn with.
        """
        from capwrap.diagnosis.rule import default_rule

        if context is None:
            context = Context.build(pair, capability, downstream, store, eval_size=1024 if eval_size is None else eval_size,
                                    seed=0 if seed is None else seed)  # fmt: skip
        else:
            _check_context_matches(context, pair, capability, downstream, store, eval_size, seed)
        evidence = self.analyze(context)
        evidence.kind, evidence.question = type(self).kind, type(self).question
        evidence.statistic = type(self).statistic
        if evidence.statistic is not None and "value" not in evidence.intervals:
            evidence.intervals["value"] = context.interval(evidence.replicates)
        for key, number in evidence.headline.items():  # computed exactly (from weights, or a count)
            if key not in evidence.intervals and isinstance(number, (int, float)):
                evidence.intervals[key] = (float(number), float(number))
        for key, number in [("value", evidence.value), *evidence.headline.items()]:
            if key in evidence.intervals and isinstance(number, float) and math.isnan(number):
                evidence.intervals[key] = (math.nan, math.nan)  # a number that does not apply has no interval
        return (rule or default_rule()).judge(evidence)

    def settings(self) -> dict[str, Any]:
        """The analyzer's settings, for reports and for telling one call's evidence from another's
        (:func:`~capwrap.diagnosis.evidence_folder.analyzer_identity`): its fields, a model among them
        as its weights' SHA-256, a task as its description."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: _setting(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _setting(value: Any) -> Any:
    """One setting as data: a model by its weights' digest (not copied, as ``dataclasses.asdict``
    would copy it), a task by its description, a dataclass as a dict."""
    if isinstance(value, CapModel):
        from capwrap.provenance import weights_sha256

        return {"weights_sha256": weights_sha256(value)}  # (not its path: the same weights, however loaded)
    if isinstance(value, Task):
        return value.describe()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _check_same_dtype(pair: ModelPair) -> None:
    """Raise unless the pair's two models hold weights of one dtype: analyzers mix their activations
    (patching runs one model's outputs through the other). (A pair that is only compared, as
    :func:`~capwrap.analyzers.weight_change_table` does, may mix them.)"""
    if pair.base.dtype != pair.tuned.dtype:
        kinds = [str(m.dtype).removeprefix("torch.") for m in (pair.base, pair.tuned)]
        raise ConfigError(
            f"the base model's weights are {kinds[0]} and the tuned model's {kinds[1]}: analyzers compare and mix "
            "the two models' activations at one precision. Load both with the same dtype "
            f"(load_model(..., dtype={kinds[0]!r}), or a copy: model.clone(dtype={kinds[0]!r}))"
        )


def _check_context_matches(
    context: Context,
    pair: ModelPair,
    capability: Task,
    downstream: Task,
    store: RunStore | None,
    eval_size: int | None,
    seed: int | None,
) -> None:
    """Raise if an analyzer call gives a context together with anything the context would override."""
    given = {"pair": (pair, context.pair), "capability": (capability, context.capability),
             "downstream": (downstream, context.downstream)}  # fmt: skip
    if store is not None:
        given["store"] = (store, context.store)
    differ = [name for name, (mine, its) in given.items() if mine is not its]
    measured = {"eval_size": len(context.eval.batches["capability"]), "seed": context.seed}
    differ += [name for name, value in (("eval_size", eval_size), ("seed", seed)) if value not in (None, measured[name])]
    if differ:
        raise ConfigError(
            f"the context given to the analyzer holds its own {', '.join(differ)}, and the call gives "
            f"{'another' if len(differ) == 1 else 'others'}: the analyzer would read the context's. Call "
            "analyzer(context.pair, context.capability, context.downstream, context=context), or leave the "
            "context out to measure these"
        )


#: statistic -> the analyzer class that measures it (filled as analyzer classes are defined).
_MEASURED_BY: dict[str, type[Analyzer]] = {}


def _register(cls: type[Analyzer]) -> None:
    """Record that ``cls`` measures its statistic. One statistic, one meaning: a second, unrelated
    class claiming it is refused (a subclass may inherit it when it declares the same ``shows``)."""
    statistic = cls.statistic
    assert statistic is not None
    known = _MEASURED_BY.get(statistic)
    if known is None or (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__):
        _MEASURED_BY[statistic] = cls  # new, or the same class defined again (a module reloaded)
    elif not issubclass(cls, known):
        raise TypeError(
            f"{cls.__name__} measures {statistic!r}, which {known.__module__}.{known.__qualname__} already "
            f"measures: give {cls.__name__} a statistic name of its own (the rule's anchors are keyed by it), "
            f"or subclass {known.__name__}"
        )
    elif set(cls.shows) != set(known.shows):
        raise TypeError(
            f"{cls.__name__} inherits the statistic {statistic!r} of {known.__name__} but declares "
            f"shows={cls.shows!r} instead of {known.shows!r}: one statistic has one set of directions"
        )


def analyzer_of(statistic: str) -> type[Analyzer] | None:
    """The analyzer class that measures ``statistic`` (the first class defined with it; subclasses
    inherit it); ``None`` when no class defined so far does.

    Examples:
        >>> import capwrap.analyzers
        >>> analyzer_of("pruning_recovered_share").shows
        ('wrapper',)
    """
    return _MEASURED_BY.get(statistic)
