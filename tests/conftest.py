"""Shared fixtures: real TransformerLens models on every backend the installed TL offers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capwrap.models import ModelSpec, available_backends, build_model
from capwrap.tasks import PCFGConfig, PCFGTask

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINYSTORIES = SHARED / "data" / "tinystories"

torch.set_num_threads(2)


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    """Each backend of the installed TransformerLens (hooked and bridge on 3.x, bridge on 4.x)."""
    return request.param


@pytest.fixture
def small_task() -> PCFGTask:
    return PCFGTask(family="count", operand="a", config=PCFGConfig(length=12, window=6, occurrence=2))


@pytest.fixture
def small_spec(small_task) -> ModelSpec:
    return ModelSpec(d_vocab=small_task.d_vocab, n_ctx=small_task.seq_len, n_layers=2, d_model=32, n_heads=4)


@pytest.fixture
def small_model(small_spec, backend):
    return build_model(small_spec, backend=backend, seed=0)


@pytest.fixture
def stories260k() -> Path:
    path = TINYSTORIES / "stories260K"
    if not (path / "model.safetensors").exists():
        pytest.skip("the shared TinyStories checkpoint (../shared/data/tinystories/stories260K) is absent")
    return path
