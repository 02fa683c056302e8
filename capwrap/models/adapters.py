"""PEFT LoRA adapters: read an adapter folder, its low-rank weight changes, and merge it into a base.

A LoRA adapter saved by `peft <https://github.com/huggingface/peft>`_ (``save_pretrained``) is a
folder with ``adapter_config.json`` and ``adapter_model.safetensors``: for each adapted module a
pair of factors ``A`` ``[r, in]`` and ``B`` ``[out, r]``, whose weight change is
``ΔW = scaling · B·A`` (``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; per-module
ranks and alphas from ``rank_pattern`` / ``alpha_pattern``), plus whole tensors the adapter
replaces (``modules_to_save``, trained biases). :func:`read_adapter` reads it (safetensors only,
unless ``allow_pickle``), :meth:`LoraAdapter.deltas` gives ``ΔW`` in the checkpoint's tensor
names one module at a time, and :meth:`LoraAdapter.merge_into` adds them to a model's weights:
what ``load_model(BASE, adapter=DIR)`` does, equal to peft's ``merge_and_unload``.

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

import functools
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    "LoraAdapter",
    "LoraModule",
    "adapter_base",
    "adapter_hint",
    "check_adapter_base",
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
}
#: LoRA options whose weight change is not ``scaling · B·A`` (peft can merge them).
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
#: LoRA options under which no weight change stands for the adapter (peft does not merge them either).
_UNMERGEABLE_OPTIONS = {
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens), which acts only on the tokens after its invocation "
    "sequence",
}
#: ``init_lora_weights`` values under which peft changes the base weights as well as the factors
#: (PiSSA, OLoRA, CorDA, LoRA-GA: ``W - scaling·B₀A₀``; LoftQ: a quantized ``W``), so that the
#: trained factors apply to another base than the one named (``pissa_niter_16`` and the like included).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def unsupported_lora_options(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What in a LoRA ``config`` (``adapter_config.json``, or a live ``LoraConfig.to_dict()``) capwrap
    does not read as ``scaling · B·A``: the options peft can merge, and those it cannot.

    Example:
        >>> unsupported_lora_options({"use_dora": True, "alora_invocation_tokens": [5, 6]})[0]
        ['DoRA (use_dora=True)']
    """
    mergeable = [what for key, what in _UNSUPPORTED_OPTIONS.items() if config.get(key)]
    return mergeable, [what for key, what in _UNMERGEABLE_OPTIONS.items() if config.get(key)]


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter (``adapter_config.json``) and no model."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``ΔW = scaling · B·A``.

    Attributes:
        name: the module's path in the Hugging Face model (``model.layers.0.self_attn.q_proj``).
        kind: ``"linear"`` (``nn.Linear`` or GPT-2's ``Conv1D``) or ``"embedding"``.
        a: ``[r, in]`` (embeddings: ``[r, vocabulary]``).
        b: ``[out, r]`` (embeddings: ``[d_model, r]``).
        scaling: ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
    """

    name: str
    kind: Literal["linear", "embedding"]
    a: Float[Tensor, "r fan_in"]
    b: Float[Tensor, "fan_out r"]
    scaling: float

    @property
    def rank(self) -> int:
        """The rank ``r`` of the factors."""
        return int(self.a.shape[0])

    @property
    def weight_name(self) -> str:
        """The name of the weight the module changes."""
        return f"{self.name}.weight"

    def delta(self, transpose: bool = False) -> Float[Tensor, "rows cols"]:
        """``scaling · B·A`` in float32, ``[out, in]``; transposed (``[in, out]``) for weights
        stored input-first (GPT-2's ``Conv1D``, embeddings)."""
        delta = (self.b.float() @ self.a.float()) * self.scaling
        return delta.T if transpose or self.kind == "embedding" else delta

    def delta_shape(self, transpose: bool = False) -> tuple[int, int]:
        """The shape of :meth:`delta` (without forming it)."""
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        return (inp, out) if transpose or self.kind == "embedding" else (out, inp)

    def sq_norm(self) -> float:
        """``‖ΔW‖²`` from the factors alone (``scaling² · tr(AAᵀ · BᵀB)``), without forming ``ΔW``."""
        a, b = self.a.double(), self.b.double()
        return float((a @ a.T * (b.T @ b)).sum()) * self.scaling**2


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from disk (see :func:`read_adapter`).

    Attributes:
        path: the adapter folder.
        config: ``adapter_config.json``.
        modules: the adapted modules, by module name, in file order.
        replaced: tensors the adapter replaces whole, by the base model's tensor name:
            ``modules_to_save``, trained biases, and base layers peft saves with the adapter
            (embeddings it adapts); the LoRA changes apply on top of them.
    """

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    replaced: dict[str, Tensor] = field(default_factory=dict)

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
        ranks = sorted({m.rank for m in self.modules.values()})
        return {
            "path": str(self.path),
            "peft_type": "LORA",
            "base": self.base_name,
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "rslora": bool(self.config.get("use_rslora")),
            "target_modules": sorted({m.name.rsplit(".", 1)[-1] for m in self.modules.values()}),
            "modules": len(self.modules),
            "replaced_tensors": sorted(replaced),
            **({"unchanged_copies": sorted(unchanged)} if unchanged else {}),
            "parameters": sum(m.a.numel() + m.b.numel() for m in self.modules.values())
            + sum(t.numel() for t in replaced.values()),
        }

    def check_fits(self, spec: ModelSpec, shapes: Mapping[str, Sequence[int]]) -> None:
        """Raise unless every tensor the adapter changes is one of ``shapes`` (the base's tensor
        names and shapes, checkpoint layout) with the same shape.

        Raises:
            CheckpointError: the adapter was made for another model, or changes the input
                embedding or the output layer of a base that ties them.
        """
        if (tied := tied_change(spec, [*self.replaced, *self.changed_weights])) and not self._kept_tied(spec):
            raise CheckpointError(
                f"the adapter at {self.path} changes {tied[0]}, which this base ties to its {tied[1]}, and not the "
                "other the same way: peft trained that side only (the other kept the base's weights; "
                "ensure_weight_tying=True ties modules_to_save where peft finds the tie), so the model it trained no "
                "longer ties them, "
                "and a merge into the one tied tensor (as peft's merge_and_unload does with LoRA factors) computes "
                "another model. Untie a copy of the base (tie_word_embeddings=False, its output layer a copy of the "
                "embedding), merge the adapter into that copy with peft, and diagnose the two: see "
                "docs/guide/lora-and-trainer.md, 'Adapters on tied embeddings'"
            )
        transposed = _input_first_modules(spec)
        changed = {name: tuple(t.shape) for name, t in self.replacing(spec).items()}
        changed |= {m.weight_name: m.delta_shape(m.name in transposed) for m in self.modules.values()}
        for name, shape in changed.items():
            if name not in shapes:
                hint = closest_matches(name, shapes)
                raise CheckpointError(
                    f"the adapter at {self.path} changes {name}, which the base model does not have"
                    + (f" (closest: {hint})" if hint else "")
                    + f"; it was made for another model (its config names {self.base_name!r} as base)"
                )
            if tuple(shapes[name]) != shape:
                raise CheckpointError(
                    f"the adapter at {self.path} changes {name} with shape {list(shape)}, but the base's "
                    f"{name} has shape {list(shapes[name])}; it was made for another model "
                    f"(its config names {self.base_name!r} as base)"
                )

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
        return (both and embed not in self.changed_weights and unembed not in self.changed_weights
                and torch.equal(self.replaced[embed], self.replaced[unembed]))  # fmt: skip

    def deltas(self, spec: ModelSpec, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """``ΔW`` (float32) for each weight the adapter changes, by the spec's checkpoint names;
        with ``names``, only for those weights (the rest is not formed). Replaced tensors are
        not included: their change depends on the base (see :meth:`merge_into`)."""
        transposed = _input_first_modules(spec)
        wanted = None if names is None else set(names)
        out = {}
        for module in self.modules.values():
            if wanted is None or module.weight_name in wanted:
                out[module.weight_name] = module.delta(transpose=module.name in transposed)
        return out

    @property
    def changed_weights(self) -> list[str]:
        """The names of the weights the adapter's LoRA factors change."""
        return [m.weight_name for m in self.modules.values()]

    def merge_into(self, model: CapModel) -> None:
        """Add every ``ΔW`` to ``model``'s weights and put in the tensors the adapter replaces, in
        place, through :meth:`~capwrap.models.CapModel.weights` — the tensors the model computes
        with, on any backend and any placement (a model accelerate dispatched included) — each
        weight keeping its dtype and device.

        Raises:
            CheckpointError: the adapter changes a tensor the base does not have, or one of
                another shape (it was made for another model), or one capwrap does not map onto
                its weights.
        """
        spec = model.spec
        self.check_fits(spec, checkpoint_shapes(spec))
        weights = model.weights()
        with torch.no_grad():
            for name, value in _canonical_parts(spec, self.replacing(spec), self.path).items():  # replaced tensors first
                weights[name].copy_(value)
            deltas = _canonical_parts(spec, self.deltas(spec), self.path)
            for name in one_name_per_tensor(deltas):  # a tied embedding: one tensor under two names, changed once
                delta, target = deltas[name], weights[name]
                target.copy_((target.float() + delta.to(target.device)).to(target.dtype))


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
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        path: the adapter folder, as ``PeftModel.save_pretrained`` writes it.
        allow_pickle: also accept ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: the folder is missing or has no adapter, its files are corrupt, its
            weights are only a pickle (without ``allow_pickle``), or its kind is not plain LoRA
            (DoRA, LoHa, IA3 ...: merge those with peft's ``merge_and_unload`` and load the result).
    """
    folder = Path(path).expanduser()
    config_file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist; check the path")
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder")
    config = _adapter_config(folder)
    _check_supported(folder, config)
    tensors = _read_tensors(folder, allow_pickle)
    check_finite_weights(tensors, f"the adapter {folder}", CheckpointError)
    modules, replaced = _parse(folder, config, tensors)
    return LoraAdapter(folder, config, modules, replaced)


def adapter_hint(folder: str | os.PathLike) -> str:
    """What to say when an adapter folder is passed where a full checkpoint was expected."""
    folder = Path(folder)
    try:
        config = _adapter_config(folder)
    except CheckpointError:  # the hint is that it is an adapter; what is wrong with it is said on loading
        config = {}
    base = config.get("base_model_name_or_path")
    kind = config.get("peft_type", "PEFT")
    what = f"{kind} r={config['r']}" if "r" in config else kind
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
    if kind != "LORA":
        raise CheckpointError(
            f"{folder} is a {kind} adapter; capwrap reads LoRA adapters. Merge it into its base with peft "
            "(PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)) and load the result"
        )
    used, unmergeable = unsupported_lora_options(config)
    if unmergeable:
        raise CheckpointError(
            f"{folder} is a LoRA adapter with {', '.join(unmergeable)}: no one weight change stands for it, so "
            "capwrap cannot compare it with its base (peft does not merge it either)"
        )
    if used:
        raise CheckpointError(
            f"{folder} is a LoRA adapter with {', '.join(used)}, whose weight change is not scaling·B·A; "
            "merge it with peft (PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)) "
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
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        for suffix, (kind, role) in _FACTORS.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                factors.setdefault(module, {})[role] = tensor
                kinds[module] = kind
                break
        else:
            if ".lora_" in name:
                raise CheckpointError(
                    f"{folder} holds {key}, a LoRA tensor capwrap does not know; merge the adapter with peft "
                    "(merge_and_unload) and load the merged model"
                )
            replaced[name.replace(".base_layer.", ".")] = tensor  # trained biases, modules_to_save
    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"a", "b"}:
            raise CheckpointError(f"{folder} has only one of the two LoRA factors of {module}; the adapter is corrupt")
        a, b = pair["a"], pair["b"]
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{folder}: the LoRA factors of {module} disagree in rank ({list(a.shape)} vs {list(b.shape)}); "
                "the adapter is corrupt"
            )
        modules[module] = LoraModule(module, kinds[module], a, b, _scaling(config, module, int(a.shape[0])))  # type: ignore[arg-type]
    if not modules and not replaced:
        raise CheckpointError(f"{folder}'s adapter weights hold no tensors")
    return modules, replaced


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


@functools.lru_cache(maxsize=16)
def _input_first_modules(spec: ModelSpec) -> frozenset[str]:
    """Modules of the spec's Hugging Face model that store weights ``[in, out]`` (GPT-2's ``Conv1D``)."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    if not spec.has_hf_equivalent:
        raise ConfigError(f"{spec.architecture} models have no Hugging Face layers, so LoRA adapters do not apply")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(spec.to_hf_config())
    return frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))
