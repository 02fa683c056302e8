"""Tasks: procedural tasks (PCFG) behind one `Task` protocol."""

from capwrap.tasks.base import Task, TaskBatch, accuracy, answer_logits, answer_loss, check_task_fits
from capwrap.tasks.pcfg import PRIORS, PCFGConfig, PCFGTask, PCFGVocab

__all__ = [
    "PRIORS",
    "PCFGConfig",
    "PCFGTask",
    "PCFGVocab",
    "Task",
    "TaskBatch",
    "accuracy",
    "answer_logits",
    "answer_loss",
    "check_task_fits",
]
