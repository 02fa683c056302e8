"""`diagnose()`: run analyzers on a (base, tuned) pair and weigh their evidence into a verdict.

The verdict answers one question: after fine-tuning, is the capability still in the model under a
thin change (``wrapper``), did the capability itself change (``capability_change``), or does the
evidence not settle it (``inconclusive``)?

How the evidence is weighed. Analyzers are of two kinds:

* **functional** — probing, pruning, revival — test whether the capability can still be *read*
  (a probe), *released* (pruning a few units) or *revived* (a few reverse fine-tuning steps). They
  are what the question is about, and count fully (weight 1);
* **structural** — weight diff, attention comparison, patching — say *where* and *how widely*
  the model changed. A localized change is consistent with a wrapper, but a wrapper can be spread
  over many weights (AdamW moves everything a little), so they count half (weight 0.5).

The score is the weighted mean of signed strengths (wrapper +, change −) in [-1, 1]. ``wrapper``
needs a functional analyzer to find the capability with strength ≥ 0.5, none to find it gone with
strength ≥ 0.5, and a score ≥ 0.15; ``capability_change`` needs a functional analyzer to find it
gone (strength ≥ 0.4), none to find it with strength ≥ 0.5, and a score ≤ -0.1. Everything else is
``inconclusive``, and the reasons say which evidence disagreed. If the tuned model kept the
capability (≥ 90% of the base's accuracy), or the base never had it (below the task's
``capability_floor``: 50% for procedural tasks, 5% for predicting a word in text), the verdict is
``inconclusive``: there was nothing to wrap or lose.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> from capwrap.analyzers import AttentionComparison
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> base = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> d = diagnose(base, base.clone(), capability=task, downstream=task, analyzers=[AttentionComparison(n=16)],
    ...              eval_size=64, progress=False)
    >>> d.verdict
    'inconclusive'
    >>> list(d.summary().columns)[:4]
    ['analyzer', 'kind', 'direction', 'strength']
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
from tqdm.auto import tqdm

from capwrap.analyzers import (
    Analyzer,
    AttentionComparison,
    Evidence,
    ModelPair,
    Patching,
    Probing,
    Pruning,
    Revival,
    WeightDiff,
)
from capwrap.errors import ConfigError
from capwrap.files import check_output_folder, write_text_atomic
from capwrap.models import CapModel
from capwrap.provenance import describe_call, run_provenance
from capwrap.recording import RunStore
from capwrap.report import Report
from capwrap.tasks.base import Task, accuracy

__all__ = ["Diagnosis", "Verdict", "diagnose", "diagnose_checkpoints", "default_analyzers", "weigh"]

Verdict = Literal["wrapper", "capability_change", "inconclusive"]
_WEIGHTS = {"functional": 1.0, "structural": 0.5}
_SIGN = {"wrapper": 1.0, "change": -1.0, "neutral": 0.0}


def default_analyzers(quick: bool = False) -> list[Analyzer]:
    """The analyzers ``diagnose`` runs by default; ``quick`` shrinks their samples and budgets."""
    if quick:
        return [
            Probing(n=1024, steps=200),
            Pruning(ks=(0, 1, 2, 4, 8), eval_size=256, score_size=256),
            Revival(max_steps=200, batch_size=32, eval_size=256, control_steps=200),
            WeightDiff(graft_fractions=(0.01, 0.1), eval_size=256),
            AttentionComparison(n=128),
            Patching(n=64),
        ]
    return [Probing(), Pruning(), Revival(), WeightDiff(), AttentionComparison(), Patching()]


@dataclass
class Diagnosis:
    """The verdict and the evidence behind it.

    Attributes:
        verdict: ``wrapper``, ``capability_change`` or ``inconclusive``.
        score: weighted mean of the analyzers' signed strengths, in [-1, 1] (+ = wrapper).
        reasons: why, in sentences that cite numbers (the verdict's first).
        evidence: each analyzer's :class:`~capwrap.analyzers.Evidence`.
        accuracy: base and tuned accuracy on the capability and downstream tasks.
        tasks: the tasks' descriptions.
        seconds: per analyzer.
    """

    verdict: Verdict
    score: float
    reasons: list[str]
    evidence: list[Evidence]
    accuracy: dict[str, dict[str, float]]
    tasks: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per analyzer: kind, direction, strength, weight, signed contribution, first reason."""
        rows = []
        for ev in self.evidence:
            kind = _kind(ev)
            rows.append({
                "analyzer": ev.analyzer, "kind": kind, "direction": ev.direction, "strength": round(ev.strength, 3),
                "weight": _WEIGHTS[kind], "contribution": round(_WEIGHTS[kind] * _SIGN[ev.direction] * ev.strength, 3),
                "reason": ev.reasons[0] if ev.reasons else "",
            })  # fmt: skip
        return pd.DataFrame(
            rows, columns=["analyzer", "kind", "direction", "strength", "weight", "contribution", "reason"]
        )

    def __getitem__(self, analyzer: str) -> Evidence:
        """The evidence of one analyzer, by name."""
        for ev in self.evidence:
            if ev.analyzer == analyzer:
                return ev
        raise KeyError(f"no evidence from {analyzer!r}; have {[e.analyzer for e in self.evidence]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "verdict": self.verdict,
            "score": round(self.score, 4),
            "reasons": list(self.reasons),
            "accuracy": self.accuracy,
            "tasks": self.tasks,
            "evidence": [ev.to_dict(max_rows=20) for ev in self.evidence],
            "seconds": self.seconds,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The diagnosis as JSON; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        if path is not None:
            write_text_atomic(path, text)
        return text

    def report(self, title: str = "capwrap diagnosis", provenance: dict[str, Any] | None = None) -> Report:
        """The report: verdict, reasons, accuracies, the summary and each analyzer's figure and table,
        and ``provenance`` (:func:`capwrap.provenance.run_provenance`; software and date when omitted)."""
        report = Report(title, provenance=dict(provenance or {}))
        self.add_verdict(report)
        report.add_text("Accuracy", "Base and tuned model on the capability and downstream tasks.")
        report.add_table(pd.DataFrame(self.accuracy).rename_axis("task"), float_format="{:.1%}")
        self.add_evidence(report)
        return report

    def add_verdict(self, report: Report) -> None:
        """Append the verdict and its reasons to ``report``."""
        report.add_text(None, f"Verdict: {self.verdict} (score {self.score:+.2f})", css_class="verdict")
        report.add_list("Why", self.reasons)

    def add_evidence(self, report: Report) -> None:
        """Append the evidence summary and each analyzer's figure and table to ``report``."""
        report.add_text("Evidence", "Each analyzer's direction and strength, and how much it weighed in the verdict.")
        report.add_table(self.summary().drop(columns=["reason"]))
        for ev in self.evidence:
            report.add_heading(f"{ev.analyzer}: {ev.direction} ({ev.strength:.2f})")
            report.add_list(None, ev.reasons)
            report.add_figure(ev.figure(), empty_note="No data to plot.")
            report.add_table(ev.table.head(12))

    def to_html(
        self,
        path: str | os.PathLike | None = None,
        title: str = "capwrap diagnosis",
        provenance: dict[str, Any] | None = None,
    ) -> str:
        """A self-contained HTML report (plotly inlined, readable offline); written atomically to ``path``."""
        report = self.report(title, provenance)
        if path is not None:
            report.write(path)
        return report.to_html()


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _kind(ev: Evidence) -> str:
    return ev.kind


def weigh(
    evidence: Sequence[Evidence], accuracy: dict[str, dict[str, float]], floor: float = 0.5
) -> tuple[Verdict, float, list[str]]:
    """The verdict rule (see the module docstring): (verdict, score, reasons). ``floor``: the base
    accuracy below which the base does not have the capability (the task's ``capability_floor``)."""
    base_cap, tuned_cap = accuracy["base"]["capability"], accuracy["tuned"]["capability"]
    total = sum(_WEIGHTS[_kind(e)] for e in evidence)
    score = sum(_WEIGHTS[_kind(e)] * _SIGN[e.direction] * e.strength for e in evidence) / total if total else 0.0
    functional = [e for e in evidence if _kind(e) == "functional"]
    found = [e for e in functional if e.direction == "wrapper" and e.strength >= 0.5]
    gone = [e for e in functional if e.direction == "change" and e.strength >= 0.4]
    strong_gone = [e for e in gone if e.strength >= 0.5]
    names = lambda es: ", ".join(e.analyzer for e in es)  # noqa: E731
    detail = [f"{e.analyzer}: {r}" for e in evidence for r in e.reasons]
    acc_text = f"capability accuracy {base_cap:.0%} (base) → {tuned_cap:.0%} (tuned)"
    if base_cap < floor:
        return (
            "inconclusive",
            score,
            [
                f"the base model barely has the capability ({base_cap:.0%}, below {floor:.0%}); there is nothing to wrap or lose",
                *detail,
            ],
        )
    if tuned_cap >= 0.9 * base_cap:
        return (
            "inconclusive",
            score,
            [f"fine-tuning kept the capability ({acc_text}); there is no loss to explain", *detail],
        )
    if not functional:
        return (
            "inconclusive",
            score,
            [
                f"{acc_text}; no functional analyzer (probing, pruning, revival) ran, and structural evidence alone cannot tell",
                *detail,
            ],
        )
    if found and not strong_gone and score >= 0.15:
        head = f"wrapper: {acc_text}, but {names(found)} find the capability still there (score {score:+.2f})"
        return "wrapper", score, [head, *detail]
    if gone and not found and score <= -0.1:
        head = f"capability change: {acc_text}, and {names(gone)} find it gone (score {score:+.2f})"
        return "capability_change", score, [head, *detail]
    if found and strong_gone:
        why = f"the functional evidence disagrees: {names(found)} find the capability, {names(strong_gone)} do not"
    elif found or gone:
        why = f"the evidence leans {'towards a wrapper' if score > 0 else 'towards a change'} but not enough (score {score:+.2f})"
    else:
        why = f"no functional analyzer found the capability or its loss clearly (score {score:+.2f})"
    return "inconclusive", score, [f"inconclusive: {acc_text}; {why}", *detail]


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
) -> Diagnosis:
    """Run ``analyzers`` (default: :func:`default_analyzers`) on the pair and weigh their evidence.

    Args:
        base: the model before fine-tuning.
        tuned: the fine-tuned model (same architecture and shape).
        capability: the task the base model could do (whose fate is in question).
        downstream: the fine-tuning task.
        analyzers: any subset, in any order; names must be unique.
        store: the fine-tuning run's :class:`~capwrap.recording.RunStore`, for analyzers that use it.
        eval_size: sequences for the accuracies the verdict cites.
        seed: seed of those sequences.
        progress: show which analyzer runs.

    Raises:
        ConfigError: the pair differs in shape, the tasks do not fit, the store is another model's,
            analyzers repeat a name, or the list is empty.
    """
    pair = ModelPair(base, tuned)
    pair.check_tasks(capability, downstream)
    analyzers = list(default_analyzers() if analyzers is None else analyzers)
    if not analyzers:
        raise ConfigError("no analyzers given; pass at least one (see capwrap.diagnosis.default_analyzers())")
    names = [a.name for a in analyzers]
    if len(set(names)) != len(names):
        raise ConfigError(f"analyzer names repeat ({names}); give each analyzer a distinct name=")
    if eval_size <= 0:
        raise ConfigError(f"eval_size must be positive, got {eval_size}")
    batches = {
        "capability": capability.sample(eval_size, seed=seed + 77),
        "downstream": downstream.sample(eval_size, seed=seed + 78),
    }
    acc = {which: {k: accuracy(m, b) for k, b in batches.items()} for which, m in (("base", base), ("tuned", tuned))}
    evidence, seconds = [], {}
    bar = tqdm(analyzers, desc="diagnose", disable=not progress, leave=False)
    for analyzer in bar:
        bar.set_postfix_str(analyzer.name)
        t0 = time.perf_counter()
        evidence.append(analyzer(pair, capability, downstream, store))
        seconds[analyzer.name] = round(time.perf_counter() - t0, 2)
    verdict, score, reasons = weigh(evidence, acc, getattr(capability, "capability_floor", 0.5))
    tasks = {"capability": capability.describe(), "downstream": downstream.describe()}
    return Diagnosis(verdict, score if not math.isnan(score) else 0.0, reasons, evidence, acc, tasks, seconds)


def check_same_tokenizer(base: CapModel, tuned: CapModel) -> None:
    """Raise if the two models carry tokenizers with different vocabularies."""
    a, b = base.tokenizer, tuned.tokenizer
    if a is None or b is None:
        return
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        differ = len(set(va.items()) ^ set(vb.items()))
        raise ConfigError(
            f"the base and tuned models use different tokenizers ({len(va)} vs {len(vb)} tokens, {differ} entries differ); "
            "a pair must share its tokenizer (was one of them fine-tuned from the other?)"
        )


def diagnose_checkpoints(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    capability: str,
    downstream: str,
    out: str | os.PathLike | None = None,
    backend: str | None = None,
    quick: bool = False,
    store: str | os.PathLike | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Diagnosis:
    """:func:`diagnose` for two checkpoints (folders or hub names) and task specs
    (:func:`~capwrap.tasks.spec.task_from_spec`); writes ``summary.json`` and ``report.html`` to ``out``.

    This is what ``capwrap diagnose BASE TUNED --capability SPEC --downstream SPEC --out DIR`` runs.

    Raises:
        CheckpointError: a checkpoint is missing, corrupt, pickle-only (without ``allow_pickle``) or
            on an unreachable hub.
        ConfigError: the pair differs in architecture, shape or tokenizer; a spec is invalid; a text
            dataset has no example of the feature.
    """
    from pathlib import Path

    from capwrap.models import load_model
    from capwrap.tasks.spec import task_from_spec

    started = time.perf_counter()
    if out is not None:
        check_output_folder(out)
    base_model = load_model(base, backend=backend, allow_pickle=allow_pickle)
    tuned_model = load_model(tuned, backend=backend, allow_pickle=allow_pickle)
    ModelPair(base_model, tuned_model)
    check_same_tokenizer(base_model, tuned_model)
    tokenizer = base_model.tokenizer or tuned_model.tokenizer
    cap_task = task_from_spec(capability, tokenizer)
    down_task = task_from_spec(downstream, tokenizer)
    run = RunStore.open(store) if store is not None else None
    analyzers = default_analyzers(quick=quick)
    diagnosis = diagnose(base_model, tuned_model, cap_task, down_task, analyzers=analyzers, store=run, seed=seed,
                         progress=progress)  # fmt: skip
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        provenance = run_provenance(
            models={"base": base_model, "tuned": tuned_model}, seeds={"seed": seed}, started=started,
            call=describe_call("capwrap.diagnosis.diagnose_checkpoints", base=str(base), tuned=str(tuned),
                               capability=capability, downstream=downstream, quick=quick, seed=seed),
        )  # fmt: skip
        summary = {
            "base": str(base), "tuned": str(tuned), "capability_spec": capability, "downstream_spec": downstream,
            "spec": base_model.spec.to_dict(), "backend": base_model.backend, "quick": quick, "seed": seed,
            **diagnosis.to_dict(), "wall_seconds": round(time.perf_counter() - started, 2), "provenance": provenance,
        }  # fmt: skip
        write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2, default=_json_default))
        diagnosis.to_html(
            folder / "report.html", title=f"capwrap diagnosis: {Path(str(tuned)).name} vs {Path(str(base)).name}",
            provenance=provenance,
        )  # fmt: skip
    return diagnosis
