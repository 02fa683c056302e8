"""Pruning: does zeroing a few units of the tuned model bring the capability back?

The paper scores each unit by gradient × weight of the *capability* task's loss and zeroes the top
K: if the fine-tuned model only wraps the capability, removing a handful of units (the wrapper)
restores it. Three scores, at three granularities:

* ``grad_x_weight`` (the paper's): Σ gradient ⊙ weight of the capability loss over the unit's
  weights — to first order, how much zeroing the unit *lowers* that loss; the highest are pruned;
* ``magnitude``: Σ |weight| — the classic baseline; the smallest are pruned;
* ``wanda``: |weight| × ‖input activation‖ (Sun et al., 2023), summed over the unit; the smallest
  are pruned;

over ``neuron`` (an MLP neuron's input column, bias and output row), ``head`` (a head's Q/K/V/O
slices) or ``weight`` (single entries of the MLP and attention matrices).

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> model = build_model(spec, seed=0)
    >>> pair = ModelPair(model, model.clone())
    >>> ev = Pruning(ks=(0, 1, 2), eval_size=32)(pair, task, task)
    >>> ev.table["k"].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import pandas as pd
import torch
from torch import Tensor

from capwrap.analyzers.base import Analyzer, Evidence, Kind, ModelPair
from capwrap.errors import ConfigError
from capwrap.models import CapModel
from capwrap.recording import RunStore
from capwrap.tasks.base import Task, accuracy, answer_loss

__all__ = ["Pruning", "unit_scores", "prune"]

Method = Literal["grad_x_weight", "magnitude", "wanda"]
Granularity = Literal["neuron", "head", "weight"]
_PRUNE_HIGHEST = {"grad_x_weight": True, "magnitude": False, "wanda": False}
_WEIGHT_PARAMS = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_gate", "mlp.W_out")


def _input_norms(model: CapModel, tokens: Tensor) -> dict[str, Tensor]:
    """‖X‖ over all positions of each weight's input, per input dimension (for Wanda)."""
    hooks = model.resolve_hooks(
        [
            "blocks.*.ln1.hook_normalized",
            "blocks.*.ln2.hook_normalized",
            "blocks.*.mlp.hook_post",
            "blocks.*.attn.hook_z",
        ]
    )
    acts = model.capture(tokens, hooks, batch_size=128)
    norms: dict[str, Tensor] = {}
    for name, act in acts.items():
        layer = name.split(".")[1]
        flat = act.float().flatten(0, 1)  # [batch*pos, ...]
        norm = flat.norm(dim=0)
        if name.endswith("ln1.hook_normalized"):
            norms[f"blocks.{layer}.attn.in"] = norm  # [d_model]
        elif name.endswith("ln2.hook_normalized"):
            norms[f"blocks.{layer}.mlp.in"] = norm
        elif name.endswith("mlp.hook_post"):
            norms[f"blocks.{layer}.mlp.post"] = norm  # [d_mlp]
        else:
            norms[f"blocks.{layer}.attn.z"] = norm  # [head, d_head]
    return norms


def _wanda_weights(model: CapModel, tokens: Tensor) -> dict[str, Tensor]:
    """|W| scaled by the norm of its input, in canonical shapes."""
    w = model.weights()
    norms = _input_norms(model, tokens)
    out = {}
    for name, weight in w.items():
        if not name.startswith("blocks.") or not name.endswith(_WEIGHT_PARAMS):
            continue
        layer = name.split(".")[1]
        a = weight.detach().abs()
        if name.endswith(("W_Q", "W_K", "W_V")):  # [head, d_model, d_head], input d_model
            out[name] = a * norms[f"blocks.{layer}.attn.in"][None, :, None]
        elif name.endswith("W_O"):  # [head, d_head, d_model], input z
            out[name] = a * norms[f"blocks.{layer}.attn.z"][:, :, None]
        elif name.endswith(("W_in", "W_gate")):  # [d_model, d_mlp]
            out[name] = a * norms[f"blocks.{layer}.mlp.in"][:, None]
        else:  # W_out [d_mlp, d_model]
            out[name] = a * norms[f"blocks.{layer}.mlp.post"][:, None]
    return out


def unit_scores(
    model: CapModel, task: Task, method: Method, granularity: Granularity, n: int = 512, seed: int = 0
) -> pd.DataFrame:
    """Score every unit of ``model`` for pruning; rows in pruning order (first = pruned first).

    Returns:
        A table with ``unit`` (a component name, or ``param[index]`` for single weights) and ``score``.
    """
    if method not in _PRUNE_HIGHEST:
        raise ConfigError(f"unknown pruning method {method!r}; choose from {sorted(_PRUNE_HIGHEST)}")
    if granularity not in ("neuron", "head", "weight"):
        raise ConfigError(f"unknown granularity {granularity!r}; choose 'neuron', 'head' or 'weight'")
    batch = task.sample(n, seed=seed).to(model.device)
    if method == "grad_x_weight":
        model.module.zero_grad(set_to_none=True)
        answer_loss(model(batch.tokens), batch).backward()
        grads = model.gradients()
        per_weight = {k: (grads[k] * w.detach()) for k, w in model.weights().items()}
        model.module.zero_grad(set_to_none=True)
    elif method == "magnitude":
        per_weight = {k: w.detach().abs() for k, w in model.weights().items()}
    else:
        per_weight = _wanda_weights(model, batch.tokens)
    if granularity == "weight":
        rows = []
        for name, s in per_weight.items():
            if name.startswith("blocks.") and name.endswith(_WEIGHT_PARAMS):
                flat = s.flatten()
                rows += [(f"{name}[{i}]", v) for i, v in enumerate(flat.tolist())]
        table = pd.DataFrame(rows, columns=["unit", "score"])
    else:
        comps = model.components.select(granularity)
        scores = [sum(float(sl.of(per_weight).sum()) for sl in c.slices if sl.param in per_weight) for c in comps]
        table = pd.DataFrame({"unit": [c.name for c in comps], "score": scores})
    return table.sort_values("score", ascending=not _PRUNE_HIGHEST[method], ignore_index=True)


@torch.no_grad()
def prune(model: CapModel, units: Sequence[str]) -> CapModel:
    """Zero the named units of ``model`` in place (component names or ``param[flat index]``)."""
    w = model.weights()
    for unit in units:
        if "[" in unit:
            name, index = unit[:-1].split("[")
            w[name].view(-1)[int(index)] = 0.0
        else:
            for sl in model.components[unit].slices:
                sl.of(w).zero_()
    return model


@dataclass
class Pruning(Analyzer):
    """Prune the top-K units of the tuned model; sweep K; find the smallest K that revives the capability.

    Args:
        method: ``grad_x_weight`` (the paper's), ``magnitude`` or ``wanda``.
        granularity: ``neuron``, ``head`` or ``weight``.
        ks: the K values to sweep (must include at least one).
        revive_fraction: the capability counts as back at this share of the base model's accuracy.
        score_size: sequences used to compute the scores.
        eval_size: sequences per accuracy measurement.
        seed: seed of the data.
    """

    method: Method = "grad_x_weight"
    granularity: Granularity = "neuron"
    ks: tuple[int, ...] = (0, 1, 2, 5, 10, 15, 25, 50, 100)
    revive_fraction: float = 0.9
    score_size: int = 512
    eval_size: int = 1024
    seed: int = 0
    name: str = "pruning"
    kind: ClassVar[Kind] = "functional"

    def __post_init__(self) -> None:
        if not self.ks:
            raise ConfigError("ks is empty: give at least one K to sweep, e.g. ks=(0, 5, 10)")
        if any(k < 0 for k in self.ks):
            raise ConfigError(f"every K must be >= 0, got {self.ks}")
        if not 0 < self.revive_fraction <= 1:
            raise ConfigError(f"revive_fraction must be in (0, 1], got {self.revive_fraction}")

    def analyze(self, pair: ModelPair, capability: Task, downstream: Task, store: RunStore | None = None) -> Evidence:
        scores = unit_scores(pair.tuned, capability, self.method, self.granularity, self.score_size, self.seed)
        too_big = [k for k in self.ks if k > len(scores)]
        if too_big:
            raise ConfigError(
                f"K={max(too_big)} is larger than the {len(scores)} {self.granularity} units of the model; use smaller ks"
            )
        cap = capability.sample(self.eval_size, seed=self.seed + 1)
        down = downstream.sample(self.eval_size, seed=self.seed + 2)
        base_cap = accuracy(pair.base, cap)
        work = pair.tuned.clone()
        rows, pruned = [], 0
        for k in sorted(set(self.ks)):
            prune(work, scores["unit"].iloc[pruned:k].tolist())  # the top-k sets are nested
            pruned = k
            rows.append((k, accuracy(work, cap), accuracy(work, down)))
        table = pd.DataFrame(rows, columns=["k", "capability_accuracy", "downstream_accuracy"])
        target = self.revive_fraction * base_cap
        revived = table[table["capability_accuracy"] >= target]
        tuned_cap = float(table.loc[table["k"] == table["k"].min(), "capability_accuracy"].iloc[0])
        k_revive = int(revived["k"].min()) if len(revived) else math.nan
        best = table.loc[table["capability_accuracy"].idxmax()]
        lost = base_cap - tuned_cap
        headline = {
            "capability_accuracy_base": base_cap,
            "capability_accuracy_tuned": tuned_cap,
            "best_capability_accuracy": float(best["capability_accuracy"]),
            "k_best": float(best["k"]),
            "recovered_share": float((best["capability_accuracy"] - tuned_cap) / lost) if lost > 0.02 else math.nan,
            "k_to_revive": k_revive,
            "units": float(len(scores)),
        }
        direction, strength, reasons = self._judge(headline, target)
        details = {"top_units": scores.head(20).to_dict(orient="records")}
        return Evidence(self.name, headline, table, direction, strength, reasons, details, plot=_plot)

    def _judge(self, h: dict[str, float], target: float) -> tuple[str, float, list[str]]:
        what = f"{self.granularity}s by {self.method}"
        if h["capability_accuracy_tuned"] >= target:
            return (
                "neutral",
                0.0,
                [
                    f"the tuned model keeps {h['capability_accuracy_tuned']:.0%} capability accuracy already; pruning has nothing to revive"
                ],
            )
        if not math.isnan(h["k_to_revive"]):
            k = int(h["k_to_revive"])
            share = k / h["units"]
            strength = 0.9 if share <= 0.01 else 0.7 if share <= 0.05 else 0.4
            return (
                "wrapper",
                strength,
                [
                    f"pruning {k} {what} ({share:.1%} of them) brings the capability back to {h['best_capability_accuracy']:.0%} "
                    f"(base {h['capability_accuracy_base']:.0%}, tuned {h['capability_accuracy_tuned']:.0%})"
                ],
            )
        recovered, k_best = h["recovered_share"], int(h["k_best"])
        if recovered >= 0.5 and k_best / h["units"] <= 0.05:
            return (
                "wrapper",
                0.5,
                [
                    f"pruning {k_best} {what} ({k_best / h['units']:.1%} of them) recovers {recovered:.0%} of the lost "
                    f"capability accuracy ({h['capability_accuracy_tuned']:.0%} -> {h['best_capability_accuracy']:.0%}, "
                    f"base {h['capability_accuracy_base']:.0%}), short of the {target:.0%} revival threshold"
                ],
            )
        return (
            "change",
            0.3,
            [
                f"pruning up to {max(self.ks)} {what} recovers only {recovered:.0%} of the lost capability accuracy "
                f"(best {h['best_capability_accuracy']:.0%}, tuned {h['capability_accuracy_tuned']:.0%}, base {h['capability_accuracy_base']:.0%})"
            ],
        )


def _plot(evidence: Evidence):
    import plotly.graph_objects as go

    from capwrap.report import error_bars

    t = evidence.table
    fig = go.Figure([
        go.Scatter(x=t["k"], y=t["capability_accuracy"], mode="lines+markers", name="capability",
                   error_y=error_bars(t, "capability_accuracy")),
        go.Scatter(x=t["k"], y=t["downstream_accuracy"], mode="lines+markers", name="downstream",
                   error_y=error_bars(t, "downstream_accuracy")),
    ])  # fmt: skip
    fig.update_layout(height=360, xaxis_title="units pruned (K)", yaxis=dict(title="accuracy", tickformat=".0%", range=[0, 1.02]),
                      title=f"pruning: {evidence.direction} ({evidence.strength:.2f})")  # fmt: skip
    return fig
