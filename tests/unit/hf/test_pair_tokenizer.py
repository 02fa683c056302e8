"""Which tokenizer a diagnosis of two checkpoint folders reads text with, when one folder has none."""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hf_helpers import WORDS, save_word_tokenizer

from capwrap.diagnosis import diagnose_checkpoints
from capwrap.errors import CapwrapWarning


@pytest.fixture(scope="module")
def text_pair(gpt2_folder, tmp_path_factory) -> Path:
    """``base`` (the GPT-2 fixture with a tokenizer), ``tuned`` (its weights moved a little, saved by
    transformers without a tokenizer) and ``texts.txt`` in their words."""
    import transformers

    root = tmp_path_factory.mktemp("text-pair")
    shutil.copytree(gpt2_folder, root / "base")
    save_word_tokenizer(root / "base")
    tuned = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    tuned.save_pretrained(root / "tuned")
    rng = random.Random(0)
    stories = (" ".join(rng.choice(WORDS[2:]) for _ in range(12)) for _ in range(60))
    (root / "texts.txt").write_text("\n\n".join(stories))
    return root


def _diagnose(root: Path, tuned: Path, out: Path) -> tuple[dict, list[str]]:
    """A quick text diagnosis of ``base`` and ``tuned``: its provenance, and the warnings about tokenizers."""
    texts = root / "texts.txt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagnose_checkpoints(root / "base", tuned, f"text={texts},feature=word:dog,seq_len=16",
                             f"text={texts},seq_len=16", out=out, quick=True, progress=False)  # fmt: skip
    said = [str(w.message) for w in caught if issubclass(w.category, CapwrapWarning) and "tokenizer" in str(w.message)]
    return json.loads((out / "summary.json").read_text())["provenance"], said


def test_a_tuned_folder_without_a_tokenizer_is_read_with_the_bases_and_says_so(text_pair, tmp_path):
    """The tuned model's texts were read with the base's tokenizer without a word: a fine-tune that
    added or replaced tokens would be diagnosed on the wrong token ids."""
    base, tuned = text_pair / "base", text_pair / "tuned"
    provenance, said = _diagnose(text_pair, tuned, tmp_path / "out")
    assert len(said) == 1 and re.fullmatch(
        rf"the tuned checkpoint {re.escape(str(tuned))} has no tokenizer \(no readable tokenizer files\): the tuned "
        rf"model's texts are read with the base model's tokenizer, from {re.escape(str(base))}\. If the fine-tune "
        rf"changed the tokenizer .* copy the tokenizer it was trained with .* into {re.escape(str(tuned))}; .*",
        said[0],
    )
    assert provenance["tokenizer"] == {"base": str(base), "tuned": str(base)}
    report = (tmp_path / "out" / "report.html").read_text()
    assert f"<td>tokenizer</td><td>base {base}, tuned {base}</td>" in report  # the report's provenance too

    own = tmp_path / "tuned-with-tokenizer"  # the same tuned model, with tokenizer files of its own
    shutil.copytree(tuned, own)
    save_word_tokenizer(own)
    provenance, said = _diagnose(text_pair, own, tmp_path / "out-own")
    assert said == [] and provenance["tokenizer"] == {"base": str(base), "tuned": str(own)}
