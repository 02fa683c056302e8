"""Training methods: how :func:`capwrap.train` turns a batch into an update.

The loop in :mod:`capwrap.training` is the same for every method; a method decides the objective
(plain fine-tuning, gradient ascent, NPO ...), which parameters move (circuit-tuning: only the
subgraph the task uses), and what it logs per step.
"""

from capwrap.methods.base import FineTune, TrainingMethod, step_seed
from capwrap.methods.circuit_tuning import CircuitTuning
from capwrap.methods.lora import LoRA
from capwrap.methods.unlearning import NPO, GradientAscent

__all__ = ["CircuitTuning", "FineTune", "GradientAscent", "LoRA", "NPO", "TrainingMethod", "step_seed"]
