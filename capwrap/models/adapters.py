"""PEFT adapters (LoRA, DoRA, IA3, trainable tokens): read an adapter folder, its weight changes, and merge it into a base.

A LoRA adapter saved by `peft <https://github.com/huggingface/peft>`_ (``save_pretrained``) is a
folder with ``adapter_config.json`` and ``adapter_model.safetensors``: for each adapted module a
pair of factors ``A`` ``[r, in]`` and ``B`` ``[out, r]``, whose weight change is
``ΔW = scaling · B·A`` (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; per-module
ranks and alphas from ``rank_pattern`` / ``alpha_pattern``), plus whole tensors the adapter
replaces (``modules_to_save``, trained biases). Two kinds change a weight by more than a low-rank
term, so that their change depends on the base weight ``W`` (``[out, in]``):

* DoRA (``use_dora=True``) adds a magnitude ``m`` (``[out]``) per module: the merged weight is
  ``m / ‖V‖ · V`` with ``V = W + scaling · B·A``, each output row of ``V`` scaled by its magnitude
  over its own norm (for an embedding, each embedding dimension, its norm over the vocabulary);
* IA3 (``peft_type`` ``"IA3"``) learns one vector ``l`` per module: a feedforward module
  (``feedforward_modules``) scales its inputs, the merged weight is ``W · diag(l)``; any other
  scales its outputs, ``diag(l) · W``, and its bias with them.

Trainable tokens (a LoRA adapter's ``trainable_token_indices``, or a ``TRAINABLE_TOKENS`` adapter)
train the rows of a few token ids whole (:class:`TokenRowsModule`): they replace those rows of the
embedding, and a tied output layer follows. An adapter trained on its base grown by added tokens
(``resize_token_embeddings``) builds the grown model from the embedding layers peft saved with it,
or is cut to the base's tokens (:meth:`LoraAdapter.trained_spec`, :meth:`LoraAdapter.cut_tokens`;
see :mod:`capwrap.models.vocabulary`).

:func:`read_adapter` reads it (safetensors only, unless ``allow_pickle``),
:meth:`LoraAdapter.deltas` gives ``ΔW`` in the checkpoint's tensor names one module at a time
(DoRA and IA3: formed densely from the base's tensors), and :meth:`LoraAdapter.merge_into` merges
the adapter into a model's weights one module at a time, on each weight's device, forming each
merged tensor as peft does: what ``load_model(BASE, adapter=DIR)`` does, equal to peft's
``merge_and_unload`` bit for bit (in bfloat16 and float16 too).

Examples:
    >>> import json, tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> from capwrap.models import ModelSpec
    >>> spec = ModelSpec(d_vocab=20, n_ctx=8, n_layers=1, d_model=8, n_heads=2, architecture="llama")
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
    ...     "target_modules": ["q_proj"], "base_model_name_or_path": "my-base"}))  # doctest: +ELLIPSIS
    1...
    >>> prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    >>> save_file({f"{prefix}.lora_A.weight": torch.ones(2, 8), f"{prefix}.lora_B.weight": torch.ones(8, 2)},
    ...           str(folder / "adapter_model.safetensors"))
    >>> adapter = read_adapter(folder)
    >>> adapter.base_name, adapter.describe()["rank"]
    ('my-base', 2)
    >>> delta = adapter.deltas(spec)["model.layers.0.self_attn.q_proj.weight"]
    >>> delta.shape, float(delta[0, 0])  # scaling 4 / 2 times (B·A)[0, 0] = 2
    (torch.Size([8, 8]), 4.0)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from capwrap.checks import check_finite_weights
from capwrap.errors import CapwrapWarning, CheckpointError, ConfigError, closest_matches
from capwrap.models.layouts import canonical_views_of_some, checkpoint_shapes, one_name_per_tensor
from capwrap.models.model import CapModel
from capwrap.models.spec import ModelSpec
from capwrap.models.tensor_files import read_pickle_tensors, read_safetensors

__all__ = [
    "ADAPTER_CONFIG",
    "IA3Module",
    "LoraAdapter",
    "LoraModule",
    "adapter_base",
    "adapter_hint",
    "adapter_name",
    "check_adapter_base",
    "check_adapter_folder",
    "is_adapter_folder",
    "named_base",
    "read_adapter",
    "unsupported_lora_options",
]

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_FACTORS = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
    ".lora_magnitude_vector": (None, "magnitude"),  # DoRA (older peft: with ".weight")
    ".lora_magnitude_vector.weight": (None, "magnitude"),
}
_IA3_VECTOR = ".ia3_l"
_TOKEN_ROWS = ".trainable_tokens_delta"  # peft's trainable tokens (the rows' trained values, not a change)
#: What a module's merge puts into its weight, by :attr:`LoraModule.method` / :attr:`IA3Module.method`.
_MERGED_AS = {"lora": "its LoRA factors", "dora": "its DoRA factors and magnitudes", "ia3": "its IA3 scaling vector",
              "trainable_tokens": "its trained token rows"}
#: LoRA options whose weight change is not ``scaling · B·A`` (peft can merge them; :func:`read_adapter`
#: merges those of :data:`_MERGED_OPTIONS` itself).
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora=True)",
    "use_qalora": "QALoRA (use_qalora=True)",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "use_bdlora": "block-diagonal factors (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
}
#: Options of :data:`_UNSUPPORTED_OPTIONS` that capwrap merges as peft does (read from a folder, or
#: followed on a live model: :mod:`capwrap.models.peft_layers`).
_MERGED_OPTIONS = frozenset({"use_dora"})
#: Options capwrap merges when it reads an adapter folder (:func:`read_adapter`): those of
#: :data:`_MERGED_OPTIONS` and trainable tokens (:class:`TokenRowsModule`), which a live model's
#: wrapper does not follow.
_MERGED_FROM_FOLDERS = _MERGED_OPTIONS | {"trainable_token_indices"}
#: LoRA options under which no weight change stands for the adapter (peft does not merge them either).
_UNMERGEABLE_OPTIONS = {
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens), which acts only on the tokens after its invocation "
    "sequence",
}
#: ``init_lora_weights`` values under which peft changes the base weights as well as the factors
#: (PiSSA, OLoRA, CorDA, LoRA-GA: ``W - scaling·B₀A₀``; LoftQ: a quantized ``W``), so that the
#: trained factors apply to another base than the one named (``pissa_niter_16`` and the like included).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def unsupported_lora_options(
    config: dict[str, Any], merged: frozenset[str] = _MERGED_OPTIONS
) -> tuple[list[str], list[str]]:
    """What in a LoRA ``config`` (``adapter_config.json``, or a live ``LoraConfig.to_dict()``) capwrap
    does not merge itself (it merges ``scaling · B·A`` and DoRA; ``merged``: the options it merges
    where the config is used — an adapter folder's also trainable tokens): the options peft can merge,
    and those it cannot.

    Example:
        >>> unsupported_lora_options({"use_dora": True, "use_qalora": True, "alora_invocation_tokens": [5, 6]})
        (['QALoRA (use_qalora=True)'], ['aLoRA (alora_invocation_tokens), which acts only on the tokens after its invocation sequence'])
    """
    mergeable = [what for key, what in _UNSUPPORTED_OPTIONS.items() if config.get(key) and key not in merged]
    return mergeable, [what for key, what in _UNMERGEABLE_OPTIONS.items() if config.get(key)]


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter (``adapter_config.json``) and no model."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


class _AdaptedModule:
    """What every adapted module has: its path in the Hugging Face model, and the weight it changes."""

    name: str

    @property
    def weight_name(self) -> str:
        """The name of the weight the module changes."""
        return f"{self.name}.weight"

    def token_count(self, axis: int, transpose: bool = False) -> int | None:
        """The size of the changed weight's ``axis`` as stored (``transpose``: GPT-2's ``Conv1D``), as far
        as the module tells it (``None``: any; trained token rows say only that their ids exist)."""
        return self.delta_shape(transpose)[axis]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LoraModule(_AdaptedModule):
    """One adapted module: ``ΔW = scaling · B·A``; with DoRA (``magnitude``), the change that
    rescaling each output row of ``V = W + scaling · B·A`` to its magnitude makes,
    ``ΔW = m / ‖V‖ · V − W``.

    Attributes:
        name: the module's path in the Hugging Face model (``model.layers.0.self_attn.q_proj``).
        kind: ``"linear"`` (``nn.Linear`` or GPT-2's ``Conv1D``) or ``"embedding"``.
        a: ``[r, in]`` (embeddings: ``[r, vocabulary]``).
        b: ``[out, r]`` (embeddings: ``[d_model, r]``).
        scaling: ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
        magnitude: DoRA's magnitude per output (``[out]``; embeddings: ``[d_model]``), or ``None``.
    """

    name: str
    kind: Literal["linear", "embedding"]
    a: Float[Tensor, "r fan_in"]
    b: Float[Tensor, "fan_out r"]
    scaling: float
    magnitude: Float[Tensor, " fan_out"] | None = None

    @property
    def rank(self) -> int:
        """The rank ``r`` of the factors."""
        return int(self.a.shape[0])

    @property
    def method(self) -> Literal["lora", "dora"]:
        """``"dora"`` when the module has a magnitude, else ``"lora"``."""
        return "lora" if self.magnitude is None else "dora"

    @property
    def parameters(self) -> int:
        """How many numbers the adapter holds for the module."""
        return self.a.numel() + self.b.numel() + (0 if self.magnitude is None else self.magnitude.numel())

    def needs(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """The base tensors :meth:`deltas` and :meth:`merged` need (DoRA: the weight; plain LoRA:
        none for :meth:`deltas`)."""
        return [] if self.magnitude is None else [self.weight_name]

    def deltas(self, transpose: bool = False, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{weight name: ΔW}`` (see :meth:`delta`)."""
        weight = None if self.magnitude is None else _needed(base, self.weight_name)
        return {self.weight_name: self.delta(transpose, weight)}

    def delta(self, transpose: bool = False, base: Tensor | None = None,
              device: torch.device | str | None = None) -> Float[Tensor, "rows cols"]:  # fmt: skip
        """``ΔW`` in float32, ``[out, in]``; transposed (``[in, out]``) for weights stored
        input-first (GPT-2's ``Conv1D``, embeddings). Plain LoRA: ``scaling · B·A``, formed on
        ``device`` (default: where the factors are). DoRA: from ``base``, the base's weight as
        stored (same layout as the result), on its device: peft's merged weight (:meth:`merged`,
        before rounding to the weight's dtype) minus the weight."""
        input_first = transpose or self.kind == "embedding"
        if self.magnitude is None:
            low = self._low(device, torch.float32)
            return low.T if input_first else low
        if base is None:
            raise ValueError(f"the DoRA change of {self.name} depends on the base's weight: pass it as base")
        return self._dora_merged(base, input_first).sub_(base).float()

    def merged(
        self, transpose: bool = False, base: Mapping[str, Tensor] | None = None,
        unmerged: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """``{weight name: merged weight}``: the weight after peft's ``merge_and_unload``, in the
        base weight's dtype and layout (``transpose``: ``[in, out]``, GPT-2's ``Conv1D``), formed on
        its device as peft forms it — the same operations in the same order and precision, so that a
        bfloat16 or float16 merge equals peft's bit for bit. Plain LoRA: ``W + scaling·B·A``, the
        change in float32 added and rounded once (an embedding: the change rounded to the weight's
        dtype first, as peft's ``Embedding.merge`` does). DoRA: ``m / ‖V‖ · V``, ``V = W + scaling·B·A``,
        in float32, rounded once. ``base`` holds the weight (checkpoint name and layout).
        ``unmerged``: where ``base`` already holds other adapters merged (several active on one live
        layer), the weight before them, which DoRA takes its norms on as peft's forward pass (and
        peft 0.22's merge) does: ``m / ‖W₀ + scaling·B·A‖ · (base + scaling·B·A)``."""
        weight = _needed(base, self.weight_name)
        input_first = transpose or self.kind == "embedding"
        if self.magnitude is not None:
            norm_of = None if unmerged is None else _needed(unmerged, self.weight_name)
            return {self.weight_name: self._dora_merged(weight, input_first, norm_of).to(weight.dtype)}
        delta = self.delta(transpose, device=weight.device)
        merged = weight + (delta.to(weight.dtype) if self.kind == "embedding" else delta)
        return {self.weight_name: merged.to(weight.dtype)}

    def _low(self, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
        """``scaling · B·A``, ``[out, in]``, as peft's ``get_delta_weight`` forms it (the product, then the scaling)."""
        low = self.b.to(device=device, dtype=dtype) @ self.a.to(device=device, dtype=dtype)
        return low.mul_(self.scaling)

    def _dora_merged(self, weight: Tensor, input_first: bool, norm_of: Tensor | None = None) -> Tensor:
        """DoRA's merged weight ``m / ‖V‖ · V`` in ``weight``'s layout and on its device, in float32
        (float64 for a float64 weight), not yet rounded to the weight's dtype: peft's
        ``DoraLinearVariant.merge_unsafe`` (``DoraEmbeddingVariant`` for embeddings) step by step —
        its change ``transpose(B·A) · scaling`` from the factors (float32 once peft has loaded
        them), the norm of each output row of ``W + change`` (``DoraLinearLayer.get_weight_norm``,
        in the layouts peft takes it in: the sums' order follows them), then
        ``m / norm · (W + change)``. One dense change at a time: the module's. ``norm_of``: the
        weight the norms are taken on, if not ``weight`` (see :meth:`merged`)."""
        compute = torch.promote_types(weight.dtype, torch.float32)
        low = self._low(weight.device, compute)  # [out, in]
        change = low.T if input_first else low  # weight's layout (peft: transpose(B·A, fan_in_fan_out) · scaling)
        norm_of = weight if norm_of is None else norm_of
        rows = norm_of.T if input_first else norm_of  # [out, in]: one row per output (embeddings: per dimension)
        norm = torch.linalg.norm(rows + (change.T if input_first else change), dim=1)
        if not bool((norm > 0).all()):
            index = int((~(norm > 0)).nonzero()[0, 0])
            where = (
                f"embedding dimension {index} of {self.weight_name} (column {index} of the embedding plus its DoRA "
                "change) is zero over the whole vocabulary"
                if self.kind == "embedding"
                else f"the weights of output {index} of {self.name} (row {index} of W + scaling·B·A) are all zero"
            )
            raise CheckpointError(
                f"{where}, so DoRA's rescaling of it to its magnitude (m / its norm) is undefined (peft's merge gives "
                "NaN or infinities there); the adapter or the base is not the pair it was trained as"
            )
        factor = (self.magnitude.to(device=weight.device, dtype=compute) / norm).view(-1, 1)  # type: ignore[union-attr]
        del norm
        return change.add_(weight).mul_(factor.T if input_first else factor)  # change: now m / ‖V‖ · (W + change)

    def cut_tokens(self, axis: int, count: int, transpose: bool = False) -> LoraModule:
        """The module as it changes the first ``count`` entries of its weight's ``axis`` (as stored):
        the factor on that side cut (an output side's DoRA magnitudes too: each output's norm is its own).

        Raises:
            CheckpointError: DoRA on an input side (its norms run over every input).
        """
        if self.token_count(axis, transpose) <= count:  # type: ignore[operator]
            return self
        output_axis = 1 if (transpose or self.kind == "embedding") else 0
        if axis == output_axis:
            magnitude = None if self.magnitude is None else self.magnitude[:count]
            return dataclasses.replace(self, b=self.b[:count], magnitude=magnitude)
        if self.magnitude is not None:
            raise CheckpointError(
                f"{self.name} is adapted with DoRA, whose norms run over all of its tokens: its change to the first "
                f"{count} cannot be told apart; merge the adapter with peft (merge_and_unload), save the merged model, "
                "and diagnose that folder"
            )
        return dataclasses.replace(self, a=self.a[:, :count])

    def delta_shape(self, transpose: bool = False) -> tuple[int, int]:
        """The shape of :meth:`delta` (without forming it)."""
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        return (inp, out) if transpose or self.kind == "embedding" else (out, inp)

    def sq_norm(self) -> float:
        """``‖ΔW‖²`` from the factors alone (``scaling² · tr(AAᵀ · BᵀB)``), without forming ``ΔW``
        (plain LoRA only: DoRA's change depends on the base weight)."""
        if self.magnitude is not None:
            raise ValueError(f"the DoRA change of {self.name} depends on the base's weight: form it with delta()")
        a, b = self.a.double(), self.b.double()
        return float((a @ a.T * (b.T @ b)).sum()) * self.scaling**2


@dataclass(frozen=True)
class IA3Module(_AdaptedModule):
    """One module adapted by IA3: a learned vector ``l`` scales its inputs (a feedforward module:
    ``W · diag(l)``, ``ΔW = W · diag(l − 1)``) or its outputs (``diag(l) · W``, and its bias
    ``b ⊙ l``). The change depends on the base's tensors, and has the rank of ``W``.

    Attributes:
        name: the module's path in the Hugging Face model.
        vector: ``ia3_l`` as peft saves it: ``[1, in]`` for a feedforward module, else ``[out, 1]``.
        feedforward: whether ``l`` scales the inputs (peft's ``feedforward_modules``).
    """

    name: str
    vector: Float[Tensor, "rows cols"]
    feedforward: bool

    kind: ClassVar[Literal["linear"]] = "linear"  # peft adapts nn.Linear and GPT-2's Conv1D with IA3
    method: ClassVar[Literal["ia3"]] = "ia3"
    rank: ClassVar[None] = None  # IA3 has no rank

    @property
    def parameters(self) -> int:
        """How many numbers the adapter holds for the module."""
        return self.vector.numel()

    def needs(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """The base tensors :meth:`deltas` needs: the weight, and the bias an output scaling changes."""
        bias = f"{self.name}.bias"
        return [self.weight_name] + ([bias] if not self.feedforward and bias in shapes else [])

    def deltas(self, transpose: bool = False, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{weight name: ΔW}`` in float32, as stored (``transpose``: ``[in, out]``, GPT-2's
        ``Conv1D``), and for an output scaling the bias's change when ``base`` holds the bias:
        peft's merged tensors (:meth:`merged`, before rounding) minus the base's."""
        merged = self._merged(transpose, base)
        return {name: t.sub_(_needed(base, name)).float() for name, t in merged.items()}

    def merged(
        self, transpose: bool = False, base: Mapping[str, Tensor] | None = None,
        unmerged: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """``{name: merged tensor}`` for the weight (and the bias an output scaling changes, when
        ``base`` holds it): peft's ``IA3 Linear.merge`` — ``W · l`` (``l`` broadcast over the
        weight as stored) formed in float32 on the weight's device and rounded once to its dtype
        — so that a bfloat16 or float16 merge equals peft's bit for bit. (``unmerged`` is not
        used: IA3 scales the tensors it is given, other adapters merged in or not.)"""
        return {name: t.to(_needed(base, name).dtype) for name, t in self._merged(transpose, base).items()}

    def _merged(self, transpose: bool, base: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        weight = _needed(base, self.weight_name)
        compute = torch.promote_types(weight.dtype, torch.float32)
        scale = self.vector.to(device=weight.device, dtype=compute)  # [out, 1] or [1, in]
        out = {self.weight_name: torch.mul(weight, scale.T if transpose else scale)}
        bias = f"{self.name}.bias"
        if not self.feedforward and base is not None and bias in base:
            out[bias] = torch.mul(base[bias], scale.reshape(base[bias].shape))
        return out

    def cut_tokens(self, axis: int, count: int, transpose: bool = False) -> IA3Module:
        """The module as it changes the first ``count`` entries of its weight's ``axis`` (as stored):
        ``l`` cut where it runs along that axis (it scales each entry on its own)."""
        size = self.token_count(axis, transpose)
        if size is None or size <= count:
            return self
        return dataclasses.replace(self, vector=self.vector[:, :count] if self.feedforward else self.vector[:count])

    def delta_shape(self, transpose: bool = False) -> tuple[int | None, int | None]:
        """The shape of the weight the module changes, as far as ``l`` tells it (``None``: any)."""
        size = int(self.vector.numel())
        shape = (None, size) if self.feedforward else (size, None)
        return shape[::-1] if transpose else shape


@dataclass(frozen=True)
class TokenRowsModule(_AdaptedModule):
    """The rows of some tokens trained on their own (peft's trainable tokens: a LoRA adapter's
    ``trainable_token_indices``, or a ``TRAINABLE_TOKENS`` adapter): the trained values replace those
    rows of the embedding (or output layer) whole; a tied output layer follows them, as in peft.

    Attributes:
        name: the module's path in the Hugging Face model (``model.embed_tokens``).
        indices: the token ids whose rows are trained, in the order of ``values``.
        values: ``[len(indices), d_model]``, the trained rows.
    """

    name: str
    indices: tuple[int, ...]
    values: Float[Tensor, "tokens d_model"]

    kind: ClassVar[Literal["embedding"]] = "embedding"  # rows of an embedding (or of an output layer tied to it)
    method: ClassVar[Literal["trainable_tokens"]] = "trainable_tokens"
    rank: ClassVar[None] = None  # trained rows have no rank

    @property
    def parameters(self) -> int:
        """How many numbers the adapter holds for the module."""
        return int(self.values.numel())

    def needs(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """The base tensor :meth:`deltas` needs: the weight (its other rows stay)."""
        return [self.weight_name]

    def deltas(self, transpose: bool = False, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{weight name: ΔW}`` in float32: the trained rows minus the base's, zero elsewhere."""
        merged = self.merged(transpose, base)
        return {self.weight_name: merged[self.weight_name].float() - _needed(base, self.weight_name).float()}

    def merged(
        self, transpose: bool = False, base: Mapping[str, Tensor] | None = None,
        unmerged: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """``{weight name: merged weight}``: the weight with the trained rows put in (peft's
        ``index_copy``), in the weight's dtype, on its device."""
        weight = _needed(base, self.weight_name)
        index = torch.tensor(self.indices, device=weight.device)
        return {self.weight_name: weight.index_copy(0, index, self.values.to(device=weight.device, dtype=weight.dtype))}

    def delta_shape(self, transpose: bool = False) -> tuple[int | None, int]:
        """The shape of the weight the module changes, as far as its rows tell it (any number of tokens)."""
        return None, int(self.values.shape[1])

    def cut_tokens(self, axis: int, count: int, transpose: bool = False) -> TokenRowsModule:
        """The module as it changes the first ``count`` tokens' rows: the trained rows of those tokens."""
        kept = [i for i, token in enumerate(self.indices) if token < count]
        if len(kept) == len(self.indices):
            return self
        return TokenRowsModule(self.name, tuple(self.indices[i] for i in kept), self.values[kept])


AdapterModule = LoraModule | IA3Module | TokenRowsModule


def _needed(base: Mapping[str, Tensor] | None, name: str) -> Tensor:
    if base is None or name not in base:
        raise ValueError(f"the change of {name} depends on the base's tensor: pass it in base")
    return base[name]


@dataclass
class LoraAdapter:
    """A PEFT adapter (LoRA, DoRA, IA3, trainable tokens) read from disk (see :func:`read_adapter`).

    Attributes:
        path: the adapter folder.
        config: ``adapter_config.json``.
        modules: the adapted modules, by module name, in file order (:class:`LoraModule`, or
            :class:`IA3Module` for an IA3 adapter).
        replaced: tensors the adapter replaces whole, by the base model's tensor name:
            ``modules_to_save``, trained biases, and base layers peft saves with the adapter
            (embeddings it adapts); the LoRA changes apply on top of them.
    """

    path: Path
    config: dict[str, Any]
    modules: dict[str, AdapterModule]
    replaced: dict[str, Tensor] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        """``"LORA"`` (DoRA included) or ``"IA3"``, as ``adapter_config.json`` names it."""
        return str(self.config.get("peft_type", "LORA"))

    @property
    def low_rank(self) -> bool:
        """Whether every module's change is ``scaling · B·A`` (of rank at most ``r``, known from the
        factors alone); DoRA and IA3 changes depend on the base's weights and are formed densely."""
        return all(m.method == "lora" for m in self.modules.values())

    @property
    def base_name(self) -> str | None:
        """The base model the adapter was trained on, as ``adapter_config.json`` names it."""
        return self.config.get("base_model_name_or_path") or None

    def describe(self, unchanged: Iterable[str] = ()) -> dict[str, Any]:
        """Rank, alpha, targets, counts: what ``summary.json`` and ``capwrap info`` show.
        ``unchanged``: replaced tensors found equal to the base's (peft saves an adapted embedding's
        own weights beside its factors), listed apart and not counted as the adapter's parameters."""
        unchanged = set(unchanged) & set(self.replaced)
        replaced = {name: t for name, t in self.replaced.items() if name not in unchanged}
        ranks = sorted({m.rank for m in self.modules.values() if m.rank is not None})
        tokens = {m.name: list(m.indices) for m in self.modules.values() if isinstance(m, TokenRowsModule)}
        if self.peft_type == "IA3":
            inputs = {m.name.rsplit(".", 1)[-1] for m in self.modules.values() if getattr(m, "feedforward", False)}
            kind: dict[str, Any] = {"rank": None, "feedforward_modules": sorted(inputs)}
        elif self.peft_type == "TRAINABLE_TOKENS":
            kind = {"rank": None}
        else:
            kind = {"rank": ranks[0] if len(ranks) == 1 else ranks, "lora_alpha": self.config.get("lora_alpha"),
                    "rslora": bool(self.config.get("use_rslora")), "dora": bool(self.config.get("use_dora"))}  # fmt: skip
        return {
            "path": str(self.path),
            "peft_type": self.peft_type,
            "base": self.base_name,
            **kind,
            # "low-rank": scaling·B·A from the factors alone; "dense": DoRA's and IA3's changes, formed per module
            # from the base's weights
            "delta": "low-rank" if self.low_rank else "dense",
            "target_modules": sorted({m.name.rsplit(".", 1)[-1] for m in self.modules.values()}),
            "modules": len(self.modules),
            "replaced_tensors": sorted(replaced),
            **({"unchanged_copies": sorted(unchanged)} if unchanged else {}),
            **({"trainable_tokens": tokens} if tokens else {}),  # module -> the token ids whose rows it trains
            "parameters": sum(m.parameters for m in self.modules.values()) + sum(t.numel() for t in replaced.values()),
        }

    def check_fits(self, spec: ModelSpec, shapes: Mapping[str, Sequence[int]]) -> None:
        """Raise unless every tensor the adapter changes is one of ``shapes`` (the base's tensor
        names and shapes, checkpoint layout) with the same shape.

        Raises:
            CheckpointError: the adapter was made for another model, or changes the input
                embedding or the output layer of a base that ties them.
        """
        # trainable tokens on the embedding keep a tie: peft's tied output layer follows the trained rows
        untying = [m.weight_name for m in self.modules.values() if not _keeps_tie(spec, m)]
        if (tied := tied_change(spec, [*self.replaced, *untying])) and not self._kept_tied(spec):
            module = next((m for m in self.modules.values() if m.weight_name == tied[0]), None)
            merged = "its trained copy" if module is None else _MERGED_AS[module.method]
            merge = f"a merge of {merged} into the one tied tensor"
            merge += "" if module is None else " (as peft's merge_and_unload does)"
            raise CheckpointError(
                f"the adapter at {self.path} changes {tied[0]}, which this base ties to its {tied[1]}, and not the "
                "other the same way: peft trained that side only (the other kept the base's weights; "
                "ensure_weight_tying=True ties modules_to_save where peft finds the tie), so the model it trained no "
                f"longer ties them, and {merge} computes another model. Untie a copy of the base "
                "(tie_word_embeddings=False, its output layer a copy of the embedding), merge the adapter into that "
                "copy with peft, and diagnose the two: see docs/guide/lora-and-trainer.md, 'Adapters on tied "
                "embeddings'"
            )
        transposed = _input_first_modules(spec)
        changed: dict[str, tuple[int | None, ...]] = {name: tuple(t.shape) for name, t in self.replacing(spec).items()}
        changed |= {m.weight_name: m.delta_shape(m.name in transposed) for m in self.modules.values()}
        for name, shape in changed.items():
            if name not in shapes:
                hint = closest_matches(name, shapes)
                raise CheckpointError(
                    f"the adapter at {self.path} changes {name}, which the base model does not have"
                    + (f" (closest: {hint})" if hint else "")
                    + f"; it was made for another model (its config names {self.base_name!r} as base)"
                )
            have = tuple(shapes[name])
            beyond = [i for m in self.modules.values() if m.weight_name == name for i in getattr(m, "indices", ()) if i >= have[0]]
            if beyond:
                raise CheckpointError(
                    f"the adapter at {self.path} trains the rows of token ids {beyond[:5]} of {name}, but the base has "
                    f"{have[0]} tokens: it was trained on the base grown by added tokens, and holds no grown {name}, so "
                    f"the model it trained cannot be built. Load it on the base's tokens: load_model(BASE, "
                    f"adapter=ADAPTER, d_vocab={have[0]}) (`capwrap diagnose` does so)"
                )
            if len(have) != len(shape) or any(w is not None and w != h for w, h in zip(shape, have, strict=True)):
                described = ["*" if size is None else size for size in shape]  # IA3: only the scaled side is known
                raise CheckpointError(
                    f"the adapter at {self.path} changes {name} with shape {described}, but the base's "
                    f"{name} has shape {list(have)}; it was made for another model "
                    f"(its config names {self.base_name!r} as base)"
                )

    def token_rows(self, spec: ModelSpec) -> int | None:
        """How many tokens the model the adapter was trained on has, as its tensors with an entry per
        token say (a replaced embedding or output layer, factors on them; trained rows alone: at least
        their largest id plus one); ``None`` when it changes none.
        More than ``spec.d_vocab``: the base's vocabulary was grown for the fine-tune (added tokens,
        ``resize_token_embeddings``) and peft saved the grown layers with the adapter.

        Raises:
            CheckpointError: its per-token tensors disagree on the count (the adapter is corrupt).
        """
        from capwrap.models.vocabulary import token_axes

        axes, transposed = token_axes(spec), _input_first_modules(spec)
        counts = {name: int(t.shape[axes[name]]) for name, t in self.replacing(spec).items()
                  if name in axes and t.dim() > axes[name]}  # fmt: skip
        for module in self.modules.values():
            if module.weight_name in axes:
                count = module.token_count(axes[module.weight_name], module.name in transposed)
                if count is not None:
                    counts[module.weight_name] = count
        if len(set(counts.values())) > 1:
            raise CheckpointError(f"{self.path}: its per-token tensors disagree on the number of tokens ({counts}); "
                                  "the adapter is corrupt")  # fmt: skip
        # trained rows alone tell only that their ids exist (rows of ids an exact count lacks: check_fits says so)
        least = max((max(m.indices) + 1 for m in self.modules.values() if isinstance(m, TokenRowsModule)), default=None)
        return next(iter(counts.values()), least)

    def trained_spec(self, base: ModelSpec) -> ModelSpec:
        """The spec of the model the adapter was trained on: ``base``, with its vocabulary grown when
        the adapter's per-token tensors have more tokens (:meth:`token_rows`)."""
        rows = self.token_rows(base)
        return base.with_vocabulary(rows) if rows is not None and rows > base.d_vocab else base

    def cut_tokens(self, spec: ModelSpec, d_vocab: int) -> LoraAdapter:
        """The adapter as it changes the first ``d_vocab`` tokens of a model of ``spec`` (the model it was
        trained on, :meth:`trained_spec`): its replaced per-token tensors and the factors on them cut.

        Raises:
            CheckpointError: a DoRA module adapts the tokens' input side (its norms run over all of them).
        """
        from capwrap.models.vocabulary import cut_state, stored_token_axes

        axes, transposed = stored_token_axes(spec), _input_first_modules(spec)  # (a tied output layer peft saved apart)
        modules = {
            name: module.cut_tokens(axes[module.weight_name], d_vocab, module.name in transposed)
            if module.weight_name in axes else module
            for name, module in self.modules.items()
        }  # fmt: skip
        modules = {name: m for name, m in modules.items() if not isinstance(m, TokenRowsModule) or m.indices}
        return dataclasses.replace(self, modules=modules, replaced=cut_state(spec, self.replaced, d_vocab))

    def replacing(self, spec: ModelSpec) -> dict[str, Tensor]:
        """The tensors the adapter replaces in a base of ``spec``: :attr:`replaced`, less the output
        layer of a tied base the adapter kept tied (it is the embedding, replaced already)."""
        if not self._kept_tied(spec):
            return self.replaced
        unembed = f"{spec.family.tensors.unembed}.weight"  # type: ignore[union-attr]
        return {name: t for name, t in self.replaced.items() if name != unembed}

    def _kept_tied(self, spec: ModelSpec) -> bool:
        """Whether the adapter replaces a tied base's embedding and output layer both, with equal
        values, and adapts neither with factors: peft's ``ensure_weight_tying=True`` with
        ``modules_to_save`` saves it so, and merging into the one tied tensor is then exact."""
        names = spec.family.tensors if spec.family is not None else None
        if names is None or not spec.tie_embeddings:
            return False
        embed, unembed = f"{names.embed}.weight", f"{names.unembed}.weight"
        both = embed in self.replaced and unembed in self.replaced
        # (trained token rows on the embedding keep the tie: peft's tied output layer follows them)
        untying = {m.weight_name for m in self.modules.values() if not _keeps_tie(spec, m)}
        return (both and embed not in untying and unembed not in untying
                and torch.equal(self.replaced[embed], self.replaced[unembed]))  # fmt: skip

    def deltas(
        self, spec: ModelSpec, names: Iterable[str] | None = None, base: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """``ΔW`` (float32) for each weight the adapter changes, by the spec's checkpoint names;
        with ``names``, only for the modules of those weights (the rest is not formed). Replaced
        tensors are not included: their change depends on the base (see :meth:`merge_into`).

        DoRA and IA3 changes depend on the base's tensors (:meth:`base_tensors_needed`): ``base``
        must hold them (checkpoint names and layout, after the replaced tensors are put in), and
        each module's change is formed densely; an IA3 output scaling also changes the bias.

        Raises:
            ValueError: a DoRA or IA3 module is wanted and ``base`` lacks its tensors.
        """
        transposed = _input_first_modules(spec)
        wanted = None if names is None else set(names)
        out = {}
        for module in self.modules.values():
            if wanted is None or module.weight_name in wanted:
                out.update(module.deltas(module.name in transposed, base))
        return out

    def base_tensors_needed(self, spec: ModelSpec) -> list[str]:
        """The base tensors (checkpoint names) that :meth:`deltas` needs: DoRA and IA3 modules' weights,
        and the biases of IA3 modules that scale their outputs; none for plain LoRA."""
        shapes = checkpoint_shapes(spec)
        return [name for m in self.modules.values() for name in m.needs(shapes)]

    @property
    def changed_weights(self) -> list[str]:
        """The names of the weights the adapter's modules change (an IA3 output scaling changes the
        module's bias too)."""
        return [m.weight_name for m in self.modules.values()]

    def merge_into(self, model: CapModel) -> None:
        """Merge the adapter into ``model``'s weights as peft's ``merge_and_unload`` does, in place,
        through :meth:`~capwrap.models.CapModel.weights` — the tensors the model computes with, on
        any backend and any placement (a model accelerate dispatched included) — each weight keeping
        its dtype and device: the tensors the adapter replaces are put in, then each module is
        merged in turn, on its weight's device. Plain LoRA adds ``scaling·B·A``; a DoRA or IA3
        module's weight is read back, its merged tensors formed as peft forms them
        (:meth:`LoraModule.merged`, :meth:`IA3Module.merged`) and written in, so that half-precision
        merges equal peft's bit for bit. Only one module's dense tensors exist at a time.

        Raises:
            CheckpointError: the adapter changes a tensor the base does not have, or one of
                another shape (it was made for another model), or one capwrap does not map onto
                its weights.
        """
        spec = model.spec
        shapes = checkpoint_shapes(spec)
        self.check_fits(spec, shapes)
        weights = model.weights()
        transposed = _input_first_modules(spec)
        with torch.no_grad():
            replacing = _canonical_parts(spec, self.replacing(spec), self.path)
            for name, value in replacing.items():  # replaced tensors first
                weights[name].copy_(value)
            for module in self.modules.values():  # one at a time: formed, written, freed
                flip = module.name in transposed
                if isinstance(module, LoraModule) and module.magnitude is None:
                    # peft adds the float32 change to a Linear's (Conv1D's) weight, rounding once, and rounds an
                    # embedding's change to the weight's dtype before adding it
                    device = weights[_canonical_of(spec, module.weight_name, self.path)[0]].device
                    delta = module.delta(flip, device=device)
                    views = _canonical_parts(spec, {module.weight_name: delta}, self.path)
                    # (a tied embedding: one tensor under two names, changed once)
                    for name in one_name_per_tensor(views):
                        target = weights[name]
                        dtype = target.dtype if module.kind == "embedding" else views[name].dtype
                        target.add_(views[name].to(device=target.device, dtype=dtype))
                    del delta, views
                else:  # DoRA, IA3: the merged tensors, from the base's, written over them
                    base = _checkpoint_tensors(spec, weights, module.needs(shapes), self.path)
                    merged = module.merged(flip, base)
                    del base
                    views = _canonical_parts(spec, merged, self.path)
                    for name in one_name_per_tensor(views):
                        weights[name].copy_(views[name])
                    del merged, views


def _keeps_tie(spec: ModelSpec, module: AdapterModule) -> bool:
    """Whether ``module`` changes a tied base's embedding and output layer alike, as peft trained them:
    trained token rows of the input embedding (peft ties the output layer's to them). Rows of the
    output layer alone peft trains untied (and then merges into the tied tensor)."""
    names = spec.family.tensors if spec.family is not None else None
    return isinstance(module, TokenRowsModule) and names is not None and module.weight_name == f"{names.embed}.weight"


def tied_change(spec: ModelSpec, changed: Iterable[str]) -> tuple[str, str] | None:
    """For a base that ties its input embedding to its output layer, the first of ``changed``
    (checkpoint names) that is one of the two, and the other one, described; ``None`` when nothing
    tied is changed. (A family-less base: only ``lm_head`` is known.)"""
    if not spec.tie_embeddings:
        return None
    names = spec.family.tensors if spec.family is not None else None
    embed = f" ({names.embed}.weight)" if names is not None else ""
    unembed = f"{names.unembed}.weight" if names is not None else "lm_head.weight"
    for name in changed:
        if names is not None and name == f"{names.embed}.weight":
            return name, f"output layer ({unembed})"
        if name == unembed or name.startswith("lm_head."):
            return name, f"input embedding{embed}"
    return None


def _canonical_of(spec: ModelSpec, name: str, path: Path) -> list[str]:
    """The canonical weights that the checkpoint tensor ``name`` makes up (found on a placeholder
    without memory: a zero-stride tensor of its shape)."""
    probe = torch.empty(()).expand(checkpoint_shapes(spec)[name])
    names = list(canonical_views_of_some(spec, {name: probe}))
    if not names:
        raise CheckpointError(
            f"the adapter at {path} changes {name}, which capwrap does not map onto the model's weights; merge it with "
            "peft (PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)) and load the "
            "merged folder"
        )
    return names


def _checkpoint_tensors(spec: ModelSpec, weights: Mapping[str, Tensor], names: Sequence[str],
                        path: Path) -> dict[str, Tensor]:  # fmt: skip
    """Copies of the checkpoint tensors ``names``, in their own dtype and on their own device
    (those of the canonical weights they make up), read back from a model's canonical ``weights``
    (the inverse of the views :func:`_canonical_parts` gives)."""
    shapes = checkpoint_shapes(spec)
    out = {}
    for name in names:
        held = weights[_canonical_of(spec, name, path)[0]]
        out[name] = torch.full(shapes[name], math.nan, dtype=held.dtype, device=held.device)
    for name, view in canonical_views_of_some(spec, out).items():
        view.copy_(weights[name])
    if unread := [name for name, t in out.items() if t.isnan().any()]:  # a part no canonical weight holds
        raise CheckpointError(
            f"the change of the adapter at {path} depends on {unread[:3]}, which capwrap cannot read back from the "
            "model's weights; merge it with peft (PeftModel.from_pretrained(base, folder).merge_and_unload()"
            ".save_pretrained(out)) and load the merged folder"
        )
    return out


def _canonical_parts(spec: ModelSpec, tensors: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The canonical weights that checkpoint ``tensors`` make up (views); every tensor must make up
    at least one."""
    views = canonical_views_of_some(spec, tensors)
    covered = {view.untyped_storage().data_ptr() for view in views.values()}
    if unmapped := [name for name, t in tensors.items() if t.untyped_storage().data_ptr() not in covered]:
        raise CheckpointError(
            f"the adapter at {path} changes {unmapped[:3]}, which capwrap does not map onto the model's weights; "
            "merge it with peft (PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)) "
            "and load the merged folder"
        )
    return views


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``): LoRA
    (DoRA and trainable tokens included), IA3 or trainable tokens.

    Args:
        path: the adapter folder, as ``PeftModel.save_pretrained`` writes it.
        allow_pickle: also accept ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: the folder is missing or has no adapter, its files are corrupt, its
            weights are only a pickle (without ``allow_pickle``), or its kind is none of LoRA, IA3 and
            trainable tokens (LoHa, LoKr, VeRA ...), or a LoRA variant capwrap does not merge (KaSA, ``lora_bias``
            ...): merge those with peft's ``merge_and_unload`` and load the result.
    """
    folder = check_adapter_folder(path)
    config = _adapter_config(folder)
    _check_supported(folder, config)
    tensors = _read_tensors(folder, allow_pickle)
    check_finite_weights(tensors, f"the adapter {folder}", CheckpointError)
    parse = _parse_ia3 if config["peft_type"] == "IA3" else _parse
    modules, replaced = parse(folder, config, tensors)
    return LoraAdapter(folder, config, modules, replaced)


def check_adapter_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder, or a :class:`~capwrap.errors.CheckpointError` saying that it does not
    exist or holds no ``adapter_config.json`` (a full checkpoint given as the adapter, say), before
    anything reads it.

    Examples:
        >>> check_adapter_folder("nowhere")
        Traceback (most recent call last):
        ...
        capwrap.errors.CheckpointError: adapter folder nowhere does not exist; check the path
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist; check the path")
    if not (folder / ADAPTER_CONFIG).is_file():
        whole = " (it holds a config.json: a whole checkpoint, which loads as a model, not as an adapter)"
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder"
                              + (whole if (folder / "config.json").is_file() else ""))  # fmt: skip
    return folder


def adapter_name(peft_type: str, rank: Any = None, dora: bool = False) -> str:
    """How capwrap names an adapter in what it prints: ``LoRA r=8``, ``DoRA r=8``, ``IA3``, ``trainable
    tokens``, or peft's own name of another kind.

    Example:
        >>> adapter_name("LORA", 8, dora=True), adapter_name("IA3"), adapter_name("LOHA", 8)
        ('DoRA r=8', 'IA3', 'LOHA r=8')
    """
    if peft_type in ("IA3", "TRAINABLE_TOKENS"):
        return "IA3" if peft_type == "IA3" else "trainable tokens"
    kind = ("DoRA" if dora else "LoRA") if peft_type == "LORA" else peft_type
    return kind if rank is None else f"{kind} r={rank}"


def adapter_hint(folder: str | os.PathLike) -> str:
    """What to say when an adapter folder is passed where a full checkpoint was expected."""
    folder = Path(folder)
    try:
        config = _adapter_config(folder)
    except CheckpointError:  # the hint is that it is an adapter; what is wrong with it is said on loading
        config = {}
    base = config.get("base_model_name_or_path")
    what = adapter_name(str(config.get("peft_type", "PEFT")), config.get("r"), bool(config.get("use_dora")))
    return (
        f"{folder} is a PEFT adapter ({what}"
        + (f", trained on {base!r}" if base else "")
        + "), not a full checkpoint: it holds only the weight changes. Load it merged into its base with "
        f"capwrap.load_model(BASE, adapter={str(folder)!r}), or diagnose it with "
        f"`capwrap diagnose BASE {folder} ...` (BASE: the base model's folder or hub name)"
    )


def named_base(folder: str | os.PathLike) -> str | None:
    """The base model an adapter folder's ``adapter_config.json`` names (``base_model_name_or_path``:
    a folder or hub name, as peft recorded it), or None when it names none."""
    base = _adapter_config(Path(folder)).get("base_model_name_or_path")
    return str(base) if base else None


def _adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter folder, read and checked to be a JSON object."""
    file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} cannot be read as JSON ({exc}); the adapter is corrupt") from exc
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{file} holds a JSON {type(config).__name__}, not the object of settings peft writes; the adapter is corrupt"
        )
    return config


def adapter_base(folder: str | os.PathLike) -> str:
    """The base model an adapter folder's ``adapter_config.json`` names (a folder or hub name).

    Raises:
        CheckpointError: the config names no base, or names a local folder that does not exist
            here; the message says how to pass the base instead.
    """
    base = named_base(folder)
    if not base:
        raise CheckpointError(f"{adapter_hint(folder)}. Its {ADAPTER_CONFIG} does not name its base")
    local = base.startswith((".", "/", "~")) or base.count("/") > 1
    if local and not Path(base).expanduser().is_dir():
        raise CheckpointError(f"{adapter_hint(folder)}. The base its {ADAPTER_CONFIG} names, {base}, is not here")
    return base


def check_adapter_base(adapter: str | os.PathLike, source: str | os.PathLike) -> None:
    """Warn (:class:`~capwrap.errors.CapwrapWarning`) when ``adapter`` is merged into ``source``
    although its ``adapter_config.json`` names another base: an adapter fits every model of the same
    shape, so only its config can tell that it was trained on another one. Said only when the two
    surely differ — two folders that exist here, or two hub names of different models (the owner
    is not compared: hub aliases such as ``gpt2`` and ``openai-community/gpt2`` are one model); a
    folder against a hub name (the same model downloaded, perhaps) is not judged.

    Examples:
        >>> import json, tempfile, warnings
        >>> adapter = Path(tempfile.mkdtemp())
        >>> _ = (adapter / ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "gpt2"}))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     check_adapter_base(adapter, "gpt2"), check_adapter_base(adapter, "distilgpt2")
        (None, None)
        >>> [str(w.message).split(";")[0] for w in caught]  # doctest: +ELLIPSIS
        ["the adapter ... was trained on 'gpt2' (its adapter_config.json says so) but is merged into 'distilgpt2'"]
    """
    named = named_base(adapter)
    if not named:
        return
    given, wanted = Path(source).expanduser(), Path(named).expanduser()
    if given.is_dir() and wanted.is_dir():
        differ = given.resolve() != wanted.resolve()
    elif not given.exists() and not wanted.exists():  # hub names: "gpt2" is "openai-community/gpt2"
        differ = str(source).rstrip("/").split("/")[-1].lower() != named.rstrip("/").split("/")[-1].lower()
    else:
        return
    if differ:
        warnings.warn(
            f"the adapter {adapter} was trained on {named!r} (its {ADAPTER_CONFIG} says so) but is merged into "
            f"{str(source)!r}; an adapter fits any model of its base's shape, so the result may be meaningless. "
            "Pass the base it was trained on, or ignore this if the two are the same model",
            CapwrapWarning,
            stacklevel=3,
        )


# ---- reading -------------------------------------------------------------------------------------
def _check_supported(folder: Path, config: dict[str, Any]) -> None:
    kind = config.get("peft_type")
    if kind is None:
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG} names no peft_type, which every adapter peft saves names; the adapter is corrupt "
            "(or not written by peft)"
        )
    if kind in ("IA3", "TRAINABLE_TOKENS"):
        return
    if kind != "LORA":
        raise CheckpointError(
            f"{folder} is a {kind} adapter; capwrap reads LoRA (DoRA included), IA3 and trainable-tokens adapters. "
            "Merge it into its "
            "base with peft (PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)) and "
            "load the result"
        )
    used, unmergeable = unsupported_lora_options(config, merged=_MERGED_FROM_FOLDERS)
    if unmergeable:
        raise CheckpointError(
            f"{folder} is a LoRA adapter with {', '.join(unmergeable)}: no one weight change stands for it, so "
            "capwrap cannot compare it with its base (peft does not merge it either)"
        )
    if used:
        raise CheckpointError(
            f"{folder} is a LoRA adapter with {', '.join(used)}, whose weight change capwrap does not compute "
            "(it reads scaling·B·A and DoRA); merge it with peft (PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)) "
            "and load the merged folder"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{folder} is a LoRA adapter initialized with init_lora_weights={init!r}, which changes the base weights "
            "too: peft applies its factors to the base minus the initial factors (LoftQ: to a quantized base), not to "
            "the base named, so merging them into it gives another model. Save it converted to plain LoRA "
            "(save_pretrained(out, path_initial_model_for_weight_conversion=INITIAL_ADAPTER), as peft documents for "
            "PiSSA, OLoRA and CorDA) or merge it with peft (PeftModel.from_pretrained(base, folder)"
            ".merge_and_unload().save_pretrained(out)) and load the merged folder"
        )


def _read_tensors(folder: Path, allow_pickle: bool) -> dict[str, Tensor]:
    single = folder / "adapter_model.safetensors"
    if single.exists():
        return read_safetensors(single, fix="re-save the adapter")
    pickle = folder / "adapter_model.bin"
    if pickle.exists():
        return read_pickle_tensors(pickle, allow_pickle, holds="the adapter",
                                   fix="re-save it with save_pretrained(..., safe_serialization=True)")  # fmt: skip
    raise CheckpointError(f"{folder} has {ADAPTER_CONFIG} but no weights: expected adapter_model.safetensors")


def _parse(
    folder: Path, config: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, LoraModule], dict[str, Tensor]]:
    factors: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, str] = {}
    replaced: dict[str, Tensor] = {}
    rows: dict[str, Tensor] = {}  # trainable tokens: module -> the trained rows
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        if name.endswith(_TOKEN_ROWS):
            rows[name.removesuffix(_TOKEN_ROWS).removesuffix(".token_adapter")] = tensor
            continue
        for suffix, (kind, role) in _FACTORS.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                factors.setdefault(module, {})[role] = tensor
                if kind is not None:
                    kinds[module] = kind
                break
        else:
            if ".lora_" in name:
                raise CheckpointError(
                    f"{folder} holds {key}, a LoRA tensor capwrap does not know; merge the adapter with peft "
                    "(merge_and_unload) and load the merged model"
                )
            if (replacing := _replaced_name(name)) is not None:
                replaced[replacing] = tensor  # trained biases, modules_to_save
    dora = bool(config.get("use_dora"))
    modules: dict[str, AdapterModule] = {}
    for module, pair in factors.items():
        if not {"a", "b"} <= set(pair):
            raise CheckpointError(f"{folder} has only one of the two LoRA factors of {module}; the adapter is corrupt")
        a, b, magnitude = pair["a"], pair["b"], pair.get("magnitude")
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{folder}: the LoRA factors of {module} disagree in rank ({list(a.shape)} vs {list(b.shape)}); "
                "the adapter is corrupt"
            )
        if dora and magnitude is None:
            if all("magnitude" not in roles for roles in factors.values()):
                raise CheckpointError(_no_magnitudes(folder, module))
            raise CheckpointError(
                f"{folder} is a DoRA adapter (use_dora=True) without the magnitude vector of {module} "
                "(lora_magnitude_vector), which its other modules have; the adapter is corrupt (truncated or edited)"
            )
        if not dora and magnitude is not None:
            raise CheckpointError(
                f"{folder} holds a DoRA magnitude vector for {module} but its {ADAPTER_CONFIG} does not say "
                "use_dora=True; the adapter is corrupt"
            )
        if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
            raise CheckpointError(
                f"{folder}: the DoRA magnitude vector of {module} has shape {list(magnitude.shape)}, not [{b.shape[0]}] "
                "(one per output of its factors); the adapter is corrupt"
            )
        scaling = _scaling(config, module, int(a.shape[0]))
        modules[module] = LoraModule(module, kinds[module], a, b, scaling, magnitude)  # type: ignore[arg-type]
    rows_modules = _token_rows_modules(folder, config, rows)
    if both := sorted(set(modules) & set(rows_modules)):
        raise CheckpointError(
            f"{folder} adapts {both[0]} with LoRA factors and trains its token rows too, a combination peft cannot "
            "train (its forward pass refuses it); the adapter was not saved by a run of peft"
        )
    modules |= rows_modules
    if not modules and not replaced:
        raise CheckpointError(f"{folder}'s adapter weights hold no tensors")
    return modules, replaced


def _token_rows_modules(folder: Path, config: dict[str, Any], rows: Mapping[str, Tensor]) -> dict[str, TokenRowsModule]:
    """The trainable-tokens modules of an adapter: each module's trained rows with the token ids its
    config gives them (a ``TRAINABLE_TOKENS`` adapter: ``token_indices``; a LoRA adapter:
    ``trainable_token_indices``, a list for the input embedding or ``{module: ids}``). peft saves a
    tied output layer's rows beside the embedding's (the same values, the embedding's ids): they are
    one tensor, kept once, as the embedding's. Modules with no ids change nothing and are left out."""
    from capwrap.models.families import FAMILIES

    outputs = {f.tensors.unembed for f in FAMILIES.values() if f.tensors is not None}
    out: dict[str, TokenRowsModule] = {}
    given = config.get("token_indices") if config.get("peft_type") == "TRAINABLE_TOKENS" else config.get("trainable_token_indices")
    for module, values in sorted(rows.items(), key=lambda item: item[0].rsplit(".", 1)[-1] in outputs):  # embeddings first
        if any(torch.equal(m.values, values) and len(m.indices) == len(values) for m in out.values()):
            continue  # a tied output layer's copy of the embedding's rows
        indices = given
        if isinstance(given, dict):
            indices = next((ids for key, ids in given.items() if module == key or module.endswith(f".{key}")), None)
        if not isinstance(indices, list | tuple) or not all(isinstance(i, int) and i >= 0 for i in indices):
            raise CheckpointError(
                f"{folder} holds trained rows of {module} (trainable tokens) but its {ADAPTER_CONFIG} gives no token ids "
                f"for them ({indices!r}); the adapter is corrupt"
            )
        if values.ndim != 2 or values.shape[0] != len(indices):
            raise CheckpointError(
                f"{folder}: the trained rows of {module} have shape {list(values.shape)} for the {len(indices)} token "
                f"ids its {ADAPTER_CONFIG} gives ({sorted(indices)[:8]}); the adapter is corrupt"
            )
        if len(set(indices)) != len(indices):
            raise CheckpointError(
                f"{folder} trains the rows of {module} for repeated token ids ({sorted(indices)[:8]}): which trained row "
                "peft's merge keeps for a repeated id is not defined, so capwrap cannot build the model it trained"
            )
        if indices:
            out[module] = TokenRowsModule(module, tuple(indices), values)
    return out


def _replaced_name(name: str) -> str | None:
    """The base tensor a saved tensor that is not an adapter's own replaces (a trained bias, a module
    of ``modules_to_save``), or ``None`` for the copies peft saves beside them with ``bias="all"``:
    a ``modules_to_save`` module's untrained original (``.original_module.``, which its merge drops)
    and a second copy of its trained bias (``.modules_to_save.``, which peft's loading ignores as
    unexpected: the module's own name holds the trained tensor)."""
    if ".original_module." in name or ".modules_to_save." in name:
        return None
    return name.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")


def _no_magnitudes(folder: Path, module: str) -> str:
    """What to say of a DoRA adapter that has no magnitude vector at all. peft writes one when it
    converts a PiSSA, OLoRA, CorDA or LoRA-GA adapter trained with DoRA to plain LoRA
    (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``): it saves only the
    converted factors ``[A | A₀]``, ``[B | −B₀]`` (rank and alpha doubled, ``init_lora_weights``
    set to true) and keeps ``use_dora=True``, dropping the trained magnitudes. The factors give the
    trained direction ``V`` but not the magnitudes the model scales it to, so the trained model
    cannot be rebuilt from the folder: peft itself loads it with each magnitude reset to the norm
    of the base's row (warning of missing adapter keys), which is the trained model only where the
    magnitudes were not trained."""
    return (
        f"{folder} is a DoRA adapter (use_dora=True) without the magnitude vector of any module "
        f"(lora_magnitude_vector; {module} has only LoRA factors), so the magnitudes its model scales each output to "
        "are missing and the model it trained cannot be rebuilt from it. The likely cause is peft's conversion of a "
        "PiSSA, OLoRA, CorDA or LoRA-GA adapter trained with DoRA to plain LoRA "
        "(save_pretrained(..., path_initial_model_for_weight_conversion=...)), which saves only the converted factors, "
        "drops the trained magnitudes and keeps use_dora=True (peft loads such a folder with every magnitude reset to "
        "the norm of the base's row, warning of missing adapter keys). Save the trained adapter without the conversion "
        "and merge it with peft into the base it was initialized on (PeftModel.from_pretrained(base, folder)"
        ".merge_and_unload().save_pretrained(out)), then load the merged folder"
    )


def _parse_ia3(
    folder: Path, config: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, AdapterModule], dict[str, Tensor]]:
    modules: dict[str, AdapterModule] = {}
    replaced: dict[str, Tensor] = {}
    for key, vector in tensors.items():
        name = key.removeprefix(_PREFIX)
        if not name.endswith(_IA3_VECTOR):
            if ".ia3_" in name or ".lora_" in name:
                raise CheckpointError(
                    f"{folder} holds {key}, a tensor an IA3 adapter does not have; merge the adapter with peft "
                    "(merge_and_unload) and load the merged model"
                )
            if (replacing := _replaced_name(name)) is not None:
                replaced[replacing] = vector  # modules_to_save
            continue
        module = name.removesuffix(_IA3_VECTOR)
        feedforward = _is_feedforward(config, module, vector)
        if vector.ndim != 2 or vector.shape[0 if feedforward else 1] != 1:
            want = "[1, in] (it scales the module's inputs)" if feedforward else "[out, 1] (it scales its outputs)"
            raise CheckpointError(
                f"{folder}: the IA3 vector of {module} has shape {list(vector.shape)}, not {want}; the adapter is "
                "corrupt (or its feedforward_modules do not match its tensors)"
            )
        modules[module] = IA3Module(module, vector, feedforward)
    if not modules and not replaced:
        raise CheckpointError(f"{folder}'s adapter weights hold no tensors")
    return modules, replaced


def _is_feedforward(config: dict[str, Any], module: str, vector: Tensor) -> bool:
    """Whether IA3 scales the inputs of ``module``: peft's test of ``feedforward_modules`` (a regex
    the whole module name matches, or names it ends with); without them in the config, what the
    vector's shape says (``[1, in]``)."""
    wanted = config.get("feedforward_modules")
    if wanted is None:
        return vector.ndim == 2 and vector.shape[0] == 1 and vector.shape[1] != 1
    if isinstance(wanted, str):
        return re.fullmatch(wanted, module) is not None
    return any(module.endswith(name) for name in wanted)


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling of one module: its alpha (``alpha_pattern`` or ``lora_alpha``) over its rank
    (or over the rank's square root with ``use_rslora``)."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    if rank == 0:
        raise CheckpointError(f"the LoRA factors of {module} have rank 0")
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


@functools.lru_cache(maxsize=64)
def _input_first_modules(spec: ModelSpec) -> frozenset[str]:
    """Modules of the spec's Hugging Face model that store weights ``[in, out]`` (GPT-2's ``Conv1D``);
    cached, as :func:`~capwrap.models.layouts.hf_shapes` is (building the model on the meta device
    takes 1.4 s for a 7B Llama, and the adapter's weight diff asks once per module)."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    if not spec.has_hf_equivalent:
        raise ConfigError(f"{spec.architecture} models have no Hugging Face layers, so PEFT adapters do not apply")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(spec.to_hf_config())
    return frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))
