"""Pruning: does zeroing a few units of the tuned model bring the capability back?

The paper scores each unit by gradient × weight of the *capability* task's loss and zeroes the top
K: if the fine-tuned model only wraps the capability, removing a handful of units (the wrapper)
restores it. Three scores, at three granularities:

* ``grad_x_weight`` (the paper's): Σ gradient ⊙ weight of the capability loss over the unit's
  weights — to first order, how much zeroing the unit *lowers* that loss; the highest are pruned.
  For heads and neurons it is read off activations and their gradients
  (:func:`unit_gradient_scores`: no weight gradient is held);
* ``magnitude``: Σ |weight| — the classic baseline; the smallest are pruned;
* ``wanda``: |weight| × ‖input activation‖ (Sun et al., 2023), summed over the unit; the smallest
  are pruned;

over ``neuron`` (an MLP neuron's input column, bias and output row), ``head`` (a head's Q/K/V/O
slices) or ``weight`` (single entries of the MLP and attention matrices).

Examples:
    >>> from capwrap.analyzers import ModelPair
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> model = build_model(spec, seed=0)
    >>> pair = ModelPair(model, model.clone())
    >>> ev = Pruning(ks=(0, 1, 2))(pair, task, task, eval_size=32)
    >>> ev.table["k"].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from capwrap.analyzers.base import Analyzer, Context, Direction, Evidence, Kind, correctness
from capwrap.errors import ConfigError, as_list, whole_number
from capwrap.models import CapModel, ParamSlice
from capwrap.tasks.base import Task, TaskBatch, accuracy, answer_loss

__all__ = ["Pruning", "unit_scores", "unit_gradient_scores", "prune"]

Method = Literal["grad_x_weight", "magnitude", "wanda"]
Granularity = Literal["neuron", "head", "weight"]
_PRUNE_HIGHEST = {"grad_x_weight": True, "magnitude": False, "wanda": False}
_WEIGHT_PARAMS = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_gate", "mlp.W_out")


def _input_sites(model: CapModel) -> dict[str, str]:
    """Where each weight's input is read, by hook pattern: the normalized residual stream (the raw one
    in a model without normalization, as compiled Tracr programs; the block's input for a parallel MLP),
    the MLP's hidden activations and the heads' outputs."""
    f = model.spec.features
    if f.has_norm:
        attn_in, mlp_in = "blocks.*.ln1.hook_normalized", "blocks.*.ln2.hook_normalized"
    else:
        attn_in, mlp_in = "blocks.*.hook_resid_pre", "blocks.*.hook_resid_pre" if f.parallel else "blocks.*.hook_resid_mid"
    return {"attn.in": attn_in, "mlp.in": mlp_in, "mlp.post": "blocks.*.mlp.hook_post", "attn.z": "blocks.*.attn.hook_z"}


def _input_norms(model: CapModel, tokens: Tensor) -> dict[str, Tensor]:
    """‖X‖ over all positions of each weight's input, per input dimension (for Wanda), by
    ``blocks.{layer}.{site}`` (sites of :func:`_input_sites`)."""
    sites = _input_sites(model)
    hooks = model.resolve_hooks(list(dict.fromkeys(sites.values())))

    def squares(name: str, act: Tensor, rows: slice) -> Tensor:  # each pass keeps its sums of squares
        return torch.linalg.vector_norm(act.float(), dim=(0, 1)).double().square().unsqueeze(0)

    sums = model.capture(tokens, hooks, batch_size=128, reduce=squares)
    norms: dict[str, Tensor] = {}
    for name, per_pass in sums.items():
        layer = name.split(".")[1]
        for site, pattern in sites.items():  # a raw residual stream may be the input of both sites
            if fnmatch.fnmatchcase(name, pattern):
                norms[f"blocks.{layer}.{site}"] = per_pass.sum(0).sqrt().float()  # [d_model], [d_mlp], [head, d_head]
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
        if name.endswith(("W_Q", "W_K", "W_V")):  # [head, d_model, d_head], input d_model
            site, shape = "attn.in", (None, slice(None), None)
        elif name.endswith("W_O"):  # [head, d_head, d_model], input z
            site, shape = "attn.z", (slice(None), slice(None), None)
        elif name.endswith(("W_in", "W_gate")):  # [d_model, d_mlp]
            site, shape = "mlp.in", (slice(None), None)
        else:  # W_out [d_mlp, d_model]
            site, shape = "mlp.post", (slice(None), None)
        a = weight.detach().abs()  # (accelerate may keep an offloaded weight off the activations' device)
        out[name] = a * norms[f"blocks.{layer}.{site}"].to(a.device)[shape]
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
    if method == "grad_x_weight" and granularity != "weight":
        scores = unit_gradient_scores(model, batch, granularity)
        table = pd.DataFrame({"unit": list(scores), "score": list(scores.values())})
        return table.sort_values("score", ascending=False, ignore_index=True)
    if method == "grad_x_weight":
        _accumulate_gradients(model, batch)
        grads = model.gradients()
        per_weight = ((k, grads[k] * w.detach()) for k, w in model.weights().items())  # one weight at a time
    elif method == "magnitude":
        per_weight = ((k, w.detach().abs()) for k, w in model.weights().items())
    else:
        per_weight = iter(_wanda_weights(model, batch.tokens).items())
    if granularity == "weight":
        rows = []
        for name, s in per_weight:
            if name.startswith("blocks.") and name.endswith(_WEIGHT_PARAMS):
                flat = s.flatten()
                rows += [(f"{name}[{i}]", v) for i, v in enumerate(flat.tolist())]
        table = pd.DataFrame(rows, columns=["unit", "score"])
    else:
        comps = model.components.select(granularity)
        slices: dict[str, list[tuple[int, ParamSlice]]] = {}
        for i, comp in enumerate(comps):
            for sl in comp.slices:
                slices.setdefault(sl.param, []).append((i, sl))
        scores = [0.0] * len(comps)
        for name, s in per_weight:
            for i, sl in slices.get(name, ()):
                scores[i] += float(sl.of({name: s}).sum())
        table = pd.DataFrame({"unit": [c.name for c in comps], "score": scores})
    model.module.zero_grad(set_to_none=True)
    return table.sort_values("score", ascending=not _PRUNE_HIGHEST[method], ignore_index=True)


#: Where a unit's Σ weight ⊙ gradient adds up in the forward pass. For a linear map ``y = x W + b``,
#: Σ W ⊙ ∂L/∂W + b ⊙ ∂L/∂b over the map's output features ``j`` is Σ y_j ∂L/∂y_j over the batch
#: and positions, and over its input features ``i`` (no bias) Σ x_i ∂L/∂x_i. A head owns the
#: output features of W_Q/W_K/W_V (read at ``hook_q``/``hook_k``/``hook_v``, which include the
#: biases) and the input features of W_O (``hook_z``); a neuron the output feature of W_in
#: (``hook_pre``, or ``hook_pre_linear`` when the MLP is gated and ``hook_pre`` is the gate's) and
#: of W_gate, and the input feature of W_out (``hook_post``).
_UNIT_HOOKS: dict[str, str] = {
    "attn.W_Q": "attn.hook_q", "attn.W_K": "attn.hook_k", "attn.W_V": "attn.hook_v", "attn.W_O": "attn.hook_z",
    "mlp.W_in": "mlp.hook_pre", "mlp.W_out": "mlp.hook_post",
}  # fmt: skip
_GATED_UNIT_HOOKS: dict[str, str] = {"mlp.W_in": "mlp.hook_pre_linear", "mlp.W_gate": "mlp.hook_pre"}
#: Each weight's bias is part of the hooked output it is added to.
_BIAS_OF = {"attn.b_Q": "attn.W_Q", "attn.b_K": "attn.W_K", "attn.b_V": "attn.W_V", "mlp.b_in": "mlp.W_in"}


def unit_gradient_scores(model: CapModel, batch: TaskBatch, granularity: Literal["neuron", "head"]) -> dict[str, float]:
    """Σ gradient ⊙ weight of the answer loss over each head's or neuron's weights, read from the
    activations and their gradients (``_UNIT_HOOKS``) instead of the weights' gradients: no weight
    gradient is computed or held, so it needs the memory of the forward pass, not of a second model.

    Passes of :meth:`~capwrap.models.CapModel.rows_per_pass` sequences, each weighted by its share, so
    the result is the whole batch's mean-loss score; equal to the weight-gradient route to float
    precision (checked on every architecture capwrap supports, on both backends).
    """
    comps = model.components.select(granularity)
    if not comps:  # no such units (a mixture of experts has no neurons capwrap names)
        return {}
    # gated or not as the weights are (a model no family describes has its features guessed from its config)
    gated = any(sl.param.endswith("mlp.W_gate") for comp in comps for sl in comp.slices)
    table = _UNIT_HOOKS | (_GATED_UNIT_HOOKS if gated else {})
    per_comp: list[tuple[str, int, int, list[str]]] = []  # name, layer, index, hooks
    for comp in comps:
        params = {sl.param.split(".", 2)[2] for sl in comp.slices}
        hooks = sorted({table[_BIAS_OF.get(p, p)] for p in params})
        assert comp.layer is not None and comp.index is not None
        per_comp.append((comp.name, comp.layer, comp.index, hooks))
    names = sorted({f"blocks.{layer}.{h}" for _, layer, _, hooks in per_comp for h in hooks})
    sums: dict[str, Tensor | None] = dict.fromkeys(names)
    step = model.rows_per_pass(batch.tokens.shape[1], backward=True)
    acts: dict[str, Tensor] = {}
    shifts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> Tensor:
            acts[name] = act.detach()
            shifts[name] = torch.zeros_like(act, requires_grad=True)  # its gradient is the one at `act`
            return act + shifts[name]

        return hook

    for start in range(0, len(batch), step):
        part = batch[start : start + step]
        with torch.enable_grad(), model.hooks([(n, keep(n)) for n in names]):
            loss = answer_loss(model(part.tokens), part) * (len(part) / len(batch))
        grads = torch.autograd.grad(loss, [shifts[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is None:
                continue
            product = (acts[name].float() * grad.float()).flatten(0, 1).sum(0)  # [unit] or [head, d_head]
            product = product.sum(-1) if product.dim() == 2 else product
            sums[name] = product if sums[name] is None else sums[name] + product
    return {
        name: sum(float(sums[f"blocks.{layer}.{h}"][index]) for h in hooks if sums[f"blocks.{layer}.{h}"] is not None)
        for name, layer, index, hooks in per_comp
    }


def _accumulate_gradients(model: CapModel, batch: TaskBatch) -> None:
    """The gradient of the answer loss over ``batch`` in the weights' ``.grad``, from passes of as
    many sequences as :meth:`~capwrap.models.CapModel.rows_per_pass` allows (each weighted by its
    share, so that the sum is the whole batch's mean-loss gradient)."""
    model.module.zero_grad(set_to_none=True)
    step = model.rows_per_pass(batch.tokens.shape[1], backward=True)
    for start in range(0, len(batch), step):
        part = batch[start : start + step]
        (answer_loss(model(part.tokens), part) * (len(part) / len(batch))).backward()


@torch.no_grad()
def prune(model: CapModel, units: Sequence[str]) -> CapModel:
    """Zero the named units of ``model`` in place (component names or ``param[flat index]``)."""
    w = model.weights()
    for unit in units:
        if "[" in unit:
            name, index = unit[:-1].split("[")
            weight = w[name]  # a canonical view, not always contiguous: index it by position
            weight[tuple(int(i) for i in np.unravel_index(int(index), tuple(weight.shape)))] = 0.0
        else:
            for sl in model.components[unit].slices:
                sl.of(w).zero_()
    return model


@dataclass
class Pruning(Analyzer):
    """Prune the top-K units of the tuned model; sweep K; how much of the lost capability comes back?

    Statistic ``pruning_recovered_share``: the largest share of the capability accuracy lost in
    fine-tuning that pruning K units brings back, ``(acc_K − acc_tuned) / (acc_base − acc_tuned)``,
    over the swept K. Near 1: a handful of units (the wrapper) hid the capability; near 0: pruning
    brings nothing back. Not applicable when the tuned model lost less than ``min_loss`` of the
    capability. Accuracies are measured on the diagnosis's evaluation set; the interval resamples
    its sequences.

    Args:
        method: ``grad_x_weight`` (the paper's), ``magnitude`` or ``wanda``.
        granularity: ``neuron``, ``head`` or ``weight``.
        ks: the K values to sweep (must include at least one).
        revive_fraction: the capability counts as revived at this share of the base model's accuracy
            (reported as ``k_to_revive``).
        score_size: sequences used to compute the scores.
        min_loss: the statistic applies when the tuned model lost at least this much accuracy.
    """

    method: Method = "grad_x_weight"
    granularity: Granularity = "neuron"
    ks: tuple[int, ...] = (0, 1, 2, 5, 10, 15, 25, 50, 100)
    revive_fraction: float = 0.9
    score_size: int = 512
    min_loss: float = 0.05
    name: str = "pruning"
    kind: ClassVar[Kind] = "functional"
    statistic: ClassVar[str | None] = "pruning_recovered_share"
    #: The paper's test of a wrapper: pruning that brings the capability back shows one; pruning
    #: that brings nothing back shows nothing (the wrapper may lie in more units, or in other
    #: units, than the sweep tries).
    shows: ClassVar[tuple[Direction, ...]] = ("wrapper",)

    def __post_init__(self) -> None:
        ks = as_list(self.ks, "ks is a list of unit counts to prune, e.g. ks=(0, 5, 10)")
        self.ks = tuple(whole_number(k, "every K in ks (units to prune)") for k in ks)
        if not any(k > 0 for k in self.ks):
            raise ConfigError(f"ks needs a K above 0 to prune any unit, e.g. ks=(0, 5, 10), got {self.ks}")
        if not 0 < self.revive_fraction <= 1:
            raise ConfigError(f"revive_fraction must be in (0, 1], got {self.revive_fraction}")

    def analyze(self, context: Context) -> Evidence:
        pair, capability = context.pair, context.capability
        scores = unit_scores(pair.tuned, capability, self.method, self.granularity, self.score_size,
                             context.seed_for(self.name, "scores"))  # fmt: skip
        if scores.empty:  # not applicable: the value defaults to NaN
            return Evidence(self.name, {}, pd.DataFrame(), summary=(
                f"the model has no {self.granularity} units capwrap names (a mixture of experts' MLPs have no "
                "neurons in its component map): nothing to prune; use granularity='head' or 'weight'"))  # fmt: skip
        too_big = [k for k in self.ks if k > len(scores)]
        if too_big:
            raise ConfigError(
                f"K={max(too_big)} is larger than the {len(scores)} {self.granularity} units of the model; use smaller "
                "ks, or finer units (granularity='weight', as for a compiled Tracr model, whose MLPs have a handful "
                "of neurons)"
            )
        cap, down = context.eval.batches["capability"], context.eval.batches["downstream"]
        base_correct = context.eval.correct["base"]["capability"].float()
        ks, rows, correct_k, pruned = sorted(set(self.ks) | {0}), [], [], 0
        with pair.scratch(pair.tuned) as work:
            for k in ks:
                prune(work, scores["unit"].iloc[pruned:k].tolist())  # the top-k sets are nested
                pruned = k
                correct = correctness(work, cap).float()
                correct_k.append(correct)
                rows.append((k, float(correct.mean()), accuracy(work, down)))
        table = pd.DataFrame(rows, columns=["k", "capability_accuracy", "downstream_accuracy"])
        table = table[table["k"].isin(set(self.ks))].reset_index(drop=True)
        per_k = torch.stack(correct_k)  # [k, n], row 0 = the tuned model
        base_cap, tuned_cap = float(base_correct.mean()), float(per_k[0].mean())
        lost = base_cap - tuned_cap
        recovered = (
            float((per_k[1:].mean(1).max() - tuned_cap) / lost) if lost >= self.min_loss and len(ks) > 1 else math.nan
        )
        idx = context.eval_resample("capability")
        k_reps = per_k[:, idx].mean(-1)  # [k, n_boot]
        lost_reps = base_correct[idx].mean(-1) - k_reps[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (
                ((k_reps[1:].max(0).values - k_reps[0]) / lost_reps).numpy()
                if len(ks) > 1
                else np.full(len(idx), np.nan)
            )
        target = self.revive_fraction * base_cap
        revived = table[table["capability_accuracy"] >= target]
        best = table.loc[table["capability_accuracy"].idxmax()]
        headline = {
            "capability_accuracy_base": base_cap, "capability_accuracy_tuned": tuned_cap,
            "best_capability_accuracy": float(best["capability_accuracy"]), "k_best": float(best["k"]),
            "recovered_share": recovered, "k_to_revive": float(revived["k"].min()) if len(revived) else math.nan,
            "units": float(len(scores)),
        }  # fmt: skip
        intervals = {"recovered_share": context.interval(reps),
                     "best_capability_accuracy": context.interval(k_reps[ks.index(int(best["k"]))].numpy()),
                     "capability_accuracy_base": context.interval(context.accuracy_replicates("base", "capability")),
                     "capability_accuracy_tuned": context.interval(context.accuracy_replicates("tuned", "capability"))}  # fmt: skip
        what = f"{self.granularity}s by {self.method}"
        if lost < self.min_loss:
            summary = f"the tuned model lost only {max(lost, 0):.0%} of the capability accuracy; pruning has nothing to recover"
        else:
            k_best = int(best["k"])
            summary = (f"pruning up to {max(self.ks)} {what} brings the capability from {tuned_cap:.0%} to at most "
                       f"{best['capability_accuracy']:.0%} (base {base_cap:.0%}; best K={k_best}, "
                       f"{k_best / len(scores):.1%} of the units): {recovered:.0%} of the loss recovered")  # fmt: skip
        details = {"top_units": scores.head(20).to_dict(orient="records")}
        return Evidence(self.name, headline, table, details=details, plot=_plot, value=recovered, replicates=reps,
                        intervals=intervals, summary=summary)  # fmt: skip


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
