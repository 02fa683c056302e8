"""Circuits as data (selection, overlap, files, figure), exact ablation of whole nodes, faithfulness."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from capwrap.circuits import Circuit, EdgeScores, Graph, attribute, circuit_metric, exact_scores, faithfulness
from capwrap.circuits.exact import ablated_metric
from capwrap.circuits.metrics import answer_logodds, answer_logprob
from capwrap.circuits.nodes import ablated_values
from capwrap.errors import CheckpointError, ConfigError
from capwrap.models import ModelSpec


@pytest.fixture
def graph() -> Graph:
    return Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=2, d_model=8, n_heads=2))


def _scores(graph: Graph, values: dict[str, float]) -> EdgeScores:
    s = torch.zeros(graph.n_edges)
    for name, v in values.items():
        s[graph.edge_index(name)] = v
    return EdgeScores(graph, s, "eap", "mean")


def test_top_edges_rank_by_absolute_score(graph):
    scores = _scores(graph, {"L1.mlp->logits": 0.5, "L0H0->L1H1.q": -2.0, "input->L0.mlp": 1.0})
    circuit = Circuit.from_scores(scores, 2)
    assert circuit.edge_names == ["input->L0.mlp", "L0H0->L1H1.q"]
    assert circuit.table()["edge"].tolist() == ["L0H0->L1H1.q", "input->L0.mlp"]
    assert Circuit.from_scores(scores, 0).n_edges == 0
    assert Circuit.from_scores(scores, 10_000).n_edges == graph.n_edges
    with pytest.raises(ConfigError, match="unknown selection"):
        Circuit.from_scores(scores, 2, select="best")


def test_top_nodes_keep_every_edge_between_kept_components(graph):
    scores = _scores(graph, {"L0H1->L1.mlp": 3.0, "L1.mlp->logits": 2.0, "L0H0->L1H0.v": 0.1})
    circuit = Circuit.from_scores(scores, 2, select="nodes")
    assert set(circuit.components) == {"input", "L0H1", "L1.mlp", "logits"}
    assert set(circuit.edge_names) == {
        "input->L0H1.q", "input->L0H1.k", "input->L0H1.v", "input->L1.mlp", "input->logits",
        "L0H1->L1.mlp", "L0H1->logits", "L1.mlp->logits",
    }  # fmt: skip


def test_greedy_grows_only_connected_circuits(graph):
    # The best edge feeds L0H0's query, but L0H0 writes nothing the circuit reads: greedy skips it.
    scores = _scores(graph, {"input->L0H0.q": 9.0, "L1.mlp->logits": 3.0, "L0H1->L1.mlp": 2.0, "input->L0H1.k": 1.0})
    top = Circuit.from_scores(scores, 3)
    greedy = Circuit.from_scores(scores, 3, select="greedy")
    assert "input->L0H0.q" in top.edge_names
    assert greedy.edge_names == ["input->L0H1.k", "L0H1->L1.mlp", "L1.mlp->logits"]
    # every edge of a larger greedy circuit reaches the logits through the circuit
    big = Circuit.from_scores(
        EdgeScores(graph, torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(0)), "eap", "mean"),
        12,
        "greedy",
    )
    feeding = {"logits"} | {n.split("->")[0] for n in big.edge_names}
    for name in big.edge_names:
        down = graph.downstream_node(name.split("->")[1])
        assert down.component in feeding


def test_overlaps_are_hand_computable(graph):
    a = Circuit.from_edges(graph, ["input->logits", "L0H0->logits", "L1.mlp->logits"], torch.ones(graph.n_edges))
    b = Circuit.from_edges(
        graph, ["input->logits", "L0H0->logits", "L0.mlp->logits", "L1H0->logits"], torch.ones(graph.n_edges)
    )
    assert a.jaccard(b) == pytest.approx(2 / 5)
    # uniform weights 1/3 and 1/4: Σ min = 2 · 1/4, Σ max = 2 · 1/3 + 1/3 + 2 · 1/4
    assert a.weighted_overlap(b) == pytest.approx(0.5 / (1.0 + 0.5))
    assert a.weighted_overlap(a) == pytest.approx(1.0) and a.jaccard(a) == 1.0
    assert a.node_jaccard(b) == pytest.approx(
        3 / 6
    )  # {input, L0H0, L1.mlp, logits} vs {input, L0H0, L0.mlp, L1H0, logits}
    other = Circuit.from_edges(
        Graph.from_spec(ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=8, n_heads=2)), ["input->logits"]
    )
    with pytest.raises(ConfigError, match="different shapes"):
        a.jaccard(other)


def test_save_load_round_trip_and_figure(graph, tmp_path):
    scores = EdgeScores(graph, torch.linspace(-1, 2, graph.n_edges), "eap-ig", "zero", {"sequences": 8})
    circuit = Circuit.from_scores(scores, 7, select="greedy")
    path = circuit.save(tmp_path / "c" / "circuit.json")
    back = Circuit.load(path)
    assert back.edge_names == circuit.edge_names and torch.equal(back.scores, circuit.scores)
    assert back.info["select"] == "greedy" and back.info["sequences"] == 8 and back.graph.spec == graph.spec
    assert isinstance(circuit.figure(), go.Figure) and len(circuit.figure().data) == circuit.n_edges + 2
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a capwrap circuit"):
        Circuit.load(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="no circuit file"):
        Circuit.load(tmp_path / "missing.json")


def test_ablating_every_edge_out_of_a_node_equals_ablating_the_node(backend, tiny, tiny_task):
    """The exact engine against plain hooks: a head's (or MLP's) output replaced everywhere by its mean."""
    model = tiny("llama", backend)
    batch = tiny_task.sample(6, seed=0)
    graph = Graph.from_spec(model.spec)
    mean = ablated_values(model, graph, "mean", batch)
    rows = {
        "L0H2": graph.edge_up == graph.upstream_index("L0H2"),
        "L0.mlp": graph.edge_up == graph.upstream_index("L0.mlp"),
    }
    engine = ablated_metric(model, batch, torch.stack(list(rows.values())), mean).mean(1)

    def head_hook(z, hook=None):
        z = z.clone()
        z[:, :, 2] = mean.z[0][:, :, 2]
        return z

    def mlp_hook(out, hook=None):
        return mean.mlp[0].expand_as(out).clone()

    for (name, fn), value in zip(
        [("blocks.0.attn.hook_z", head_hook), ("blocks.0.hook_mlp_out", mlp_hook)], engine, strict=True
    ):
        with torch.no_grad(), model.hooks([(name, fn)]):
            expected = answer_logprob(model(batch.tokens), batch).mean()
        assert float(value) == pytest.approx(float(expected), abs=1e-5)


def test_faithfulness_runs_from_nothing_to_the_whole_model(tiny, tiny_task):
    model = tiny("gpt2", "bridge")
    batch = tiny_task.sample(8, seed=0)
    scores = attribute(model, batch, ablation="mean")
    curve = faithfulness(model, batch, scores, ns=[0, 5, 20, scores.graph.n_edges])
    assert curve.table["recovered"].iloc[0] == pytest.approx(0.0, abs=1e-6)
    assert curve.table["recovered"].iloc[-1] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        clean = float(answer_logprob(model(batch.tokens), batch).mean())
    assert curve.model_metric == pytest.approx(clean, abs=1e-5)
    nodes = faithfulness(model, batch, scores, ns=[1, 3], select="nodes")
    assert nodes.table["edges"].is_monotonic_increasing
    assert isinstance(curve.figure(), go.Figure) and curve.smallest(0.999) is not None and curve.smallest(2.0) is None
    single = circuit_metric(model, batch, [Circuit.from_scores(scores, 5)])
    assert float(single[0]) == pytest.approx(curve.table["metric"].iloc[1], abs=1e-6)


def test_faithfulness_measures_circuits_under_the_scores_own_ablation(tiny, tiny_task):
    """Circuits chosen by positional-mean scores are measured under that ablation unless told
    otherwise (measuring them under the batch mean is another experiment, and warns)."""
    model = tiny("gpt2", "bridge")
    batch = tiny_task.sample(8, seed=0)
    scores = attribute(model, batch, ablation="mean_positional")
    default = faithfulness(model, batch, scores, ns=[5])
    same = faithfulness(model, batch, scores, ns=[5], ablation="mean_positional")
    assert default.table.equals(same.table)
    with pytest.warns(UserWarning, match="computed with ablation='mean_positional'"):
        other = faithfulness(model, batch, scores, ns=[5], ablation="mean")
    assert other.empty_metric != pytest.approx(default.empty_metric)


def test_faithfulness_measures_circuits_by_the_scores_own_metric(tiny, tiny_task):
    """Scores of answer_logodds are measured by answer_logodds unless told otherwise (they were
    measured by the default, answer_logprob, unsaid); another metric warns, as another ablation does."""
    model = tiny("gpt2", "bridge")
    batch = tiny_task.sample(8, seed=0)
    scores = attribute(model, batch, metric="answer_logodds")
    assert scores.info["metric"] == "answer_logodds"
    default = faithfulness(model, batch, scores, ns=[5])
    with torch.no_grad():
        assert default.model_metric == pytest.approx(float(answer_logodds(model(batch.tokens), batch).mean()), abs=1e-5)
    with pytest.warns(UserWarning, match="computed with metric 'answer_logodds' and the circuits are measured with "
                                         "'answer_logprob'"):
        other = faithfulness(model, batch, scores, ns=[5], metric=answer_logprob)
    assert other.model_metric != pytest.approx(default.model_metric)


def test_partial_exact_scores_correlate_over_the_edges_they_measure_and_counts_take_numpy_integers(tiny, tiny_task):
    model = tiny("gpt2", "bridge")
    batch = tiny_task.sample(8, seed=0)
    scores = attribute(model, batch, ablation="mean")
    top = scores.values.abs().argsort(descending=True)[:12].tolist()
    exact = exact_scores(model, batch, ablation="mean", edges=top)
    assert int(exact.values.isfinite().sum()) == 12
    both = torch.stack([scores.values[top], exact.values[top]]).double()
    assert scores.correlation(exact) == pytest.approx(float(torch.corrcoef(both)[0, 1]))  # not NaN
    assert Circuit.from_scores(scores, np.int64(5)).n_edges == 5
    with pytest.raises(ConfigError, match="whole number"):
        Circuit.from_scores(scores, True)


def test_answer_metrics_read_the_answer_position_as_patching_does():
    """The circuit metrics take every position's logits; at the answer position they equal patching's
    metrics, and the probability is the exponent of the log-probability."""
    from capwrap.analyzers import patching
    from capwrap.circuits.metrics import answer_logit, answer_logodds, answer_prob
    from capwrap.tasks import TaskBatch
    from capwrap.tasks.base import answer_logits

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen)
    batch = TaskBatch(torch.zeros(3, 5, dtype=torch.long), answer_pos=torch.tensor([1, 4, 2]), answers=torch.tensor([4, 0, 6]))
    at_answer = answer_logits(logits, batch)
    torch.testing.assert_close(answer_logit(logits, batch), patching.answer_logit(at_answer, batch))
    torch.testing.assert_close(answer_logprob(logits, batch), patching.answer_logprob(at_answer, batch))
    torch.testing.assert_close(answer_prob(logits, batch), answer_logprob(logits, batch).exp())
    assert float(answer_logit(logits, batch)[0]) == float(logits[0, 1, 4])
    p = answer_prob(logits, batch).double()
    torch.testing.assert_close(answer_logodds(logits, batch).double(), (p / (1 - p)).log(), atol=1e-5, rtol=1e-5)
    # the logit difference against every other answer: a shift of all logits leaves it unchanged
    torch.testing.assert_close(answer_logodds(logits + 3.0, batch), answer_logodds(logits, batch))
    assert not torch.allclose(answer_logit(logits + 3.0, batch), answer_logit(logits, batch))
