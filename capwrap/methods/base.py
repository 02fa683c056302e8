"""The training-method interface and the default method, plain fine-tuning.

A :class:`TrainingMethod` is called by :func:`capwrap.train` at fixed points of every step::

    params = method.setup(model, task, config)            # once: what the optimizer updates
    optimizer = method.optimizer(params, config)          # once: config's optimizer by default
    for step in range(config.steps):
        batch = task.sample(...)                          # the loop owns the data stream
        loss = method.loss(model, batch, step)            # the objective
        loss.backward()
        metrics = method.before_update(model, step)       # e.g. mask gradients; metrics to log
        optimizer.step()
        method.after_update(model, step)                  # e.g. write merged adapter weights
        recorder.step(..., arrays=method.arrays(step))    # with a recorder: per-step arrays to keep

Methods hold their settings in the constructor and any per-run state they build in
:meth:`~TrainingMethod.setup`; :meth:`~TrainingMethod.state_dict` returns that state, so a
resumed run continues exactly. Extra batches a method needs (a retain set) come from
:func:`step_seed`, the one seed scheme of the loop, so the same seed gives the same run.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> from capwrap.training import TrainConfig, train
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> result = train(model, task, TrainConfig(steps=3, batch_size=8, progress=False), method=FineTune())
    >>> FineTune().describe()
    {'method': 'finetune'}
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from capwrap.errors import ConfigError
from capwrap.tasks.base import Task, TaskBatch, task_loss

if TYPE_CHECKING:
    from capwrap.models import CapModel
    from capwrap.training import TrainConfig

__all__ = ["TrainingMethod", "FineTune", "step_seed"]

#: Streams of :func:`step_seed`: the training batch, and extra batches a method draws.
_STREAMS = {"train": 0, "retain": 1, "method": 2}


def step_seed(config: TrainConfig, step: int, stream: str = "train") -> int:
    """The seed of ``stream``'s batch at optimizer step ``step`` (0-based) of a run with ``config``.

    ``train`` is the training batch (``seed * 1_000_003 + step``, as capwrap always drew it);
    ``retain`` and ``method`` are for batches a method draws itself, derived with NumPy's
    ``SeedSequence`` from (seed, step, stream) so they are independent of the training stream.

    Examples:
        >>> from capwrap.training import TrainConfig
        >>> step_seed(TrainConfig(seed=2), 5)
        2000011
    """
    if stream not in _STREAMS:
        raise ConfigError(f"unknown seed stream {stream!r}; choose from {sorted(_STREAMS)}")
    if stream == "train":
        return config.seed * 1_000_003 + step
    return int(np.random.SeedSequence([config.seed, step, _STREAMS[stream]]).generate_state(1)[0])


class TrainingMethod:
    """Base class of training methods (see the module docstring for when each hook is called)."""

    #: Short name, stored with runs and checkpoints.
    name: ClassVar[str] = "method"
    #: Whether :meth:`before_update` changes the gradients (then the update cannot run inside the
    #: backward pass: ``TrainConfig.step_in_backward`` is refused).
    edits_gradients: ClassVar[bool] = False
    #: Whether :meth:`loss` reads activations through hooks (then blocks cannot be recomputed in the
    #: backward pass, where the hooks would fire again: ``TrainConfig.recompute_activations`` is refused).
    reads_activations: ClassVar[bool] = False

    def setup(self, model: CapModel, task: Task, config: TrainConfig) -> list[torch.nn.Parameter]:
        """Prepare a run of ``model`` on ``task``; return the parameters the optimizer updates."""
        self.config = config
        return model.parameters()

    def loss(self, model: CapModel, batch: TaskBatch, step: int) -> Float[Tensor, ""]:
        """The objective on ``batch`` at ``step`` (0-based): what ``backward()`` is called on."""
        return task_loss(model(batch.tokens), batch)

    def recomputed(self, model: CapModel) -> AbstractContextManager[Any]:
        """The context :func:`capwrap.train` runs in with ``TrainConfig.recompute_activations``:
        what the method's :meth:`loss` runs recomputes its blocks in the backward pass (default:
        ``model``'s blocks, :func:`capwrap.models.recompute.recomputed_blocks`)."""
        from capwrap.models.recompute import recomputed_blocks

        return recomputed_blocks(model)

    def optimizer(self, params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
        """The run's optimizer over ``params`` (default: ``config``'s AdamW or SGD). A method may
        configure it, e.g. keep frozen elements of a tensor out of weight decay and optimizer state."""
        from capwrap.optimizers import make_optimizer

        return make_optimizer(params, config)

    def before_update(self, model: CapModel, step: int) -> dict[str, float]:
        """After ``backward()``, before clipping and the optimizer step: edit gradients if the method
        needs to; return metrics to log for this step."""
        return {}

    def arrays(self, step: int) -> dict[str, Tensor]:
        """Arrays to record with optimizer step ``step`` (0-based) when the run has a
        :class:`~capwrap.recording.Recorder`, which stores them in its ``RunStore`` (under these names,
        at recorder step ``step + 1``); default none."""
        return {}

    def after_update(self, model: CapModel, step: int) -> None:
        """After the optimizer step, before the recorder and callbacks see the model: bring the model
        up to date if the method trains something else than its weights (LoRA's adapter)."""

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (tensors and JSON-serializable values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called after :meth:`setup` when a run resumes)."""

    def describe(self) -> dict[str, Any]:
        """A JSON-serializable description (kept with runs and checkpoints)."""
        return {"method": self.name}


class FineTune(TrainingMethod):
    """Plain fine-tuning: every trainable parameter, the task's own loss (the default)."""

    name: ClassVar[str] = "finetune"
