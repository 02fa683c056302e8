"""The Subgraph analyzer: wrapper where a change sits outside a surviving circuit, change where the
circuit is replaced, and a circuit-tuning run's recorded subgraphs read back from its store."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from capwrap import CircuitTuning, ModelPair, Recorder, RunStore, Subgraph, TrainConfig, train
from capwrap.circuits import Graph, attribute, negative_loss
from capwrap.errors import ConfigError
from capwrap.tasks import PCFGTask


@pytest.fixture
def tasks(tiny_task):
    return tiny_task, PCFGTask("count", "b", correlation=1.0, config=tiny_task.config)


def _perturb(model, components, std, graph):
    with torch.no_grad():
        for node in graph.upstream + graph.downstream:
            if node.component in components:
                for piece in graph.node_params(node):
                    view = piece.of(model.weights())
                    view.add_(std * torch.randn(view.shape, generator=torch.Generator().manual_seed(1)))


def test_a_small_change_off_the_circuit_is_a_wrapper_a_large_one_in_it_a_change(tiny, tasks):
    capability, downstream = tasks
    base = tiny("gpt2", "bridge", seed=0)
    graph = Graph.from_spec(base.spec)
    analyzer = Subgraph(n=32, method="eap", ablation="mean", top_share=0.2)
    used = attribute(base, capability.sample(32, seed=0), metric=negative_loss, ablation="mean").node_scores()
    used = used.drop(["input", "logits"]).sort_values()
    off = base.clone()  # nudge the component the capability uses least: the circuit survives, the change is off it
    _perturb(off, {used.index[0]}, 1e-3, graph)
    wrapper = analyzer(ModelPair(base, off), capability, downstream)
    assert wrapper.kind == "structural" and wrapper.direction == "wrapper", wrapper.reasons
    assert wrapper.headline["capability_overlap"] > 0.9 and wrapper.headline["weight_change_inside"] == 0.0
    inside = base.clone()  # scramble the components it uses most
    _perturb(inside, set(used.index[-2:]), 0.5, graph)
    change = analyzer(ModelPair(base, inside), capability, downstream)
    assert change.direction == "change", change.reasons
    assert change.headline["weight_change_enrichment"] > 1.5 or change.headline["capability_overlap"] <= 0.25


def test_reads_the_recorded_subgraphs_of_a_circuit_tuning_run(tiny, tasks, tmp_path):
    capability, downstream = tasks
    base = tiny("gpt2", "bridge")
    tuned = base.clone()
    recorder = Recorder(tuned, tmp_path / "run", hooks=(), every=10)
    train(tuned, downstream, TrainConfig(steps=4, batch_size=16, lr=1e-2, progress=False),
          method=CircuitTuning(top_n=6), recorder=recorder)  # fmt: skip
    evidence = Subgraph(n=32, method="eap-ig", ig_steps=2)(
        ModelPair(base, tuned), capability, downstream, RunStore.open(tmp_path / "run")
    )
    assert evidence.details["finetune_source"] == "recorded circuit-tuning subgraphs"
    assert len(evidence.details["per_step"]) == 4
    kept = RunStore.open(tmp_path / "run").array("circuit_tuning.edges")
    assert evidence.headline["finetune_edges"] == float((kept.mean(0) >= 0.5).sum())
    shares = [evidence.headline[k] for k in ("finetune_inside", "finetune_attached", "finetune_outside")]
    assert sum(shares) == pytest.approx(1.0) and not any(math.isnan(s) for s in shares)
    assert evidence.table["in_finetune"].sum() == evidence.headline["finetune_edges"]
    assert isinstance(evidence.figure(), go.Figure) and evidence.to_dict()["analyzer"] == "subgraph"


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="top_share"):
        Subgraph(top_share=0)
    with pytest.raises(ConfigError, match="rewired <= survive"):
        Subgraph(survive=0.2, rewired=0.4)
    with pytest.raises(ConfigError, match="eap-ig-nodes"):
        Subgraph(method="ig")
    with pytest.raises(ConfigError, match="'exact'"):  # the choices named include exact patching
        Subgraph(method="patching")


def test_exact_scores_find_a_compiled_models_circuit_gradients_miss():
    """On a compiled Tracr Counter gradients see one of the three edges that matter (the others score
    about 1e-7: saturated softmax and ReLUs), so an ``eap-ig`` circuit's weighted overlap rests on
    that edge alone; ``method="exact"`` ablates each edge and weighs all three."""
    from capwrap.tasks import task_from_spec
    from capwrap.validation.bases import load_base

    counter = load_base("tracr-counter")
    task = task_from_spec("tracr=counter", model=counter)
    downstream = task_from_spec("tracr=counter,operand=b,correlation=1", model=counter)
    pair = ModelPair(counter, counter.clone())
    essential = {"L0H0->L0.mlp", "L0.mlp->logits", "input->L0H0.k"}
    found = {}
    scored_by = {}
    for method in ("eap-ig", "exact", "auto"):
        evidence = Subgraph(method=method, n=32)(pair, task, downstream, eval_size=16)
        table = evidence.table.set_index("edge")
        found[method] = {e for e in essential if abs(table["capability_base"].get(e, 0.0)) > 1e-3}
        scored_by[method] = evidence.details["method"]
        assert evidence.headline["capability_overlap"] == pytest.approx(1.0)  # the same model: the circuit survives
    # the default (auto) scores a compiled model exactly
    assert found == {"eap-ig": {"L0.mlp->logits"}, "exact": essential, "auto": essential}
    assert scored_by == {"eap-ig": "eap-ig", "exact": "exact", "auto": "exact"}


def test_auto_scores_a_trained_model_by_edge_attribution():
    """``auto`` keeps exact ablation (a pass per edge) for compiled models: a trained one is scored by EAP-IG."""
    from capwrap.models import ModelSpec

    analyzer = Subgraph()
    assert analyzer.method == "auto"
    assert analyzer.scoring(ModelSpec(d_vocab=8, n_ctx=8, n_layers=1, d_model=8, n_heads=2)) == "eap-ig"
    assert Subgraph(method="eap").scoring(ModelSpec(d_vocab=8, n_ctx=8, n_layers=1, d_model=8, n_heads=2)) == "eap"


def test_the_sequences_follow_the_diagnosis_seed(tiny, tasks):
    """Every random choice derives from the diagnosis's seed (``seed=None``); a seed given is kept."""
    capability, downstream = tasks
    base = tiny("gpt2", "bridge", seed=0)
    pair = ModelPair(base, base.clone())

    def scores(diagnosis_seed: int, **settings) -> list[float]:
        analyzer = Subgraph(n=16, method="eap", **settings)
        evidence = analyzer(pair, capability, downstream, eval_size=8, seed=diagnosis_seed)
        return evidence.table.sort_values("edge")["capability_base"].tolist()

    assert scores(0) == scores(0) != scores(1)
    assert scores(0, seed=3) == scores(1, seed=3)
