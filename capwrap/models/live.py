"""Wrap a live Hugging Face model, one that is being trained elsewhere, as a :class:`CapModel`.

:func:`wrap_hf_model` gives a :class:`~capwrap.models.CapModel` over TransformerLens's
TransformerBridge that *shares* the live model's weights (no copy), so the recorder, the hooks and
the analyzers see the weights as they are now, while the live model is left exactly as it was:
the bridge is built around a second module tree (a shell, its parameters on the ``meta`` device
until they are replaced by the live model's own tensors), because TransformerLens rewires the model
it bridges (GPT-2's fused ``c_attn`` is read through split q/k/v views), which would change what an
optimizer holding the live parameters trains.

A model trained with a PEFT adapter (LoRA, DoRA or IA3) is seen merged: each adapted weight is
what peft's merge would make of it with the adapter as it is now (``W + scaling·B·A`` for LoRA;
:mod:`capwrap.models.peft_layers`), recomputed before each use, so the weight changes a
:class:`~capwrap.recording.Recorder` stores are the merged deltas.

Examples:
    >>> import torch, transformers
    >>> config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    >>> hf = transformers.GPT2LMHeadModel(config).eval()
    >>> model = wrap_hf_model(hf)
    >>> model.weights()["blocks.0.attn.W_Q"].untyped_storage().data_ptr() == hf.transformer.h[0].attn.c_attn.weight.untyped_storage().data_ptr()
    True
    >>> tokens = torch.randint(0, 40, (2, 8))
    >>> torch.allclose(model(tokens), hf(tokens).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from capwrap.errors import CapwrapWarning, ConfigError
from capwrap.models.adapters import unsupported_lora_options
from capwrap.models.layouts import checkpoint_shapes, one_name_per_tensor
from capwrap.models.model import CapModel, _bridge_architecture, _build_bridge
from capwrap.models.peft_layers import (
    changed_tensors,
    computing_copy,
    is_modules_to_save,
    is_peft_layer,
    merged_tensors,
)
from capwrap.models.spec import ARCHITECTURES, ModelSpec

__all__ = ["LiveModel", "wrap_hf_model", "as_cap_model"]


def wrap_hf_model(model: nn.Module, tokenizer: Any = None, metadata: dict[str, Any] | None = None) -> LiveModel:
    """A :class:`CapModel` over a live Hugging Face causal LM, sharing its weights.

    Args:
        model: an ``AutoModelForCausalLM`` of a supported architecture, a peft ``PeftModel`` of
            one with a LoRA, DoRA or IA3 adapter (seen merged), or either inside ``DistributedDataParallel`` or
            inside a module of your own that holds one of them (a Trainer's wrapper).
        tokenizer: its tokenizer, if any (kept as ``.tokenizer``).
        metadata: free-form information kept as ``.metadata``.

    Raises:
        ConfigError: the architecture is not one capwrap maps onto TransformerLens components,
            the model is not a causal LM, its weights are sharded (DeepSpeed ZeRO-3, FSDP) or on the
            ``meta`` device, or the adapter is neither LoRA (DoRA included) nor IA3.
    """
    hf, adapter_layers = _unwrap(model)
    config = getattr(hf, "config", None)
    if config is None:
        raise ConfigError(
            f"{type(model).__name__} is not a Hugging Face model (it has no .config); wrap_hf_model takes an "
            "AutoModelForCausalLM (or a peft model of one)"
        )
    spec = ModelSpec.from_hf_config(config)
    if not spec.has_hf_equivalent:  # pragma: no cover - from_hf_config never returns such a spec
        raise ConfigError(f"{spec.architecture} models have no Hugging Face equivalent")
    with torch.random.fork_rng(devices=[]):  # building draws from torch's generator; the run's draws stay its own
        shell, merged, copies = _shell(hf, config, adapter_layers)
        names = checkpoint_shapes(spec)
        shell_params = dict(shell.named_parameters(remove_duplicate=False))
        missing = sorted(set(names) - set(shell_params))
        if missing:
            raise ConfigError(
                f"the live model has no tensors {missing[:5]}; is it a {ARCHITECTURES[spec.architecture]}?"
            )
        _warn_if_untied(spec, shell_params)
        storage = {name: shell_params[name] for name in names}
        bridge = _build_bridge(shell, _bridge_architecture(spec), hf_config=shell.config, tokenizer=tokenizer)
    meta = {"source": f"live {type(hf).__name__}", **(metadata or {})}
    trains = [(p, p.requires_grad) for p in hf.parameters()]
    model = LiveModel(spec, bridge, storage, tokenizer, meta, merged, _SplitCopies(spec, bridge, storage), copies)
    # (a CapModel freezes the tensors its storage does not hold; a live model's own are not its to freeze: a tied
    # base's lm_head trained whole by peft, modules_to_save=["lm_head"], stopped training once wrapped)
    for param, flag in trains:
        param.requires_grad_(flag)
    return model


def _warn_if_untied(spec: ModelSpec, tensors: dict[str, Tensor]) -> None:
    """Warn when an adapter makes a tied base's input embedding and output layer two tensors (peft's
    LoRA on the embedding, or ``modules_to_save`` with it: the input side trains, the output layer
    keeps the base's weights)."""
    names = spec.family.tensors if spec.family is not None else None
    if not spec.tie_embeddings or names is None:
        return
    embed, unembed = tensors.get(f"{names.embed}.weight"), tensors.get(f"{names.unembed}.weight")
    if embed is None or unembed is None or len(one_name_per_tensor({"embed": embed, "unembed": unembed})) == 1:
        return  # (still one tensor)
    warnings.warn(
        f"the adapter trains one side of the tied pair {names.embed}.weight / {names.unembed}.weight (the base's "
        "input embedding and output layer, one tensor): the live model no longer ties them. capwrap runs the live "
        "model as it computes, but reads its weights as tied (the unembedding as the transposed embedding), and "
        "capwrap.load_model(BASE, adapter=...) will refuse the saved adapter; see 'Adapters on tied embeddings' in "
        "the LoRA guide, or leave the embedding and the output layer out of the adapter",
        CapwrapWarning,
        stacklevel=3,
    )


def as_cap_model(model: Any) -> CapModel:
    """``model`` itself if it is a :class:`CapModel`; a live Hugging Face (or peft) model wrapped with
    :func:`wrap_hf_model`; anything else is an error that says what is accepted."""
    if isinstance(model, CapModel):
        return model
    if isinstance(model, nn.Module) and hasattr(_unwrap(model)[0], "config"):
        return wrap_hf_model(model)
    raise ConfigError(
        f"expected a capwrap.CapModel or a Hugging Face causal LM, got {type(model).__name__}; load one with "
        "capwrap.load_model(...) or wrap a live transformers model with capwrap.wrap_hf_model(model)"
    )


class LiveModel(CapModel):
    """A :class:`CapModel` whose weights are a live model's (see :func:`wrap_hf_model`).

    It differs from a loaded model in two ways: an adapted weight (LoRA, DoRA, IA3) is the merged
    one, recomputed before every forward pass and weight read;
    and it cannot be moved (move the live model itself). ``clone()`` returns an ordinary,
    independent :class:`CapModel` of the weights as they are now.
    """

    def __init__(
        self,
        spec: ModelSpec,
        module: nn.Module,
        storage: dict[str, Tensor],
        tokenizer: Any,
        metadata: dict[str, Any],
        merged: list[_MergedLayer],
        split: _SplitCopies | None = None,
        copies: list[_ActiveCopy] | None = None,
    ):
        super().__init__(spec, "bridge", module, storage, "checkpoint", tokenizer, metadata)
        self._merged = merged
        self._split = split
        self._copies = copies or []

    def refresh(self) -> None:
        """Recompute the merged weights from the adapters as they are now, compute with the copy of
        each module trained whole (``modules_to_save``) that the live model computes with now, and
        refresh the bridge's copies of a fused projection it split (GPT-NeoX's query/key/value) from
        the live fused weight."""
        for weight in self._merged:
            weight.refresh()
        self._rebind_copies()
        if self._split is not None:
            self._split.refresh()

    def _forward_checked(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        self.refresh()
        return super()._forward_checked(tokens)

    def weights(self) -> dict[str, Tensor]:
        self.refresh()
        return super().weights()

    def gradients(self) -> dict[str, Tensor]:
        self._rebind_copies()  # (the gradients of the copies the live model computes with now)
        return super().gradients()

    def _rebind_copies(self) -> None:
        for active in self._copies:
            active.rebind(self._storage)

    def to(self, device: str | torch.device) -> CapModel:
        if torch.device(device) != self.device:
            raise ConfigError(
                "a wrapped live model shares the live model's weights; move the live model itself (model.to(...)) "
                "and wrap it again"
            )
        return self


class _MergedLayer:
    """The tensors of one peft-adapted layer that its adapters change (its weight; and its bias
    under an IA3 output scaling), merged as peft would merge them now
    (:func:`~capwrap.models.peft_layers.merged_tensors`). Recomputed on every :meth:`refresh`:
    optimizers update parameters in ways that do not all move their version counters, so nothing
    cheaper tells reliably whether the adapter changed (forming ``B·A`` costs about what one
    token's forward pass through the module does)."""

    def __init__(self, name: str, layer: nn.Module):
        self.name, self.layer = name, layer
        base = layer.get_base_layer()
        self.tensors = {
            leaf: nn.Parameter(torch.empty_like(getattr(base, leaf)), requires_grad=False)
            for leaf in changed_tensors(layer)
        }

    @torch.no_grad()
    def refresh(self) -> None:
        for name, value in merged_tensors(self.name, self.layer).items():
            self.tensors[name.rpartition(".")[2]].copy_(value)


class _ActiveCopy:
    """One tensor of a module peft trains whole (``modules_to_save``), which the live model computes
    with from the active adapter's copy, or from the original while adapters are disabled: the
    shell computes with the tensor the live model computes with now (rebound, not copied, when the
    live model switches copies: ``disable_adapter()``, ``set_adapter(...)``)."""

    def __init__(self, wrapper: nn.Module, below: str, owner: nn.Module, leaf: str, kind: str, name: str):
        self.wrapper, self.below, self.owner, self.leaf, self.kind, self.name = wrapper, below, owner, leaf, kind, name

    def current(self) -> Tensor:
        """The tensor the live model computes with now."""
        return getattr(computing_copy(self.wrapper).get_submodule(self.below), self.leaf)

    def rebind(self, storage: dict[str, Tensor]) -> None:
        current = self.current()
        tensors = getattr(self.owner, f"_{self.kind}s")
        if tensors[self.leaf] is not current:
            tensors[self.leaf] = current
            if self.name in storage:
                storage[self.name] = current


class _SplitCopies:
    """The bridge's own copies of a fused projection it split (GPT-NeoX's per-head
    ``query_key_value``, which no view can split: :func:`~capwrap.models.model.bridge_storage`),
    kept equal to the live fused weight: each copied canonical tensor (``W_Q``, ``b_K``, ...) is
    written from the fused tensor's view of it before every use. Empty where the bridge computes
    with views of the live tensors (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``)."""

    def __init__(self, spec: ModelSpec, bridge: nn.Module, storage: dict[str, Tensor]):
        from capwrap.models.layouts import canonical_views
        from capwrap.models.model import bridge_storage

        split, layout = bridge_storage(spec, bridge, storage)
        self.pairs: list[tuple[Tensor, Tensor]] = []
        if layout != "split":
            return
        copies = {t.untyped_storage().data_ptr() for t in split.values()} - {
            t.untyped_storage().data_ptr() for t in storage.values()}  # fmt: skip
        live, computed = canonical_views(spec, storage), canonical_views(spec, split, "split")
        self.pairs = [(computed[name], live[name]) for name in computed
                      if computed[name].untyped_storage().data_ptr() in copies]  # fmt: skip

    @torch.no_grad()
    def refresh(self) -> None:
        for copy_, live in self.pairs:
            copy_.copy_(live)


def _is_peft_model(module: nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def _inside_a_wrapper(model: nn.Module) -> nn.Module:
    """``model`` if it is a Hugging Face or peft model; else the one such model a module of the
    user's own holds (a Trainer given a wrapper around the model it trains)."""
    import transformers

    def is_hf(module: nn.Module) -> bool:
        return isinstance(module, transformers.PreTrainedModel) or _is_peft_model(module)

    if is_hf(model):
        return model
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_hf(module) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    trained = [(n, m) for n, m in found if any(p.requires_grad for p in m.parameters())]
    if len(found) > 1 and len(trained) == 1:  # a student beside a frozen teacher, a policy beside its reference
        found = trained
    if len(found) == 1:
        return found[0][1]
    if found:
        raise ConfigError(
            f"{type(model).__name__} holds {len(found)} Hugging Face models ({', '.join(n for n, _ in found)}); "
            "capwrap follows one, the one that trains, and more than one has trainable parameters: wrap the model to "
            "follow with capwrap.wrap_hf_model(model) (or record it with a Recorder of your own)"
        )
    return model  # no Hugging Face model inside: the caller says what it takes


def _unwrap(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The Hugging Face model inside ``model`` (DDP, a module of the user's own, peft) and its
    adapted layers (if a peft model: LoRA, DoRA or IA3)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    model = _inside_a_wrapper(model)
    if _is_peft_model(model):
        kinds = {str(getattr(c, "peft_type", "")).rsplit(".", 1)[-1] for c in model.peft_config.values()}
        if not kinds <= {"LORA", "IA3"}:
            raise ConfigError(
                f"capwrap follows LoRA (DoRA included) and IA3 adapters; this peft model has {sorted(kinds)}"
            )
        for name, config in model.peft_config.items():
            # (a base-changing initialization, PiSSA and the like, is followed: the live base is the changed one)
            mergeable, unmergeable = unsupported_lora_options(config.to_dict()) if config.peft_type == "LORA" else ([], [])
            if mergeable or unmergeable:
                raise ConfigError(
                    f"capwrap follows LoRA adapters (scaling·B·A, DoRA) and IA3; the adapter {name!r} uses "
                    f"{', '.join(unmergeable + mergeable)}, which the merged weights capwrap computes would leave out"
                )
        model = model.get_base_model()
    layers = [m for m in model.modules() if is_peft_layer(m)]
    for layer in layers:  # adapters injected without a PeftModel around them (peft's inject_adapter_in_model)
        uses = sorted({type(v).__name__ for v in getattr(layer, "lora_variant", {}).values()} - _FOLLOWED_VARIANTS)
        if any(getattr(layer, "lora_bias", {}).values()):
            uses.append("a bias on lora_B (lora_bias=True)")
        if uses:
            raise ConfigError(
                f"capwrap follows LoRA adapters (scaling·B·A, DoRA) and IA3; this one uses {', '.join(uses)}"
            )
    return model, layers


#: peft LoRA variants whose merged weight capwrap forms (DoRA's; MiCA: plain factors, another
#: initialization); any other variant (aLoRA, KaSA, BD-LoRA, ...) computes something else.
_FOLLOWED_VARIANTS = {"DoraLinearVariant", "DoraEmbeddingVariant", "MiCALinearVariant", "MiCAEmbeddingVariant"}


def _saved_ancestor(hf: nn.Module, path: str) -> tuple[nn.Module, str] | None:
    """The ``modules_to_save`` wrapper at ``path`` in ``hf`` or above it (a module trained whole may
    hold others: ``modules_to_save=["mlp"]``), and the path below it; ``None`` when there is none.
    Walked through the module tree itself: peft's wrapper resolves attributes to its active copy."""
    module, parts = hf, path.split(".") if path else []
    for index, part in enumerate(parts):
        if is_modules_to_save(module):
            return module, ".".join(parts[index:])
        module = module._modules[part]  # type: ignore[assignment]
    return (module, "") if is_modules_to_save(module) else None


def _shell(
    hf: nn.Module, config: Any, adapted: list[nn.Module]
) -> tuple[nn.Module, list[_MergedLayer], list[_ActiveCopy]]:
    """A second module tree of ``hf``'s class whose parameters and buffers are ``hf``'s own tensors
    (the tensors adapters change: merged copies; modules trained whole: the active copy's, rebound
    when it changes), built on ``meta`` so that nothing is allocated twice."""
    import transformers

    with torch.device("meta"):
        shell = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    shell.eval()
    adapted_ids = {id(layer) for layer in adapted}
    merged = {path: _MergedLayer(path, m) for path, m in hf.named_modules() if id(m) in adapted_ids}
    copies: list[_ActiveCopy] = []

    def live_tensor(path: str, leaf: str, kind: str, owner: nn.Module) -> tuple[Tensor, _ActiveCopy | None]:
        """The live tensor the shell's ``owner`` takes as ``leaf``, and the copy to follow if it is
        one of a module trained whole (or of one inside it)."""
        if path in merged and leaf in merged[path].tensors and kind == "parameter":
            return merged[path].tensors[leaf], None
        if (saved := _saved_ancestor(hf, path)) is not None:
            active = _ActiveCopy(*saved, owner, leaf, kind, f"{path}.{leaf}")
            return active.current(), active
        module = hf.get_submodule(path)
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        return getattr(module, leaf), None

    for kind, named in (("parameter", shell.named_parameters), ("buffer", shell.named_buffers)):
        for name, _ in list(named(remove_duplicate=False)):
            path, _, leaf = name.rpartition(".")
            owner = shell.get_submodule(path)
            tensor, active = live_tensor(path, leaf, kind, owner)
            if tensor is None or tensor.device.type == "meta" or (tensor.numel() == 0 and kind == "parameter"):
                raise ConfigError(
                    f"the live model's {name} is not in memory (sharded by DeepSpeed ZeRO-3 or FSDP, or offloaded); "
                    "capwrap records models whose weights are whole on one process"
                )
            getattr(owner, f"_{kind}s")[leaf] = tensor
            if active is not None:
                copies.append(active)
    for layer in merged.values():
        layer.refresh()
    return shell, list(merged.values()), copies
