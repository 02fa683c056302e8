"""Circuit-tuning: only the kept subgraph's parameter slices move, frozen ones get no decay and no
state, the subgraph and its parameter share are logged and recorded, and its state resumes a run."""

from __future__ import annotations

import pytest
import torch

from capwrap import CircuitTuning, Recorder, RunStore, TrainConfig, train
from capwrap.circuits import Graph, attribute
from capwrap.circuits.metrics import answer_logodds, answer_logprob, negative_loss
from capwrap.errors import CapwrapWarning, ConfigError
from capwrap.methods.circuit_tuning import parameter_masks
from capwrap.models import CapModel
from capwrap.training import StepInfo


def _grads_through(model, masks) -> dict[str, torch.Tensor]:
    """Canonical indicators of the masked elements: every parameter's mask as its gradient, read
    back as canonical gradients, nonzero where any mask holds (parameters that view one storage,
    as GPT-2's q/k/v and fused qkv on the bridge, add their gradients up)."""
    for p in model.parameters():
        p.grad = masks[p].float() if p in masks else torch.zeros_like(p)
    grads = {k: (v != 0).float() for k, v in model.gradients().items()}
    model.module.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("arch", "edge", "expected"), [
    ("gpt2", "input->L1H1.q", {"blocks.1.attn.W_Q": (1,), "blocks.1.attn.b_Q": (1,)}),
    ("gpt2", "input->L1H1.k", {"blocks.1.attn.W_K": (1,), "blocks.1.attn.b_K": (1,)}),  # q/k/v views of qkv
    ("gpt2", "input->L0H0.v", {"blocks.0.attn.W_V": (0,), "blocks.0.attn.b_V": (0,)}),
    ("gpt2", "L0H0->logits", {"blocks.0.attn.W_O": (0,)}),
    ("llama", "input->L0KV1.k", {"blocks.0.attn.W_K": (1,)}),
    ("llama", "L0.mlp->L1.mlp", {"blocks.0.mlp.W_out": (), "blocks.1.mlp.W_in": (), "blocks.1.mlp.W_gate": ()}),
    ("gpt_neox", "input->L1H1.q", {"blocks.1.attn.W_Q": (1,), "blocks.1.attn.b_Q": (1,)}),  # a fused, per-head qkv
    ("gpt_neox", "L0.mlp->L1.mlp",
     {"blocks.0.mlp.W_out": (), "blocks.0.mlp.b_out": (), "blocks.1.mlp.W_in": (), "blocks.1.mlp.b_in": ()}),
])  # fmt: skip
def test_parameter_masks_cover_exactly_the_nodes_slices(arch, edge, expected, backend, tiny):
    model = tiny(arch, backend)
    graph = Graph.from_spec(model.spec)
    edges = torch.zeros(graph.n_edges, dtype=torch.bool)
    edges[graph.edge_index(edge)] = True
    grads = _grads_through(model, parameter_masks(model, graph, edges))
    for name, g in grads.items():
        want = torch.zeros_like(g)
        if name in expected:
            index = expected[name]
            (want[index] if index else want).fill_(1.0)
        assert torch.equal(g, want), name


def _weights(model: CapModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.weights().items()}


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "gemma2"])  # gemma2: post-norm weights belong to no node
def test_only_the_kept_slices_move_even_with_weight_decay(arch, backend, tiny, tiny_task):
    model = tiny(arch, backend)
    method = CircuitTuning(top_n=6)
    graph = Graph.from_spec(model.spec)
    snapshots = [(_weights(model), None)]

    def snapshot(info: StepInfo) -> None:
        snapshots.append((_weights(model), method.edges.clone()))

    config = TrainConfig(steps=3, batch_size=8, lr=1e-2, weight_decay=0.5, warmup=0.0, progress=False)
    train(model, tiny_task, config, method=method, callbacks=[snapshot])
    for (before, _), (after, edges) in zip(snapshots, snapshots[1:], strict=False):
        allowed = _grads_through(model, parameter_masks(model, graph, edges))
        moved_inside = False
        for name in before:
            changed = before[name] != after[name]
            assert not bool((changed & (allowed[name] == 0)).any()), f"{name} moved outside the subgraph"
            moved_inside |= bool(changed.any())
        assert moved_inside


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_with_every_edge_kept_every_nodes_weight_trains_and_is_counted_once(arch, backend, tiny, tiny_task):
    """TransformerLens 4's GPT-2 bridge trains separate query, key and value weights that view its
    fused ``qkv`` weight (which gets no gradient): each of them must get its part of the mask, or
    attention's inputs never train. The logged trainable count is what can move, each element once."""
    model = tiny(arch, backend)
    graph = Graph.from_spec(model.spec)
    before = _weights(model)
    config = TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup=0.0, progress=False)
    with pytest.warns(CapwrapWarning, match="is full fine-tuning of the graph.s parameters"):
        result = train(model, tiny_task, config, method=CircuitTuning(top_n=graph.n_edges))
    owned = {piece.param for node in (*graph.upstream, *graph.downstream) for piece in graph.node_params(node)}
    for name in sorted(owned):
        if name in before:
            assert bool((before[name] != model.weights()[name]).any()), f"{name} did not train"
    can_move = sum(before[name].numel() for name in owned if name in before)
    assert result.history["method/trainable_params"].iloc[-1] == can_move


def test_frozen_parameters_hold_no_optimizer_state(tiny, tiny_task):
    """The method's own hooks, driven by hand as train() does; then read the optimizer's state."""
    model = tiny("gpt2", "bridge")
    config = TrainConfig(steps=2, batch_size=8, lr=1e-2, weight_decay=0.1, progress=False)
    method = CircuitTuning(top_n=3)
    optimizer = method.optimizer(method.setup(model, tiny_task, config), config)
    for step in range(config.steps):
        batch = tiny_task.sample(8, seed=step)
        loss = method.loss(model, batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_update(model, step)
        optimizer.step()
    masks = parameter_masks(model, method.graph, method.ever)
    for param in model.parameters():
        state = optimizer.state.get(param, {})
        if param not in masks:
            assert not state  # never trained: no state at all
        else:
            assert bool((state["exp_avg"][~masks[param]] == 0).all())  # frozen elements: none either


def test_the_schedule_the_logged_share_and_the_recorded_subgraphs(tiny, tiny_task, tmp_path):
    model = tiny("gpt2", "bridge")
    method = CircuitTuning(top_n=4, top_n_start=20, schedule="linear")
    recorder = Recorder(model, tmp_path / "run", hooks=(), every=2)
    result = train(
        model, tiny_task, TrainConfig(steps=5, batch_size=8, progress=False), method=method, recorder=recorder
    )
    history = result.history
    assert history["method/top_n"].tolist() == [20.0, 16.0, 12.0, 8.0, 4.0]
    assert history["method/edges"].tolist() == history["method/top_n"].tolist()
    ratio = history["method/trainable_ratio"]
    assert ((ratio > 0) & (ratio < 1)).all() and (history["method/trained_ever_ratio"] >= ratio - 1e-12).all()
    assert history["method/trained_ever_ratio"].is_monotonic_increasing
    assert history["method/jaccard_prev"].iloc[1:].between(0, 1).all()
    store = RunStore.open(tmp_path / "run")
    assert store.array_steps("circuit_tuning.edges") == [1, 2, 3, 4, 5]
    kept = store.array("circuit_tuning.edges")
    assert kept.shape == (5, method.graph.n_edges) and kept.sum(1).tolist() == [20.0, 16.0, 12.0, 8.0, 4.0]
    assert torch.equal(kept[-1].bool(), method.edges)
    assert store.scalars()["method/trainable_ratio"].dropna().tolist() == pytest.approx(ratio.tolist())


def _manual_run(model, method, config, task, steps, optimizer=None):
    optimizer = optimizer or method.optimizer(method.setup(model, task, config), config)
    for step in steps:
        batch = task.sample(config.batch_size, seed=100 + step)
        loss = method.loss(model, batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_update(model, step)
        optimizer.step()
    return optimizer


def test_state_dict_resumes_a_run_exactly(tiny, tiny_task):
    config = TrainConfig(steps=4, batch_size=8, lr=1e-2, progress=False)
    straight = tiny("gpt2", "bridge")
    _manual_run(straight, CircuitTuning(top_n=5, every=3), config, tiny_task, range(4))

    first = tiny("gpt2", "bridge")
    method = CircuitTuning(top_n=5, every=3)
    optimizer = _manual_run(first, method, config, tiny_task, range(2))  # steps 0, 1; step 2 reuses step 0's subgraph
    state, opt_state = method.state_dict(), optimizer.state_dict()
    resumed = CapModel.from_state(first.spec, first.checkpoint_state(), first.backend)
    again = CircuitTuning(top_n=5, every=3)
    optimizer = again.optimizer(again.setup(resumed, tiny_task, config), config)
    optimizer.load_state_dict(opt_state)
    again.load_state_dict(state)
    assert torch.equal(again.edges, method.edges) and again.scored_step == 0
    _manual_run(resumed, again, config, tiny_task, range(2, 4), optimizer)
    for name, w in straight.weights().items():
        assert torch.equal(w, resumed.weights()[name]), name
    with pytest.raises(ConfigError, match="other settings"):
        other = CircuitTuning(top_n=6, every=3)
        other.setup(resumed, tiny_task, config)
        other.load_state_dict(state)


def test_scores_follow_attributes_convention_with_or_without_a_metric(tiny, tiny_task):
    """The training step's own scores (the loss's change, from the shared pass) equal what
    ``attribute`` gives scoring minus the loss: same sign as scoring by ``metric=negative_loss``."""
    config = TrainConfig(steps=1, batch_size=16, lr=1e-2, progress=False)
    shared, separate = CircuitTuning(top_n=5), CircuitTuning(top_n=5, metric=negative_loss)
    for method in (shared, separate):
        model = tiny("gpt2", "bridge")
        _manual_run(model, method, config, tiny_task, range(1))
    expected = attribute(tiny("gpt2", "bridge"), tiny_task.sample(16, seed=100), metric=negative_loss).values
    assert torch.allclose(shared.scores, expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(separate.scores, expected, rtol=1e-4, atol=1e-7)


def test_a_custom_metric_and_bad_settings(tiny, tiny_task):
    model = tiny("gpt2", "bridge")
    result = train(model, tiny_task, TrainConfig(steps=2, batch_size=8, progress=False),
                   method=CircuitTuning(top_n=3, metric=answer_logprob, select="greedy"))  # fmt: skip
    assert result.history["method/edges"].tolist() == [3.0, 3.0]
    for kwargs, match in [({"top_n": 0}, "top_n"), ({"schedule": "step"}, "schedule"),
                          ({"ablation": "corrupted"}, "corrupted"), ({"every": 0}, "every"), ({"select": "all"}, "selection")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            CircuitTuning(**{"top_n": 3, **kwargs})


def test_a_parameter_budget_is_respected(tiny, tiny_task):
    model = tiny("gpt2", "bridge")
    method = CircuitTuning(top_n=30, max_params=600)  # no MLP (>1000 each) fits, a few head slices do
    result = train(model, tiny_task, TrainConfig(steps=2, batch_size=8, progress=False), method=method)
    assert (result.history["method/trainable_params"] <= 600).all()
    assert (result.history["method/trainable_params"] > 0).all() and (result.history["method/edges"] <= 30).all()
    assert result.history["method/budget_ratio"].iloc[0] == pytest.approx(600 / model.spec.n_params)
    with pytest.raises(ConfigError, match=r"allows 10 parameters, fewer than the cheapest edge that trains anything"):
        # (an edge from the embeddings to the logits costs nothing and trains nothing)
        train(model, tiny_task, TrainConfig(steps=1, batch_size=8, progress=False),
              method=CircuitTuning(top_n=30, max_params=10))  # fmt: skip
    with pytest.raises(ConfigError, match="select='edges'"):
        CircuitTuning(top_n=3, max_params=0.1, select="nodes")
    with pytest.raises(ConfigError, match="max_params"):
        CircuitTuning(top_n=3, max_params=1.5)


def test_a_schedule_ends_at_top_n_whatever_every_is(tiny, tiny_task):
    """With every=2 the steps that score are 0, 2, 4 ... and, under a schedule, the last one: the run
    ends with top_n edges (it ended with 7 of 6 before)."""
    model = tiny("gpt2", "bridge")
    method = CircuitTuning(top_n=6, top_n_start=20, schedule="cosine", every=2)
    history = train(model, tiny_task, TrainConfig(steps=8, batch_size=8, progress=False), method=method).history
    assert history["method/edges"].iloc[-1] == 6 == method.top_n_at(7, 8)
    assert history["method/edges"].iloc[5] == history["method/edges"].iloc[4]  # step 5 keeps step 4's subgraph


def test_metrics_by_name_and_numpy_budgets(tiny, tiny_task):
    import numpy as np

    assert CircuitTuning(top_n=3, metric="answer_logodds").metric is answer_logodds
    with pytest.raises(ConfigError, match="unknown metric 'logodds'; choose one of"):
        CircuitTuning(top_n=3, metric="logodds")
    assert CircuitTuning(top_n=3, max_params=np.float32(0.25)).max_params == pytest.approx(0.25)
    assert CircuitTuning(top_n=3, max_params=np.int64(600)).max_params == 600


def _keep(method: CircuitTuning, names: list[str]) -> None:
    """Keep exactly the edges ``names`` from now on (as a re-choice would)."""
    edges = torch.zeros(method.graph.n_edges, dtype=torch.bool)
    edges[[method.graph.edge_index(name) for name in names]] = True
    method.edges, method.ever = edges, edges if method.ever is None else method.ever | edges
    method._set_masks()


def test_a_head_kept_late_takes_the_updates_a_fresh_adamw_gives_it(tiny, tiny_task):
    """AdamW counts steps per tensor: a head whose slice of W_O is first kept after the others' took
    300 steps had its fresh moments corrected by 300 steps (first update 1.9x the learning rate, later
    ones up to 6x). Each element now takes AdamW's update for the steps it took itself."""
    model = tiny("gpt2", "bridge")
    config = TrainConfig(steps=400, batch_size=8, lr=1e-4, weight_decay=0.01, grad_clip=None, progress=False)
    method = CircuitTuning(top_n=1)
    optimizer = method.optimizer(method.setup(model, tiny_task, config), config)
    batch = tiny_task.sample(8, seed=0)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch.tokens)[:, -1], batch.answers).backward()
        method._mask_gradients()
        grad = model.gradients()["blocks.0.attn.W_O"][1].clone()
        optimizer.step()
        return grad

    _keep(method, ["L0H0->logits"])
    for _ in range(300):
        step()
    _keep(method, ["L0H0->logits", "L0H1->logits"])
    head = model.weights()["blocks.0.attn.W_O"][1]
    fresh = torch.nn.Parameter(head.detach().clone())  # head 1 alone, under a fresh AdamW
    reference = torch.optim.AdamW([fresh], lr=config.lr, weight_decay=0.01)
    for _ in range(5):
        before = head.detach().clone()
        fresh.grad = step()
        reference.step()
        torch.testing.assert_close(head.detach(), fresh.detach(), rtol=0, atol=1e-7)
        assert float((head.detach() - before).abs().median()) == pytest.approx(config.lr, rel=0.05)


def test_the_steps_each_element_took_survive_a_checkpoint_of_a_bfloat16_model(tiny, tiny_task):
    """load_state_dict casts optimizer state to the parameter's dtype; bfloat16 holds 300 as 300 but
    not 301: the counts are loaded as they were saved."""
    model = tiny("gpt2", "bridge").clone(dtype="bfloat16")
    config = TrainConfig(steps=400, batch_size=8, lr=1e-4, grad_clip=None, progress=False)
    method = CircuitTuning(top_n=1)
    params = method.setup(model, tiny_task, config)
    optimizer = method.optimizer(params, config)
    _keep(method, ["L0H0->logits"])
    batch = tiny_task.sample(8, seed=0)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch.tokens)[:, -1].float(), batch.answers).backward()
        method._mask_gradients()
        optimizer.step()
    param, counts = next((p, s["capwrap_element_steps"]) for p, s in optimizer.state.items()
                         if "capwrap_element_steps" in s)  # fmt: skip
    counts.add_(299)  # as if 301 steps had been taken
    saved = optimizer.state_dict()
    again = method.optimizer(params, config)
    again.load_state_dict(saved)
    loaded = again.state[param]["capwrap_element_steps"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, counts) and float(loaded.max()) == 301


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_one_step_run_ends_at_top_n(schedule, tiny, tiny_task):
    """The schedule's position was 0 when ``steps - 1 == 0``: a one-step run kept ``top_n_start``
    edges, where the docs promise a run ends at ``top_n``."""
    method = CircuitTuning(top_n=3, top_n_start=20, schedule=schedule)
    assert method.top_n_at(0, 1) == 3
    assert method.top_n_at(0, 5) == 20 and method.top_n_at(4, 5) == 3
    config = TrainConfig(steps=1, batch_size=8, progress=False)
    result = train(tiny("gpt2", "bridge"), tiny_task, config, method=method)
    assert result.history["method/top_n"].tolist() == [3.0] and result.history["method/edges"].tolist() == [3.0]


def test_a_top_n_that_keeps_the_whole_graph_warns(tiny, tiny_task):
    """A ``top_n`` past the graph's edges (components with ``select="nodes"``) silently kept every edge."""
    from capwrap.errors import CapwrapWarning

    config = TrainConfig(steps=1, batch_size=8, progress=False)
    graph = Graph.from_spec(tiny("gpt2", "bridge").spec)
    n_components = len([c for c in graph.components if c not in ("input", "logits")])
    for method, size in [(CircuitTuning(top_n=100_000), graph.n_edges),
                         (CircuitTuning(top_n=n_components, select="nodes"), n_components)]:  # fmt: skip
        with pytest.warns(CapwrapWarning, match=rf"keeps all {size} .* full fine-tuning of the graph's parameters"):
            result = train(tiny("gpt2", "bridge"), tiny_task, config, method=method)
        assert result.history["method/edges"].iloc[-1] == graph.n_edges
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CapwrapWarning)
        train(tiny("gpt2", "bridge"), tiny_task, config, method=CircuitTuning(top_n=graph.n_edges - 1))
        train(tiny("gpt2", "bridge"), tiny_task, config, method=CircuitTuning(top_n=n_components - 1, select="nodes"))
        # a parameter budget decides what trains: no warning (the budget benchmark asks for every edge)
        train(tiny("gpt2", "bridge"), tiny_task, config, method=CircuitTuning(top_n=100_000, max_params=600))
