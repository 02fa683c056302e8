"""Circuit-tuning (Li et al., "Fine-Tuning is Subgraph Search"): train only the subgraph the task uses.

Every ``every`` steps, on the training batch itself, every edge of the model's graph
(:mod:`capwrap.circuits`) is scored by attribution patching and the top ``N`` are kept; the update then
touches only the parameters on the kept edges: an upstream head's slice ``W_O[h]``, an upstream MLP's
``W_out``/``b_out``, a downstream query/key/value input's ``W_Q[h]``/``W_K[h]``/``W_V[h]`` (with biases),
a downstream MLP input's ``W_in``/``W_gate``/``b_in``. Embeddings, norms, the unembedding and the
attention output bias stay frozen. ``N`` may follow a linear or cosine schedule over the run.

Done right where the authors' code is not:

* per-head slices: every kept head's own slice of the fused weights trains (their code keeps one
  head's slice per layer, an overwrite);
* frozen means frozen: a tensor with no kept slice gets no gradient, so the optimizer gives it no
  update, no weight decay and no state; in a tensor with some kept slices (a fused query/key/value
  weight) the frozen elements keep their values and their optimizer state through the step (weight
  decay and momentum do not reach them; elements never trained hold no state), and AdamW corrects
  each element's moments by the steps that element took (AdamW counts them per tensor, which gave a
  head kept late up to 6x the learning rate);
* scoring costs no extra pass: with the default metric (the training loss) the training step's own
  forward and backward pass give the edge scores (one forward, one backward per step, as plain
  fine-tuning), and the gradients are masked before the update.

Every step logs the subgraph's size and the share of the model's parameters it trains
(``method/trainable_ratio``; ``method/trained_ever_ratio`` is the union so far). With a
:class:`~capwrap.recording.Recorder`, each scored step's subgraph (``circuit_tuning.edges``, 0/1 per
edge in the order of :class:`~capwrap.circuits.Graph`) and scores (``circuit_tuning.scores``) go into
its ``RunStore``, where :class:`~capwrap.analyzers.Subgraph` reads them.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> from capwrap.training import TrainConfig, train
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=16, n_heads=2))
    >>> result = train(model, task, TrainConfig(steps=3, batch_size=8, progress=False), method=CircuitTuning(top_n=5))
    >>> result.history["method/edges"].tolist()
    [5.0, 5.0, 5.0]
    >>> bool((result.history["method/trainable_ratio"] < 0.5).all())
    True
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from capwrap.circuits.attribution import EdgeScores, ScoreAccumulator, attribute
from capwrap.circuits.circuit import SELECTIONS, Circuit, Selection
from capwrap.circuits.graph import Graph
from capwrap.circuits.metrics import Metric, resolve_metric
from capwrap.circuits.nodes import SELF_ABLATIONS, NodeCapture, check_readable
from capwrap.errors import CapwrapWarning, ConfigError, whole_number
from capwrap.methods.base import TrainingMethod
from capwrap.tasks.base import Task, TaskBatch, task_loss

if TYPE_CHECKING:
    from capwrap.models import CapModel
    from capwrap.training import TrainConfig

__all__ = ["CircuitTuning", "SCHEDULES", "parameter_masks", "trainable_elements"]

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def _storage_masks(model: CapModel, graph: Graph, edges: Bool[Tensor, " n_edges"]) -> dict[int, Tensor]:
    """Which elements of each trainable storage lie on ``edges``: one flat boolean mask per storage (by
    its address), written through the canonical views. Per storage, not per parameter: several
    parameters may view one storage (TransformerLens 4's GPT-2 bridge trains separate query, key and
    value weights that view its fused ``qkv`` weight, which itself gets no gradient)."""
    trainable = {p.untyped_storage().data_ptr() for p in model.parameters()}
    views = model.weights()
    nodes = [graph.upstream[u] for u in graph.edge_up[edges].unique().tolist()]
    nodes += [graph.downstream[d] for d in graph.edge_down[edges].unique().tolist()]
    masks: dict[int, Tensor] = {}
    for node in nodes:
        for piece in graph.node_params(node):
            view = views[piece.param]
            key = view.untyped_storage().data_ptr()
            if key not in trainable:
                continue  # a weight the backend keeps frozen
            if key not in masks:
                n = view.untyped_storage().nbytes() // view.element_size()
                masks[key] = torch.zeros(n, dtype=torch.bool, device=view.device)
            canonical = masks[key].as_strided(view.size(), view.stride(), view.storage_offset())
            canonical[piece.index] = True  # a view: writes into the storage's mask
    return masks


def trainable_elements(model: CapModel, graph: Graph, edges: Bool[Tensor, " n_edges"]) -> int:
    """How many parameter elements training on ``edges`` updates (each stored element once, however
    many parameters view it)."""
    return sum(int(mask.sum()) for mask in _storage_masks(model, graph, edges).values())


def parameter_masks(model: CapModel, graph: Graph, edges: Bool[Tensor, " n_edges"]) -> dict[torch.nn.Parameter, Tensor]:
    """Which elements of each trainable parameter lie on ``edges``: the parameter slices of every node
    (:meth:`~capwrap.circuits.Graph.node_params`) an edge touches, mapped from canonical views onto the
    backend's own tensors (a fused query/key/value weight gets the kept heads' columns; separate
    query, key and value parameters that view one fused storage each get their part).

    Returns:
        parameter -> boolean mask of its shape (parameters with nothing kept are absent).
    """
    return _parameter_views(model, _storage_masks(model, graph, edges))


def _parameter_views(model: CapModel, storage: dict[int, Tensor]) -> dict[torch.nn.Parameter, Tensor]:
    """Each trainable parameter's part of the storage masks (those with nothing kept left out)."""
    out: dict[torch.nn.Parameter, Tensor] = {}
    for param in model.parameters():
        flat = storage.get(param.untyped_storage().data_ptr())
        if flat is not None:
            mask = flat.as_strided(param.size(), param.stride(), param.storage_offset()).clone()
            if bool(mask.any()):
                out[param] = mask
    return out


class CircuitTuning(TrainingMethod):
    """Fine-tuning restricted to the top-``N`` edges of the model's graph, re-found every ``every`` steps.

    Args:
        top_n: edges kept (components with ``select="nodes"``), at the end of the schedule (a run of
            one step takes it). One that keeps every edge (component) of the graph warns
            (:class:`~capwrap.errors.CapwrapWarning`): that is full fine-tuning of the graph's parameters.
        top_n_start: ``N`` at the first step (default: ``top_n``, a constant ``N``).
        schedule: how ``N`` goes from ``top_n_start`` to ``top_n`` over the run: ``constant``,
            ``linear`` or ``cosine``.
        every: score edges and choose the subgraph every this many steps (1: every step, as the paper);
            with a schedule the last step chooses too, so that the run ends at ``top_n`` edges (the
            logged ``method/top_n`` is the schedule's ``N`` at each step, ``method/edges`` the
            subgraph's, chosen on the scoring steps).
        select: ``edges`` (top edges), ``nodes`` (top components, every edge between them) or
            ``greedy`` (connected to the logits), as :meth:`capwrap.circuits.Circuit.from_scores`.
        ablation: how edges are ablated when scored: ``mean`` (over the batch and positions, as the
            paper's code), ``mean_positional`` or ``zero``.
        metric: score edges by this metric (``(logits, batch) -> [batch]``) in a separate pass; default
            ``None``: by the training loss, from the training step's own pass. Scores follow
            :func:`~capwrap.circuits.attribute`'s convention either way: the estimated change of the
            metric when the edge is ablated; by default of minus the training loss (for answer
            tasks what :func:`~capwrap.circuits.negative_loss` scores; for text the loss averages
            over all the batch's tokens, ``negative_loss`` over each sequence's tokens first).
        max_params: a budget of trainable parameters (an ``int``, or a ``float`` in (0, 1]: a share of
            the model's): edges are taken in ``|score|`` order while the parameters of the nodes they
            touch fit it (an edge that would exceed it is skipped), up to ``N`` edges. Only with
            ``select="edges"``. Default: no budget.
    """

    name: ClassVar[str] = "circuit_tuning"
    edits_gradients: ClassVar[bool] = True
    reads_activations: ClassVar[bool] = True

    def __init__(
        self,
        top_n: int = 100,
        *,
        top_n_start: int | None = None,
        schedule: Schedule = "constant",
        every: int = 1,
        select: Selection = "edges",
        ablation: Literal["mean", "mean_positional", "zero"] = "mean",
        metric: Metric | str | None = None,
        max_params: int | float | None = None,
    ):
        top_n = whole_number(top_n, "CircuitTuning.top_n (edges kept)", minimum=1)
        top_n_start = (
            top_n if top_n_start is None else whole_number(top_n_start, "CircuitTuning.top_n_start", minimum=1)
        )
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
        if top_n_start != top_n and schedule == "constant":
            raise ConfigError(f"CircuitTuning.top_n_start={top_n_start} differs from top_n={top_n}, but the schedule "
                              "is 'constant' (N stays at top_n): give schedule='linear' or 'cosine' for N to move")  # fmt: skip
        every = whole_number(every, "CircuitTuning.every (steps)", minimum=1)
        if select not in SELECTIONS:
            raise ConfigError(f"unknown selection {select!r}; choose one of {list(SELECTIONS)}")
        if ablation not in SELF_ABLATIONS:
            raise ConfigError(
                f"CircuitTuning scores edges with ablation {list(SELF_ABLATIONS)}, got {ablation!r} "
                "(a corrupted ablation needs corrupted sequences the training task does not have)"
            )
        if max_params is not None:
            share = not isinstance(max_params, numbers.Integral)  # a count is an integer (NumPy's too)
            number = isinstance(max_params, numbers.Real) and not isinstance(max_params, bool)
            max_params = (float(max_params) if share else int(max_params)) if number else max_params
            if not number or not (0 < max_params <= 1 if share else max_params >= 1):
                raise ConfigError(
                    f"CircuitTuning.max_params must be a parameter count (int >= 1) or a share in (0, 1], got {max_params!r}"
                )
            if select != "edges":
                raise ConfigError(f"a parameter budget (max_params) works with select='edges', not {select!r}")
        self.max_params = max_params
        self.top_n, self.top_n_start, self.schedule = top_n, top_n if top_n_start is None else top_n_start, schedule
        metric = None if metric is None else resolve_metric(metric)
        self.every, self.select, self.ablation, self.metric = every, select, ablation, metric
        self.graph: Graph | None = None
        self.edges: Tensor | None = None  # the current subgraph, [n_edges]
        self.scores: Tensor | None = None  # the scores it was chosen by
        self.ever: Tensor | None = None  # every edge kept so far
        self.scored_step: int | None = None
        self._capture: NodeCapture | None = None
        self._pending: Tensor | None = None
        self._masks: dict[torch.nn.Parameter, Tensor] = {}
        self._trainable = self._ever_params = 0
        self._steps = 0  # the run's length (setup)
        self._previous: Tensor | None = None
        self._recorded: dict[str, Tensor] = {}

    # ---- the schedule --------------------------------------------------------------------------------
    def top_n_at(self, step: int, steps: int) -> int:
        """``N`` at optimizer step ``step`` (0-based) of a run of ``steps``."""
        if self.schedule == "constant" or self.top_n_start == self.top_n:
            return self.top_n
        t = step / (steps - 1) if steps > 1 else 1.0  # a run of one step is its last: it ends at top_n
        shape = t if self.schedule == "linear" else 0.5 * (1 - math.cos(math.pi * t))
        return max(1, round(self.top_n_start + (self.top_n - self.top_n_start) * shape))

    def _scores_due(self, step: int) -> bool:
        """Whether ``step`` scores the edges and chooses the subgraph again: the first step, every
        ``every`` steps, and with a schedule the run's last step (so that the run ends at ``top_n``)."""
        last = self.schedule != "constant" and step == self._steps - 1
        return self.edges is None or step % self.every == 0 or last

    # ---- the method interface ------------------------------------------------------------------------
    def setup(self, model: CapModel, task: Task, config: TrainConfig) -> list[torch.nn.Parameter]:
        params = super().setup(model, task, config)
        if self.ablation == "mean_positional" and config.batch_size < 2:
            raise ConfigError("CircuitTuning(ablation='mean_positional') scores each training batch against its own "
                              "positions' means, and a batch of one sequence is its own mean (every score would be "
                              "noise): train with batch_size >= 2, or ablation='mean'")  # fmt: skip
        self.model = model
        self._steps = config.steps
        self.graph = Graph.from_spec(model.spec)
        check_readable(model, self.graph)
        if self.max_params is None:
            self._warn_if_whole_graph()
        weights = model.weights()
        self._cost = [
            [sum(piece.of(weights).numel() for piece in self.graph.node_params(node)) for node in side]
            for side in (self.graph.upstream, self.graph.downstream)
        ]
        if self.max_params is None:
            self.budget = None
        else:
            share = isinstance(self.max_params, float)
            self.budget = round(self.max_params * model.spec.n_params) if share else int(self.max_params)
            edge_costs = [self._cost[0][u] + self._cost[1][d]
                          for u, d in zip(self.graph.edge_up.tolist(), self.graph.edge_down.tolist(), strict=True)]  # fmt: skip
            cheapest = min((c for c in edge_costs if c > 0), default=0)
            if self.budget < cheapest:
                raise ConfigError(
                    f"CircuitTuning.max_params={self.max_params!r} allows {self.budget} parameters, fewer than the "
                    f"cheapest edge that trains anything needs ({cheapest}): nothing would be trained. Give at least "
                    f"{cheapest} (or a share of at least {cheapest / model.spec.n_params:.2g})"
                )
        self.edges = self.scores = self.ever = self.scored_step = self._previous = None
        self._masks, self._trainable, self._ever_params = {}, 0, 0
        return params

    def _warn_if_whole_graph(self) -> None:
        """Warn when ``top_n`` keeps every edge (every component with ``select="nodes"``) of the graph."""
        assert self.graph is not None
        if self.select == "nodes":
            size, unit = len([c for c in self.graph.components if c not in ("input", "logits")]), "components"
        else:
            size, unit = self.graph.n_edges, "edges"
        if self.top_n >= size:
            warnings.warn(
                f"CircuitTuning(top_n={self.top_n}, select={self.select!r}) keeps all {size} {unit} of this model's "
                f"graph, so it is full fine-tuning of the graph's parameters (the heads' and MLPs' weights; the embeddings, "
                f"norms, unembedding and attention output bias stay frozen), not of a subgraph: give top_n < {size}",
                CapwrapWarning,
                stacklevel=4,  # the caller of train()
            )

    def optimizer(self, params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
        optimizer = super().optimizer(params, config)
        saved: dict[torch.nn.Parameter, tuple[Tensor, dict[str, Tensor]]] = {}

        def keep_frozen(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            saved.clear()
            for param, mask in self._masks.items():
                state = opt.state.get(param, {})
                if param.grad is not None and (not bool(mask.all()) or ELEMENT_STEPS in state):
                    kept = {k: v.clone() for k, v in state.items() if _is_like(v, param) and k != ELEMENT_STEPS}
                    saved[param] = (param.detach().clone(), kept)

        def restore_frozen(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                for param, (value, state) in saved.items():
                    mask = self._masks[param]
                    if isinstance(opt, torch.optim.AdamW):
                        _adam_per_element(opt, param, mask, value)
                    param.copy_(torch.where(mask, param, value))
                    for key, current in opt.state.get(param, {}).items():
                        if _is_like(current, param) and key != ELEMENT_STEPS:
                            before = state.get(key, torch.zeros_like(current))
                            current.copy_(torch.where(mask, current, before))
            saved.clear()

        if isinstance(optimizer, torch.optim.AdamW) and any(g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups):
            raise ConfigError("circuit-tuning's per-element AdamW takes AdamW's defaults (no amsgrad, no maximize)")
        optimizer.register_step_pre_hook(keep_frozen)
        optimizer.register_step_post_hook(restore_frozen)
        _keep_element_steps_exact(optimizer)
        return optimizer

    def loss(self, model: CapModel, batch: TaskBatch, step: int) -> Float[Tensor, ""]:
        assert self.graph is not None, "setup() runs before loss()"
        self._capture, self._pending = None, None
        if not self._scores_due(step):
            return task_loss(model(batch.tokens), batch)
        if self.metric is not None:
            self._pending = attribute(model, batch, metric=self.metric, ablation=self.ablation).values
            model.train()
            return task_loss(model(batch.tokens), batch)
        self._capture = NodeCapture(model, self.graph)
        with model.hooks(self._capture.hooks()):
            logits = model(batch.tokens)
        return task_loss(logits, batch)

    def before_update(self, model: CapModel, step: int) -> dict[str, float]:
        assert self.graph is not None, "setup() runs before before_update()"
        if self._capture is not None:
            acc = ScoreAccumulator(self.graph, self.ablation)
            acc.add(self._capture.values(), self._capture.gradients(), self._capture.writes)
            # the loss is already a batch mean; its change, negated: the change of minus the loss (for
            # answer tasks what attribute(..., metric=negative_loss) scores), so the sign is metric='s
            self._pending = -acc.scores(self._capture.writes, n_sequences=1)
            self._capture = None
        self._recorded = {}
        if self._pending is not None:
            self._choose(self._pending, step)
            self._pending = None
        self._mask_gradients()
        return self._metrics(step)

    def arrays(self, step: int) -> dict[str, Tensor]:
        return dict(self._recorded)

    # ---- choosing the subgraph ---------------------------------------------------------------------------
    def _choose(self, scores: Tensor, step: int) -> None:
        assert self.graph is not None
        n = self.top_n_at(step, self.config.steps)
        if self.budget is None:
            edges = Circuit.from_scores(EdgeScores(self.graph, scores, "eap", self.ablation), n, self.select).mask
        else:
            edges = _within_budget(self.graph, scores, n, self._cost, self.budget)
        self._previous = self.edges
        self.edges, self.scores, self.scored_step = edges, scores.detach().float().cpu(), step
        self.ever = self.edges.clone() if self.ever is None else self.ever | self.edges
        self._set_masks()
        self._recorded = {"circuit_tuning.edges": self.edges.float(), "circuit_tuning.scores": self.scores}

    def _set_masks(self) -> None:
        """The current subgraph's parameter masks and trainable count, and the count of the union so far."""
        assert self.graph is not None and self.edges is not None and self.ever is not None
        storage = _storage_masks(self.model, self.graph, self.edges)
        self._masks = _parameter_views(self.model, storage)
        self._trainable = sum(int(mask.sum()) for mask in storage.values())
        self._ever_params = trainable_elements(self.model, self.graph, self.ever)

    def _mask_gradients(self) -> None:
        for param in self.model.parameters():
            mask = self._masks.get(param)
            if mask is None:
                param.grad = None  # no update, no weight decay, no optimizer state
            elif param.grad is not None and not bool(mask.all()):
                param.grad.masked_fill_(~mask, 0.0)

    def _metrics(self, step: int) -> dict[str, float]:
        assert self.edges is not None and self.graph is not None
        total = self.model.spec.n_params
        trainable = self._trainable
        circuit = Circuit(
            self.graph, self.edges, self.scores if self.scores is not None else torch.zeros(len(self.edges))
        )
        out = {
            "method/top_n": float(self.top_n_at(step, self.config.steps)),
            "method/edges": float(self.edges.sum()),
            "method/components": float(len([c for c in circuit.components if c not in ("input", "logits")])),
            "method/trainable_params": float(trainable),
            "method/trainable_ratio": trainable / total,
            "method/trained_ever_ratio": self._ever_params / total,
        }
        if self.budget is not None:
            out["method/budget_ratio"] = self.budget / total
        if self._recorded and self._previous is not None:
            union = int((self._previous | self.edges).sum())
            out["method/jaccard_prev"] = int((self._previous & self.edges).sum()) / union if union else 1.0
        return out

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.edges is None:
            return {"edges": None}
        return {
            "edges": self.edges.clone(),
            "scores": self.scores.clone() if self.scores is not None else None,
            "ever": self.ever.clone() if self.ever is not None else None,
            "previous": self._previous.clone() if self._previous is not None else None,
            "scored_step": self.scored_step,
            "settings": self.describe(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.graph is not None, "setup() runs before load_state_dict()"
        if state.get("edges") is None:
            self.edges = None
            return
        settings = state.get("settings", {})
        mismatch = {
            k: (v, settings[k])
            for k, v in self.describe().items()
            if k in settings and settings[k] != v and k != "metric"
        }
        if mismatch:
            raise ConfigError(f"the saved circuit-tuning state was made with other settings: {mismatch} (now, saved)")
        edges = state["edges"].bool().cpu()
        if edges.shape != (self.graph.n_edges,):
            raise ConfigError(f"the saved subgraph has {edges.numel()} edges, this model {self.graph.n_edges}")
        self.edges, self.scored_step = edges, state.get("scored_step")
        self.scores = None if state.get("scores") is None else state["scores"].float().cpu()
        self.ever = edges.clone() if state.get("ever") is None else state["ever"].bool().cpu()
        self._previous = None if state.get("previous") is None else state["previous"].bool().cpu()
        self._set_masks()

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "top_n": self.top_n,
            "top_n_start": self.top_n_start,
            "schedule": self.schedule,
            "every": self.every,
            "select": self.select,
            "ablation": self.ablation,
            "metric": "training loss" if self.metric is None else getattr(self.metric, "__name__", repr(self.metric)),
            "max_params": self.max_params,
        }


def _within_budget(graph: Graph, scores: Tensor, n: int, cost: list[list[int]], budget: int) -> Tensor:
    """Up to ``n`` edges in ``|score|`` order whose nodes' parameters fit ``budget`` (``cost``: per
    upstream and per downstream node); an edge that would exceed it is skipped."""
    order = torch.argsort(torch.nan_to_num(scores.abs(), nan=-1.0), descending=True, stable=True).tolist()
    mask = torch.zeros(graph.n_edges, dtype=torch.bool)
    used: tuple[set[int], set[int]] = (set(), set())
    spent = kept = 0
    ups, downs = graph.edge_up.tolist(), graph.edge_down.tolist()
    for e in order:
        if kept >= n:
            break
        u, d = ups[e], downs[e]
        extra = (cost[0][u] if u not in used[0] else 0) + (cost[1][d] if d not in used[1] else 0)
        if spent + extra > budget:
            continue
        spent += extra
        used[0].add(u)
        used[1].add(d)
        mask[e] = True
        kept += 1
    return mask


#: AdamW's state key for the steps each element of a partly kept tensor took (AdamW counts steps per tensor).
ELEMENT_STEPS = "capwrap_element_steps"


def _adam_per_element(opt: torch.optim.AdamW, param: Tensor, mask: Tensor, before: Tensor) -> None:
    """Give the kept elements of ``param`` the update AdamW gives an element that took as many steps
    as they did: AdamW corrects its moments' bias by one step count per tensor, so an element kept
    after the rest of its tensor took ``T`` steps starts from zero moments with ``T`` steps of
    correction (an update up to 6x the learning rate, tens of steps long). The count per element
    (kept in the optimizer's state, saved with it) is the tensor's while every element has taken
    every step, and from the first step that keeps only some of them, each element's own; where it
    differs from the tensor's, the kept element is updated from its value ``before`` the step with
    the moments AdamW has just updated, as AdamW updates it (decoupled weight decay first)."""
    state = opt.state[param]
    step = float(state["step"])
    counts = state.get(ELEMENT_STEPS)
    if counts is None:  # every element took the tensor's steps before this one
        counts = torch.full_like(param, step - 1, dtype=torch.float32)
    counts = counts + mask
    state[ELEMENT_STEPS] = counts
    fix = mask & (counts != step)
    if not bool(fix.any()):
        return
    group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    t = counts[fix].double()
    exp_avg, exp_avg_sq = state["exp_avg"][fix].double(), state["exp_avg_sq"][fix].double()
    denom = exp_avg_sq.sqrt() / (1 - beta2**t).sqrt() + eps
    updated = before[fix].double() * (1 - lr * decay) - lr / (1 - beta1**t) * exp_avg / denom
    param[fix] = updated.to(param.dtype)


def _keep_element_steps_exact(optimizer: torch.optim.Optimizer) -> None:
    """Load the per-element step counts as they were saved: ``load_state_dict`` casts every state
    tensor but ``step`` to its parameter's dtype, and bfloat16 holds whole numbers exactly only up to 256."""
    held: dict[Any, Tensor] = {}

    def set_aside(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        held.clear()
        state = {}
        for key, entry in state_dict["state"].items():
            if ELEMENT_STEPS in entry:
                entry = dict(entry)
                held[key] = entry.pop(ELEMENT_STEPS)
            state[key] = entry
        return {**state_dict, "state": state}

    def put_back(opt: torch.optim.Optimizer) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        for key, counts in held.items():
            opt.state[params[int(key)]][ELEMENT_STEPS] = counts.to(params[int(key)].device, torch.float32)
        held.clear()

    optimizer.register_load_state_dict_pre_hook(set_aside)
    optimizer.register_load_state_dict_post_hook(put_back)


def _is_like(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == param.shape
