"""The computational graph of a model: which node writes into the residual stream that which node reads.

A transformer's residual stream is a sum: the embeddings, plus every attention head's output, plus
every MLP's output. Each *downstream* node reads that sum at one point of the model, so its input
is a sum over the *upstream* nodes written before that point — one **edge** per pair. Ablating an
edge changes what one downstream node sees of one upstream node and nothing else.

* **upstream** (writers): ``input`` (token and position embeddings, what enters block 0), each head's
  output ``L{l}H{h}`` (``z @ W_O[h]``), each MLP's output ``L{l}.mlp``;
* **downstream** (readers): each head's query, key and value input ``L{l}H{h}.q`` / ``.k`` / ``.v`` (with
  grouped-query attention the keys and values belong to the key/value head: ``L{l}KV{g}.k``), each
  MLP's input ``L{l}.mlp``, and the ``logits`` (the final residual stream, before the last norm).

In sequential pre-norm blocks (each block reads the stream before attention, then again before the
MLP, and adds each output to it as it is), layer ``l``'s heads read what the input and
every earlier layer wrote; its MLP reads that plus its own layer's heads. In parallel blocks
(GPT-NeoX / Pythia) the MLP reads the block's input, as the heads do, so no edge joins a
layer's heads to its own MLP (:data:`STREAM_OFFSETS`). Behind post-norms (Gemma-2/3, OLMo-2), which
normalize the attention's and the MLP's outputs before they join the stream, the edges are the same:
a head writes its share of the normalized attention output, the norm's scale frozen at the pass's
own (:class:`~capwrap.circuits.nodes.HeadWrites`). Each node owns the
parameter slices it applies to the stream (:meth:`Graph.node_params`): a head's output ``W_O[h]``, its
query/key/value ``W_Q[h]``/``W_K[h]``/``W_V[h]`` with their biases, an MLP's output ``W_out``/``b_out``
and input ``W_in``/``W_gate``/``b_in``. The embeddings, the norms and the unembedding belong to no node.

Examples:
    >>> from capwrap.models import ModelSpec
    >>> graph = Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=2, d_model=8, n_heads=2))
    >>> len(graph.upstream), len(graph.downstream), graph.n_edges
    (7, 15, 46)
    >>> graph.edge_names[:3]
    ['input->L0H0.q', 'input->L0H0.k', 'input->L0H0.v']
    >>> graph.has_edge("L0H1", "L0.mlp"), graph.has_edge("L1H0", "L1H1.q")
    (True, False)
    >>> pythia = Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=2, d_model=8, n_heads=2, architecture="gpt_neox"))
    >>> pythia.layout, pythia.has_edge("L0H1", "L0.mlp"), pythia.has_edge("L0H1", "L1.mlp"), pythia.n_edges
    ('parallel', False, True, 42)
    >>> [p.param for p in graph.node_params(graph.downstream_node("L1H1.q"))]
    ['blocks.1.attn.W_Q', 'blocks.1.attn.b_Q']
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from capwrap.errors import ConfigError, lookup
from capwrap.models.components import ParamSlice
from capwrap.models.layouts import canonical_names
from capwrap.models.spec import ModelSpec

__all__ = [
    "DOWNSTREAM_KINDS",
    "STREAM_OFFSETS",
    "UPSTREAM_KINDS",
    "Graph",
    "Node",
    "NodeKind",
    "block_layout",
]

NodeKind = Literal["input", "head", "mlp", "q", "k", "v", "mlp_in", "logits"]
UPSTREAM_KINDS: tuple[str, ...] = ("input", "head", "mlp")
DOWNSTREAM_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp_in", "logits")

#: Where in the residual stream each kind of node writes (upstream) or reads (downstream), by block
#: layout: at ``2 * layer + offset``, where the stream before block ``l``'s attention is ``2 * l``,
#: before its MLP ``2 * l + 1`` and after the last block ``2 * n_layers`` (``input`` has layer -1,
#: ``logits`` layer ``n_layers``). A writer at ``w`` reaches every reader at ``r >= w``. In a
#: ``sequential`` block the MLP reads what the block's heads wrote; in a ``parallel`` one (GPT-NeoX /
#: Pythia: ``BlockFeatures.parallel``) attention and the MLP both read the block's input, and the
#: heads' outputs join the stream with the MLP's. This table is the one place that knows the layouts.
STREAM_OFFSETS: dict[str, dict[str, int]] = {
    "sequential": {"input": 2, "head": 1, "mlp": 2, "q": 0, "k": 0, "v": 0, "mlp_in": 1, "logits": 0},
    "parallel": {"input": 2, "head": 2, "mlp": 2, "q": 0, "k": 0, "v": 0, "mlp_in": 0, "logits": 0},
}


def block_layout(spec: ModelSpec) -> str:
    """``parallel`` or ``sequential``: how a block of ``spec`` runs attention and the MLP (a key of
    :data:`STREAM_OFFSETS`)."""
    return "parallel" if spec.features.parallel else "sequential"


#: The canonical weights a node's parameters live in: (leaf name, sliced by the node's head?).
#: Weights an architecture lacks (biases, the gate) are skipped.
_NODE_PARAMS: dict[str, tuple[tuple[str, bool], ...]] = {
    "input": (),
    "logits": (),
    "head": (("attn.W_O", True),),
    "q": (("attn.W_Q", True), ("attn.b_Q", True)),
    "k": (("attn.W_K", True), ("attn.b_K", True)),
    "v": (("attn.W_V", True), ("attn.b_V", True)),
    "mlp": (("mlp.W_out", False), ("mlp.b_out", False)),
    "mlp_in": (("mlp.W_in", False), ("mlp.W_gate", False), ("mlp.b_in", False)),
}


@dataclass(frozen=True)
class Node:
    """One node of the graph.

    Attributes:
        name: ``input``, ``L2H1``, ``L2.mlp``, ``L2H1.q``, ``L2KV0.k``, ``logits``.
        kind: ``input``, ``head``, ``mlp`` (upstream); ``q``, ``k``, ``v``, ``mlp_in``, ``logits`` (downstream).
        layer: the block (``-1`` for ``input``, ``n_layers`` for ``logits``).
        index: the head (query nodes, head outputs) or key/value head (key and value nodes); ``-1`` otherwise.
        component: the model component the node belongs to (``L2H1``, ``L2KV0``, ``L2.mlp``,
            ``input``, ``logits``): a head's output and its query belong to one component.
    """

    name: str
    kind: NodeKind
    layer: int
    index: int
    component: str

    def stream_position(self, layout: str) -> int:
        """Where in the residual stream the node writes (upstream) or reads (downstream), in blocks of
        ``layout`` (:data:`STREAM_OFFSETS`)."""
        return 2 * self.layer + STREAM_OFFSETS[layout][self.kind]


class Graph:
    """Upstream and downstream nodes of a model, and which pairs are edges (see the module docstring).

    Build it with :meth:`from_spec`; it depends only on the model's shape, so the edge order (the
    order of every score vector and subgraph mask capwrap stores) is the same for every model
    of one spec.
    """

    def __init__(self, spec: ModelSpec, upstream: list[Node], downstream: list[Node]):
        self.spec = spec
        self.upstream = upstream
        self.downstream = downstream
        #: Every component a node belongs to, in model order (``input`` first, ``logits`` last).
        self.components: list[str] = list(dict.fromkeys(n.component for n in _model_order(upstream, downstream)))
        self._up_index = {n.name: i for i, n in enumerate(upstream)}
        self._down_index = {n.name: i for i, n in enumerate(downstream)}
        #: ``sequential`` or ``parallel`` (:func:`block_layout`).
        self.layout = block_layout(spec)
        up_pos = torch.tensor([n.stream_position(self.layout) for n in upstream])
        down_pos = torch.tensor([n.stream_position(self.layout) for n in downstream])
        self.adjacency: Bool[Tensor, "n_up n_down"] = up_pos[:, None] <= down_pos[None, :]
        up, down = self.adjacency.nonzero(as_tuple=True)
        #: For each edge (in edge order, row-major over ``adjacency``): its upstream and downstream index.
        self.edge_up, self.edge_down = up, down

    @classmethod
    @functools.lru_cache(maxsize=32)
    def from_spec(cls, spec: ModelSpec) -> Graph:
        """The graph of every model with this spec (cached: do not mutate it)."""
        gqa = spec.n_key_value_heads != spec.n_heads
        upstream = [Node("input", "input", -1, -1, "input")]
        downstream: list[Node] = []
        for layer in range(spec.n_layers):
            for head in range(spec.n_heads):
                upstream.append(Node(f"L{layer}H{head}", "head", layer, head, f"L{layer}H{head}"))
            upstream.append(Node(f"L{layer}.mlp", "mlp", layer, -1, f"L{layer}.mlp"))
            for head in range(spec.n_heads):
                downstream.append(Node(f"L{layer}H{head}.q", "q", layer, head, f"L{layer}H{head}"))
                if not gqa:
                    for kind in ("k", "v"):
                        downstream.append(Node(f"L{layer}H{head}.{kind}", kind, layer, head, f"L{layer}H{head}"))
            if gqa:
                for group in range(spec.n_key_value_heads):
                    for kind in ("k", "v"):
                        downstream.append(Node(f"L{layer}KV{group}.{kind}", kind, layer, group, f"L{layer}KV{group}"))
            downstream.append(Node(f"L{layer}.mlp", "mlp_in", layer, -1, f"L{layer}.mlp"))
        downstream.append(Node("logits", "logits", spec.n_layers, -1, "logits"))
        return cls(spec, upstream, downstream)

    # ---- sizes and names ---------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        """Number of edges."""
        return len(self.edge_up)

    @functools.cached_property
    def edge_names(self) -> list[str]:
        """``upstream->downstream`` for every edge, in edge order."""
        return [
            f"{self.upstream[u].name}->{self.downstream[d].name}"
            for u, d in zip(self.edge_up.tolist(), self.edge_down.tolist(), strict=True)
        ]

    @functools.cached_property
    def _edge_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    def edge_index(self, name: str) -> int:
        """The position of edge ``upstream->downstream`` in edge order."""
        return lookup(self._edge_index, name, f"no edge {name!r} in this graph",
                      "edges look like 'L0H1->L2H0.q' or 'L1.mlp->logits'")  # fmt: skip

    def upstream_node(self, name: str) -> Node:
        """The upstream node called ``name``."""
        return self.upstream[self._lookup(self._up_index, name, "upstream")]

    def downstream_node(self, name: str) -> Node:
        """The downstream node called ``name``."""
        return self.downstream[self._lookup(self._down_index, name, "downstream")]

    def upstream_index(self, name: str) -> int:
        """The position of upstream node ``name``."""
        return self._lookup(self._up_index, name, "upstream")

    def downstream_index(self, name: str) -> int:
        """The position of downstream node ``name``."""
        return self._lookup(self._down_index, name, "downstream")

    @staticmethod
    def _lookup(index: dict[str, int], name: str, side: str) -> int:
        return lookup(index, name, f"no {side} node {name!r}", f"{side} nodes: {list(index)[:6]} ...")

    def has_edge(self, upstream: str, downstream: str) -> bool:
        """Whether ``upstream`` writes into what ``downstream`` reads."""
        return bool(self.adjacency[self.upstream_index(upstream), self.downstream_index(downstream)])

    # ---- tables ------------------------------------------------------------------------------------
    def edges_frame(self) -> pd.DataFrame:
        """One row per edge, in edge order: ``edge, upstream, downstream, up_kind, down_kind, up_layer,
        down_layer, up_component, down_component``."""
        ups = [self.upstream[i] for i in self.edge_up.tolist()]
        downs = [self.downstream[i] for i in self.edge_down.tolist()]
        return pd.DataFrame(
            {
                "edge": self.edge_names,
                "upstream": [n.name for n in ups],
                "downstream": [n.name for n in downs],
                "up_kind": [n.kind for n in ups],
                "down_kind": [n.kind for n in downs],
                "up_layer": [n.layer for n in ups],
                "down_layer": [n.layer for n in downs],
                "up_component": [n.component for n in ups],
                "down_component": [n.component for n in downs],
            }
        )

    def to_matrix(self, values: Tensor, fill: float = float("nan")) -> Tensor:
        """Per-edge ``values`` (edge order) as an ``[n_up, n_down]`` matrix; non-edges get ``fill``."""
        if values.shape[0] != self.n_edges:
            raise ConfigError(f"expected {self.n_edges} per-edge values, got {values.shape[0]}")
        out = torch.full((len(self.upstream), len(self.downstream)), fill, dtype=values.dtype)
        out[self.edge_up, self.edge_down] = values.cpu()
        return out

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """The per-edge entries (edge order) of an ``[n_up, n_down]`` matrix."""
        return matrix[self.edge_up.to(matrix.device), self.edge_down.to(matrix.device)]

    # ---- components and parameters -----------------------------------------------------------------
    def node_params(self, node: Node) -> list[ParamSlice]:
        """The slices of canonical weights that ``node`` applies (empty for ``input`` and ``logits``)."""
        if not isinstance(node, Node):
            raise ConfigError(f"node_params takes a Node, not {node!r}: a name can be either side ('L0.mlp' is the "
                              "MLP's output upstream and its input downstream), so look it up with "
                              "graph.upstream_node(name) or graph.downstream_node(name)")  # fmt: skip
        present = _present_weights(self.spec)
        out = []
        for leaf, per_head in _NODE_PARAMS[node.kind]:
            name = f"blocks.{node.layer}.{leaf}"
            if name in present:
                out.append(ParamSlice(name, (node.index,) if per_head else ()))
        return out


def _model_order(upstream: list[Node], downstream: list[Node]) -> list[Node]:
    """Nodes sorted by where they sit in the model (attention before MLP within a block)."""
    return sorted(upstream + downstream, key=lambda n: (n.layer, n.kind in ("mlp", "mlp_in")))


@functools.lru_cache(maxsize=32)
def _present_weights(spec: ModelSpec) -> frozenset[str]:
    return frozenset(canonical_names(spec))
