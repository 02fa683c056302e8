"""Tasks behind one `Task` protocol: procedural (PCFG), text (stories with a feature), and specs
for the command line."""

from capwrap.tasks.base import (
    Task,
    TaskBase,
    TaskBatch,
    accuracy,
    answer_logits,
    answer_loss,
    check_task,
    check_task_fits,
    correctness,
    task_loss,
)
from capwrap.tasks.pcfg import PRIORS, PCFGConfig, PCFGTask, PCFGVocab
from capwrap.tasks.spec import task_from_spec
from capwrap.tasks.text import Feature, TextTask, feature_frequency, filter_out, load_texts, randomize, relabel

__all__ = [
    "Feature",
    "TextTask",
    "feature_frequency",
    "filter_out",
    "load_texts",
    "randomize",
    "relabel",
    "task_from_spec",
    "PRIORS",
    "PCFGConfig",
    "PCFGTask",
    "PCFGVocab",
    "Task",
    "TaskBase",
    "TaskBatch",
    "accuracy",
    "answer_logits",
    "answer_loss",
    "check_task",
    "check_task_fits",
    "correctness",
    "task_loss",
]
