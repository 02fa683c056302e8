"""Shared fixtures: real TransformerLens models on every backend the installed TL offers.

Which tests run where:

* ``tests/unit`` (one component, seconds), ``tests/integration`` (components together on small real
  models), ``tests/acceptance`` (what a user runs, end to end; marked ``slow`` here, so
  ``pytest -m "not slow"`` is the quick loop);
* on the TransformerLens 3.9 line only the tests whose behaviour depends on the backend run — those
  that take the ``backend`` fixture (directly or through ``small_model``) or carry
  ``@pytest.mark.backend``; the rest run on the 4.x line. ``CAPWRAP_ALL_TESTS=1`` runs everything
  on either line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from capwrap.models import ModelSpec, available_backends, build_model, tl_version
from capwrap.tasks import PCFGConfig, PCFGTask

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINYSTORIES = SHARED / "data" / "tinystories"

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 2 unless the environment says


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here / "acceptance" in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
    if tl_version()[0] >= 4 or os.environ.get("CAPWRAP_ALL_TESTS"):
        return
    skip = pytest.mark.skip(
        reason="backend-independent: runs on the TransformerLens 4.x line (CAPWRAP_ALL_TESTS=1 runs it here too)"
    )
    for item in items:
        if "backend" not in getattr(item, "fixturenames", ()) and item.get_closest_marker("backend") is None:
            item.add_marker(skip)


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


@pytest.fixture
def weight_gradient_unit_scores():
    """The definition pruning's ``grad_x_weight`` implements: Σ gradient ⊙ weight of the answer loss
    over each unit's weights, from the weights' own gradients; a function ``(model, batch, kind)``."""
    from capwrap.tasks import answer_loss

    def scores(model, batch, kind: str) -> dict[str, float]:
        model.module.zero_grad(set_to_none=True)
        answer_loss(model(batch.tokens), batch).backward()
        grads, weights = model.gradients(), model.weights()
        out = {c.name: float(sum((sl.of(grads) * sl.of(weights).detach()).sum() for sl in c.slices))
               for c in model.components.select(kind)}  # fmt: skip
        model.module.zero_grad(set_to_none=True)
        return out

    return scores
