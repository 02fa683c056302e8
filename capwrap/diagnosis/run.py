"""`diagnose()`: run analyzers on a (base, tuned) pair and weigh their evidence into two findings.

Deletion — is a capability that seems lost still in the tuned model under a thin change
(``wrapper``), or is it gone (``capability_change``)? Creation — is a behaviour that seems new a
genuine capability (``capability_change``), or a wrapper over an old one (``wrapper``)? Each finding
is ``inconclusive`` when there is nothing to explain or the evidence does not settle it, with the
reason. How evidence is weighed is :class:`~capwrap.diagnosis.rule.VerdictRule`'s job.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> from capwrap.analyzers import AttentionComparison, Generalization
    >>> config = PCFGConfig(length=8, window=4)
    >>> capability, downstream = PCFGTask("count", "a", config=config), PCFGTask("count", "b", correlation=1.0, config=config)
    >>> base = build_model(ModelSpec(d_vocab=capability.d_vocab, n_ctx=capability.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> d = diagnose(base, base.clone(), capability=capability, downstream=downstream,
    ...              analyzers=[AttentionComparison(n=16), Generalization()], eval_size=64, progress=False)
    >>> d.deletion.verdict, d.creation.verdict
    ('inconclusive', 'inconclusive')
    >>> list(d.summary().columns)[:4]
    ['question', 'analyzer', 'kind', 'statistic']
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Literal

from tqdm.auto import tqdm

from capwrap.analyzers import (
    Analyzer,
    AttentionComparison,
    Context,
    Generalization,
    ModelPair,
    NewLatentProbing,
    Patching,
    Probing,
    Pruning,
    Revival,
    WeightDiff,
)
from capwrap.analyzers.base import check_models
from capwrap.diagnosis.evidence_folder import EvidenceFolder
from capwrap.diagnosis.result import Diagnosis
from capwrap.diagnosis.rule import VerdictRule, default_rule
from capwrap.errors import ConfigError, as_list
from capwrap.models import CapModel
from capwrap.models.residency import Residency
from capwrap.recording import RunStore
from capwrap.report import signed_percent
from capwrap.tasks.base import Task

__all__ = ["MEMORY_MODES", "Memory", "check_memory", "diagnose", "default_analyzers", "gates"]

#: How a diagnosis holds its models: both in memory, or taking turns (see :func:`diagnose`).
Memory = Literal["normal", "low"]
MEMORY_MODES: tuple[str, ...] = ("normal", "low")


def default_analyzers(quick: bool = False, memory: Memory = "normal", compiled: bool = False) -> list[Analyzer]:
    """The analyzers ``diagnose`` runs by default (both questions); ``quick`` shrinks their samples
    and budgets; ``memory="low"`` makes revival train in about one model's memory
    (``Revival(low_memory=True)``: Adafactor inside the backward pass instead of AdamW);
    ``compiled``: a compiled Tracr model (``spec.compiled``, which ``diagnose`` passes),
    pruned by single weights as the paper does: its MLPs have a handful of neurons."""
    check_memory(memory)
    low = memory == "low"
    granularity = "weight" if compiled else "neuron"
    if quick:
        return [
            Probing(n=1024, steps=200),
            Pruning(ks=(0, 1, 2, 4, 8), score_size=256, granularity=granularity),
            Revival(max_steps=200, batch_size=32, check_size=256, control_steps=200, seeds=1, low_memory=low),
            WeightDiff(graft_fractions=(0.01, 0.1)),
            AttentionComparison(n=128),
            Patching(n=64),
            Generalization(),
            NewLatentProbing(n=1024, steps=200),
        ]
    return [Probing(), Pruning(granularity=granularity), Revival(low_memory=low), WeightDiff(), AttentionComparison(),
            Patching(), Generalization(), NewLatentProbing()]  # fmt: skip


def gates(rule: VerdictRule, accuracy: dict[str, dict[str, float]], floor: float) -> dict[str, str | None]:
    """Per question, the reason there is nothing to explain (``None``: there is something), from the
    evaluation set's accuracies (``{"base"|"tuned": {test set: accuracy}}``).

    Deletion needs a base that has the capability (at least ``floor``, the capability task's
    ``capability_floor``) and a tuned model that lost some of it (below ``rule.kept_fraction`` of the
    base); creation needs a tuned model that gained at least ``rule.min_gain`` on the downstream task.

    Examples:
        >>> from capwrap.diagnosis.rule import VerdictRule
        >>> acc = {"base": {"capability": 0.99, "downstream": 0.1}, "tuned": {"capability": 0.97, "downstream": 0.9}}
        >>> g = gates(VerdictRule(), acc, floor=0.5)
        >>> g["deletion"].startswith("fine-tuning kept the capability"), g["creation"] is None
        (True, True)
    """
    base, tuned = accuracy["base"]["capability"], accuracy["tuned"]["capability"]
    out: dict[str, str | None] = {"deletion": None, "creation": None}
    if base < floor:
        out["deletion"] = (f"the base model barely has the capability ({base:.0%}, below its floor {floor:.0%}): "
                           "there is nothing to lose")  # fmt: skip
    elif tuned >= rule.kept_fraction * base:
        out["deletion"] = (f"fine-tuning kept the capability ({base:.0%} → {tuned:.0%}, at least "
                           f"{rule.kept_fraction:.0%} of the base): there is no loss to explain")  # fmt: skip
    gain = accuracy["tuned"]["downstream"] - accuracy["base"]["downstream"]
    if gain < rule.min_gain:
        out["creation"] = (f"the tuned model gained {signed_percent(gain)} on the downstream task (less than {rule.min_gain:.0%}): "
                           "there is no new behaviour to explain")  # fmt: skip
    return out


def diagnose(
    base: CapModel,
    tuned: CapModel,
    capability: Task,
    downstream: Task,
    analyzers: Sequence[Analyzer] | None = None,
    store: RunStore | None = None,
    eval_size: int = 1024,
    seed: int = 0,
    progress: bool = True,
    rule: VerdictRule | None = None,
    downstream_free: Task | None | Literal["auto"] = "auto",
    n_boot: int = 200,
    memory: Memory = "normal",
    evidence_dir: str | os.PathLike | None = None,
) -> Diagnosis:
    """Run ``analyzers`` (default: :func:`default_analyzers`) on the pair and weigh their evidence.

    Args:
        base: the model before fine-tuning.
        tuned: the fine-tuned model (same architecture and shape).
        capability: the task the base model could do (whose fate the deletion finding is about).
        downstream: the fine-tuning task as tested (e.g. with its spurious correlation, C_Te = 1).
        analyzers: any subset, in any order; names must be unique.
        store: the fine-tuning run's :class:`~capwrap.recording.RunStore`, for analyzers that use it.
        eval_size: sequences per test set of the one evaluation set every analyzer and reason uses.
        seed: the seed every random choice of the diagnosis derives from.
        progress: show which analyzer runs.
        rule: the verdict rule (default: the fitted one that ships with capwrap).
        downstream_free: the downstream task without its spurious correlation (C_Te = 0);
            ``"auto"``: the downstream task's own ``correlation_free()``; ``None``: none.
        n_boot: bootstrap replicates behind every interval and the verdicts' confidence.
        memory: ``"normal"``: both models stay in memory, and analyzers work on copies;
            ``"low"``: the models take turns in memory (a :class:`~capwrap.models.residency.Residency`;
            the other one waits in a temporary file), and analyzers work on the models themselves and
            undo their changes — about one model of memory, for the same numbers but revival's (the default
            analyzers then include ``Revival(low_memory=True)``, whose training holds no gradient or
            optimizer state the size of the model: its step counts are Adafactor's). If the models
            already take turns in a residency, it is used and left open; else one is made for the
            call and both models are back in memory when it returns.
            A pair with a model accelerate dispatched (``load_model(..., device_map=...)``) is
            diagnosed this way whatever ``memory`` says: such a model is not copied
            (:attr:`~capwrap.models.CapModel.copyable`). Its offloaded weights are read into CPU
            memory when an analyzer first needs them and stay there when the call returns (both
            models given back as they were, in memory); :func:`diagnose_checkpoints` discards them.
        evidence_dir: a folder that keeps each finished analyzer's evidence, so that an interrupted
            diagnosis resumes: a later call with the same folder, pair and settings reads back what
            is there and runs only the other analyzers, for the numbers an uninterrupted run gives
            (:mod:`~capwrap.diagnosis.evidence_folder`; :attr:`Diagnosis.resumed` names them).

    Raises:
        ConfigError: the pair differs in shape or reads tokens differently (tokenizers, or a Tracr
            program's letters), the tasks do not fit, the store is another model's,
            analyzers repeat a name, the list is empty, or ``evidence_dir`` holds the evidence of
            another pair or other settings.
    """
    check_memory(memory)
    check_models(base, tuned)
    if not (base.copyable and tuned.copyable):
        memory = "low"  # analyzers cannot work on copies: the models take turns and are edited in place
    residency, own = None, False
    if memory == "low":
        residency = base._residency or tuned._residency
        if residency is None:
            residency, own = Residency(), True
    try:
        if analyzers is None:
            analyzers = default_analyzers(memory=memory, compiled=base.spec.compiled)
        return _diagnose(ModelPair(base, tuned, residency), capability, downstream, analyzers, store, eval_size,
                         seed, progress, rule, downstream_free, n_boot, evidence_dir)  # fmt: skip
    finally:
        if own:
            residency.close(restore=True)


def check_memory(memory: str) -> None:
    """Raise a clear error unless ``memory`` is one of :data:`MEMORY_MODES`."""
    if memory not in MEMORY_MODES:
        raise ConfigError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")


def _diagnose(
    pair: ModelPair,
    capability: Task,
    downstream: Task,
    analyzers: Sequence[Analyzer],
    store: RunStore | None,
    eval_size: int,
    seed: int,
    progress: bool,
    rule: VerdictRule | None,
    downstream_free: Task | None | Literal["auto"],
    n_boot: int,
    evidence_dir: str | os.PathLike | None = None,
) -> Diagnosis:
    rule = rule or default_rule()
    analyzers = _checked_analyzers(analyzers)
    if not analyzers:
        raise ConfigError("no analyzers given; pass at least one (see capwrap.diagnosis.default_analyzers())")
    names = [a.name for a in analyzers]
    if len(set(names)) != len(names):
        raise ConfigError(f"analyzer names repeat ({names}); give each analyzer a distinct name=")
    context = Context.build(pair, capability, downstream, store, downstream_free, eval_size=eval_size, seed=seed,
                            n_boot=n_boot, level=rule.level, progress=progress)  # fmt: skip
    kept = None if evidence_dir is None else EvidenceFolder.open(evidence_dir, _identity(context, rule))
    evidence, seconds, resumed = [], {}, []
    bar = tqdm(analyzers, desc="diagnose", disable=not progress, leave=False)
    for analyzer in bar:
        bar.set_postfix_str(analyzer.name)
        earlier = None if kept is None else kept.read(analyzer)
        if earlier is not None:  # measured by an earlier call on this pair with these settings
            evidence.append(earlier[0])
            seconds[analyzer.name] = earlier[1]
            resumed.append(analyzer.name)
            continue
        t0 = time.perf_counter()
        evidence.append(analyzer(context.pair, context.capability, context.downstream, context=context, rule=rule))
        seconds[analyzer.name] = round(time.perf_counter() - t0, 2)
        if kept is not None:
            kept.write(analyzer, evidence[-1], seconds[analyzer.name])
    accuracy = context.eval.table()
    reasons = gates(rule, accuracy, capability.capability_floor)
    findings = {q: rule.weigh(q, evidence, reasons[q], n_boot=n_boot) for q in ("deletion", "creation")}
    intervals = {m: {k: context.interval(context.accuracy_replicates(m, k)) for k in accuracy[m]} for m in accuracy}
    tasks = {"capability": capability.describe(), "downstream": downstream.describe()}
    if context.downstream_free is not None:
        tasks["downstream_free"] = context.downstream_free.describe()
    return Diagnosis(findings["deletion"], findings["creation"], accuracy, intervals, tasks, seconds,
                     rule=dict(rule.provenance), weights={e.analyzer: rule.weight(e) for e in evidence},
                     resumed=resumed)  # fmt: skip


def _checked_analyzers(analyzers: Any) -> list[Analyzer]:
    """``analyzers`` as a list of analyzer instances, or a clear error for what people pass instead
    (one analyzer, names, classes)."""
    example = "e.g. analyzers=[capwrap.WeightDiff(), capwrap.Patching(n=64)], or default_analyzers()"
    analyzers = as_list(analyzers, "analyzers takes a list of analyzers", f"; {example}")
    for a in analyzers:
        if isinstance(a, type) and issubclass(a, Analyzer):
            raise ConfigError(f"analyzers takes analyzer instances, got the class {a.__name__}; pass {a.__name__}() ({example})")
        if not isinstance(a, Analyzer):
            raise ConfigError(f"analyzers takes analyzer instances, got {a!r} ({type(a).__name__}); {example}")
    return analyzers


def _identity(context: Context, rule: VerdictRule) -> dict:
    """What a diagnosis's evidence belongs to (:class:`~capwrap.diagnosis.evidence_folder.EvidenceFolder`):
    both models' weights, the tasks (and the evaluation set's sequences and answers themselves, whatever
    a task's description leaves out), the bootstrap, the rule's numbers (a refit that gives the same
    numbers is the same rule) and capwrap's version.
    (The tuned model's weights first: with the models taking turns, the evaluation set left it in memory.)"""
    import capwrap
    from capwrap.provenance import weights_sha256

    free = context.downstream_free
    return {
        "capwrap": capwrap.__version__,
        **{f"{which}_weights_sha256": weights_sha256(m) for which, m in reversed(context.pair.models().items())},
        "tasks": {"capability": context.capability.describe(), "downstream": context.downstream.describe(),
                  "downstream_free": None if free is None else free.describe()},
        "eval_size": len(context.eval.batches["capability"]), "eval_set_sha256": _batches_sha256(context),
        "seed": context.seed, "n_boot": context.n_boot,
        "store": None if context.store is None else str(context.store.path),
        "rule": {k: v for k, v in rule.to_dict().items() if k != "provenance"},  # its numbers, not where they came from
    }  # fmt: skip


def _batches_sha256(context: Context) -> str:
    """SHA-256 of the evaluation set: every test set's tokens, answer positions, answers and labels."""
    from capwrap.provenance import tensors_sha256

    return tensors_sha256(
        (f"{which}.{part}", tensor)
        for which, batch in sorted(context.eval.batches.items())
        for part, tensor in [("tokens", batch.tokens), ("answer_pos", batch.answer_pos), ("answers", batch.answers),
                             *((f"labels.{k}", batch.labels[k]) for k in sorted(batch.labels))]
    )  # fmt: skip
