"""Edge attribution: EAP equals the textbook split-input implementation and is the derivative of exact
edge ablation; a hand-computable graph; EAP-IG's completeness (over the input, and per node for
eap-ig-nodes); chunking; errors."""

from __future__ import annotations

import pytest
import torch

from capwrap.circuits import Graph, attribute, exact_scores, split_input_eap
from capwrap.circuits.attribution import ig_paths
from capwrap.circuits.exact import ablated_metric
from capwrap.circuits.nodes import NodeCapture, NodeValues, ablated_values, capture_values
from capwrap.errors import ConfigError
from capwrap.tasks import TaskBatch

#: What the ``tiny`` fixture builds (conftest.py).
ARCHITECTURES = ("gpt2", "gpt_neo", "gpt_neox", "llama", "gemma2", "olmo2", "tracr")


def _answer_logit(logits, batch):
    return logits[torch.arange(len(batch)), batch.answer_pos, batch.answers]


def _assert_upstream_adds_up(model, tokens) -> NodeCapture:
    """The graph's upstream outputs (and the attention output biases, which belong to no node) add up
    to the last residual stream; returns the capture."""
    capture, seen = NodeCapture(model, Graph.from_spec(model.spec), grads=False), {}
    last = f"blocks.{model.spec.n_layers - 1}.hook_resid_post"
    with torch.no_grad(), model.hooks([*capture.hooks(), (last, lambda act, hook=None: seen.update(stream=act))]):
        model(tokens)
    weights = model.weights()
    biases = [weights[f"blocks.{i}.attn.b_O"] for i in range(model.spec.n_layers) if f"blocks.{i}.attn.b_O" in weights]
    assert not (biases and model.spec.features.post_norm)  # behind a post-norm the bias's share is not b_O
    total = capture.values().upstream(capture.writes).sum(0) + sum(biases, torch.zeros(()))
    torch.testing.assert_close(total, seen["stream"], atol=1e-5, rtol=1e-5)
    return capture


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "mistral", "qwen2", "qwen3", "phi3", "gemma3"])
def test_the_upstream_outputs_add_up_to_the_stream_the_logits_read(arch, backend, tiny, tiny_task):
    """The graph's premise (what makes an edge's ablation a change of one summand): input, heads
    (``z @ W_O[h]``, behind a post-norm their shares of its output), attention output biases and
    MLPs add up to the last residual stream — on every family."""
    from capwrap.models import ModelSpec, build_model

    if arch in ARCHITECTURES:
        model = tiny(arch, backend)
    else:
        spec = ModelSpec(d_vocab=tiny_task.d_vocab, n_ctx=tiny_task.seq_len, n_layers=2, d_model=16, n_heads=4,
                         n_key_value_heads=2, architecture=arch)  # fmt: skip
        model = build_model(spec, backend=backend, seed=0)
    _assert_upstream_adds_up(model, tiny_task.sample(4, seed=0).tokens)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_behind_a_post_norm_each_head_writes_its_share_of_the_normalized_output(arch, backend, tiny, tiny_task):
    """An RMS post-norm multiplies its input by one scale per position and by its weight per
    dimension, so head ``h``'s share of the normalized output is that output times ``o_h / raw``
    elementwise (``o_h = z_h @ W_O[h]``, ``raw = Σ_h o_h``): checked as
    ``share_h · raw = attn_out · o_h``, from the model's own ``hook_attn_out`` and no norm arithmetic."""
    model = tiny(arch, backend)
    graph = Graph.from_spec(model.spec)
    capture, seen = NodeCapture(model, graph, grads=False), {}
    with torch.no_grad(), model.hooks([*capture.hooks(), ("blocks.1.hook_attn_out", lambda act, hook=None: seen.update(out=act)),
                                       ("blocks.1.attn.hook_z", lambda act, hook=None: seen.update(z=act))]):  # fmt: skip
        model(tiny_task.sample(4, seed=0).tokens)
    o = torch.einsum("bphk,hkd->hbpd", seen["z"], model.weights()["blocks.1.attn.W_O"].detach())
    shares = capture.writes.outputs(1, capture.values().z[1])  # [head, batch, pos, d_model]
    torch.testing.assert_close(shares * o.sum(0), seen["out"] * o, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(shares, o, atol=1e-3)  # the norm matters: a share is not the head's raw output


def test_a_post_norm_checkpoint_with_what_the_functional_pass_does_not_compute(tmp_path, tiny_task):
    """A Gemma-2 checkpoint with linear rope scaling (as Gemma-3's larger configs have): the shares
    need only the norms, so edge attribution reads it; exact ablation, which recomputes MLPs with
    the functional pass, says what it lacks."""
    import transformers

    from capwrap.models import load_model

    config = transformers.Gemma2Config(vocab_size=tiny_task.d_vocab, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=tiny_task.seq_len,
                                       rope_scaling={"rope_type": "linear", "factor": 8.0})  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    model = load_model(tmp_path / "gemma2")
    assert model.spec.unsupported and model.spec.features.post_norm
    capture = _assert_upstream_adds_up(model, tiny_task.sample(4, seed=0).tokens)
    batch = tiny_task.sample(6, seed=0)
    assert attribute(model, batch, method="eap-ig", ig_steps=2).values.abs().max() > 0
    with pytest.raises(ConfigError, match="functional forward pass, which does not compute this gemma2 model: rope"):
        exact_scores(model, batch, edges=[0])
    with pytest.raises(ConfigError, match="takes the model's HeadWrites"):
        capture.values().upstream(model.weights())


def test_the_split_input_reference_leaves_the_models_hook_settings_as_they_were(tiny, tiny_task):
    model = tiny("gpt2", "bridge")
    model.module.set_use_attn_result(True)
    split_input_eap(model, tiny_task.sample(4, seed=0))
    cfg = model.module.cfg
    assert cfg.use_attn_result and not cfg.use_split_qkv_input and not cfg.use_hook_mlp_in


def test_the_split_input_reference_refuses_post_norm_blocks(tiny, tiny_task):
    with pytest.raises(ConfigError, match="taken before the post-norm"):
        split_input_eap(tiny("gemma2", "bridge"), tiny_task.sample(4, seed=0))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neo", "gpt_neox", "tracr"])
def test_eap_equals_the_split_input_reference(arch, backend, tiny, tiny_task):
    model = tiny(arch, backend)
    batch = tiny_task.sample(6, seed=0)
    corrupted = tiny_task.sample(6, seed=1).tokens
    for ablation in ("mean", "mean_positional", "zero", "corrupted"):
        kwargs = {"corrupted": corrupted} if ablation == "corrupted" else {}
        try:
            reference = split_input_eap(model, batch, ablation=ablation, **kwargs)
        except ConfigError:
            pytest.skip(f"the {backend} backend has no split inputs for {arch} (checked by the derivative test)")
        scores = attribute(model, batch, ablation=ablation, **kwargs)
        scale = float(reference.values.abs().max())
        assert torch.allclose(scores.values, reference.values, atol=1e-5 * max(1.0, scale), rtol=0), ablation


def _finite_difference_and_eap(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per edge: the metric's change when the edge is ablated by a small step ε towards its mean,
    divided by ε (exact ablation), and the EAP score."""
    graph = Graph.from_spec(model.spec)
    clean, mean = capture_values(model, batch.tokens, graph), ablated_values(model, graph, "mean", batch)
    eps = 1e-2
    near = NodeValues(
        clean.input + eps * (mean.input - clean.input),
        [c + eps * (m - c) for c, m in zip(clean.z, mean.z, strict=True)],
        [c + eps * (m - c) for c, m in zip(clean.mlp, mean.mlp, strict=True)],
    )
    masks = torch.zeros(graph.n_edges + 1, graph.n_edges, dtype=torch.bool)
    masks[torch.arange(1, graph.n_edges + 1), torch.arange(graph.n_edges)] = True
    values = ablated_metric(model, batch, masks, near).double().mean(1)
    return (values[1:] - values[0]) / eps, attribute(model, batch, ablation="mean").values.double()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eap_is_the_derivative_of_exact_edge_ablation(arch, backend, tiny, tiny_task):
    """Ablating each edge by a small step ε towards its mean changes the metric by ε · EAP score (to
    float32 rounding of the metric, and ReLU kinks in tracr); post-norm blocks (Gemma-2, OLMo-2, whose
    queries and keys are normalized too) included."""
    finite_difference, eap = _finite_difference_and_eap(tiny(arch, backend), tiny_task.sample(6, seed=0))
    assert torch.corrcoef(torch.stack([finite_difference, eap]))[0, 1] > 0.999
    assert (finite_difference - eap).abs().max() < 0.05 * eap.abs().max()


@pytest.mark.parametrize("parallel", [True, False])
def test_pythia_checkpoints_of_either_block_layout(parallel, tmp_path, backend, tiny_task):
    """A GPT-NeoX checkpoint says in its config whether attention and the MLP run in parallel (Pythia)
    or one after the other (``use_parallel_residual=False``); the graph follows the checkpoint
    transformers wrote: its upstream outputs add up to the stream, and EAP is the derivative of
    exact edge ablation."""
    import transformers

    from capwrap.models import load_model

    config = transformers.GPTNeoXConfig(vocab_size=tiny_task.d_vocab, hidden_size=32, intermediate_size=40,
                                        num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                        max_position_embeddings=tiny_task.seq_len, use_parallel_residual=parallel)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "neox")
    model = load_model(tmp_path / "neox", backend=backend)
    graph = Graph.from_spec(model.spec)
    assert graph.layout == ("parallel" if parallel else "sequential")
    assert graph.has_edge("L0H0", "L0.mlp") != parallel
    batch = tiny_task.sample(6, seed=0)
    assert "blocks.0.attn.b_O" in model.weights()  # the biases are counted
    _assert_upstream_adds_up(model, batch.tokens)
    finite_difference, eap = _finite_difference_and_eap(model, batch)
    assert torch.corrcoef(torch.stack([finite_difference, eap]))[0, 1] > 0.999


def test_a_hand_computable_graph(tiny, tiny_task):
    """Blocks that write nothing and no norm: the logits are (embedding + position) @ W_U + b_U, so only
    the edge input -> logits matters, and its score is linear algebra."""
    model = tiny("tracr", "bridge")
    with torch.no_grad():
        for name, w in model.weights().items():
            if name.endswith(("W_O", "b_O", "W_out", "b_out")):
                w.zero_()
    batch = tiny_task.sample(8, seed=0)
    scores = attribute(model, batch, metric=_answer_logit, ablation="mean")
    w = {k: v.detach() for k, v in model.weights().items()}
    x = w["embed.W_E"][batch.tokens] + w["pos_embed.W_pos"][: batch.tokens.shape[1]]
    delta = x.mean((0, 1)) - x[torch.arange(8), batch.answer_pos]  # [batch, d_model]
    expected = (delta * w["unembed.W_U"].T[batch.answers]).sum(1).mean()
    index = scores.graph.edge_index("input->logits")
    assert float(scores.values[index]) == pytest.approx(float(expected), rel=1e-5)
    others = torch.cat([scores.values[:index], scores.values[index + 1 :]])
    assert float(others.abs().max()) < 1e-6
    exact = exact_scores(model, batch, metric=_answer_logit, ablation="mean", edges=[index])
    assert float(exact.values[index]) == pytest.approx(float(expected), rel=1e-4)  # a linear metric: EAP is exact
    ig = attribute(model, batch, metric=_answer_logit, ablation="mean", method="eap-ig", ig_steps=3)
    assert torch.allclose(ig.values, scores.values, atol=1e-6)


def test_eap_ig_is_complete_over_the_input_node(tiny, tiny_task):
    """Integrated gradients along the input: the input's edges add up to ablating the whole input."""
    model = tiny("gpt2", "bridge")
    batch = tiny_task.sample(8, seed=0)
    corrupted = tiny_task.sample(8, seed=1).tokens
    ig = attribute(model, batch, method="eap-ig", ablation="corrupted", corrupted=corrupted, ig_steps=12)
    graph = ig.graph
    from_input = graph.edge_up == graph.upstream_index("input")
    masks = torch.stack([torch.zeros(graph.n_edges, dtype=torch.bool), from_input])
    ablated = ablated_values(model, graph, "corrupted", batch, corrupted)
    values = ablated_metric(model, batch, masks, ablated)
    assert values.is_inference()  # exact ablation runs without autograd: no graph held for its passes
    values = values.mean(1)
    assert float(ig.values[from_input].sum()) == pytest.approx(float(values[1] - values[0]), rel=2e-3)


def _group_completeness(model, batch, method: str, ig_steps: int):
    """For each path of ``eap-ig-nodes`` (the input, a layer's heads together, an MLP): the scores of
    the group's edges summed, and the exact effect of ablating all of them."""
    scores = attribute(model, batch, method=method, ablation="mean_positional", ig_steps=ig_steps)
    graph = scores.graph
    groups = [torch.isin(graph.edge_up, torch.tensor(rows)) for _, rows in ig_paths(graph)]
    masks = torch.stack([torch.zeros(graph.n_edges, dtype=torch.bool), *groups])
    ablated = ablated_values(model, graph, "mean_positional", batch)
    values = ablated_metric(model, batch, masks, ablated).double().mean(1)
    summed = torch.stack([scores.values.double()[group].sum() for group in groups])
    return scores, summed, values[1:] - values[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "gemma2", "olmo2", "tracr"])
def test_eap_ig_nodes_is_complete_over_each_path(arch, backend, tiny, tiny_task):
    """Integrated gradients along each upstream output's own path: the edges of each path's nodes add
    up to ablating them all (the input; a layer's heads, which move together; an MLP), to the
    integral's resolution; on the input's edges it is EAP-IG itself."""
    model = tiny(arch, backend)
    batch = tiny_task.sample(8, seed=0)
    scores, summed, exact = _group_completeness(model, batch, "eap-ig-nodes", ig_steps=32)
    assert len(exact) == 2 * 2 + 1  # input, and per layer the heads and the MLP
    assert float(exact.abs().max()) > 1e-4  # not a vacuous comparison
    assert (summed - exact).abs().max() < 1e-2 * float(exact.abs().max()), (summed, exact)
    ig = attribute(model, batch, method="eap-ig", ablation="mean_positional", ig_steps=32)
    from_input = scores.graph.edge_up == scores.graph.upstream_index("input")
    assert torch.allclose(scores.values[from_input], ig.values[from_input], atol=1e-6)
    assert not torch.allclose(scores.values[~from_input], ig.values[~from_input], atol=1e-7)
    assert scores.method == "eap-ig-nodes" and scores.info["ig_steps"] == 32


def test_eap_ig_on_the_input_path_is_not_complete_per_node_where_the_model_is_far_from_linear(tiny, tiny_task):
    """Why ``eap-ig-nodes`` exists: random Tracr-layout weights (activations large enough to saturate)
    make EAP-IG's input path miss a node group's effect by ~17% of the largest, however many steps."""
    model = tiny("tracr", "bridge")
    batch = tiny_task.sample(8, seed=0)
    _, summed, exact = _group_completeness(model, batch, "eap-ig", ig_steps=32)
    assert float(exact.abs().max()) > 0.5
    assert (summed - exact).abs().max() > 0.1 * float(exact.abs().max())


def test_chunks_give_the_same_scores_and_leave_the_model_alone(tiny, tiny_task):
    model = tiny("gpt2", "bridge")
    batch = tiny_task.sample(9, seed=0)
    whole = attribute(model, batch, ablation="mean")
    chunked = attribute(model, batch, ablation="mean", batch_size=4)  # the means span all chunks
    assert torch.allclose(whole.values, chunked.values, atol=1e-7)
    reference = tiny_task.sample(16, seed=5)
    assert not torch.allclose(attribute(model, batch, reference=reference).values, whole.values)
    assert all(p.grad is None for p in model.parameters()) and not model.module.training
    table = whole.table()
    assert table["abs_score"].is_monotonic_decreasing and len(table) == whole.graph.n_edges


def test_bad_arguments_are_named(tiny, tiny_task):
    model = tiny("gpt2", "bridge")
    batch = tiny_task.sample(4, seed=0)
    with pytest.raises(ConfigError, match="unknown attribution method"):
        attribute(model, batch, method="acdc")
    with pytest.raises(ConfigError, match="unknown ablation"):
        attribute(model, batch, ablation="resample")
    with pytest.raises(ConfigError, match="needs corrupted"):
        attribute(model, batch, ablation="corrupted")
    with pytest.raises(ConfigError, match="must have the batch's shape"):
        attribute(model, batch, ablation="corrupted", corrupted=batch.tokens[:2])
    with pytest.raises(ConfigError, match="empty"):
        attribute(model, TaskBatch(batch.tokens[:0], batch.answer_pos[:0], batch.answers[:0]))


def test_only_upstream_outputs_can_be_overridden_and_each_path_holds_its_own_nodes(tiny):
    """``NodeCapture`` refuses hooks that hold no upstream output (or lie past the last layer), naming
    the ones it takes; ``ig_paths`` splits the upstream nodes into the hooks ``NodeValues.at`` reads."""
    model = tiny("gpt2", "bridge")
    graph = Graph.from_spec(model.spec)
    for bad in ("blocks.0.hook_resid_mid", f"blocks.{model.spec.n_layers}.attn.hook_z"):
        with pytest.raises(ConfigError, match=r"cannot override .*blocks\.0\.hook_resid_pre"):
            NodeCapture(model, graph, overrides={bad: torch.zeros(1)})
    paths = ig_paths(graph)
    assert sorted(i for _, rows in paths for i in rows) == list(range(len(graph.upstream)))
    n = model.spec.n_layers
    values = NodeValues(
        torch.zeros(1), [torch.full((1,), float(k)) for k in range(n)], [torch.full((1,), -1.0 - k) for k in range(n)]
    )
    for hook, rows in paths:
        kinds = {graph.upstream[i].kind for i in rows}
        layer = graph.upstream[rows[0]].layer
        expected = {"input": values.input, "head": values.z[layer], "mlp": values.mlp[layer]}[kinds.pop()]
        assert not kinds and values.at(hook) is expected


def test_models_of_no_known_family_are_read_only_where_they_show_the_graph(tmp_path, tiny_task):
    """A model loaded through the generic path has no description of its blocks: OPT's sequential
    pre-norm blocks show every hook and weight the graph reads (its outputs add up to the stream, and
    EAP scores them; exact ablation, which recomputes MLPs from a description, says it cannot);
    GPT-J's parallel blocks have no ``hook_resid_mid``, and every entry point refuses them with the
    reason instead of failing at a missing hook or giving wrong scores."""
    import transformers

    from capwrap.methods import CircuitTuning
    from capwrap.models import load_model
    from capwrap.training import TrainConfig, train

    configs = {
        "opt": transformers.OPTConfig(vocab_size=tiny_task.d_vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                      num_attention_heads=4, max_position_embeddings=tiny_task.seq_len + 2,
                                      word_embed_proj_dim=32),
        "gptj": transformers.GPTJConfig(vocab_size=tiny_task.d_vocab, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                        n_positions=tiny_task.seq_len),
    }  # fmt: skip
    models = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        models[name] = load_model(tmp_path / name)
    assert models["opt"].spec.family is None and models["gptj"].spec.family is None
    batch = tiny_task.sample(6, seed=0)
    opt = models["opt"]
    _assert_upstream_adds_up(opt, batch.tokens)
    assert attribute(opt, batch).values.abs().max() > 0
    with pytest.raises(ConfigError, match="functional forward pass, which does not compute this opt model.*attribute"):
        exact_scores(opt, batch, edges=[0])

    gptj = models["gptj"]
    message = "cannot read this gptj model: it needs blocks.0.hook_resid_mid.*no description of gptj blocks"
    for run in (
        lambda: attribute(gptj, batch),
        lambda: exact_scores(gptj, batch, edges=[0]),
        lambda: train(gptj, tiny_task, TrainConfig(steps=1, batch_size=4, progress=False), method=CircuitTuning(top_n=4)),
    ):
        with pytest.raises(ConfigError, match=message):
            run()
