"""DoRA and IA3 adapters saved by peft: merged on load as peft merges them, diffed per module, diagnosed.

peft initializes both as the identity (DoRA's magnitudes are the norms of the base's rows, IA3's
vectors are ones), so each test perturbs what they train before saving. Until 2026-12-07 capwrap
refused both and asked for peft's merge_and_unload.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capwrap.errors import CheckpointError
from capwrap.models import load_model, save_model, wrap_hf_model
from capwrap.models.adapters import IA3Module, read_adapter

TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
GPT2_IA3 = dict(target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
LLAMA_IA3 = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                 feedforward_modules=["down_proj"])  # fmt: skip


def _perturbed(base: Path, config, seed: int = 0) -> torch.nn.Module:
    """A peft model of ``config`` on a fresh copy of ``base``, what it trains perturbed (magnitudes
    and IA3 vectors by ±20 % each, factors and other tensors by 0.2 N(0, 1))."""
    import peft
    import transformers

    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen) * 0.2
            param.mul_(1 + noise) if "magnitude" in name or "ia3_l" in name else param.add_(noise)
    return model


def _adapter(base: Path, folder: Path, config, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """:func:`_perturbed`, saved by peft; and the logits of the peft model itself, unmerged, on ``TOKENS``."""
    model = _perturbed(base, config, seed)
    model.save_pretrained(folder)
    with torch.no_grad():
        return folder, model.eval()(TOKENS % model.config.vocab_size).logits


def _merged_by_peft(base: Path, adapter: Path) -> torch.nn.Module:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def _gaps(model, reference: torch.nn.Module, unmerged: torch.Tensor) -> tuple[float, float, float]:
    """The largest differences of ``model`` from peft's merge: weights, logits; and from the unmerged peft model."""
    expected = reference.state_dict()
    weights = max(float((t - expected[n]).abs().max()) for n, t in model.checkpoint_state().items())
    with torch.no_grad():
        logits = model(TOKENS)
        return weights, float((logits - reference(TOKENS).logits).abs().max()), float((logits - unmerged).abs().max())


def _lora(**options):
    import peft

    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "use_dora": True, **options})


def _ia3(**options):
    import peft

    return peft.IA3Config(**options)


@pytest.mark.parametrize("arch, config", [
    ("gpt2", lambda: _lora(target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only")),  # Conv1D, fan_in_fan_out
    ("llama", lambda: _lora(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                            "embed_tokens"], rank_pattern={"down_proj": 2}, use_rslora=True,
                            modules_to_save=["lm_head"])),  # Linear, grouped-query attention, embedding DoRA
    ("gpt2", lambda: _ia3(**GPT2_IA3)),  # Conv1D: outputs (and biases) of c_attn, c_fc; inputs of the MLP's c_proj
    ("llama", lambda: _ia3(**LLAMA_IA3)),
], ids=["gpt2-dora", "llama-dora", "gpt2-ia3", "llama-ia3"])  # fmt: skip
def test_dora_and_ia3_adapters_merge_like_peft(arch, config, gpt2_folder, llama_folder, tmp_path):
    base = {"gpt2": gpt2_folder, "llama": llama_folder}[arch]
    adapter, unmerged = _adapter(base, tmp_path / "adapter", config())
    model = load_model(base, adapter=adapter)
    weights, logits, forward = _gaps(model, _merged_by_peft(base, adapter), unmerged)
    assert weights < 1e-6 and logits < 1e-5 and forward < 1e-5, (weights, logits, forward)
    original = load_model(base)
    with torch.no_grad():
        assert float((original(TOKENS) - unmerged).abs().max()) > 1e-2  # the adapter does change the model

    info = model.metadata["adapter"]
    assert info["delta"] == "dense"
    if info["peft_type"] == "LORA":
        assert info["dora"] and info["rank"] == ([2, 4] if arch == "llama" else 4)
    else:
        assert info["peft_type"] == "IA3" and info["rank"] is None and "dora" not in info
        assert info["feedforward_modules"] == (["c_proj"] if arch == "gpt2" else ["down_proj"])
        assert info["parameters"] == sum(m.vector.numel() for m in read_adapter(adapter).modules.values())


@pytest.mark.parametrize("arch, config", [
    ("gpt2", lambda: _lora(target_modules=["c_attn", "c_fc", "wte"], bias="lora_only")),  # embedding DoRA unties wte
    ("llama", lambda: _lora(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=True)),
    ("gpt2", lambda: _ia3(**GPT2_IA3)),
    ("llama", lambda: _ia3(**LLAMA_IA3)),
], ids=["gpt2-dora", "llama-dora", "gpt2-ia3", "llama-ia3"])  # fmt: skip
def test_live_dora_and_ia3_models_are_followed_merged(arch, config, gpt2_folder, llama_folder):
    """A model being trained with DoRA or IA3 (refused until 2026-12-07) is seen as peft would
    merge it now: weights equal to merge_and_unload's bit for bit, logits those of the peft model
    itself, unmerged, after its adapter moves, and with its adapter disabled."""
    import copy
    import warnings

    base = {"gpt2": gpt2_folder, "llama": llama_folder}[arch]
    live = _perturbed(base, config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (GPT-2's embedding DoRA unties wte: warned of, tested in test_live)
        model = wrap_hf_model(live)
    reference = copy.deepcopy(live).merge_and_unload().state_dict()
    for name, tensor in model.checkpoint_state().items():
        assert torch.equal(tensor, reference[name]), name

    with torch.no_grad():
        before = model(TOKENS).clone()
        for name, param in live.named_parameters():
            if param.requires_grad:  # an optimizer step on the adapter
                param.mul_(1.1) if "magnitude" in name or "ia3_l" in name else param.add_(0.05)
        torch.testing.assert_close(model(TOKENS), live(TOKENS).logits, rtol=1e-5, atol=1e-5)
        assert float((model(TOKENS) - before).abs().max()) > 1e-2  # it followed the step
        with live.disable_adapter():
            torch.testing.assert_close(model(TOKENS), live(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_a_live_model_with_two_active_adapters_and_modules_to_save_is_followed_as_it_computes(llama_folder):
    """Two DoRA adapters active at once: each takes its norms on the weight before any adapter, as
    peft's forward pass does (capwrap took them on the weight holding the first: logits 0.04-0.17
    off); and the copy of a module trained whole (modules_to_save) that the live model computes with,
    and of the modules inside it (the MLPs), is followed when the adapters are disabled or another is
    set (capwrap kept the copy active when wrapped: logits up to 7.5 off)."""
    import copy

    import peft

    live = _perturbed(llama_folder, _lora(target_modules=["q_proj", "v_proj"]))
    live.add_adapter("second", _lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "model.norm", "mlp"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in live.named_parameters():
            if ".second" in name:  # perturbed as _perturbed does
                noise = torch.randn(param.shape, generator=gen) * 0.2
                param.mul_(1 + noise) if "magnitude" in name else param.add_(noise)
    live.eval()
    model = wrap_hf_model(live)
    with torch.no_grad():
        live.base_model.set_adapter(["default", "second"])  # (modules_to_save: the second adapter's copy)
        torch.testing.assert_close(model(TOKENS), live(TOKENS).logits, rtol=1e-5, atol=1e-5)
        reference = copy.deepcopy(live).merge_and_unload().state_dict()  # peft 0.22 merges them so too
        for name, tensor in model.checkpoint_state().items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-5, msg=name)
        for switch in (lambda: live.set_adapter("second"), lambda: live.set_adapter("default")):
            switch()
            torch.testing.assert_close(model(TOKENS), live(TOKENS).logits, rtol=1e-5, atol=1e-5)
        with live.disable_adapter():
            torch.testing.assert_close(model(TOKENS), live(TOKENS).logits, rtol=1e-5, atol=1e-5)
            assert model.weights()["unembed.W_U"].data_ptr() == live.base_model.model.lm_head.original_module.weight.data_ptr()
        torch.testing.assert_close(model(TOKENS), live(TOKENS).logits, rtol=1e-5, atol=1e-5)
    assert isinstance(live, peft.PeftModel)


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_dora_and_ia3_merge_into_a_model_accelerate_put_on_disk(kind, llama_folder, tmp_path):
    """Their change is formed from the base's weights, read back from wherever accelerate put them."""
    config = _lora(target_modules=["q_proj", "up_proj", "embed_tokens"]) if kind == "dora" else _ia3(**LLAMA_IA3)
    adapter, unmerged = _adapter(llama_folder, tmp_path / "adapter", config)
    model = load_model(llama_folder, adapter=adapter, device_map="auto", max_memory={"cpu": "1KB"},
                       offload_folder=tmp_path / "offload")  # fmt: skip
    assert set(model.metadata["device_map"].values()) == {"disk"}
    with torch.no_grad():
        assert float((model(TOKENS) - unmerged).abs().max()) < 1e-5


def test_ia3_feedforward_modules_scale_inputs_and_others_outputs(gpt2_folder, tmp_path):
    adapter, _ = _adapter(gpt2_folder, tmp_path / "adapter", _ia3(**GPT2_IA3))
    modules = read_adapter(adapter).modules
    ff, attn = modules["transformer.h.0.mlp.c_proj"], modules["transformer.h.0.attn.c_proj"]
    assert isinstance(ff, IA3Module) and ff.feedforward and tuple(ff.vector.shape) == (1, 128)  # c_proj: 128 -> 32
    assert isinstance(attn, IA3Module) and not attn.feedforward and tuple(attn.vector.shape) == (32, 1)
    base = load_model(gpt2_folder).checkpoint_state()
    merged = load_model(gpt2_folder, adapter=adapter).checkpoint_state()
    weight = "transformer.h.0.mlp.c_proj.weight"  # Conv1D [in, out]: inputs are its rows
    torch.testing.assert_close(merged[weight], base[weight] * ff.vector.T, rtol=0, atol=1e-7)
    assert torch.equal(merged["transformer.h.0.mlp.c_proj.bias"], base["transformer.h.0.mlp.c_proj.bias"])
    weight = "transformer.h.0.attn.c_proj.weight"  # outputs: its columns, and the bias
    torch.testing.assert_close(merged[weight], base[weight] * attn.vector.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged["transformer.h.0.attn.c_proj.bias"],
                               base["transformer.h.0.attn.c_proj.bias"] * attn.vector[:, 0], rtol=0, atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("arch, config", [
    ("llama", lambda: _lora(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1])),
    ("gpt2", lambda: _ia3(target_modules=r".*\.1\.(attn\.c_attn|mlp\.c_proj)",
                          feedforward_modules=r".*\.1\.mlp\.c_proj")),  # regexes, matched as peft does
], ids=["llama-dora", "gpt2-ia3"])  # fmt: skip
def test_the_weight_diff_of_dora_and_ia3_adapters_is_merged_minus_base_per_module(
    arch, config, gpt2_folder, llama_folder, tmp_path
):
    import transformers

    from capwrap.analyzers.adapter_diff import adapter_weight_diff
    from capwrap.analyzers.streaming import stream_weight_diff

    base = {"gpt2": gpt2_folder, "llama": llama_folder}[arch]
    adapter, _ = _adapter(base, tmp_path / "adapter", config())
    diff = adapter_weight_diff(base, adapter)

    before = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = _merged_by_peft(base, adapter).state_dict()
    method = "dora" if arch == "llama" else "ia3"
    assert len(diff.modules) == diff.adapter["modules"] and set(diff.modules["method"]) == {method}
    for row in diff.modules.itertuples():
        names = [f"{row.module}.weight"] + ([f"{row.module}.bias"] if f"{row.module}.bias" in before else [])
        want = sum(float((after[n].double() - before[n].double()).square().sum()) for n in names) ** 0.5
        assert row.change == pytest.approx(want, rel=1e-5), row.module  # the bias an output scaling changes included
        assert ".1." in row.module
    assert diff.modules["share"].sum() == pytest.approx(1.0) and diff.adapter["delta"] == "dense"

    save_model(load_model(base, adapter=adapter), tmp_path / "merged")
    expected = stream_weight_diff(base, tmp_path / "merged")
    got, want = diff.table.set_index("component"), expected.table.set_index("component")
    assert set(got.index) == set(want.index) and (got.loc[got["layer"] == 0, "change"] == 0).all()
    torch.testing.assert_close(torch.tensor(got.loc[want.index, "change"].to_numpy()),
                               torch.tensor(want["change"].to_numpy()), rtol=1e-4, atol=1e-6)  # fmt: skip
    ranks, want_ranks = diff.ranks.set_index("weight"), expected.ranks.set_index("weight")
    torch.testing.assert_close(torch.tensor(ranks.loc[want_ranks.index, "effective_rank"].to_numpy()),
                               torch.tensor(want_ranks["effective_rank"].to_numpy()), rtol=1e-3, atol=1e-3)  # fmt: skip
    assert (ranks["effective_rank"] > 4).any()  # not low-rank: formed densely, without a rank bound
    assert diff.headline["total_change"] == pytest.approx(expected.headline["total_change"], rel=1e-4)


def test_capwrap_diagnose_base_and_dora_adapter_folder(tmp_path, capsys, monkeypatch):
    import capwrap.diagnosis.checkpoints
    from capwrap.analyzers import WeightDiff
    from capwrap.cli import main
    from capwrap.models import ModelSpec, build_model
    from capwrap.tasks import PCFGConfig, PCFGTask

    config = "length=8,window=4,occurrence=2"
    task = PCFGTask(config=PCFGConfig(length=8, window=4, occurrence=2))
    spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    save_model(build_model(spec, seed=0), tmp_path / "base")
    adapter, _ = _adapter(tmp_path / "base", tmp_path / "adapter", _lora(target_modules=["c_attn", "c_fc"]))
    ia3, _ = _adapter(
        tmp_path / "base", tmp_path / "ia3", _ia3(target_modules=["c_attn", "c_fc"], feedforward_modules=[])
    )
    assert main(["info", str(adapter)]) == 0 and main(["info", str(ia3)]) == 0  # named as what they are, not LoRA
    printed = capsys.readouterr().out
    assert f"merged adapter: DoRA r=4 on c_attn, c_fc (2 modules) from {adapter}" in printed
    assert f"merged adapter: IA3 on c_attn, c_fc (2 modules) from {ia3}" in printed

    monkeypatch.setattr(
        capwrap.diagnosis.checkpoints, "default_analyzers", lambda quick, memory, compiled: [WeightDiff((0.1,))]
    )
    out = tmp_path / "diag"
    code = main(["diagnose", str(tmp_path / "base"), str(adapter), "--capability", f"pcfg=count,operand=a,{config}",
                 "--downstream", f"pcfg=count,operand=b,{config}", "--out", str(out), "--quick", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"]["adapter"]["dora"] and summary["adapter"]["adapter"]["delta"] == "dense"
    assert {m["method"] for m in summary["adapter"]["largest_modules"]} == {"dora"}
    weight_diff = next(e for e in summary["evidence"] if e["analyzer"] == "weight_diff")
    assert weight_diff["headline"]["total_change"] == pytest.approx(
        summary["adapter"]["weight_diff"]["total_change"], rel=1e-4
    )


def test_dora_and_ia3_folders_that_disagree_with_their_config_are_refused(gpt2_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    dora, _ = _adapter(gpt2_folder, tmp_path / "dora", _lora(target_modules=["c_attn"]))
    tensors = load_file(str(dora / "adapter_model.safetensors"))
    one = "base_model.model.transformer.h.1.attn.c_attn.lora_magnitude_vector"
    save_file({k: v for k, v in tensors.items() if k != one}, str(dora / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"DoRA adapter \(use_dora=True\) without the magnitude vector of "
                                              r"transformer.h.1.attn.c_attn .*which its other modules have; the "
                                              r"adapter is corrupt"):  # fmt: skip
        read_adapter(dora)
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(dora / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"without the magnitude vector of any module .*likely cause is peft's "
                                              r"conversion"):  # fmt: skip
        read_adapter(dora)

    ia3, _ = _adapter(gpt2_folder, tmp_path / "ia3", _ia3(**GPT2_IA3))
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "feedforward_modules": ["c_fc"]}))
    with pytest.raises(CheckpointError, match=r"the IA3 vector of transformer.h.0.mlp.c_fc has shape \[128, 1\], "
                                              r"not \[1, in\] .*corrupt"):  # fmt: skip
        read_adapter(ia3)


def test_a_dora_adapter_peft_converted_to_lora_is_refused_for_its_lost_magnitudes(llama_folder, tmp_path):
    """peft's conversion of a PiSSA (or OLoRA ...) adapter to plain LoRA saves the converted factors
    only, and keeps use_dora=True: the trained magnitudes are gone (peft loads the folder with the
    base's row norms in their place). Called "corrupt" until 2026-12-07."""
    import peft
    import transformers
    from safetensors.torch import load_file

    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama_folder),
                                _lora(target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))  # fmt: skip
    model.peft_config["default"].init_lora_weights = True  # peft's recipe: the initial adapter saved as plain LoRA
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training": the factors and the magnitudes move
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.mul_(1.2) if "magnitude" in name else param.add_(0.1)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["init_lora_weights"] is True and config["r"] == 8
    assert not any("magnitude" in k for k in load_file(str(tmp_path / "converted" / "adapter_model.safetensors")))
    with pytest.raises(CheckpointError, match=r"DoRA adapter \(use_dora=True\) without the magnitude vector of any "
                                              r"module .*cannot be rebuilt.*path_initial_model_for_weight_conversion"
                                              r".*drops the trained magnitudes"):  # fmt: skip
        load_model(llama_folder, adapter=tmp_path / "converted")


def test_dora_and_ia3_on_a_tied_embedding_are_refused_naming_what_they_merge(gpt2_folder, tmp_path):
    dora, _ = _adapter(gpt2_folder, tmp_path / "dora", _lora(target_modules=["c_attn", "wte"]))
    with pytest.raises(CheckpointError, match=r"changes transformer.wte.weight, which this base ties .*a merge of its "
                                              r"DoRA factors and magnitudes into the one tied tensor"):  # fmt: skip
        load_model(gpt2_folder, adapter=dora)
    ia3, _ = _adapter(gpt2_folder, tmp_path / "ia3", _ia3(target_modules=["c_attn", "lm_head"], feedforward_modules=[]))
    with pytest.raises(CheckpointError, match=r"changes lm_head.weight, which this base ties .*a merge of its IA3 "
                                              r"scaling vector into the one tied tensor"):  # fmt: skip
        load_model(gpt2_folder, adapter=ia3)


def test_a_zero_dora_norm_is_said_per_output_row_or_embedding_dimension():
    from capwrap.models.adapters import LoraModule

    weight = torch.ones(6, 4)  # nn.Linear [out, in]: output 2 all zero
    weight[2] = 0.0
    module = LoraModule(
        "model.layers.0.mlp.up_proj", "linear", torch.zeros(2, 4), torch.zeros(6, 2), 1.0, torch.ones(6)
    )
    with pytest.raises(CheckpointError, match=r"the weights of output 2 of model.layers.0.mlp.up_proj \(row 2 of W "
                                              r"\+ scaling·B·A\) are all zero"):  # fmt: skip
        module.merged(base={module.weight_name: weight})
    embedding = torch.ones(10, 4)  # [vocabulary, d_model]: dimension 3 zero for every token
    embedding[:, 3] = 0.0
    module = LoraModule("model.embed_tokens", "embedding", torch.zeros(2, 10), torch.zeros(4, 2), 1.0, torch.ones(4))
    with pytest.raises(CheckpointError, match=r"embedding dimension 3 of model.embed_tokens.weight \(column 3 of the "
                                              r"embedding plus its DoRA change\) is zero over the whole vocabulary"):  # fmt: skip
        module.merged(base={module.weight_name: embedding})


@pytest.fixture(scope="module")
def wide_bases(tmp_path_factory) -> dict[str, Path]:
    """A GPT-2 and a Llama wide enough (d_model 256, 2 layers: about 1.6 and 2.4 million adapted
    weights) that a merge rounded differently from peft's shows in a few elements."""
    import transformers

    root = tmp_path_factory.mktemp("wide")
    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=256, n_layer=2, n_head=4,
                                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False),
        "llama": transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                          bos_token_id=0, eos_token_id=0, tie_word_embeddings=False),
    }  # fmt: skip
    out = {}
    for arch, config in configs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


_EXACT = {
    ("gpt2", "dora"): lambda: _lora(target_modules=["c_attn", "c_proj", "c_fc", "wpe"]),  # Conv1D, an embedding
    ("llama", "dora"): lambda: _lora(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
    ),  # fmt: skip
    ("gpt2", "ia3"): lambda: _ia3(**GPT2_IA3),
    ("llama", "ia3"): lambda: _ia3(
        target_modules=[*LLAMA_IA3["target_modules"], "gate_proj"], feedforward_modules=["down_proj"]
    ),  # fmt: skip
    # plain LoRA: peft rounds an embedding's change to the weight's dtype before adding it
    ("gpt2", "lora"): lambda: _lora(use_dora=False, target_modules=["c_attn", "c_fc", "wpe"]),
    ("llama", "lora"): lambda: _lora(use_dora=False, target_modules=["q_proj", "down_proj", "embed_tokens"]),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch, method", list(_EXACT), ids=[f"{a}-{m}" for a, m in _EXACT])
def test_half_precision_merges_equal_peft_bit_for_bit(arch, method, dtype, wide_bases, tmp_path):
    """capwrap forms each merged tensor as peft does (the same operations, order and precision) and
    writes it in: equal to merge_and_unload's in every bit. Until 2026-12-07 a DoRA or IA3 change
    was formed apart and added (and an embedding's LoRA change added unrounded), which left a few
    elements one unit in the last place off peft's (DoRA bf16: 12 of 294,912 in a d_model 128 Llama)."""
    import peft
    import transformers

    base = wide_bases[arch]
    config = _EXACT[arch, method]()
    adapter, _ = _adapter(base, tmp_path / "adapter", config)
    merged = load_model(base, adapter=adapter, dtype=dtype).checkpoint_state()
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype),
                                               adapter).merge_and_unload().state_dict()  # fmt: skip
    assert {t.dtype for t in merged.values()} == {dtype}
    differing = {
        name: int((t != reference[name]).sum()) for name, t in merged.items() if not torch.equal(t, reference[name])
    }
    assert not differing, differing
