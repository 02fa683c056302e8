"""CapModel on real TransformerLens backends: forward, hooks, canonical weights, gradients, checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from capwrap.errors import CheckpointError, ConfigError, HookNameError
from capwrap.models import CapModel, ModelSpec, available_backends, build_model, load_model, save_model
from capwrap.models.layouts import canonical_views, hf_shapes

pytestmark = pytest.mark.backend  # every test here exercises the TransformerLens backends


def test_same_seed_same_function_on_every_backend(small_spec):
    tokens = torch.randint(0, small_spec.d_vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    outs = [build_model(small_spec, backend=b, seed=4)(tokens) for b in available_backends()]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
    other_seed = build_model(small_spec, seed=5)(tokens)
    assert not torch.allclose(other_seed, outs[0])


def test_weights_are_views_that_write_through(small_model):
    tokens = torch.randint(0, small_model.spec.d_vocab, (2, 8))
    before = small_model(tokens).detach()
    w = small_model.weights()
    assert w["blocks.0.attn.W_Q"].shape == (4, 32, 8)
    assert w["blocks.1.mlp.W_in"].shape == (32, 128)
    with torch.no_grad():
        w["blocks.1.mlp.W_out"].zero_()
        w["blocks.1.mlp.b_out"].zero_()
        w["blocks.0.attn.W_V"][2] *= 3.0
    assert not torch.allclose(small_model(tokens), before)
    assert small_model.weights()["blocks.1.mlp.W_out"].abs().sum() == 0


def test_gradients_match_across_backends(small_spec):
    tokens = torch.randint(0, small_spec.d_vocab, (4, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for b in available_backends():
        model = build_model(small_spec, backend=b, seed=2)
        model(tokens).logsumexp(-1).mean().backward()
        grads.append(model.gradients())
    for g in grads:
        # attention weights get gradient through the bridge's q/k/v views too
        assert g["blocks.0.attn.W_Q"].norm() > 0 and g["blocks.0.attn.W_K"].norm() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[-1][name], grads[0][name], atol=1e-6, rtol=1e-4)


def test_layout_round_trip_is_exact(small_spec):
    shapes = hf_shapes(small_spec)
    state = {k: torch.randn(s) for k, s in shapes.items()}
    views = canonical_views(small_spec, state)
    rebuilt = {k: torch.zeros(s) for k, s in shapes.items()}
    for name, view in canonical_views(small_spec, rebuilt).items():
        view.copy_(views[name])
    for k in state:
        torch.testing.assert_close(rebuilt[k], state[k])


def test_capture_and_hook_patterns(small_model):
    tokens = torch.randint(0, small_model.spec.d_vocab, (3, 7))
    acts = small_model.capture(tokens, ["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"])
    assert list(acts) == ["blocks.0.attn.hook_z", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert acts["blocks.0.attn.hook_z"].shape == (3, 7, 4, 8)
    # the last residual stream, after the final norm and unembedding, gives the logits
    assert acts["blocks.1.hook_resid_post"].shape == (3, 7, 32)


def test_unknown_hook_name_suggests_closest(small_model):
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        small_model.resolve_hooks("blocks.*.hook_resid_pots")


def test_tokens_the_model_cannot_embed_are_refused(small_model):
    with pytest.raises(ConfigError, match="embeds only"):
        small_model(torch.tensor([[0, small_model.spec.d_vocab]]))
    with pytest.raises(ConfigError, match="n_ctx"):
        small_model(torch.zeros(1, small_model.spec.n_ctx + 1, dtype=torch.long))


def test_checkpoint_round_trip_across_backends(small_model, tmp_path):
    tokens = torch.randint(0, small_model.spec.d_vocab, (2, 9))
    save_model(small_model, tmp_path / "ckpt", metadata={"note": "x"})
    assert {"config.json", "model.safetensors", "capwrap.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert json.loads((tmp_path / "ckpt" / "capwrap.json").read_text())["metadata"]["note"] == "x"
    for b in available_backends():
        again = load_model(tmp_path / "ckpt", backend=b)
        torch.testing.assert_close(again(tokens), small_model(tokens), atol=1e-5, rtol=1e-5)
        assert again.metadata["note"] == "x"


def test_checkpoint_is_a_hugging_face_folder(small_model, tmp_path):
    import transformers

    save_model(small_model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, small_model.spec.d_vocab, (2, 9))
    torch.testing.assert_close(hf(tokens).logits, small_model(tokens), atol=1e-5, rtol=1e-5)


def test_save_refuses_to_overwrite_and_leaves_no_partial_folder(small_model, tmp_path):
    save_model(small_model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_model(small_model, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="JSON"):
        save_model(small_model, tmp_path / "other", metadata={"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_and_corrupt_checkpoints(small_model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    save_model(small_model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "ckpt")


def test_hub_name_while_offline_says_how_to_use_a_local_folder(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="--local-dir DIR") as err:
        load_model("roneneldan/TinyStories-1M")
    assert "offline" in str(err.value)


def test_a_hub_revision_that_does_not_exist_is_named(monkeypatch):
    """The hub answers a missing revision with an OSError: it was reported as the hub being
    unreachable ("offline?"). No network here: the hub's own exception, as its client raises it
    for a 404 on the revision."""
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    def missing_revision(name, revision=None, **_):
        import httpx2

        url = f"https://huggingface.co/api/models/{name}/revision/{revision}"
        raise RevisionNotFoundError("404 Revision Not Found", response=httpx2.Response(404, request=httpx2.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing_revision)
    with pytest.raises(CheckpointError, match=r"has 'roneneldan/TinyStories-1M' but no revision 'nope' of it") as err:
        load_model("roneneldan/TinyStories-1M", revision="nope")
    assert "offline" not in str(err.value)


def test_pickle_checkpoints_need_opt_in(small_model, tmp_path):
    save_model(small_model, tmp_path / "ckpt")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_model(tmp_path / "ckpt")
    tokens = torch.randint(0, small_model.spec.d_vocab, (2, 5))
    loaded = load_model(tmp_path / "ckpt", allow_pickle=True)
    torch.testing.assert_close(loaded(tokens), small_model(tokens), atol=1e-5, rtol=1e-5)
    # a pickle that runs code is refused even so, with what it held, never with torch's advice to load it
    # with weights_only=False (which the message passed on until 2026-12-07)
    torch.save({**state, "hook": print}, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="Unsupported global: GLOBAL print") as err:
        load_model(tmp_path / "ckpt", allow_pickle=True)
    assert "likely succeed" not in str(err.value) and "never loads pickles with weights_only=False" in str(err.value)


def test_spec_validation_names_the_field():
    with pytest.raises(ConfigError, match="n_heads"):
        ModelSpec(d_vocab=10, n_ctx=8, d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="d_vocab"):
        ModelSpec(d_vocab=0, n_ctx=8)
    with pytest.raises(ConfigError, match="architecture"):
        ModelSpec(d_vocab=10, n_ctx=8, architecture="mamba")  # type: ignore[arg-type]


def test_llama_specs_build_and_round_trip(backend, tmp_path):
    spec = ModelSpec(d_vocab=30, n_ctx=16, n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, architecture="llama")
    model = build_model(spec, backend=backend, seed=0)
    assert model.weights()["blocks.0.attn.W_K"].shape == (2, 32, 8)
    assert [c.name for c in model.components.select("kv_head", layer=1)] == ["L1KV0", "L1KV1"]
    tokens = torch.randint(0, 30, (2, 10))
    save_model(model, tmp_path / "llama")
    for b in available_backends():
        torch.testing.assert_close(
            load_model(tmp_path / "llama", backend=b)(tokens), model(tokens), atol=1e-5, rtol=1e-5
        )


def _tinystories_like_folder(path, window=3):
    """A GPT-Neo checkpoint written by transformers itself, shaped like roneneldan/TinyStories-1M
    (alternating global/local attention, tied embeddings, gelu_new), only smaller."""
    import transformers

    config = transformers.GPTNeoConfig(vocab_size=40, max_position_embeddings=24, hidden_size=32, num_layers=4,
                                       num_heads=4, attention_types=[[["global", "local"], 2]], window_size=window,
                                       bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    hf.save_pretrained(path)
    return hf


def test_gpt_neo_checkpoints_load_on_every_backend_as_transformers_runs_them(tmp_path):
    hf = _tinystories_like_folder(tmp_path / "neo")
    tokens = torch.randint(0, 40, (3, 14))  # longer than the window: the local layers matter
    expected = hf(tokens).logits
    for b in available_backends():
        model = load_model(tmp_path / "neo", backend=b)
        assert model.spec.attention_layers == ("global", "local", "global", "local") and model.spec.window_size == 3
        assert model.spec.n_params == sum(p.numel() for p in hf.parameters())
        torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=0)
        assert "blocks.0.attn.b_Q" not in model.weights() and "blocks.0.attn.b_O" in model.weights()
        assert model.components.counts()["head"] == 16
    save_model(model, tmp_path / "again")
    torch.testing.assert_close(load_model(tmp_path / "again")(tokens), expected, atol=1e-5, rtol=0)
    # The window is real: the same weights with every layer global compute something else.
    spec = dataclasses.replace(model.spec, attention_layers=("global",) * 4, window_size=0)
    everywhere = CapModel.from_state(spec, model.checkpoint_state())
    assert (everywhere(tokens) - expected).abs().max() > 1e-3


def test_checkpoints_in_older_hub_formats_load(tmp_path):
    """TinyStories-1M's pytorch_model.bin keeps its causal masks as tensors; the hub's gpt2 saves its
    weights without the ``transformer.`` prefix. Both load (the pickle only with the opt-in)."""
    hf = _tinystories_like_folder(tmp_path / "neo")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    for layer in range(4):
        state[f"transformer.h.{layer}.attn.attention.bias"] = torch.tril(torch.ones(1, 1, 24, 24, dtype=torch.bool))
        state[f"transformer.h.{layer}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    (tmp_path / "neo" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "neo" / "pytorch_model.bin")
    tokens = torch.randint(0, 40, (2, 12))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_model(tmp_path / "neo")
    torch.testing.assert_close(
        load_model(tmp_path / "neo", allow_pickle=True)(tokens), hf(tokens).logits, atol=1e-5, rtol=0
    )

    gpt2 = build_model(ModelSpec(d_vocab=40, n_ctx=16, n_layers=2, d_model=16, n_heads=2, tie_embeddings=True), seed=1)
    save_model(gpt2, tmp_path / "gpt2")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "gpt2" / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in weights.items()}
    bare |= {f"h.{i}.attn.bias": torch.ones(1, 1, 16, 16) for i in range(2)}
    save_file(bare, tmp_path / "gpt2" / "model.safetensors")
    torch.testing.assert_close(load_model(tmp_path / "gpt2")(tokens), gpt2(tokens), atol=1e-5, rtol=0)


def test_gpt_neo_spec_validation():
    with pytest.raises(ConfigError, match="window_size"):
        ModelSpec(d_vocab=10, n_ctx=8, architecture="gpt_neo", attention_layers=("global", "local"))
    with pytest.raises(ConfigError, match="one 'global' or 'local' per layer"):
        ModelSpec(d_vocab=10, n_ctx=8, architecture="gpt_neo", attention_layers=("global",), window_size=4)
    with pytest.raises(ConfigError, match="not expressible in GPT-2 models.*any pattern: gpt_neo"):
        ModelSpec(d_vocab=10, n_ctx=8, attention_layers=("global", "local"), window_size=4)
    with pytest.raises(ConfigError, match="'global' and 'local'"):
        ModelSpec(d_vocab=10, n_ctx=8, architecture="gpt_neo", attention_layers=("global", "sliding"), window_size=4)
    spec = ModelSpec(d_vocab=10, n_ctx=8, architecture="gpt_neo", attention_layers=["local", "global"], window_size=4)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.same_as(json.loads(json.dumps(spec.to_dict())))
    assert ModelSpec(d_vocab=10, n_ctx=8, architecture="gpt_neo", attention_layers=("global", "global")) == ModelSpec(
        d_vocab=10, n_ctx=8, architecture="gpt_neo"
    )
    # Specs saved by an older capwrap (run stores, checkpoints) lack the new fields: still the same model.
    gpt2 = ModelSpec(d_vocab=10, n_ctx=8)
    older = {k: v for k, v in gpt2.to_dict().items() if k not in ("attention_layers", "window_size")}
    assert gpt2.same_as(older) and not spec.same_as(older) and not gpt2.same_as({"colour": "red"})


def test_stories260k_loads_and_writes_a_story(stories260k, backend):
    model = load_model(stories260k, backend=backend)
    assert model.spec.architecture == "llama" and model.spec.n_params == 260_032
    ids = model.tokenizer("Once upon a time", return_tensors="pt").input_ids
    for _ in range(12):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert "there was a little girl named Lily" in model.tokenizer.decode(ids[0])


def test_clone_is_independent(small_model):
    twin = small_model.clone()
    with torch.no_grad():
        twin.weights()["embed.W_E"].add_(1.0)
    assert not torch.equal(twin.weights()["embed.W_E"], small_model.weights()["embed.W_E"])


def test_copying_saving_and_loading_a_model_leave_torch_s_generator_as_it_was(small_model, tmp_path):
    """A model copied in the middle of a run (the recorder's background copy, a checkpoint loaded)
    must not move the run's dropout masks: building the modules draws from the generator."""
    folder = save_model(small_model, tmp_path / "m")
    state = torch.get_rng_state()
    small_model.clone()
    load_model(folder, backend=small_model.backend)
    CapModel.from_state(small_model.spec, small_model.checkpoint_state(), small_model.backend)
    assert torch.equal(torch.get_rng_state(), state)


def test_capture_in_chunks_equals_one_pass(small_model):
    tokens = torch.randint(0, small_model.spec.d_vocab, (10, 6))
    whole = small_model.capture(tokens, "blocks.*.hook_resid_post")
    chunked = small_model.capture(tokens, "blocks.*.hook_resid_post", batch_size=3)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="batch_size"):
        small_model.capture(tokens, "hook_embed", batch_size=0)


def test_capture_keeps_what_reduce_returns_for_each_pass(small_model):
    """One position per sequence, or sums per pass: the rows a pass ran are the rows given to reduce."""
    tokens = torch.randint(0, small_model.spec.d_vocab, (10, 6), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([0, 5, 3, 2, 1, 4, 4, 0, 5, 2])
    whole = small_model.capture(tokens, "blocks.*.hook_resid_post")
    seen: list[tuple[int, int]] = []

    def at_position(name, act, rows):
        seen.append((rows.start, rows.stop))
        return act[torch.arange(act.shape[0]), pos[rows]]

    picked = small_model.capture(tokens, "blocks.*.hook_resid_post", batch_size=4, reduce=at_position)
    sums = small_model.capture(tokens, "blocks.*.hook_resid_post", batch_size=4,
                               reduce=lambda name, act, rows: act.sum((0, 1)).unsqueeze(0))  # fmt: skip
    for name, act in whole.items():
        torch.testing.assert_close(picked[name], act[torch.arange(10), pos], atol=1e-5, rtol=1e-5)
        assert sums[name].shape == (3, small_model.spec.d_model)  # one row per pass
        torch.testing.assert_close(sums[name].sum(0), act.sum((0, 1)), atol=1e-4, rtol=1e-5)
    assert sorted(set(seen)) == [(0, 4), (4, 8), (8, 10)]


def test_training_keeps_ties_and_agrees_across_backends(backend, tmp_path):
    """A tied checkpoint (like stories260K) trains and saves on every backend, with the same result;
    parameters a backend adds beyond the checkpoint (TL 3.9's bridge: an unembedding bias) stay frozen."""
    from capwrap.tasks import PCFGConfig, PCFGTask
    from capwrap.training import TrainConfig, train

    task = PCFGTask(config=PCFGConfig(length=6, window=3, occurrence=1))
    spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=16, n_layers=2, d_model=16, n_heads=4, architecture="llama",
                     n_key_value_heads=2, tie_embeddings=True)  # fmt: skip
    models = {b: build_model(spec, backend=b, seed=0) for b in available_backends()}
    for model in models.values():
        train(model, task, TrainConfig(steps=5, batch_size=8, lr=1e-2, progress=False))
    model = models[backend]
    w = model.weights()
    assert torch.equal(w["unembed.W_U"], w["embed.W_E"].T)
    save_model(model, tmp_path / "tied")  # refused if the tie had broken
    tokens = task.sample(4, seed=1).tokens
    for other in models.values():
        assert torch.allclose(model(tokens), other(tokens), atol=1e-5)
    assert torch.allclose(load_model(tmp_path / "tied", backend=backend)(tokens), model(tokens), atol=1e-6)
