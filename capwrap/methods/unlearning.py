"""Unlearning methods people use to "delete" a capability: gradient ascent and NPO.

Both train on the capability's data (the *forget* task, what :func:`capwrap.train` samples),
optionally with a *retain* task whose ordinary loss keeps the rest of the model working:

* :class:`GradientAscent`: maximize the forget loss, ``-L(forget) + λ·L(retain)``;
* :class:`NPO` (negative preference optimization, Zhang et al. 2024): push the answer's
  likelihood below a frozen copy of the starting model's, with a loss that saturates instead of
  diverging: ``(2/β)·softplus(β·(log π_θ(y|x) − log π_ref(y|x))) + λ·L(retain)``.

Each step logs ``method/forget_loss``, the forget term (``-L(forget)``, the negated cross-entropy,
for gradient ascent; the NPO term for NPO) and, with a retain task of nonzero weight,
``method/retain_loss``, the retain task's ordinary loss ``L(retain)`` (with ``retain_weight=0`` it is
not computed, so not logged). The history's ``loss`` is the combined objective the step minimizes,
forget term plus ``retain_weight`` times the retain loss: for gradient ascent negative whenever the
forget task's loss exceeds the weighted retain loss (without a retain task, always).

Whether they delete the capability or hide it is exactly what :func:`capwrap.diagnose` asks.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> from capwrap.training import TrainConfig, train
    >>> forget = PCFGTask("count", "a", config=PCFGConfig(length=8, window=4))
    >>> retain = PCFGTask("index", "a", config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=forget.d_vocab, n_ctx=forget.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> result = train(model, forget, TrainConfig(steps=2, batch_size=8, progress=False), method=NPO(retain=retain))
    >>> sorted(c for c in result.history.columns if c.startswith("method/"))
    ['method/forget_loss', 'method/retain_loss']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from capwrap.errors import real_number
from capwrap.methods.base import TrainingMethod, step_seed
from capwrap.tasks.base import Task, TaskBatch, check_task_fits, sequence_logprob, task_loss

if TYPE_CHECKING:
    from capwrap.models import CapModel
    from capwrap.training import TrainConfig

__all__ = ["GradientAscent", "NPO"]


class _Unlearning(TrainingMethod):
    """Shared parts: the retain task, its weight, and the per-step losses it logs."""

    def __init__(self, retain: Task | None = None, retain_weight: float = 1.0):
        self.retain_weight = real_number(
            retain_weight, f"{type(self).__name__}'s retain_weight (the retain loss's weight)", minimum=0,
            hint=": give e.g. retain_weight=1.0, or 0 to train on the forget task alone",
        )  # fmt: skip
        self.retain = retain
        self._logged: dict[str, float] = {}

    def setup(self, model: CapModel, task: Task, config: TrainConfig) -> list[torch.nn.Parameter]:
        if self.retain is not None:
            check_task_fits(model, self.retain)
        return super().setup(model, task, config)

    def _retain_loss(self, model: CapModel, step: int) -> Float[Tensor, ""]:
        if self.retain is None or self.retain_weight == 0:
            return torch.zeros((), device=model.device)
        batch = self.retain.sample(self.config.batch_size, seed=step_seed(self.config, step, "retain"))
        batch = batch.to(model.device)
        return task_loss(model(batch.tokens), batch)

    def _combine(self, forget: Tensor, model: CapModel, step: int) -> Tensor:
        retain = self._retain_loss(model, step)
        self._logged = {"method/forget_loss": float(forget.detach())}
        if self.retain is not None and self.retain_weight != 0:  # (weight 0: not computed, so not logged)
            self._logged["method/retain_loss"] = float(retain.detach())
        return forget + self.retain_weight * retain

    def before_update(self, model: CapModel, step: int) -> dict[str, float]:
        return dict(self._logged)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "retain": None if self.retain is None else self.retain.describe(),
            "retain_weight": self.retain_weight,
        }


class GradientAscent(_Unlearning):
    """Gradient ascent on the forget task (the task :func:`~capwrap.train` samples), plus the
    ordinary loss on ``retain`` weighted by ``retain_weight``.

    The forget term is unbounded, so runs are short (the unlearning literature stops after a few
    hundred steps) and gradient clipping stays on.

    Args:
        retain: a task whose ordinary loss is added (``None``: forget only).
        retain_weight: the retain loss's weight, a finite number >= 0.
    """

    name: ClassVar[str] = "gradient_ascent"

    def loss(self, model: CapModel, batch: TaskBatch, step: int) -> Float[Tensor, ""]:
        forget = -task_loss(model(batch.tokens), batch)
        return self._combine(forget, model, step)


class NPO(_Unlearning):
    """Negative preference optimization against a frozen copy of the model at the start of the run.

    Args:
        beta: inverse temperature; small ``beta`` approaches gradient ascent, large ``beta``
            saturates sooner.
        retain: a task whose ordinary loss is added (``None``: forget only).
        retain_weight: the retain loss's weight, a finite number >= 0.
    """

    name: ClassVar[str] = "npo"

    def __init__(self, beta: float = 0.1, retain: Task | None = None, retain_weight: float = 1.0):
        super().__init__(retain, retain_weight)
        self.beta = real_number(beta, "NPO's beta", above=0, hint="; 0.1 is usual")
        self._reference: CapModel | None = None

    def setup(self, model: CapModel, task: Task, config: TrainConfig) -> list[torch.nn.Parameter]:
        params = super().setup(model, task, config)
        self._reference = model.clone().eval()
        for p in self._reference.parameters():
            p.requires_grad_(False)
        return params

    def loss(self, model: CapModel, batch: TaskBatch, step: int) -> Float[Tensor, ""]:
        assert self._reference is not None, "setup() runs before loss()"
        logp = sequence_logprob(model(batch.tokens), batch)
        with torch.no_grad():
            logp_ref = sequence_logprob(self._reference(batch.tokens), batch)
        forget = (2.0 / self.beta) * F.softplus(self.beta * (logp - logp_ref)).mean()
        return self._combine(forget, model, step)

    def state_dict(self) -> dict[str, Any]:
        assert self._reference is not None, "setup() runs before state_dict()"
        return {"reference": self._reference.checkpoint_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from capwrap.models import CapModel

        assert self._reference is not None, "setup() runs before load_state_dict()"
        ref = self._reference
        self._reference = CapModel.from_state(ref.spec, state["reference"], ref.backend).to(ref.device).eval()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}
