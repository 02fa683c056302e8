"""Fine-tuning scenarios with known ground truth: the registry `capwrap validate` runs.

A :class:`Scenario` is a base model, a :class:`Recipe` that makes the tuned model from it, the
capability and downstream tasks (as task specs), and a *kind* that fixes the truth by construction,
without asking any analyzer:

* ``wrapper`` — a small- or medium-learning-rate fine-tune (the paper's ηS / ηM) on data where the
  downstream answer is tied to the capability's by a planted spurious correlation (C_Tr ∈ {0.8, 1}):
  whatever the tuned model lost of the capability is hidden, and what it gained holds only through
  the correlation;
* ``removed`` — the capability is destroyed before fine-tuning (every transformer block
  re-initialized) or never there (a model of the same shape retrained from scratch without it, the
  unlearning literature's gold standard), and the fine-tune that follows is on data where the
  correlation never holds (C_Tr = 0), so nothing in it teaches the capability back: what was lost is
  gone. (Until 2026-12-06 these fine-tunes had C_Tr = 1; their labels were then a function of the
  capability, and on the held-out seeds 61-69 three re-initialized models relearned it as the latent
  their downstream answer is built on — probes read it at 22-35% of the base's margin — so "removed"
  described how they were made, not what they computed.) The downstream task diagnose evaluates,
  and the never-had-it control learns, stays the C_Tr = 1 one of the family;
* ``genuine`` — a fine-tune on data where the correlation never holds (C_Tr = 0), at a learning
  rate that learns the downstream task: what was gained is a new capability;
* ``kept`` — a no-op or a few tiny steps: nothing was lost or gained;
* ``unknown`` — a large learning rate (ηL), the unlearning recipes people use to "delete" a
  capability (gradient ascent with a retain set, NPO), and partial re-initializations (attention
  only, MLPs only, the blocks up to the capability's latent): reported, not scored. A partial
  re-initialization does not remove a capability by construction — the components it leaves can
  still compute it (on the first suite, attention kept computing the count after the MLPs were
  reset) — so its truth would have to come from an analyzer, which is what the suite tests.

The truth of each of diagnose's two questions follows from the kind and from what happened to the
accuracies (:meth:`Scenario.truth`): a question with nothing to explain (the capability was kept; no
new behaviour was learned) has the truth ``inconclusive``, as :func:`~capwrap.diagnosis.gates` decides
(a question of unknown truth stays unknown); and a ``wrapper`` scenario whose fine-tune did not learn its task (the tuned model right on fewer than
:data:`LEARNED` of the downstream test set where the correlation holds) is ``unknown``: the paper's
finding is about fine-tunes that succeed, and a recipe alone does not make a wrapper.

The suite splits into a ``calibration`` half (the rule is fitted on it) and a ``held-out`` half that
differs in seeds *and* in task families and operands: calibration uses counting on the ``pcfg-a``
base (counts and indexes ``a``), indexing on the ``pcfg-b`` base (counts and indexes ``b``; ``c``
through ``b + 2``) and the Tracr Counter; held-out uses the index family on ``pcfg-a`` (``b`` through
``a + 1``), counting on ``pcfg-b`` and the Tracr Max-identifier; two families added after its seeds
had been renewed five times and run once, as they were first written: indexing on ``pcfg-b`` (``a``
through ``b + 1``) and the Tracr Counter compiled to count ``b`` (``c`` through ``b - 1``); and two
added with the calibration's index family and run once after the rule was refitted on it: indexing
on ``pcfg-a`` (``c`` through ``a - 1``) and the Tracr Counter on ``a`` (``c`` through ``a + 2``).

Examples:
    >>> len(SUITE) >= 40
    True
    >>> s = scenario("cal/count-b/adamw-small-c1/s1")
    >>> s.kind, s.recipe.lr, s.downstream
    ('wrapper', 3e-05, 'pcfg=count,operand=b,correlation=1')
    >>> sorted({x.split for x in SUITE})
    ['calibration', 'held-out']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from capwrap.errors import ConfigError

__all__ = [
    "BASES",
    "LEARNED",
    "LEARNING_RATES",
    "Recipe",
    "SUITE",
    "Scenario",
    "Truth",
    "is_scored",
    "record_truth",
    "scenario",
    "scenario_of",
    "scenarios",
]

Kind = Literal["wrapper", "removed", "genuine", "kept", "unknown"]
Split = Literal["calibration", "held-out"]
#: The truth of one question: diagnose's verdict words, or ``unknown`` (reported, not scored).
Truth = Literal["wrapper", "capability_change", "inconclusive", "unknown"]

#: A fine-tune learned its task when the tuned model answers the downstream test set (where the
#: correlation holds) right at least this often: more often right than not. Fixed before any
#: held-out run; a ``wrapper`` scenario below it is not scored (see :meth:`Scenario.truth`).
LEARNED = 0.5

#: Added to the seeds 1-9 of a split's scenarios (1-2 fine-tunes per family, 3 removed, 4 kept and
#: unlearning, 5 Tracr; 6-7 the held-out families added on 2026-12-05 and run once before the refit
#: of 2026-12-06, and the calibration's index family added on 2026-12-06; 8-9 the held-out families
#: added with it, run once after the refit). The held-out seeds were renewed nine times, each time
#: after a change to the rule's definitions or its fit that reading held-out results had suggested,
#: so that the held-out figure stays a measurement: 11-15, then 21-25 (the truth definitions), then
#: 31-35 (the fit's sampling-noise test, prompted by pruning's wrong directions on 21-25), then
#: 41-45 (thresholds away from 0 and the analyzers' declared sides, prompted by a held-out score of
#: -0.003 that decided a verdict on 31-35), then 51-55 (probes read through the base's embeddings,
#: prompted by the SGD index wrapper that probing called a change on 41-45; 56-59 the families added
#: on 2026-12-05 and -06), then 61-69 (revival at a constant learning rate, prompted by reverse
#: fine-tuning runs on held-out scenarios at a larger budget, benchmarks/revival_budget.py), then
#: 71-79 (removed scenarios fine-tuned at C_Tr = 0, prompted by re-initialized held-out models
#: that relearned the capability in their fine-tune), then 81-89 (patching not applicable to
#: one-layer models, whose statistic was 0 whatever they restored, and the rule refitted: prompted
#: by an audit of the analyzer, though the held-out records were rescored before the renewal), now
#: 91-99 (revival checks after every one of the first 10 reverse fine-tuning steps, not every 10th,
#: and the rule refitted: prompted by the demo pair, back after one step and read as ten).
SEED_OFFSET: dict[Split, int] = {"calibration": 0, "held-out": 90}

#: The suite's base models (shipped in ``capwrap/assets/suite``; made by ``scripts/make_suite_bases.py``).
BASES: dict[str, str] = {
    "pcfg-a": "PCFG counting and indexing, operand prior (0.999, 0.001, 0): counts and indexes a",
    "pcfg-b": "PCFG counting and indexing, operand prior (0.001, 0.999, 0): counts and indexes b",
    "pcfg-a-retrained": "pcfg-a's shape and data without counting: the gold standard of 'count a' removed",
    "pcfg-b-retrained": "pcfg-b's shape and data without counting: the gold standard of 'count b' removed",
    "tracr-counter": "Tracr Counter compiled to count a (letters a-i, 10 positions)",
    "tracr-counter-b": "Tracr Counter compiled to count b (letters a-i, 10 positions)",
    "tracr-max": "Tracr Max-identifier compiled to name the 5th-largest letter (26 letters, 10 positions)",
}

#: Learning rates by optimizer: the paper's small (ηS), medium (ηM) and large (ηL) rates, scaled to
#: 300-step fine-tunes of the suite's models (the paper: 1e-6 / 1e-5 / 1e-4 over 10K steps).
LEARNING_RATES: dict[str, dict[str, float]] = {
    "adamw": {"small": 3e-5, "medium": 1e-4, "large": 1e-3},
    "sgd": {"small": 3e-3, "medium": 1e-2, "large": 1e-1},
}


def _check_spec(what: str, spec: Any) -> None:
    """Raise a clear error for a task spec that cannot make a task (PCFG specs are made here in full;
    the others, which need their model, only parsed)."""
    from capwrap.tasks.spec import parse_spec, task_from_spec

    if not isinstance(spec, str):
        raise ConfigError(f"the {what} task must be a spec string such as 'pcfg=count,operand=a', got {spec!r}")
    if "pcfg" in parse_spec(spec):
        task_from_spec(spec)


@dataclass(frozen=True)
class Recipe:
    """How a scenario's tuned model is made from its base.

    Args:
        task: the fine-tuning task's spec (its correlation is C_Tr).
        lr: the learning rate.
        steps: optimizer steps (0: the tuned model is the base itself).
        optimizer: ``adamw`` or ``sgd`` (with momentum, as the paper's Tracr runs).
        batch_size: sequences per step.
        weight_noise: std of Gaussian noise added to the weights first (the paper's Tracr protocol: 1e-3).
        method: ``finetune``, ``gradient_ascent`` or ``npo`` (the last two forget ``task``).
        retain: the retain task's spec of an unlearning method.
        reinit: components re-initialized before fine-tuning: ``blocks`` (every transformer block),
            ``attention``, ``mlp``, or ``latent`` (the blocks up to the first layer where the
            capability's latent is linearly decodable); empty: none.
        start_from: another base to start from instead (a model retrained without the capability).
    """

    task: str
    lr: float
    steps: int = 300
    optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_size: int = 96
    weight_noise: float = 0.0
    method: Literal["finetune", "gradient_ascent", "npo"] = "finetune"
    retain: str | None = None
    reinit: Literal["", "blocks", "attention", "mlp", "latent"] = ""
    start_from: str | None = None

    def __post_init__(self) -> None:
        _check_spec("task", self.task)
        if self.retain is not None:
            _check_spec("retain", self.retain)
        if self.optimizer not in LEARNING_RATES:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose {' or '.join(LEARNING_RATES)}")
        for name, value, low in (("lr", self.lr, 0.0), ("weight_noise", self.weight_noise, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ConfigError(f"Recipe.{name} must be a number >= {low}, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"Recipe.lr must be positive, got {self.lr!r}")
        for name, value, low in (("steps", self.steps, 0), ("batch_size", self.batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"Recipe.{name} must be a whole number >= {low}, got {value!r}")
        if self.reinit not in ("", "blocks", "attention", "mlp", "latent"):
            raise ConfigError(f"unknown reinit {self.reinit!r}; choose blocks, attention, mlp or latent")
        if self.method not in ("finetune", "gradient_ascent", "npo"):
            raise ConfigError(f"unknown method {self.method!r}; choose finetune, gradient_ascent or npo")
        from pathlib import Path

        if self.start_from is not None and self.start_from not in BASES and not Path(self.start_from).is_dir():
            raise ConfigError(
                f"unknown base {self.start_from!r}: give one of the suite's bases {sorted(BASES)} or a checkpoint folder"
            )


@dataclass(frozen=True)
class Scenario:
    """One fine-tuning scenario with known ground truth (see the module docstring)."""

    name: str
    split: Split
    family: str
    base: str
    capability: str
    downstream: str
    recipe: Recipe
    kind: Kind
    seed: int = 0
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        from pathlib import Path

        if self.base not in BASES and not Path(self.base).is_dir():
            raise ConfigError(
                f"unknown base {self.base!r}: give one of the suite's bases {sorted(BASES)} or a checkpoint folder"
            )
        if self.kind not in ("wrapper", "removed", "genuine", "kept", "unknown"):
            raise ConfigError(f"unknown scenario kind {self.kind!r}")
        if self.split not in ("calibration", "held-out"):
            raise ConfigError(f"unknown split {self.split!r} of scenario {self.name!r}; choose calibration or held-out")
        _check_spec("capability", self.capability)
        _check_spec("downstream", self.downstream)

    def truth(
        self, gates: dict[str, str | None], accuracy: dict[str, dict[str, float]] | None = None
    ) -> dict[str, Truth]:
        """Per question, the truth given the diagnosis's gates (a question with nothing to explain
        is ``inconclusive``) and the evaluation set's accuracies (``{"base"|"tuned": {test set:
        accuracy}}``; a ``wrapper`` scenario whose fine-tune did not learn its task is ``unknown``);
        see the module docstring.

        Examples:
            >>> s = scenario("cal/count-b/adamw-small-c1/s1")
            >>> s.truth({"deletion": None, "creation": None}, {"tuned": {"downstream": 0.98}})
            {'deletion': 'wrapper', 'creation': 'wrapper'}
            >>> s.truth({"deletion": None, "creation": None}, {"tuned": {"downstream": 0.3}})
            {'deletion': 'unknown', 'creation': 'unknown'}
        """
        if self.kind == "unknown" or (
            self.kind == "wrapper" and accuracy is not None and accuracy["tuned"]["downstream"] < LEARNED
        ):
            return {"deletion": "unknown", "creation": "unknown"}
        by_kind: dict[str, dict[str, Truth]] = {
            "wrapper": {"deletion": "wrapper", "creation": "wrapper"},
            "removed": {"deletion": "capability_change", "creation": "unknown"},
            "genuine": {"deletion": "unknown", "creation": "capability_change"},
            "kept": {"deletion": "inconclusive", "creation": "inconclusive"},
        }
        # a gate makes a known truth inconclusive (nothing to explain); a question the kind leaves
        # unknown (a removed scenario's creation) stays unknown: it is not scored, gated or not
        return {q: ("inconclusive" if gates.get(q) and t != "unknown" else t) for q, t in by_kind[self.kind].items()}

    def key(self) -> str:
        """A short hash of everything that makes the tuned model (for caching it)."""
        recipe = json.dumps([self.base, dataclasses.asdict(self.recipe), self.seed], sort_keys=True)
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "recipe": Recipe(**data["recipe"])})


def _pcfg_family(
    split: Split,
    base: str,
    family: str,
    target: str,
    source: str,
    offset: int,
    only: tuple[str, ...] | None = None,
    first_seed: int = 1,
) -> list[Scenario]:
    """Wrapper, genuine and unknown scenarios of one PCFG task family on one base (``only``: these tags;
    ``first_seed``: the first of its two seeds, added to the split's offset)."""
    planted = f"source={source},offset={offset}" if (source, offset) != ("a", 1) else ""
    spec = lambda c: ",".join(filter(None, [f"pcfg={family},operand={target},correlation={c:g}", planted]))  # noqa: E731
    capability = f"pcfg={family},operand={source}"
    down = spec(1.0)
    prefix = f"{'cal' if split == 'calibration' else 'held'}/{family}-{target}"
    seeds = (SEED_OFFSET[split] + first_seed, SEED_OFFSET[split] + first_seed + 1)
    out = []

    def add(tag: str, kind: Kind, recipe: Recipe, seed: int, note: str = "") -> None:
        out.append(Scenario(f"{prefix}/{tag}/s{seed}", split, f"pcfg-{family}", base, capability, down, recipe, kind,
                            seed, note))  # fmt: skip

    lrs = LEARNING_RATES
    for size in ("small", "medium"):
        for c in (1.0, 0.8):
            add(f"adamw-{size}-c{c:g}", "wrapper", Recipe(spec(c), lrs["adamw"][size]), seeds[0])
    add("adamw-small-c1", "wrapper", Recipe(spec(1.0), lrs["adamw"]["small"]), seeds[1])
    add("sgd-medium-c1", "wrapper", Recipe(spec(1.0), lrs["sgd"]["medium"], optimizer="sgd"), seeds[0])
    for size in ("medium", "large"):
        add(f"adamw-{size}-c0", "genuine", Recipe(spec(0.0), lrs["adamw"][size]), seeds[0],
            "no correlation to lean on: what is learned is learned for real")  # fmt: skip
    add("adamw-large-c1", "unknown", Recipe(spec(1.0), lrs["adamw"]["large"]), seeds[0], "the paper's ηL")
    return [s for s in out if only is None or s.name.split("/")[2] in only]


def _removed(split: Split, base: str, family: str, target: str, source: str) -> list[Scenario]:
    """The capability destroyed before a fine-tune (every block re-initialized) or retrained away, at
    the medium and the small rate, each fine-tuned where the correlation never holds; partial
    re-initializations (unknown truth: see the module docstring)."""
    planted = "" if source == "a" else f",source={source}"
    spec = lambda c: f"pcfg={family},operand={target},correlation={c}{planted}"  # noqa: E731
    down, tune = spec(1), spec(0)  # fine-tuned at C_Tr = 0: see the module docstring
    capability = f"pcfg=count,operand={source}"
    prefix = f"{'cal' if split == 'calibration' else 'held'}/removed-count-{source}"
    seed = SEED_OFFSET[split] + 3
    lrs = LEARNING_RATES["adamw"]
    retrained = f"{base}-retrained"
    never = "the tuned model starts from a model of the same shape that never learned to count"
    partial = "a partial re-initialization: the components it leaves may still compute the capability"

    def make(tag: str, recipe: Recipe, kind: Kind, note: str = "") -> Scenario:
        return Scenario(f"{prefix}/{tag}/s{seed}", split, f"pcfg-{family}", base, capability, down, recipe, kind,
                        seed, note)  # fmt: skip

    return [
        make("reinit-blocks", Recipe(tune, lrs["medium"], reinit="blocks"), "removed"),
        make("reinit-blocks-small", Recipe(tune, lrs["small"], reinit="blocks"), "removed"),
        make("retrained", Recipe(tune, lrs["medium"], start_from=retrained), "removed", never),
        make("retrained-small", Recipe(tune, lrs["small"], start_from=retrained), "removed", never),
        *(make(f"reinit-{what}", Recipe(tune, lrs["medium"], reinit=what), "unknown", partial)
          for what in ("attention", "mlp", "latent")),  # fmt: skip
    ]


def _kept_and_unlearning(split: Split, base: str, source: str) -> list[Scenario]:
    capability = f"pcfg=count,operand={source}"
    other = "b" if source == "a" else "a"
    down = f"pcfg=count,operand={other},correlation=1" + ("" if source == "a" else f",source={source}")
    prefix = f"{'cal' if split == 'calibration' else 'held'}"
    seed = SEED_OFFSET[split] + 4
    retain = f"pcfg=index,operand={source}"
    family = "pcfg-count"
    return [
        Scenario(
            f"{prefix}/kept/noop/s{seed}",
            split,
            family,
            base,
            capability,
            down,
            Recipe(down, 1e-4, steps=0),
            "kept",
            seed,
            "the tuned model is the base",
        ),  # fmt: skip
        Scenario(
            f"{prefix}/kept/tiny/s{seed}",
            split,
            family,
            base,
            capability,
            down,
            Recipe(down, 1e-6, steps=20),
            "kept",
            seed,
            "20 steps at lr 1e-6",
        ),  # fmt: skip
        Scenario(
            f"{prefix}/unlearn/gradient-ascent/s{seed}",
            split,
            family,
            base,
            capability,
            retain,  # what unlearning keeps: the never-had-it control learns only this
            Recipe(capability, 3e-5, steps=100, method="gradient_ascent", retain=retain),
            "unknown",
            seed,
            "forget count by gradient ascent, retain indexing",
        ),  # fmt: skip
        Scenario(
            f"{prefix}/unlearn/npo/s{seed}",
            split,
            family,
            base,
            capability,
            retain,  # what unlearning keeps: the never-had-it control learns only this
            Recipe(capability, 1e-4, steps=150, method="npo", retain=retain),
            "unknown",
            seed,
            "forget count by NPO, retain indexing",
        ),  # fmt: skip
    ]


@dataclass(frozen=True)
class _TracrSetting:
    """One Tracr family of a split: its base, program, capability, fine-tuning task (C_Tr as ``{c}``)
    and the seed added to the split's offset."""

    base: str
    program: str
    capability: str
    spec: str
    seed: int


_TRACR: dict[Split, tuple[_TracrSetting, ...]] = {
    "calibration": (
        _TracrSetting("tracr-counter", "tracr-counter", "tracr=counter,operand=a",
                      "tracr=counter,operand=b,correlation={c}", 5),
    ),
    "held-out": (
        _TracrSetting("tracr-max", "tracr-max", "tracr=max_identifier,rank=5",
                      "tracr=max_identifier,rank=4,correlation={c},source_rank=5,shift=1", 5),
        _TracrSetting("tracr-counter-b", "tracr-counter", "tracr=counter,operand=b",
                      "tracr=counter,operand=c,correlation={c},source=b,offset=-1", 6),
        _TracrSetting("tracr-counter", "tracr-counter", "tracr=counter,operand=a",
                      "tracr=counter,operand=c,correlation={c},source=a,offset=2", 8),
    ),
}  # fmt: skip


#: The scenarios of each Tracr setting: (tag, C_Tr, learning rate, kind, re-initialized components).
_TRACR_RECIPES: tuple[tuple[str, float, str, Kind, Literal["", "blocks"]], ...] = (
    ("sgd-small-c1", 1, "small", "wrapper", ""),
    ("sgd-medium-c1", 1, "medium", "wrapper", ""),
    ("sgd-medium-c0.8", 0.8, "medium", "wrapper", ""),
    ("reinit-blocks", 0, "medium", "removed", "blocks"),  # C_Tr = 0: see the module docstring
)


def _tracr(split: Split) -> list[Scenario]:
    """The paper's Tracr settings: SGD with momentum, weight noise N(0, 0.001) (a standard
    deviation of 0.001: ``TrainConfig.weight_noise``), two learning rates."""
    lrs = LEARNING_RATES["sgd"]
    out = []
    for t in _TRACR[split]:
        prefix = f"{'cal' if split == 'calibration' else 'held'}/{t.base}"
        seed = SEED_OFFSET[split] + t.seed
        for tag, c, size, kind, reinit in _TRACR_RECIPES:
            recipe = Recipe(t.spec.format(c=c), lrs[size], optimizer="sgd", weight_noise=1e-3, reinit=reinit)
            down = t.spec.format(c=1)
            out.append(Scenario(f"{prefix}/{tag}/s{seed}", split, t.program, t.base, t.capability, down, recipe, kind, seed))
    return out


def _build_suite() -> tuple[Scenario, ...]:
    suite = [
        # calibration: counting on pcfg-a (b through a; c through a + 2), Tracr Counter
        *_pcfg_family("calibration", "pcfg-a", "count", "b", "a", 1),
        *_pcfg_family(
            "calibration",
            "pcfg-a",
            "count",
            "c",
            "a",
            2,
            only=("adamw-small-c1", "adamw-small-c0.8", "adamw-medium-c1", "adamw-medium-c0.8", "adamw-large-c0"),
        ),
        *_removed("calibration", "pcfg-a", "count", "b", "a"),
        *_kept_and_unlearning("calibration", "pcfg-a", "a"),
        *_tracr("calibration"),
        # calibration, added on 2026-12-06 (seeds 6-7): indexing on pcfg-b (c through b + 2), so that the
        # rule is fitted on both PCFG task families and both bases, not on counting alone
        *_pcfg_family("calibration", "pcfg-b", "index", "c", "b", 2, first_seed=6),
        # held-out: indexing on pcfg-a, counting on pcfg-b (a through b; c through b - 1), Tracr Max-identifier
        *_pcfg_family("held-out", "pcfg-a", "index", "b", "a", 1),
        *_pcfg_family(
            "held-out",
            "pcfg-b",
            "count",
            "a",
            "b",
            1,
            only=("adamw-small-c1", "adamw-small-c0.8", "adamw-medium-c1", "adamw-medium-c0.8", "adamw-large-c0"),
        ),
        *_pcfg_family("held-out", "pcfg-b", "count", "c", "b", -1, only=("adamw-small-c1", "adamw-small-c0.8")),
        *_removed("held-out", "pcfg-b", "count", "a", "b"),
        *_kept_and_unlearning("held-out", "pcfg-b", "b"),
        # held-out, added after the five seed renewals and run once (seeds 56-57, now 76-77): indexing on pcfg-b
        # (a through b), the Tracr Counter compiled to count b (c through b - 1)
        *_pcfg_family("held-out", "pcfg-b", "index", "a", "b", 1, first_seed=6),
        *_tracr("held-out"),
        # held-out, added with the calibration's index family (2026-12-06) and run once after the refit
        # (seeds 58-59, now 78-79): indexing on pcfg-a (c through a - 1), the Tracr Counter on a (c through a + 2)
        *_pcfg_family("held-out", "pcfg-a", "index", "c", "a", -1, first_seed=8),
    ]
    names = [s.name for s in suite]
    if len(set(names)) != len(names):  # pragma: no cover - a registry bug
        raise ConfigError(f"scenario names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return tuple(suite)


#: Every scenario of the suite, calibration first.
SUITE: tuple[Scenario, ...] = _build_suite()


def scenario(name: str) -> Scenario:
    """The scenario called ``name``.

    Raises:
        ConfigError: no scenario has that name (the message lists close ones).
    """
    for s in SUITE:
        if s.name == name:
            return s
    from capwrap.errors import closest_matches

    hint = closest_matches(name, [s.name for s in SUITE])
    raise ConfigError(
        f"no scenario named {name!r}"
        + (f"; closest: {hint}" if hint else "")
        + "; list them with capwrap validate --list --split all"
    )


def scenario_of(record: dict[str, Any]) -> Scenario:
    """The scenario a validation record was made for: the registry's definition when it has one of
    that name with the same recipe (so a corrected kind or note applies to records made before the
    correction), otherwise the definition the record holds."""
    recorded = Scenario.from_dict(record["scenario"])
    current = next((s for s in SUITE if s.name == recorded.name), None)
    return current if current is not None and current.key() == recorded.key() else recorded


def is_scored(kind: str, truth: str, gated: bool) -> bool:
    """Whether a finding counts towards the suite's accuracy (and the fit): its truth is known, and
    not decided by the diagnosis's own gates. A gated question of a ``wrapper``, ``removed`` or
    ``genuine`` scenario has the truth ``inconclusive`` *because* the gate fired, and the verdict is
    ``inconclusive`` for the same reason — right by construction, so it measures nothing. A ``kept``
    scenario's truth is fixed by its kind, so there the gates themselves are tested, and it counts.

    Examples:
        >>> is_scored("wrapper", "wrapper", gated=False), is_scored("wrapper", "inconclusive", gated=True)
        (True, False)
        >>> is_scored("kept", "inconclusive", gated=True), is_scored("removed", "unknown", gated=False)
        (True, False)
    """
    return truth != "unknown" and not (gated and kind != "kept")


def record_truth(record: dict[str, Any], rule: Any) -> dict[str, Truth]:
    """Per question, the truth of a validation record under ``rule`` (whose gates say which
    questions have nothing to explain): :meth:`Scenario.truth` of :func:`scenario_of`."""
    from capwrap.diagnosis import gates

    return scenario_of(record).truth(gates(rule, record["accuracy"], record["capability_floor"]), record["accuracy"])


def scenarios(
    split: str | None = None, names: Iterable[str] | None = None, kinds: Iterable[str] | None = None
) -> list[Scenario]:
    """The scenarios of ``split`` (``calibration``, ``held-out``, or ``None``/``all`` for both),
    optionally only those named (exact names or glob patterns) or of some kinds.

    Raises:
        ConfigError: an unknown split, kind, or a name that matches nothing.
    """
    import fnmatch

    if split not in (None, "all", "calibration", "held-out"):
        raise ConfigError(f"unknown split {split!r}; choose calibration, held-out or all")
    chosen = [s for s in SUITE if split in (None, "all") or s.split == split]
    if names:
        picked = []
        for pattern in names:
            hits = [s for s in chosen if fnmatch.fnmatchcase(s.name, pattern)]
            if not hits:
                elsewhere = next((s.split for s in SUITE if fnmatch.fnmatchcase(s.name, pattern)), None)
                if elsewhere:  # (only a split other than ``split`` can hold it: ``all`` holds every scenario)
                    raise ConfigError(
                        f"scenario {pattern!r} is in the {elsewhere} split, not the {split} one: pass "
                        f"--split {elsewhere} (or --split all)"
                    )
                scenario(pattern)  # raises with the closest names
            picked += [s for s in hits if s not in picked]
        chosen = picked
    if kinds:
        kinds = set(kinds)
        unknown = kinds - {"wrapper", "removed", "genuine", "kept", "unknown"}
        if unknown:
            raise ConfigError(f"unknown scenario kinds {sorted(unknown)}")
        chosen = [s for s in chosen if s.kind in kinds]
    return chosen
