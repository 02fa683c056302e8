"""The component map: which slices of which canonical weights make up each component.

A *component* is a unit analyses localize to: an attention head, an MLP neuron, a whole MLP or
attention layer, a normalization layer, the embeddings. Each is a list of :class:`ParamSlice`
over the canonical (TransformerLens-named) weights of :mod:`capwrap.models.layouts`, so the same
map serves every backend.

Examples:
    >>> from capwrap.models.spec import ModelSpec
    >>> cmap = ComponentMap.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=2, d_model=8, n_heads=2))
    >>> [c.name for c in cmap.select("head")]
    ['L0H0', 'L0H1', 'L1H0', 'L1H1']
    >>> cmap["L1N5"].slices[0]
    ParamSlice(param='blocks.1.mlp.W_in', index=(slice(None, None, None), 5))
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from capwrap.errors import ConfigError, lookup
from capwrap.models.layouts import canonical_names
from capwrap.models.spec import ModelSpec

__all__ = ["ParamSlice", "Component", "ComponentMap", "ComponentKind", "norm_dtype", "tensor_norms"]

ComponentKind = Literal["embed", "pos_embed", "unembed", "norm", "attn", "head", "kv_head", "mlp", "neuron"]
COMPONENT_KINDS: tuple[str, ...] = ComponentKind.__args__  # type: ignore[attr-defined]
#: A block's attention weights (canonical names, in order) and norms, in model order.
_ATTN = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "q_norm.w", "k_norm.w")
_NORM_ORDER = {"ln1": 0, "ln1_post": 1, "ln2": 2, "ln2_post": 3}


@dataclass(frozen=True)
class ParamSlice:
    """``weights[param][index]``: the part of one canonical weight that belongs to a component."""

    param: str
    index: tuple = ()

    def of(self, weights: Mapping[str, Tensor]) -> Tensor:
        """The slice as a view of ``weights[param]`` (writes go through)."""
        return weights[self.param][self.index] if self.index else weights[self.param]


@dataclass(frozen=True)
class Component:
    """One unit of the model: ``name`` such as ``L3H1`` (head), ``L3N17`` (neuron), ``L3.mlp``."""

    name: str
    kind: ComponentKind
    layer: int | None
    index: int | None
    slices: tuple[ParamSlice, ...]

    def numel(self, weights: Mapping[str, Tensor]) -> int:
        """Number of weights in the component."""
        return sum(s.of(weights).numel() for s in self.slices)


def _with_prefix(first: list[str], names: set[str], prefix: str) -> list[str]:
    """``first``, then the other ``names`` under ``prefix`` (a generic model's own tensors), sorted."""
    return first + sorted(n for n in names if n.startswith(prefix) and n not in first)


class ComponentMap:
    """All components of a model, by name and by kind. Built from a :class:`ModelSpec`."""

    def __init__(self, components: list[Component]):
        self._components = components
        self._by_name = {c.name: c for c in components}

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ComponentMap:
        """Every component of a model with this spec, in model order."""
        has = set(canonical_names(spec))  # which weights (biases, norms, gates) this architecture has

        def present(*names: str) -> list[str]:
            return [n for n in names if n in has]

        comps: list[Component] = [Component("embed", "embed", None, None, (ParamSlice("embed.W_E"),))]
        if "pos_embed.W_pos" in has:
            comps.append(Component("pos_embed", "pos_embed", None, None, (ParamSlice("pos_embed.W_pos"),)))
        gqa = spec.n_key_value_heads != spec.n_heads
        for layer in range(spec.n_layers):
            b, a, m = f"blocks.{layer}.", f"blocks.{layer}.attn.", f"blocks.{layer}.mlp."
            norms = dict.fromkeys(n[len(b) :].split(".")[0] for n in has if n.startswith(b + "ln"))
            for ln in sorted(norms, key=lambda n: (_NORM_ORDER.get(n, 9), n)):
                params = sorted(n for n in has if n.startswith(f"{b}{ln}."))
                comps.append(Component(f"L{layer}.{ln}", "norm", layer, None, tuple(ParamSlice(p) for p in params)))
            attn_params = _with_prefix(present(*(a + p for p in _ATTN)), has, a)
            if attn_params:
                comps.append(
                    Component(f"L{layer}.attn", "attn", layer, None, tuple(ParamSlice(p) for p in attn_params))
                )
            kv_names = ("W_K", "W_V", "b_K", "b_V")
            per_head = present(*(a + p for p in ("W_Q", "W_O", "b_Q") + (() if gqa else kv_names)))
            for head in range(spec.n_heads if per_head else 0):
                comps.append(
                    Component(f"L{layer}H{head}", "head", layer, head, tuple(ParamSlice(p, (head,)) for p in per_head))
                )
            per_kv = present(*(a + p for p in kv_names)) if gqa else []
            for kv in range(spec.n_key_value_heads if per_kv else 0):
                comps.append(
                    Component(f"L{layer}KV{kv}", "kv_head", layer, kv, tuple(ParamSlice(p, (kv,)) for p in per_kv))
                )
            mlp_in = present(m + "W_in", m + "W_gate")
            mlp_params = _with_prefix(mlp_in + present(m + "W_out", m + "b_in", m + "b_out"), has, m)
            if mlp_params:
                comps.append(Component(f"L{layer}.mlp", "mlp", layer, None, tuple(ParamSlice(p) for p in mlp_params)))
            neuron_bias = present(m + "b_in")
            for n in range(spec.d_mlp if mlp_in else 0):
                slices = [ParamSlice(p, (slice(None), n)) for p in mlp_in] + [ParamSlice(m + "W_out", (n,))]
                slices += [ParamSlice(p, (n,)) for p in neuron_bias]
                comps.append(Component(f"L{layer}N{n}", "neuron", layer, n, tuple(slices)))
        final = sorted(n for n in has if n.startswith("ln_final."))
        if final:
            comps.append(Component("ln_final", "norm", None, None, tuple(ParamSlice(p) for p in final)))
        if not spec.tie_embeddings:
            comps.append(Component("unembed", "unembed", None, None, (ParamSlice("unembed.W_U"),)))
        return cls(comps)

    def __iter__(self) -> Iterator[Component]:
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    def __getitem__(self, name: str) -> Component:
        return lookup(self._by_name, name, f"no component named {name!r}", "names look like 'L0H1', 'L2N17', 'L1.mlp'")

    def select(self, kind: str, layer: int | None = None) -> list[Component]:
        """The components of one ``kind`` (optionally of one layer), in model order."""
        if kind not in COMPONENT_KINDS:
            raise ConfigError(f"unknown component kind {kind!r}; choose one of {list(COMPONENT_KINDS)}")
        return [c for c in self._components if c.kind == kind and (layer is None or c.layer == layer)]

    def to_frame(self) -> pd.DataFrame:
        """One row per component: name, kind, layer, index."""
        return pd.DataFrame(
            [(c.name, c.kind, c.layer, c.index) for c in self._components],
            columns=["name", "kind", "layer", "index"],
        )

    def sq_norms(self, tensors: Mapping[str, Tensor], kind: str, partial: bool = False) -> Tensor:
        """Squared L2 norm of each ``kind`` component's slices of ``tensors`` (canonical names),
        in :meth:`select` order, on the host in float64 (:meth:`sq_norms_by_kind` for one kind, read back).

        ``tensors`` is typically a weight difference (``tuned - base``) or the gradients. With
        ``partial``, weights absent from ``tensors`` are skipped (their share is 0): summing the
        results over groups of weights (e.g. one layer at a time) gives the whole norms.
        """
        return self.sq_norms_by_kind(tensors, (kind,), partial)[kind].cpu().double()

    def sq_norms_by_kind(
        self, tensors: Mapping[str, Tensor], kinds: Sequence[str], partial: bool = False
    ) -> dict[str, Float[Tensor, " components"]]:
        """Squared L2 norms of the components of each of ``kinds`` (as :meth:`sq_norms`), left on the
        tensors' device and read back by nothing: what a training loop can call every few steps
        without waiting for a GPU.

        Vectorized: one reduction per weight and component axis, shared by every kind that needs it
        (``attn`` and ``head`` reduce the same attention weights), in at least float32 (pairwise
        sums), then one gather and scatter-add per kind — a few dozen operations for any model
        size, where a loop over weights and kinds launched hundreds.

        Examples:
            >>> from capwrap.models import ModelSpec, build_model
            >>> model = build_model(ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=8, n_heads=2), seed=0)
            >>> cmap = model.components
            >>> ones = {name: torch.ones_like(w) for name, w in model.weights().items()}
            >>> norms = cmap.sq_norms_by_kind(ones, ["head", "neuron"])
            >>> norms["head"].tolist()  # W_Q, W_K, W_V [8, 4] and b_Q, b_K, b_V [4] and W_O [4, 8] of each head
            [140.0, 140.0]
        """
        if isinstance(kinds, str):
            raise ConfigError(f"kinds must be a sequence of component kinds, such as [{kinds!r}], not a string")
        kinds = tuple(kinds)
        plans = {
            kind: [(key, where) for key, where in self._plan(kind).items() if not (partial and key[0] not in tensors)]
            for kind in kinds
        }
        wanted: dict[tuple[str, int | None], None] = {}  # (weight, component axis) asked of the weights, in order
        for plan in plans.values():
            wanted.update(dict.fromkeys(key for key, _ in plan))
        if not wanted:
            return {kind: torch.zeros(len(self.select(kind)), dtype=torch.float64) for kind in kinds}
        with torch.no_grad():
            whole = [param for param, axis in wanted if axis is None]  # whole weights: one fused norm for all
            sliced = [(param, axis) for param, axis in wanted if axis is not None]
            pieces: list[Tensor] = []
            if whole:
                pieces.append(tensor_norms([tensors[p] for p in whole]).square())
            squares: dict[str, Tensor] = {}
            for param, axis in sliced:
                if param not in squares:
                    t = tensors[param]
                    squares[param] = t.to(norm_dtype((t.dtype,))).square()
                sq = squares[param]
                dims = [d for d in range(sq.ndim) if d != axis]
                pieces.append(sq.sum(dim=dims) if dims else sq)
            device = pieces[0].device
            flat = torch.cat([piece if piece.device == device else piece.to(device) for piece in pieces])
            layout = (tuple(whole), tuple(sliced))
            gathers = self._gathers(kinds, layout, [len(p) for p in pieces[bool(whole) :]], device)
            return {
                kind: torch.zeros(size, dtype=flat.dtype, device=device).index_add_(0, dst, flat[src])
                for kind, (size, src, dst) in zip(kinds, gathers, strict=True)
            }

    def _gathers(
        self, kinds: tuple[str, ...], layout: tuple[tuple[str, ...], tuple[tuple[str, int], ...]], lengths: list[int],
        device: torch.device,
    ) -> list[tuple[int, Tensor, Tensor]]:  # fmt: skip
        """For each kind: its number of components, and which positions of the concatenated
        reductions add into which component. ``layout``: the whole weights (one position each),
        then the (weight, axis) reductions, whose sizes are ``lengths``. Cached per layout and device."""
        cache = self.__dict__.setdefault("_gather_cache", {})
        key = (kinds, layout, tuple(lengths), str(device))
        if key not in cache:
            whole, sliced = layout
            offsets = {(param, None): i for i, param in enumerate(whole)}
            n = len(whole)
            for reduction, length in zip(sliced, lengths, strict=True):
                offsets[reduction] = n
                n += length
            out = []
            for kind in kinds:
                plan = [(k, w) for k, w in self._plan(kind).items() if k in offsets]
                none = [torch.zeros(0, dtype=torch.long)]
                src = torch.cat([positions + offsets[k] for k, (_, positions) in plan] or none)
                dst = torch.cat([ids for _, (ids, _) in plan] or none)
                out.append((len(self.select(kind)), src.to(device), dst.to(device)))
            cache[key] = out
        return cache[key]

    def _plan(self, kind: str) -> dict[tuple[str, int | None], tuple[Tensor, Tensor]]:
        """For each (weight, component axis): which component gets which slice position."""
        cache = self.__dict__.setdefault("_plans", {})
        if kind not in cache:
            groups: dict[tuple[str, int | None], tuple[list[int], list[int]]] = {}
            for i, comp in enumerate(self.select(kind)):
                for sl in comp.slices:
                    if not sl.index:
                        key, pos = (sl.param, None), 0
                    else:
                        axis = next(d for d, ix in enumerate(sl.index) if isinstance(ix, int))
                        key, pos = (sl.param, axis), sl.index[axis]
                    ids, positions = groups.setdefault(key, ([], []))
                    ids.append(i)
                    positions.append(pos)
            cache[kind] = {k: (torch.tensor(a), torch.tensor(b)) for k, (a, b) in groups.items()}
        return cache[kind]

    def counts(self) -> dict[str, int]:
        """How many components of each kind the model has."""
        return self.to_frame()["kind"].value_counts().reindex(COMPONENT_KINDS).dropna().astype(int).to_dict()


def norm_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype norms of tensors of ``dtypes`` are summed in: their common dtype, at least float32.

    Examples:
        >>> norm_dtype([torch.bfloat16, torch.float16]), norm_dtype([torch.float64])
        (torch.float32, torch.float64)
    """
    return _norm_dtype(frozenset(dtypes))


def tensor_norms(tensors: Sequence[Tensor]) -> Float[Tensor, " n"]:
    """The L2 norm of each of ``tensors``: one fused operation (``torch._foreach_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` takes them) in their :func:`norm_dtype`, stacked on the first
    tensor's device, read back by nothing (on a GPU a read waits for the device).

    Examples:
        >>> tensor_norms([torch.full((2, 2), 1.0), torch.tensor([3.0, 4.0], dtype=torch.bfloat16)])
        tensor([2., 5.])
    """
    with torch.no_grad():
        norms = torch._foreach_norm(list(tensors), 2, dtype=norm_dtype(t.dtype for t in tensors))
        device = norms[0].device
        return torch.stack([n if n.device == device else n.to(device) for n in norms])


@functools.cache
def _norm_dtype(dtypes: frozenset[torch.dtype]) -> torch.dtype:
    return functools.reduce(torch.promote_types, dtypes, torch.float32)
