"""The graph: node and edge counts and order, which pairs are edges, and the parameters each node owns."""

from __future__ import annotations

import pytest
import torch

from capwrap.circuits import Graph
from capwrap.errors import ConfigError
from capwrap.models import ModelSpec


def test_counts_and_edges_of_a_two_layer_model():
    graph = Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=2, d_model=8, n_heads=2))
    assert [n.name for n in graph.upstream] == ["input", "L0H0", "L0H1", "L0.mlp", "L1H0", "L1H1", "L1.mlp"]
    assert len(graph.downstream) == 2 * (3 * 2 + 1) + 1
    # input -> all 15; each layer-0 head -> L0 MLP, 6 layer-1 q/k/v, L1 MLP, logits (9);
    # L0 MLP -> 6 q/k/v, L1 MLP, logits (8); each layer-1 head -> L1 MLP, logits (2); L1 MLP -> logits
    assert graph.n_edges == 15 + 2 * 9 + 8 + 2 * 2 + 1
    assert graph.has_edge("L0H1", "L0.mlp") and graph.has_edge("L0.mlp", "L1H0.k") and graph.has_edge("input", "logits")
    assert not graph.has_edge("L0H0", "L0H1.q")  # a head does not read its own layer's heads
    assert not graph.has_edge("L1.mlp", "L1.mlp") and not graph.has_edge("L0.mlp", "L0.mlp")
    assert graph.edge_names[graph.edge_index("L0H1->L1.mlp")] == "L0H1->L1.mlp"
    frame = graph.edges_frame()
    assert len(frame) == graph.n_edges and frame.loc[0, "edge"] == "input->L0H0.q"
    assert graph.components == ["input", "L0H0", "L0H1", "L0.mlp", "L1H0", "L1H1", "L1.mlp", "logits"]


def test_matrix_round_trip_and_errors():
    graph = Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=8, n_heads=2))
    values = torch.arange(graph.n_edges, dtype=torch.float32)
    matrix = graph.to_matrix(values)
    assert torch.equal(graph.from_matrix(matrix), values)
    assert torch.isnan(matrix[graph.upstream_index("L0.mlp"), graph.downstream_index("L0H0.q")])
    with pytest.raises(ConfigError, match="did you mean"):
        graph.edge_index("L0H0->L0.mpl")
    with pytest.raises(ConfigError, match="no upstream node"):
        graph.upstream_node("L0H0.q")


def test_grouped_query_attention_gives_key_value_nodes_per_group():
    spec = ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=16, n_heads=4, n_key_value_heads=2, architecture="llama")
    graph = Graph.from_spec(spec)
    names = [n.name for n in graph.downstream]
    assert names[:6] == ["L0H0.q", "L0H1.q", "L0H2.q", "L0H3.q", "L0KV0.k", "L0KV0.v"]
    node = graph.downstream_node("L0KV1.v")
    assert node.component == "L0KV1" and node.index == 1
    assert [(p.param, p.index) for p in graph.node_params(node)] == [("blocks.0.attn.W_V", (1,))]  # no biases
    mlp_in = graph.node_params(graph.downstream_node("L0.mlp"))
    assert [p.param for p in mlp_in] == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_gate"]  # the gate reads the input too


def test_node_params_are_per_head_slices():
    graph = Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=2, d_model=8, n_heads=2))
    head = graph.upstream_node("L1H1")
    assert [(p.param, p.index) for p in graph.node_params(head)] == [("blocks.1.attn.W_O", (1,))]
    q = graph.downstream_node("L0H1.q")
    assert [(p.param, p.index) for p in graph.node_params(q)] == [
        ("blocks.0.attn.W_Q", (1,)),
        ("blocks.0.attn.b_Q", (1,)),
    ]
    assert [p.param for p in graph.node_params(graph.upstream_node("L0.mlp"))] == [
        "blocks.0.mlp.W_out",
        "blocks.0.mlp.b_out",
    ]
    assert graph.node_params(graph.upstream_node("input")) == [] and graph.node_params(graph.downstream[-1]) == []


def test_parallel_blocks_have_no_edge_from_a_layers_heads_to_its_own_mlp():
    """GPT-NeoX / Pythia: attention and the MLP both read the block's input, so the MLP of layer l reads
    what layers < l wrote and nothing of its own heads; every other edge is the sequential graph's."""
    from capwrap.models import ModelSpec

    shape = dict(d_vocab=20, n_ctx=8, n_layers=3, d_model=16, n_heads=2)
    parallel = Graph.from_spec(ModelSpec(**shape, architecture="gpt_neox"))
    sequential = Graph.from_spec(ModelSpec(**shape))
    assert (parallel.layout, sequential.layout) == ("parallel", "sequential")
    assert (
        parallel.edge_names[: sequential.edge_names.index("L0H0->L0.mlp")]
        == sequential.edge_names[: sequential.edge_names.index("L0H0->L0.mlp")]
    )
    missing = set(sequential.edge_names) - set(parallel.edge_names)
    assert missing == {f"L{layer}H{head}->L{layer}.mlp" for layer in range(3) for head in range(2)}
    assert set(parallel.edge_names) <= set(sequential.edge_names)
    assert parallel.has_edge("L0H1", "L1.mlp") and parallel.has_edge("L1.mlp", "L2H0.q")
    assert not parallel.has_edge("L1.mlp", "L1H0.q") and not parallel.has_edge("L2H0", "L2.mlp")
