"""Activation checkpointing: recompute each transformer block during the backward pass.

A training step normally keeps every activation the backward pass reads, for every block: for a
22-block model and a batch of a few thousand tokens that is as much memory as the model itself.
Inside :func:`recomputed_blocks` each block keeps only its input; the backward pass runs the block
again to get the rest (``torch.utils.checkpoint``, non-reentrant), so a step holds the activations
of one block at a time, for about one more forward pass of compute. Gradients and results are the
same (bit for bit on CPU). Used by :func:`capwrap.train` when ``TrainConfig.recompute_activations``
is set (``TrainConfig.low_memory()`` sets it).

Works on both backends and every family: the blocks are TransformerLens's ``module.blocks`` (the
bridge's block components run the Hugging Face layers inside them). TransformerLens hooks inside a
block fire again when it is recomputed, so a training method that reads activations through hooks
(circuit-tuning) is not run this way.

Examples:
    >>> import torch
    >>> from capwrap import ModelSpec, build_model
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=8, n_layers=2, d_model=16, n_heads=2), seed=0)
    >>> tokens = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    >>> def gradients():
    ...     loss = model(tokens).logsumexp(-1).mean()
    ...     return torch.autograd.grad(loss, model.parameters(), allow_unused=True)
    >>> plain = gradients()
    >>> with recomputed_blocks(model):
    ...     again = gradients()
    >>> all(a is b is None or torch.equal(a, b) for a, b in zip(plain, again, strict=True))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from capwrap.models.model import CapModel

__all__ = ["recomputed_blocks"]


def _recomputing(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing is kept for a backward pass anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def recomputed_blocks(model: CapModel) -> Iterator[CapModel]:
    """Within this context, ``model``'s blocks keep only their inputs for the backward pass and are
    recomputed in it (see the module docstring). Nesting is harmless; leaving restores the blocks."""
    blocks = list(model.module.blocks)
    # A bridge's block components forward attribute writes to the layer they wrap: set the
    # instance attribute on the component itself, and remove it the same way.
    saved = [vars(block).get("forward") for block in blocks]
    hf_config = getattr(getattr(model.module, "original_model", None), "config", None)
    use_cache = getattr(hf_config, "use_cache", None)
    try:
        if hf_config is not None:  # a key/value cache would be appended to again by the recomputation
            hf_config.use_cache = False
        for block, own in zip(blocks, saved, strict=True):
            if own is None:
                object.__setattr__(block, "forward", _recomputing(block.forward))
        yield model
    finally:
        for block, own in zip(blocks, saved, strict=True):
            if own is None:
                vars(block).pop("forward", None)
        if hf_config is not None:
            hf_config.use_cache = use_cache
