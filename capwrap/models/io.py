"""Saving and loading checkpoints: capwrap folders, local Hugging Face folders, hub names.

A capwrap checkpoint *is* a Hugging Face folder (``config.json`` + ``model.safetensors``, loadable
with ``transformers.AutoModelForCausalLM``) plus ``capwrap.json`` (spec and metadata). Loading is
safe by default: safetensors only; a pickle checkpoint (``pytorch_model.bin``) is refused unless
``allow_pickle=True``, and even then read with ``torch.load(weights_only=True)``; remote code runs
only with ``trust_remote_code=True``.

Examples:
    >>> import tempfile, torch
    >>> from capwrap.models import ModelSpec, build_model, load_model, save_model
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2), seed=1)
    >>> folder = tempfile.mkdtemp() + "/ckpt"
    >>> _ = save_model(model, folder, metadata={"note": "example"})
    >>> again = load_model(folder)
    >>> torch.equal(again.weights()["blocks.0.attn.W_Q"], model.weights()["blocks.0.attn.W_Q"])
    True
    >>> again.metadata["note"]
    'example'
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from capwrap.checks import check_finite_weights
from capwrap.errors import CheckpointError, ConfigError
from capwrap.files import umask
from capwrap.models.adapters import (
    ADAPTER_CONFIG,
    LoraAdapter,
    adapter_base,
    adapter_hint,
    check_adapter_base,
    check_adapter_folder,
    is_adapter_folder,
    read_adapter,
)
from capwrap.models.dispatch import load_dispatched
from capwrap.models.layouts import checkpoint_shapes
from capwrap.models.model import PROVENANCE_KEYS, CapModel, resolve_backend, resolve_dtype
from capwrap.models.spec import ModelSpec
from capwrap.models.tensor_files import read_pickle_tensors, read_safetensors
from capwrap.models.vocabulary import check_vocabulary_cut, cut_state, token_axes, vocabulary_cut

__all__ = ["save_model", "load_model", "source_spec", "source_tokenizer", "normalize_state", "stored_keys", "CAPWRAP_FILE"]

CAPWRAP_FILE = "capwrap.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def save_model(
    model: CapModel, path: str | os.PathLike, metadata: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` to the folder ``path`` atomically (a temporary folder, then a rename).

    Args:
        model: the model to save.
        path: destination folder; it must not exist unless ``overwrite=True``.
        metadata: JSON-serializable information stored in ``capwrap.json`` (merged over
            ``model.metadata``).
        overwrite: replace an existing folder.

    Returns:
        The folder's path.

    Raises:
        CheckpointError: ``path`` exists and ``overwrite`` is false.
        ConfigError: ``metadata`` is not JSON-serializable.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it or choose another folder")
    # where the model was loaded from, or copied from, is not where this folder comes from
    meta = {k: v for k, v in model.metadata.items() if k not in PROVENANCE_KEYS}
    if "adapter" in model.metadata:  # merged into these weights now: not an adapter to apply on loading them
        meta["merged_adapter"] = model.metadata["adapter"]
    if "vocabulary" in model.metadata:  # these weights have the kept rows only: nothing to leave out on loading them
        meta["loaded_on_vocabulary"] = model.metadata["vocabulary"]
    meta |= metadata or {}
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise ConfigError(f"checkpoint metadata must be JSON-serializable: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~umask())
    try:
        state = model.checkpoint_state()
        if model.spec.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.spec.has_hf_equivalent:
            model.spec.to_hf_config().to_json_file(str(tmp / "config.json"))
        from capwrap import __version__

        (tmp / CAPWRAP_FILE).write_text(
            json.dumps({"capwrap_version": __version__, "spec": model.spec.to_dict(), "metadata": meta}, indent=2)
        )
        if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.metadata = meta
    return path


def load_model(
    source: str | os.PathLike,
    backend: str | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    d_vocab: int | None = None,
) -> CapModel:
    """Load a capwrap checkpoint, a local Hugging Face folder, or a hub name (``gpt2``,
    ``roneneldan/TinyStories-1M`` ...) into a :class:`CapModel`, optionally with a PEFT LoRA
    adapter merged in.

    Args:
        source: a folder, or a Hugging Face hub name (needs network access to the hub). A PEFT
            adapter folder alone loads merged into the base its ``adapter_config.json`` names.
        backend: ``"hooked"`` or ``"bridge"``; default: :func:`~capwrap.models.default_backend` (the
            bridge where only it can run the checkpoint).
        device: where to put the model (default CPU).
        allow_pickle: also accept ``pytorch_model.bin`` (read with ``weights_only=True``).
        trust_remote_code: let ``transformers`` run the checkpoint's own Python code.
        revision: hub revision (branch, tag or commit) for hub names.
        adapter: a PEFT adapter folder (LoRA, DoRA, IA3, trainable tokens) (``adapter_config.json`` + ``adapter_model.safetensors``)
            to merge into ``source`` (see :mod:`capwrap.models.adapters`); ``allow_pickle`` also
            admits ``adapter_model.bin``.
        dtype: the weights' dtype (``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a
            ``torch.dtype``). Train bfloat16 models with ``train(..., dtype="bfloat16")`` on float32
            weights instead: small updates vanish in bfloat16 weights.
        device_map: spread a model larger than one device with accelerate (``"auto"``, ``"cpu"``,
            or accelerate's ``{module: device}``); see :mod:`capwrap.models.dispatch`.
        max_memory: with ``device_map``, how much each device may hold (``{0: "20GiB", "cpu": "60GiB"}``).
        offload_folder: with ``device_map``, where accelerate puts what does not fit (disk offload).
        d_vocab: keep only the first ``d_vocab`` tokens' rows of the embedding and unembedding: a
            fine-tune that added tokens, loaded on its base's vocabulary to be compared with it
            (``load_model(TUNED, d_vocab=base.spec.d_vocab)``; see :mod:`capwrap.models.vocabulary`).

    Returns:
        The model, with ``metadata`` from ``capwrap.json`` (and ``source``; ``adapter``: what
        the merged adapter is; ``vocabulary``: what ``d_vocab`` left out) and its tokenizer if any.

    Raises:
        CheckpointError: the folder is missing or not a checkpoint, its weights are corrupt or only
            in pickle format (without ``allow_pickle``), or the hub cannot be reached.
        ConfigError: the architecture is not one capwrap maps onto TransformerLens components.
    """
    named_by: str | os.PathLike | None = None  # the adapter folder whose config names ``source``
    if adapter is None and is_adapter_folder(source):
        named_by = adapter = source
        source = adapter_base(source)
    elif adapter is not None:
        check_adapter_base(check_adapter_folder(adapter), source)
    try:
        folder = _resolve_source(source, revision, allow_pickle)
    except CheckpointError as exc:
        if named_by is None:
            raise
        raise CheckpointError(
            f"the base {str(source)!r} that {Path(named_by) / ADAPTER_CONFIG} names (base_model_name_or_path) "
            f"cannot be loaded: {exc}. Pass the base yourself: load_model(BASE, adapter={str(named_by)!r}), or "
            f"`capwrap diagnose BASE {named_by} ...`"
        ) from exc
    capwrap_doc = _read_capwrap_file(folder)
    stored_spec = read_spec(folder, capwrap_doc, trust_remote_code)
    tokenizer = read_tokenizer(folder)
    metadata: dict[str, Any] = dict((capwrap_doc or {}).get("metadata", {}))
    metadata["source"] = str(source)  # this folder (not a source its capwrap.json may have kept)
    dtype = resolve_dtype(dtype)
    check_placement(device, device_map, max_memory, offload_folder)
    lora = None
    trained_spec = stored_spec  # the model the checkpoint, with its adapter, is
    if adapter is not None:  # read and checked before the base loads
        lora = read_adapter(adapter, allow_pickle)
        trained_spec = lora.trained_spec(stored_spec)  # a base grown by added tokens for the fine-tune
        if trained_spec is not stored_spec and (own := read_tokenizer(Path(adapter))) is not None:
            tokenizer = own  # the grown model's tokens are the adapter's tokenizer's
            metadata["tokenizer_source"] = str(adapter)
    spec = trained_spec
    if d_vocab is not None and d_vocab != trained_spec.d_vocab:
        check_vocabulary_cut(trained_spec, d_vocab, str(adapter or folder))
        spec = trained_spec.with_vocabulary(d_vocab)
        metadata["vocabulary"] = vocabulary_cut(trained_spec.d_vocab, d_vocab, tokenizer).to_dict()
    if lora is not None:
        if d_vocab is not None:  # (trained rows of tokens beyond d_vocab left out, whatever the base's size)
            lora = lora.cut_tokens(trained_spec, spec.d_vocab)
        lora.check_fits(spec, checkpoint_shapes(spec))
    if device_map is not None and (backend or "bridge") != "bridge":
        raise ConfigError("device_map loads through transformers and the TransformerBridge: use backend='bridge'")
    backend = resolve_backend(backend, spec)
    try:
        if device_map is not None:
            if spec.d_vocab > stored_spec.d_vocab:
                raise ConfigError(
                    f"the adapter {adapter} was trained on its base grown to {trained_spec.d_vocab} tokens, which "
                    f"device_map does not load (transformers loads the base's {stored_spec.d_vocab}): load it on the "
                    f"base's tokens (d_vocab={stored_spec.d_vocab}), or without device_map"
                )
            model: CapModel = load_dispatched(
                folder, stored_spec, device_map, max_memory, offload_folder, dtype, tokenizer, metadata, allow_pickle,
                d_vocab=spec.d_vocab,
            )
        else:
            state = normalize_state(stored_spec, _read_weights(folder, allow_pickle))
            check_finite_weights(state, f"the checkpoint {folder}", CheckpointError)
            if spec.d_vocab < stored_spec.d_vocab:
                state = cut_state(stored_spec, state, spec.d_vocab)
            elif spec.d_vocab > stored_spec.d_vocab:  # the added tokens' rows are the adapter's alone
                state = _grown_state(state, lora, spec, stored_spec.d_vocab)  # type: ignore[arg-type]
            model = CapModel.from_state(spec, state, backend, tokenizer, metadata, dtype)
    except ConfigError as exc:  # the weights do not fit the config: say which checkpoint
        if str(folder) in str(exc):
            raise
        raise type(exc)(f"the checkpoint {folder}: {exc}") from exc
    if lora is not None:  # into the weights the model computes with, wherever accelerate put them
        lora.merge_into(model)
        model.metadata["adapter"] = lora.describe()
    return model.to(device) if device is not None else model


def _grown_state(
    state: dict[str, torch.Tensor], lora: LoraAdapter, spec: ModelSpec, base_vocabulary: int
) -> dict[str, torch.Tensor]:
    """A base's state for a model of ``spec``, its vocabulary grown by the tokens a fine-tune added:
    each per-token tensor is the one the adapter holds whole (peft saves a grown base's embedding layers
    with the adapter), since the base has no rows for the added tokens.

    Raises:
        CheckpointError: the adapter does not hold a per-token tensor whole.
    """
    replacing, per_token = lora.replacing(spec), token_axes(spec)
    missing = [name for name in per_token if name not in replacing]
    if missing:
        raise CheckpointError(
            f"the adapter at {lora.path} was trained on its base grown to {spec.d_vocab} tokens, but holds no whole "
            f"{missing[0]} (peft saves every grown embedding layer when save_embedding_layers is left 'auto' and it "
            "finds the base's vocabulary grown, and otherwise only those it adapts), so the "
            f"added tokens' rows are unknown. Load it on the base's tokens: load_model(BASE, adapter=ADAPTER, "
            f"d_vocab={base_vocabulary}) (`capwrap diagnose` does so)"
        )
    return {**state, **{name: replacing[name] for name in per_token}}


def check_placement(
    device: Any, device_map: Any, max_memory: Any = None, offload_folder: str | os.PathLike | None = None
) -> None:
    """Raise a clear error for placement options that do not go together (:func:`load_model`'s)."""
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ConfigError("max_memory and offload_folder go with device_map (e.g. device_map='auto')")
    if device_map is not None and device is not None:
        raise ConfigError("give device or device_map, not both: with device_map accelerate places the models' parts")
    if max_memory is not None and not isinstance(max_memory, dict):
        raise ConfigError(
            f"max_memory must be a dict of device to size, e.g. {{0: '20GiB', 'cpu': '60GiB'}}, got {max_memory!r} "
            "(the form '0=20GiB,cpu=60GiB' is capwrap diagnose's --max-memory)"
        )
    places = list((max_memory or {}).keys()) + (list(device_map.values()) if isinstance(device_map, dict) else [device_map])
    gpus = [p for p in places if p is not None and _is_gpu(p)]
    if gpus and not torch.cuda.is_available():
        raise ConfigError(
            f"the placement names a GPU ({gpus[0]!r}) but this machine has no CUDA GPU (or torch was built without "
            "CUDA); place the models on 'cpu' and 'disk' (e.g. --max-memory cpu=8GiB), or run on a GPU machine"
        )


def _is_gpu(place: Any) -> bool:
    """Whether an accelerate placement (a device index, ``"cuda:1"``, ``"cpu"``, ``"disk"``, ``"auto"``) is a GPU."""
    if isinstance(place, int) or (isinstance(place, str) and place.isdigit()):
        return True
    return isinstance(place, (str, torch.device)) and str(place).split(":")[0] in ("cuda", "xpu", "mps", "npu")


def read_spec(folder: Path, capwrap_doc: dict[str, Any] | None, trust_remote_code: bool = False) -> ModelSpec:
    """The spec of a checkpoint folder from its config files alone: ``config.json`` (Hugging Face),
    or, for architectures without a Hugging Face equivalent (tracr), ``capwrap.json``'s spec
    (``capwrap_doc``, as :func:`_read_capwrap_file` returns it)."""
    if (folder / "config.json").exists() or capwrap_doc is None:
        config = _read_hf_config(folder, trust_remote_code)
        try:
            return ModelSpec.from_hf_config(config)
        except ConfigError as exc:
            raise ConfigError(f"{folder / 'config.json'}: {exc}") from None
    return ModelSpec.from_dict(capwrap_doc["spec"])


def source_spec(
    source: str | os.PathLike, allow_pickle: bool = False, revision: str | None = None, trust_remote_code: bool = False
) -> ModelSpec:
    """The spec of what :func:`load_model` loads from ``source`` (a folder, or a hub name, fetched
    first), read from its config files alone: what a caller decides before the weights load."""
    folder = _resolve_source(source, revision, allow_pickle)
    return read_spec(folder, _read_capwrap_file(folder), trust_remote_code)


def source_tokenizer(source: str | os.PathLike, allow_pickle: bool = False, revision: str | None = None) -> Any:
    """The tokenizer :func:`load_model` gives the model of ``source`` (a folder, or a hub name, fetched
    first), or ``None``: what a caller decides before the weights load."""
    return read_tokenizer(_resolve_source(source, revision, allow_pickle))


def _read_capwrap_file(folder: Path) -> dict[str, Any] | None:
    meta_file = folder / CAPWRAP_FILE
    if not meta_file.exists():
        return None
    try:
        doc = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(doc, dict) or "spec" not in doc:
        raise CheckpointError(f"{meta_file} has no model spec; the checkpoint is corrupt")
    return doc


def _resolve_source(source: str | os.PathLike, revision: str | None, allow_pickle: bool = False) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint's folder (with config.json) instead")
        return path
    text = str(source)
    # hub names are "owner/name"; "runs/tuned" is a folder when "runs" is one here
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or path.parent.name and path.parent.is_dir()
    if looks_local or not _is_hub_name(text):
        raise CheckpointError(f"checkpoint folder {text} does not exist; check the path")
    return _download_from_hub(text, revision, allow_pickle)


def _is_hub_name(text: str) -> bool:
    """Whether ``text`` has the form of a hub repository name (``owner/name``: letters, digits, ``-``,
    ``_``, ``.``), so that a missing folder such as ``no where`` is said to be missing rather than
    sent to the hub (which answered with its own validation error)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _download_from_hub(name: str, revision: str | None, allow_pickle: bool = False) -> Path:
    """Fetch a hub checkpoint's config, safetensors and tokenizer files into the HF cache; with
    ``allow_pickle``, its ``pytorch_model*.bin`` files too when it has no safetensors (several
    TinyStories checkpoints are published that way)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError("loading hub names needs the huggingface_hub package") from exc
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
        if allow_pickle and not any(folder.glob("*.safetensors")):
            snapshot_download(name, revision=revision, allow_patterns=["pytorch_model*.bin"])
        return folder
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"no model named {name!r} on the Hugging Face hub, and no local folder of that name"
        ) from exc
    except RevisionNotFoundError as exc:  # (an OSError: before the offline case)
        raise CheckpointError(
            f"the Hugging Face hub has {name!r} but no revision {revision!r} of it (a branch, tag or commit); "
            "check the revision, or leave it out for the main branch"
        ) from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        raise CheckpointError(
            f"no local folder {name!r} exists (check the path), and the Hugging Face hub cannot be reached to "
            f"download a model of that name (offline?). If it is a hub name: on a machine with access run "
            f"`hf download {name} --local-dir DIR` (huggingface_hub's command line), copy DIR here, and pass its "
            "path instead of the hub name"
        ) from exc


def _read_hf_config(folder: Path, trust_remote_code: bool) -> Any:
    """The folder's ``transformers`` config; every way of failing is a :class:`CheckpointError`
    that names the file and the fix (never ``transformers``' own exception)."""
    import transformers

    if is_adapter_folder(folder):
        raise CheckpointError(adapter_hint(folder))
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json, so it is not a Hugging Face or capwrap checkpoint folder")
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc}); check the file's permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the file is corrupt or truncated: re-download the checkpoint, "
            "or write config.json again with transformers (config.save_pretrained)"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
        raise CheckpointError(
            f"{path} has no model_type, so nothing can tell which architecture the weights belong to; "
            "it is not a transformers model config (write it with config.save_pretrained)"
        )
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, OSError, *_strict_config_errors()) as exc:
        from capwrap.models.families import FAMILIES

        known = ", ".join(sorted(f.model_type for f in FAMILIES.values() if f.hf_class))
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = " ".join(lines[:2]).rstrip(".") if lines else type(exc).__name__
        raise CheckpointError(
            f"transformers cannot read {path} (model type {doc['model_type']!r}): {detail}. capwrap's families "
            f"have the model types {known}; a checkpoint that needs its own code loads with trust_remote_code=True "
            "(this runs code from the checkpoint), and a config edited by hand may hold a wrong value"
        ) from None


def _strict_config_errors() -> tuple[type[Exception], ...]:
    """The exception newer ``huggingface_hub`` raises when a config field has the wrong type
    (``transformers`` 5 validates its configs with it); none where it does not exist."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return ()
    return (StrictDataclassError,)


def _read_weights(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    files: list[Path] = []
    if single.exists():
        files = [single]
    elif index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"shard {f.name} listed in {index.name} is missing from {folder}")
            state.update(read_safetensors(f, fix="re-download or re-save it"))
        return state
    pickle = folder / "pytorch_model.bin"
    if pickle.exists():
        return read_pickle_tensors(pickle, allow_pickle, holds="weights", fix="convert it to model.safetensors")
    raise CheckpointError(f"{folder} has no weights: expected model.safetensors (or a sharded index)")


#: Tensors older checkpoints saved that are not weights: causal masks (GPT-2's ``attn.bias``,
#: GPT-Neo's ``attn.attention.bias``), their fill values, and rotary frequency tables.
_DERIVED_BUFFERS = (
    ".attn.bias",
    ".attn.masked_bias",
    ".attention.bias",
    ".attention.masked_bias",
    "rotary_emb.inv_freq",
)


def stored_keys(spec: ModelSpec, names: Iterable[str]) -> dict[str, str]:
    """For each tensor of the spec's checkpoint layout, the name a (possibly older) checkpoint
    stores it under: the same name, the name without the base model's prefix (the hub's ``gpt2``
    has ``h.0.attn...`` where ``GPT2LMHeadModel`` expects ``transformer.h.0.attn...``), or an older
    name ``transformers`` renames on loading (GPT-NeoX's ``embed_out``, now ``lm_head``). Tensors
    absent from ``names`` are left out.

    Examples:
        >>> spec = ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=8, n_heads=2)
        >>> stored_keys(spec, ["wte.weight", "h.0.attn.bias"])
        {'transformer.wte.weight': 'wte.weight'}
    """
    available = {n for n in names if not n.endswith(_DERIVED_BUFFERS)}
    renamed = {_current_name(spec, n): n for n in available}
    out = {}
    for name in checkpoint_shapes(spec):
        head, _, rest = name.partition(".")
        if name in available:
            out[name] = name
        elif name in renamed:
            out[name] = renamed[name]
        elif rest in available and head in ("transformer", "model"):
            out[name] = rest
    return out


def _current_name(spec: ModelSpec, name: str) -> str:
    """``name`` after the renames ``transformers`` applies to older checkpoints of the spec's class."""
    for pattern, target in _renames(spec.hf_class if spec.has_hf_equivalent else ""):
        name = pattern.sub(target, name)
    return name


@functools.cache
def _renames(hf_class: str) -> tuple[tuple[re.Pattern, str], ...]:
    """The plain tensor renames ``transformers`` (5.x) registers for a model class; none before 5.x."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return ()
    out = []
    for transform in get_checkpoint_conversion_mapping(hf_class) or []:
        if type(transform) is WeightRenaming and len(transform.source_patterns) == 1:
            source, target = transform._original_source_patterns[0], transform._original_target_patterns[0]
            out.append((re.compile(source), target))
    return tuple(out)


def normalize_state(spec: ModelSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A third-party state dict in the spec's checkpoint names (see :func:`stored_keys`), without
    the tensors that are not weights (attention masks and rotary tables that older checkpoints,
    such as the TinyStories models' ``pytorch_model.bin``, saved with them). Other unknown tensors
    stay, so that loading can name them.

    Examples:
        >>> import torch
        >>> spec = ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=8, n_heads=2)
        >>> state = {"wte.weight": torch.zeros(10, 8), "h.0.attn.bias": torch.ones(1, 1, 8, 8)}
        >>> sorted(normalize_state(spec, state))
        ['transformer.wte.weight']
    """
    keys = stored_keys(spec, state)
    used = set(keys.values())
    out = {k: v for k, v in state.items() if k not in used and not k.endswith(_DERIVED_BUFFERS)}
    return out | {name: state[key] for name, key in keys.items()}


def read_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder`` (``transformers.AutoTokenizer``), or ``None`` when it has no
    tokenizer files or they cannot be read (a warning says which)."""
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer should not block weight analyses
        import warnings

        from capwrap.errors import CapwrapWarning

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"the tokenizer files in {folder} cannot be read ({type(exc).__name__}: {first[:200]}); the model loads "
            "without a tokenizer, which weight analyses do not need but text tasks do. Copy the base model's "
            "tokenizer files (tokenizer.json, tokenizer_config.json, ...) into the folder to fix it",
            CapwrapWarning,
            stacklevel=2,
        )
        return None


def describe_model(model: CapModel) -> dict[str, Any]:
    """What ``capwrap info`` prints: spec, backend, parameter count, component counts, tokenizer.

    Examples:
        >>> from capwrap.models import ModelSpec, build_model
        >>> info = describe_model(build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=16, n_heads=2)))
        >>> info["components"]["head"], info["components"]["neuron"]
        (4, 128)
    """
    from capwrap.models.functional import Functional

    tok = model.tokenizer
    spec = model.spec
    family = spec.family
    not_fast = Functional.unsupported(spec)
    # capwrap describes a family's blocks; others compute what the bridge's adapter runs, unknown to capwrap
    blocks = (
        spec.features.describe()  # type: ignore[union-attr]
        if family
        else f"as TransformerLens's {spec.architecture} adapter computes them (capwrap has no description of this family's blocks)"
    )
    return {
        "spec": spec.to_dict(),
        "family": family.title if family else "no capwrap family: TransformerLens's adapter",
        "blocks": blocks,
        "patching_engine": "hooks" if not_fast else "resumed",
        "not_in_fast_engine": not_fast,
        "backend": model.backend,
        "parameters": count_parameters(model),
        "components": model.components.counts(),
        "tokenizer": None if tok is None else f"{type(tok).__name__} ({len(tok)} tokens)",
        "source": model.metadata.get("source"),
        **({"adapter": model.metadata["adapter"]} if "adapter" in model.metadata else {}),
    }


def count_parameters(model: CapModel) -> int:
    """Distinct trainable numbers (tied embeddings and fused q/k/v storage counted once)."""
    storages = {
        w.untyped_storage().data_ptr(): w.untyped_storage().nbytes() // w.element_size()
        for w in model.weights().values()
    }
    return int(sum(storages.values()))
