"""The optimizers :func:`~capwrap.train` builds from a :class:`~capwrap.TrainConfig`, and the update
run inside the backward pass.

``config.optimizer`` names the rule: ``adamw``, ``sgd`` (with momentum) or ``adafactor`` (Shazeer and
Stern 2018, as ``transformers`` implements it: no first moment, the second moment of a matrix kept as
one row and one column vector, updates clipped to RMS 1; used here with an absolute learning rate, so
``lr`` means what it means for AdamW). AdamW keeps two float32 tensors per weight, SGD one, Adafactor
next to none.

``config.step_in_backward`` applies each weight's update as soon as its gradient is complete during
``backward()`` and frees that gradient at once (PyTorch's "fuse the optimizer step into the backward
pass" recipe), so no gradient of the whole model is held. With Adafactor, training then needs
about one model's memory plus the activations: what a low-memory diagnosis trains with. The update is
the same as a step after the backward pass, except that the gradient norm cannot be clipped (the
other weights' gradients do not exist yet when a weight is updated): ``grad_clip`` must be ``None``
(Adafactor clips its updates itself).

Examples:
    >>> import torch
    >>> from capwrap.training import TrainConfig
    >>> layer = torch.nn.Linear(4, 3)
    >>> config = TrainConfig(optimizer="adafactor", grad_clip=None, step_in_backward=True, lr=0.1)
    >>> optimizer = make_optimizer(list(layer.parameters()), config)
    >>> before = layer.weight.detach().clone()
    >>> layer(torch.ones(2, 4)).sum().backward()   # the update happens here
    >>> layer.weight.grad is None, bool((layer.weight != before).all())
    (True, True)
    >>> optimizer.step()                           # nothing left to apply
    >>> round(optimizer.pop_grad_norm(), 4)        # the norm of the gradient that was applied
    7.746
    >>> optimizer.remove()                         # a later backward() updates nothing
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from capwrap.training import TrainConfig

__all__ = ["OPTIMIZERS", "make_optimizer", "StepInBackward"]

#: The optimizers ``TrainConfig.optimizer`` may name.
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adafactor")


def _rule(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.applied_weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.applied_weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(
        params, lr=config.lr, relative_step=False, scale_parameter=False, warmup_init=False,
        weight_decay=config.applied_weight_decay, clip_threshold=1.0,
    )  # fmt: skip


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """``config``'s optimizer over ``params``; with ``config.step_in_backward`` a :class:`StepInBackward`
    (call its :meth:`~StepInBackward.remove` when training ends)."""
    if config.step_in_backward:
        return StepInBackward(params, lambda group: _rule(group, config))
    return _rule(params, config)


class StepInBackward(torch.optim.Optimizer):
    """Optimizers stepped by hooks as soon as the gradients they need are accumulated; the gradients
    are then dropped. One update per backward pass: call :meth:`zero_grad` before it and
    :meth:`step` after it, as :func:`~capwrap.train` does.

    Parameters that share storage (a backend's query, key and value weights viewing one fused
    tensor) form one group with one optimizer, stepped when the last gradient the group expects is
    ready: updating one view earlier would change values the backward pass still reads through the
    others. A group expects all its parameters at first; a parameter that got no gradient in a
    backward pass (a fused weight the backend only uses through its views) is not waited for
    afterwards. :meth:`step` applies what a backward pass left (such groups, the first time).
    ``param_groups`` are the inner optimizers' own, so setting a group's ``lr`` reaches them; the
    state dict holds each inner optimizer's.

    Args:
        params: the parameters to train (each must require a gradient).
        rule: builds the optimizer of one group of parameters, ``rule(params)``.
    """

    def __init__(self, params: list[torch.nn.Parameter], rule: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]):
        params = list(params)
        super().__init__(params, {})
        by_storage: dict[int, list[torch.nn.Parameter]] = {}
        for p in params:
            by_storage.setdefault(p.untyped_storage().data_ptr() if p.numel() else id(p), []).append(p)
        self.groups = list(by_storage.values())
        self.inner = [rule(group) for group in self.groups]
        self.param_groups = [group for optimizer in self.inner for group in optimizer.param_groups]
        self._expected = [{id(p) for p in group} for group in self.groups]
        self._ready: list[set[int]] = [set() for _ in self.groups]
        self._squared_norm: torch.Tensor | float = 0.0
        self.zero_grad()
        self._handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._on_gradient(index))
            for index, group in enumerate(self.groups) for p in group
        ]  # fmt: skip

    def _on_gradient(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._ready[index].add(id(param))
            if self._ready[index] >= self._expected[index]:
                self._apply(index)

        return hook

    def _apply(self, index: int) -> None:
        for p in self.groups[index]:
            if p.grad is not None:  # summed on the device: no synchronization per group
                self._squared_norm = self._squared_norm + p.grad.detach().float().pow(2).sum()
        self.inner[index].step()
        for p in self.groups[index]:
            p.grad = None
        self._ready[index] = set()

    def pop_grad_norm(self) -> float:
        """The L2 norm of the gradient applied since the last call (the step's gradient norm); resets it."""
        norm, self._squared_norm = float(self._squared_norm) ** 0.5, 0.0
        return norm

    def remove(self) -> None:
        """Take the hooks off the parameters: backward passes no longer update them."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def step(self, closure: Any = None) -> None:
        """Apply what the last backward pass left: groups some of whose parameters got no gradient
        (from now on those are not waited for)."""
        for index, ready in enumerate(self._ready):
            if ready:
                self._expected[index] = set(ready)
                self._apply(index)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any gradient the parameters hold (gradients left from elsewhere would be added to the
        next update)."""
        for group in self.groups:
            for p in group:
                p.grad = None
        self._ready = [set() for _ in self.groups]

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"per_group": [optimizer.state_dict() for optimizer in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        for optimizer, state in zip(self.inner, state_dict["per_group"], strict=True):
            optimizer.load_state_dict(state)
        self.param_groups = [group for optimizer in self.inner for group in optimizer.param_groups]
