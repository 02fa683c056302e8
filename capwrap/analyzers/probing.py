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

from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from capwrap.analyzers.base import Analyzer, Evidence, Kind, ModelPair
from capwrap.errors import ConfigError
from capwrap.models import CapModel, build_model
from capwrap.recording import RunStore
from capwrap.recording.recorder import load_probe
from capwrap.tasks.base import Task, TaskBatch, accuracy

__all__ = ["ProbeResult", "fit_probes", "Probing", "probe_features"]


@dataclass
class ProbeResult:
    """Accuracies of a batch of probes (one per leading index of the features)."""

    train_accuracy: Float[Tensor, " probe"]
    test_accuracy: Float[Tensor, " probe"]
    n_classes: int
    majority_baseline: float


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
    with full-batch Adam on the same train split and scored on the held-out split.

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
    classes, labels = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(
            f"the probe label has a single class ({classes.tolist()}): there is nothing to predict; choose another label or more varied data"
        )
    n = labels.shape[0]
    n_test = int(round(test_fraction * n))
    if not 0 < n_test < n:
        raise ConfigError(f"test_fraction={test_fraction} leaves an empty train or test split for {n} sequences")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
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
    return ProbeResult(correct[:, train].float().mean(1), correct[:, test].float().mean(1), c, majority)


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
    weight = torch.zeros(n_probe, d, n_classes)
    bias = torch.zeros(n_probe, 1, n_classes)
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
    acts = model.capture(batch.tokens.to(model.device), hooks, batch_size=256)
    names = list(acts)
    pos = _positions(batch, position)
    rows = torch.arange(len(batch))
    feats = [acts[n][rows, pos].flatten(1).float().cpu() for n in names]
    return names, torch.stack(feats)


def _positions(batch: TaskBatch, position: str | int) -> Tensor:
    if position == "answer":
        return batch.answer_pos.cpu()
    if isinstance(position, int):
        if not -batch.tokens.shape[1] <= position < batch.tokens.shape[1]:
            raise ConfigError(f"position {position} is outside the sequences of length {batch.tokens.shape[1]}")
        return torch.full((len(batch),), position % batch.tokens.shape[1])
    raise ConfigError(f"position must be 'answer' or an int, got {position!r}")


@dataclass
class Probing(Analyzer):
    """Linear probes per layer for a latent label of the capability task, base vs tuned (and per
    recorded step when a run store is given).

    Args:
        label: the latent label to probe (a key of the task's ``labels``, e.g. ``count_a``); default:
            the capability task's ``probe_label`` (text tasks: ``feature_next``), else ``count_a``.
        task: the task whose sequences are probed; default: the capability task's ``probe_task()``
            when it has one (text tasks: texts with and without the feature), else the capability task.
        hooks: hook pattern whose activations are probed.
        position: ``"answer"`` or a fixed position.
        n: sequences sampled (train + test) for base and tuned.
        seed: seed of the data and the split.
        steps: probe optimizer steps.
    """

    label: str | None = None
    task: Task | None = field(default=None, repr=False)
    hooks: str = "blocks.*.hook_resid_post"
    position: str | int = "answer"
    n: int = 2048
    seed: int = 0
    steps: int = 300
    name: str = "probing"
    kind: ClassVar[Kind] = "functional"

    def settings(self) -> dict:
        return {k: v for k, v in super().settings().items() if k != "task"}

    def _resolve(self, capability: Task) -> tuple[str, Task]:
        label = self.label or getattr(capability, "probe_label", None) or "count_a"
        task = self.task
        if task is None:
            task = capability.probe_task() if hasattr(capability, "probe_task") else capability
        return label, task

    def analyze(self, pair: ModelPair, capability: Task, downstream: Task, store: RunStore | None = None) -> Evidence:
        label, task = self._resolve(capability)
        pair.check_tasks(task)
        batch = task.sample(self.n, seed=self.seed)
        if label not in batch.labels:
            raise ConfigError(f"the task {task.name!r} has no latent label {label!r}; it has {sorted(batch.labels)}")
        labels = batch.labels[label]
        # A freshly initialized model of the same shape is the floor: what probes read from
        # random features of the input alone (token counts are often linear in them).
        untrained = build_model(pair.spec, backend=pair.base.backend, seed=self.seed + 999).to(pair.base.device)
        models = {"base": pair.base, "tuned": pair.tuned, "untrained": untrained}
        feats = {}
        for which, model in models.items():
            names, feats[which] = probe_features(model, batch, self.hooks, self.position)
        fit = fit_probes(torch.cat(list(feats.values())), labels, steps=self.steps, seed=self.seed)  # one solve
        acc = dict(zip(models, fit.test_accuracy.split(len(names)), strict=True))
        table = pd.DataFrame(
            [(which, name, float(a)) for which in models for name, a in zip(names, acc[which], strict=True)],
            columns=["model", "hook", "probe_accuracy"],
        )
        cap_batch = batch if task is capability else capability.sample(self.n, seed=self.seed + 1)
        task_acc = {k: accuracy(m, cap_batch) for k, m in (("base", pair.base), ("tuned", pair.tuned))}
        headline = {
            "probe_best_base": float(acc["base"].max()),
            "probe_best_tuned": float(acc["tuned"].max()),
            "probe_best_untrained": float(acc["untrained"].max()),
            "majority_baseline": fit.majority_baseline,
            "capability_accuracy_base": task_acc["base"],
            "capability_accuracy_tuned": task_acc["tuned"],
        }
        details: dict = {}
        if store is not None and label in load_probe(store).labels:
            per_step = self.over_run(store, label)
            details["per_step"] = per_step.to_dict(orient="records")
            headline["probe_best_last_step"] = float(
                per_step[per_step["step"] == per_step["step"].max()]["probe_accuracy"].max()
            )
        direction, strength, reasons = _judge(headline, label)
        return Evidence(self.name, headline, table, direction, strength, reasons, details, plot=_plot)

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
        result = fit_probes(torch.stack(feats), probe.labels[label], steps=self.steps, seed=self.seed)
        return pd.DataFrame(
            [(h, s, a) for (h, s), a in zip(keys, result.test_accuracy.tolist(), strict=True)],
            columns=["hook", "step", "probe_accuracy"],
        )


def _matches(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


def _judge(h: dict[str, float], label: str) -> tuple[str, float, list[str]]:
    base, tuned = h["probe_best_base"], h["probe_best_tuned"]
    chance = max(h["majority_baseline"], h["probe_best_untrained"])  # the floor: majority class or random features
    lost = h["capability_accuracy_base"] - h["capability_accuracy_tuned"]
    if base - chance < 0.1:
        return (
            "neutral",
            0.0,
            [
                f"even the base model's probes read {label} barely better than the floor ({base:.0%} vs {chance:.0%}: "
                f"majority class {h['majority_baseline']:.0%}, untrained model {h['probe_best_untrained']:.0%})"
            ],
        )
    kept = (tuned - chance) / (base - chance)
    if kept >= 0.9:
        reason = (
            f"probes read {label} from the tuned model as well as from the base ({tuned:.0%} vs {base:.0%}, floor {chance:.0%})"
            + (
                f", although its task accuracy fell by {lost:.0%}: the capability is still represented"
                if lost > 0.05
                else ""
            )
        )
        return "wrapper", (0.5 + 0.4 * min(1.0, lost / 0.3)) if lost > 0.05 else 0.3, [reason]
    if kept < 0.6:
        return (
            "change",
            0.5 + 0.4 * (1 - kept / 0.6),
            [
                f"probes read {label} much worse from the tuned model ({tuned:.0%} vs {base:.0%}, floor {chance:.0%}): the representation changed"
            ],
        )
    return "neutral", 0.2, [f"probe accuracy for {label} dropped somewhat ({tuned:.0%} vs {base:.0%})"]


def _plot(evidence: Evidence):
    import plotly.graph_objects as go

    from capwrap.report import error_bars

    fig = go.Figure()
    for model, part in evidence.table.groupby("model"):
        fig.add_trace(go.Scatter(x=part["hook"], y=part["probe_accuracy"], mode="lines+markers", name=f"{model} model",
                                 error_y=error_bars(part, "probe_accuracy")))  # fmt: skip
    fig.add_hline(y=evidence.headline["majority_baseline"], line_dash="dot", annotation_text="majority class")
    fig.update_layout(height=360, xaxis_title="hook point (layer)",
                      yaxis=dict(title="probe accuracy (held out)", tickformat=".0%", range=[0, 1.02]),
                      title=f"probing: {evidence.direction} ({evidence.strength:.2f})", legend_title_text="model")  # fmt: skip
    return fig
