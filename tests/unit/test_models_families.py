"""Every decoder family on checkpoints written by ``transformers`` itself: logits, weight views,
components, the fast forward pass and patching engine, the streamed weight diff.

One tiny config per family (shaped like the published models: grouped-query attention, local
layers shorter than the test sequences, partial rotary, soft-caps ...), one folder each per session.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from capwrap.analyzers import activation_patching, patch_index, weight_change_table
from capwrap.analyzers.pruning import unit_gradient_scores
from capwrap.analyzers.streaming import stream_weight_change
from capwrap.errors import ConfigError
from capwrap.models import ModelSpec, load_model, save_model
from capwrap.models.families import FAMILIES
from capwrap.models.functional import Functional
from capwrap.tasks import TaskBatch

VOCAB, CTX, SEQ = 64, 24, 12
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=CTX)  # fmt: skip
_NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

#: A tiny config per family, written the way the family's published checkpoints are.
TINY: dict[str, transformers.PretrainedConfig] = {
    "gpt2": transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CTX, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=True
    ),  # fmt: skip
    "gpt_neo": transformers.GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=CTX,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=5,
    ),  # fmt: skip
    "llama": transformers.LlamaConfig(num_key_value_heads=2, **_SIZES),
    "mistral": transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **_SIZES),
    "qwen2": transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **_SIZES),
    "qwen3": transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **_SIZES),
    "gpt_neox": transformers.GPTNeoXConfig(rotary_pct=0.25, **_SIZES),  # Pythia
    "gemma2": transformers.Gemma2Config(
        num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,  # caps that bite at this scale
        **_SIZES, **_NO_SPECIAL,
    ),  # fmt: skip
    "gemma3": transformers.Gemma3TextConfig(
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        **_SIZES,
        **_NO_SPECIAL,
    ),  # fmt: skip
    "phi3": transformers.Phi3Config(num_key_value_heads=2, sliding_window=5, **_SIZES, **_NO_SPECIAL),
    "olmo2": transformers.Olmo2Config(num_key_value_heads=2, **_SIZES, **_NO_SPECIAL),
}
NEW = ["mistral", "qwen2", "qwen3", "gpt_neox", "gemma2", "gemma3", "phi3", "olmo2"]


def test_every_family_has_a_tiny_checkpoint_here():
    assert sorted(TINY) == sorted(f for f in FAMILIES if FAMILIES[f].hf_class)


def _write(config: transformers.PretrainedConfig, path, seed: int = 0, shard: bool = False) -> torch.nn.Module:
    """A random model of ``config`` with weights scaled up (so that every feature shows in the
    logits), saved by transformers itself."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
    hf.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    return hf


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple]:
    """family -> (folder, the transformers model); every other family's folder is sharded."""
    root = tmp_path_factory.mktemp("families")
    return {
        name: (root / name, _write(config, root / name, shard=i % 2 == 1))
        for i, (name, config) in enumerate(TINY.items())
    }


def _tokens(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(TINY))
def test_loads_and_computes_as_transformers_does(family, folders, backend):
    folder, hf = folders[family]
    model = load_model(folder, backend=backend)
    assert model.spec.architecture == family and not model.spec.hf_config
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)
    assert model.spec.n_params == sum(p.numel() for p in hf.parameters())
    # the component map: heads, kv heads, neurons, norms
    spec, counts = model.spec, model.components.counts()
    assert counts["head"] == spec.n_layers * spec.n_heads
    assert counts.get("kv_head", 0) == (
        spec.n_layers * spec.n_key_value_heads if spec.n_key_value_heads != spec.n_heads else 0
    )
    assert counts["neuron"] == spec.n_layers * spec.d_mlp
    f = spec.features
    per_block = 2 * f.pre_norm + 2 * f.post_norm
    assert counts["norm"] == spec.n_layers * per_block + 1
    assert sum(c.numel(model.weights()) for c in model.components.select("neuron")) > 0
    # the fast forward pass agrees with TransformerLens's hooks
    trace = Functional(model).trace(tokens)
    acts = model.capture(tokens, ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out",
                                  "blocks.0.hook_attn_out"])  # fmt: skip
    torch.testing.assert_close(trace.resid_pre[1], acts["blocks.1.hook_resid_pre"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.z[1], acts["blocks.1.attn.hook_z"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.mlp_out[0], acts["blocks.0.hook_mlp_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.attn_out[0], acts["blocks.0.hook_attn_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.logits, expected, atol=1e-4, rtol=0)


@pytest.mark.backend  # TransformerLens 3 loads a Llama on HookedTransformer by default
def test_a_llama_with_mlp_biases_runs_on_the_bridge_as_transformers_does(tmp_path):
    """A gated MLP's gate bias is a term capwrap's blocks do not compute (nor TransformerLens 3's
    GatedMLP, which adds b_in after the gate's product): read as a Llama, such a checkpoint was 0.74
    away from transformers in the fast forward pass and 1.1 on TransformerLens 3's HookedTransformer."""
    config = TINY["llama"].__class__.from_dict({**TINY["llama"].to_dict(), "mlp_bias": True})
    hf = _write(config, tmp_path / "llama_mlp_bias", shard=False)
    model = load_model(tmp_path / "llama_mlp_bias")
    assert model.spec.hf_config and model.backend == "bridge"  # kept as the config says, for the bridge
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(TINY))
def test_takes_turns_in_a_residency_bit_for_bit(family, folders, backend):
    """Every family's storage layout (fused, split, tied, copied q/k/v ...) is freed and read back
    exactly, and a released model's weights read one at a time are its weights."""
    from capwrap.models.residency import Residency

    base = load_model(folders[family][0], backend=backend)
    tuned = base.clone()
    with torch.no_grad():
        for w in tuned.weights().values():
            w.mul_(1.5)
    tokens = _tokens(3)
    want = {"base": base(tokens), "tuned": tuned(tokens)}
    weights = {k: v.detach().clone() for k, v in base.weights().items()}
    with Residency() as residency:
        residency.add(base)
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage() for v in base.weights().values()}
        residency.add(tuned)
        assert all(s.nbytes() == 0 for s in storages.values())  # every weight's memory freed
        for name, value in weights.items():
            assert torch.equal(residency.read_weight(base, name), value), name
        assert torch.equal(base(tokens), want["base"]) and torch.equal(tuned(tokens), want["tuned"])
        assert torch.equal(base(tokens), want["base"])


@pytest.mark.parametrize("family", list(TINY))
def test_pruning_scores_units_from_activations_as_gradient_times_weight(family, folders, backend,
                                                                       weight_gradient_unit_scores):  # fmt: skip
    """Pruning reads a head's or neuron's Σ gradient ⊙ weight off hook_q/k/v/z and the MLP hooks:
    exact on every family's layout (query/key norms, grouped keys, fused and gated projections)."""
    model = load_model(folders[family][0], backend=backend)
    tokens = _tokens(4, n=4)
    batch = TaskBatch(tokens, torch.tensor([SEQ - 1, SEQ - 3, 4, SEQ - 2]), _tokens(5, n=4)[:, 0], {})
    for kind in ("head", "neuron"):
        new, reference = unit_gradient_scores(model, batch, kind), weight_gradient_unit_scores(model, batch, kind)
        torch.testing.assert_close(torch.tensor([new[k] for k in reference]), torch.tensor(list(reference.values())),
                                   rtol=1e-4, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("family", NEW)
def test_fast_patching_engine_equals_the_hooks_engine(family, folders, backend):
    model = load_model(folders[family][0], backend=backend)
    clean, corrupt = _tokens(1, n=4), _tokens(2, n=4)
    answer_pos = torch.tensor([SEQ - 1, SEQ - 4, SEQ - 2, SEQ // 2])
    batch = TaskBatch(corrupt, answer_pos, clean[:, 0], {})
    index = patch_index(2, 4, SEQ, ("resid_pre", "attn_out", "mlp_out", "head"), "both")
    index = index[index["pos"].isin([-1, 2, 7, SEQ - 1])]  # all positions at once, and three single ones
    kwargs = dict(source_tokens=clean, index=index, progress=False)
    fast = activation_patching(model, batch, engine="resumed", **kwargs)
    hooks = activation_patching(model, batch, engine="hooks", **kwargs)
    torch.testing.assert_close(fast.values, hooks.values, atol=1e-5, rtol=0)
    assert float(fast.table["effect"].abs().max()) > 0.01  # the patches do something


@pytest.mark.parametrize("family", NEW)
def test_views_write_through_and_checkpoints_round_trip(family, folders, tmp_path):
    folder, hf = folders[family]
    model = load_model(folder)
    tokens = _tokens(3)
    w = model.weights()
    before = model(tokens).detach()
    with torch.no_grad():
        w["blocks.1.attn.W_Q"][1] *= 2.0
        w["blocks.0.mlp.W_out"][3] += 0.5
        w["blocks.1.attn.W_K"][0] -= 0.3
    after = model(tokens).detach()
    assert (after - before).abs().max() > 1e-3
    trace = Functional(model).trace(tokens)  # it reads the same storage
    torch.testing.assert_close(trace.logits, after, atol=1e-4, rtol=0)
    save_model(model, tmp_path / "again")
    again = load_model(tmp_path / "again")
    torch.testing.assert_close(again(tokens), after, atol=1e-5, rtol=0)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, after, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", NEW)
def test_streamed_weight_diff_equals_the_in_memory_one(family, folders, tmp_path):
    base = load_model(folders[family][0])
    tuned = base.clone()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, w in tuned.weights().items():
            w.add_((0.2 if name.startswith("blocks.1.") else 0.01) * torch.randn(w.shape, generator=gen))
    save_model(tuned, tmp_path / "tuned")
    streamed = stream_weight_change(folders[family][0], tmp_path / "tuned").set_index("component").sort_index()
    expected = weight_change_table(base, tuned).set_index("component").sort_index()
    assert list(streamed.index) == list(expected.index)
    torch.testing.assert_close(torch.tensor(streamed["change"].to_numpy()), torch.tensor(expected["change"].to_numpy()),
                               rtol=1e-5, atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("family", NEW)
def test_tied_and_untied_embeddings_single_and_sharded_files(family, tmp_path):
    """The fixture's checkpoint flipped: tied where it is untied, one file where it is sharded."""
    config = TINY[family].__class__.from_dict(
        {**TINY[family].to_dict(), "tie_word_embeddings": not TINY[family].tie_word_embeddings}
    )
    sharded = list(TINY).index(family) % 2 == 0  # the opposite of the fixture's
    hf = _write(config, tmp_path / "flipped", seed=5, shard=sharded)
    assert (tmp_path / "flipped" / "model.safetensors.index.json").exists() == sharded
    model = load_model(tmp_path / "flipped")
    assert model.spec.tie_embeddings == config.tie_word_embeddings
    assert ("unembed" in model.components.counts()) != config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens(6)), hf(_tokens(6)).logits, atol=1e-4, rtol=0)


def test_gemma_soft_caps_are_live_in_the_tiny_checkpoint(folders):
    """Without its soft-caps the same Gemma-2 computes something else: the logits test above tests them."""
    import copy
    import dataclasses

    model = load_model(folders["gemma2"][0])
    tokens = _tokens(7)
    reference = Functional(model).trace(tokens).logits
    for change in ({"attn_softcap": 0.0}, {"logit_softcap": 0.0}):
        twin = copy.copy(model)
        twin.spec = dataclasses.replace(model.spec, features=model.spec.features.replace(**change))
        assert (Functional(twin).trace(tokens).logits - reference).abs().max() > 1e-3, change


@pytest.mark.parametrize("family", list(TINY))
def test_tensor_names_are_the_ones_transformer_lens_adapters_use(family):
    """Each registry entry's module names agree with the installed TransformerBridge adapter's."""
    from capwrap.models import ModelSpec
    from capwrap.models.generic import adapter_for

    names = FAMILIES[family].tensors
    mapping = adapter_for(ModelSpec.from_hf_config(TINY[family])).component_mapping
    blocks = mapping["blocks"]
    subs = blocks.submodules
    assert (mapping["embed"].name, blocks.name, mapping["ln_final"].name, mapping["unembed"].name) == (
        names.embed, names.layers, names.ln_final, names.unembed,
    )  # fmt: skip
    assert getattr(mapping.get("pos_embed"), "name", None) == names.pos_embed
    ours = {getattr(names, n) for n in ("ln1", "ln1_post", "ln2", "ln2_post")} - {None}
    assert {s.name for k, s in subs.items() if k.startswith("ln")} == ours
    attn, mlp = subs["attn"], subs["mlp"]
    assert attn.name == names.attn and mlp.name == names.mlp
    theirs = {k: s.name for k, s in attn.submodules.items()}
    expected = {"o": names.o, "q_norm": names.q_norm, "k_norm": names.k_norm}
    expected |= {"qkv": names.qkv} if names.qkv else {"q": names.q, "k": names.k, "v": names.v}
    assert {k: theirs.get(k) for k in expected} == expected
    theirs = {k: s.name for k, s in mlp.submodules.items()}
    expected = {"out": names.down} | ({} if names.gate_up else {"in": names.up, "gate": names.gate})
    assert {k: theirs.get(k) for k in expected} == expected


@pytest.mark.parametrize("family", NEW)
def test_capwrap_info_on_each_family(family, folders, capsys):
    import json

    from capwrap.cli import main

    assert main(["info", str(folders[family][0])]) == 0
    out = capsys.readouterr().out
    assert f": {family} ({FAMILIES[family].title})" in out
    assert f"blocks: {FAMILIES[family].features.describe()}"[:40] in out and "fast engine (resumed)" in out
    assert main(["info", str(folders[family][0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["patching_engine"] == "resumed" and info["components"]["head"] == 8


def test_capwrap_info_on_a_model_without_a_family_claims_no_blocks(tmp_path, capsys):
    """An architecture the bridge runs without a capwrap family (OPT): ``capwrap info`` says capwrap
    does not describe its blocks. Until 2026-12-07 it printed the default features' "LayerNorm,
    learned positions, ReLU, no biases" for OPT, which has biases, and named the family twice."""
    from capwrap.cli import main

    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    assert main(["info", str(tmp_path / "opt")]) == 0
    out = capsys.readouterr().out
    assert ": opt (no capwrap family: TransformerLens's adapter), " in out
    assert "blocks: as TransformerLens's opt adapter computes them (capwrap has no description" in out
    assert "no biases" not in out and "hooks engine only" in out


_GENERIC = {  # architectures the bridge runs without a capwrap family, whose guessed features were wrong
    "mixtral": lambda v: transformers.MixtralConfig(vocab_size=v, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    num_local_experts=2, num_experts_per_tok=1),
    "cohere": lambda v: transformers.CohereConfig(vocab_size=v, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2),
    "arcee": lambda v: transformers.ArceeConfig(vocab_size=v, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=4),
}  # fmt: skip


_ADAPTER_TROUBLE = {  # configs TransformerLens's adapters got wrong or failed on, on one line or the other
    "cohere": lambda v: _GENERIC["cohere"](v),  # TL 3.9: other logits (0.08 off where they reach 0.24)
    "codegen": lambda v: transformers.CodeGenConfig(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                                    n_positions=64, n_ctx=64, rotary_dim=4),  # first forward fails
    "falcon": lambda v: transformers.FalconConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, new_decoder_architecture=True,
                                                  num_kv_heads=2),  # the adapter cannot split its qkv
    "gpt_neox": lambda v: transformers.GPTNeoXConfig(vocab_size=v, hidden_size=32, intermediate_size=48,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     attention_bias=False),  # TL 4's adapter asserts biases
}  # fmt: skip


@pytest.mark.backend  # what each TransformerLens line's adapters do
@pytest.mark.parametrize("name", list(_ADAPTER_TROUBLE))
def test_a_checkpoint_loads_as_transformers_computes_it_or_is_refused_saying_why(name, tmp_path):
    """Where capwrap does not compute a configuration itself, TransformerLens's adapter does, and some
    fail (a traceback from inside TransformerLens at load or at the first forward pass) or compute
    another model (TransformerLens 3.9's Cohere). Loading compares the bridge with transformers on a
    few tokens: a checkpoint loads and computes what transformers does, or is refused naming the
    adapter and what went wrong."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(_ADAPTER_TROUBLE[name](VOCAB)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))  # biases and norms away from their defaults
    hf.save_pretrained(tmp_path / name)
    try:
        model = load_model(tmp_path / name)
    except ConfigError as exc:
        assert "adapter" in str(exc) and "TransformerLens" in str(exc), exc
        return
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-3, rtol=0)


def test_a_config_with_sizes_per_layer_is_refused_saying_so(tmp_path):
    """transformers raises for a value a config sets per layer (Gemma-4's head_dim): the error escaped
    as a traceback from reading the config."""
    config_class = getattr(transformers, "Gemma4TextConfig", None)
    if config_class is None:
        pytest.skip("this transformers has no Gemma-4")
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    try:
        _ = config.head_dim
    except AttributeError:
        pass
    except Exception:  # noqa: BLE001 - the ambiguity this test is about
        with pytest.raises(ConfigError, match="head_dim cannot be read as one value"):
            ModelSpec.from_hf_config(config)
        return
    pytest.skip("this transformers reads Gemma-4's head_dim as one value")


@pytest.mark.parametrize("family", list(_GENERIC))
def test_pruning_scores_the_units_the_weights_have(family):
    """Pruning chose its hooks by the features capwrap guesses for a model no family describes (an
    RMSNorm model gated, a LayerNorm one not): Cohere's gated MLP under LayerNorm and Arcee's plain
    one under RMSNorm failed with KeyErrors, and a mixture of experts, with no neurons in the component
    map, with autograd's "inputs argument to grad() cannot be empty", stopping the whole diagnosis."""
    from capwrap.analyzers import ModelPair, Pruning
    from capwrap.analyzers.pruning import _accumulate_gradients, unit_gradient_scores
    from capwrap.models import ModelSpec, build_model
    from capwrap.tasks import PCFGConfig, PCFGTask

    task = PCFGTask(family="count", operand="a", config=PCFGConfig(length=8, window=4, occurrence=2))
    model = build_model(ModelSpec.from_hf_config(_GENERIC[family](task.d_vocab)), seed=0)
    batch = task.sample(8, seed=0)
    neurons = model.components.select("neuron")
    if not neurons:
        ev = Pruning(ks=(0, 1), score_size=8)(ModelPair(model, model.clone()), task, task, eval_size=8)
        assert not ev.applicable and "has no neuron units" in ev.summary
        return
    scores = unit_gradient_scores(model, batch, "neuron")
    _accumulate_gradients(model, batch)
    grads, weights = model.gradients(), model.weights()
    for comp in neurons[:: len(neurons) // 7]:
        expected = sum(float(sl.of({sl.param: grads[sl.param] * weights[sl.param].detach()}).sum()) for sl in comp.slices)
        assert scores[comp.name] == pytest.approx(expected, rel=1e-4, abs=1e-7), comp.name


def _every_analyzer_on_a_tiny_budget() -> list:
    """Every analyzer with samples and budgets that fit a unit test on a 2-layer model."""
    from capwrap.analyzers import AttentionComparison, Patching, Probing, Pruning, Revival, Subgraph, WeightDiff

    return [
        Subgraph(n=16, method="eap", top_share=0.1),
        Probing(n=64, steps=10),
        Pruning(ks=(0, 1), score_size=16),
        Revival(max_steps=2, batch_size=4, eval_every=1, check_size=16, control_steps=2, seeds=1),
        WeightDiff(graft_fractions=(0.1,)),
        AttentionComparison(n=8),
        Patching(n=4),
    ]


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox", "olmo2", "opt"])
def test_diagnose_runs_every_analyzer_on_new_families(family):
    """Every analyzer through diagnose() on a tiny pair: Gemma-2 (post-norms, soft-caps), Pythia
    (parallel blocks), OLMo-2 (post-norm only) on the fast engine, OPT on the generic path."""
    from capwrap.diagnosis import diagnose
    from capwrap.models import ModelSpec, build_model
    from capwrap.tasks import PCFGConfig, PCFGTask

    task = PCFGTask(family="count", operand="a", config=PCFGConfig(length=8, window=4, occurrence=2))
    if family == "opt":
        config = transformers.OPTConfig(vocab_size=task.d_vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                        num_attention_heads=4, max_position_embeddings=task.seq_len + 2,
                                        word_embed_proj_dim=32)  # fmt: skip
        spec = ModelSpec.from_hf_config(config)
    else:
        spec = ModelSpec(
            d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=32, n_heads=4, architecture=family
        )
    base = build_model(spec, seed=0)
    tuned = base.clone()
    with torch.no_grad():
        tuned.weights()["blocks.1.mlp.W_out"][:5] += 0.3
    analyzers = _every_analyzer_on_a_tiny_budget()
    result = diagnose(base, tuned, capability=task, downstream=task, analyzers=analyzers, eval_size=16)
    assert {e.analyzer for e in result.evidence} == {a.name for a in analyzers}
    # a random base cannot count and the perturbed copy gains nothing: both questions have nothing
    # to explain, whatever the analyzers found
    assert result.verdict == "inconclusive"
    assert result.deletion.verdict == result.creation.verdict == "inconclusive"
    assert "barely has the capability" in result.deletion.reasons[0]


@pytest.mark.parametrize("family", list(TINY))
def test_capwrap_diagnose_on_each_family(family, tmp_path, capsys, monkeypatch):
    """`capwrap diagnose BASE TUNED` on folders written by transformers: the CLI reads both, builds
    the tasks, runs every analyzer (on budgets that fit a unit test) and writes its summary."""
    import json

    import capwrap.diagnosis.checkpoints
    from capwrap.cli import main
    from capwrap.tasks import PCFGConfig, PCFGTask

    task = PCFGTask(config=PCFGConfig(length=8, window=4, occurrence=2))
    config = TINY[family].__class__.from_dict({**TINY[family].to_dict(), "vocab_size": task.d_vocab})
    _write(config, tmp_path / "base", seed=1)
    tuned = load_model(tmp_path / "base")
    with torch.no_grad():
        tuned.weights()["blocks.1.mlp.W_out"][:5] += 0.3
    save_model(tuned, tmp_path / "tuned")
    analyzers = _every_analyzer_on_a_tiny_budget()
    monkeypatch.setattr(capwrap.diagnosis.checkpoints, "default_analyzers", lambda quick, memory, compiled: analyzers)
    spec = "length=8,window=4,occurrence=2"
    code = main(["diagnose", str(tmp_path / "base"), str(tmp_path / "tuned"), "--capability",
                 f"pcfg=count,operand=a,{spec}", "--downstream", f"pcfg=count,operand=b,{spec}",
                 "--out", str(tmp_path / "diag"), "--quick", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "diag" / "summary.json").read_text())
    assert summary["spec"]["architecture"] == family
    assert summary["verdict"] == "inconclusive"  # a random base has no capability to lose, nor the copy a gain
    assert {e["analyzer"] for e in summary["evidence"]} >= {a.name for a in analyzers}
    weight_diff = next(e for e in summary["evidence"] if e["analyzer"] == "weight_diff")
    assert weight_diff["headline"]["total_change"] > 0

