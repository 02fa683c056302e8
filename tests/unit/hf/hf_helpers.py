"""Helpers of the Hugging Face tests: a real word-level tokenizer for the tiny fixtures (64 tokens),
saved by transformers, and what a training run would have changed in a peft model."""

from __future__ import annotations

from pathlib import Path

import torch

#: The words of :func:`save_word_tokenizer`'s tokenizer (then ``w0``, ``w1``, ... up to 64 tokens).
WORDS = ["<eos>", "<unk>", *"the a dog cat ran sat home down big small red and saw to park in".split()]


def save_word_tokenizer(folder: Path) -> None:
    """A real word-level tokenizer of the fixtures' 64 tokens (EOS as BOS), saved by transformers."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(64 - len(WORDS))])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )
    tokenizer.save_pretrained(folder)


def perturb_trained(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Move every tensor of ``model`` that trains (a peft model's factors, trained rows and copies) by
    ``scale`` N(0, 1), as a training run would have: peft initializes most of them to leave the
    model as it was."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model
