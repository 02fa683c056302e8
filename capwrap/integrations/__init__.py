"""Adapters to other people's training loops.

:class:`RecorderCallback` records a run of Hugging Face ``Trainer`` (or TRL's ``SFTTrainer``, or
any trainer built on it) into the same :class:`~capwrap.recording.RunStore` that
:func:`capwrap.train` writes and the analyzers read; :func:`task_dataset` turns a capwrap task into a dataset such a trainer trains on
with the task's own objective.
"""

from capwrap.integrations.data import task_dataset, trainer_labels
from capwrap.integrations.trainer import RecorderCallback

__all__ = ["RecorderCallback", "task_dataset", "trainer_labels"]
