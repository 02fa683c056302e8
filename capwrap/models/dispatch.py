"""Models larger than one device: loaded by accelerate across GPUs, CPU and disk, run through the bridge.

``load_model(..., device_map="auto", max_memory={...})`` hands the checkpoint to ``transformers``'
``from_pretrained`` with accelerate's device map — the existing engine: it places whole blocks on
the GPUs, then the CPU, then offloads the rest to disk, and moves activations (and offloaded
weights) where they are needed during the forward pass. capwrap wraps the dispatched model in a
TransformerBridge, so forward passes, hooks and :meth:`~capwrap.models.CapModel.capture` work as
on any model.

Weights accelerate offloaded sit outside the model (on the ``meta`` device in it): its hooks load
each offloaded module's tensors from an *offload map* (CPU tensors, or files on disk) before the
module runs. The first call of :meth:`~DispatchedModel.weights` reads the offloaded tensors into
CPU memory, once, and puts them in front of the maps (in front of every map that loads one, under
any of its names: a tied embedding is one tensor). From then on the model computes with exactly
those tensors, so reading and editing the weights (pruning, grafting, a residency's turns) works as
on any model. The CPU must have room for the offloaded part then (a residency writes it to a file
of its own while the model waits its turn, as for any model); analyzers that only read activations
never ask for it. Training is refused: the offloaded modules' parameters exist only while each one
runs, so an optimizer has nothing to hold.
A dispatched model is not copied (:attr:`~DispatchedModel.copyable`): :func:`capwrap.diagnose`
lets a pair with one take turns in memory (``memory="low"``) instead.

Examples:
    >>> import tempfile, torch
    >>> from capwrap.models import ModelSpec, build_model, load_model, save_model
    >>> spec = ModelSpec(d_vocab=32, n_ctx=16, n_layers=4, d_model=16, n_heads=2, architecture="llama")
    >>> folder = tempfile.mkdtemp() + "/model"
    >>> _ = save_model(build_model(spec, seed=0), folder)
    >>> model = load_model(folder, device_map="auto", max_memory={"cpu": "30KB"}, offload_folder=tempfile.mkdtemp())
    >>> model.offloaded[:2]
    ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight']
    >>> tokens = torch.randint(0, 32, (2, 8))
    >>> torch.allclose(model(tokens), load_model(folder)(tokens), atol=1e-5)
    True
    >>> with torch.no_grad():
    ...     _ = model.weights()["blocks.0.mlp.W_out"].zero_()  # an offloaded weight, edited in place
    >>> torch.allclose(model(tokens), load_model(folder)(tokens), atol=1e-5)
    False
"""

from __future__ import annotations

import os
from collections import ChainMap
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from capwrap.errors import CheckpointError, ConfigError
from capwrap.models.model import CapModel, _bridge_architecture, _build_bridge, bridge_storage, tl_version
from capwrap.models.spec import ModelSpec
from capwrap.models.vocabulary import cut_module, stored_token_axes

__all__ = ["DispatchedModel", "load_dispatched"]


def load_dispatched(
    folder: Path,
    spec: ModelSpec,
    device_map: str | dict[str, Any],
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    d_vocab: int | None = None,
) -> DispatchedModel:
    """Load ``folder`` with ``transformers`` and accelerate's ``device_map`` / ``max_memory`` and
    wrap it in a TransformerBridge (see the module docstring). ``d_vocab``: keep the first
    ``d_vocab`` tokens only (:func:`~capwrap.models.vocabulary.cut_module`).

    Raises:
        CheckpointError: the weights cannot be read (pickle-only without ``allow_pickle``, corrupt),
            or the map offloads to disk and no ``offload_folder`` was given.
    """
    import transformers

    if not spec.has_hf_equivalent:
        raise ConfigError(f"{spec.architecture} models have no Hugging Face form for accelerate to dispatch")
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder),
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=None if offload_folder is None else str(offload_folder),
            dtype=dtype or torch.float32,
            attn_implementation="eager",
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError) as exc:
        hint = " (pass offload_folder=DIR for what does not fit in max_memory)" if "offload" in str(exc) else ""
        raise CheckpointError(
            f"accelerate could not load {folder} with device_map={device_map!r}: {exc}{hint}"
        ) from exc
    hf.eval()
    if d_vocab is not None and d_vocab != spec.d_vocab:
        _cut_offloaded_rows(hf, spec, d_vocab, folder)
        cut_module(hf, spec, d_vocab)
        spec = spec.with_vocabulary(d_vocab)
    storage = dict(hf.named_parameters())  # before bridging renames the modules
    offloaded = [name for name, tensor in storage.items() if tensor.device.type == "meta"]
    sources = _offload_sources(hf, spec, storage, offloaded)
    try:
        bridge = _build_bridge(hf, _bridge_architecture(spec), hf_config=hf.config, tokenizer=tokenizer)
    except NotImplementedError as exc:
        if tl_version() >= (4, 0):
            raise
        # TransformerLens 3.9 cannot split a fused projection accelerate offloaded
        raise ConfigError(
            f"TransformerLens {'.'.join(map(str, tl_version()))} cannot wrap this model as accelerate placed it: {exc} "
            "Install transformer-lens>=4 (which splits it as it loads), or load it with a device_map that places "
            "every module on a device (no 'cpu' or 'disk' entries beside a GPU)"
        ) from None
    _offload_what_the_bridge_added(hf)
    # the bridge may have split an offloaded fused projection into resident copies, and computes with them
    storage, layout = bridge_storage(spec, bridge, storage)
    offloaded = [name for name in offloaded if name in storage]
    sources = {name: source for name, source in sources.items() if name in storage}
    meta = {**(metadata or {}), "device_map": {k: str(v) for k, v in getattr(hf, "hf_device_map", {}).items()}}
    return DispatchedModel(spec, bridge, storage, layout, tokenizer, meta, offloaded, sources)


def _offload_hooks(module: nn.Module) -> list[Any]:
    """accelerate's hooks attached to ``module`` itself (not found through a wrapper that forwards
    attributes to it) that load its weights from an offload map when it runs."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    pending, found = [vars(module).get("_hf_hook")], []
    while pending:
        hook = pending.pop()
        if isinstance(hook, SequentialHook):
            pending.extend(hook.hooks)
        elif isinstance(hook, AlignDevicesHook) and hook.offload and hook.weights_map is not None:
            found.append(hook)
    return found


def _offload_sources(
    hf: nn.Module, spec: ModelSpec, storage: dict[str, Tensor], offloaded: list[str]
) -> dict[str, list[tuple[Any, str]]]:
    """For each parameter of ``storage`` (named as in ``hf.named_parameters()``) that an accelerate
    hook loads from an offload map, every such hook and its key in that hook's map: a tied weight
    (the unembedding of a model that ties it to the embedding) is loaded by its own module's hook
    too, under the other name, so each of them must see the one tensor :meth:`DispatchedModel.weights`
    returns."""
    from accelerate.utils import named_module_tensors

    aliases = {}  # a name that holds the same weight -> its name in storage
    by_object = {id(t): name for name, t in storage.items()}
    for name, param in hf.named_parameters(remove_duplicate=False):
        if id(param) in by_object and name != by_object[id(param)]:
            aliases[name] = by_object[id(param)]
    names = spec.family.tensors if spec.family is not None else None
    if spec.tie_embeddings and names is not None:  # however accelerate kept the tie
        aliases[f"{names.unembed}.weight"] = f"{names.embed}.weight"
    sources: dict[str, list[tuple[Any, str]]] = {}
    for module_name, module in hf.named_modules():
        for hook in _offload_hooks(module):
            for key, _ in named_module_tensors(module, include_buffers=False, recurse=hook.place_submodules):
                name = f"{module_name}.{key}" if module_name else key
                name = aliases.get(name, name)
                if name in storage:
                    sources.setdefault(name, []).append((hook, key))
    missing = sorted(set(offloaded) - sources.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"accelerate offloaded {missing[0]}{more} without a hook that loads it, so capwrap cannot read it; "
            "load the model with a device_map that places every module on a device"
        )
    return sources


def _cut_offloaded_rows(hf: nn.Module, spec: ModelSpec, d_vocab: int, folder: Path) -> None:
    """Before :func:`~capwrap.models.vocabulary.cut_module` cuts an accelerate-placed model to its first
    ``d_vocab`` tokens: each offloaded per-token tensor (accelerate offloads the output layer first) read
    from its hook's offload map once, cut, and put in front of the map, so that the hook loads the cut
    tensor into the cut (``meta``) parameter before each forward pass.

    Raises:
        ConfigError: an offloaded per-token tensor no hook loads under a name its map holds.
    """
    from accelerate.utils import named_module_tensors

    axes = stored_token_axes(spec)
    covered: set[int] = set()
    for module_name, module in hf.named_modules():
        for hook in _offload_hooks(module):
            overlay = {}
            for key, tensor in named_module_tensors(module, include_buffers=False, recurse=hook.place_submodules):
                name = f"{module_name}.{key}" if module_name else key
                if name in axes and tensor.is_meta:
                    try:  # (read from disk once, cut, and kept)
                        overlay[key] = hook.weights_map[key].narrow(axes[name], 0, d_vocab).clone()
                    except KeyError:
                        continue
                    covered.add(id(tensor))
            if overlay:
                hook.weights_map = ChainMap(overlay, hook.weights_map)
    lost = [n for n, t in hf.named_parameters() if n in axes and t.is_meta and id(t) not in covered]
    if lost:
        raise ConfigError(
            f"{folder}'s {lost[0]} was offloaded where capwrap cannot cut it to its first {d_vocab} tokens; place it "
            f"on a device (a device_map that names it, or max_memory room for it)"
        )


def _offload_what_the_bridge_added(hf: nn.Module) -> None:
    """Give accelerate's offload hooks the tensors the bridge added to an offloaded module.

    TransformerLens 3.9's bridge gives a bias-free unembedding a zero ``bias`` parameter after
    accelerate dispatched the model; on an offloaded ``lm_head`` it is created on the meta device,
    and the hook, which loads every tensor of the module from its offload map before each forward
    pass, fails with ``KeyError: 'lm_head.bias'``. A tensor is added if the hook did not see it when
    it was attached (its ``original_devices``; asking the offload map instead would read every
    offloaded tensor from disk), and goes into the map: its value where it has one, zeros (what the
    bridge adds) where it is on the meta device. (TransformerLens 4.x registers its bias itself.)
    """
    from accelerate.utils import named_module_tensors

    for module in hf.modules():
        for hook in _offload_hooks(module):
            # the tensors the hook loads before each forward pass
            tensors = named_module_tensors(
                module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
            )
            added = {name: t for name, t in tensors if name not in hook.original_devices}
            if added:
                values = {
                    name: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t.detach().cpu()
                    for name, t in added.items()
                }
                hook.weights_map = ChainMap(values, hook.weights_map)
                hook.original_devices.update({name: t.device for name, t in added.items()})


class DispatchedModel(CapModel):
    """A :class:`CapModel` whose Hugging Face model accelerate spread over devices (see the module docstring).

    Attributes:
        offloaded: the checkpoint tensors accelerate keeps on CPU or disk outside the model (on the
            ``meta`` device in it); empty when everything sits on devices.
    """

    copyable: ClassVar[bool] = False

    def __init__(
        self,
        spec: ModelSpec,
        module: nn.Module,
        storage: dict[str, Tensor],
        layout: str,
        tokenizer: Any,
        metadata: dict[str, Any],
        offloaded: list[str],
        sources: dict[str, list[tuple[Any, str]]] | None = None,
    ):
        super().__init__(spec, "bridge", module, storage, layout, tokenizer, metadata)
        self.offloaded = offloaded
        self._sources = dict(sources or {})  # name -> [(accelerate hook, key in its map)]; emptied once read

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first device accelerate placed a part on (offloaded parts run
        there too), or the CPU."""
        placed = [d for d in self.metadata.get("device_map", {}).values() if d not in ("cpu", "disk")]
        if not placed:
            return torch.device("cpu")
        return torch.device(f"cuda:{placed[0]}" if placed[0].isdigit() else placed[0])

    @property
    def cannot_train(self) -> str | None:
        if not self.offloaded:
            return None
        return (
            f"accelerate offloaded {len(self.offloaded)} of this model's tensors ({self.offloaded[0]} ...) to CPU or "
            "disk, where an optimizer cannot hold them (they become parameters only while their module runs); "
            "load it with a max_memory that places every weight on a device, or without device_map"
        )

    @torch.inference_mode(False)  # ordinary tensors, even when first asked for inside inference mode
    @torch.no_grad()
    def _read_offloaded(self) -> None:
        """Read every offloaded tensor into CPU memory once, in the model's dtype, and put it in
        front of its hook's offload map, so that the model computes with the very tensors
        :meth:`weights` returns (module docstring)."""
        if not self._sources:
            return
        overlays: dict[int, tuple[Any, dict[str, Tensor]]] = {}
        for name, hooks in self._sources.items():
            value = self._storage[name]
            if value.is_meta:  # offloaded: read it from the first map that holds it
                hook, key = hooks[0]
                dtype, value = value.dtype, hook.weights_map[key].detach()
                shared = value.untyped_storage().nbytes() != value.numel() * value.element_size()
                if value.device.type != "cpu" or value.dtype != dtype or shared or not value.untyped_storage().resizable():
                    value = value.to("cpu", dtype, copy=True)  # memory of its own: a residency can free and refill it
                self._storage[name] = value
            for hook, key in hooks:  # (a tied weight: the other module's hook reads this one too)
                overlays.setdefault(id(hook), (hook, {}))[1][key] = value.detach()
        for hook, overlay in overlays.values():
            hook.weights_map = ChainMap(overlay, hook.weights_map)
        self._sources = {}

    def weights(self) -> dict[str, Tensor]:
        self._use()
        self._read_offloaded()
        return super().weights()

    def gradients(self) -> dict[str, Tensor]:
        if self.cannot_train:
            raise ConfigError(f"this model has no gradients to read: {self.cannot_train}")
        return super().gradients()

    def parameters(self) -> list[nn.Parameter]:
        if self.cannot_train:
            raise ConfigError(f"this model cannot be trained: {self.cannot_train}")
        return super().parameters()

    def to(self, device: str | torch.device) -> CapModel:
        if torch.device(device) != self.device:
            raise ConfigError(
                "accelerate placed this model's parts (model.metadata['device_map']); load it again with another "
                "device_map to move it"
            )
        return self
