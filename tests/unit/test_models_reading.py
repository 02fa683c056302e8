"""Reading checkpoints capwrap does not fully model: the generic path, and every way a config can be
wrong — each a capwrap error that names the file and the fix, never a library's exception."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from capwrap.analyzers import activation_patching, weight_change_table
from capwrap.analyzers.patching import engine_settings
from capwrap.analyzers.streaming import stream_weight_change
from capwrap.cli import main
from capwrap.errors import CheckpointError, ConfigError
from capwrap.models import available_backends, load_model, save_model
from capwrap.models.functional import Functional
from capwrap.tasks import TaskBatch

SIZES = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24)


def _save(config, path, seed=0):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    """OPT: an architecture TransformerLens's bridge runs and capwrap has no family entry for."""
    path = tmp_path_factory.mktemp("generic") / "opt"
    hf = _save(transformers.OPTConfig(ffn_dim=40, word_embed_proj_dim=32, **SIZES), path)
    return path, hf


@pytest.mark.backend  # a checkpoint only the bridge runs loads on the bridge by default on either TransformerLens line
def test_an_architecture_only_the_bridge_knows_loads_and_runs_the_hook_analyses(opt_folder, tmp_path):
    folder, hf = opt_folder
    model = load_model(folder, backend="bridge")
    assert model.spec.architecture == "opt" and model.spec.family is None and model.spec.hf_config
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    counts = model.components.counts()
    assert counts["attn"] == counts["mlp"] == 2 and counts["embed"] == 1 and counts["norm"] >= 4
    # OPT lays out q/k/v/o and fc1/fc2 as nn.Linear usually is: single heads and neurons too
    assert counts["head"] == 2 * 4 and counts["neuron"] == 2 * 40
    w = model.weights()
    assert w["blocks.1.attn.W_Q"].shape == (4, 32, 8) and w["blocks.1.mlp.W_out"].shape == (40, 32)
    with torch.no_grad():  # the generic views write through too
        w["blocks.1.mlp.W_out"].mul_(0.0)
    with torch.no_grad():
        assert not torch.allclose(model(tokens), hf(tokens).logits)
    # the fast engine declines with the reason; the hooks engine runs
    with pytest.raises(ConfigError, match="engine='hooks'"):
        Functional(model)
    batch = TaskBatch(tokens, torch.full((3,), 9), tokens[:, 0], {})
    with pytest.raises(ConfigError, match="no feature description of 'opt'"):
        activation_patching(
            model, batch, source=load_model(folder), sites=("attn_out",), engine="resumed", progress=False
        )
    assert engine_settings(model).engine == "hooks"  # what the default engine picks for such a model
    result = activation_patching(model, batch, source=load_model(folder), sites=("attn_out", "mlp_out", "head"),
                                 positions="all", progress=False)  # fmt: skip
    assert len(result.table) == 2 + 2 + 8
    # the weight diff, in memory and streamed from the folders
    save_model(model, tmp_path / "tuned")
    streamed = stream_weight_change(folder, tmp_path / "tuned").set_index("component").sort_index()
    expected = weight_change_table(load_model(folder), model).set_index("component").sort_index()
    assert list(streamed.index) == list(expected.index)
    assert streamed["change"].idxmax() == expected["change"].idxmax() == "L1.mlp"
    torch.testing.assert_close(torch.tensor(streamed["change"].to_numpy()), torch.tensor(expected["change"].to_numpy()),
                               rtol=1e-5, atol=1e-7)  # fmt: skip


@pytest.mark.backend  # a checkpoint only the bridge runs loads on the bridge by default on either TransformerLens line
def test_a_known_family_with_an_unmodeled_detail_loads_with_its_heads(tmp_path, capsys):
    config = transformers.LlamaConfig(intermediate_size=40, num_key_value_heads=2, **SIZES,
                                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})  # fmt: skip
    hf = _save(config, tmp_path / "scaled")
    model = load_model(tmp_path / "scaled", backend="bridge")
    assert model.spec.architecture == "llama" and model.spec.unsupported == ["rope scaling 'linear'"]
    assert model.components.counts()["kv_head"] == 4
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="rope scaling 'linear'.*engine='hooks'"):
        Functional(model)
    if "hooked" in available_backends():
        with pytest.raises(ConfigError, match="backend='bridge'"):
            load_model(tmp_path / "scaled", backend="hooked")
    assert main(["info", str(tmp_path / "scaled")]) == 0
    assert "hooks engine only (rope scaling 'linear')" in capsys.readouterr().out


def test_unknown_llama_like_model_type_names_the_closest_family(tmp_path):
    """Helium is a Llama-like decoder that transformers has and neither capwrap nor the bridge knows."""
    _save(transformers.HeliumConfig(intermediate_size=40, num_key_value_heads=4, attention_bias=True, **SIZES),
          tmp_path / "helium")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_model(tmp_path / "helium")
    message = str(err.value)
    assert str(tmp_path / "helium" / "config.json") in message and "'helium'" in message
    assert "qwen2 (Qwen2 / Qwen2.5)" in message  # the families it could have been
    assert "closest capwrap family is 'qwen2'" in message  # attention biases, like Qwen2
    _save(transformers.HeliumConfig(intermediate_size=40, num_key_value_heads=4, **SIZES), tmp_path / "plain")
    with pytest.raises(ConfigError, match="the closest capwrap family is 'llama', which has the same block features as "
                                          "far as its config shows"):  # fmt: skip
        load_model(tmp_path / "plain")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "is not valid JSON"),
        ('["a", "list"]', "has no model_type"),
        ('{"hidden_size": 8}', "has no model_type"),
        ('{"model_type": "newlm", "hidden_size": 8}', "transformers cannot read .*model type 'newlm'"),
        ('{"model_type": "llama", "hidden_size": "wide"}', "transformers cannot read .*hidden_size"),
    ],
)
def test_broken_config_json_is_a_checkpoint_error_naming_the_file(tmp_path, content, match, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(folder)
    assert str(folder / "config.json") in str(err.value)
    assert main(["info", str(folder)]) == 2  # the CLI prints the message, not a traceback
    printed = capsys.readouterr().err
    assert printed.startswith("capwrap: error:") and "Traceback" not in printed


def test_a_config_with_impossible_sizes_names_the_file_and_the_field(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_head": 5}))
    with pytest.raises(ConfigError, match=r"config\.json: d_model=32 is not divisible by n_heads=5"):
        load_model(folder)


def test_a_broken_tokenizer_is_named_not_silently_dropped(tmp_path, capsys):
    """A corrupt tokenizer.json loaded as "tokenizer: none": a text task then said the model had none."""
    from capwrap.errors import CapwrapWarning
    from capwrap.models import ModelSpec, build_model

    folder = save_model(build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2)), tmp_path / "m")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.warns(CapwrapWarning, match=r"the tokenizer files in .*m cannot be read \(.*\); .*Copy the base model's"):
        model = load_model(folder)
    assert model.tokenizer is None  # the weights still load: weight analyses need no tokenizer
    assert main(["info", str(folder)]) == 0
    assert "capwrap: warning: the tokenizer files in" in capsys.readouterr().err
