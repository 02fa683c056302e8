"""Exact edge ablation: forward passes in which chosen edges carry their ablated value.

The reference the attribution methods are checked against, and the engine behind faithfulness
curves. In a pass with a set of ablated edges, every downstream node ``d`` reads

    ``x_d − Σ over ablated edges u -> d of (a_u − ã_u)``

where ``x_d`` is what it reads in that very pass, ``a_u`` is upstream node ``u``'s output in that
pass (so an ablation upstream propagates, as in a circuit whose complement is ablated) and ``ã_u``
its ablated output (a head's behind a post-norm: its share at the pass's own norm scale,
:class:`~capwrap.circuits.nodes.HeadWrites`). Query/key/value inputs are replaced at ``hook_q``/``hook_k``/``hook_v`` by the
projection of the corrected stream (through block ``l``'s own ``ln1`` module), an MLP's input by
recomputing the MLP's output from the corrected stream (the block's middle, or in a parallel block
its input) (:class:`~capwrap.models.functional.Functional`'s
``mlp``), the logits' by correcting the final stream. Many ablation sets ("slots") share one forward
pass: the batch is repeated once per slot.

:func:`split_input_eap` is attribution patching written the textbook way over TransformerLens's own
split-input hooks (``hook_q_input`` ... , ``hook_result``, ``hook_mlp_in``), where the backend offers
them: an independent implementation the fast one (:func:`~capwrap.circuits.attribution.attribute`) is
checked against.

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> exact = exact_scores(model, task.sample(8, seed=0), ablation="mean")
    >>> exact.method, exact.values.shape
    ('exact', torch.Size([13]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from capwrap.circuits.attribution import EdgeScores
from capwrap.circuits.graph import Graph
from capwrap.circuits.metrics import DEFAULT_METRIC, Metric, metric_values, resolve_metric
from capwrap.circuits.nodes import Ablation, HeadWrites, NodeValues, ablated_values, check_readable, norm_module
from capwrap.errors import ConfigError, whole_number
from capwrap.models import CapModel
from capwrap.models.functional import Functional
from capwrap.tasks.base import TaskBatch

__all__ = ["ablated_metric", "check_exact_supported", "exact_scores", "split_input_eap"]


def _slot_bytes(model: CapModel, batch: int, pos: int) -> int:
    """Rough peak bytes one slot of an ablated pass holds (float32): the forward pass's own tensors,
    the kept upstream outputs and one corrected stream per patched node of a layer."""
    s = model.spec
    per_position = 8 * s.d_model + 3 * s.d_mlp + 3 * s.n_heads * pos + 2 * s.d_vocab_out
    kept = s.n_layers * (2 * s.d_model + s.n_heads * s.d_head) + 4 * s.d_model * (3 * s.n_heads + 1)
    return 4 * batch * pos * (per_position + kept)


class _AblationHooks:
    """The hooks of one ablated forward pass over ``slots`` copies of a batch."""

    def __init__(self, model: CapModel, graph: Graph, masks: Tensor, ablated: NodeValues, n_batch: int):
        self.model, self.graph, self.ablated, self.n_batch = model, graph, ablated, n_batch
        self.slots = masks.shape[0]
        dense = torch.zeros(self.slots, len(graph.upstream), len(graph.downstream), dtype=torch.bool)
        dense[:, graph.edge_up, graph.edge_down] = masks.cpu()
        self.dense = dense.to(model.device)  # [slot, n_up, n_down]
        self.weights = {k: v.detach() for k, v in model.weights().items()}
        self.functional = Functional(model)
        self.writes = HeadWrites(model)
        n = model.spec.n_layers
        self.x_pre: list[Tensor | None] = [None] * n
        self.x_mid: list[Tensor | None] = [None] * n
        #: The stream each layer's MLP reads: the middle of the block, or its input in a parallel block.
        self.mlp_reads = self.x_pre if graph.layout == "parallel" else self.x_mid
        self.z: list[Tensor | None] = [None] * n
        self.mlp: list[Tensor | None] = [None] * n
        self.head_rows = [
            [graph.upstream_index(f"L{layer}H{h}") for h in range(model.spec.n_heads)] for layer in range(n)
        ]
        self.mlp_rows = [graph.upstream_index(f"L{layer}.mlp") for layer in range(n)]

    def _slots(self, act: Tensor) -> Tensor:
        return act.view(self.slots, self.n_batch, *act.shape[1:])

    def hooks(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        last = self.model.spec.n_layers - 1
        for layer in range(self.model.spec.n_layers):
            out.append((f"blocks.{layer}.hook_resid_pre", self._keep(self.x_pre, layer)))
            out += [(f"blocks.{layer}.attn.hook_{w}", self._patch_projection(layer, w)) for w in "qkv"]
            out.append((f"blocks.{layer}.attn.hook_z", self._keep(self.z, layer, self.writes.stream_z)))
            if self.graph.layout == "sequential":  # a parallel block's MLP reads hook_resid_pre
                out.append((f"blocks.{layer}.hook_resid_mid", self._keep(self.x_mid, layer)))
            out.append((f"blocks.{layer}.hook_mlp_out", self._patch_mlp(layer)))
        out.append((f"blocks.{last}.hook_resid_post", self._patch_logits))
        return out

    def _keep(self, store: list, layer: int, convert: Any = None):
        def hook(act: Tensor, hook: Any = None) -> None:
            store[layer] = self._slots(act if convert is None else convert(layer, act))

        return hook

    # ---- corrections -------------------------------------------------------------------------------
    def _pairs(self, downstream: list[int]) -> tuple[Tensor, Tensor]:
        """(slot, node position in ``downstream``) of every node that has an ablated edge in a slot."""
        has = self.dense[:, :, downstream].any(1)  # [slot, n]
        return has.nonzero(as_tuple=True)

    def _correction(self, slots: Tensor, nodes: Tensor) -> Float[Tensor, "pair batch pos d_model"]:
        """``Σ_u mask · (a_u − ã_u)`` for each (slot, downstream node) pair."""
        mask = self.dense[slots][torch.arange(len(slots)), :, nodes].to(self.weights["embed.W_E"].dtype)  # [pair, n_up]
        x_in = self.x_pre[0]
        assert x_in is not None
        out = mask[:, 0, None, None, None] * (x_in[slots] - self.ablated.input)
        for layer in range(self.model.spec.n_layers):
            heads, z = mask[:, self.head_rows[layer]], self.z[layer]
            if z is not None and bool(heads.any()):
                dz = (z[slots] - self.ablated.z[layer]) * heads[:, None, None, :, None]
                out = out + self.writes.total(layer, dz)
            m, mlp = mask[:, self.mlp_rows[layer]], self.mlp[layer]
            if mlp is not None and bool(m.any()):
                out = out + m[:, None, None, None] * (mlp[slots] - self.ablated.mlp[layer])
        return out

    # ---- patches -----------------------------------------------------------------------------------
    def _patch_projection(self, layer: int, kind: str):
        rows = [i for i, n in enumerate(self.graph.downstream) if n.layer == layer and n.kind == kind]
        index = torch.tensor([self.graph.downstream[i].index for i in rows], device=self.dense.device)
        weight = self.weights[f"blocks.{layer}.attn.W_{kind.upper()}"]
        bias = self.weights.get(f"blocks.{layer}.attn.b_{kind.upper()}")

        def hook(act: Tensor, hook: Any = None) -> Tensor | None:
            slots, nodes = self._pairs(rows)
            if len(slots) == 0:
                return None
            x_pre = self.x_pre[layer]
            assert x_pre is not None, "hook_resid_pre runs before the attention's projections"
            heads = index[nodes]
            stream = x_pre[slots] - self._correction(slots, torch.tensor(rows, device=slots.device)[nodes])
            normed = norm_module(self.model, layer, "ln1")(stream)
            proj = torch.einsum("nbpd,ndk->nbpk", normed, weight[heads].to(normed.dtype))
            if bias is not None:
                proj = proj + bias[heads][:, None, None, :]
            out = self._slots(act).clone()
            out[slots, :, :, heads] = proj.to(out.dtype)
            return out.view(act.shape)

        return hook

    def _patch_mlp(self, layer: int):
        row = self.graph.downstream_index(f"L{layer}.mlp")

        def hook(act: Tensor, hook: Any = None) -> Tensor | None:
            slots, _ = self._pairs([row])
            out = self._slots(act)
            if len(slots):
                read = self.mlp_reads[layer]
                assert read is not None, "the stream the MLP reads is kept before the MLP runs"
                stream = read[slots] - self._correction(slots, torch.full_like(slots, row))
                out = out.clone()
                out[slots] = self.functional.mlp(layer, stream).to(out.dtype)
            self.mlp[layer] = out
            return out.view(act.shape) if len(slots) else None

        return hook

    def _patch_logits(self, act: Tensor, hook: Any = None) -> Tensor | None:
        row = len(self.graph.downstream) - 1
        slots, _ = self._pairs([row])
        if len(slots) == 0:
            return None
        out = self._slots(act).clone()
        out[slots] = out[slots] - self._correction(slots, torch.full_like(slots, row)).to(out.dtype)
        return out.view(act.shape)


def check_exact_supported(model: CapModel) -> None:
    """Refuse, with the way out, a model whose MLPs capwrap's functional forward pass does not compute
    (exact edge ablation recomputes them with it)."""
    if problems := Functional.unsupported(model.spec):
        raise ConfigError(
            f"exact edge ablation recomputes MLPs with capwrap's functional forward pass, which does not compute "
            f"this {model.spec.architecture} model: {'; '.join(problems)}. attribute() (EAP, EAP-IG) scores its "
            "edges without it"
        )


@torch.inference_mode()
def ablated_metric(
    model: CapModel,
    batch: TaskBatch,
    masks: Bool[Tensor, "slot n_edges"],
    ablated: NodeValues,
    metric: Metric = DEFAULT_METRIC,
    memory_mb: float = 256.0,
    progress: bool = False,
) -> Float[Tensor, "slot batch"]:
    """The metric of each sequence with each slot's edges ablated (``masks[s, e]``: edge ``e`` ablated in slot ``s``).

    Args:
        model: the model.
        batch: the sequences.
        masks: which edges each slot ablates (edge order of the model's graph).
        ablated: the ablated outputs (:func:`~capwrap.circuits.nodes.ablated_values`), broadcastable to the batch.
        metric: ``metric(logits, batch) -> [batch]`` (default the answer's log-probability,
            :data:`~capwrap.circuits.metrics.DEFAULT_METRIC`).
        memory_mb: memory budget of one forward pass; sets how many slots share one.
        progress: show a progress bar.
    """
    graph = Graph.from_spec(model.spec)
    check_readable(model, graph)
    check_exact_supported(model)
    if masks.ndim != 2 or masks.shape[1] != graph.n_edges:
        raise ConfigError(
            f"masks must have shape [slots, {graph.n_edges}] (one column per edge), got {tuple(masks.shape)}"
        )
    if memory_mb <= 0:
        raise ConfigError(f"memory_mb must be positive, got {memory_mb}")
    batch = batch.to(model.device)
    n_batch, pos = batch.tokens.shape
    per_chunk = max(1, int(memory_mb * 2**20 // _slot_bytes(model, n_batch, pos)))
    ablated = ablated.map(lambda t: t.to(model.device))
    out = torch.empty(len(masks), n_batch)
    was_training = model.module.training
    model.eval()
    tiled_cache: dict[int, TaskBatch] = {}
    bar = tqdm(total=len(masks), desc="ablating", disable=not progress, leave=False)
    try:
        for start in range(0, len(masks), per_chunk):
            part = masks[start : start + per_chunk].bool()
            n = len(part)
            if n not in tiled_cache:
                tiled_cache[n] = batch[torch.arange(n_batch).repeat(n)]
            tiled = tiled_cache[n]
            hooks = _AblationHooks(model, graph, part, ablated, n_batch)
            with model.hooks(hooks.hooks()):
                logits = model(tiled.tokens)
            out[start : start + n] = metric_values(metric, logits, tiled).view(n, n_batch).cpu()
            bar.update(n)
    finally:
        bar.close()
        model.train(was_training)
    return out


def exact_scores(
    model: CapModel,
    batch: TaskBatch,
    *,
    metric: Metric | str = DEFAULT_METRIC,
    ablation: Ablation = "mean",
    corrupted: Tensor | None = None,
    reference: TaskBatch | None = None,
    edges: Sequence[int | str] | Tensor | None = None,
    memory_mb: float = 256.0,
    progress: bool = False,
) -> EdgeScores:
    """Each edge's score measured exactly: the batch-mean metric with that one edge ablated, minus without.

    Arguments as :func:`~capwrap.circuits.attribution.attribute`; ``edges`` limits the work to those
    edges, by position or name (``"L0H1->L1.mlp"``; the others get NaN). One forward pass per edge (many share a batched pass).
    """
    graph = Graph.from_spec(model.spec)
    metric = resolve_metric(metric)
    check_readable(model, graph)
    check_exact_supported(model)  # before the ablated values are computed for nothing
    chosen = torch.arange(graph.n_edges) if edges is None else _edge_positions(graph, edges)
    ablated = ablated_values(model, graph, ablation, batch, corrupted, reference)
    masks = torch.zeros(len(chosen) + 1, graph.n_edges, dtype=torch.bool)
    masks[torch.arange(1, len(chosen) + 1), chosen] = True  # slot 0 ablates nothing: the clean metric
    values = ablated_metric(model, batch, masks, ablated, metric, memory_mb, progress).mean(1)
    scores = torch.full((graph.n_edges,), math.nan)
    scores[chosen] = values[1:] - values[0]
    info = {"metric": getattr(metric, "__name__", repr(metric)), "sequences": len(batch)}
    return EdgeScores(graph, scores, "exact", ablation, info)


_SPLIT_FLAGS = ("set_use_split_qkv_input", "set_use_attn_result", "set_use_hook_mlp_in")


def _edge_positions(graph: Graph, edges: Sequence[int | str] | Tensor) -> Tensor:
    """Edge positions from positions or names (``"L0H1->L1.mlp"``), checked against the graph."""
    if isinstance(edges, str):
        raise ConfigError(f"edges must be a list of edge positions or names, got the string {edges!r}: write [{edges!r}]")
    items = edges.flatten().tolist() if isinstance(edges, Tensor) else list(edges)
    positions = [graph.edge_index(e) if isinstance(e, str) else whole_number(e, "an edge position") for e in items]
    if bad := [p for p in positions if p >= graph.n_edges]:
        raise ConfigError(f"edge positions {bad[:5]} are outside the graph's {graph.n_edges} edges")
    return torch.tensor(positions, dtype=torch.long)


def split_input_eap(
    model: CapModel,
    batch: TaskBatch,
    *,
    metric: Metric | str = DEFAULT_METRIC,
    ablation: Ablation = "mean",
    corrupted: Tensor | None = None,
) -> EdgeScores:
    """Attribution patching (EAP) the textbook way, over TransformerLens's split-input hooks.

    Turns on the module's split query/key/value inputs, per-head results and MLP-input hooks (and
    back to how they were), reads every head's output at ``hook_result``, every downstream input's gradient at
    ``hook_{q,k,v}_input`` / ``hook_mlp_in`` (the bridge: ``ln2.hook_in``) / the final stream, and
    sums ``(ã_u − a_u) · g_d``. It
    exists to check :func:`~capwrap.circuits.attribution.attribute` against (which needs none of
    these modes): TransformerLens offers them on the hooked backend for every architecture, and on
    the bridge for models with joint or position-embedding attention (gpt2, llama).

    Raises:
        ConfigError: the backend offers no split inputs for this architecture, or its blocks have
            post-norms (``hook_result`` holds a head's output before the norm, not its share of the stream).
    """
    graph = Graph.from_spec(model.spec)
    module = model.module
    spec = model.spec
    if spec.features.post_norm:
        raise ConfigError(
            f"the split-input reference does not describe {spec.architecture} models: their heads' results "
            "(hook_result) are taken before the post-norm, not as they join the stream"
        )
    metric = resolve_metric(metric)
    batch = batch.to(model.device)
    before = {flag: bool(getattr(module.cfg, flag.removeprefix("set_"), False)) for flag in _SPLIT_FLAGS}
    try:
        for flag in _SPLIT_FLAGS:
            getattr(module, flag)(True)
    except (NotImplementedError, AttributeError) as exc:
        for flag in _SPLIT_FLAGS:
            try:
                getattr(module, flag)(before[flag])
            except (NotImplementedError, AttributeError):
                pass
        raise ConfigError(
            f"the {model.backend} backend offers no split inputs for {spec.architecture} models: {exc}"
        ) from exc
    was_training = module.training
    model.eval()
    try:
        acts: dict[str, Tensor] = {}
        shifts: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(act: Tensor, hook: Any = None) -> None:
                acts[name] = act.detach()

            return hook

        def shift(name: str):
            def hook(act: Tensor, hook: Any = None) -> Tensor:
                shifts[name] = torch.zeros_like(act, requires_grad=True)
                return act + shifts[name]

            return hook

        last = spec.n_layers - 1
        hooks = [("blocks.0.hook_resid_pre", keep("input")), (f"blocks.{last}.hook_resid_post", shift("logits"))]
        for layer in range(spec.n_layers):
            hooks += [
                (f"blocks.{layer}.attn.hook_result", keep(f"result{layer}")),
                (f"blocks.{layer}.hook_mlp_out", keep(f"mlp{layer}")),
            ]
            hooks += [(f"blocks.{layer}.hook_{w}_input", shift(f"{w}{layer}")) for w in "qkv"]
            # The MLP's own input: the bridge's hook_mlp_in shows the stream before the skip connection
            # branches off, so read the gradient where only the MLP's branch goes: its norm's input.
            ln2_in = f"blocks.{layer}.ln2.hook_in"
            mlp_in = ln2_in if ln2_in in model.hook_names else f"blocks.{layer}.hook_mlp_in"
            hooks.append((mlp_in, shift(f"mlp_in{layer}")))

        def run(tokens: Tensor, with_grad: bool) -> dict[str, Tensor]:
            acts.clear()
            shifts.clear()
            with torch.set_grad_enabled(with_grad), model.hooks(hooks):
                logits = model(tokens)
            if with_grad:
                total = metric_values(metric, logits, batch, differentiable=True).sum()
                names = list(shifts)
                grads = torch.autograd.grad(total, [shifts[n] for n in names])
                return {**dict(acts), **{f"grad:{n}": g for n, g in zip(names, grads, strict=True)}}
            return dict(acts)

        clean = run(batch.tokens, True)

        def upstream(a: dict[str, Tensor]) -> Tensor:
            parts = [a["input"][None]]
            for layer in range(spec.n_layers):
                parts += [a[f"result{layer}"].permute(2, 0, 1, 3), a[f"mlp{layer}"][None]]
            return torch.cat(parts)

        up = upstream(clean)
        if ablation == "corrupted":
            if corrupted is None:
                raise ConfigError("ablation='corrupted' needs corrupted token ids")
            base = upstream(run(corrupted.to(model.device), False))
        elif ablation == "zero":
            base = torch.zeros_like(up)
        elif ablation == "mean":
            base = up.mean((1, 2), keepdim=True).expand_as(up)
        elif ablation == "mean_positional":
            base = up.mean(1, keepdim=True).expand_as(up)
        else:
            raise ConfigError(f"unknown ablation {ablation!r}")
        grads = []
        for node in graph.downstream:
            if node.kind in ("q", "k", "v"):
                grads.append(clean[f"grad:{node.kind}{node.layer}"][:, :, node.index])
            elif node.kind == "mlp_in":
                grads.append(clean[f"grad:mlp_in{node.layer}"])
            else:
                grads.append(clean["grad:logits"])
        g = torch.stack(grads)
        matrix = ((base - up).flatten(1).double() @ g.flatten(1).double().T) / len(batch)
    finally:
        for flag in _SPLIT_FLAGS:  # as the caller had them
            getattr(module, flag)(before[flag])
        model.train(was_training)
    return EdgeScores(
        graph, graph.from_matrix(matrix).float(), "eap-split-reference", ablation, {"sequences": len(batch)}
    )
