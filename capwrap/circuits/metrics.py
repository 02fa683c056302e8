"""Metrics edges are scored by: ``metric(logits, batch) -> [batch]``, one number per sequence.

A metric sees the full logits ``[batch, pos, d_vocab]`` and the :class:`~capwrap.tasks.TaskBatch`
(answers, answer positions, language-modeling targets), so it can read the answer position (procedural
tasks) or every position (text).

Examples:
    >>> import torch
    >>> from capwrap.tasks import TaskBatch
    >>> batch = TaskBatch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([2, 1]), torch.tensor([0, 1]))
    >>> logits = torch.zeros(2, 3, 4)
    >>> answer_logprob(logits, batch)        # uniform over 4 tokens: log(1/4)
    tensor([-1.3863, -1.3863])
    >>> answer_prob(logits, batch)
    tensor([0.2500, 0.2500])
    >>> answer_logit(logits, batch)
    tensor([0., 0.])
    >>> answer_logodds(logits, batch)        # log(1/4) - log(3/4) = -log 3
    tensor([-1.0986, -1.0986])
    >>> negative_loss(logits, batch)
    tensor([-1.3863, -1.3863])

Which metric to score by matters where the model is saturated: on the demo model (the answer's
log-probability about -0.001) EAP-IG follows exact edge patching more closely when scoring the
answer's log-odds, logit or probability than its log-probability (benchmarks/RESULTS.md,
"Circuit-tuning and edge attribution"). The log-odds is the logit difference of circuit-discovery
work for tasks with many wrong answers: the answer's logit against the log-sum-exp of all the
others, so it neither saturates where the model is sure (as the log-probability and probability do)
nor moves when every logit shifts alike (as the raw logit does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from capwrap.errors import ConfigError
from capwrap.tasks.base import TaskBatch, answer_logits

__all__ = [
    "DEFAULT_METRIC",
    "Metric",
    "answer_logit",
    "answer_logodds",
    "answer_logprob",
    "answer_prob",
    "metric_values",
    "negative_loss",
    "resolve_metric",
]

Metric = Callable[[Float[Tensor, "batch pos d_vocab"], TaskBatch], Float[Tensor, " batch"]]


def answer_logprob(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Log-probability of each sequence's answer at its answer position (what
    :func:`capwrap.analyzers.patching.answer_logprob` computes from the answer position's logits)."""
    logprobs = F.log_softmax(answer_logits(logits, batch).float(), -1)
    return logprobs.gather(-1, batch.answers.to(logits.device)[:, None])[:, 0]


def answer_prob(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Probability of each sequence's answer at its answer position."""
    return answer_logprob(logits, batch).exp()


def answer_logit(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Logit of each sequence's answer at its answer position (what
    :func:`capwrap.analyzers.patching.answer_logit` computes from the answer position's logits): the
    logit difference of circuit-discovery work, without a contrast answer."""
    return answer_logits(logits, batch).float().gather(-1, batch.answers.to(logits.device)[:, None])[:, 0]


def answer_logodds(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Log-odds of each sequence's answer at its answer position, ``log p − log(1 − p)``: its logit
    minus the log-sum-exp of every other token's (the logit difference against all wrong answers).
    Finite where at least one other token has a finite logit (``+inf`` for a one-token vocabulary)."""
    at_answer = answer_logits(logits, batch).float()
    answers = batch.answers.to(logits.device)[:, None]
    others = at_answer.scatter(-1, answers, float("-inf"))
    return at_answer.gather(-1, answers)[:, 0] - others.logsumexp(-1)


#: What edge attribution, exact edge patching and faithfulness score by unless told otherwise: the
#: answer's log-probability (minus its loss), bounded above by 0, so "share of the metric recovered"
#: reads as share of the behaviour. Gradient scores follow exact patching more closely scoring
#: :func:`answer_logodds` where the model is sure, yet on the demo model the top-k circuits they pick
#: are far less faithful (benchmarks/RESULTS.md, "Circuit-tuning and edge attribution").
DEFAULT_METRIC: Metric = answer_logprob


def negative_loss(logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Minus each sequence's training loss: the answer's cross-entropy, or for text tasks
    (``batch.lm_targets``) the mean cross-entropy over the sequence's target tokens."""
    if batch.lm_targets is None:
        return answer_logprob(logits, batch)
    targets = batch.lm_targets.to(logits.device)
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")
    valid = (targets != -100).float()
    return -(per_token * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def resolve_metric(metric: Metric | str) -> Metric:
    """``metric`` itself (a function ``metric(logits, batch) -> [batch]``), or capwrap's metric of that
    name (``"answer_logodds"``, as :class:`~capwrap.circuits.EdgeScores` record it in ``info["metric"]``).

    Examples:
        >>> resolve_metric("answer_logodds") is answer_logodds
        True
        >>> resolve_metric("logodds")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: unknown metric 'logodds'; choose one of ['answer_logit', 'answer_logodds', 'answer_logprob', 'answer_prob', 'negative_loss'] (capwrap.circuits.metrics) or pass a function metric(logits, batch) -> [batch]
    """
    if isinstance(metric, str):
        if metric in METRICS:
            return METRICS[metric]
        raise ConfigError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} (capwrap.circuits.metrics) or "
                          "pass a function metric(logits, batch) -> [batch]")  # fmt: skip
    if not callable(metric):
        raise ConfigError(f"metric must be a function metric(logits, batch) -> [batch] or the name of one of "
                          f"{sorted(METRICS)}, got {metric!r}")  # fmt: skip
    return metric


def metric_values(metric: Metric, logits: Float[Tensor, "batch pos d_vocab"], batch: TaskBatch,
                  differentiable: bool = False) -> Float[Tensor, " batch"]:  # fmt: skip
    """``metric(logits, batch)`` as float, checked: one value per sequence (not their mean, not one per
    position), and, where gradients are taken, differentiable. A metric that breaks the contract is
    named with what it returned and how to fix it, rather than scaling or failing deep in torch.

    Examples:
        >>> import torch
        >>> from capwrap.tasks import TaskBatch
        >>> batch = TaskBatch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([2, 1]), torch.tensor([0, 1]))
        >>> metric_values(answer_logit, torch.zeros(2, 3, 4), batch)
        tensor([0., 0.])
        >>> metric_values(lambda logits, batch: answer_logit(logits, batch).mean(), torch.zeros(2, 3, 4), batch)
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: the metric <lambda> must return one value per sequence, a tensor of shape [2]; it returned shape []: return per-sequence values, not their mean or sum
    """
    name = getattr(metric, "__name__", type(metric).__name__)
    values = metric(logits, batch)
    n = len(batch.tokens)
    if not isinstance(values, Tensor):
        raise ConfigError(f"the metric {name} must return a torch tensor of shape [{n}] (one value per sequence), "
                          f"not {type(values).__name__}; compute it with torch operations on the logits")  # fmt: skip
    if values.shape != (n,):
        hint = ("return per-sequence values, not their mean or sum" if values.dim() == 0
                else "reduce over positions inside the metric (one value per sequence)" if values.dim() >= 2 and values.shape[0] == n
                else "return one value per sequence of the batch")  # fmt: skip
        raise ConfigError(f"the metric {name} must return one value per sequence, a tensor of shape [{n}]; "
                          f"it returned shape {list(values.shape)}: {hint}")  # fmt: skip
    if differentiable and logits.requires_grad and not values.requires_grad:
        raise ConfigError(f"the metric {name} is not differentiable in the logits (an argmax or a comparison?), "
                          "and gradient attribution needs a gradient: score by a smooth metric such as "
                          "answer_logprob or answer_logodds, or patch exactly (exact_scores; method='exact' in patching)")  # fmt: skip
    return values.float()


#: capwrap's metrics by name (the names scores record in ``info["metric"]``; :func:`resolve_metric`).
METRICS: dict[str, Metric] = {m.__name__: m for m in (answer_logprob, answer_prob, answer_logit, answer_logodds, negative_loss)}
