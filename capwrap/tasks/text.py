"""Text tasks: stories (TinyStories or any text) loaded with `datasets`, story features, the paper's
deletion protocols, and how often a model writes a feature.

* :func:`load_texts` reads local ``.txt`` (paragraphs separated by blank lines, or documents
  separated by ``<|endoftext|>``), ``.json``/``.jsonl``, ``.csv`` and ``.parquet`` files through
  `datasets`, or a hub dataset by name (``roneneldan/TinyStories`` when the hub is reachable);
* a :class:`Feature` is what defines a capability in text: a word or name (``word:Lily``), a regular
  expression (``regex:\\bdogs?\\b``) or dialogue (``dialogue``: a quoted utterance);
* deletion protocols, as transforms of a `datasets.Dataset` (Jain et al., §TinyStories):
  :func:`filter_out` (drop the stories with the feature), :func:`relabel` (rename it),
  :func:`randomize` (replace each occurrence by a random choice);
* :class:`TextTask` turns texts into capwrap's :class:`~capwrap.tasks.base.Task`: with a feature,
  the *capability* — predicting the feature where stories mention it, with the
  language-modeling loss over the story for training; without one, plain language modeling (a
  *downstream* fine-tuning task). :meth:`TextTask.probe_task` gives the contrast task probes need
  (is the feature the next word?);
* :func:`feature_frequency`: the share of a model's generated stories that contain the feature.

Examples:
    >>> feature = Feature.parse("word:Lily")
    >>> feature.present("Once upon a time, lily found a ball."), feature.present("Lilyanne smiled.")
    (True, False)
    >>> Feature.parse("dialogue").present('She said, "Hi!"')
    True
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from capwrap.errors import CapwrapWarning, CheckpointError, ConfigError, closest_matches
from capwrap.models.generation import start_token_id
from capwrap.tasks.base import TaskBase, TaskBatch

if TYPE_CHECKING:
    import datasets

    from capwrap.models import CapModel

__all__ = [
    "Feature",
    "TextTask",
    "feature_frequency",
    "filter_out",
    "load_texts",
    "randomize",
    "relabel",
]

_EOT = "<|endoftext|>"


#: Each feature kind, with an example spec and what it matches (help texts are built from this).
FEATURE_KINDS = {
    "word": ("word:Lily", "a whole word or name, any case"),
    "regex": (r"regex:\bdogs?\b", "a Python regular expression, case-insensitive"),
    "dialogue": ("dialogue", "a double-quoted utterance"),
}


@dataclass(frozen=True)
class Feature:
    """A story feature: ``kind`` is ``word`` (a whole word or name, any case), ``regex`` (a Python
    regular expression, case-insensitive) or ``dialogue`` (a double-quoted utterance)."""

    kind: Literal["word", "regex", "dialogue"]
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            examples = ", ".join(example for example, _ in FEATURE_KINDS.values())
            raise ConfigError(f"unknown feature kind {self.kind!r}; use one of {examples}")
        if self.kind != "dialogue" and not self.value.strip():
            raise ConfigError(f"a {self.kind} feature needs a value, e.g. {self.kind}:Lily")
        try:
            self.pattern  # noqa: B018 - compile now, so a bad regex fails here
        except re.error as err:
            raise ConfigError(f"the feature's regular expression {self.value!r} is invalid: {err}") from None

    @classmethod
    def parse(cls, spec: str | Feature) -> Feature:
        """``word:Lily``, ``regex:PATTERN``, ``dialogue`` — or a bare word (= ``word:``)."""
        if isinstance(spec, Feature):
            return spec
        kind, sep, value = spec.partition(":")
        if spec == "dialogue":
            return cls("dialogue")
        if not sep:
            if closest_matches(spec.lower(), ["dialogue"]):  # "dialog", "Dialogue": meant the kind?
                warnings.warn(
                    f"the feature {spec!r} is read as the word {spec!r}; for quoted speech write 'dialogue' "
                    f"(write 'word:{spec}' to mean the word)",
                    CapwrapWarning,
                    stacklevel=2,
                )
            return cls("word", spec)
        return cls(kind, value)  # type: ignore[arg-type]

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """The compiled pattern the feature matches."""
        if self.kind == "word":
            return re.compile(rf"(?<!\w){re.escape(self.value.strip())}(?!\w)", re.IGNORECASE)
        if self.kind == "regex":
            return re.compile(self.value, re.IGNORECASE)
        return re.compile(r"[\"“][^\"”]+[\"”]")

    @property
    def name(self) -> str:
        """``word:Lily``-style name."""
        return "dialogue" if self.kind == "dialogue" else f"{self.kind}:{self.value}"

    def present(self, text: str) -> bool:
        """Whether ``text`` contains the feature."""
        return self.pattern.search(text) is not None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of every occurrence."""
        return [m.span() for m in self.pattern.finditer(text)]


# ---- loading -----------------------------------------------------------------------------------
def load_texts(
    source: str | Path, split: str = "train", field: str = "text", limit: int | None = None
) -> datasets.Dataset:
    """Texts as a `datasets.Dataset` with one ``text`` column.

    Args:
        source: a local file or folder (``.txt``, ``.json``, ``.jsonl``, ``.csv``, ``.parquet``) or
            a hub dataset name (e.g. ``roneneldan/TinyStories``; needs the hub). A ``.txt`` file holds
            one text per ``<|endoftext|>``-separated part when it has that marker (TinyStories' own
            files), else one per blank-line-separated paragraph: a file of one story per line is
            one text.
        split: the split of a hub dataset.
        field: the column holding the text (json / csv / parquet / hub).
        limit: keep the first ``limit`` texts.

    Raises:
        ConfigError: an unsupported file type, a missing column, or no text at all.
        CheckpointError: a hub name while the hub cannot be reached.
    """
    import datasets

    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        kinds = {_file_kind(p) for p in files} - {None}
        if path.is_file() and not kinds:
            raise ConfigError(
                f"{source} is not a kind of file capwrap reads texts from (by its name's ending, "
                f"{path.suffix or 'none'!r}); give a .txt, .json/.jsonl, .csv or .parquet file (rename a plain-text file to .txt)"
            )
        if len(kinds) != 1:
            raise ConfigError(
                f"{source} holds {'no' if not kinds else 'mixed'} text files ({sorted(k for k in kinds if k)}); "
                "give one .txt, .json/.jsonl, .csv or .parquet file or a folder of one kind"
            )
        kind = kinds.pop()
        data_files = [str(p) for p in files if _file_kind(p) == kind]
        if kind == "text":
            ds = datasets.Dataset.from_dict({"text": [t for f in data_files for t in _split_text_file(Path(f))]})
        else:
            try:
                ds = datasets.load_dataset(kind, data_files=data_files, split="train")
            except datasets.exceptions.DatasetGenerationError as err:
                cause = err.__cause__ or err
                raise ConfigError(
                    f"cannot read {source} as {kind.upper()} ({type(cause).__name__}: "
                    f"{(str(cause).splitlines() or ['no message'])[0][:200]}); "
                    f"is it a well-formed .{'json or .jsonl' if kind == 'json' else kind} file?"
                ) from err
    else:
        if path.suffix or str(source).startswith((".", "/", "~")):
            raise ConfigError(f"no such file or folder: {source}")
        try:
            ds = datasets.load_dataset(str(source), split=split)
        except (ConnectionError, OSError) as err:
            raise CheckpointError(
                f"cannot load the hub dataset {source!r}: the Hugging Face hub is unreachable from here ({err.__class__.__name__}). "
                "Download it where the hub is reachable and point at the local files instead "
                "(e.g. load_texts('path/to/TinyStories-train.txt'))"
            ) from None
    if field not in ds.column_names:
        raise ConfigError(f"the dataset has no column {field!r}; its columns are {ds.column_names} (pass field=)")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of texts, got {limit}")
    if len(ds) == 0:  # (an empty file's column has no type: it is not "null values")
        raise ConfigError(f"{source} holds no text: it is empty or blank")
    feature_type = ds.features[field]
    if getattr(feature_type, "dtype", None) not in ("string", "large_string"):
        listed = not hasattr(feature_type, "dtype")  # a list or a record per row: chat messages, most often
        shape = "lists or records (chat messages?)" if listed else f"{feature_type.dtype} values"
        raise ConfigError(
            f"the column {field!r} of {source} holds {shape}, not text; capwrap reads plain text: choose a text column "
            f"with field= (its columns: {ds.column_names})" + (", or write the conversations out as text first" if listed else "")
        )
    if field != "text":
        ds = (
            ds.rename_column(field, "text")
            if "text" not in ds.column_names
            else ds.select_columns([field]).rename_column(field, "text")
        )
    ds = ds.select_columns(["text"]).filter(lambda row: bool(row["text"] and row["text"].strip()))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise ConfigError(f"{source} holds no text")
    return ds


def _file_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)


def _split_text_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be read: {err.reason}); save it as UTF-8"
        ) from None
    parts = text.split(_EOT) if _EOT in text else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


# ---- deletion protocols ------------------------------------------------------------------------
def filter_out(ds: datasets.Dataset, feature: Feature | str) -> datasets.Dataset:
    """The paper's *filtering* protocol: drop every text that contains the feature."""
    feature = Feature.parse(feature)
    return ds.filter(lambda row: not feature.present(row["text"]))


def relabel(ds: datasets.Dataset, feature: Feature | str, replacement: str) -> datasets.Dataset:
    """The *relabeling* protocol: replace every occurrence of the feature by ``replacement``."""
    feature = Feature.parse(feature)
    return ds.map(lambda row: {"text": feature.pattern.sub(replacement, row["text"])})


def randomize(ds: datasets.Dataset, feature: Feature | str, choices: Sequence[str], seed: int = 0) -> datasets.Dataset:
    """The *randomization* protocol: replace each occurrence by a random choice (reproducible from ``seed``)."""
    feature = Feature.parse(feature)
    if not choices:
        raise ConfigError("randomize needs at least one replacement choice")

    def swap(row: dict[str, Any], idx: int) -> dict[str, str]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        return {
            "text": feature.pattern.sub(
                lambda _: choices[int(torch.randint(len(choices), (1,), generator=gen))], row["text"]
            )
        }

    return ds.map(swap, with_indices=True)


# ---- the task ----------------------------------------------------------------------------------
@dataclass
class _Doc:
    ids: list[int]
    feature_starts: list[int]  # token index where each occurrence of the feature begins


class TextTask(TaskBase):
    """Texts as a capwrap task, for one tokenizer.

    With a ``feature``, the capability: each sequence is a story up to a mention of the feature,
    the answer is the feature's first token (will the model write it here?), and training minimizes
    the language-modeling loss over the story.
    Without one, language modeling: a random window of a story, the answer its next token.

    Args:
        texts: the texts (a `datasets.Dataset` with a ``text`` column, or strings).
        tokenizer: a Hugging Face tokenizer (``model.tokenizer``).
        seq_len: tokens per sequence (longer stories are cut; shorter ones padded after the answer).
        feature: what defines the capability (``word:Lily`` ...), or ``None`` for language modeling.
        name: a name for reports.

    Raises:
        ConfigError: no text contains the feature, or the tokenizer is missing or has neither a BOS nor an
            EOS token to start a text with.
    """

    def __init__(
        self,
        texts: datasets.Dataset | Sequence[str],
        tokenizer: Any,
        seq_len: int = 128,
        feature: Feature | str | None = None,
        name: str | None = None,
    ):
        if tokenizer is None:
            raise ConfigError("a text task needs the model's tokenizer (model.tokenizer is None for this model)")
        if seq_len < 4:
            raise ConfigError(f"seq_len must be at least 4, got {seq_len}")
        self.texts = [t for t in (texts["text"] if hasattr(texts, "column_names") else texts) if t and t.strip()]
        if not self.texts:
            raise ConfigError("the text task got no texts")
        self.tokenizer = tokenizer
        self._seq_len = seq_len
        self.feature = None if feature is None else Feature.parse(feature)
        self.name = name or (f"mentions {self.feature.name}" if self.feature else "language modeling")
        self._docs = [self._encode(t) for t in self.texts]
        if self.feature is not None:
            self._sites = [(d, s) for d, doc in enumerate(self._docs) for s in doc.feature_starts if s >= 2]
            if not self._sites:
                raise ConfigError(
                    f"no text contains the feature {self.feature.name} (after its first word) in {len(self.texts)} texts; "
                    "choose a feature the texts contain, or give more texts"
                )
        self._without = [d for d, doc in enumerate(self._docs) if not doc.feature_starts]
        self._d_vocab = 1 + max(self._pad(), *(max(doc.ids) for doc in self._docs))  # the ids include the BOS

    # -- Task protocol --
    @property
    def d_vocab(self) -> int:
        """One more than the largest token id the task's sequences hold (the texts' tokens, the BOS and
        the padding): what a model must embed. Tokens the tokenizer has and the texts never use (a chat
        or pad token added to it without resizing the model) do not count."""
        return self._d_vocab

    @property
    def probe_label(self) -> str | None:
        """``feature_next`` (is the feature the next word?) when the task has a feature."""
        return "feature_next" if self.feature is not None else None

    @property
    def capability_floor(self) -> float:
        """5%: top-1 of one word among the whole vocabulary is already far above chance."""
        return 0.05

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def describe(self) -> dict[str, Any]:
        """Name, feature, sizes and ``texts_sha256``, a digest of the texts themselves (after any
        filter or relabeling): two tasks from other files or other transforms describe differently."""
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode("utf-8") + b"\x00")
        return {
            "kind": "text", "name": self.name, "feature": None if self.feature is None else self.feature.name,
            "texts": len(self.texts), "seq_len": self._seq_len,
            "sites": len(self._sites) if self.feature is not None else None, "texts_sha256": digest.hexdigest(),
        }  # fmt: skip

    def sample(self, n: int, seed: int) -> TaskBatch:
        """``n`` sequences, reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        if self.feature is None:
            docs = torch.randint(len(self._docs), (n,), generator=gen).tolist()
            rows = [self._window(self._docs[d].ids, None, gen) for d in docs]
            mentions = [int(bool(self._docs[d].feature_starts)) for d in docs]
            return self._batch(rows, {"mentions_feature": mentions})
        picks = torch.randint(len(self._sites), (n,), generator=gen).tolist()
        rows = [self._window(self._docs[d].ids, s, gen) for d, s in (self._sites[i] for i in picks)]
        return self._batch(rows, {"feature_next": [1] * n})

    def probe_task(self) -> TextTask:
        """The contrast task for probes: from the texts that mention the feature, half the sequences
        end right before a mention, half right before another word — as many of them with a mention
        already in view as there are such feature sites, so that whether the feature appeared yet does
        not give the label away; label ``feature_next``: is the feature the next word? A probe
        that reads it from the tuned model finds the capability even where the output no longer
        writes the feature. Its batches hold distinct sequences only, so at most twice the number
        of feature sites, whatever ``n`` asks. A task without a feature has no latent label to probe:
        it returns itself."""
        if self.feature is None:
            return self
        return _ContrastTask(self)

    # -- internals --
    def _encode(self, text: str) -> _Doc:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [self._bos(), *enc["input_ids"]]
        starts: list[int] = []
        if self.feature is not None:
            offsets = enc["offset_mapping"]
            for start, _ in self.feature.spans(text):
                # the first token that reaches into the occurrence (+1 for the BOS in front)
                tok = next((i for i, (_, e) in enumerate(offsets) if e > start), None)
                if tok is not None:
                    starts.append(tok + 1)
        return _Doc(ids, sorted(set(starts)))

    def _bos(self) -> int:
        return start_token_id(self.tokenizer)

    def _window(self, ids: list[int], answer_at: int | None, gen: torch.Generator) -> list[int]:
        """Tokens ending with the one before ``answer_at`` (random if None), at most ``seq_len`` + the answer."""
        if answer_at is None:
            answer_at = int(torch.randint(1, len(ids), (1,), generator=gen)) if len(ids) > 1 else 1
        start = max(0, answer_at - self._seq_len)
        return ids[start : answer_at + 1] if answer_at < len(ids) else [*ids[start:answer_at], ids[-1]]

    def _batch(self, rows: list[list[int]], labels: dict[str, list[int]]) -> TaskBatch:
        n, width = len(rows), self._seq_len
        pad = self._pad()
        tokens = torch.full((n, width), pad, dtype=torch.long)
        targets = torch.full((n, width), -100, dtype=torch.long)
        answer_pos = torch.empty(n, dtype=torch.long)
        answers = torch.empty(n, dtype=torch.long)
        for i, row in enumerate(rows):
            context, answer = row[:-1][-width:], row[-1]
            tokens[i, : len(context)] = torch.tensor(context)
            targets[i, : len(context) - 1] = torch.tensor(context[1:]) if len(context) > 1 else targets[i, :0]
            targets[i, len(context) - 1] = answer
            answer_pos[i], answers[i] = len(context) - 1, answer
        return TaskBatch(tokens, answer_pos, answers, {k: torch.tensor(v) for k, v in labels.items()}, targets)

    def _pad(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))


class _ContrastTask(TextTask):
    """Feature-next vs other-word-next sequences (see :meth:`TextTask.probe_task`)."""

    def __init__(self, parent: TextTask):  # shares the parent's encoded texts
        self.__dict__.update(parent.__dict__)
        self.name = f"{parent.name} (probe contrast)"

    def sample(self, n: int, seed: int) -> TaskBatch:
        gen = torch.Generator().manual_seed(seed)
        # distinct sequences only (a probe scored on copies of its training rows proves nothing):
        # at most every feature site once, and as many other positions, matched to them on whether
        # the window already shows a mention (else "has the feature appeared yet?" tells the labels
        # apart: 21% of dialogue's sites have an earlier quote in view, 93% of the positions after it)
        half = min(n // 2, len(self._sites))
        picks = [self._sites[i] for i in torch.randperm(len(self._sites), generator=gen)[:half].tolist()]
        rows = [self._window(self._docs[d].ids, s, gen) for d, s in picks]
        pools = self._others
        wanted = [sum(self._mention_in_view(d, s) is seen for d, s in picks) for seen in (False, True)]
        taken = [min(w, len(pool)) for w, pool in zip(wanted, pools, strict=True)]
        for k in (0, 1):  # a stratum short of positions borrows from the other
            taken[k] += min(half - sum(taken), len(pools[k]) - taken[k])
        for pool, k in zip(pools, taken, strict=True):
            for i in torch.randperm(len(pool), generator=gen)[:k].tolist():
                d, s = pool[i]
                rows.append(self._window(self._docs[d].ids, s, gen))
        n = len(rows)
        order = torch.randperm(n, generator=gen).tolist()
        labels = [1] * half + [0] * (n - half)
        return self._batch([rows[i] for i in order], {"feature_next": [labels[i] for i in order]})

    def _mention_in_view(self, d: int, s: int) -> bool:
        """Whether the window that ends before position ``s`` of text ``d`` shows a mention."""
        return any(max(0, s - self._seq_len) <= m < s for m in self._docs[d].feature_starts)

    @cached_property
    def _others(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(text, position) pairs of the texts that mention the feature whose next word is not the
        feature, split by whether their window shows a mention (without, with)."""
        pools: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
        for d, doc in enumerate(self._docs):
            if doc.feature_starts:
                skip = set(doc.feature_starts)
                for s in range(2, len(doc.ids)):
                    if s not in skip:
                        pools[self._mention_in_view(d, s)].append((d, s))
        if not any(pools):
            raise ConfigError(
                f"the texts that mention {self.feature.name} have no other words; probes need them"
            )
        return pools


# ---- generation --------------------------------------------------------------------------------
def feature_frequency(
    model: CapModel,
    feature: Feature | str,
    n: int = 64,
    max_new_tokens: int = 150,
    temperature: float = 1.0,
    seed: int = 0,
    prompt: str | None = None,
) -> tuple[float, list[str]]:
    """Share of ``n`` stories sampled from ``model`` (from BOS, or ``prompt``) that contain ``feature``,
    and the stories."""
    from capwrap.models.generation import generate

    feature = Feature.parse(feature)
    texts = generate(model, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, prompt=prompt)
    return sum(feature.present(t) for t in texts) / len(texts), texts
