"""Tiny Hugging Face checkpoints written by ``transformers`` and LoRA adapters saved by ``peft``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hf_helpers import perturb_trained

pytest.importorskip("peft", reason="the hf extra (peft, trl) is not installed")


def _save_base(folder: Path, config) -> Path:
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 (tied embeddings, Conv1D layers) saved by transformers."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return _save_base(tmp_path_factory.mktemp("hf") / "gpt2", config)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> Path:
    """A random 2-layer Llama with grouped-query attention saved by transformers."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return _save_base(tmp_path_factory.mktemp("hf") / "llama", config)


AdapterFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory) -> AdapterFactory:
    """``make_adapter(base_folder, seed=0, **LoraConfig options)``: a LoRA adapter on the base,
    with random factors (so that it changes the model), saved by peft's ``save_pretrained``."""
    import peft
    import transformers

    def make(base: Path, seed: int = 0, **options) -> Path:
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        options.setdefault("r", 4)
        options.setdefault("lora_alpha", 8)
        peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **options))
        perturb_trained(peft_model, seed)  # the factors, trained biases and modules to save
        folder = tmp_path_factory.mktemp("adapter") / "adapter"
        peft_model.save_pretrained(folder)
        return folder

    return make


def _peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@pytest.fixture(scope="session")
def peft_merged() -> Callable[[Path, Path], torch.nn.Module]:
    """``peft_merged(base, adapter)``: the base with the adapter merged by peft itself (the reference)."""
    return _peft_merged
