"""Checks on what users hand in: token-id tensors and weights.

One place for them, so that a model's forward pass, the recorder's probe batch, a checkpoint being
loaded and a model about to be trained all answer the same bad input with the same clear message.

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec
    >>> spec = ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2)
    >>> check_token_ids(torch.rand(4, 8), spec, "the probe batch")
    Traceback (most recent call last):
    ...
    capwrap.errors.ConfigError: the probe batch must hold integer token ids, got dtype torch.float32; ...
    >>> check_finite_weights({"blocks.0.attn.W_Q": torch.tensor([0.0, float("nan")])}, "the model")
    Traceback (most recent call last):
    ...
    capwrap.errors.ConfigError: the model holds non-finite values in blocks.0.attn.W_Q (1 NaN, 0 infinite of 2 values), so ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from capwrap.errors import ConfigError

if TYPE_CHECKING:
    from capwrap.models import ModelSpec

__all__ = ["check_token_ids", "check_batch_shapes", "check_finite_weights"]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_token_ids(tokens: object, spec: ModelSpec, what: str = "tokens") -> None:
    """Raise :class:`~capwrap.errors.ConfigError` unless ``tokens`` is an integer tensor of shape
    ``[batch, pos]`` that the model of ``spec`` can embed (ids in ``0..d_vocab-1``, at most
    ``n_ctx`` positions). ``what`` names the tensor in the message."""
    if not isinstance(tokens, Tensor):
        raise ConfigError(f"{what} must be a torch tensor of token ids [batch, pos], got {type(tokens).__name__}")
    if tokens.dtype not in _INTEGER_DTYPES:
        raise ConfigError(
            f"{what} must hold integer token ids, got dtype {tokens.dtype}; "
            "pass token ids (task.sample(n, seed).tokens, or tokenizer output), not activations or floats"
        )
    if tokens.ndim != 2:
        raise ConfigError(f"{what} must have shape [batch, pos], got {tuple(tokens.shape)}")
    if tokens.shape[1] > spec.n_ctx:
        raise ConfigError(
            f"{what} has {tokens.shape[1]} positions but the model's context is n_ctx={spec.n_ctx}; "
            "use shorter sequences or a model with a longer context"
        )
    if tokens.numel() and (int(tokens.max()) >= spec.d_vocab or int(tokens.min()) < 0):
        why = (
            "token ids are never negative (padding marked -100 belongs in the targets, not the tokens)"
            if int(tokens.min()) < 0
            else "the task's vocabulary is larger than the model's"
        )
        raise ConfigError(
            f"{what} has token ids in [{int(tokens.min())}, {int(tokens.max())}] but the model embeds "
            f"only [0, {spec.d_vocab - 1}]; {why}"
        )


def check_batch_shapes(batch: Any) -> None:
    """Raise :class:`~capwrap.errors.ConfigError` unless a :class:`~capwrap.tasks.TaskBatch`'s
    tensors fit together: integer ``tokens [batch, pos]``, integer ``answer_pos`` and ``answers``
    ``[batch]``, labels ``[batch]``, integer ``lm_targets [batch, pos]``. Reads shapes and dtypes
    only, never the values (cheap, and no device synchronization)."""
    tokens = batch.tokens
    if not isinstance(tokens, Tensor) or tokens.dtype not in _INTEGER_DTYPES or tokens.ndim != 2:
        raise ConfigError(f"a TaskBatch's tokens must be integer token ids [batch, pos], got {_describe(tokens)}")
    n = tokens.shape[0]
    per_sequence = {"answer_pos": batch.answer_pos, "answers": batch.answers}
    per_sequence |= {f"labels[{name!r}]": label for name, label in batch.labels.items()}
    for name, value in per_sequence.items():
        integer = name.startswith("labels") or (isinstance(value, Tensor) and value.dtype in _INTEGER_DTYPES)
        if not isinstance(value, Tensor) or tuple(value.shape) != (n,) or not integer:
            kind = "a tensor" if name.startswith("labels") else "an integer tensor"
            raise ConfigError(
                f"a TaskBatch's {name} must be {kind} of shape [{n}] (one per sequence), got {_describe(value)}"
            )
    targets = batch.lm_targets
    if targets is not None and (
        not isinstance(targets, Tensor) or targets.dtype not in _INTEGER_DTYPES or targets.shape != tokens.shape
    ):
        raise ConfigError(
            f"a TaskBatch's lm_targets must be integer token ids of the tokens' shape {tuple(tokens.shape)}, "
            f"got {_describe(targets)}"
        )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


def check_finite_weights(weights: Mapping[str, Tensor], where: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming the first tensor of ``weights`` that holds NaN or infinite values.

    ``where`` says whose weights they are (``"the checkpoint ckpt/base"``, ``"the model"``). The
    check reads every value once, without allocating: a tensor's smallest and largest values are
    both finite exactly when all of it is (NaN propagates into both; an infinity is one of them),
    ``torch.aminmax`` finds both in one pass (about 20x faster than ``isfinite(...).all()``).
    """
    for name, weight in weights.items():
        if not weight.is_floating_point() or weight.numel() == 0:
            continue
        low, high = torch.aminmax(weight.detach())
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            continue
        finite = torch.isfinite(weight.detach())
        nan = int(torch.isnan(weight.detach()).sum())
        bad = int((~finite).sum())
        raise error(
            f"{where} holds non-finite values in {name} ({nan} NaN, {bad - nan} infinite of {weight.numel()} "
            "values), so nothing computed from it means anything. Load the weights again from a good "
            "checkpoint (if a training run wrote these, that run had diverged)"
        )
