"""Making a scenario's tuned model from its base (and the revival control), with an on-disk cache.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=16, n_heads=2), seed=0)
    >>> before = model.weights()["blocks.0.mlp.W_in"].clone()
    >>> reinitialize(model, "mlp", seed=1)
    ['blocks.0.mlp', 'blocks.1.mlp']
    >>> bool((model.weights()["blocks.0.mlp.W_in"] != before).any()), bool((model.weights()["embed.W_E"] == build_model(model.spec, seed=0).weights()["embed.W_E"]).all())
    (True, True)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from capwrap.analyzers.controls import never_had_it, untrained_like
from capwrap.analyzers.probing import fit_probes, probe_features
from capwrap.errors import ConfigError
from capwrap.methods import NPO, FineTune, GradientAscent, TrainingMethod
from capwrap.models import CapModel, ModelSpec, load_model, save_model
from capwrap.provenance import environment
from capwrap.tasks.base import Task
from capwrap.tasks.spec import task_from_spec
from capwrap.training import TrainConfig, train
from capwrap.validation.bases import load_base
from capwrap.validation.scenarios import Recipe, Scenario

__all__ = ["latent_layer", "make_control", "make_tuned", "reinitialize"]

_GROUPS = {
    "blocks": lambda name: True,
    "attention": lambda name: ".attn." in name,
    "mlp": lambda name: ".mlp." in name,
}


@torch.no_grad()
def reinitialize(model: CapModel, what: str, seed: int, layers: list[int] | None = None) -> list[str]:
    """Give ``model``'s transformer-block weights of group ``what`` (``blocks``, ``attention`` or
    ``mlp``; within ``layers`` if given) the values of a freshly initialized model, in place.
    Embeddings and the unembedding stay. Returns the groups re-initialized (``blocks.L.attn`` ...)."""
    if what not in _GROUPS:
        raise ConfigError(f"unknown group {what!r}; choose from {sorted(_GROUPS)}")
    fresh = untrained_like(model, seed=seed).weights()
    done: set[str] = set()
    for name, weight in model.weights().items():
        if not name.startswith("blocks.") or not _GROUPS[what](name):
            continue
        layer = int(name.split(".")[1])
        if layers is not None and layer not in layers:
            continue
        weight.copy_(fresh[name].to(weight.device))
        parts = name.split(".")
        done.add(".".join(parts[:3]) if parts[2] in ("attn", "mlp") else ".".join(parts[:2]))
    return sorted(done)


def latent_layer(model: CapModel, task: Task, seed: int, n: int = 1024, threshold: float = 0.9) -> int:
    """The first block after which ``task``'s latent label is linearly decodable from the residual
    stream: the first layer whose probe reaches ``threshold`` of the best layer's held-out accuracy."""
    label = task.probe_label
    if label is None:
        raise ConfigError(f"the task {task.name!r} has no latent label to locate")
    batch = task.probe_task().sample(n, seed=seed)
    names, feats = probe_features(model, batch, "blocks.*.hook_resid_post")
    acc = fit_probes(feats, batch.labels[label], steps=200, seed=seed).test_accuracy
    return int((acc >= threshold * acc.max()).nonzero()[0])


def _method(recipe: Recipe, model: CapModel) -> TrainingMethod:
    if recipe.method == "finetune":
        return FineTune()
    retain = task_from_spec(recipe.retain, model=model) if recipe.retain else None
    return GradientAscent(retain=retain) if recipe.method == "gradient_ascent" else NPO(retain=retain)


def make_tuned(
    scenario: Scenario, base: CapModel, capability: Task, cache: Path | None = None
) -> tuple[CapModel, dict]:
    """The scenario's tuned model (from ``cache`` when made before) and what making it did."""
    folder = None if cache is None else Path(cache) / "tuned" / scenario.key()
    if folder is not None and (folder / "model.safetensors").exists():
        tuned = load_model(folder, backend=base.backend)
        return tuned, dict(tuned.metadata.get("made", {}))
    recipe = scenario.recipe
    start = load_base(recipe.start_from, backend=base.backend) if recipe.start_from else base.clone()
    # a cached tuned model may outlive the libraries that made it: say which did (and on what device)
    made: dict = {"start": recipe.start_from or scenario.base, "environment": environment()}
    if recipe.reinit == "latent":
        layer = latent_layer(base, capability, seed=scenario.seed)
        made["reinitialized"] = reinitialize(start, "blocks", seed=scenario.seed, layers=list(range(layer + 1)))
        made["latent_layer"] = layer
    elif recipe.reinit:
        made["reinitialized"] = reinitialize(start, recipe.reinit, seed=scenario.seed)
    if recipe.steps > 0:
        task = task_from_spec(recipe.task, model=base)
        config = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, optimizer=recipe.optimizer,
                             weight_noise=recipe.weight_noise, seed=scenario.seed, progress=False)  # fmt: skip
        history = train(start, task, config, method=_method(recipe, base), description=scenario.name).history
        made["final_loss"] = float(history["loss"].iloc[-5:].mean())
    start.metadata = {**base.metadata, "made": made, "scenario": scenario.name}
    if folder is not None:
        save_model(start, folder, overwrite=True)
    return start, made


def control_key(spec: ModelSpec, downstream: Task, steps: int, seed: int) -> str:
    """The folder name of a never-had-it control in a cache's ``controls``: a hash of what makes it."""
    made_of = [spec.identity(), downstream.describe(), steps, seed]
    return hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_control(base: CapModel, downstream: Task, steps: int, seed: int, cache: Path | None = None) -> CapModel:
    """A model of the base's shape that never had the capability: freshly initialized and trained on
    the downstream task alone for ``steps`` (Revival's control), from ``cache`` when made before."""
    folder = None if cache is None else Path(cache) / "controls" / control_key(base.spec, downstream, steps, seed)
    if folder is not None and (folder / "model.safetensors").exists():
        return load_model(folder, backend=base.backend)
    control = never_had_it(base, downstream, steps, seed)
    if folder is not None:
        try:
            save_model(control, folder, overwrite=True)
        except OSError:  # pragma: no cover - another worker saved the same control first
            pass
    return control
