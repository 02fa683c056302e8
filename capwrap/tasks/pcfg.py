"""The PCFG tasks of Jain et al. (ICLR 2024): counting and index-of-occurrence on grammar strings.

Strings come from the paper's probabilistic context-free grammar (terminals ``a``, ``b``, ``c``;
every rule chosen with probability 0.5), randomly subsampled to a fixed length. A sequence reads

``<sos> FAMILY OPERAND PARAM <sot> text... <eot> <ans> ANSWER <eos>``

where FAMILY is ``<count>`` (how often OPERAND occurs in the last PARAM tokens of the text) or
``<index>`` (the text position of OPERAND's PARAM-th occurrence, or ``<none>``). The model must
predict ANSWER from the ``<ans>`` position.

Pretraining draws the operand from a *prior*: the paper's ``low`` prior (0.999, 0.001, 0) makes
"count ``b``" a weakly relevant capability. Fine-tuning data can carry the paper's planted
spurious correlation between the answer for the task's operand (the *target*) and the answer for
another operand (the *source*): in a fraction ``correlation`` of sequences, count(target) =
count(source) + offset in the counting window — the paper's count(b) = count(a) + 1 by default —
or, for the index family, index(target) = index(source) + offset (the positions of their
``occurrence``-th occurrences). Tokens are changed to make it so, and in the rest of the sequences it
is made false, so test sets with C_Te = 1 and C_Te = 0 are ``correlation=1.0`` and
``correlation=0.0`` (:meth:`PCFGTask.correlation_free` gives the latter).

Examples:
    >>> task = PCFGTask(family="count", operand="b", correlation=1.0)
    >>> batch = task.sample(64, seed=0)
    >>> bool((batch.labels["count_b"] == batch.labels["count_a"] + 1).all())
    True
    >>> task.vocab.decode(batch.tokens[0, :5])
    ['<sos>', '<count>', 'b', '16', '<sot>']
    >>> index = PCFGTask("index", "c", correlation=1.0, source="b", offset=2)
    >>> batch = index.sample(64, seed=0)
    >>> bool((batch.labels["index_c"] == batch.labels["index_b"] + 2).all())
    True
    >>> index.correlation_free().name
    'index c C=0 (c = b + 2)'
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from capwrap.errors import ConfigError
from capwrap.tasks.base import TaskBase, TaskBatch

__all__ = ["PCFGConfig", "PCFGVocab", "PCFGTask", "GRAMMAR", "MIN_STRING_LENGTH", "PRIORS", "generate_strings"]

#: The paper's grammar: each non-terminal has two expansions, chosen with probability 0.5.
GRAMMAR: dict[str, tuple[str, str]] = {
    "s": ("r q", "q p"), "p": ("m n o", "n o m"), "q": ("n m o", "m n"), "r": ("o m", "m o n"),
    "m": ("l j", "j l k"), "n": ("k j l", "l j k"), "o": ("l k j", "k j"),
    "j": ("h i", "i h"), "k": ("h g i", "g h i"), "l": ("i h g", "h i g"),
    "g": ("d f e", "f e d"), "h": ("e d f", "d e f"), "i": ("e f d", "f d e"),
    "d": ("c a", "a b c"), "e": ("c b", "c a b"), "f": ("c b a", "b a"),
}  # fmt: skip
TERMINALS = ("a", "b", "c")
#: The fewest terminals a string of :data:`GRAMMAR` has (the most: 432); a string is subsampled to
#: ``PCFGConfig.length``, so that is the longest length every string reaches.
MIN_STRING_LENGTH = 138
#: Operand priors of the paper's pretraining, over (a, b, c).
PRIORS: dict[str, tuple[float, float, float]] = {
    "low": (0.999, 0.001, 0.0),
    "medium": (0.9, 0.1, 0.0),
    "high": (0.5, 0.3, 0.2),
}
FAMILIES = ("count", "index")
SPECIALS = ("<pad>", "<sos>", "<sot>", "<eot>", "<ans>", "<eos>", "<none>", "<count>", "<index>")


@dataclass(frozen=True)
class PCFGConfig:
    """Sizes of the PCFG tasks. The paper uses ``length=250, window=40, occurrence=6``; the
    defaults are smaller so models train on a laptop CPU in minutes.

    Args:
        length: tokens of grammar text per sequence (strings are subsampled to this length).
        window: the counting family counts the operand in the last ``window`` text tokens.
        occurrence: the index family asks for the position of this occurrence of the operand.
    """

    length: int = 32
    window: int = 16
    occurrence: int = 3

    def __post_init__(self) -> None:
        if not (1 <= self.length <= MIN_STRING_LENGTH):
            raise ConfigError(
                f"PCFGConfig.length must be in [1, {MIN_STRING_LENGTH}] (grammar strings have at least "
                f"{MIN_STRING_LENGTH} terminals, and a string is subsampled to the length), got {self.length}"
            )
        if not (1 <= self.window <= self.length):
            raise ConfigError(f"PCFGConfig.window must be in [1, length={self.length}], got {self.window}")
        if not (1 <= self.occurrence <= self.length):
            raise ConfigError(
                f"PCFGConfig.occurrence must be in [1, length={self.length}] (the text holds at most {self.length} "
                f"occurrences), got {self.occurrence}"
            )


class PCFGVocab:
    """Token strings <-> ids: special tokens, the terminals, and the numbers 0..length."""

    def __init__(self, config: PCFGConfig):
        self.tokens: list[str] = [*SPECIALS, *TERMINALS, *(str(i) for i in range(config.length + 1))]
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise ConfigError(f"{token!r} is not a PCFG token") from None

    def number(self, value: int) -> int:
        """The id of the number token ``value``."""
        return self._ids[str(value)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Token strings of ``ids``."""
        return [self.tokens[int(i)] for i in ids]


def _expansion_table() -> tuple[dict[str, int], np.ndarray]:
    symbols = list(GRAMMAR) + list(TERMINALS)
    index = {s: i for i, s in enumerate(symbols)}
    table = np.full((len(GRAMMAR), 2, 3), -1, dtype=np.int64)
    for s, options in GRAMMAR.items():
        for j, option in enumerate(options):
            kids = [index[k] for k in option.split()]
            table[index[s], j, : len(kids)] = kids
    return index, table


_SYMBOLS, _TABLE = _expansion_table()


def generate_strings(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` grammar strings subsampled to ``length`` terminals, as ``[n, length]`` ints (0=a,1=b,2=c).

    Every derivation has depth 6; strings have :data:`MIN_STRING_LENGTH` (138) to 432 terminals
    before subsampling.
    """
    symbols = np.full(n, _SYMBOLS["s"], dtype=np.int64)
    owner = np.arange(n)
    for _ in range(6):
        kids = _TABLE[symbols, rng.integers(0, 2, size=len(symbols))]  # [n_sym, 3]
        keep = kids >= 0
        owner = np.repeat(owner, keep.sum(1))
        symbols = kids[keep]
    symbols = symbols - len(GRAMMAR)
    starts = np.searchsorted(owner, np.arange(n))
    counts = np.bincount(owner, minlength=n)
    out = np.empty((n, length), dtype=np.int64)
    for i in range(n):
        pick = np.sort(rng.choice(counts[i], size=length, replace=False))
        out[i] = symbols[starts[i] + pick]
    return out


class PCFGTask(TaskBase):
    """Counting and index-of-occurrence on PCFG strings.

    Args:
        family: ``"count"``, ``"index"``, or a tuple of them (each sequence draws one uniformly).
        operand: ``"a"``, ``"b"`` or ``"c"`` (default ``"a"``); or give ``prior`` instead (not both).
        prior: a name of :data:`PRIORS` or probabilities over (a, b, c) to draw operands from.
        correlation: fraction of sequences made to satisfy the planted correlation
            answer(operand) = answer(source) + offset (the rest are made to violate it); ``None``
            leaves strings as the grammar made them. Needs a single family and an operand.
        source: the operand whose answer the correlation ties the task's answer to (default ``a``).
        offset: the difference the correlation plants (default 1: count(b) = count(a) + 1); for the
            index family a non-zero number of positions.
        config: sizes (:class:`PCFGConfig`).
        name: a label for reports (default: derived from the arguments).
    """

    def __init__(
        self,
        family: str | tuple[str, ...] = "count",
        operand: str | None = None,
        prior: str | Sequence[float] | None = None,
        correlation: float | None = None,
        config: PCFGConfig | None = None,
        name: str | None = None,
        source: str = "a",
        offset: int = 1,
    ):
        self.config = config or PCFGConfig()
        self.families = (family,) if isinstance(family, str) else tuple(family)
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ConfigError(f"unknown PCFG family {family!r}; choose from {list(FAMILIES)}")
        if prior is not None and operand is not None:
            raise ConfigError(
                f"give operand= (every sequence asks about one operand) or prior= (operands drawn from a prior), "
                f"not both; got operand={operand!r} and prior={prior!r}"
            )
        if prior is not None:
            probs = PRIORS.get(prior) if isinstance(prior, str) else tuple(prior)
            if probs is None:
                raise ConfigError(f"unknown prior {prior!r}; choose from {sorted(PRIORS)} or give 3 probabilities")
            if len(probs) != 3 or not all(0 <= p <= 1 for p in probs) or abs(sum(probs) - 1) > 1e-6:  # NaN fails too
                raise ConfigError(
                    f"prior must be 3 non-negative probabilities over (a, b, c) summing to 1, got {probs}"
                )
            self.prior: tuple[float, ...] = tuple(float(p) for p in probs)
            self.operand = None
        else:
            operand = "a" if operand is None else operand
            if operand not in TERMINALS:
                raise ConfigError(f"operand must be one of {list(TERMINALS)}, got {operand!r}")
            self.prior = tuple(1.0 if t == operand else 0.0 for t in TERMINALS)
            self.operand = operand
        self.source, self.offset = source, offset
        if correlation is not None:
            self._check_correlation(correlation)
        self.correlation = None if correlation is None else float(correlation)
        self.vocab = PCFGVocab(self.config)
        self.name = name or self._default_name()

    def _check_correlation(self, correlation: float) -> None:
        if not 0.0 <= correlation <= 1.0:
            raise ConfigError(f"correlation must be in [0, 1], got {correlation}")
        if len(self.families) != 1 or self.operand is None:
            raise ConfigError(
                "a planted correlation needs one family and one operand (e.g. family='count', operand='b'), "
                f"got family={self.families}, operand={self.operand!r}"
            )
        if self.source not in TERMINALS or self.source == self.operand:
            others = [t for t in TERMINALS if t != self.operand]
            raise ConfigError(
                f"a planted correlation ties operand {self.operand!r} to another operand, the source (source=, "
                f"default 'a'), which must be one of {others}, got {self.source!r}; e.g. source={others[0]!r}"
            )
        if not isinstance(self.offset, int) or isinstance(self.offset, bool):
            raise ConfigError(f"offset must be an integer, got {self.offset!r}")
        if self.families[0] == "count" and abs(self.offset) >= self.config.window:
            raise ConfigError(f"offset {self.offset} cannot hold in a counting window of {self.config.window} tokens")
        if self.families[0] == "index" and not 0 < abs(self.offset) < self.config.length:
            raise ConfigError(
                f"an index correlation needs an offset other than 0 and within the text's {self.config.length} "
                f"positions, got {self.offset}"
            )

    @property
    def relation(self) -> str | None:
        """The planted relation in words, e.g. ``b = a + 1``; ``None`` without a correlation."""
        if self.correlation is None:
            return None
        return f"{self.operand} = {self.source} {'+' if self.offset >= 0 else '-'} {abs(self.offset)}"

    def _default_name(self) -> str:
        fam = "+".join(self.families)
        what = self.operand or "prior(" + ",".join(f"{p:g}" for p in self.prior) + ")"
        if self.correlation is None:
            return f"{fam} {what}"
        planted = "" if (self.source, self.offset) == ("a", 1) else f" ({self.relation})"
        return f"{fam} {what} C={self.correlation:g}{planted}"

    @property
    def probe_label(self) -> str:
        """The latent label probes read by default: the count (or index) of the operand."""
        family = self.families[0] if len(self.families) == 1 else "count"
        return f"{family}_{self.operand or 'a'}"

    @property
    def source_label(self) -> str | None:
        """The latent label of the correlation's source (what a wrapper reads instead), or ``None``."""
        return None if self.correlation is None else f"{self.families[0]}_{self.source}"

    def correlation_free(self) -> PCFGTask | None:
        """The same task with the correlation made false in every sequence (C_Te = 0), or ``None``
        when the task plants no correlation."""
        if self.correlation is None:
            return None
        return self.with_correlation(0.0)

    def with_correlation(self, correlation: float | None) -> PCFGTask:
        """The same task with another fraction of correlated sequences (e.g. C_Te = 1 or 0)."""
        asks = {"operand": self.operand} if self.operand is not None else {"prior": self.prior}  # (one or the other)
        return PCFGTask(self.families, **asks, correlation=correlation, config=self.config, source=self.source,
                        offset=self.offset)  # fmt: skip

    @property
    def d_vocab(self) -> int:
        """Number of token ids."""
        return len(self.vocab)

    @property
    def seq_len(self) -> int:
        """Tokens per sequence: text length + 9."""
        return self.config.length + 9

    @functools.cached_property
    def answer_pos(self) -> int:
        """Position of ``<ans>``, whose logits predict the answer."""
        return self.config.length + 6

    def describe(self) -> dict[str, Any]:
        """A JSON description of the task."""
        return {
            "kind": "pcfg",
            "name": self.name,
            "families": list(self.families),
            "operand": self.operand,
            "prior": list(self.prior),
            "correlation": self.correlation,
            **({} if self.correlation is None else {"source": self.source, "offset": self.offset}),
            "config": asdict(self.config),
        }

    def sample(self, n: int, seed: int) -> TaskBatch:
        """``n`` sequences; the same ``seed`` always gives the same batch."""
        if n <= 0:
            raise ConfigError(f"number of samples must be positive, got {n}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        cfg, v = self.config, self.vocab
        rng = np.random.default_rng(seed)
        text = generate_strings(n, cfg.length, rng)
        operands = rng.choice(3, size=n, p=self.prior)
        families = rng.integers(0, len(self.families), size=n)
        if self.correlation is not None:
            self._plant_correlation(text, rng.random(n) < self.correlation, rng)

        window = text[:, -cfg.window :]
        counts = np.stack([(window == t).sum(1) for t in range(3)], 1)  # [n, 3]
        nth = np.stack([_nth_index(text == t, cfg.occurrence) for t in range(3)], 1)  # [n, 3], -1 = none
        rows = np.arange(n)
        is_count = np.array([self.families[f] == "count" for f in families])
        count_ans = counts[rows, operands] + v.number(0)
        idx = nth[rows, operands]
        index_ans = np.where(idx >= 0, idx + v.number(0), v["<none>"])
        answers = np.where(is_count, count_ans, index_ans)
        param = np.where(is_count, v.number(cfg.window), v.number(cfg.occurrence))

        tokens = np.empty((n, self.seq_len), dtype=np.int64)
        tokens[:, 0] = v["<sos>"]
        tokens[:, 1] = np.where(is_count, v["<count>"], v["<index>"])
        tokens[:, 2] = operands + v["a"]
        tokens[:, 3] = param
        tokens[:, 4] = v["<sot>"]
        tokens[:, 5 : 5 + cfg.length] = text + v["a"]
        tokens[:, 5 + cfg.length] = v["<eot>"]
        tokens[:, 6 + cfg.length] = v["<ans>"]
        tokens[:, 7 + cfg.length] = answers
        tokens[:, 8 + cfg.length] = v["<eos>"]
        labels = {f"count_{t}": torch.from_numpy(counts[:, i].copy()) for i, t in enumerate(TERMINALS)}
        labels |= {f"index_{t}": torch.from_numpy(nth[:, i].copy()) for i, t in enumerate(TERMINALS)}
        labels["operand"] = torch.from_numpy(operands)
        labels["family"] = torch.from_numpy(families)
        return TaskBatch(
            tokens=torch.from_numpy(tokens),
            answer_pos=torch.full((n,), self.answer_pos, dtype=torch.long),
            answers=torch.from_numpy(answers),
            labels=labels,
        )

    def _plant_correlation(self, text: np.ndarray, hold: np.ndarray, rng: np.random.Generator) -> None:
        """Edit ``text`` in place so that the planted relation holds where ``hold`` and fails elsewhere."""
        target, source = TERMINALS.index(self.operand), TERMINALS.index(self.source)  # type: ignore[arg-type]
        filler = 3 - target - source  # the third terminal
        if self.families[0] == "count":
            for i in range(len(text)):
                _plant_count(text[i, -self.config.window :], bool(hold[i]), target, source, filler, self.offset, rng)
        else:
            for i in range(len(text)):
                for _ in range(64):  # a string where the relation cannot be planted is redrawn
                    if _plant_index(text[i], bool(hold[i]), target, source, filler, self.offset,
                                    self.config.occurrence, rng):  # fmt: skip
                        break
                    text[i] = generate_strings(1, self.config.length, rng)[0]
                else:
                    raise ConfigError(
                        f"could not plant {self.relation} in 64 draws: a string must hold the {self.source}'s "
                        f"occurrence {self.config.occurrence} (and room for the offset {self.offset:+d}), and with "
                        f"length={self.config.length} few do; use a smaller occurrence or a longer length"
                    )


def _plant_count(
    win: np.ndarray, hold: bool, target: int, source: int, filler: int, offset: int, rng: np.random.Generator
) -> None:
    """Edit a counting window (a view) in place: count(target) = count(source) + offset where
    ``hold``, anything else where not. Only tokens that must change are changed: for the paper's
    count(b) = count(a) + 1 this turns a ``c`` (else an ``a``) into ``b`` while ``b`` is short, and a
    ``b`` into ``c`` while it is over."""
    n_t, n_s = int((win == target).sum()), int((win == source).sum())
    if hold:
        while n_t < n_s + offset:  # turn a filler (else a source) into the target
            pool = np.flatnonzero(win == filler)
            if not len(pool):
                pool = np.flatnonzero(win == source)
                n_s -= 1
            win[rng.choice(pool)] = target
            n_t += 1
        while n_t > n_s + offset:
            if n_t > 0:  # turn a target into the filler
                win[rng.choice(np.flatnonzero(win == target))] = filler
                n_t -= 1
            else:  # count(source) + offset < 0: turn a filler into the source
                win[rng.choice(np.flatnonzero(win == filler))] = source
                n_s += 1
    elif n_t == n_s + offset:  # break it with one edit
        if n_t > 0:
            win[rng.choice(np.flatnonzero(win == target))] = filler
        else:
            win[rng.choice(np.flatnonzero(win != target))] = target


def _plant_index(
    text: np.ndarray, hold: bool, target: int, source: int, filler: int, offset: int, k: int, rng: np.random.Generator
) -> bool:
    """Edit ``text`` in place: the ``k``-th ``target`` sits ``offset`` positions after the ``k``-th
    ``source`` where ``hold``, anywhere else where not. Source tokens are never changed, so the
    source's occurrence stays where the grammar put it. Returns False when this string cannot hold."""
    p_target = int(_nth_index((text == target)[None], k)[0])
    p_source = int(_nth_index((text == source)[None], k)[0])
    if not hold:
        if p_source >= 0 and p_target == p_source + offset:
            text[p_target] = filler  # the k-th target moves later (or disappears)
        return True
    q = p_source + offset
    if p_source < 0 or not 0 <= q < len(text) or text[q] == source:
        return False
    text[q] = target
    before = np.flatnonzero(text[:q] == target)
    if len(before) > k - 1:  # too many targets before q: make the extra ones fillers
        text[rng.choice(before, size=len(before) - (k - 1), replace=False)] = filler
    elif len(before) < k - 1:  # too few: turn fillers before q into targets
        pool = np.flatnonzero(text[:q] == filler)
        if len(pool) < k - 1 - len(before):
            return False
        text[rng.choice(pool, size=k - 1 - len(before), replace=False)] = target
    return True


def _nth_index(mask: np.ndarray, k: int) -> np.ndarray:
    """Per row, the index of the ``k``-th True (1-based ``k``), or -1."""
    cum = np.cumsum(mask, axis=1)
    hit = (cum == k) & mask
    return np.where(hit.any(1), hit.argmax(1), -1)
