"""The suite's base models: small checkpoints shipped in ``capwrap/assets/suite``, and how they are made.

PCFG bases share one small shape (:data:`SUITE_SPEC`) and the tasks' sizes (:data:`SUITE_PCFG`); each
is pretrained on counting and indexing with an operand prior that makes one operand the capability
(``pcfg-a``: a; ``pcfg-b``: b) and the others weakly relevant, as the paper's ``low`` prior does. The
``*-retrained`` bases see the same data without counting: models of the same shape that never had
the capability. Tracr bases are compiled RASP programs (the paper's Counter and Max-identifier),
saved as capwrap checkpoints so that the suite runs without tracr or JAX.

``scripts/make_suite_bases.py`` runs :func:`make_base` for each and saves them.

Examples:
    >>> sorted(BASE_RECIPES)[:2]
    ['pcfg-a', 'pcfg-a-retrained']
    >>> SUITE_SPEC.n_layers, SUITE_SPEC.d_model
    (3, 64)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from capwrap.errors import CheckpointError, ConfigError
from capwrap.models import CapModel, ModelSpec, build_model, load_model
from capwrap.tasks import PCFGConfig, PCFGTask, accuracy
from capwrap.training import TrainConfig, train

__all__ = [
    "BASE_RECIPES",
    "SUITE_ASSETS",
    "SUITE_PCFG",
    "SUITE_SPEC",
    "PretrainRecipe",
    "base_path",
    "load_base",
    "make_base",
]

#: Where the suite's bases ship.
SUITE_ASSETS = resources.files("capwrap") / "assets" / "suite"
#: Task sizes of the suite's PCFG scenarios (as the demo's).
SUITE_PCFG = PCFGConfig(length=32, window=16, occurrence=3)
_VOCAB = PCFGTask(config=SUITE_PCFG)
#: The suite's PCFG model: 3 blocks, 4 heads, d_model 64 (a quarter of the demo model's compute).
SUITE_SPEC = ModelSpec(d_vocab=_VOCAB.d_vocab, n_ctx=_VOCAB.seq_len, n_layers=3, d_model=64, n_heads=4)


@dataclass(frozen=True)
class PretrainRecipe:
    """How a PCFG base is pretrained: families, operand prior, and the training run."""

    families: tuple[str, ...]
    prior: tuple[float, float, float]
    config: TrainConfig = TrainConfig(steps=3000, batch_size=96, lr=1e-3, warmup=0.2, min_lr_ratio=0.1, seed=0)

    def task(self) -> PCFGTask:
        """The pretraining task."""
        return PCFGTask(
            self.families, prior=self.prior, config=SUITE_PCFG, name=f"pretraining {self.families} {self.prior}"
        )


#: The PCFG bases' pretraining, and the Tracr bases' programs (``None``: compiled, see :func:`make_base`).
BASE_RECIPES: dict[str, PretrainRecipe | None] = {
    "pcfg-a": PretrainRecipe(("count", "index"), (0.999, 0.001, 0.0)),
    "pcfg-b": PretrainRecipe(("count", "index"), (0.001, 0.999, 0.0)),
    "pcfg-a-retrained": PretrainRecipe(("index",), (0.999, 0.001, 0.0)),
    "pcfg-b-retrained": PretrainRecipe(("index",), (0.001, 0.999, 0.0)),
    "tracr-counter": None,
    "tracr-counter-b": None,
    "tracr-max": None,
}


def base_path(name: str) -> Path:
    """The folder of a shipped base."""
    if name not in BASE_RECIPES:
        raise ConfigError(f"unknown suite base {name!r}; the suite's bases are {sorted(BASE_RECIPES)}")
    return Path(str(SUITE_ASSETS / name))


def load_base(name: str, backend: str | None = None) -> CapModel:
    """Load a shipped base by name, or any checkpoint folder (a suite of your own).

    Raises:
        CheckpointError: the base is not there (make it with ``python scripts/make_suite_bases.py``).
    """
    if name not in BASE_RECIPES and Path(name).is_dir():
        return load_model(name, backend=backend)
    path = base_path(name)
    if not (path / "model.safetensors").exists():
        raise CheckpointError(
            f"the suite base {name!r} is missing at {path}; make it with `python scripts/make_suite_bases.py --only {name}`"
        )
    return load_model(path, backend=backend)


def make_base(name: str, backend: str | None = None, progress: bool = True, steps: int | None = None) -> CapModel:
    """Make a base from scratch: pretrain a PCFG base (about 5 minutes on 2 CPU cores), or compile a
    Tracr program (needs the ``tracr`` extra). ``steps`` overrides the pretraining length."""
    base_path(name)  # a clear error for an unknown name
    recipe = BASE_RECIPES[name]
    if recipe is None:
        return _compile(name, backend)
    config = dataclasses.replace(recipe.config, progress=progress, **({"steps": steps} if steps else {}))
    model = build_model(SUITE_SPEC, backend=backend, seed=config.seed)
    task = recipe.task()
    train(model, task, config, description=f"pretrain {name}")
    probes = {f"{f}_{o}": PCFGTask(f, o, config=SUITE_PCFG) for f in ("count", "index") for o in "abc"}
    model.metadata = {
        "suite_base": name, "task": task.describe(), "train_config": config.to_dict(),
        "accuracy": {k: round(accuracy(model, t.sample(2048, seed=123)), 4) for k, t in probes.items()},
        "made_by": "capwrap.validation.bases.make_base",
    }  # fmt: skip
    return model


def _compile(name: str, backend: str | None) -> CapModel:
    from capwrap.tasks import tracr

    programs = {
        "tracr-counter": lambda: tracr.compile_counter("a", letters="abcdefghi", max_seq_len=10),
        "tracr-counter-b": lambda: tracr.compile_counter("b", letters="abcdefghi", max_seq_len=10),
        "tracr-max": lambda: tracr.compile_max_identifier(5, max_seq_len=10),
    }
    model = programs[name]().to_model(backend)
    model.metadata |= {"suite_base": name, "made_by": "capwrap.validation.bases.make_base"}
    return model
