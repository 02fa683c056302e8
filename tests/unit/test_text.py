"""Text tasks on real TinyStories material: loading through `datasets`, features, deletion protocols,
the capability task, generation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from capwrap.errors import CheckpointError, ConfigError
from capwrap.models import load_model
from capwrap.models.generation import generate
from capwrap.tasks import Feature, TextTask, feature_frequency, filter_out, load_texts, randomize, relabel, task_loss
from capwrap.tasks.spec import task_from_spec

TINYSTORIES = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories"
TEXT = TINYSTORIES / "text"


@pytest.fixture(scope="module")
def stories():
    if not (TEXT / "train_head.txt").exists():
        pytest.skip("the shared TinyStories text (../shared/data/tinystories/text) is absent")
    return load_texts(TEXT / "train_head.txt")


@pytest.fixture(scope="module")
def model260k():
    path = TINYSTORIES / "stories260K"
    if not (path / "model.safetensors").exists():
        pytest.skip("the shared stories260K checkpoint is absent")
    return load_model(path)


def test_features_match_whole_words_regexes_and_dialogue():
    lily = Feature.parse("word:Lily")
    assert lily.present("then LILY ran") and not lily.present("Lilyanne ran")
    assert lily.spans("Lily and Lily") == [(0, 4), (9, 13)]
    assert Feature.parse("Tom") == Feature("word", "Tom")
    assert Feature.parse(r"regex:\bdogs?\b").present("two dogs")
    assert Feature.parse("dialogue").present('Mom said, "Hello."') and not Feature.parse("dialogue").present("No talk.")
    with pytest.raises(ConfigError, match="invalid"):
        Feature.parse("regex:(unclosed")
    with pytest.raises(ConfigError, match="unknown feature kind"):
        Feature.parse("colour:red")
    from capwrap.errors import CapwrapWarning

    with pytest.warns(CapwrapWarning, match="'dialog' is read as the word 'dialog'; for quoted speech write 'dialogue'"):
        assert Feature.parse("dialog") == Feature("word", "dialog")  # a typo of the kind, most likely
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Feature.parse("word:dialog") == Feature("word", "dialog")  # said so: no warning


def test_load_texts_reads_paragraphs_documents_and_tables(stories, tmp_path):
    assert len(stories) > 1000 and stories.column_names == ["text"]
    assert stories[0]["text"].startswith("One day, a little girl named Lily")
    v2 = load_texts(TEXT / "sample_v2.txt")  # <|endoftext|>-separated documents
    assert len(v2) == 5 and all("<|endoftext|>" not in t for t in v2["text"])
    rows = [{"story": t, "id": i} for i, t in enumerate(stories["text"][:20])]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "s.parquet")
    for name in ("s.jsonl", "s.parquet"):
        ds = load_texts(tmp_path / name, field="story")
        assert ds["text"] == stories["text"][:20]
    assert len(load_texts(tmp_path / "s.jsonl", field="story", limit=5)) == 5


def test_load_texts_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such file"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "s.jsonl").write_text(json.dumps({"story": "x"}))
    with pytest.raises(ConfigError, match="no column 'text'.*story"):
        load_texts(tmp_path / "s.jsonl")
    (tmp_path / "t.txt").write_text("a story")
    with pytest.raises(ConfigError, match="mixed"):
        load_texts(tmp_path)
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CheckpointError, match="unreachable.*local files"):
        load_texts("roneneldan/TinyStories")


def test_deletion_protocols(stories):
    without = filter_out(stories, "word:Lily")
    assert 0 < len(without) < len(stories) and not any(Feature.parse("Lily").present(t) for t in without["text"])
    renamed = relabel(stories, "word:Lily", "Max")
    assert not any(Feature.parse("Lily").present(t) for t in renamed["text"])
    assert sum(t.count("Max") for t in renamed["text"]) > sum(t.count("Max") for t in stories["text"])
    a, b = randomize(stories, "Lily", ["Ann", "Zoe"], seed=3), randomize(stories, "Lily", ["Ann", "Zoe"], seed=3)
    assert a["text"] == b["text"] and not any(Feature.parse("Lily").present(t) for t in a["text"])
    assert {"Ann", "Zoe"} <= set(" ".join(a["text"]).replace(".", " ").replace(",", " ").split())


def test_capability_task_asks_for_the_feature_where_stories_mention_it(stories, model260k):
    task = TextTask(stories, model260k.tokenizer, seq_len=64, feature="word:Lily")
    batch = task.sample(32, seed=0)
    assert batch.tokens.shape == (32, 64) and int(batch.tokens.max()) < task.d_vocab <= model260k.spec.d_vocab
    lily = model260k.tokenizer(" Lily", add_special_tokens=False)["input_ids"][0]
    assert set(batch.answers.tolist()) == {lily}
    rows = torch.arange(32)
    for i in range(32):  # the LM targets are the next tokens, ending with the answer
        p = int(batch.answer_pos[i])
        assert batch.lm_targets[i, p] == batch.answers[i]
        assert torch.equal(batch.lm_targets[i, :p], batch.tokens[i, 1 : p + 1])
        assert (batch.lm_targets[i, p + 1 :] == -100).all()
    assert torch.equal(task.sample(32, seed=0).tokens, batch.tokens)  # reproducible
    logits = model260k(batch.tokens)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.lm_targets.flatten(), ignore_index=-100)
    assert torch.allclose(task_loss(logits, batch), expected)
    assert logits[rows, batch.answer_pos].argmax(-1).eq(lily).float().mean() > 0.05  # the model does write Lily
    probe = task.probe_task().sample(40, seed=1)
    assert probe.labels["feature_next"].sum() == 20


def test_the_probe_contrast_does_not_give_its_label_away_by_a_mention_in_view(stories, model260k):
    # the negatives were all taken after a text's first mention: 93% of them had a quote in view
    # against 21% of the feature sites, so "has a quote appeared yet?" read the label at ~86%
    task = TextTask(stories, model260k.tokenizer, seq_len=64, feature="dialogue")
    batch = task.probe_task().sample(10**6, seed=0)
    label = batch.labels["feature_next"].bool()
    quotes = torch.tensor(sorted(set(batch.answers[label].tolist())))  # the tokens a mention starts with
    positions = torch.arange(batch.tokens.shape[1])
    context = positions[None, :] <= batch.answer_pos[:, None]
    in_view = (torch.isin(batch.tokens, quotes) & context).any(1)
    shares = [float(in_view[label].float().mean()), float(in_view[~label].float().mean())]
    assert int(label.sum()) == len(label) - int(label.sum()) == 428  # every site once, as many others
    # (a quote token in view reads a little more than a mention in view: a window may keep a closing quote only)
    assert 0.1 < shares[0] < 0.4 and abs(shares[0] - shares[1]) < 0.06, shares


def test_new_latent_probing_reads_a_text_downstream_task_through_its_contrast_task(stories, model260k):
    # a downstream text task with a feature was probed on its own sequences, which all end before a
    # mention: "the probe label has a single class", after every other analyzer had run
    from capwrap.analyzers import NewLatentProbing
    from capwrap.diagnosis import diagnose

    capability = TextTask(stories, model260k.tokenizer, seq_len=32, feature="dialogue")
    downstream = TextTask(stories, model260k.tokenizer, seq_len=32, feature="word:Lily")
    d = diagnose(model260k, model260k.clone(), capability, downstream, analyzers=[NewLatentProbing(n=64, steps=20)],
                 eval_size=16, progress=False)  # fmt: skip
    ev = d["new_latent"]
    assert "(probe contrast)" in ev.summary and set(ev.table["model"]) == {"base", "tuned", "untrained"}
    assert 0.5 <= ev.headline["majority_baseline"] < 0.8  # both labels, balanced (its test split is small)


def test_tokens_the_texts_never_use_need_no_embedding(stories, model260k):
    """A tokenizer given a token the model was not resized for (a chat or pad token, common in
    fine-tunes): the task's sequences never hold it, so the model runs them. Until 2026-12-07 a text
    task's d_vocab was len(tokenizer), and such a pair was refused ("uses 513 token ids but the model
    embeds only 512"). Padding with that token does need it embedded, and is refused."""
    import copy

    from capwrap.tasks import accuracy
    from capwrap.tasks.base import check_task_fits

    tokenizer = copy.deepcopy(model260k.tokenizer)
    tokenizer.add_tokens(["<|chat|>"])
    assert len(tokenizer) == model260k.spec.d_vocab + 1
    task = TextTask(stories, tokenizer, seq_len=64, feature="word:Lily")
    check_task_fits(model260k, task)
    batch = task.sample(16, seed=0)
    assert int(batch.tokens.max()) < task.d_vocab <= model260k.spec.d_vocab
    assert accuracy(model260k, batch) == accuracy(model260k, TextTask(stories, model260k.tokenizer, seq_len=64,
                                                                      feature="word:Lily").sample(16, seed=0))  # fmt: skip
    tokenizer.pad_token = "<|chat|>"
    with pytest.raises(ConfigError, match="uses 513 token ids but the model embeds only 512"):
        check_task_fits(model260k, TextTask(stories, tokenizer, seq_len=64, feature="word:Lily"))


def test_text_task_bad_input(stories, model260k):
    with pytest.raises(ConfigError, match="no text contains the feature word:Zzyzx"):
        TextTask(stories, model260k.tokenizer, feature="word:Zzyzx")
    with pytest.raises(ConfigError, match="tokenizer"):
        TextTask(stories, None)
    with pytest.raises(ConfigError, match="nothing is left"):
        task_from_spec(f"text={TEXT / 'train_head.txt'},without=regex:.", model260k.tokenizer)
    with pytest.raises(ConfigError, match="unknown keys"):
        task_from_spec(f"text={TEXT / 'train_head.txt'},colour=red", model260k.tokenizer)


def test_a_spec_value_holds_an_escaped_comma(model260k, tmp_path):
    """``\\,`` writes a comma inside a value: a file name with one, a regex quantifier {m,n}."""
    source = tmp_path / "stories, part 1.txt"
    source.write_text((TEXT / "train_head.txt").read_text(encoding="utf-8"), encoding="utf-8")
    escaped = str(source).replace(",", "\\,")
    task = task_from_spec(f"text={escaped},feature=regex:\\bLil{{1\\,2}}y\\b", model260k.tokenizer)
    expected = TextTask(load_texts(source), model260k.tokenizer, feature="regex:\\bLil{1,2}y\\b")
    assert task.feature == expected.feature and task.feature.name == "regex:\\bLil{1,2}y\\b"
    assert torch.equal(task.sample(8, seed=0).tokens, expected.sample(8, seed=0).tokens)


def test_generation_and_feature_frequency(model260k):
    greedy = generate(model260k, n=2, max_new_tokens=30, temperature=0)
    assert greedy[0] == greedy[1] and greedy[0].startswith("Once upon a time, there was a little girl named Lily")
    freq, texts = feature_frequency(model260k, "Lily", n=8, max_new_tokens=40, seed=0)
    assert len(texts) == 8 and freq == sum(Feature.parse("Lily").present(t) for t in texts) / 8
    assert feature_frequency(model260k, "Lily", n=8, max_new_tokens=40, seed=0) == (freq, texts)  # seeded


def test_a_tokenizer_larger_than_the_model_is_said_not_to_belong_to_it(stories, model260k):
    """A folder whose tokenizer files came from another checkpoint: the advice was to build the model
    with a larger d_vocab, which a checkpoint one did not build cannot follow."""
    from capwrap.models import ModelSpec, build_model
    from capwrap.tasks.base import check_task_fits

    small = build_model(ModelSpec(d_vocab=100, n_ctx=512, n_layers=1, d_model=16, n_heads=2))
    small.tokenizer = model260k.tokenizer  # 512 tokens
    task = TextTask(stories, model260k.tokenizer, feature="dialogue")
    with pytest.raises(ConfigError, match="the model's tokenizer has 512 tokens, more than the model embeds: its "
                                          "tokenizer files do not belong to this checkpoint"):  # fmt: skip
        check_task_fits(small, task)


WORDS = ["<unk>", "<eos>", "the", "dog", "ran", "home", "a", "cat", "sat", "down"]


def _word_tokenizer(folder: Path, **special: str):
    """A real fast tokenizer over ``WORDS`` with only the ``special`` tokens given, saved to ``folder``
    by transformers and loaded back from it."""
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    built = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)
    built.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_a_text_starts_from_bos_else_eos_and_a_tokenizer_with_neither_is_refused(tmp_path):
    """A tokenizer without BOS or EOS token used to start every text with id 0 ('<unk>' here), silently;
    generation started from TransformerLens's stand-in, '<|endoftext|>', which this vocabulary reads as
    '<unk>' (id 0) too."""
    from capwrap.models import ModelSpec, build_model, save_model
    from capwrap.models.generation import start_token_id

    texts = ["the dog ran home", "a cat sat down"]
    eos_only = _word_tokenizer(tmp_path / "eos-only", eos_token="<eos>")
    assert eos_only.bos_token_id is None and start_token_id(eos_only) == WORDS.index("<eos>")
    task = TextTask(texts, eos_only, seq_len=16)
    assert (task.sample(8, seed=0).tokens[:, 0] == WORDS.index("<eos>")).all()  # GPT-2's way: EOS starts a text

    neither = _word_tokenizer(tmp_path / "neither")
    assert neither.bos_token_id is None and neither.eos_token_id is None
    message = (rf"the tokenizer \w+ of {re.escape(str(tmp_path / 'neither'))} has neither a BOS nor an EOS token in "
               r"its vocabulary, so .*tokenizer\.bos_token = '<s>'.*save_pretrained")  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        TextTask(texts, neither, seq_len=16)
    model = build_model(ModelSpec(d_vocab=len(WORDS), n_ctx=16, n_layers=1, d_model=16, n_heads=2), seed=0)
    model.tokenizer = neither
    loaded = load_model(save_model(model, tmp_path / "model"))  # its tokenizer read from the folder
    assert loaded.tokenizer.get_vocab() == neither.get_vocab()
    with pytest.raises(ConfigError, match="has neither a BOS nor an EOS token in its vocabulary"):
        generate(loaded, n=1, max_new_tokens=3)
    with pytest.raises(ConfigError, match="has neither a BOS nor an EOS token in its vocabulary"):
        TextTask(texts, loaded.tokenizer, seq_len=16)  # the model's tokenizer, as the text specs take it
