"""A capwrap :class:`~capwrap.tasks.Task` as a dataset for a Hugging Face ``Trainer``.

Examples:
    >>> from capwrap.tasks import PCFGConfig, PCFGTask
    >>> task = PCFGTask("count", "b", config=PCFGConfig(length=8, window=4))
    >>> data = task_dataset(task, 4, seed=0)
    >>> row, batch = data[0], task.sample(4, seed=0)
    >>> where = int(batch.answer_pos[0]) + 1  # the answer token, predicted from answer_pos
    >>> int((row["labels"] != -100).sum()), int(row["labels"][where]) == int(batch.answers[0]) == int(row["input_ids"][where])
    (1, True)
"""

from __future__ import annotations

import torch

from capwrap.errors import ConfigError
from capwrap.tasks.base import Task, TaskBatch

__all__ = ["task_dataset", "trainer_labels"]


def trainer_labels(batch: TaskBatch) -> torch.Tensor:
    """``labels`` for a Hugging Face causal LM whose loss is the task's loss: ``labels[i, t]`` is the
    token position ``t - 1`` must predict (transformers shifts them), ``-100`` where nothing is
    predicted. Text tasks (``lm_targets``) train on every next token; the others on the answer."""
    labels = torch.full_like(batch.tokens, -100)
    if batch.lm_targets is not None:
        labels[:, 1:] = batch.lm_targets[:, :-1]
        return labels
    if int(batch.answer_pos.max()) + 1 >= batch.tokens.shape[1]:
        raise ConfigError(
            "the task's answer is not inside its sequences (answer_pos is the last position), so a causal LM's "
            "labels cannot hold it"
        )
    labels[torch.arange(len(batch)), batch.answer_pos + 1] = batch.answers
    return labels


def task_dataset(task: Task, n: int, seed: int):
    """``n`` sequences of ``task`` as a ``datasets.Dataset`` with ``input_ids`` and ``labels``
    (:func:`trainer_labels`), in torch format: train a Hugging Face model with ``Trainer`` on
    exactly the objective :func:`capwrap.train` uses."""
    import datasets

    batch = task.sample(n, seed=seed)
    data = datasets.Dataset.from_dict({"input_ids": batch.tokens.tolist(), "labels": trainer_labels(batch).tolist()})
    return data.with_format("torch")
