"""Tracr tasks: RASP programs compiled into transformers, loaded into TransformerLens.

The paper's Tracr experiments start from compiled models whose mechanism is known exactly:
*Counter* (how many ``a`` tokens the input has) and *Max-identifier* (the input's ``rank``-th
largest token). This module compiles them with `tracr <https://github.com/google-deepmind/tracr>`_
(the ``capwrap[tracr]`` extra, which brings JAX), converts the compiled weights into a
:class:`~capwrap.models.CapModel` on either TransformerLens backend (architecture ``"tracr"``: no
normalization, ReLU MLPs, bidirectional attention), and provides matching tasks for fine-tuning,
with the paper's planted correlation for the counter.

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
from capwrap.tasks.base import TaskBatch

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
        rasp, _ = _require_tracr()
        return list(rasp.evaluate(self.program, list(sequence)))

    def to_model(self, backend: str | None = None) -> CapModel:
        """The compiled weights as a TransformerLens model (``[batch, pos, n_outputs]`` logits)."""
        spec, state = _convert(self)
        return CapModel.from_state(spec, state, backend, metadata={"tracr_program": self.name})


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


class _TracrTask:
    """Shared parts of the Tracr tasks: inputs are ``BOS`` + letters; the answer is read at the last position."""

    def __init__(self, program: CompiledProgram, length: int | None, name: str):
        self.program = program
        self.length = length or program.max_seq_len
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
        correlation: fraction of sequences made to satisfy count(operand) = count(a) + 1 (the rest
            violate it), as in the PCFG tasks; ``None`` for plain random strings.
        length: letters per sequence (default: the compiled ``max_seq_len``).
    """

    def __init__(
        self, program: CompiledProgram, operand: str = "a", correlation: float | None = None, length: int | None = None
    ):
        super().__init__(
            program, length, f"tracr count {operand}" + ("" if correlation is None else f" C={correlation:g}")
        )
        if operand not in self.letters:
            raise ConfigError(f"operand {operand!r} is not in the program's letters {self.letters}")
        if correlation is not None and not (0.0 <= correlation <= 1.0 and operand != "a"):
            raise ConfigError("correlation must be in [0, 1] and needs an operand other than 'a'")
        self.operand, self.correlation = operand, correlation

    def describe(self) -> dict[str, Any]:
        """A JSON description of the task."""
        return {
            "kind": "tracr_counter",
            "name": self.name,
            "operand": self.operand,
            "correlation": self.correlation,
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
        counts = {t: [text.count(t) for text in texts] for t in ("a", self.operand)}
        answers = counts[self.operand]
        return self._batch(texts, answers, {"count_a": counts["a"], f"count_{self.operand}": counts[self.operand]})

    def _plant(self, text: list[str], hold: bool, rng: np.random.Generator) -> None:
        """Edit ``text`` in place: count(operand) = count(a) + 1 if ``hold``, else anything but."""
        target = self.operand
        filler = [t for t in self.letters if t not in ("a", target)] or ["a"]

        def positions(pred) -> list[int]:
            return [i for i, t in enumerate(text) if pred(t)]

        def n(letter: str) -> int:
            return text.count(letter)

        if hold:
            while n(target) < n("a") + 1:  # turn a filler letter (else an `a`) into the operand
                pool = positions(lambda t: t not in ("a", target)) or positions(lambda t: t == "a")
                text[int(rng.choice(pool))] = target
            while n(target) > n("a") + 1:  # turn an operand into a filler letter
                text[int(rng.choice(positions(lambda t: t == target)))] = str(rng.choice(filler))
        elif n(target) == n("a") + 1:
            text[int(rng.choice(positions(lambda t: t == target)))] = str(rng.choice(filler))


class TracrMaxIdentifierTask(_TracrTask):
    """Name the ``rank``-th largest of distinct letters (the paper's Max-identifier).

    Args:
        program: a compiled max-identifier (:func:`compile_max_identifier`); output classes are letters.
        rank: which largest letter to name; a fine-tuning task uses another rank than the compiled one.
        length: letters per sequence (default: the compiled ``max_seq_len``).
    """

    def __init__(self, program: CompiledProgram, rank: int = 5, length: int | None = None):
        super().__init__(program, length, f"tracr max-identifier rank {rank}")
        if not 1 <= rank <= self.length or self.length > len(self.letters):
            raise ConfigError(f"rank must be in [1, length={self.length}] and length <= {len(self.letters)} letters")
        self.rank = rank

    def describe(self) -> dict[str, Any]:
        """A JSON description of the task."""
        return {"kind": "tracr_max_identifier", "name": self.name, "rank": self.rank, "length": self.length}

    def sample(self, n: int, seed: int) -> TaskBatch:
        """``n`` sequences of distinct letters, reproducible from ``seed``."""
        if n <= 0:
            raise ConfigError(f"number of samples must be positive, got {n}")
        rng = np.random.default_rng(seed)
        texts = [list(rng.choice(np.array(self.letters), size=self.length, replace=False)) for _ in range(n)]
        answers = [sorted(text, reverse=True)[self.rank - 1] for text in texts]
        return self._batch(texts, answers, {"answer_letter": [self.letters.index(a) for a in answers]})
