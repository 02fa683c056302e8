"""Tiny models of every architecture, and a small PCFG task, for the circuit tests."""

from __future__ import annotations

import pytest
import torch

from capwrap.models import CapModel, ModelSpec, build_model
from capwrap.models.layouts import checkpoint_shapes
from capwrap.tasks import PCFGConfig, PCFGTask


@pytest.fixture
def tiny_task() -> PCFGTask:
    return PCFGTask(family="count", operand="a", config=PCFGConfig(length=10, window=5, occurrence=2))


def _spec(arch: str, task: PCFGTask) -> ModelSpec:
    common = dict(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=16)
    if arch == "gpt_neo":
        return ModelSpec(
            **common, n_heads=2, architecture="gpt_neo", attention_layers=("global", "local"), window_size=4
        )
    if arch in ("llama", "gemma2", "olmo2"):  # grouped-query attention; Gemma-2 and OLMo-2 with post-norms
        return ModelSpec(**common, n_heads=4, n_key_value_heads=2, architecture=arch)
    if arch == "tracr":
        return ModelSpec(**common, n_heads=2, architecture="tracr")
    if arch == "gpt_neox":  # parallel attention and MLP, partial rotary
        return ModelSpec(**common, n_heads=2, architecture="gpt_neox")
    return ModelSpec(**common, n_heads=2)


def _model(arch: str, task: PCFGTask, backend: str, seed: int = 0) -> CapModel:
    spec = _spec(arch, task)
    if arch != "tracr":
        return build_model(spec, backend=backend, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) * 0.3 for k, s in checkpoint_shapes(spec).items()}
    return CapModel.from_state(spec, state, backend)


@pytest.fixture
def tiny(tiny_task):
    """``tiny(arch, backend, seed=0)``: a random 2-layer model of ``arch`` for ``tiny_task``; tracr
    (compiled, not built) from random weights in its checkpoint layout."""
    return lambda arch, backend, seed=0: _model(arch, tiny_task, backend, seed)
