"""peft's trainable tokens (a LoRA adapter's ``trainable_token_indices``, a ``TRAINABLE_TOKENS``
adapter): the trained rows put into the embedding as peft's merge puts them, a tied output layer
following. Until 2026-12-08 capwrap refused both and asked for peft's merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_helpers import perturb_trained

from capwrap.analyzers.adapter_diff import adapter_weight_diff
from capwrap.errors import CheckpointError, ConfigError
from capwrap.models import load_model, wrap_hf_model
from capwrap.models.adapters import TokenRowsModule, read_adapter

TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
TOKENS[0, :4] = torch.tensor([3, 7, 11, 5])  # the trained tokens are read


def _config(kind: str, embedding: str, **options):
    import peft

    if kind == "lora":
        target = "c_attn" if embedding == "wte" else "q_proj"
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target], **options)
    return peft.TrainableTokensConfig(target_modules=[embedding], **options)


def _trained(base: Path, config, folder: Path) -> tuple[Path, torch.Tensor]:
    """A peft model of ``config`` on ``base``, what it trains moved by 0.2 N(0, 1), saved by peft; and
    its own (unmerged) logits on ``TOKENS``."""
    import peft
    import transformers

    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), config)
    perturb_trained(model, seed=1).save_pretrained(folder)
    with torch.no_grad():
        return folder, model.eval()(TOKENS).logits


CASES = {
    "lora-list-untied": ("llama", "lora", {"trainable_token_indices": [3, 7, 11]}),
    "lora-per-module": ("llama", "lora", {"trainable_token_indices": {"embed_tokens": [3, 7], "lm_head": [5]}}),
    "lora-list-tied": ("gpt2", "lora", {"trainable_token_indices": [3, 7, 11]}),
    "tokens-untied": ("llama", "tokens", {"token_indices": [3, 7]}),
    "tokens-tied": ("gpt2", "tokens", {"token_indices": [3, 7]}),  # peft saves the tied output layer's copy too
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_tokens_merge_like_peft_and_diff_per_row(case, gpt2_folder, llama_folder, tmp_path):
    import peft
    import transformers

    arch, kind, options = CASES[case]
    base = {"gpt2": gpt2_folder, "llama": llama_folder}[arch]
    adapter, unmerged = _trained(base, _config(kind, "wte" if arch == "gpt2" else "embed_tokens", **options), tmp_path / "ad")
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    reference = reference.merge_and_unload().eval()
    model = load_model(base, adapter=adapter)
    expected = reference.state_dict()
    assert max(float((t - expected[n]).abs().max()) for n, t in model.checkpoint_state().items()) < 1e-6
    with torch.no_grad():
        logits = model(TOKENS)
    torch.testing.assert_close(logits, reference(TOKENS).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, unmerged, atol=1e-5, rtol=1e-5)  # what peft's own forward computes

    rows = [m for m in read_adapter(adapter).modules.values() if isinstance(m, TokenRowsModule)]
    trained = {m.name: list(m.indices) for m in rows}
    assert model.metadata["adapter"]["trainable_tokens"] == trained
    assert len(rows) == (2 if case == "lora-per-module" else 1)  # a tied output layer's copy is kept once
    diff = adapter_weight_diff(base, adapter)
    original = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    for module in rows:  # each module's change: its trained rows minus the base's
        weight = original[module.weight_name]
        want = float((module.values - weight[list(module.indices)]).norm())
        got = diff.modules.set_index("module").loc[module.name]
        assert got["method"] == "trainable_tokens" and got["change"] == pytest.approx(want, rel=1e-5)


def test_trainable_tokens_of_ids_the_base_lacks_load_only_on_the_bases_tokens(llama_folder, tmp_path):
    """Rows trained for tokens added to the base (ids 64, 65) without the grown embedding saved: the
    trained model cannot be built; on the base's tokens it is the base with the LoRA change."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    model.resize_token_embeddings(66, mean_resizing=False)
    peft_model = peft.get_peft_model(model, _config("lora", "embed_tokens", trainable_token_indices=[64, 65]))
    peft_model.save_pretrained(tmp_path / "ad", save_embedding_layers=False)
    with pytest.raises(CheckpointError, match=r"trained on its base grown to 66 tokens, but holds no whole "
                                              r"model.embed_tokens.weight.*d_vocab=64\)"):  # fmt: skip
        load_model(llama_folder, adapter=tmp_path / "ad")
    cut = load_model(llama_folder, adapter=tmp_path / "ad", d_vocab=64)
    assert "trainable_tokens" not in cut.metadata["adapter"] and cut.metadata["vocabulary"]["rows"] == 66


def test_folders_whose_rows_disagree_with_their_config_are_refused(llama_folder, tmp_path):
    import json

    adapter, _ = _trained(llama_folder, _config("lora", "embed_tokens", trainable_token_indices=[3, 7]), tmp_path / "ad")
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["trainable_token_indices"] = [3, 7, 9]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"the trained rows of model.embed_tokens have shape \[2, 32\] for the 3 "
                                              r"token ids .* the adapter is corrupt"):  # fmt: skip
        read_adapter(adapter)


def test_a_live_model_with_trainable_tokens_is_still_refused(llama_folder):
    """The live wrapper (Trainer callback) does not follow trainable tokens: it says so."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    peft_model = peft.get_peft_model(model, _config("lora", "embed_tokens", trainable_token_indices=[3, 7]))
    with pytest.raises(ConfigError, match="trainable token indices"):
        wrap_hf_model(peft_model)


def test_capwrap_info_and_diagnose_of_a_trainable_tokens_adapter(llama_folder, tmp_path, capsys):
    import json
    import random
    import shutil

    from hf_helpers import WORDS, save_word_tokenizer

    from capwrap.cli import main

    base = tmp_path / "base"
    shutil.copytree(llama_folder, base)
    save_word_tokenizer(base)
    adapter, _ = _trained(base, _config("lora", "embed_tokens", trainable_token_indices=[3, 7, 11]), tmp_path / "ad")
    assert main(["info", str(adapter)]) == 0
    printed = capsys.readouterr().out
    assert "merged adapter: LoRA r=4 on embed_tokens, q_proj (3 modules)" in printed
    assert "trained token rows: model.embed_tokens, ids 3, 7, 11" in printed
    rng = random.Random(0)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(" ".join(rng.choice(WORDS[2:]) for _ in range(12)) for _ in range(60)))
    out = tmp_path / "out"
    assert main(["diagnose", str(base), str(adapter), "--capability", f"text={texts},feature=word:dog,seq_len=16",
                 "--downstream", f"text={texts},seq_len=16", "--quick", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"]["adapter"]["trainable_tokens"] == {"model.embed_tokens": [3, 7, 11]}
    methods = {row["method"] for row in summary["adapter"]["largest_modules"]}
    assert methods == {"lora", "trainable_tokens"}


@pytest.mark.parametrize("indices", [[64, 65], {"wte": [64, 65]}], ids=["list", "per-module"])
def test_trainable_added_tokens_of_a_tied_base_merge_like_peft(indices, gpt2_folder, tmp_path):
    """The usual way to train new chat tokens on a small tied model (GPT-2, Gemma, Qwen2.5-0.5B): the
    base grown, the new rows trained. peft saves the grown embedding and its tied output layer's copies
    (rows and trained rows); both were refused (review of 2026-12-08)."""
    import peft
    import transformers

    def grown():
        model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
        model.resize_token_embeddings(66, mean_resizing=False)
        return model

    config = _config("lora", "wte", trainable_token_indices=indices)
    perturb_trained(peft.get_peft_model(grown(), config), seed=1).save_pretrained(tmp_path / "ad")
    reference = peft.PeftModel.from_pretrained(grown(), tmp_path / "ad").merge_and_unload().eval()
    ids = torch.cat([TOKENS, torch.tensor([[64, 65] * 6])])
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(load_model(gpt2_folder, adapter=tmp_path / "ad")(ids), expected, atol=1e-5, rtol=1e-5)
        cut = load_model(gpt2_folder, adapter=tmp_path / "ad", d_vocab=64)
        torch.testing.assert_close(cut(TOKENS), expected[:2, :, :64], atol=1e-5, rtol=1e-5)


def test_trained_rows_of_a_tied_output_layer_alone_are_refused_as_untied(gpt2_folder, tmp_path):
    """peft trains the output layer's rows apart from the embedding (the model it trained is untied)
    and merges them into the one tied tensor: said as for every adapter that unties a tied base."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    config = peft.TrainableTokensConfig(target_modules=["lm_head"], token_indices=[3, 7])
    perturb_trained(peft.get_peft_model(model, config), seed=1).save_pretrained(tmp_path / "ad")
    with pytest.raises(CheckpointError, match=r"changes lm_head.weight, which this base ties to its input embedding.*"
                                              r"a merge of its trained token rows into the one tied tensor"):  # fmt: skip
        load_model(gpt2_folder, adapter=tmp_path / "ad")
