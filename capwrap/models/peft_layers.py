"""The adapters of a live peft layer, read as capwrap's adapter modules, and the layer's merged tensors.

A model being trained with peft computes with each adapted layer's base tensors and the adapter's
tensors as they are now. :func:`adapter_modules` reads one peft layer's active adapters (LoRA,
DoRA, IA3) as the :class:`~capwrap.models.adapters.LoraModule` / :class:`~capwrap.models.adapters.IA3Module`
records an adapter folder is read into, sharing the live tensors (no copy), and
:func:`merged_tensors` forms the layer's weight (and the bias an IA3 output scaling changes) as
peft's ``merge`` would now — each active adapter merged in turn, in peft's order (DoRA's norms taken
on the weight before any adapter, as peft's forward pass takes them), by the code that
merges an adapter read from disk (:meth:`LoraModule.merged`, :meth:`IA3Module.merged`). A wrapped
live model (:func:`~capwrap.models.wrap_hf_model`) and :class:`~capwrap.methods.LoRA` both compute
their merged weights here.

Examples:
    >>> import peft, torch, transformers
    >>> config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    >>> hf = transformers.GPT2LMHeadModel(config)
    >>> live = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True,
    ...                                                 init_lora_weights=False))
    >>> name, layer = next((n, m) for n, m in live.get_base_model().named_modules() if is_peft_layer(m))
    >>> [(m.method, m.rank) for m in adapter_modules(name, layer)]
    [('dora', 2)]
    >>> merged = merged_tensors(name, layer)[f"{name}.weight"]
    >>> reference = live.merge_and_unload().transformer.h[0].attn.c_attn.weight
    >>> torch.equal(merged, reference)
    True
"""

from __future__ import annotations

from torch import Tensor, nn

from capwrap.models.adapters import AdapterModule, IA3Module, LoraModule

__all__ = [
    "adapter_modules",
    "changed_tensors",
    "computing_copy",
    "is_modules_to_save",
    "is_peft_layer",
    "merged_tensors",
]


def _layer_types() -> tuple[type, ...]:
    try:
        from peft.tuners.ia3 import IA3Layer
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft, no adapted layers
        return ()
    return LoraLayer, IA3Layer


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer peft adapted with LoRA (DoRA included) or IA3."""
    types = _layer_types()
    return bool(types) and isinstance(module, types)


def is_modules_to_save(module: nn.Module) -> bool:
    """Whether ``module`` is peft's wrapper of a module trained whole (``modules_to_save``): it keeps
    the original and a trained copy per adapter, and computes with the active adapter's copy (the
    original while adapters are disabled)."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return False
    return isinstance(module, ModulesToSaveWrapper)


def computing_copy(wrapper: nn.Module) -> nn.Module:
    """The module a ``modules_to_save`` wrapper computes with now, chosen as its forward pass
    chooses: the original while adapters are disabled or an active adapter has no copy of it (the
    wrapper's attributes then fail: peft resolves them otherwise), else the first active adapter's copy."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _is_ia3(layer: nn.Module) -> bool:
    return hasattr(layer, "ia3_l")


def changed_tensors(layer: nn.Module) -> tuple[str, ...]:
    """The tensors of the layer's base that merging its adapters changes: ``("weight",)``, and
    ``"bias"`` where IA3 scales the outputs of a layer with a bias."""
    scales_bias = _is_ia3(layer) and not layer.is_feedforward and layer.get_base_layer().bias is not None
    return ("weight", "bias") if scales_bias else ("weight",)


def adapter_modules(name: str, layer: nn.Module) -> list[AdapterModule]:
    """The adapters ``layer`` (a peft layer, at ``name`` in the Hugging Face model) applies now, in
    the order peft merges them, as adapter modules over the live tensors; none while its adapters
    are merged into the base already or disabled."""
    if layer.merged or layer.disable_adapters:
        return []
    modules: list[AdapterModule] = []
    for adapter in layer.active_adapters:
        if _is_ia3(layer):
            if adapter in layer.ia3_l:
                modules.append(IA3Module(name, layer.ia3_l[adapter], bool(layer.is_feedforward)))
            continue
        magnitudes = getattr(layer, "lora_magnitude_vector", {})
        magnitude = magnitudes[adapter].weight if adapter in magnitudes else None
        if adapter in layer.lora_A:
            a, b, kind = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, "linear"
        elif adapter in getattr(layer, "lora_embedding_A", {}):
            a, b, kind = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], "embedding"
        else:
            continue
        modules.append(LoraModule(name, kind, a, b, float(layer.scaling[adapter]), magnitude))
    return modules


def merged_tensors(name: str, layer: nn.Module) -> dict[str, Tensor]:
    """``{checkpoint name: tensor}`` of :func:`changed_tensors`: the base's, with the layer's active
    adapters merged in turn as peft merges them (each in the base tensor's dtype, on its device).
    Called without gradients (``torch.no_grad()``) to form weights to record or write."""
    base = layer.get_base_layer()
    unmerged = {f"{name}.{leaf}": getattr(base, leaf).detach() for leaf in changed_tensors(layer)}
    transpose = bool(getattr(layer, "fan_in_fan_out", False))  # GPT-2's Conv1D
    tensors = dict(unmerged)
    for module in adapter_modules(name, layer):  # (DoRA takes its norms on the unmerged weight, as peft's forward does)
        tensors.update(module.merged(transpose, tensors, unmerged))
    return tensors
