"""Revival: how fast does reverse fine-tuning bring the capability back, compared with a model that
never had it?

The tuned model is fine-tuned back on the capability task, with its accuracy checked after every one
of the first ten steps and every ten steps after that on the diagnosis's evaluation sequences until it reaches a threshold (default: 90% of the base
model's accuracy on the same sequences). The same loop runs from a *control* that never had the
capability — by default a freshly initialized model of the same shape trained on the downstream task
alone for the fine-tuning's budget, or a model you pass. If fine-tuning only wrapped the capability,
the tuned model revives many times faster than the control learns it (the paper: 100–1K steps
against ~4.5K). Both loops run for several training seeds.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> model = build_model(spec, seed=0)
    >>> revival = Revival(max_steps=4, eval_every=2, check_size=32, control_steps=2, seeds=1)
    >>> ev = revival(ModelPair(model, build_model(spec, seed=1)), task, task, eval_size=32)
    >>> sorted(set(ev.table["model"]))
    ['control', 'tuned']
    >>> revival(ModelPair(model, model.clone()), task, task, eval_size=32).summary.endswith("nothing to revive")
    True
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from capwrap.analyzers.base import Analyzer, Context, Evidence, Kind, ModelPair, correctness
from capwrap.analyzers.controls import never_had_it
from capwrap.errors import ConfigError
from capwrap.files import write_bytes_atomic
from capwrap.models import CapModel
from capwrap.tasks.base import Task, TaskBatch
from capwrap.training import StepInfo, StopTraining, TrainConfig, train

__all__ = ["Revival", "steps_to_threshold", "first_reaching"]


def steps_to_threshold(
    model: CapModel, task: Task, batch: TaskBatch, threshold: float, config: TrainConfig, eval_every: int,
    progress: str | None = None, dense_until: int = 0,
) -> tuple[float, pd.DataFrame, Bool[Tensor, "check n"]]:  # fmt: skip
    """Train ``model`` on ``task`` until its accuracy on ``batch`` reaches ``threshold`` (checked at
    step 0, after every step up to ``dense_until``, then every ``eval_every`` steps, and at the
    budget's end). ``progress``: the label of a progress bar over the steps (none when ``None``; kept
    apart from ``config``, which keys kept runs).

    Returns:
        The first step that reached it (NaN if none within ``config.steps``), the curve
        (``step``, ``accuracy``), and the per-sequence correctness at each check (for bootstrap).
    """
    checks = [correctness(model, batch)]
    steps = [0]
    if float(checks[0].float().mean()) < threshold:

        def check(info: StepInfo) -> None:
            if is_check(info.step, eval_every, dense_until) or info.step == config.steps:
                checks.append(correctness(model, batch))
                steps.append(info.step)
                if float(checks[-1].float().mean()) >= threshold:
                    raise StopTraining

        with tqdm(total=config.steps, desc=progress, disable=progress is None, leave=False) as bar:
            train(model, task, config, callbacks=[lambda info: bar.update(), check], description="revive")
    correct = torch.stack(checks)
    acc = correct.float().mean(1)
    reached = (acc >= threshold).nonzero()
    first = float(steps[int(reached[0])]) if len(reached) else math.nan
    return first, pd.DataFrame({"step": steps, "accuracy": acc.tolist()}), correct


def is_check(step: int, eval_every: int, dense_until: int) -> bool:
    """Whether revival checks the accuracy after reverse fine-tuning step ``step``: after every step
    up to ``dense_until``, then every ``eval_every`` steps."""
    return step <= dense_until or step % eval_every == 0


def next_check(step: int, eval_every: int, dense_until: int) -> int:
    """The first step after ``step`` at which revival checks (:func:`is_check`)."""
    return step + 1 if step < dense_until else (step // eval_every + 1) * eval_every


@contextmanager
def _trainable_scratch(pair: ModelPair, model: CapModel) -> Iterator[CapModel]:
    """A copy of ``model`` to train (:meth:`ModelPair.scratch`); for a model held in lower precision
    (bfloat16), a float32 copy — training refuses low-precision weights, whose small updates would be
    lost — made straight from it (with a residency, from the resident model, left unchanged)."""
    if model.dtype in (torch.float32, torch.float64):
        with pair.scratch(model) as work:
            yield work
    elif pair.residency is None:
        yield model.clone(dtype=torch.float32)
    else:
        with pair.scratch(model) as resident:
            yield resident.clone(dtype=torch.float32)


def first_reaching(curves: Tensor, steps: Tensor, thresholds: Tensor, censored: float) -> Tensor:
    """For each row of ``curves`` (``[replicate, check]`` accuracies at ``steps``), the first step whose
    accuracy reaches that row's threshold, or ``censored`` if none."""
    hit = curves >= thresholds[:, None]
    first = torch.where(hit.any(1), steps[hit.int().argmax(1)].float(), torch.tensor(float(censored)))
    return first


@dataclass
class Revival(Analyzer):
    """Reverse fine-tuning of the tuned model against a control that never had the capability.

    Statistic ``revival_speedup_log2``: log2 of how many times faster the tuned model gets back to
    the threshold than the control learns it, ``log2(steps_control / steps_tuned)``, medians over
    seeds. A run that does not get there within ``max_steps`` counts as ``2 * max_steps`` (so the
    statistic is a bound). Large: the capability was hidden (a wrapper); near 0 or below: it has to
    be learned anew. The interval resamples the evaluation sequences and the seeds.

    Args:
        max_steps: budget of reverse fine-tuning steps.
        lr: reverse fine-tuning learning rate (the paper uses a smaller one than pretraining), held
            constant (no warmup, no decay), so the steps a run takes to reach the threshold do not
            depend on ``max_steps``, which only bounds them.
        batch_size: sequences per step.
        eval_every: after the first ``dense_until`` steps, check the accuracy every this many steps.
        dense_until: check the accuracy after every one of the first this many steps (a wrapped
            capability can be back after one or two, which checks every ``eval_every`` steps would
            read as ``eval_every``; 0: every ``eval_every`` steps from the start). Checks do not
            change the training, only where a run is seen to reach the threshold.
        check_size: the first this many sequences of the evaluation set are the checks' sequences.
        threshold_fraction: revival = this share of the base model's accuracy on them.
        control: a model that never had the capability; default: one built and trained here.
        control_steps: steps the default control trains on the downstream task (the fine-tuning budget).
        seeds: training seeds (each reverse fine-tunes both models with other data).
        cache: a folder where the control's reverse fine-tuning runs are kept, keyed by everything
            that makes them (the control's weights, the task, the sequences, the threshold, the
            training settings), so diagnoses that share a control (a suite's scenarios) run it once.
        low_memory: train (the reverse fine-tuning and the default control) as
            :meth:`~capwrap.TrainConfig.low_memory` does — Adafactor stepped inside the backward
            pass and the blocks recomputed in it, so no gradient, optimizer state or activations
            the size of the model are held and training takes about one model's memory — instead of AdamW with gradient clipping (the default,
            which holds three models' worth besides the weights). Step counts differ somewhat
            between the two optimizers; both models of a comparison train alike.
    """

    max_steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 96
    eval_every: int = 10
    dense_until: int = 10
    check_size: int = 256
    threshold_fraction: float = 0.9
    control: CapModel | None = field(default=None, repr=False)
    control_steps: int = 300
    seeds: int = 2
    cache: str | None = None
    low_memory: bool = False
    name: str = "revival"
    kind: ClassVar[Kind] = "functional"
    statistic: ClassVar[str | None] = "revival_speedup_log2"

    def __post_init__(self) -> None:
        for attr in ("max_steps", "batch_size", "eval_every", "check_size", "control_steps", "seeds"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"Revival.{attr} must be positive, got {getattr(self, attr)}")
        if self.dense_until < 0:
            raise ConfigError(f"Revival.dense_until must not be negative (0: no dense checks), got {self.dense_until}")
        if not 0 < self.threshold_fraction <= 1:
            raise ConfigError(f"threshold_fraction must be in (0, 1], got {self.threshold_fraction}")

    def analyze(self, context: Context) -> Evidence:
        pair, capability = context.pair, context.capability
        if self.control is not None:
            ModelPair(pair.base, self.control, roles=("base", "control"))  # same shape, or a clear error
        if pair.tuned.cannot_train:
            return Evidence(self.name, {}, pd.DataFrame(columns=["step", "accuracy", "model", "seed"]),
                            summary=f"reverse fine-tuning not run: {pair.tuned.cannot_train}")  # fmt: skip
        batch = context.eval.batches["capability"][: self.check_size]
        base_correct = context.eval.correct["base"]["capability"][: self.check_size].float()
        threshold = self.threshold_fraction * float(base_correct.mean())
        tuned_now = float(context.eval.correct["tuned"]["capability"][: self.check_size].float().mean())
        if tuned_now >= threshold:  # reverse fine-tuning would stop before its first step
            headline = {"threshold": threshold, "capability_accuracy_tuned": tuned_now, "steps_tuned": 0.0,
                        "budget": float(self.max_steps)}  # fmt: skip
            return Evidence(self.name, headline, pd.DataFrame(columns=["step", "accuracy", "model", "seed"]),
                            summary=f"the tuned model already answers {tuned_now:.0%} of the check sequences, at or "
                                    f"above the threshold ({threshold:.0%}: {self.threshold_fraction:.0%} of the base's "
                                    f"{float(base_correct.mean()):.0%}): there is nothing to revive")  # fmt: skip
        # a constant rate (the paper's recovery runs use one): the step at which a run reaches the
        # threshold is then the model's, not the budget's (a cosine over ``max_steps`` slows every
        # run of a smaller budget, and at the suite's 200 steps no never-had-it control relearned)
        configs = [TrainConfig(steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, warmup=0.0, min_lr_ratio=1.0,
                               seed=context.seed_for(self.name, f"reverse fine-tuning {s}"), progress=False)
                   for s in range(self.seeds)]  # fmt: skip
        configs = [c.low_memory() for c in configs] if self.low_memory else configs
        runs: dict[str, list[tuple[float, pd.DataFrame, Tensor]]] = {"tuned": [], "control": []}
        for config in configs:
            with _trainable_scratch(pair, pair.tuned) as work:
                label = f"revival: reverse fine-tuning the tuned model (seed {len(runs['tuned'])})"
                runs["tuned"].append(steps_to_threshold(work, capability, batch, threshold, config, self.eval_every,
                                                        label if context.progress else None, self.dense_until))  # fmt: skip
        control = self.control if self.control is not None else self._make_control(context)
        pair.adopt(control)  # (with a residency: it takes turns with the pair)
        for config in configs:
            label = f"revival: reverse fine-tuning the never-had-it control (seed {len(runs['control'])})"
            runs["control"].append(self._control_run(pair, control, capability, batch, threshold, config,
                                                     label if context.progress else None))  # fmt: skip
        if self.control is None and pair.residency is not None:
            pair.residency.remove(control, restore=False)  # made here and discarded: not read back
        censored = 2.0 * self.max_steps
        steps = {w: [r[0] if math.isfinite(r[0]) else censored for r in rs] for w, rs in runs.items()}
        value = math.log2(max(float(np.median(steps["control"])), 1.0) / max(float(np.median(steps["tuned"])), 1.0))
        reps = self._replicates(context, runs, base_correct, censored)
        table = pd.concat(
            [r[1].assign(model=w, seed=s) for w, rs in runs.items() for s, r in enumerate(rs)], ignore_index=True
        )
        med = {w: float(np.median([r[0] for r in rs])) if all(math.isfinite(r[0]) for r in rs) else math.nan
               for w, rs in runs.items()}  # fmt: skip
        headline = {
            "threshold": threshold, "steps_tuned": med["tuned"], "steps_control": med["control"],
            "control_over_tuned": 2.0**value, "revival_speedup_log2": value, "budget": float(self.max_steps),
            "seeds": float(self.seeds),
        }  # fmt: skip
        intervals = {"revival_speedup_log2": context.interval(reps),
                     "threshold": context.interval(self.threshold_fraction * base_correct[context.resample(len(base_correct), self.name)].mean(1).numpy()),
                     "control_over_tuned": context.interval(2.0**reps)}  # fmt: skip
        text = {w: (f"{med[w]:.0f} steps" if math.isfinite(med[w]) else f"more than {self.max_steps} steps")
                for w in med}  # fmt: skip
        summary = (f"reverse fine-tuning brings the capability back to {threshold:.0%} in {text['tuned']} for the "
                   f"tuned model and {text['control']} for a model that never had it "
                   f"({2.0**value:.1f}x; {f'median of {self.seeds} seeds' if self.seeds > 1 else 'one seed'})")  # fmt: skip
        first_check = next_check(0, self.eval_every, self.dense_until)
        if med["tuned"] == first_check and first_check > 1:  # it came back by the first check
            summary += (f"; the capability is first checked after {first_check} steps, so the tuned model may need "
                        "fewer and the speed-up is a lower bound")  # fmt: skip
        return Evidence(self.name, headline, table, plot=_plot, value=value, replicates=reps, intervals=intervals,
                        summary=summary)  # fmt: skip

    def _control_run(self, pair: ModelPair, control: CapModel, capability: Task, batch: TaskBatch, threshold: float,
                     config: TrainConfig, progress: str | None = None) -> tuple[float, pd.DataFrame, Tensor]:  # fmt: skip
        """The control's run, from :attr:`cache` when it was made before."""

        def run() -> tuple[float, pd.DataFrame, Tensor]:
            with _trainable_scratch(pair, control) as work:
                return steps_to_threshold(work, capability, batch, threshold, config, self.eval_every, progress,
                                          self.dense_until)  # fmt: skip

        if self.cache is None:
            return run()
        key = _fingerprint(control, capability, batch, threshold, config, self.eval_every, self.dense_until)
        path = Path(self.cache) / f"revival-control-{key}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            return (
                float(saved["first"]),
                pd.DataFrame({"step": saved["steps"].tolist(), "accuracy": saved["accuracy"].tolist()}),
                saved["correct"],
            )
        first, curve, correct = run()
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"first": torch.tensor(first), "steps": torch.tensor(curve["step"].to_numpy()),
                    "accuracy": torch.tensor(curve["accuracy"].to_numpy()), "correct": correct}, buffer)  # fmt: skip
        write_bytes_atomic(path, buffer.getvalue())
        return first, curve, correct

    def _replicates(self, context: Context, runs: dict, base_correct: Tensor, censored: float) -> np.ndarray:
        """Bootstrap replicates: replicate b uses seed ``b % seeds`` and a resample of the check sequences.

        A run stops at the first check that reaches the threshold, so a resample in which that check
        falls short has no later check: it is counted at the next check's step, the earliest it could
        reach the threshold (a lower bound; not ``censored``, never within the budget, which a run
        that stopped at the threshold with budget left does not show)."""
        idx = context.resample(len(base_correct), self.name)  # [n_boot, n]
        thresholds = self.threshold_fraction * base_correct[idx].mean(1)
        firsts = {}
        for which, rs in runs.items():
            per_seed = []
            for first, curve, correct in rs:
                curves = correct.float()[:, idx].mean(-1).T  # [n_boot, check]
                last = int(curve["step"].iloc[-1])
                stopped = math.isfinite(first) and last < self.max_steps  # stopped at the threshold, budget left
                after = float(min(next_check(last, self.eval_every, self.dense_until), self.max_steps)) if stopped else censored
                per_seed.append(first_reaching(curves, torch.tensor(curve["step"].to_numpy()), thresholds, after))
            seed_of = torch.arange(len(idx)) % len(rs)
            firsts[which] = torch.stack(per_seed)[seed_of, torch.arange(len(idx))]
        return torch.log2(firsts["control"].clamp_min(1.0) / firsts["tuned"].clamp_min(1.0)).numpy()

    def _make_control(self, context: Context) -> CapModel:
        """A model of the same shape that never saw the capability task: trained on the downstream task only."""
        seed = context.seed_for(self.name, "control")
        context.pair.make_room()  # (with a residency: trained when neither model of the pair is in memory)
        return never_had_it(context.pair.base, context.downstream, self.control_steps, seed, self.batch_size,
                            low_memory=self.low_memory)  # fmt: skip


def _fingerprint(control: CapModel, task: Task, batch: TaskBatch, threshold: float, config: TrainConfig,
                 eval_every: int, dense_until: int) -> str:  # fmt: skip
    """A hash of everything that makes a control's reverse fine-tuning run."""
    digest = hashlib.sha256()
    for name, weight in sorted(control.weights().items()):
        digest.update(name.encode())
        digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(batch.tokens.numpy().tobytes())
    meta = [task.describe(), round(threshold, 9), config.identity(), eval_every]
    meta += [dense_until] if dense_until else []  # (keys of runs made before dense checks unchanged)
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _plot(evidence: Evidence):
    import plotly.graph_objects as go

    from capwrap.report import error_bars

    fig = go.Figure()
    for (model, seed), part in evidence.table.groupby(["model", "seed"]):
        fig.add_trace(go.Scatter(x=part["step"], y=part["accuracy"], mode="lines+markers", name=f"{model} model (seed {seed})",
                                 error_y=error_bars(part, "accuracy")))  # fmt: skip
    fig.add_hline(y=evidence.headline["threshold"], line_dash="dot", annotation_text="revival threshold")
    fig.update_layout(height=360, xaxis_title="reverse fine-tuning step", yaxis=dict(title="capability accuracy", tickformat=".0%", range=[0, 1.02]),
                      title=f"revival: {evidence.direction} ({evidence.strength:.2f})")  # fmt: skip
    return fig
