"""Reading the graph's nodes off a running model: upstream outputs, downstream input gradients, ablations.

Everything here uses the model's own TransformerLens hooks, its canonical weights and its own norm
modules, so it works on both backends and every architecture without knowing either:

* an upstream node's output: ``blocks.0.hook_resid_pre`` (the input), ``blocks.{l}.attn.hook_z`` times
  ``W_O[h]`` (head ``h``), ``blocks.{l}.hook_mlp_out`` (the MLP); behind a post-norm (Gemma-2/3,
  OLMo-2), which normalizes the attention's and the MLP's outputs before they join the stream, a
  head's output is its share of the normalized attention output, the norm's scale frozen at the
  pass's own value (:class:`HeadWrites`), and ``hook_mlp_out`` holds the MLP's normalized output;
* a downstream node's input gradient, from one backward pass: a query/key/value input's is the
  gradient at ``hook_q``/``hook_k``/``hook_v`` (the projections, before rotary) times ``W[h]``, pulled
  back through block ``l``'s ``ln1`` module at the stream it read (one vector-Jacobian product per
  layer, all heads at once); an MLP input's is the gradient at ``hook_resid_mid`` along the MLP's
  branch: the TransformerBridge places that hook on the branch (``ln2``'s input), HookedTransformer
  before the skip connection branches off, where the skip's share — the gradient at
  ``hook_resid_post`` — is taken off (:data:`RESID_MID_HOLDS_THE_SKIP`); in a parallel block, whose
  MLP reads the block's input beside attention, it is pulled back through the block's ``ln2`` and MLP
  modules from the gradient at ``hook_resid_post`` (one vector-Jacobian product per layer); the
  logits' is the gradient at the last ``hook_resid_post``.

Gradients are read through zero *shifts* added at those hooks (``act + shift``; ``shift.grad`` is the
gradient at ``act``), which works on both backends, also where a hook shows a reshaped view of the
tensor the model goes on with.

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.circuits.graph import Graph
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=8, n_layers=2, d_model=16, n_heads=2))
    >>> graph = Graph.from_spec(model.spec)
    >>> capture = NodeCapture(model, graph)
    >>> with model.hooks(capture.hooks()):
    ...     logits = model(torch.randint(0, 20, (3, 8)))
    >>> logits[:, -1, 0].sum().backward()
    >>> capture.values().upstream(capture.writes).shape  # [n_up, batch, pos, d_model]
    torch.Size([7, 3, 8, 16])
    >>> capture.gradients().shape                          # [n_down, batch, pos, d_model]
    torch.Size([15, 3, 8, 16])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from capwrap.circuits.graph import Graph, Node
from capwrap.errors import ConfigError
from capwrap.models import CapModel
from capwrap.models.families import FAMILIES
from capwrap.models.functional import Functional
from capwrap.tasks.base import TaskBatch

__all__ = [
    "ABLATIONS",
    "UPSTREAM_HOOKS",
    "Ablation",
    "HeadWrites",
    "NodeCapture",
    "NodeValues",
    "SELF_ABLATIONS",
    "ablated_values",
    "check_readable",
    "norm_module",
    "upstream_hook",
]

Ablation = Literal["mean", "mean_positional", "zero", "corrupted"]
#: What an ablated upstream node outputs instead of its own output: its ``mean`` over the batch and
#: positions (circuit-tuning's and EAP-IG's "mean"), its ``mean_positional`` (over the batch, at each
#: position), ``zero``, or its output on ``corrupted`` inputs (the same positions of other sequences).
ABLATIONS: tuple[str, ...] = ("mean", "mean_positional", "zero", "corrupted")
#: The ablations that need nothing but the scored sequences (``corrupted`` needs corrupted ones): what
#: whatever scores a task's own batches (circuit-tuning, the Subgraph analyzer) can use.
SELF_ABLATIONS: tuple[str, ...] = ("mean", "mean_positional", "zero")


#: Whether a backend's ``blocks.{l}.hook_resid_mid`` sits before the skip connection and the MLP part
#: (HookedTransformer: a shift there moves both, so its gradient is the skip's — ``hook_resid_post``'s
#: — plus the MLP branch's) or on the MLP branch alone (the TransformerBridge: it is ``ln2``'s input).
#: Either way the MLP input's gradient comes from the pass's own backward, with no MLP recomputed.
RESID_MID_HOLDS_THE_SKIP: dict[str, bool] = {"hooked": True, "bridge": False}


def norm_module(model: CapModel, layer: int, which: str = "ln1") -> nn.Module:
    """Block ``layer``'s norm module ``ln1`` (before attention) or ``ln2`` (before the MLP), as the model
    runs it (TransformerLens names it the same on both backends); identity where the model has none.

    It is applied to tensors with extra leading dimensions (one copy of the stream per head), which
    every TransformerLens norm supports: norms act on the last dimension. A block without norms
    before its sub-layers (OLMo-2's post-norm-only blocks, whose HookedTransformer and TL 3.9 bridge
    call the norms after them ``ln1``/``ln2``) gets the identity.
    """
    if not model.spec.features.pre_norm:
        return nn.Identity()
    block = model.module.blocks[layer]
    module = getattr(block, which, None)
    return module if module is not None else nn.Identity()


#: The hook that holds each kind of upstream node's output (a layer's heads share ``hook_z``).
UPSTREAM_HOOKS: dict[str, str] = {
    "input": "blocks.0.hook_resid_pre",
    "head": "blocks.{layer}.attn.hook_z",
    "mlp": "blocks.{layer}.hook_mlp_out",
}


def upstream_hook(node: Node) -> str:
    """The hook name that holds upstream ``node``'s output (what :class:`NodeCapture` can override)."""
    return UPSTREAM_HOOKS[node.kind].format(layer=node.layer)


def check_readable(model: CapModel, graph: Graph) -> None:
    """Raise a clear error when ``model`` lacks a hook or a weight its graph is read through.

    Every family capwrap describes has them all (tested on both backends). A model of no known family
    (loaded through the generic path) may not: capwrap cannot tell how its blocks join the stream,
    and its bridge may show them otherwise — GPT-J's and Phi-1/2's blocks run attention and the MLP
    in parallel and have no ``hook_resid_mid``, and CodeGen's and Falcon's attention weights are
    not read per head.

    Raises:
        ConfigError: names what is missing and why.
    """
    n = model.spec.n_layers
    leaves = ["hook_resid_pre", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "hook_mlp_out"]
    hooks = [f"blocks.{layer}.{leaf}" for layer in range(n) for leaf in [*leaves, "hook_resid_post"]]
    if graph.layout == "sequential":
        hooks += [f"blocks.{layer}.hook_resid_mid" for layer in range(n)]
    if model.spec.features.post_norm:
        hooks += [f"blocks.{layer}.hook_attn_out" for layer in range(n)]
    weights = [f"blocks.{layer}.attn.W_{w}" for layer in range(n) for w in "OQKV"]
    present_hooks, present_weights = set(model.hook_names), set(model.weights())
    missing = [h for h in hooks if h not in present_hooks] + [w for w in weights if w not in present_weights]
    if not missing:
        return
    why = (
        f"capwrap has no description of {model.spec.architecture} blocks, so it reads them as the sequential "
        "pre-norm blocks of GPT-2 and Llama, and this model does not show them that way"
        if model.spec.family is None
        else "its TransformerLens model does not show them"
    )
    raise ConfigError(
        f"capwrap's edge attribution cannot read this {model.spec.architecture} model: it needs "
        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} ({len(missing)} missing), and {why}. "
        f"Edge attribution, circuits and circuit-tuning work on these families: {', '.join(f.title for f in FAMILIES.values())}"
    )


class HeadWrites:
    """How each layer's heads write into the residual stream: head ``h`` adds ``z[..., h, :] @ W[h]``.

    In a block without a post-norm ``W`` is ``W_O`` and ``z`` the attention's own (``hook_z``). Behind
    a post-norm (Gemma-2/3, OLMo-2) the attention's output ``Σ_h z_h W_O[h] + b_O`` is normalized
    before it joins the stream. With the norm's scale frozen at the pass's own value
    (:meth:`~capwrap.models.functional.Functional.norm_scale`) the norm is linear, so each head's
    share of what joins the stream is ``norm_linear(z_h W_O[h] * scale)``: :meth:`stream_z` scales
    ``z``, and :meth:`outputs` / :meth:`total` apply ``W_O`` and the norm's linear part. The shares
    add up to the normalized output, but for the norm's share of ``b_O`` (and a LayerNorm's bias),
    which — like ``b_O`` in any block — belongs to no node. Means and interpolations of scaled ``z``
    are those of the shares, so ablations and integrated gradients work on them unchanged.

    Args:
        model: the model (its weights are read as they are when a method is called).

    Example:
        >>> import torch
        >>> from capwrap.models import ModelSpec, build_model
        >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=8, n_layers=1, d_model=16, n_heads=2, architecture="gemma2"))
        >>> writes, z = HeadWrites(model), torch.randn(3, 8, 2, 8)
        >>> writes.post_norm, writes.outputs(0, writes.stream_z(0, z)).shape  # [head, batch, pos, d_model]
        (True, torch.Size([2, 3, 8, 16]))
    """

    def __init__(self, model: CapModel):
        self.post_norm = bool(model.spec.features.post_norm)
        # only the norms and the heads' sum are used, which a checkpoint's extras (rope scaling ...) do not touch
        self._functional = Functional(model, check=False) if self.post_norm else None
        weights = model.weights()
        self._w_o = [weights[f"blocks.{layer}.attn.W_O"].detach() for layer in range(model.spec.n_layers)]

    def stream_z(self, layer: int, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        """The attention's ``z`` (at ``hook_z``) as its heads join the stream: times the post-norm's
        scale of this very ``z``; unchanged without a post-norm."""
        if self._functional is None:
            return z
        scale = self._functional.norm_scale(self._functional.attn_sum(layer, z))  # [batch, pos, 1]
        return z * scale[..., None].to(z.dtype)

    def outputs(self, layer: int, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "head batch pos d_model"]:
        """Each head's output in the stream, from :meth:`stream_z`'s ``z``."""
        return self._into_stream(layer, torch.einsum("bphk,hkd->hbpd", z, self._w_o[layer].to(z)))

    def total(self, layer: int, z: Float[Tensor, "... head d_head"]) -> Float[Tensor, "... d_model"]:
        """The heads' outputs added up, from :meth:`stream_z`'s ``z`` (any leading dimensions)."""
        return self._into_stream(layer, torch.einsum("...hk,hkd->...d", z, self._w_o[layer].to(z)))

    def _into_stream(self, layer: int, y: Tensor) -> Tensor:
        """``y`` (sums of ``z @ W_O``) through the post-norm's linear part, if any."""
        if self._functional is None:
            return y
        return self._functional.norm_linear(y, f"blocks.{layer}.ln1_post").to(y.dtype)


@dataclass
class NodeValues:
    """Upstream node outputs in compact form: the head outputs as ``z`` (:meth:`HeadWrites.outputs`
    turns ``z[..., h, :]`` into head ``h``'s output). Leading dimensions may be 1 (broadcast): a mean
    is ``[1, 1, ...]``.

    Attributes:
        input: ``[batch, pos, d_model]`` — what enters block 0.
        z: per layer, ``[batch, pos, head, d_head]``, as the heads join the stream (:meth:`HeadWrites.stream_z`).
        mlp: per layer, ``[batch, pos, d_model]``.
    """

    input: Tensor
    z: list[Tensor]
    mlp: list[Tensor]

    def map(self, fn: Callable[[Tensor], Tensor]) -> NodeValues:
        """``fn`` applied to every tensor."""
        return NodeValues(fn(self.input), [fn(t) for t in self.z], [fn(t) for t in self.mlp])

    def at(self, hook: str) -> Tensor:
        """The output held at ``hook`` (a name :func:`upstream_hook` gives): the input, a layer's ``z``
        or its MLP's output."""
        held = {UPSTREAM_HOOKS["input"]: self.input}
        for layer, (z, mlp) in enumerate(zip(self.z, self.mlp, strict=True)):
            held[UPSTREAM_HOOKS["head"].format(layer=layer)] = z
            held[UPSTREAM_HOOKS["mlp"].format(layer=layer)] = mlp
        return held[hook]

    def upstream(self, writes: HeadWrites) -> Float[Tensor, "n_up batch pos d_model"]:
        """Every upstream node's output, in graph order (``input``, then per layer its heads and its
        MLP), the heads' by ``writes`` (the model's :class:`HeadWrites`)."""
        if not isinstance(writes, HeadWrites):
            raise ConfigError(
                f"NodeValues.upstream takes the model's HeadWrites (HeadWrites(model), or NodeCapture.writes), "
                f"not a {type(writes).__name__}: behind a post-norm a head's output is not z @ W_O"
            )
        parts = [self.input.unsqueeze(0)]
        for layer, (z, mlp) in enumerate(zip(self.z, self.mlp, strict=True)):
            parts.append(writes.outputs(layer, z))
            parts.append(mlp.unsqueeze(0))
        shape = torch.broadcast_shapes(*(p.shape[1:] for p in parts))
        return torch.cat([p.expand(p.shape[0], *shape) for p in parts])


class NodeCapture:
    """Forward hooks that record the upstream outputs and, after a backward pass, the downstream input
    gradients of one forward pass (see the module docstring). It is built once per pass, so it
    leaves :func:`check_readable` to the entry points (``attribute``, ``ablated_values``,
    ``ablated_metric``, ``CircuitTuning.setup``): call it first on a model of no known family.

    Args:
        model: the model.
        graph: its graph.
        grads: also add the zero shifts that read gradients (``False``: values only, cheaper).
        overrides: upstream outputs replaced in the pass (integrated gradients interpolate them), by
            hook name: ``blocks.0.hook_resid_pre`` (the input, ``[batch, pos, d_model]``),
            ``blocks.{l}.attn.hook_z`` (layer ``l``'s heads, ``[batch, pos, head, d_head]``, as
            :attr:`NodeValues.z` holds them; behind a post-norm they replace the heads' shares where
            the normalized output joins the stream, ``hook_attn_out``), ``blocks.{l}.hook_mlp_out``
            (its MLP); broadcast to the pass's shape.

    Attributes:
        writes: how the model's heads write into the stream (:class:`HeadWrites`), for
            :meth:`NodeValues.upstream`.
    """

    def __init__(
        self, model: CapModel, graph: Graph, grads: bool = True, overrides: Mapping[str, Tensor] | None = None
    ):
        self.model, self.graph, self.grads = model, graph, grads
        self.overrides = dict(overrides or {})
        allowed = {upstream_hook(node) for node in graph.upstream}
        if unknown := sorted(set(self.overrides) - allowed):
            raise ConfigError(
                f"cannot override {unknown}: only upstream outputs can be replaced "
                f"({', '.join(UPSTREAM_HOOKS.values())} with layer < {model.spec.n_layers})"
            )
        n = model.spec.n_layers
        self.resid_pre: list[Tensor | None] = [None] * n
        self.z: list[Tensor | None] = [None] * n
        self.mlp: list[Tensor | None] = [None] * n
        self.shifts: dict[str, Tensor] = {}
        self.writes = HeadWrites(model)

    def hooks(self) -> list[tuple[str, Callable[[Tensor, Any], Tensor | None]]]:
        """``(hook name, function)`` pairs for :meth:`CapModel.hooks`."""
        out: list[tuple[str, Callable]] = []
        for layer in range(self.model.spec.n_layers):
            heads = f"blocks.{layer}.attn.hook_z"
            for store, name in ((self.resid_pre, f"blocks.{layer}.hook_resid_pre"), (self.z, heads)):
                out.append((name, self._keep(store, layer, name)))
            if self.writes.post_norm and heads in self.overrides:
                out.append((f"blocks.{layer}.hook_attn_out", self._replace_heads_behind_norm(layer)))
            mlp = f"blocks.{layer}.hook_mlp_out"
            out.append((mlp, self._keep(self.mlp, layer, mlp)))
            if self.grads:
                names = [f"blocks.{layer}.attn.hook_{w}" for w in "qkv"]
                if self.graph.layout == "sequential":  # a parallel block's MLP input is the block's input
                    names.append(f"blocks.{layer}.hook_resid_mid")
                names.append(f"blocks.{layer}.hook_resid_post")
                out += [(name, self._shift(name)) for name in names]
        return out

    def _keep(self, store: list, layer: int, name: str):
        """Keep hook ``name``'s activation in ``store`` (a ``z`` as its heads join the stream),
        replaced first by its override — but heads behind a post-norm, replaced where the attention's
        output joins the stream (:meth:`_replace_heads_behind_norm`)."""
        heads = store is self.z
        override = None if heads and self.writes.post_norm else self.overrides.get(name)

        def hook(act: Tensor, hook: Any = None) -> Tensor | None:
            if override is not None:
                act = override.to(act.device, act.dtype).expand_as(act)
            store[layer] = self.writes.stream_z(layer, act.detach()) if heads else act.detach()
            return act if override is not None else None

        return hook

    def _replace_heads_behind_norm(self, layer: int):
        """Behind a post-norm: the attention's normalized output with its heads' shares replaced by
        the override's (the norm's share of the biases, which belongs to no head, kept as a constant)."""
        override = self.overrides[f"blocks.{layer}.attn.hook_z"]

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            current = self.z[layer]
            if current is None:
                raise RuntimeError(f"blocks.{layer}.attn.hook_z did not run before blocks.{layer}.hook_attn_out")
            new = override.to(act.device, current.dtype).expand_as(current)
            self.z[layer] = new
            rest = (act - self.writes.total(layer, current).to(act.dtype)).detach()
            return rest + self.writes.total(layer, new).to(act.dtype)

        return hook

    def _shift(self, name: str):
        def hook(act: Tensor, hook: Any = None) -> Tensor:
            if not torch.is_grad_enabled():
                return act
            shift = torch.zeros_like(act, requires_grad=True)
            self.shifts[name] = shift
            return act + shift

        return hook

    def values(self) -> NodeValues:
        """The upstream outputs of the recorded pass."""
        if any(t is None for t in self.resid_pre):
            raise ConfigError("no forward pass was recorded: run the model inside model.hooks(capture.hooks())")
        return NodeValues(self.resid_pre[0], list(self.z), list(self.mlp))  # type: ignore[arg-type]

    def gradients(self, grads: Mapping[str, Tensor] | None = None) -> Float[Tensor, "n_down batch pos d_model"]:
        """Every downstream node's input gradient, in graph order.

        Args:
            grads: gradients at the shifts by hook name (from ``torch.autograd.grad``); default: the
                shifts' ``.grad`` after ``backward()``.
        """
        if grads is None:
            grads = {name: s.grad for name, s in self.shifts.items()}
        missing = [n for n, g in grads.items() if g is None]
        if not self.shifts or missing:
            raise ConfigError(
                "no gradients were recorded: create NodeCapture(grads=True), run the forward pass with gradients "
                "enabled inside model.hooks(capture.hooks()), then call backward() on the metric"
            )
        weights = self.model.weights()
        spec = self.model.spec
        by_layer: dict[int, list[int]] = {}
        for i, node in enumerate(self.graph.downstream):
            if node.kind in ("q", "k", "v"):
                by_layer.setdefault(node.layer, []).append(i)
        last = grads[f"blocks.{spec.n_layers - 1}.hook_resid_post"]
        out = last.new_empty((len(self.graph.downstream), *last.shape))
        for layer in range(spec.n_layers):
            rows = by_layer[layer]
            cotangents = []
            for i in rows:
                node = self.graph.downstream[i]
                g = grads[f"blocks.{layer}.attn.hook_{node.kind}"][:, :, node.index]  # [batch, pos, d_head]
                w = weights[f"blocks.{layer}.attn.W_{node.kind.upper()}"][node.index].detach()  # [d_model, d_head]
                cotangents.append(g @ w.T.to(g))  # (a weight accelerate offloaded sits on the CPU)
            x = self.resid_pre[layer]
            assert x is not None
            x = x.clone().requires_grad_(True)
            with torch.enable_grad():  # one vector-Jacobian product of ln1 per node, batched over the nodes
                normed = norm_module(self.model, layer, "ln1")(x)
                (pulled,) = torch.autograd.grad(normed, x, torch.stack(cotangents), is_grads_batched=True)
            out[rows] = pulled.to(out.dtype)
            out[self.graph.downstream_index(f"L{layer}.mlp")] = self._mlp_input_gradient(layer, grads).to(out.dtype)
        out[-1] = last
        return out

    def _mlp_input_gradient(self, layer: int, grads: Mapping[str, Tensor]) -> Tensor:
        """The gradient at layer ``layer``'s MLP input along the MLP's branch alone: in sequential
        blocks from the pass's own backward (:data:`RESID_MID_HOLDS_THE_SKIP`); in parallel blocks,
        whose MLP reads the block's input beside attention, one vector-Jacobian product of the block's
        own ``ln2`` and MLP modules at that input, the cotangent being the gradient at the block's
        output, which the MLP's output joins as it is (call it after the pass, outside its hooks)."""
        post = grads[f"blocks.{layer}.hook_resid_post"]
        if self.graph.layout == "parallel":
            x = self.resid_pre[layer]
            assert x is not None
            x = x.clone().requires_grad_(True)
            with torch.enable_grad():  # the block's own modules, as the pass ran them (and as ln1 is read)
                out = self.model.module.blocks[layer].mlp(norm_module(self.model, layer, "ln2")(x))
                (pulled,) = torch.autograd.grad(out, x, post.to(out.dtype))
            return pulled
        mid = grads[f"blocks.{layer}.hook_resid_mid"]
        return mid - post if RESID_MID_HOLDS_THE_SKIP[self.model.backend] else mid


@torch.no_grad()
def capture_values(model: CapModel, tokens: Tensor, graph: Graph) -> NodeValues:
    """Upstream outputs of one forward pass without gradients."""
    capture = NodeCapture(model, graph, grads=False)
    with torch.inference_mode(), model.hooks(capture.hooks()):
        model(tokens.to(model.device))
    return capture.values()


def ablated_values(
    model: CapModel,
    graph: Graph,
    ablation: Ablation,
    batch: TaskBatch,
    corrupted: Tensor | None = None,
    reference: TaskBatch | None = None,
) -> NodeValues:
    """What each upstream node outputs when ablated (see :data:`ABLATIONS`), broadcastable to ``batch``.

    Args:
        model: the model.
        graph: its graph.
        ablation: ``mean``, ``mean_positional``, ``zero`` or ``corrupted``.
        batch: the sequences that are scored.
        corrupted: for ``corrupted``: token ids of the same shape as ``batch.tokens``.
        reference: for the means: the sequences they are taken over (default: ``batch``).
    """
    check_ablation(ablation, batch, corrupted, reference)
    check_readable(model, graph)
    if ablation == "corrupted":
        assert corrupted is not None
        return capture_values(model, corrupted, graph)
    values = capture_values(model, (batch if reference is None else reference).tokens, graph)
    if ablation == "zero":
        return values.map(lambda t: torch.zeros_like(t[:1, :1]))
    dims = (0, 1) if ablation == "mean" else (0,)
    return values.map(lambda t: t.mean(dims, keepdim=True))


def check_ablation(
    ablation: str, batch: TaskBatch, corrupted: Tensor | None, reference: TaskBatch | None = None
) -> None:
    """Raise a clear error for an unknown ablation, corrupted tokens that do not fit ``batch``, or
    reference sequences the means cannot be taken over (empty, of another length, or a single
    sequence for ``mean_positional``, whose mean is that sequence itself: nothing would be ablated)."""
    for name, given in (("batch", batch), ("reference", reference)):
        if given is not None and not isinstance(given, TaskBatch):
            raise ConfigError(f"{name} must be a TaskBatch (task.sample(n), with the answers metrics read), "
                              f"not a {type(given).__name__}")  # fmt: skip
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r}; choose one of {list(ABLATIONS)}")
    if reference is not None and ablation not in ("mean", "mean_positional"):
        raise ConfigError(f"reference= gives the sequences a mean ablation averages over; ablation={ablation!r} "
                          "uses none: leave reference out")  # fmt: skip
    if ablation in ("mean", "mean_positional"):
        over = batch if reference is None else reference
        if len(over.tokens) == 0:
            raise ConfigError(f"the {'batch' if reference is None else 'reference batch'} is empty: the means "
                              "need sequences to average over")  # fmt: skip
        if ablation == "mean_positional":
            if over.tokens.shape[1] != batch.tokens.shape[1]:
                raise ConfigError(f"ablation='mean_positional' takes each position's mean, so the reference's "
                                  f"sequences must be as long as the batch's ({over.tokens.shape[1]} vs "
                                  f"{batch.tokens.shape[1]} tokens); use ablation='mean' or a reference of that length")  # fmt: skip
            if len(over.tokens) < 2:
                raise ConfigError("ablation='mean_positional' over a single sequence ablates each position to its own "
                                  "value, so nothing changes and every score is numerical noise: score at least 2 "
                                  "sequences (or give reference= more of them)")  # fmt: skip
    if ablation == "corrupted":
        if corrupted is None:
            raise ConfigError("ablation='corrupted' needs corrupted=<token ids of the same shape as the batch>")
        if tuple(corrupted.shape) != tuple(batch.tokens.shape):
            raise ConfigError(
                f"corrupted tokens {tuple(corrupted.shape)} must have the batch's shape {tuple(batch.tokens.shape)}: "
                "each corrupted sequence stands in for the clean one at the same positions"
            )
    elif corrupted is not None:
        raise ConfigError(f"corrupted tokens are only used by ablation='corrupted', not {ablation!r}")
