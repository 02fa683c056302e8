"""Linear probes: does the model still represent the capability's latent variable?

A probe is a multinomial logistic regression from the activation at one hook and position to a
latent label (e.g. ``count_a``), trained on one part of a batch and scored on held-out sequences.
:func:`fit_probes` trains many probes at once — every layer, and every recorded step of a
:class:`~capwrap.recording.RunStore` — as one batched problem (one ``einsum`` per optimizer step for
all of them), which is what makes per-step probing affordable.

The paper's finding: after fine-tuning with a small learning rate, probes still read the count of
``a`` from the tuned model even where its output no longer counts ``a`` — the capability is intact
underneath a wrapper.

Examples:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> labels = torch.randint(0, 3, (400,), generator=g)
    >>> signal = torch.nn.functional.one_hot(labels, 8).float() * 3 + torch.randn(400, 8, generator=g)
    >>> noise = torch.randn(400, 8, generator=g)
    >>> result = fit_probes(torch.stack([signal, noise]), labels, seed=0)
    >>> [round(a, 1) for a in result.test_accuracy.tolist()]  # the first "layer" encodes the label
    [1.0, 0.3]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from capwrap.analyzers.base import Analyzer, Context, Evidence, Kind, ModelPair, Question
from capwrap.analyzers.controls import untrained_like
from capwrap.errors import ConfigError
from capwrap.models import CapModel
from capwrap.recording import RunStore
from capwrap.recording.recorder import load_probe
from capwrap.tasks.base import Task, TaskBatch

__all__ = ["NewLatentProbing", "ProbeResult", "fit_probes", "Probing", "probe_features"]


@dataclass
class ProbeResult:
    """Accuracies of a batch of probes (one per leading index of the features).

    Attributes:
        train_accuracy: per probe, on the training split.
        test_accuracy: per probe, on the held-out split.
        n_classes: distinct labels.
        majority_baseline: the held-out share of the most frequent label.
        test_correct: per probe and held-out sequence, whether the probe was right (for bootstrap
            intervals over the held-out sequences).
    """

    train_accuracy: Float[Tensor, " probe"]
    test_accuracy: Float[Tensor, " probe"]
    n_classes: int
    majority_baseline: float
    test_correct: Bool[Tensor, "probe n_test"] | None = None


def fit_probes(
    features: Float[Tensor, "probe n d"],
    labels: Int[Tensor, " n"],
    test_fraction: float = 0.25,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> ProbeResult:
    """Train one logistic-regression probe per leading index of ``features``, all at once.

    Features are standardized per probe (with training statistics), then every probe is trained
    with full-batch Adam on the same train split and scored on the held-out split. The fit runs on
    ``features``' device (on a GPU every probe of one problem trains in the same batched products).

    Args:
        features: ``[probe, n, d]`` activations (probe = layer, or layer x step).
        labels: ``[n]`` integer labels shared by all probes.
        test_fraction: share of sequences held out for scoring.
        steps: optimizer steps.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the probe weights.
        seed: seed of the train/test split.

    Raises:
        ConfigError: the labels have a single class, sizes disagree, or the split is empty.
    """
    if features.ndim != 3 or labels.ndim != 1 or features.shape[1] != labels.shape[0]:
        raise ConfigError(
            f"features must be [probe, n, d] and labels [n]; got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    classes, labels = torch.unique(labels.to(features.device), return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(
            f"the probe label has a single class ({classes.tolist()}): there is nothing to predict; choose another label or more varied data"
        )
    n = labels.shape[0]
    n_test = int(round(test_fraction * n))
    if not 0 < n_test < n:
        raise ConfigError(f"test_fraction={test_fraction} leaves an empty train or test split for {n} sequences")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(features.device)
    test, train = order[:n_test], order[n_test:]
    x = features.detach().float()
    mean = x[:, train].mean(1, keepdim=True)
    std = x[:, train].std(1, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    n_probe, _, d = x.shape
    c = len(classes)
    weight, bias = _adam_softmax_regression(x[:, train], labels[train], c, steps, lr, weight_decay)
    pred = torch.baddbmm(bias, x, weight).argmax(-1)
    correct = pred == labels
    majority = float(torch.bincount(labels[test]).max()) / n_test
    return ProbeResult(
        correct[:, train].float().mean(1), correct[:, test].float().mean(1), c, majority, correct[:, test]
    )


@torch.no_grad()
def _adam_softmax_regression(
    x: Float[Tensor, "probe n d"], y: Int[Tensor, " n"], n_classes: int, steps: int, lr: float, weight_decay: float
) -> tuple[Float[Tensor, "probe d c"], Float[Tensor, "probe 1 c"]]:
    """Full-batch Adam on the mean cross-entropy (+ L2 on the weights) of every probe at once.

    The gradient is written out (softmax minus one-hot, then one batched product with the
    features), which is what autograd would compute, without its graph; Adam is PyTorch's update
    (betas 0.9/0.999, eps 1e-8, bias-corrected), applied in place to all probes.
    """
    n_probe, n, d = x.shape
    x_t = x.transpose(1, 2).contiguous()  # [probe, d, n] for the weight gradient
    onehot = torch.nn.functional.one_hot(y, n_classes).to(x.dtype)  # [n, c], shared by all probes
    weight = x.new_zeros(n_probe, d, n_classes)
    bias = x.new_zeros(n_probe, 1, n_classes)
    params = (weight, bias)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        err = torch.baddbmm(bias, x, weight).softmax(-1).sub_(onehot).div_(n)  # d loss / d logits, [probe, n, c]
        grads = (torch.bmm(x_t, err).add_(weight, alpha=2 * weight_decay), err.sum(1, keepdim=True))
        c1, c2 = 1 - beta1**step, 1 - beta2**step
        for p, g, m_, v_ in zip(params, grads, m, v, strict=True):
            m_.mul_(beta1).add_(g, alpha=1 - beta1)
            v_.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(m_, v_.div(c2).sqrt_().add_(eps), value=-lr / c1)
    return weight, bias


def probe_features(
    model: CapModel, batch: TaskBatch, hooks: str, position: str | int = "answer"
) -> tuple[list[str], Tensor]:
    """Activations ``[hook, n, d]`` of ``model`` on ``batch`` at one position per sequence
    (``"answer"``: each sequence's answer position; an int: that position)."""
    pos = _positions(batch, position).to(model.device)

    n_pos = batch.tokens.shape[1]

    def at_position(name: str, act: Tensor, rows: slice) -> Tensor:  # each pass keeps one position per sequence
        if act.ndim < 3 or act.shape[1] != n_pos or name.endswith(("hook_pattern", "hook_attn_scores")):
            raise ConfigError(
                f"probes read one position's activation per sequence, [batch, pos, ...]; {name} is "
                f"{list(act.shape)}{' (attention: [batch, head, query, key])' if 'attn' in name else ''}. Probe "
                "a residual stream or a layer's output, e.g. hooks='blocks.*.hook_resid_post'"
            )
        return act[torch.arange(act.shape[0], device=act.device), pos[rows]].flatten(1).float().cpu()

    acts = model.capture(batch.tokens.to(model.device), hooks, batch_size=256, reduce=at_position)
    return list(acts), torch.stack(list(acts.values()))


def _positions(batch: TaskBatch, position: str | int) -> Tensor:
    if position == "answer":
        return batch.answer_pos.cpu()
    if isinstance(position, int):
        if not -batch.tokens.shape[1] <= position < batch.tokens.shape[1]:
            raise ConfigError(f"position {position} is outside the sequences of length {batch.tokens.shape[1]}")
        return torch.full((len(batch),), position % batch.tokens.shape[1])
    raise ConfigError(f"position must be 'answer' or an int, got {position!r}")


#: The input embeddings ``Probing(embeddings="base")`` takes from the base (token and, where the
#: model has one, learned position embedding).
_INPUT_EMBEDDINGS = frozenset({"embed.W_E", "pos_embed.W_pos"})


@dataclass
class _Probed:
    """What :meth:`Probing._probe_models` found: probes on every model's activations."""

    label: str
    task: Task
    fit: ProbeResult
    labels_used: int
    table: pd.DataFrame
    reps: dict[str, np.ndarray]
    best: dict[str, float]

    def __iter__(self):  # unpacks like a tuple, without copying (dataclasses.astuple deep-copies)
        return (getattr(self, f.name) for f in fields(self))


@dataclass
class Probing(Analyzer):
    """Linear probes per layer for the capability's latent label, base vs tuned (and per recorded
    step when the context has a run store).

    Statistic ``probe_kept_share``: the share of the base's probe accuracy above the floor that the
    tuned model keeps, ``(tuned − floor) / (base − floor)``, for the best layer of each model. The
    floor is the higher of the majority class and what probes read from a freshly initialized model
    of the same shape (token counts are often linear in random features of the input). Near 1: the
    capability is still represented (a wrapper hides it); near 0: the representation is gone. Not
    applicable when the base's probes beat the floor by less than ``min_margin``. The interval
    resamples the held-out probe sequences.

    Args:
        label: the latent label to probe (a key of the task's ``labels``); default: the capability
            task's ``probe_label``.
        task: the task whose sequences are probed; default: the capability task's ``probe_task()``.
        hooks: hook pattern whose activations are probed.
        position: ``"answer"`` or a fixed position.
        n: sequences sampled (train + test) for every model.
        steps: probe optimizer steps.
        min_margin: the base's probes must beat the floor by this much for the statistic to apply.
        embeddings: ``"tuned"``: probe the tuned model as it is; ``"base"``: probe the tuned model's
            layers fed through the base's input embeddings (token and position), so that a
            fine-tune that only rewrote what some tokens mean — a change confined to the embedding
            lookup — does not read as a lost latent; the floor's fresh model then reads the input
            through the base's embeddings too. The default, ``"base"``, is the setting the shipped
            verdict rule was fitted with (both settings are measured on the suite's models in
            ``benchmarks/probing_embeddings.py``).
    """

    label: str | None = None
    task: Task | None = field(default=None, repr=False)
    hooks: str = "blocks.*.hook_resid_post"
    position: str | int = "answer"
    n: int = 2048
    steps: int = 300
    min_margin: float = 0.1
    embeddings: Literal["tuned", "base"] = "base"
    name: str = "probing"
    kind: ClassVar[Kind] = "functional"
    statistic: ClassVar[str | None] = "probe_kept_share"

    def __post_init__(self) -> None:
        if self.embeddings not in ("tuned", "base"):
            raise ConfigError(f"{type(self).__name__}.embeddings must be 'tuned' or 'base', got {self.embeddings!r}")

    def _resolve(self, context: Context) -> tuple[str | None, Task]:
        capability = context.capability
        return self.label or capability.probe_label, self.task or capability.probe_task()

    def _probe_models(self, context: Context) -> _Probed | Evidence:
        """Probes fitted on every model's activations, or neutral evidence if the task has no latent."""
        label, task = self._resolve(context)
        if label is None:
            return Evidence(
                self.name, {}, pd.DataFrame(), summary=f"the task {task.name!r} has no latent label to probe"
            )
        fitted = self._fit(context, task, label)
        if fitted is None:
            return Evidence(self.name, {}, pd.DataFrame(), summary=(
                f"{label} takes one value on every sequence of {task.name!r}: nothing for a probe to tell apart"))
        fit, names, models, labels_used = fitted
        acc = dict(zip(models, fit.test_accuracy.split(len(names)), strict=True))
        table = pd.DataFrame(
            [(which, name, float(a)) for which in models for name, a in zip(names, acc[which], strict=True)],
            columns=["model", "hook", "probe_accuracy"],
        )
        reps = self._best_replicates(context, fit, len(names), list(models))
        best = {which: float(acc[which].max()) for which in models}
        return _Probed(label, task, fit, labels_used, table, reps, best)

    def analyze(self, context: Context) -> Evidence:
        probed = self._probe_models(context)
        if isinstance(probed, Evidence):
            return probed
        label, _, fit, labels_used, table, reps, best = probed
        floor = max(fit.majority_baseline, best.get("untrained", 0.0))
        floor_reps = np.maximum(fit.majority_baseline, reps.get("untrained", np.zeros(context.n_boot)))
        margin = best["base"] - floor
        kept = (best["tuned"] - floor) / margin if margin >= self.min_margin else math.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            kept_reps = (reps["tuned"] - floor_reps) / (reps["base"] - floor_reps)
        headline = {
            "probe_best_base": best["base"], "probe_best_tuned": best["tuned"],
            "probe_best_untrained": best.get("untrained", math.nan), "majority_baseline": fit.majority_baseline,
            "probe_kept_share": kept,
            "capability_accuracy_base": context.eval.accuracy("base", "capability"),
            "capability_accuracy_tuned": context.eval.accuracy("tuned", "capability"),
        }  # fmt: skip
        intervals = {f"probe_best_{w}": context.interval(r) for w, r in reps.items()}
        intervals["probe_kept_share"] = context.interval(kept_reps)
        for which in ("base", "tuned"):
            intervals[f"capability_accuracy_{which}"] = context.interval(
                context.accuracy_replicates(which, "capability")
            )
        details: dict = {"labels": labels_used}
        store = context.store
        if store is not None and label in load_probe(store).labels:
            per_step = self.over_run(store, label)
            details["per_step"] = per_step.to_dict(orient="records")
            headline["probe_best_last_step"] = float(
                per_step[per_step["step"] == per_step["step"].max()]["probe_accuracy"].max()
            )
        if margin < self.min_margin:
            summary = (f"even the base model's probes read {label} barely above the floor ({best['base']:.0%} vs "
                       f"{floor:.0%}: majority class {fit.majority_baseline:.0%}, untrained model "
                       f"{best.get('untrained', math.nan):.0%}), so probes cannot tell")  # fmt: skip
        else:
            through = " (through the base's embeddings)" if self.embeddings == "base" else ""
            summary = (f"probes read {label} from the tuned model{through} at {best['tuned']:.0%} against the base's "
                       f"{best['base']:.0%} (floor {floor:.0%}): it keeps {kept:.0%} of the base's margin")  # fmt: skip
        return Evidence(self.name, headline, table, details=details, plot=_plot, value=kept, replicates=kept_reps,
                        intervals=intervals, summary=summary)  # fmt: skip

    def _fit(
        self, context: Context, task: Task, label: str
    ) -> tuple[ProbeResult, list[str], dict[str, Tensor], int] | None:
        """Probes for ``label`` on ``task``'s sequences, from base, tuned and an untrained model, in one
        solve; returns the fit, the hooks, each model's features (in the fit's order) and the sample size
        (``None`` when the label takes one value on every sequence)."""
        pair = context.pair
        pair.check_tasks(task)
        batch = task.sample(self.n, seed=context.seed_for(self.name, "probe data"))
        if label not in batch.labels:
            raise ConfigError(f"the task {task.name!r} has no latent label {label!r}; it has {sorted(batch.labels)}")
        if batch.labels[label].unique().numel() < 2:
            return None
        # A freshly initialized model of the same shape is the floor: what probes read from random
        # features of the input alone.
        # With embeddings="base", the tuned model and the floor's fresh model both read the input
        # through the base's embeddings: the floor is then what the base's embeddings alone give
        # (trained token embeddings make counts linear in the features of random layers).
        feats = {}
        for which, model in pair.models().items():
            if which == "tuned" and self.embeddings == "base":
                with pair.scratch(model) as work:
                    self._use_base_embeddings(pair, work)
                    names, feats[which] = probe_features(work, batch, self.hooks, self.position)
            else:
                names, feats[which] = probe_features(model, batch, self.hooks, self.position)
        pair.make_room()  # (with a residency: built when neither model of the pair is in memory)
        untrained = untrained_like(pair.base, seed=context.seed_for(self.name, "untrained model"))
        if self.embeddings == "base":
            self._use_base_embeddings(pair, untrained)
        names, feats["untrained"] = probe_features(untrained, batch, self.hooks, self.position)
        del untrained
        fit = fit_probes(torch.cat(list(feats.values())), batch.labels[label], steps=self.steps,
                         seed=context.seed_for(self.name, "split"))  # fmt: skip
        return fit, names, feats, len(batch)

    @staticmethod
    def _use_base_embeddings(pair: ModelPair, model: CapModel) -> None:
        """Overwrite ``model``'s input embeddings with the base's (``model`` is a scratch copy)."""
        weights = model.weights()
        with torch.no_grad():
            for key in _INPUT_EMBEDDINGS.intersection(weights):
                weights[key].copy_(pair.weight(pair.base, key).to(weights[key]))

    def _best_replicates(
        self, context: Context, fit: ProbeResult, n_hooks: int, models: list[str]
    ) -> dict[str, np.ndarray]:
        """Bootstrap replicates of each model's best-layer probe accuracy (resampling held-out sequences)."""
        assert fit.test_correct is not None
        correct = fit.test_correct.float()  # [probe, n_test]
        idx = context.resample(correct.shape[1], self.name)  # [n_boot, n_test]
        reps = correct[:, idx].mean(-1)  # [probe, n_boot]
        return {w: r.max(0).values.numpy() for w, r in zip(models, reps.split(n_hooks), strict=True)}

    def over_run(self, store: RunStore, label: str | None = None) -> pd.DataFrame:
        """Probe accuracy per hook and recorded step of ``store`` (one batched fit for all) for
        ``label`` (default: this analyzer's label, else ``count_a``)."""
        label = label or self.label or "count_a"
        probe = load_probe(store)
        if label not in probe.labels:
            raise ConfigError(f"the store's probe batch has no label {label!r}; it has {sorted(probe.labels)}")
        hooks = [h for h in store.meta.get("hooks", []) if _matches(h, self.hooks)]
        if not hooks:
            raise ConfigError(
                f"the store recorded no hook matching {self.hooks!r}; it recorded {store.meta.get('hooks')}"
            )
        pos = _positions(probe, self.position)
        rows = torch.arange(len(probe))
        feats, keys = [], []
        for hook in hooks:
            arr = store.array(hook)  # [record, batch, pos, ...], memory-mapped
            for i, step in enumerate(store.array_steps(hook)):
                feats.append(arr[i][rows, pos].flatten(1).float())
                keys.append((hook, step))
        result = fit_probes(torch.stack(feats), probe.labels[label], steps=self.steps, seed=0)
        return pd.DataFrame(
            [(h, s, a) for (h, s), a in zip(keys, result.test_accuracy.tolist(), strict=True)],
            columns=["hook", "step", "probe_accuracy"],
        )


@dataclass
class NewLatentProbing(Probing):
    """Creation: does the tuned model represent the downstream task's latent variable (e.g.
    ``count_b``) where the base did not — a genuinely new capability — or not, as a wrapper that
    reads the old capability's latent and transforms it?

    Probes are fitted on the downstream task *without* its spurious correlation (C_Te = 0: there the
    new latent cannot be read off the old one), base vs tuned. Statistic ``new_latent_gain``: the
    share of the base's probe error that the tuned model removes, ``(tuned − base) / (1 − base)``,
    best layer of each. Near 1: a new representation (a genuine capability); near 0: none. Not
    applicable when the base already reads the latent almost perfectly (within ``min_margin`` of 100%)
    or the task has no latent label.

    Args: as :class:`Probing`; ``label`` defaults to the downstream task's ``probe_label``, ``task``
    to the correlation-free downstream task's ``probe_task()`` (a text task's contrast task), and
    ``embeddings`` to ``"tuned"``: a new latent the fine-tune wrote into the embedding lookup is
    part of what it created, so the tuned model is probed as it is.
    """

    embeddings: Literal["tuned", "base"] = "tuned"
    name: str = "new_latent"
    kind: ClassVar[Kind] = "functional"
    question: ClassVar[Question] = "creation"
    statistic: ClassVar[str | None] = "new_latent_gain"

    def _resolve(self, context: Context) -> tuple[str | None, Task]:
        # (the sequences its latent is probed on: a text task's contrast task, a PCFG task itself)
        task = self.task or (context.downstream_free or context.downstream).probe_task()
        return self.label or context.downstream.probe_label, task

    def analyze(self, context: Context) -> Evidence:
        probed = self._probe_models(context)
        if isinstance(probed, Evidence):
            return probed
        label, task, fit, _, table, reps, best = probed
        headroom = 1.0 - best["base"]
        gain = (best["tuned"] - best["base"]) / headroom if headroom >= self.min_margin else math.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            gain_reps = (reps["tuned"] - reps["base"]) / (1.0 - reps["base"])
        headline = {
            "probe_best_base": best["base"], "probe_best_tuned": best["tuned"],
            "probe_best_untrained": best["untrained"], "majority_baseline": fit.majority_baseline,
            "new_latent_gain": gain,
        }  # fmt: skip
        intervals = {f"probe_best_{w}": context.interval(r) for w, r in reps.items()}
        intervals["new_latent_gain"] = context.interval(gain_reps)
        where = f"on {task.name!r}"
        if headroom < self.min_margin:
            summary = f"the base model's probes already read {label} at {best['base']:.0%} {where}: nothing new to find"
        else:
            summary = (f"probes read {label} {where} from the tuned model at {best['tuned']:.0%} against the base's "
                       f"{best['base']:.0%} (untrained {best['untrained']:.0%}): {gain:.0%} of the base's error removed")  # fmt: skip
            if best["untrained"] >= max(best["base"], best["tuned"]):
                summary += (f"; but an untrained model's probes read it as well ({best['untrained']:.0%}): they read "
                            "the input's tokens, not a learned latent, so the gain says little either way")  # fmt: skip
        return Evidence(self.name, headline, table, plot=_plot, value=gain, replicates=gain_reps, intervals=intervals,
                        summary=summary)  # fmt: skip


def _matches(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


def _plot(evidence: Evidence):
    import plotly.graph_objects as go

    from capwrap.report import error_bars

    fig = go.Figure()
    for model, part in evidence.table.groupby("model"):
        fig.add_trace(go.Scatter(x=part["hook"], y=part["probe_accuracy"], mode="lines+markers", name=f"{model} model",
                                 error_y=error_bars(part, "probe_accuracy")))  # fmt: skip
    if "majority_baseline" in evidence.headline:
        fig.add_hline(y=evidence.headline["majority_baseline"], line_dash="dot", annotation_text="majority class")
    fig.update_layout(height=360, xaxis_title="hook point (layer)",
                      yaxis=dict(title="probe accuracy (held out)", tickformat=".0%", range=[0, 1.02]),
                      title=f"{evidence.analyzer.replace('_', ' ')}: {evidence.direction} ({evidence.strength:.2f})",
                      legend_title_text="model")  # fmt: skip
    return fig
