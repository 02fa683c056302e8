"""A fine-tune that added tokens (a chat fine-tune's ``<|im_start|>``, a pad token, an embedding padded
to a round size), compared with its base on the base's tokens: checkpoints and tokenizers written by
``transformers`` itself."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hf_helpers import WORDS, perturb_trained, save_word_tokenizer

from capwrap.analyzers import ModelPair, weight_change_table
from capwrap.analyzers.streaming import stream_weight_change
from capwrap.diagnosis import diagnose_checkpoints
from capwrap.errors import CapwrapWarning, CheckpointError, ConfigError
from capwrap.models import load_model, save_model
from capwrap.models.io import source_spec
from capwrap.models.vocabulary import shared_vocabulary

CHAT = ["<|im_start|>", "<|im_end|>"]
IDS = torch.tensor([[0, 2, 4, 5, 9, 3, 17, 40, 63, 1]])  # base token ids, the largest of them (63) too


def _fine_tune_with_tokens(base: Path, folder: Path, added: list[str], rows: int, seed: int = 1, **config) -> Path:
    """``base`` fine-tuned as a chat fine-tune is: its tokenizer given ``added`` tokens, its embedding
    and unembedding resized to ``rows`` (``resize_token_embeddings``), every weight moved a little,
    ``config`` entries set; saved by transformers with its tokenizer."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    model.resize_token_embeddings(rows, mean_resizing=False)
    perturb_trained(model, seed, scale=0.02)
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _with_tokenizer(folder: Path, root: Path) -> Path:
    shutil.copytree(folder, root)
    save_word_tokenizer(root)
    return root


def _logits(folder: Path) -> torch.Tensor:
    import transformers

    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(IDS).logits


@pytest.fixture(scope="module")
def chat_pair(gpt2_folder, tmp_path_factory) -> Path:
    """``base`` (the tied GPT-2 fixture with a tokenizer), ``tuned`` (a chat fine-tune of it with two
    added tokens) and ``texts.txt`` in the base's words."""
    root = tmp_path_factory.mktemp("chat-pair")
    _with_tokenizer(gpt2_folder, root / "base")
    _fine_tune_with_tokens(root / "base", root / "tuned", CHAT, 66)
    rng = random.Random(0)
    (root / "texts.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS[2:]) for _ in range(12)) for _ in range(60)))
    return root


@pytest.mark.backend
def test_a_model_loaded_on_fewer_tokens_computes_the_whole_ones_logits_for_them(chat_pair, tmp_path):
    """The cut is right: the first 64 tokens' logits of the fine-tune as transformers runs it, on the
    installed TransformerLens line's backend."""
    tuned = chat_pair / "tuned"
    model = load_model(tuned, d_vocab=64)
    assert model.spec.d_vocab == 64 and model.metadata["vocabulary"] == {
        "kept": 64, "rows": 66, "added": {"64": "<|im_start|>", "65": "<|im_end|>"}
    }  # fmt: skip
    with torch.no_grad():
        logits = model(IDS)
    whole = _logits(tuned)
    assert logits.shape[-1] == 64 and whole.shape[-1] == 66
    torch.testing.assert_close(logits, whole[..., :64], atol=1e-5, rtol=1e-5)
    saved = load_model(save_model(model, tmp_path / "saved"))  # its rows are the kept ones: nothing left out on loading
    assert saved.spec.d_vocab == 64 and "vocabulary" not in saved.metadata
    assert saved.metadata["loaded_on_vocabulary"]["rows"] == 66


def test_a_chat_fine_tune_is_diagnosed_on_its_bases_tokens_and_says_which_it_left_out(chat_pair, tmp_path):
    """``capwrap diagnose BASE TUNED`` refused a fine-tune that added tokens (it told the user to cut
    the embedding back by hand); the pair is now compared on the base's tokens, and says so."""
    base, tuned, texts = chat_pair / "base", chat_pair / "tuned", chat_pair / "texts.txt"
    with pytest.raises(ConfigError, match=r"resized the vocabulary \(64 -> 66 tokens.*load_model\(PATH, d_vocab=64\)"):
        ModelPair(load_model(base), load_model(tuned))  # the Python API names the way
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagnosis = diagnose_checkpoints(base, tuned, f"text={texts},feature=word:dog,seq_len=16",
                                         f"text={texts},seq_len=16", out=out, quick=True, progress=False)  # fmt: skip
    said = [str(w.message) for w in caught if issubclass(w.category, CapwrapWarning) and "token rows" in str(w.message)]
    assert len(said) == 1 and re.fullmatch(
        rf"the tuned checkpoint {re.escape(str(tuned))} has 66 token rows, its base 64: the fine-tune added tokens, so "
        r"the pair is compared on the base's tokens — the first 64 of its 66 token rows \(added tokens left out: "
        r"'<\|im_start\|>', '<\|im_end\|>'\)\. .*",
        said[0],
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["models"]["tuned"]["vocabulary"]["added"] == {"64": "<|im_start|>", "65": "<|im_end|>"}
    assert "vocabulary" not in summary["provenance"]["models"]["base"]
    assert "<td>tuned vocabulary</td><td>compared on the first 64 of its 66 token rows" in (out / "report.html").read_text()
    weight_diff = next(e for e in diagnosis.evidence if e.analyzer == "weight_diff")
    assert weight_diff.headline["total_change"] > 0  # the fine-tune's changes are measured


def test_a_padded_embedding_is_cut_to_the_rows_the_tokenizer_uses_and_streams_alike(llama_folder, tmp_path):
    """An untied Llama whose embedding and unembedding were padded to 80 rows (no token added): loaded
    on the base's 64, and the weight diff streamed from the files equals the one of the loaded pair."""
    base = _with_tokenizer(llama_folder, tmp_path / "base")
    tuned = _fine_tune_with_tokens(base, tmp_path / "tuned", [], 80)
    assert shared_vocabulary(source_spec(base), source_spec(tuned)) == 64
    model = load_model(tuned, d_vocab=64)
    assert model.metadata["vocabulary"] == {"kept": 64, "rows": 80, "added": {}}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), _logits(tuned)[..., :64], atol=1e-5, rtol=1e-5)
    in_memory = weight_change_table(load_model(base), model)
    streamed = stream_weight_change(base, tuned)
    merged = in_memory.merge(streamed, on="component", suffixes=("", "_streamed"))
    assert len(merged) == len(in_memory) == len(streamed)
    torch.testing.assert_close(torch.tensor(merged["change"].values), torch.tensor(merged["change_streamed"].values),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    unembed = merged[merged["kind"] == "unembed"]
    assert len(unembed) and (unembed["change"] > 0).all()  # the kept rows' change is in it


def test_an_added_pad_token_in_a_kept_config_is_left_out_with_its_rows(llama_folder, tmp_path):
    """A config capwrap keeps whole (a rope scaling it does not model) with ``pad_token_id`` and
    ``eos_token_id`` at added tokens: the cut config forgets them (an embedding's padding index must be
    one of its rows), and token ids do not make two configs differ (they frame text; the review of
    2026-12-08 found a chat fine-tune's new end token refused as 'configs differ')."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(llama_folder)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder, config=config)
    model.save_pretrained(tmp_path / "scaled")
    base = _with_tokenizer(tmp_path / "scaled", tmp_path / "base")
    tuned = _fine_tune_with_tokens(base, tmp_path / "tuned", ["<pad>", "<|im_end|>"], 66, pad_token_id=64,
                                   eos_token_id=65)  # fmt: skip
    base_spec, tuned_spec = source_spec(base), source_spec(tuned)
    assert base_spec.hf_config and json.loads(tuned_spec.hf_config)["pad_token_id"] == 64
    assert shared_vocabulary(base_spec, tuned_spec) == 64
    model = load_model(tuned, d_vocab=64)
    assert model.metadata["vocabulary"]["added"] == {"64": "<pad>", "65": "<|im_end|>"}
    assert model.spec != base_spec and not base_spec.differing(model.spec)  # eos 0 vs none: the same computation
    ModelPair(load_model(base), model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), _logits(tuned)[..., :64], atol=1e-5, rtol=1e-5)
    other = dataclasses.replace(base_spec, hf_config=base_spec.hf_config.replace('"factor": 2.0', '"factor": 4.0'))
    assert "configs differ in rope_parameters" in base_spec.differences(other)  # what differs is named


def test_a_model_placed_by_accelerate_is_cut_alike(chat_pair, llama_folder, tmp_path):
    """``device_map`` loads through transformers and accelerate: the same cut, hooks kept; an output
    layer (and embedding) offloaded to disk is read once, cut, and loaded cut by its hook (refused
    until the review of 2026-12-08: accelerate offloads the output layer first)."""
    tuned = chat_pair / "tuned"
    placed = load_model(tuned, d_vocab=64, device_map="cpu")
    assert placed.spec.d_vocab == 64 and placed.metadata["vocabulary"]["rows"] == 66
    with torch.no_grad():
        torch.testing.assert_close(placed(IDS), _logits(tuned)[..., :64], atol=1e-5, rtol=1e-5)
    grown = _fine_tune_with_tokens(_with_tokenizer(llama_folder, tmp_path / "base"), tmp_path / "tuned", CHAT, 66)
    offloaded = load_model(grown, d_vocab=64, device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=tmp_path / "off")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(offloaded.offloaded)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(IDS), _logits(grown)[..., :64], atol=1e-5, rtol=1e-5)
    plain = load_model(grown, d_vocab=64).weights()
    for name, weight in offloaded.weights().items():  # what the analyzers read
        torch.testing.assert_close(weight, plain[name])


def test_a_fine_tune_whose_tokenizer_renumbered_the_bases_tokens_is_still_refused(chat_pair, tmp_path):
    """Added rows are left out only when the kept ids mean what they mean to the base: a tokenizer that
    also moved a base token to another id is another tokenizer."""
    import transformers

    tuned = tmp_path / "tuned"
    shutil.copytree(chat_pair / "tuned", tuned)
    data = json.loads((tuned / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["dog"], vocab["cat"] = vocab["cat"], vocab["dog"]
    (tuned / "tokenizer.json").write_text(json.dumps(data))
    assert transformers.AutoTokenizer.from_pretrained(tuned).get_vocab()["dog"] == 5
    texts = chat_pair / "texts.txt"
    with pytest.raises(ConfigError, match=r"the base and tuned models use different tokenizers \(64 vs 64 tokens, 4 "):
        diagnose_checkpoints(chat_pair / "base", tuned, f"text={texts},seq_len=16", f"text={texts},seq_len=16",
                             quick=True, progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"the tuned model has fewer token rows than the base \(66 -> 64\)"):
        diagnose_checkpoints(tuned, chat_pair / "base", f"text={texts},seq_len=16", f"text={texts},seq_len=16",
                             quick=True, progress=False)  # fmt: skip


def _grown_adapter(base: Path, folder: Path, **options) -> Path:
    """A LoRA adapter trained on ``base`` grown by the two chat tokens (``resize_token_embeddings``),
    random factors and trained copies, saved by peft (which saves the grown embedding layers with it)
    with the grown tokenizer."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT})
    model.resize_token_embeddings(66, mean_resizing=False)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **options}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **options))
    perturb_trained(peft_model, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _peft_grown_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``base`` grown to 66 tokens with ``adapter`` merged by peft itself (the reference)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(66, mean_resizing=False)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()(ids).logits


@pytest.mark.parametrize(
    "options",
    [{}, {"modules_to_save": ["embed_tokens", "lm_head"]}, {"target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"]},
     {"trainable_token_indices": [64, 65]}],
    ids=["embedding-layers-saved", "modules-to-save", "lora-on-the-embeddings", "trainable-added-tokens"],
)
def test_an_adapter_trained_on_a_grown_base_merges_as_peft_and_cuts_to_the_bases_tokens(llama_folder, tmp_path, options):
    """An adapter trained after resize_token_embeddings was refused as 'made for another model'. It
    now loads as peft merges it (the base grown by the rows peft saved with it), and on the base's tokens."""
    base = _with_tokenizer(llama_folder, tmp_path / "base")
    adapter = _grown_adapter(base, tmp_path / "adapter", **options)
    ids = torch.cat([IDS, torch.tensor([[64, 65]])], dim=1)
    reference = _peft_grown_logits(base, adapter, ids)
    grown = load_model(base, adapter=adapter)
    assert grown.spec.d_vocab == 66 and len(grown.tokenizer) == 66  # the adapter folder's tokenizer
    with pytest.raises(ConfigError, match=r"load_model\(BASE, adapter=ADAPTER, d_vocab=64\)"):
        ModelPair(load_model(base), grown)
    cut = load_model(base, adapter=adapter, d_vocab=64)
    assert cut.metadata["vocabulary"] == {"kept": 64, "rows": 66, "added": {"64": "<|im_start|>", "65": "<|im_end|>"}}
    with torch.no_grad():
        torch.testing.assert_close(grown(ids), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cut(IDS), reference[:, : IDS.shape[1], :64], atol=1e-5, rtol=1e-5)


def test_a_grown_adapter_is_diagnosed_on_the_bases_tokens_with_its_own_weight_diff(llama_folder, tmp_path):
    """``capwrap diagnose BASE ADAPTER`` of a chat LoRA trained with added tokens: the diagnosis and the
    adapter's streamed weight diff both measure the change to the base's tokens, and say what they left out."""
    base = _with_tokenizer(llama_folder, tmp_path / "base")
    adapter = _grown_adapter(base, tmp_path / "adapter", modules_to_save=["embed_tokens", "lm_head"])
    rng = random.Random(0)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(" ".join(rng.choice(WORDS[2:]) for _ in range(12)) for _ in range(60)))
    out = tmp_path / "out"
    with pytest.warns(CapwrapWarning, match=r"the tuned checkpoint .*adapter has 66 token rows, its base 64"):
        diagnose_checkpoints(base, adapter, f"text={texts},feature=word:dog,seq_len=16", f"text={texts},seq_len=16",
                             out=out, quick=True, progress=False)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["tokenizer"] == {"base": str(base), "tuned": str(adapter)}  # the grown tokenizer's folder
    described = summary["adapter"]["adapter"]
    added = {"64": "<|im_start|>", "65": "<|im_end|>"}
    assert described["vocabulary"]["added"] == added and summary["provenance"]["models"]["tuned"]["vocabulary"]["added"] == added
    assert described["replaced_tensors"] == ["lm_head.weight", "model.embed_tokens.weight"]  # trained copies, cut
    # the adapter's own diff and the diagnosis's agree on the change (the merged model's weights on the base's tokens)
    diagnosed = next(e for e in summary["evidence"] if e["analyzer"] == "weight_diff")["headline"]
    for key in ("total_change", "top1pct_share", "top10pct_share"):
        assert summary["adapter"]["weight_diff"][key] == pytest.approx(diagnosed[key], rel=1e-4)


def test_a_grown_adapter_without_the_added_rows_loads_only_on_the_bases_tokens(llama_folder, tmp_path):
    """LoRA on the output layer saved without the grown embedding layers (save_embedding_layers=False):
    the added tokens' rows are nowhere, so the grown model is refused with the way that works."""
    import peft
    import transformers

    base = _with_tokenizer(llama_folder, tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(66, mean_resizing=False)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["lm_head"],
                                                            init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    with pytest.raises(CheckpointError, match=r"trained on its base grown to 66 tokens, but holds no whole model.embed_tokens.weight"
                                              r".*load_model\(BASE, adapter=ADAPTER, d_vocab=64\)"):  # fmt: skip
        load_model(base, adapter=tmp_path / "adapter")
    cut = load_model(base, adapter=tmp_path / "adapter", d_vocab=64)
    with torch.no_grad():
        torch.testing.assert_close(cut(IDS), _peft_grown_logits(base, tmp_path / "adapter", IDS)[..., :64],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_dora_on_a_grown_embedding_merges_whole_but_is_not_cut(llama_folder, tmp_path):
    """DoRA rescales an embedding by norms taken over every token: the grown model merges as peft's, and
    its change to the base's tokens alone is refused with the way that works (merge with peft, diagnose that)."""
    base = _with_tokenizer(llama_folder, tmp_path / "base")
    adapter = _grown_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens", "lm_head"], use_dora=True)
    ids = torch.cat([IDS, torch.tensor([[64, 65]])], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(load_model(base, adapter=adapter)(ids), _peft_grown_logits(base, adapter, ids),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"model.embed_tokens is adapted with DoRA, whose norms run over all of its "
                                              r"tokens.*merge the adapter with peft"):  # fmt: skip
        load_model(base, adapter=adapter, d_vocab=64)


def test_a_tied_checkpoint_that_stores_its_output_layer_too_is_cut_whole(chat_pair, tmp_path):
    """Some converters write a tied matrix under both names: both are cut (the whole load took it,
    the cut one refused the second name's 66 rows until the review of 2026-12-08)."""
    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(chat_pair / "tuned", tuned)
    state = load_file(tuned / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, tuned / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(load_model(tuned, d_vocab=64)(IDS), _logits(chat_pair / "tuned")[..., :64],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.fixture(scope="module")
def padded_base(llama_folder, tmp_path_factory) -> Path:
    """A base whose embedding and output layer have 70 rows for its tokenizer's 64 tokens (as Pythia's,
    Qwen2.5's, Phi-3's are padded to a round size), with texts in its words."""
    import transformers

    root = tmp_path_factory.mktemp("padded")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    model.resize_token_embeddings(70, mean_resizing=False)
    model.save_pretrained(root / "base")
    save_word_tokenizer(root / "base")
    rng = random.Random(0)
    (root / "texts.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS[2:]) for _ in range(12)) for _ in range(60)))
    return root


def _diagnosed(root: Path, tuned: Path, out: Path) -> list[str]:
    texts = root / "texts.txt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagnose_checkpoints(root / "base", tuned, f"text={texts},feature=word:dog,seq_len=16", f"text={texts},seq_len=16",
                             out=out, quick=True, progress=False)  # fmt: skip
    return [str(w.message) for w in caught if issubclass(w.category, CapwrapWarning) and "token rows" in str(w.message)]


def test_a_padded_base_pairs_with_tokens_added_in_its_spare_rows_or_its_rows_cut_back(padded_base, tmp_path):
    """Tokens added into a padded base's spare rows (no resize) pair as they are (the tokenizers agree
    on every id both name); a fine-tune that cut the padding back (``resize_token_embeddings(len(tokenizer))``)
    is compared on its rows, the base's unused ones left out with a warning. Both were refused with
    hints that did not fit (review of 2026-12-08)."""
    base = padded_base / "base"
    spare = _fine_tune_with_tokens(base, tmp_path / "spare", CHAT, 70)
    assert _diagnosed(padded_base, spare, tmp_path / "out-spare") == []  # nothing cut
    shrunk = _fine_tune_with_tokens(base, tmp_path / "shrunk", CHAT, 66)
    said = _diagnosed(padded_base, shrunk, tmp_path / "out-shrunk")
    assert len(said) == 1 and said[0].startswith(
        f"the base checkpoint {base} has 70 token rows, the tuned one 66, and no token of the base's tokenizer is beyond "
        "them (a padded embedding the fine-tune cut back): the pair is compared on the first 66 — the first 66 of its 70 "
        "token rows (4 rows no token uses)"
    )
    summary = json.loads((tmp_path / "out-shrunk" / "summary.json").read_text())
    assert summary["provenance"]["models"]["base"]["vocabulary"] == {"kept": 66, "rows": 70, "added": {}}
    with torch.no_grad():
        torch.testing.assert_close(load_model(base, d_vocab=66)(IDS), _logits(base)[..., :66], atol=1e-5, rtol=1e-5)


def test_a_base_without_a_tokenizer_is_refused_before_texts_are_read_with_the_tuned_ones(chat_pair, gpt2_folder, tmp_path):
    """The tuned tokenizer would read the texts with its added pad token's id, which no base row holds
    (it failed later, advising a larger d_vocab)."""
    texts = chat_pair / "texts.txt"
    with pytest.raises(ConfigError, match=r"the base checkpoint .* has no tokenizer, and the tuned one added tokens the "
                                          r"base lacks.*Copy the base's tokenizer files"):  # fmt: skip
        diagnose_checkpoints(gpt2_folder, chat_pair / "tuned", f"text={texts},seq_len=16", f"text={texts},seq_len=16",
                             quick=True, progress=False)  # fmt: skip
