"""PEFT LoRA adapters saved by peft: merged on load (equal to peft's merge), safe loading, errors."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from capwrap.errors import CapwrapWarning, CheckpointError, ConfigError
from capwrap.models import load_model, wrap_hf_model
from capwrap.models.adapters import is_adapter_folder, read_adapter


def _assert_merged_like_peft(model, reference) -> None:
    expected = reference.state_dict()
    for name, tensor in model.checkpoint_state().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    tokens = torch.randint(0, model.spec.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_adapter_merges_like_peft(gpt2_folder, make_adapter, peft_merged):
    # GPT-2's Conv1D layers store weights [in, out]: peft's fan_in_fan_out; its biases trained too.
    adapter = make_adapter(gpt2_folder, target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only")
    assert is_adapter_folder(adapter) and not is_adapter_folder(gpt2_folder)
    model = load_model(gpt2_folder, adapter=adapter)
    _assert_merged_like_peft(model, peft_merged(gpt2_folder, adapter))
    info = model.metadata["adapter"]
    assert info["rank"] == 4 and info["target_modules"] == ["c_attn", "c_fc", "c_proj"] and info["modules"] == 8
    assert info["base"] == str(gpt2_folder)


def test_every_bias_trained_beside_a_module_to_save_merges_like_peft(gpt2_folder, make_adapter, peft_merged):
    """bias="all" with modules_to_save on a module with a bias: peft saves, beside the trained module
    under its own name, its untrained original (.original_module.) and a second copy of its bias
    (.modules_to_save., which peft's loading ignores); they were taken for tensors the base lacks and
    the adapter refused (until 2026-12-07)."""
    adapter = make_adapter(gpt2_folder, target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"])
    replaced = read_adapter(adapter).replaced
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.0.ln_1.bias"} <= set(replaced)
    assert not [name for name in replaced if "original_module" in name or "modules_to_save" in name]
    _assert_merged_like_peft(load_model(gpt2_folder, adapter=adapter), peft_merged(gpt2_folder, adapter))


def test_llama_adapter_with_rank_and_alpha_patterns_merges_like_peft(llama_folder, make_adapter, peft_merged):
    adapter = make_adapter(
        llama_folder,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 32}, use_rslora=True,
        modules_to_save=["lm_head"],
    )  # fmt: skip
    lora = read_adapter(adapter)
    assert lora.modules["model.layers.0.mlp.down_proj"].rank == 2
    assert lora.modules["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(32 / 2)  # rsLoRA: alpha/sqrt(r)
    assert lora.modules["model.embed_tokens"].kind == "embedding" and "lm_head.weight" in lora.replaced
    _assert_merged_like_peft(load_model(llama_folder, adapter=adapter), peft_merged(llama_folder, adapter))


def test_adapter_folder_alone_loads_onto_the_base_its_config_names(gpt2_folder, make_adapter, tmp_path):
    adapter = make_adapter(gpt2_folder, target_modules=["c_attn"])
    alone, given = load_model(adapter), load_model(gpt2_folder, adapter=adapter)
    assert torch.equal(alone.weights()["blocks.1.attn.W_Q"], given.weights()["blocks.1.attn.W_Q"])

    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(
        CheckpointError, match=r"is a PEFT adapter \(LoRA r=4.*load_model\(BASE, adapter=.*/nowhere/base"
    ):
        load_model(moved)


def test_adapter_pickles_are_refused_unless_allowed(gpt2_folder, make_adapter, tmp_path):
    from safetensors.torch import load_file

    adapter = make_adapter(gpt2_folder, target_modules=["c_fc"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="only as a pickle file.*allow_pickle=True"):
        load_model(gpt2_folder, adapter=pickled)
    merged = load_model(gpt2_folder, adapter=pickled, allow_pickle=True)
    assert torch.equal(
        merged.weights()["blocks.0.mlp.W_in"], load_model(gpt2_folder, adapter=adapter).weights()["blocks.0.mlp.W_in"]
    )


def test_bad_adapters_get_clear_errors(gpt2_folder, llama_folder, make_adapter, tmp_path):
    adapter = make_adapter(gpt2_folder, target_modules=["c_attn"])
    with pytest.raises(
        CheckpointError, match="changes transformer.h.0.attn.c_attn.weight, which the base model does not have"
    ):
        load_model(llama_folder, adapter=adapter)

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))  # DoRA without magnitudes
    with pytest.raises(CheckpointError, match=r"DoRA adapter \(use_dora=True\) without the magnitude vector"):
        read_adapter(dora)
    (dora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))  # IA3 holding LoRA factors
    with pytest.raises(CheckpointError, match="a tensor an IA3 adapter does not have.*merge_and_unload"):
        read_adapter(dora)
    (dora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(CheckpointError, match="is a LOHA adapter; capwrap reads LoRA .DoRA included., IA3 and trainable-tokens adapters.*"
                                              "merge_and_unload"):  # fmt: skip
        read_adapter(dora)
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True, "kasa_config": {"k": 1}}))
    with pytest.raises(CheckpointError, match=r"with KaSA \(kasa_config\), whose weight change capwrap does not "
                                              r"compute.*merge_and_unload"):  # fmt: skip
        read_adapter(dora)

    from safetensors.torch import load_file, save_file

    diverged = tmp_path / "diverged"  # a NaN in a factor: refused on reading (a LinAlgError in diagnose until 2026-12-07)
    shutil.copytree(adapter, diverged)
    factors = load_file(str(diverged / "adapter_model.safetensors"))
    name = sorted(factors)[0]
    factors[name][0, 0] = float("nan")
    save_file(factors, str(diverged / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=f"the adapter {diverged} holds non-finite values in {name}"):
        read_adapter(diverged)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_adapter(corrupt)


@pytest.mark.parametrize("where", ["lora", "modules_to_save"])
def test_an_adapter_on_a_tied_embedding_is_refused_and_the_untied_copy_diagnoses_it(
    where, gpt2_folder, make_adapter, tmp_path
):
    """peft trains a tied GPT-2's input embedding alone (LoRA factors on wte, or a trained copy of it),
    leaving lm_head on the base's weights: merged into the one tied tensor, the model would differ from
    the trained one by whole logits (until 2026-12-07). The error's recipe, an untied copy of the base
    with the adapter merged by peft, gives the trained model."""
    import peft
    import transformers

    options = {"lora": {"target_modules": ["c_attn", "wte"]},
               "modules_to_save": {"target_modules": ["c_attn"], "modules_to_save": ["wte"]}}[where]  # fmt: skip
    adapter = make_adapter(gpt2_folder, **options)
    with pytest.raises(CheckpointError, match=r"changes transformer.wte.weight, which this base ties to its output "
                                              r"layer \(lm_head.weight\).*Untie a copy of the base"):  # fmt: skip
        load_model(gpt2_folder, adapter=adapter)

    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder), adapter)
    with torch.no_grad():
        expected = trained.eval()(tokens).logits
    untied = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)  # the recipe of the guide
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    untied.save_pretrained(tmp_path / "untied")
    merged = peft.PeftModel.from_pretrained(untied, adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    base, tuned = load_model(tmp_path / "untied"), load_model(tmp_path / "merged")
    assert not base.spec.tie_embeddings and base.spec == tuned.spec
    torch.testing.assert_close(tuned(tokens), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base(tokens), expected, atol=1e-2)  # the adapter does change the model


def test_an_adapter_peft_kept_tied_merges(make_adapter, tmp_path):
    """With ensure_weight_tying=True peft trains a tied Llama's embedding and output layer as one
    (modules_to_save) and saves both, equal: merged into the one tied tensor, that is the trained model."""
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    adapter = make_adapter(tmp_path / "tied", target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                           ensure_weight_tying=True)  # fmt: skip
    trained = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tied"), adapter)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.eval()(tokens).logits
    torch.testing.assert_close(load_model(tmp_path / "tied", adapter=adapter)(tokens), expected, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():  # live, it is still tied: nothing to warn of
        warnings.simplefilter("error", CapwrapWarning)
        torch.testing.assert_close(wrap_hf_model(trained)(tokens), expected, rtol=1e-4, atol=1e-4)


def test_adapter_where_a_checkpoint_is_expected_says_how_to_use_it(gpt2_folder, make_adapter):
    from capwrap.analyzers.streaming import checkpoint_spec

    adapter = make_adapter(gpt2_folder, target_modules=["c_attn"])
    with pytest.raises(CheckpointError, match=r"PEFT adapter \(LoRA r=4, trained on .*gpt2'\), not a full checkpoint"):
        checkpoint_spec(adapter)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_weight_diff_equals_the_diff_of_the_merged_model(
    arch, gpt2_folder, llama_folder, make_adapter, tmp_path
):
    from capwrap.analyzers.adapter_diff import adapter_weight_diff
    from capwrap.analyzers.streaming import stream_weight_diff
    from capwrap.models import save_model

    base = {"gpt2": gpt2_folder, "llama": llama_folder}[arch]
    targets = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}[arch]
    adapter = make_adapter(base, target_modules=targets, r=2, layers_to_transform=[1])
    save_model(load_model(base, adapter=adapter), tmp_path / "merged")
    expected = stream_weight_diff(base, tmp_path / "merged")
    diff = adapter_weight_diff(None, adapter)  # the base its config names

    got, want = diff.table.set_index("component"), expected.table.set_index("component")
    assert set(got.index) == set(want.index)
    torch.testing.assert_close(torch.tensor(got.loc[want.index, "change"].to_numpy()),
                               torch.tensor(want["change"].to_numpy()), rtol=1e-4, atol=1e-6)  # fmt: skip
    assert (got.loc[got["layer"] == 0, "change"] == 0).all()  # only layer 1 was adapted
    heads = got[got["kind"] == "head"]
    assert heads["share"].sum() == pytest.approx(1.0)
    ranks, want_ranks = diff.ranks.set_index("weight"), expected.ranks.set_index("weight")
    assert set(ranks.index) == set(want_ranks.index)
    torch.testing.assert_close(torch.tensor(ranks.loc[want_ranks.index, "effective_rank"].to_numpy()),
                               torch.tensor(want_ranks["effective_rank"].to_numpy()), rtol=1e-3, atol=1e-3)  # fmt: skip
    assert (ranks["effective_rank"] <= 2 + 1e-3).all()  # rank-2 adapter
    for key in ("total_change", "top1pct_share", "top10pct_share"):
        assert diff.headline[key] == pytest.approx(expected.headline[key], rel=1e-4)
    assert len(diff.modules) == diff.adapter["modules"] and diff.modules["share"].sum() == pytest.approx(1.0)
    assert set(diff.modules["rank"]) == {2} and diff.modules["module"].str.contains(".1.").all()


def test_capwrap_diagnose_base_and_adapter_folder(tmp_path, make_adapter, capsys, monkeypatch):
    import capwrap.diagnosis.checkpoints
    from capwrap.analyzers import WeightDiff
    from capwrap.cli import main
    from capwrap.models import ModelSpec, build_model, save_model
    from capwrap.tasks import PCFGConfig, PCFGTask

    config = "length=8,window=4,occurrence=2"
    task = PCFGTask(config=PCFGConfig(length=8, window=4, occurrence=2))
    spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=16, n_heads=2)
    save_model(build_model(spec, seed=0), tmp_path / "base")
    adapter = make_adapter(tmp_path / "base", target_modules=["c_attn", "c_fc"])
    assert main(["info", str(adapter)]) == 0
    assert f"merged adapter: LoRA r=4 on c_attn, c_fc (4 modules) from {adapter}" in capsys.readouterr().out

    # The whole pipeline with one cheap analyzer (tutorial 06 runs the full quick diagnosis on an adapter).
    monkeypatch.setattr(capwrap.diagnosis.checkpoints, "default_analyzers", lambda quick, memory, compiled: [WeightDiff((0.1,))])
    out = tmp_path / "diag"
    code = main(["diagnose", str(tmp_path / "base"), str(adapter), "--capability", f"pcfg=count,operand=a,{config}",
                 "--downstream", f"pcfg=count,operand=b,{config}", "--out", str(out), "--quick", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tuned"] == str(adapter) and summary["adapter"]["adapter"]["rank"] == 4
    assert summary["provenance"]["models"]["tuned"]["adapter"] == str(adapter)  # the base with it merged in
    assert "adapter" not in summary["provenance"]["models"]["base"]
    assert summary["adapter"]["weight_diff"]["total_change"] > 0
    assert {m["module"].rsplit(".", 1)[-1] for m in summary["adapter"]["largest_modules"]} <= {"c_attn", "c_fc"}
    weight_diff = next(e for e in summary["evidence"] if e["analyzer"] == "weight_diff")
    assert weight_diff["headline"]["total_change"] == pytest.approx(
        summary["adapter"]["weight_diff"]["total_change"], rel=1e-4
    )

    # a base of pickle files (--allow-pickle): the streamed adapter diff cannot read it, and the
    # diagnosis still ends with its summary (it used to fail after every analyzer had run)
    from safetensors.torch import load_file

    pickled = tmp_path / "base-bin"
    shutil.copytree(tmp_path / "base", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    code = main(["diagnose", str(pickled), str(adapter), "--capability", f"pcfg=count,operand=a,{config}",
                 "--downstream", f"pcfg=count,operand=b,{config}", "--out", str(tmp_path / "diag-bin"), "--quick",
                 "--quiet", "--allow-pickle"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "diag-bin" / "summary.json").read_text())
    assert "pickle files only" in summary["adapter"]["weight_diff_skipped"] and "weight_diff" not in summary["adapter"]
    from_pickles = next(e for e in summary["evidence"] if e["analyzer"] == "weight_diff")
    assert from_pickles["headline"]["total_change"] == pytest.approx(weight_diff["headline"]["total_change"], rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_adapter_merges_into_a_model_accelerate_put_on_disk(arch, gpt2_folder, llama_folder, make_adapter, peft_merged,
                                                               tmp_path):  # fmt: skip
    """Every weight of the base on disk (only the embedding fits max_memory): the merged model
    computes as peft's merge; with GPT-2's fused q/k/v the bridge computes with split copies."""
    from capwrap.models.model import tl_version

    if arch == "gpt2" and tl_version() < (4, 0):
        pytest.skip("TransformerLens 3.9 cannot wrap an offloaded fused q/k/v projection")
    folder = {"gpt2": gpt2_folder, "llama": llama_folder}[arch]
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj", "embed_tokens"]}[arch]
    adapter = make_adapter(folder, target_modules=targets)
    model = load_model(folder, adapter=adapter, device_map="auto", max_memory={"cpu": "1KB"},
                       offload_folder=tmp_path / "offload")  # fmt: skip
    assert set(model.metadata["device_map"].values()) == {"disk"}
    assert model.metadata["adapter"]["modules"] == len(read_adapter(adapter).modules)
    reference = peft_merged(folder, adapter)
    tokens = torch.randint(0, model.spec.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=1e-4, atol=1e-4)
    whole = load_model(folder, adapter=adapter)
    for name, weight in whole.weights().items():
        torch.testing.assert_close(model.weights()[name], weight, rtol=0, atol=1e-6, msg=name)


def test_an_adapter_merged_into_another_base_than_it_names_is_said(gpt2_folder, make_adapter, tmp_path):
    from capwrap.errors import CapwrapWarning

    adapter = make_adapter(gpt2_folder, target_modules=["c_attn"])
    other = tmp_path / "other"
    shutil.copytree(gpt2_folder, other)  # the same shape: the adapter fits it, and only its config can tell
    with pytest.warns(CapwrapWarning, match=r"was trained on .*gpt2' \(its adapter_config.json says so\) but is merged"):
        load_model(other, adapter=adapter)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CapwrapWarning)
        load_model(gpt2_folder, adapter=adapter)  # the base it names: nothing to say

    relative = tmp_path / "relative"
    shutil.copytree(adapter, relative)
    config = json.loads((relative / "adapter_config.json").read_text())
    (relative / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "models/base"}))
    with pytest.raises(CheckpointError, match=r"the base 'models/base' that .*adapter_config.json names "
                                              r"\(base_model_name_or_path\) cannot be loaded: .*load_model\(BASE, adapter="):  # fmt: skip
        load_model(relative)


def test_capwrap_diagnose_refuses_an_adapter_as_base_and_warns_of_another_base_in_one_line(
    tmp_path, make_adapter, capsys, monkeypatch
):
    import capwrap.diagnosis.checkpoints
    from capwrap.analyzers import WeightDiff
    from capwrap.cli import main
    from capwrap.models import ModelSpec, build_model, save_model
    from capwrap.tasks import PCFGConfig, PCFGTask

    config = "length=8,window=4,occurrence=2"
    task = PCFGTask(config=PCFGConfig(length=8, window=4, occurrence=2))
    spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    save_model(build_model(spec, seed=0), tmp_path / "base")
    save_model(build_model(spec, seed=1), tmp_path / "other")
    adapter = make_adapter(tmp_path / "base", target_modules=["c_attn"])
    specs = ["--capability", f"pcfg=count,operand=a,{config}", "--downstream", f"pcfg=count,operand=b,{config}"]

    assert main(["diagnose", str(adapter), str(tmp_path / "base"), *specs, "--quiet"]) == 2  # swapped
    err = capsys.readouterr().err
    assert f"BASE {adapter} is a PEFT adapter" in err and f"capwrap diagnose {tmp_path / 'base'} {adapter}" in err
    assert "Traceback" not in err

    monkeypatch.setattr(capwrap.diagnosis.checkpoints, "default_analyzers", lambda quick, memory, compiled: [WeightDiff((0.1,))])
    assert main(["diagnose", str(tmp_path / "other"), str(adapter), *specs, "--quick", "--quiet"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"capwrap: warning: the adapter {adapter} was trained on ")


def test_an_adapter_that_changed_its_base_is_refused_until_converted(llama_folder, make_adapter, peft_merged, tmp_path):
    # PiSSA (and OLoRA, CorDA, LoRA-GA, LoftQ) train their factors on the base minus the initial
    # factors: merged into the base named they gave logits 1.95 away from peft's (3.00 for OLoRA)
    import peft
    import transformers

    adapter = make_adapter(llama_folder, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    with pytest.raises(CheckpointError, match=r"init_lora_weights='pissa', which changes the base weights too.*"
                                              r"path_initial_model_for_weight_conversion"):
        load_model(llama_folder, adapter=adapter)
    # converted as peft documents, it is a plain LoRA adapter of twice the rank, on the base named
    initial = tmp_path / "initial"
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama_folder),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights="pissa"))  # fmt: skip
    model.peft_config["default"].init_lora_weights = True  # peft's own recipe: save the initial factors first
    model.save_pretrained(initial)
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    converted = tmp_path / "converted"
    model.save_pretrained(converted, path_initial_model_for_weight_conversion=initial)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.eval()(tokens).logits
    torch.testing.assert_close(load_model(llama_folder, adapter=converted)(tokens), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options, refusal", [
    (dict(lora_bias=True), "a bias on lora_B"),
    (dict(alora_invocation_tokens=[5, 6]), "aLoRA"),
])  # fmt: skip
def test_lora_variants_capwrap_cannot_read_as_factors_are_refused_saved_or_live(llama_folder, make_adapter, options,
                                                                                  refusal):  # fmt: skip
    # they loaded (aLoRA: 3.67 logits off; peft itself does not merge it) or were followed live as plain LoRA
    import peft
    import transformers

    adapter = make_adapter(llama_folder, target_modules=["q_proj", "v_proj"], **options)
    with pytest.raises(CheckpointError, match=refusal):
        load_model(llama_folder, adapter=adapter)
    live = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama_folder), adapter)
    with pytest.raises(ConfigError, match=rf"capwrap follows LoRA adapters \(scaling·B·A, DoRA\) and IA3.*{refusal}"):
        wrap_hf_model(live)
    # the same layers injected without a PeftModel around them (peft's inject_adapter_in_model)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], **options)
    injected = peft.inject_adapter_in_model(config, transformers.AutoModelForCausalLM.from_pretrained(llama_folder))
    with pytest.raises(ConfigError, match=r"capwrap follows LoRA adapters \(scaling·B·A, DoRA\) and IA3"):
        wrap_hf_model(injected)


def test_a_saved_merged_model_does_not_name_its_adapter_as_one_to_apply(llama_folder, make_adapter, tmp_path):
    from capwrap.models import save_model
    from capwrap.provenance import model_provenance

    adapter = make_adapter(llama_folder, target_modules=["q_proj"])
    merged = load_model(llama_folder, adapter=adapter)
    assert model_provenance(merged)["adapter"] == str(adapter)
    save_model(merged, tmp_path / "merged")
    again = load_model(tmp_path / "merged")
    assert "adapter" not in model_provenance(again) and again.metadata["merged_adapter"]["path"] == str(adapter)


def test_an_unchanged_copy_peft_saves_beside_embedding_factors_is_not_counted_as_a_change(llama_folder, make_adapter):
    # LoRA on an untied embedding: peft saves the embedding's own (base) weights with the factors; they
    # were listed as a replaced tensor, counted as the adapter's parameters and given a module row
    from capwrap.analyzers import adapter_weight_diff

    adapter = make_adapter(llama_folder, target_modules=["embed_tokens", "q_proj"])
    lora = read_adapter(adapter)
    assert "model.embed_tokens.weight" in lora.replaced  # what peft saved
    diff = adapter_weight_diff(llama_folder, adapter)
    factors = sum(m.a.numel() + m.b.numel() for m in lora.modules.values())
    assert diff.adapter["unchanged_copies"] == ["model.embed_tokens.weight"]
    assert diff.adapter["replaced_tensors"] == [] and diff.adapter["parameters"] == factors
    assert "replaced" not in set(diff.modules["kind"]) and diff.modules["share"].sum() == pytest.approx(1.0)
    assert lora.describe()["parameters"] == factors + 64 * 32  # without the base to compare with, the copy counts
