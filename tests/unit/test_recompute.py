"""Blocks recomputed in the backward pass (activation checkpointing): same gradients and training,
less held for the backward pass, on every family and both backends."""

from __future__ import annotations

import pytest
import torch

from capwrap.errors import ConfigError
from capwrap.methods import CircuitTuning, LoRA
from capwrap.models import ModelSpec, build_model
from capwrap.models.families import FAMILIES
from capwrap.models.recompute import recomputed_blocks
from capwrap.training import TrainConfig, train

BASE = dict(steps=4, batch_size=16, lr=3e-3, warmup=0.25, seed=3, progress=False)


def _saved_bytes_and_gradients(model, tokens) -> tuple[int, list[torch.Tensor | None]]:
    """Bytes the forward pass keeps for the backward pass, and the gradients."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).logsumexp(-1).mean()
    return saved, list(torch.autograd.grad(loss, model.parameters(), allow_unused=True))


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"tracr"}))
def test_recomputed_blocks_give_the_same_gradients_and_keep_less(family, backend):
    spec = ModelSpec(d_vocab=50, n_ctx=24, n_layers=4, d_model=32, n_heads=4, architecture=family)
    model = build_model(spec, backend=backend, seed=0).train()
    tokens = torch.randint(0, 50, (6, 20), generator=torch.Generator().manual_seed(0))
    kept, plain = _saved_bytes_and_gradients(model, tokens)
    with recomputed_blocks(model):
        kept_recomputing, again = _saved_bytes_and_gradients(model, tokens)
    assert sum(g is not None for g in plain) > 0
    for a, b in zip(plain, again, strict=True):
        # the same arithmetic up to float32 rounding at the tensor's own scale: recomputing may sum
        # in another order (GPT-Neo on the bridge with transformers 5.25: 1.5e-8 on gradients of 0.17)
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
    # what stays is each block's input, the embeddings and the unembedding's (the logits' share is
    # the same either way): well under half of what four blocks' activations take
    assert kept_recomputing < 0.5 * kept, (kept_recomputing, kept)
    assert all("forward" not in vars(block) for block in model.module.blocks)  # restored
    assert torch.equal(model(tokens), model(tokens))


def test_nested_contexts_and_evaluation_inside_them(small_model, small_task):
    batch = small_task.sample(8, seed=0)
    with torch.no_grad():
        reference = small_model(batch.tokens)
    with recomputed_blocks(small_model), recomputed_blocks(small_model):
        with torch.no_grad():  # no recomputation without a backward pass
            torch.testing.assert_close(small_model(batch.tokens), reference, rtol=0, atol=0)
    assert all("forward" not in vars(block) for block in small_model.module.blocks)


@pytest.mark.parametrize("low_memory", [False, True], ids=["adamw", "low_memory"])
def test_training_with_recomputed_blocks_ends_at_the_same_weights(small_spec, small_task, backend, low_memory):
    ends = []
    for recompute in (False, True):
        model = build_model(small_spec, backend=backend, seed=0)
        config = TrainConfig(**BASE, recompute_activations=recompute)
        config = config.low_memory() if low_memory else config
        assert config.recompute_activations == (recompute or low_memory)
        history = train(model, small_task, config).history
        ends.append((model.weights(), history["loss"].to_numpy()))
        assert all("forward" not in vars(block) for block in model.module.blocks)
    (plain, plain_loss), (recomputed, recomputed_loss) = ends
    if not low_memory:  # low_memory() recomputes either way: compare with the plain run only above
        for name, weight in plain.items():
            torch.testing.assert_close(recomputed[name], weight, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(recomputed_loss, plain_loss, rtol=1e-6, atol=0)


def test_low_memory_training_equals_in_backward_adafactor_without_recomputation(small_spec, small_task, backend):
    """The in-backward update and recomputation together: a block's weights are updated only after
    its recomputation has run."""
    ends = []
    for recompute in (False, True):
        model = build_model(small_spec, backend=backend, seed=0)
        config = TrainConfig(**BASE, optimizer="adafactor", grad_clip=None, step_in_backward=True,
                             recompute_activations=recompute)  # fmt: skip
        train(model, small_task, config)
        ends.append(model.weights())
    for name, weight in ends[0].items():
        torch.testing.assert_close(ends[1][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_recomputes_the_adapted_hugging_face_layers(small_spec, small_task):
    pytest.importorskip("peft")
    ends = []
    for recompute in (False, True):
        model = build_model(small_spec, backend="bridge" if "bridge" in _backends() else "hooked", seed=0)
        train(model, small_task, TrainConfig(**BASE, recompute_activations=recompute), method=LoRA(r=4))
        ends.append(model.weights())
    changed = [n for n, w in ends[0].items() if not torch.equal(w, build_model(small_spec, seed=0).weights()[n])]
    assert changed  # the adapter learned something
    for name, weight in ends[0].items():
        torch.testing.assert_close(ends[1][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_a_method_reading_activations_through_hooks_is_refused(small_model, small_task):
    with pytest.raises(ConfigError, match="recompute_activations=False"):
        train(small_model, small_task, TrainConfig(**BASE, recompute_activations=True), method=CircuitTuning(top_n=10))
    assert all("forward" not in vars(block) for block in small_model.module.blocks)


def _backends() -> list[str]:
    from capwrap.models import available_backends

    return list(available_backends())
