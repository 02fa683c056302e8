"""The `Task` protocol and the batch every task returns.

A task generates token sequences whose answer sits at a known position, plus *latent labels*
(the true counts, indices ...) that probes read from activations. Training, evaluation,
recording and the analyzers only use this interface.

Examples:
    >>> from capwrap.tasks import PCFGTask
    >>> task = PCFGTask(family="count", operand="a")
    >>> batch = task.sample(4, seed=0)
    >>> batch.tokens.shape[0], batch.answers.shape, sorted(batch.labels)[:3]
    (4, torch.Size([4]), ['count_a', 'count_b', 'count_c'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from capwrap.checks import check_batch_shapes
from capwrap.errors import ConfigError

if TYPE_CHECKING:
    from capwrap.models import CapModel

__all__ = [
    "TaskBatch",
    "Task",
    "TaskBase",
    "answer_logits",
    "answer_loss",
    "task_loss",
    "sequence_logprob",
    "accuracy",
    "check_task",
    "check_task_fits",
    "correctness",
    "TASK_MEMBERS",
    "SAMPLING_MEMBERS",
    "ANALYZER_MEMBERS",
]


@dataclass
class TaskBatch:
    """A batch of task sequences.

    Attributes:
        tokens: token ids, ``[batch, pos]``.
        answer_pos: the position whose next-token logits must predict the answer, ``[batch]``.
        answers: the correct answer token ids, ``[batch]``.
        labels: latent labels for probes (e.g. ``count_a``), each ``[batch]``.
        lm_targets: for text tasks, the next token at every position (``-100`` where there is
            none, e.g. padding), ``[batch, pos]``: training then minimizes the language-modeling
            loss over the whole sequence; accuracy still reads the answer position.
    """

    tokens: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, " batch"]
    answers: Int[Tensor, " batch"]
    labels: dict[str, Int[Tensor, " batch"]] = field(default_factory=dict)
    lm_targets: Int[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        check_batch_shapes(self)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: slice | Tensor) -> TaskBatch:
        return TaskBatch(
            self.tokens[index],
            self.answer_pos[index],
            self.answers[index],
            {k: v[index] for k, v in self.labels.items()},
            None if self.lm_targets is None else self.lm_targets[index],
        )

    def to(self, device: str | torch.device) -> TaskBatch:
        """The batch on ``device``."""
        return TaskBatch(
            self.tokens.to(device),
            self.answer_pos.to(device),
            self.answers.to(device),
            {k: v.to(device) for k, v in self.labels.items()},
            None if self.lm_targets is None else self.lm_targets.to(device),
        )


@runtime_checkable
class Task(Protocol):
    """What capwrap needs from a task: sequences with an answer position, latent labels for probes,
    and what the analyzers read about the capability it measures.

    Subclass :class:`TaskBase` to get the defaults of the analyzer-facing members.
    """

    name: str

    @property
    def d_vocab(self) -> int:
        """Number of token ids the task uses (the model must embed all of them)."""

    @property
    def seq_len(self) -> int:
        """Length of every sequence (the model's context must be at least this)."""

    @property
    def probe_label(self) -> str | None:
        """The latent label (a key of ``TaskBatch.labels``) that measures the capability inside the
        model, e.g. ``count_a``; ``None`` when the task has none."""

    @property
    def capability_floor(self) -> float:
        """Accuracy below which a model does not have the capability at all (chance-level)."""

    def probe_task(self) -> Task:
        """The task whose sequences probes read :attr:`probe_label` from (often the task itself)."""

    def correlation_free(self) -> Task | None:
        """The same task with its planted spurious correlation removed (C_Te = 0), or ``None`` when
        the task has no planted correlation."""

    def sample(self, n: int, seed: int) -> TaskBatch:
        """``n`` sequences, reproducible from ``seed``."""

    def describe(self) -> dict[str, Any]:
        """A JSON-serializable description (stored with checkpoints and runs)."""


class TaskBase:
    """Defaults of the analyzer-facing :class:`Task` members: no latent label, a 50% capability
    floor (procedural tasks with a handful of answers), probes read the task itself, and no planted
    correlation."""

    @property
    def probe_label(self) -> str | None:
        return None

    @property
    def capability_floor(self) -> float:
        return 0.5

    def probe_task(self) -> Task:
        return self  # type: ignore[return-value]

    def correlation_free(self) -> Task | None:
        return None


#: What training and sampling read of a task (:func:`check_task_fits` checks these).
SAMPLING_MEMBERS: tuple[str, ...] = ("name", "d_vocab", "seq_len", "sample", "describe")
#: What analyzers and ``diagnose`` read besides (:class:`TaskBase` supplies defaults for all four).
ANALYZER_MEMBERS: tuple[str, ...] = ("probe_label", "capability_floor", "probe_task", "correlation_free")
#: The whole :class:`Task` protocol, checked by :func:`check_task`.
TASK_MEMBERS: tuple[str, ...] = SAMPLING_MEMBERS + ANALYZER_MEMBERS


def check_task(task: object, members: tuple[str, ...] = TASK_MEMBERS) -> None:
    """Raise a clear error naming what ``task`` lacks of the :class:`Task` protocol (of ``members``:
    training needs only :data:`SAMPLING_MEMBERS`, analyzers all of :data:`TASK_MEMBERS`).

    Example:
        >>> class Sampler:  # enough to train on, not enough to diagnose with
        ...     name, d_vocab, seq_len = "copy", 10, 8
        ...     def sample(self, n, seed): ...
        ...     def describe(self): ...
        >>> check_task(Sampler(), SAMPLING_MEMBERS)
        >>> check_task(Sampler())
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: Sampler is not a capwrap Task: it lacks probe_label, capability_floor, probe_task, correlation_free; subclass capwrap.tasks.TaskBase, which supplies them
    """
    if isinstance(task, str):
        raise ConfigError(
            f"{task!r} is a task spec, not a task: make the task with capwrap.tasks.task_from_spec({task!r}, model=MODEL) "
            "(the command line takes the spec itself)"
        )
    if missing := [m for m in members if not hasattr(task, m)]:
        supplied = [m for m in missing if m in ANALYZER_MEMBERS]
        own = [m for m in missing if m not in ANALYZER_MEMBERS]
        hints = []
        if supplied:
            hints.append(f"subclass capwrap.tasks.TaskBase, which supplies {', '.join(supplied) if own else 'them'}")
        if own:
            hints.append("see the Task protocol in capwrap.tasks" + (" for the rest" if supplied else ""))
        raise ConfigError(f"{type(task).__name__} is not a capwrap Task: it lacks {', '.join(missing)}; {'; '.join(hints)}")


def check_task_fits(model: CapModel, task: Task) -> None:
    """Raise a clear error if ``task`` cannot be sampled (:data:`SAMPLING_MEMBERS`) or ``model`` cannot
    embed its tokens or sequences."""
    check_task(task, SAMPLING_MEMBERS)
    if task.d_vocab > model.spec.d_vocab:
        fix = (  # a compiled model reads the vocabulary it was compiled with, and no other
            "a compiled Tracr model reads only its program's vocabulary: give Tracr tasks (command line: "
            "tracr=counter,operand=b or tracr=max_identifier,rank=4; Python: "
            "TracrCounterTask(CompiledProgram.from_model(model), ...) from capwrap.tasks.tracr)"
            if not model.spec.has_hf_equivalent
            else f"give a task whose tokens fit, or build the model with d_vocab >= {task.d_vocab}"
        )
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None and model.spec.has_hf_equivalent and len(tokenizer) > model.spec.d_vocab:
            fix = (  # a text task takes its ids from the model's own tokenizer
                f"the model's tokenizer has {len(tokenizer)} tokens, more than the model embeds: its tokenizer "
                "files do not belong to this checkpoint (or a fine-tune added tokens without "
                "resize_token_embeddings); put the tokenizer the model was trained with in its folder"
            )
        raise ConfigError(
            f"task {task.name!r} uses {task.d_vocab} token ids but the model embeds only {model.spec.d_vocab}; {fix}"
        )
    if task.seq_len > model.spec.n_ctx:
        raise ConfigError(
            f"task {task.name!r} makes sequences of {task.seq_len} tokens but the model's context is "
            f"n_ctx={model.spec.n_ctx}; shorten the task or build the model with n_ctx >= {task.seq_len}"
        )


def answer_logits(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each sequence's answer position."""
    return logits[torch.arange(len(batch), device=logits.device), batch.answer_pos.to(logits.device)]


def answer_loss(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, ""]:
    """Cross-entropy of the answer token (the training objective of procedural tasks), in float32."""
    return F.cross_entropy(answer_logits(logits, batch).float(), batch.answers.to(logits.device))


def task_loss(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, ""]:
    """The training objective: the language-modeling loss over ``batch.lm_targets`` when the batch
    has them (text tasks), else the answer token's cross-entropy; in float32 whatever the logits' dtype."""
    if batch.lm_targets is None:
        return answer_loss(logits, batch)
    targets = batch.lm_targets.to(logits.device).flatten()
    return F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100)


def sequence_logprob(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Log-probability of each sequence's target under ``logits``: of the answer token, or for text
    tasks (``batch.lm_targets``) the sum over every target token."""
    if batch.lm_targets is None:
        return (
            answer_logits(logits, batch)
            .float()
            .log_softmax(-1)
            .gather(-1, batch.answers.to(logits.device)[:, None])[:, 0]
        )
    targets = batch.lm_targets.to(logits.device)
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (logp * (targets != -100)).sum(-1)


@torch.no_grad()
@torch.no_grad()
def correctness(model: CapModel, batch: TaskBatch, batch_size: int = 512) -> Bool[Tensor, " batch"]:
    """Per sequence: whether ``model``'s arg-max prediction at the answer position is the answer.
    Runs ``batch_size`` sequences at a time, fewer when their logits would pass
    :meth:`~capwrap.models.CapModel.rows_per_pass`'s budget (a large vocabulary)."""
    was_training = model.module.training
    model.eval()
    out = []
    step = min(batch_size, model.rows_per_pass(batch.tokens.shape[1]))
    try:
        for start in range(0, len(batch), step):
            part = batch[start : start + step].to(model.device)
            out.append((answer_logits(model(part.tokens), part).argmax(-1) == part.answers).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def accuracy(model: CapModel, batch: TaskBatch, batch_size: int = 512) -> float:
    """Share of sequences whose arg-max prediction at the answer position is the answer."""
    if len(batch) == 0:
        raise ConfigError("cannot measure accuracy on an empty batch")
    return int(correctness(model, batch, batch_size).sum()) / len(batch)
