"""Models that never had the capability: the floors and controls analyzers compare against.

:func:`untrained_like` gives a freshly initialized model of any architecture capwrap loads —
Hugging Face's initialization where the architecture has one (through
:func:`~capwrap.models.build_model`), and for compiled Tracr models (which are compiled, not built)
Gaussian weights with each tensor's own scale.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2), seed=0)
    >>> fresh = untrained_like(model, seed=1)
    >>> fresh.spec == model.spec, bool((fresh.weights()["embed.W_E"] != model.weights()["embed.W_E"]).any())
    (True, True)
"""

from __future__ import annotations

import torch

from capwrap.models import CapModel, build_model
from capwrap.tasks.base import Task

__all__ = ["never_had_it", "untrained_like"]


@torch.no_grad()
def untrained_like(model: CapModel, seed: int) -> CapModel:
    """A freshly initialized model of ``model``'s spec and backend, on its device (reproducible from ``seed``)."""
    if model.spec.has_hf_equivalent:
        return build_model(model.spec, backend=model.backend, seed=seed).to(model.device)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.checkpoint_state().items():
        scale = float(tensor.float().std()) if tensor.numel() > 1 else 0.0
        state[name] = torch.randn(tensor.shape, generator=gen) * (scale if scale > 0 else 0.02)
    return CapModel.from_state(model.spec, state, model.backend, metadata=dict(model.metadata)).to(model.device)


def never_had_it(
    model: CapModel, downstream: Task, steps: int, seed: int, batch_size: int = 96, low_memory: bool = False
) -> CapModel:
    """A model of ``model``'s shape that never saw the capability: freshly initialized (seed
    ``seed + 1000``) and trained on the downstream task alone for ``steps`` (AdamW, lr 1e-3; with
    ``low_memory``, :meth:`~capwrap.TrainConfig.low_memory`'s Adafactor in the backward pass)."""
    from capwrap.training import TrainConfig, train

    control = untrained_like(model, seed=seed + 1000)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, seed=seed + 1, progress=False)
    config = config.low_memory() if low_memory else config
    train(control, downstream, config, description="control")
    return control
