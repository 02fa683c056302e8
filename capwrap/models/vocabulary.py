"""A fine-tune that added tokens, compared with its base on the base's vocabulary.

Chat and instruction fine-tunes often add tokens (``<|im_start|>``, ``<|im_end|>``, a pad token)
and grow the embedding and unembedding by as many rows (``model.resize_token_embeddings``), or pad
them to a multiple of 64. The base has no such tokens, so the pair is compared on the ids both
have: the fine-tune loads with ``load_model(TUNED, d_vocab=N)``, which keeps the first ``N`` rows of
every tensor that has one per token (the embedding, the unembedding and its bias), and nothing
else changes. On the kept tokens the cut model computes what the whole one does — the same logits
for each of them; a softmax over them renormalizes without the added tokens — so the analyzers
measure the fine-tune on the tokens its base can read. The added tokens' rows are left out of every
analysis (the weight diff does not see how they were trained).

:func:`~capwrap.diagnosis.diagnose_checkpoints` and ``capwrap diagnose`` do this by themselves when
the tuned checkpoint has more token rows than the base and is otherwise of its shape, with a warning
that names the added tokens; the tokenizers must still agree on every kept id
(:func:`~capwrap.analyzers.base.check_same_tokenizer`).

Examples:
    >>> import tempfile
    >>> from capwrap.models import ModelSpec, build_model, load_model, save_model
    >>> base_spec = ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2)
    >>> grown = build_model(ModelSpec(d_vocab=22, n_ctx=16, n_layers=1, d_model=16, n_heads=2), seed=0)
    >>> folder = save_model(grown, f"{tempfile.mkdtemp()}/tuned")  # a fine-tune that added two tokens
    >>> shared_vocabulary(base_spec, load_model(folder).spec)
    20
    >>> tuned = load_model(folder, d_vocab=20)
    >>> tuned.spec == base_spec, tuned.metadata["vocabulary"]["rows"]
    (True, 22)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from capwrap.errors import ConfigError
from capwrap.models.spec import ModelSpec

__all__ = ["VocabularyCut", "shared_vocabulary", "check_vocabulary_cut", "token_axes", "stored_token_axes", "cut_state",
           "cut_module", "vocabulary_cut"]

#: How many of the added tokens a description names (a padded embedding adds many rows, few tokens).
_NAMED = 8


@dataclass(frozen=True)
class VocabularyCut:
    """What loading a model on fewer tokens left out (``model.metadata["vocabulary"]`` as a dict).

    Attributes:
        kept: the token rows kept, the first ones (the base's vocabulary).
        rows: the token rows the checkpoint has.
        added: the tokens its tokenizer has at the ids left out (id -> token); rows without a token
            (an embedding padded to a round size) are in ``rows`` only.
        named: whether a tokenizer named the left-out rows' tokens (``False``: the model had none).
    """

    kept: int
    rows: int
    added: dict[int, str] = field(default_factory=dict)
    named: bool = True

    def describe(self) -> str:
        """One line: ``"the first 64 of its 66 token rows (added tokens left out: '<|im_start|>', '<|im_end|>')"``.

        Examples:
            >>> VocabularyCut(64, 66, {64: "<|im_start|>", 65: "<|im_end|>"}).describe()
            "the first 64 of its 66 token rows (added tokens left out: '<|im_start|>', '<|im_end|>')"
            >>> VocabularyCut(64, 66, named=False).describe()  # a checkpoint without a tokenizer
            'the first 64 of its 66 token rows (2 rows no tokenizer names)'
        """
        shown = ", ".join(repr(token) for _, token in sorted(self.added.items())[:_NAMED])
        more = len(self.added) - _NAMED
        if more > 0:
            shown += f" and {more} more"
        unnamed = self.rows - self.kept - len(self.added)
        parts = [f"added tokens left out: {shown}"] if self.added else []
        if unnamed > 0:
            plural = "s" if unnamed > 1 else ""
            parts.append(f"{unnamed} row{plural} no token uses" if self.named else f"{unnamed} row{plural} no tokenizer names")
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"the first {self.kept} of its {self.rows} token rows{detail}"

    def to_dict(self) -> dict[str, Any]:
        """As JSON: ``{"kept", "rows", "added": {id: token}}`` (ids as strings, JSON's keys; and
        ``"named": false`` when no tokenizer named the rows)."""
        added = {str(i): t for i, t in sorted(self.added.items())}
        return {"kept": self.kept, "rows": self.rows, "added": added, **({} if self.named else {"named": False})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VocabularyCut:
        """Read back :meth:`to_dict`'s dict (a model's ``metadata["vocabulary"]``, a provenance's).

        Examples:
            >>> cut = VocabularyCut(64, 66, {64: "<pad>"})
            >>> VocabularyCut.from_dict(cut.to_dict()) == cut
            True
        """
        added = {int(i): str(t) for i, t in data.get("added", {}).items()}
        return cls(int(data["kept"]), int(data["rows"]), added, bool(data.get("named", True)))


def shared_vocabulary(base: ModelSpec, tuned: ModelSpec, base_tokens: int | None = None) -> int | None:
    """The vocabulary a pair that differs only in its token rows is compared on (a kept config alike
    but for its token ids): the base's ``d_vocab`` when the tuned model has more rows (tokens added);
    the tuned model's when it has fewer and the base's tokenizer, of ``base_tokens`` tokens, uses only
    those (a base padded to a round size, cut back by the fine-tune's
    ``resize_token_embeddings(len(tokenizer))``). ``None`` for any other pair.

    Examples:
        >>> shared_vocabulary(ModelSpec(d_vocab=64, n_ctx=8), ModelSpec(d_vocab=66, n_ctx=8))
        64
        >>> shared_vocabulary(ModelSpec(d_vocab=66, n_ctx=8), ModelSpec(d_vocab=64, n_ctx=8)) is None
        True
        >>> shared_vocabulary(ModelSpec(d_vocab=66, n_ctx=8), ModelSpec(d_vocab=64, n_ctx=8), base_tokens=60)
        64
    """
    if tuned.d_vocab == base.d_vocab or base.d_vocab_out != base.d_vocab or tuned.d_vocab_out != tuned.d_vocab:
        return None
    if tuned.d_vocab < base.d_vocab and (base_tokens is None or base_tokens > tuned.d_vocab):
        return None  # the base's own tokens would be cut
    small, large = (base, tuned) if base.d_vocab < tuned.d_vocab else (tuned, base)
    return small.d_vocab if not small.differing(large.with_vocabulary(small.d_vocab)) else None


def check_vocabulary_cut(spec: ModelSpec, d_vocab: Any, source: str) -> None:
    """Raise a clear error unless a model of ``spec`` (from ``source``) can be loaded on its first ``d_vocab`` tokens."""
    if isinstance(d_vocab, bool) or not isinstance(d_vocab, int) or d_vocab < 1:
        raise ConfigError(f"d_vocab must be a whole number of tokens >= 1, got {d_vocab!r}")
    if d_vocab > spec.d_vocab:
        raise ConfigError(
            f"d_vocab={d_vocab} is more tokens than {source} has ({spec.d_vocab}): d_vocab keeps the first tokens of a "
            "model that added some (give the base's vocabulary size)"
        )
    if spec.d_vocab_out != spec.d_vocab:
        raise ConfigError(f"{source} is a {spec.architecture} model with a separate output vocabulary: its tokens are not cut")


def token_axes(spec: ModelSpec) -> dict[str, int]:
    """The tensors of ``spec``'s checkpoint layout that have an entry per token (the embedding, the
    unembedding and its bias), each with the axis that counts the tokens. Read from the shapes of
    ``spec`` and of the same spec with one token more, so that it holds for every family.

    Examples:
        >>> token_axes(ModelSpec(d_vocab=6, n_ctx=4, n_layers=1, d_model=4, n_heads=1, architecture="llama"))
        {'model.embed_tokens.weight': 0, 'lm_head.weight': 0}
    """
    from capwrap.models.layouts import checkpoint_shapes

    whole, grown = checkpoint_shapes(spec), checkpoint_shapes(spec.with_vocabulary(spec.d_vocab + 1))
    return {
        name: next(axis for axis, (a, b) in enumerate(zip(shape, grown[name], strict=True)) if a != b)
        for name, shape in whole.items()
        if shape != grown[name]
    }


def stored_token_axes(spec: ModelSpec) -> dict[str, int]:
    """:func:`token_axes`, and for a tied spec also its output layer, which some files store beside the
    embedding it is (converters, consolidated state dicts, peft's ``ensure_weight_tying``).

    Examples:
        >>> stored_token_axes(ModelSpec(d_vocab=6, n_ctx=4, n_layers=1, d_model=4, n_heads=1, tie_embeddings=True))
        {'transformer.wte.weight': 0, 'lm_head.weight': 0}
    """
    axes = token_axes(spec)
    if spec.tie_embeddings and spec.family is not None:
        axes.setdefault(f"{spec.family.tensors.unembed}.weight", 0)
    return axes


def cut_state(spec: ModelSpec, state: Mapping[str, Tensor], d_vocab: int) -> dict[str, Tensor]:
    """``state`` (tensors in ``spec``'s checkpoint layout) with every per-token tensor
    (:func:`token_axes`) cut to its first ``d_vocab`` entries: the checkpoint of
    ``spec.with_vocabulary(d_vocab)`` (a tied output layer stored beside the embedding cut too). A
    tensor of another size than the spec's is left for loading to name.

    Examples:
        >>> spec = ModelSpec(d_vocab=6, n_ctx=4, n_layers=1, d_model=4, n_heads=1)
        >>> state = {"transformer.wte.weight": torch.zeros(6, 4), "transformer.wpe.weight": torch.zeros(4, 4)}
        >>> {name: tuple(t.shape) for name, t in cut_state(spec, state, 5).items()}
        {'transformer.wte.weight': (5, 4), 'transformer.wpe.weight': (4, 4)}
    """
    out = dict(state)
    for name, axis in stored_token_axes(spec).items():
        tensor = state.get(name)
        if tensor is not None and tensor.dim() > axis and tensor.shape[axis] == spec.d_vocab:
            out[name] = tensor.narrow(axis, 0, d_vocab)
    return out


def cut_module(module: torch.nn.Module, spec: ModelSpec, d_vocab: int) -> None:
    """Cut a loaded ``transformers`` model of ``spec`` to its first ``d_vocab`` tokens in place (as
    :func:`cut_state` cuts a checkpoint): its per-token parameters keep their first entries, its modules
    and config say the new size. For a model accelerate placed (``device_map``) its hooks stay, and an
    offloaded (``meta``) parameter takes the cut shape: its hook's map must hold the cut tensor
    (:mod:`capwrap.models.dispatch` puts it there)."""
    axes = token_axes(spec)
    for name, param in module.named_parameters():
        if name in axes:
            param.data = param.data.narrow(axes[name], 0, d_vocab).clone()
    for sub in module.modules():  # what the cut modules say of their own size (reprs, padding checks)
        if isinstance(sub, torch.nn.Embedding):
            sub.num_embeddings = sub.weight.shape[0]
            if sub.padding_idx is not None and sub.padding_idx >= sub.num_embeddings:  # an added pad token
                sub.padding_idx = None
        elif isinstance(sub, torch.nn.Linear):
            sub.out_features = sub.weight.shape[0]
    module.config.vocab_size = d_vocab


def vocabulary_cut(rows: int, d_vocab: int, tokenizer: Any) -> VocabularyCut:
    """What cutting a model of ``rows`` token rows to its first ``d_vocab`` leaves out, the added
    tokens named by the model's ``tokenizer`` (if it has one)."""
    added: dict[int, str] = {}
    if tokenizer is not None:
        added = {i: token for token, i in tokenizer.get_vocab().items() if d_vocab <= i < rows}
    return VocabularyCut(kept=d_vocab, rows=rows, added=added, named=tokenizer is not None)
