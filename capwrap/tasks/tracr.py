"""Tracr tasks: RASP programs compiled into transformers, loaded into TransformerLens.

The paper's Tracr experiments start from compiled models whose mechanism is known exactly:
*Counter* (how many ``a`` tokens the input has) and *Max-identifier* (the input's ``rank``-th
largest token). This module compiles them with `tracr <https://github.com/google-deepmind/tracr>`_
(the ``capwrap[tracr]`` extra, which brings JAX), converts the compiled weights into a
:class:`~capwrap.models.CapModel` on either TransformerLens backend (architecture ``"tracr"``: no
normalization, ReLU MLPs, bidirectional attention), and provides matching tasks for fine-tuning,
with the paper's planted correlations: count(operand) = count(source) + offset for the counter, and
for the max-identifier the fine-tuning answer = the compiled rank's answer shifted by ``shift``
letters.

Examples:
    >>> program = compile_counter("a", letters="abc", max_seq_len=5)  # doctest: +SKIP
    >>> model = program.to_model()  # doctest: +SKIP
    >>> task = TracrCounterTask(program)  # doctest: +SKIP
    >>> accuracy(model, task.sample(256, seed=0))  # the compiled model counts exactly  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from capwrap.errors import ConfigError
from capwrap.models import CapModel, ModelSpec
from capwrap.tasks.base import TaskBase, TaskBatch

__all__ = ["CompiledProgram", "compile_counter", "compile_max_identifier", "TracrCounterTask", "TracrMaxIdentifierTask"]

BOS, PAD = "BOS", "PAD"


def _require_tracr() -> Any:
    try:
        from tracr.compiler import compiling
        from tracr.rasp import rasp
    except ImportError as exc:
        raise ImportError("Tracr support needs the tracr extra (it brings JAX): pip install 'capwrap[tracr]'") from exc
    return rasp, compiling


@dataclass
class CompiledProgram:
    """A compiled RASP program: the tracr model, its vocabularies, and how to run the original.

    Attributes:
        name: ``"counter"`` or ``"max_identifier"``.
        program: the RASP expression.
        compiled: tracr's assembled model (JAX/haiku parameters).
        input_tokens: input token strings by id (``BOS`` first).
        output_values: output classes by id (the values the program can return).
        max_seq_len: longest input, not counting ``BOS``.
    """

    name: str
    program: Any
    compiled: Any
    input_tokens: list[str]
    output_values: list[Any]
    max_seq_len: int

    def encode(self, sequences: Sequence[Sequence[str]]) -> torch.Tensor:
        """Token ids of ``BOS`` + each sequence (all of equal length)."""
        index = {t: i for i, t in enumerate(self.input_tokens)}
        return torch.tensor([[index[BOS]] + [index[t] for t in seq] for seq in sequences], dtype=torch.long)

    def evaluate(self, sequence: Sequence[str]) -> list[Any]:
        """The RASP program's own output on ``sequence`` (ground truth, no neural network)."""
        if self.program is None:
            raise ConfigError(f"the {self.name} program was read from a checkpoint, which keeps no RASP program to run")
        rasp, _ = _require_tracr()
        return list(rasp.evaluate(self.program, list(sequence)))

    def to_model(self, backend: str | None = None) -> CapModel:
        """The compiled weights as a TransformerLens model (``[batch, pos, n_outputs]`` logits); its
        metadata keeps the vocabularies, so :meth:`from_model` gets the program's tasks back from a
        saved checkpoint without tracr."""
        spec, state = _convert(self)
        meta = {"tracr_program": self.name, "input_tokens": self.input_tokens,
                "output_values": [str(v) for v in self.output_values], "max_seq_len": self.max_seq_len}  # fmt: skip
        return CapModel.from_state(spec, state, backend, metadata=meta)

    @classmethod
    def from_model(cls, model: CapModel) -> CompiledProgram:
        """The program's vocabularies from a model made by :meth:`to_model` (e.g. loaded from a saved
        checkpoint): enough to build its tasks, without tracr or JAX (no RASP program to evaluate).

        Raises:
            ConfigError: the model was not compiled from a RASP program by capwrap.
        """
        meta = model.metadata
        if "input_tokens" not in meta or "output_values" not in meta:
            raise ConfigError(
                "this model carries no tracr program vocabularies; was it made by CompiledProgram.to_model?"
            )
        values = [int(v) if str(v).lstrip("-").isdigit() else v for v in meta["output_values"]]
        return cls(meta["tracr_program"], None, None, list(meta["input_tokens"]), values, int(meta["max_seq_len"]))


def _compile(name: str, program: Any, letters: str, max_seq_len: int) -> CompiledProgram:
    _, compiling = _require_tracr()
    if max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be positive, got {max_seq_len}")
    compiled = compiling.compile_rasp_to_model(
        program, vocab=set(letters), max_seq_len=max_seq_len, compiler_bos=BOS, compiler_pad=PAD
    )
    in_map = compiled.input_encoder.encoding_map
    out_map = getattr(compiled.output_encoder, "encoding_map", None)
    if out_map is None:
        raise ConfigError(f"program {name!r} has a numerical output; capwrap loads programs with categorical outputs")
    return CompiledProgram(
        name=name,
        program=program,
        compiled=compiled,
        input_tokens=sorted(in_map, key=in_map.get),
        output_values=sorted(out_map, key=out_map.get),
        max_seq_len=max_seq_len,
    )


def compile_counter(operand: str = "a", letters: str = "abcdefghi", max_seq_len: int = 10) -> CompiledProgram:
    """Compile the paper's Counter: at every position, how many ``operand`` tokens the input has."""
    if len(operand) != 1 or operand not in letters:
        raise ConfigError(f"operand {operand!r} must be one of the letters {letters!r}")
    rasp, _ = _require_tracr()
    select = rasp.Select(rasp.tokens, rasp.tokens, lambda key, query: key == operand)
    program = rasp.categorical(rasp.SelectorWidth(select)).named("count")
    return _compile("counter", program, letters, max_seq_len)


def compile_max_identifier(
    rank: int = 5, letters: str = string.ascii_lowercase, max_seq_len: int = 10
) -> CompiledProgram:
    """Compile the paper's Max-identifier: at every position, the input's ``rank``-th largest token
    (inputs have distinct tokens)."""
    if not 1 <= rank <= max_seq_len:
        raise ConfigError(f"rank must be in [1, max_seq_len={max_seq_len}], got {rank}")
    rasp, _ = _require_tracr()
    greater = rasp.categorical(
        rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, lambda key, query: key > query))
    )
    pick = rasp.Select(greater.named("n_greater"), rasp.tokens, lambda key, query: key == rank - 1)
    program = rasp.categorical(rasp.Aggregate(pick, rasp.tokens)).named("max_identifier")
    return _compile("max_identifier", program, letters, max_seq_len)


def _convert(program: CompiledProgram) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Tracr's haiku parameters -> (spec, canonical TransformerLens-named tensors)."""
    params = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in program.compiled.params.items()}
    config = program.compiled.model_config
    layers = sorted({int(k.split("/")[1].split("_")[1]) for k in params if k.startswith("transformer/layer_")})
    n_layers = len(layers)
    d_model = params["token_embed"]["embeddings"].shape[1]
    h, dh, m = config.num_heads, config.key_size, max(config.mlp_hidden_size, 1)
    labels = [str(label) for label in program.compiled.residual_labels]
    out_name = program.program.label
    W_U = np.zeros((d_model, len(program.output_values)), dtype=np.float32)
    for i, value in enumerate(program.output_values):
        W_U[labels.index(f"{out_name}:{value}"), i] = 1.0
    spec = ModelSpec(
        architecture="tracr",
        d_vocab=params["token_embed"]["embeddings"].shape[0],
        d_vocab_out=len(program.output_values),
        n_ctx=params["pos_embed"]["embeddings"].shape[0],
        n_layers=n_layers,
        d_model=d_model,
        n_heads=h,
        d_head=dh,
        d_mlp=m,
    )

    def get(key: str, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
        return params[key][leaf] if key in params else np.zeros(shape, dtype=np.float32)

    state = {"embed.W_E": params["token_embed"]["embeddings"], "pos_embed.W_pos": params["pos_embed"]["embeddings"]}
    for i, layer in enumerate(layers):
        a, c = f"transformer/layer_{layer}/attn/", f"blocks.{i}."
        for name, key in (("Q", "query"), ("K", "key"), ("V", "value")):
            state[c + f"attn.W_{name}"] = (
                get(a + key, "w", (d_model, h * dh)).reshape(d_model, h, dh).transpose(1, 0, 2)
            )
            state[c + f"attn.b_{name}"] = get(a + key, "b", (h * dh,)).reshape(h, dh)
        state[c + "attn.W_O"] = get(a + "linear", "w", (h * dh, d_model)).reshape(h, dh, d_model)
        state[c + "attn.b_O"] = get(a + "linear", "b", (d_model,))
        mlp = f"transformer/layer_{layer}/mlp/"
        w_in, b_in = get(mlp + "linear_1", "w", (d_model, m)), get(mlp + "linear_1", "b", (m,))
        w_out, b_out = get(mlp + "linear_2", "w", (m, d_model)), get(mlp + "linear_2", "b", (d_model,))
        pad = m - w_in.shape[1]  # layers with narrower MLPs are padded with dead neurons
        state[c + "mlp.W_in"] = np.pad(w_in, ((0, 0), (0, pad)))
        state[c + "mlp.b_in"] = np.pad(b_in, (0, pad))
        state[c + "mlp.W_out"] = np.pad(w_out, ((0, pad), (0, 0)))
        state[c + "mlp.b_out"] = b_out
    state["unembed.W_U"] = W_U
    return spec, {k: torch.tensor(np.ascontiguousarray(v), dtype=torch.float32) for k, v in state.items()}


class _TracrTask(TaskBase):
    """Shared parts of the Tracr tasks: inputs are ``BOS`` + letters; the answer is read at the last position."""

    def __init__(self, program: CompiledProgram, length: int | None, name: str):
        self.program = program
        self.length = program.max_seq_len if length is None else length
        if not 1 <= self.length <= program.max_seq_len:
            raise ConfigError(
                f"length must be in [1, {program.max_seq_len}] (the compiled max_seq_len), got {self.length}"
            )
        self.letters = [t for t in program.input_tokens if t not in (BOS, PAD)]
        self._out_index = {v: i for i, v in enumerate(program.output_values)}
        self.name = name

    @property
    def d_vocab(self) -> int:
        """Number of input token ids."""
        return len(self.program.input_tokens)

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (``BOS`` + ``length`` letters)."""
        return self.length + 1

    def _batch(self, texts: list[list[str]], answers: list[Any], labels: dict[str, list[int]]) -> TaskBatch:
        n = len(texts)
        return TaskBatch(
            tokens=self.program.encode(texts),
            answer_pos=torch.full((n,), self.length, dtype=torch.long),
            answers=torch.tensor([self._out_index[a] for a in answers], dtype=torch.long),
            labels={k: torch.tensor(v, dtype=torch.long) for k, v in labels.items()},
        )


class TracrCounterTask(_TracrTask):
    """Count ``operand`` in a string of letters drawn with replacement (the paper's Counter).

    Args:
        program: a compiled counter (:func:`compile_counter`); its output classes are the counts.
        operand: the letter to count (the fine-tuning task of the paper counts ``b``).
        correlation: fraction of sequences made to satisfy count(operand) = count(source) + offset
            (the rest violate it), as in the PCFG tasks; ``None`` for plain random strings.
        length: letters per sequence (default: the compiled ``max_seq_len``).
        source: the letter whose count the correlation ties the operand's to (default ``a``, what
            the compiled counter counts).
        offset: the planted difference (default 1).
    """

    def __init__(
        self,
        program: CompiledProgram,
        operand: str = "a",
        correlation: float | None = None,
        length: int | None = None,
        source: str = "a",
        offset: int = 1,
    ):
        planted = (
            ""
            if (source, offset) == ("a", 1)
            else f" ({operand} = {source} {'+' if offset >= 0 else '-'} {abs(offset)})"
        )
        super().__init__(
            program, length, f"tracr count {operand}" + ("" if correlation is None else f" C={correlation:g}{planted}")
        )
        if operand not in self.letters or source not in self.letters:
            raise ConfigError(
                f"operand {operand!r} and source {source!r} must be among the program's letters {self.letters}"
            )
        if correlation is not None:
            if not 0.0 <= correlation <= 1.0:
                raise ConfigError(f"correlation must be in [0, 1], got {correlation}")
            if operand == source:
                raise ConfigError(f"a correlation plants {operand!r}'s count as {source!r}'s {offset:+d}, so the operand "
                                  f"must differ from its source ({source!r}; the operand defaults to 'a'): give "
                                  "operand=b, or another source=")  # fmt: skip
            if abs(offset) >= self.length:
                raise ConfigError(f"offset {offset} cannot hold in strings of {self.length} letters")
        self.operand, self.correlation, self.source, self.offset = operand, correlation, source, offset

    @property
    def probe_label(self) -> str:
        """``count_<operand>``."""
        return f"count_{self.operand}"

    def correlation_free(self) -> TracrCounterTask | None:
        """The same task with the correlation false in every sequence (C_Te = 0)."""
        if self.correlation is None:
            return None
        return TracrCounterTask(self.program, self.operand, 0.0, self.length, self.source, self.offset)

    def describe(self) -> dict[str, Any]:
        """A JSON description of the task."""
        return {
            "kind": "tracr_counter",
            "name": self.name,
            "operand": self.operand,
            "correlation": self.correlation,
            **({} if self.correlation is None else {"source": self.source, "offset": self.offset}),
            "length": self.length,
        }

    def sample(self, n: int, seed: int) -> TaskBatch:
        """``n`` sequences, reproducible from ``seed``."""
        if n <= 0:
            raise ConfigError(f"number of samples must be positive, got {n}")
        rng = np.random.default_rng(seed)
        letters = np.array(self.letters)
        texts = [list(rng.choice(letters, size=self.length)) for _ in range(n)]
        if self.correlation is not None:
            hold = rng.random(n) < self.correlation
            for text, h in zip(texts, hold, strict=True):
                self._plant(text, bool(h), rng)
        counts = {t: [text.count(t) for text in texts] for t in self.letters}
        answers = counts[self.operand]
        return self._batch(texts, answers, {f"count_{t}": c for t, c in counts.items()})

    def _plant(self, text: list[str], hold: bool, rng: np.random.Generator) -> None:
        """Edit ``text`` in place: count(operand) = count(source) + offset if ``hold``, else anything but."""
        target, source, offset = self.operand, self.source, self.offset
        filler = [t for t in self.letters if t not in (source, target)] or [source]

        def positions(pred) -> list[int]:
            return [i for i, t in enumerate(text) if pred(t)]

        def n(letter: str) -> int:
            return text.count(letter)

        if hold:
            while n(target) < n(source) + offset:  # turn a filler letter (else a source) into the operand
                pool = positions(lambda t: t not in (source, target)) or positions(lambda t: t == source)
                text[int(rng.choice(pool))] = target
            while n(target) > n(source) + offset:
                if n(target):  # turn an operand into a filler letter
                    text[int(rng.choice(positions(lambda t: t == target)))] = str(rng.choice(filler))
                else:  # count(source) + offset < 0: turn a filler letter into the source
                    text[int(rng.choice(positions(lambda t: t != source)))] = source
        elif n(target) == n(source) + offset:
            if n(target):
                text[int(rng.choice(positions(lambda t: t == target)))] = str(rng.choice(filler))
            else:
                text[int(rng.choice(positions(lambda t: t != target)))] = target


class TracrMaxIdentifierTask(_TracrTask):
    """Name the ``rank``-th largest of distinct letters (the paper's Max-identifier).

    Args:
        program: a compiled max-identifier (:func:`compile_max_identifier`); output classes are letters.
        rank: which largest letter to name; a fine-tuning task uses another rank than the compiled one.
        length: letters per sequence (default: the compiled ``max_seq_len``).
        correlation: fraction of sequences where the answer equals the ``source_rank``-th largest
            letter shifted by ``shift`` places in the alphabet (the paper's shift-by-q rule; the rest
            violate it); ``None`` for plain random sets of letters.
        source_rank: the rank the correlation ties the answer to (the compiled rank, default 5).
        shift: the planted shift q (default 1: the answer is the letter after the source's).
    """

    def __init__(
        self,
        program: CompiledProgram,
        rank: int = 5,
        length: int | None = None,
        correlation: float | None = None,
        source_rank: int = 5,
        shift: int = 1,
    ):
        planted = "" if correlation is None else f" C={correlation:g} (rank {rank} = rank {source_rank} + {shift})"
        super().__init__(program, length, f"tracr max-identifier rank {rank}{planted}")
        if not 1 <= rank <= self.length or self.length > len(self.letters):
            raise ConfigError(f"rank must be in [1, length={self.length}] and length <= {len(self.letters)} letters")
        if correlation is not None:
            if not 0.0 <= correlation <= 1.0:
                raise ConfigError(f"correlation must be in [0, 1], got {correlation}")
            if not 1 <= source_rank <= self.length or source_rank == rank:
                raise ConfigError(f"source_rank must be in [1, {self.length}] and differ from rank {rank}")
            if shift == 0 or (shift > 0) != (rank < source_rank) or abs(shift) < abs(rank - source_rank):
                raise ConfigError(
                    f"rank {rank} = rank {source_rank} shifted by {shift} letters cannot hold: a larger rank number "
                    "is a smaller letter, and the shift must span at least the ranks between them"
                )
        self.rank, self.correlation, self.source_rank, self.shift = rank, correlation, source_rank, shift

    @property
    def probe_label(self) -> str:
        """``rank<rank>_letter``: the index of the answer letter."""
        return f"rank{self.rank}_letter"

    def correlation_free(self) -> TracrMaxIdentifierTask | None:
        """The same task with the shift rule false in every sequence (C_Te = 0)."""
        if self.correlation is None:
            return None
        return TracrMaxIdentifierTask(self.program, self.rank, self.length, 0.0, self.source_rank, self.shift)

    def describe(self) -> dict[str, Any]:
        """A JSON description of the task."""
        planted = {} if self.correlation is None else {"source_rank": self.source_rank, "shift": self.shift}
        return {"kind": "tracr_max_identifier", "name": self.name, "rank": self.rank, "length": self.length,
                "correlation": self.correlation, **planted}  # fmt: skip

    def sample(self, n: int, seed: int) -> TaskBatch:
        """``n`` sequences of distinct letters, reproducible from ``seed``."""
        if n <= 0:
            raise ConfigError(f"number of samples must be positive, got {n}")
        rng = np.random.default_rng(seed)
        letters = np.array(self.letters)
        if self.correlation is None:
            ids = np.stack([rng.choice(len(letters), size=self.length, replace=False) for _ in range(n)])
        else:
            ids = self._sample_planted(n, rng)
        texts = [list(letters[row]) for row in ids]
        ranked = -np.sort(-ids, axis=1)  # letter indices, largest first
        labels = {f"rank{k + 1}_letter": ranked[:, k].tolist() for k in range(self.length)}
        answers = [self.letters[i] for i in ranked[:, self.rank - 1]]
        labels["answer_letter"] = labels[self.probe_label]
        return self._batch(texts, answers, labels)

    def _sample_planted(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Distinct-letter sets, redrawn until the shift rule holds (or fails) as each row needs."""
        hold = rng.random(n) < self.correlation
        out = np.empty((n, self.length), dtype=np.int64)
        todo = np.arange(n)
        for _ in range(1000):
            if not len(todo):
                return out
            draws = np.argsort(rng.random((len(todo), len(self.letters))), axis=1)[:, : self.length]
            ranked = -np.sort(-draws, axis=1)
            holds = ranked[:, self.rank - 1] - ranked[:, self.source_rank - 1] == self.shift
            ok = holds == hold[todo]
            out[todo[ok]] = draws[ok]
            todo = todo[~ok]
        raise ConfigError(  # pragma: no cover - the rule holds for a fair share of random sets
            f"could not draw sets where rank {self.rank} = rank {self.source_rank} + {self.shift}; use a smaller shift"
        )
