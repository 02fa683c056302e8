"""Canonical weight views: Hugging Face tensors seen with TransformerLens names and shapes.

capwrap stores checkpoints in the Hugging Face layout (``model.layers.0.self_attn.q_proj.weight``),
while analyses speak TransformerLens (``blocks.0.attn.W_Q`` of shape ``[n_heads, d_model, d_head]``).
:func:`canonical_views` maps one onto the other with *views*, never copies, so the mapping works in
both directions: reading a view reads the storage, and writing into a view (pruning, grafting,
loading a HookedTransformer checkpoint back into HF format) writes the storage.

The mapping is written once, over a family's :class:`~capwrap.models.families.TensorNames` (where
each module lives) and the model's :class:`~capwrap.models.features.BlockFeatures` (which weights
exist): projections are ``nn.Linear`` (``[out, in]``) or GPT-2's ``Conv1D`` (``[in, out]``); a fused
query/key/value projection is split by rows (or, per head, GPT-NeoX's ``[head, (q, k, v), d_head]``);
a fused gate/up projection likewise.

Canonical names (TransformerLens's): ``embed.W_E`` ``[d_vocab, d_model]``, ``pos_embed.W_pos``
``[n_ctx, d_model]`` (learned positions), ``blocks.{L}.ln1.w``/``.b`` (and ``ln1_post``, ``ln2``,
``ln2_post``, as the features place norms; ``.b`` for LayerNorm), ``blocks.{L}.attn.W_Q``
``[n_heads, d_model, d_head]``, ``W_K``/``W_V`` ``[n_kv_heads, d_model, d_head]``, ``b_Q``
``[n_heads, d_head]`` (``b_K``, ``b_V`` per kv head), ``W_O`` ``[n_heads, d_head, d_model]``,
``b_O`` ``[d_model]``, ``blocks.{L}.attn.q_norm.w``/``k_norm.w`` (``[d_head]`` per head, or
``[n_heads * d_head]`` over all heads), ``blocks.{L}.mlp.W_in``/``W_gate`` ``[d_model, d_mlp]``,
``b_in``, ``W_out`` ``[d_mlp, d_model]``, ``b_out``, ``ln_final.w``/``.b``, ``unembed.W_U``
``[d_model, d_vocab]``.

Examples:
    >>> import torch
    >>> from capwrap.models.spec import ModelSpec
    >>> spec = ModelSpec(d_vocab=10, n_ctx=8, n_layers=1, d_model=8, n_heads=2)
    >>> shapes = hf_shapes(spec)
    >>> storage = {name: torch.zeros(shape) for name, shape in shapes.items()}
    >>> views = canonical_views(spec, storage)
    >>> views["blocks.0.attn.W_Q"].shape
    torch.Size([2, 8, 4])
    >>> views["blocks.0.attn.W_Q"][1] += 1.0  # writes through to the HF tensor
    >>> int(storage["transformer.h.0.attn.c_attn.weight"][:, 4:8].sum())
    32
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from capwrap.errors import ConfigError
from capwrap.models.families import FAMILIES, TensorNames
from capwrap.models.spec import ModelSpec

__all__ = [
    "one_name_per_tensor",
    "BRIDGE_SPLITS",
    "SplitProjection",
    "canonical_names",
    "canonical_shapes",
    "canonical_views",
    "canonical_views_of_some",
    "checkpoint_shapes",
    "hf_shapes",
    "Layout",
]

#: Where tensors live: ``checkpoint`` (the spec's file layout: Hugging Face names, or canonical
#: names for tracr), ``native`` (TransformerLens's native model, the bridge's tracr host) or
#: ``split`` (the checkpoint layout, but with a fused query/key/value projection the bridge computes
#: with separate copies of — GPT-NeoX's per-head ``query_key_value``, or any fused projection
#: accelerate offloaded — replaced by those copies: :data:`BRIDGE_SPLITS`).
Layout = Literal["checkpoint", "native", "split"]

@dataclasses.dataclass(frozen=True)
class SplitProjection:
    """A fused projection the TransformerBridge may split into copies of its parts.

    Args:
        fused: the :class:`~capwrap.models.families.TensorNames` field naming the fused module.
        parent: the field naming the module it sits in (``attn`` or ``mlp``).
        parts: what the bridge names the copies (modules beside the fused one, ``nn.Linear`` each).
        reads: how a family's table reads the copies instead (TensorNames fields to replace).
    """

    fused: str
    parent: str
    parts: tuple[str, ...]
    reads: dict[str, object]

    def names(self, spec: ModelSpec, modules: tuple[str, ...], layer: int) -> list[str]:
        """The weight and bias tensor names of ``modules`` (in the parent module) of one layer."""
        t = spec.family.tensors  # type: ignore[union-attr]
        prefix = f"{t.layers}.{layer}.{getattr(t, self.parent)}."
        return [f"{prefix}{m}.{kind}" for m in modules for kind in ("weight", "bias")]

    def was_split(self, spec: ModelSpec, tensors: Mapping[str, Tensor]) -> bool:
        """Whether ``tensors`` (a model's, by name) hold this projection's copies: the spec's family
        fuses it, and the first layer's first part is there."""
        fuses = getattr(spec.family.tensors, self.fused) is not None  # type: ignore[union-attr]
        return fuses and self.names(spec, self.parts[:1], 0)[0] in tensors


#: The fused projections the TransformerBridge splits into copies (GPT-NeoX's per-head
#: query/key/value always; any fused projection accelerate offloaded), and how the copies are read.
BRIDGE_SPLITS = (
    SplitProjection("qkv", "attn", ("q", "k", "v"),
                    {"q": "q", "k": "k", "v": "v", "qkv": None, "qkv_per_head": False, "qkv_conv1d": False}),
    SplitProjection("gate_up", "mlp", ("gate", "in"), {"gate": "gate", "up": "in", "gate_up": None}),
)  # fmt: skip


class _Projections:
    """Reads a family's projections as canonical matrices: ``nn.Linear`` or ``Conv1D`` storage."""

    def __init__(self, conv1d: bool):
        self.conv1d = conv1d

    def outputs(self, w: Tensor) -> int:
        """The axis along which a projection's outputs are laid out."""
        return 1 if self.conv1d else 0

    def matrix(self, w: Tensor) -> Tensor:
        """``[in, out]``, as TransformerLens's ``W_in``/``W_out``."""
        return w if self.conv1d else w.T

    def into_heads(self, w: Tensor, n: int, d_head: int) -> Tensor:
        """A projection into ``n`` heads as ``[n, d_model, d_head]``."""
        if self.conv1d:
            return w.unflatten(1, (n, d_head)).permute(1, 0, 2)
        return w.unflatten(0, (n, d_head)).transpose(1, 2)

    def from_heads(self, w: Tensor, n: int, d_head: int) -> Tensor:
        """The projection out of ``n`` heads as ``[n, d_head, d_model]``."""
        if self.conv1d:
            return w.unflatten(0, (n, d_head))
        return w.unflatten(1, (n, d_head)).permute(1, 2, 0)


def _split(w: Tensor, axis: int, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Consecutive blocks of ``w`` along ``axis`` (views)."""
    return tuple(w.split(list(sizes), dim=axis))


def _attention(spec: ModelSpec, names: TensorNames, t: Mapping[str, Tensor], p: str, c: str) -> dict[str, Tensor]:
    """One layer's attention weights; ``p``: the layer's HF prefix, ``c``: its canonical one."""
    f = spec.features
    assert f is not None
    h, kv, dh = spec.n_heads, spec.n_key_value_heads, spec.d_head
    proj = proj_qkv = _Projections(names.conv1d)
    a = f"{p}{names.attn}."
    out: dict[str, Tensor] = {}
    heads = {"Q": h, "K": kv, "V": kv}
    if names.qkv_per_head:  # nn.Linear with outputs [head, (q, k, v), d_head] (GPT-NeoX; no GQA)
        w, b = t[f"{a}{names.qkv}.weight"], t.get(f"{a}{names.qkv}.bias")
        grouped = w.unflatten(0, (h, 3, dh))  # [head, 3, d_head, d_model]
        for i, n in enumerate("QKV"):
            out[f"{c}attn.W_{n}"] = grouped[:, i].transpose(1, 2)
            if f.qkv_bias:
                out[f"{c}attn.b_{n}"] = b.unflatten(0, (h, 3, dh))[:, i]  # type: ignore[union-attr]
    else:
        if names.qkv is None:
            weights = {n: t[f"{a}{getattr(names, n.lower())}.weight"] for n in "QKV"}
            biases = {n: t.get(f"{a}{getattr(names, n.lower())}.bias") for n in "QKV"}
            if names.qkv_conv1d is not None:
                proj_qkv = _Projections(names.qkv_conv1d)
        else:  # [q | k | v] along the outputs (GPT-2, Phi-3)
            w, b = t[f"{a}{names.qkv}.weight"], t.get(f"{a}{names.qkv}.bias")
            sizes = (h * dh, kv * dh, kv * dh)
            weights = dict(zip("QKV", _split(w, proj.outputs(w), sizes), strict=True))
            biases = dict(zip("QKV", _split(b, 0, sizes) if b is not None else (None,) * 3, strict=True))
        for n in "QKV":
            out[f"{c}attn.W_{n}"] = proj_qkv.into_heads(weights[n], heads[n], dh)
            if f.qkv_bias:
                out[f"{c}attn.b_{n}"] = biases[n].unflatten(0, (heads[n], dh))  # type: ignore[union-attr]
    out[f"{c}attn.W_O"] = proj.from_heads(t[f"{a}{names.o}.weight"], h, dh)
    if f.o_bias:
        out[f"{c}attn.b_O"] = t[f"{a}{names.o}.bias"]
    if f.qk_norm != "none":
        out[f"{c}attn.q_norm.w"] = t[f"{a}{names.q_norm}.weight"]
        out[f"{c}attn.k_norm.w"] = t[f"{a}{names.k_norm}.weight"]
    return out


def _mlp(spec: ModelSpec, names: TensorNames, t: Mapping[str, Tensor], p: str, c: str) -> dict[str, Tensor]:
    f = spec.features
    assert f is not None
    proj = _Projections(names.conv1d)
    m = f"{p}{names.mlp}."
    out: dict[str, Tensor] = {}
    if names.gate_up is not None:  # [gate | up] along the outputs
        w = t[f"{m}{names.gate_up}.weight"]
        gate, up = _split(w, proj.outputs(w), (spec.d_mlp, spec.d_mlp))
        out[f"{c}mlp.W_in"], out[f"{c}mlp.W_gate"] = proj.matrix(up), proj.matrix(gate)
    else:
        out[f"{c}mlp.W_in"] = proj.matrix(t[f"{m}{names.up}.weight"])
        if f.mlp_bias:
            out[f"{c}mlp.b_in"] = t[f"{m}{names.up}.bias"]
        if f.gated:
            out[f"{c}mlp.W_gate"] = proj.matrix(t[f"{m}{names.gate}.weight"])
    out[f"{c}mlp.W_out"] = proj.matrix(t[f"{m}{names.down}.weight"])
    if f.mlp_bias:
        out[f"{c}mlp.b_out"] = t[f"{m}{names.down}.bias"]
    return out


def _norm(spec: ModelSpec, t: Mapping[str, Tensor], module: str, canonical: str) -> dict[str, Tensor]:
    out = {f"{canonical}.w": t[f"{module}.weight"]}
    if spec.features.norm == "layer":  # type: ignore[union-attr]
        out[f"{canonical}.b"] = t[f"{module}.bias"]
    return out


def _block_norms(spec: ModelSpec) -> tuple[str, ...]:
    """The canonical norms of a block, in order, as the features place them."""
    f = spec.features
    assert f is not None
    if not f.has_norm:
        return ()
    return tuple(
        n
        for n, on in (("ln1", f.pre_norm), ("ln1_post", f.post_norm), ("ln2", f.pre_norm), ("ln2_post", f.post_norm))
        if on
    )


def _views(spec: ModelSpec, names: TensorNames, t: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical views of a state dict laid out as ``names`` says."""
    out = {"embed.W_E": t[f"{names.embed}.weight"]}
    if names.pos_embed is not None and spec.features.positions == "learned":  # type: ignore[union-attr]
        out["pos_embed.W_pos"] = t[f"{names.pos_embed}.weight"]
    for layer in range(spec.n_layers):
        p, c = f"{names.layers}.{layer}.", f"blocks.{layer}."
        out.update(_attention(spec, names, t, p, c))  # (the order capwrap has always listed them in)
        for norm in _block_norms(spec):
            module = getattr(names, norm)
            if module is None:
                raise ConfigError(f"{spec.architecture} checkpoints have no {norm} norm; the features place one there")
            out.update(_norm(spec, t, p + module, c + norm))
        out.update(_mlp(spec, names, t, p, c))
    if spec.features.has_norm and names.ln_final is not None:  # type: ignore[union-attr]
        out.update(_norm(spec, t, names.ln_final, "ln_final"))
    unembed = t[f"{names.embed}.weight"] if spec.tie_embeddings else t[f"{names.unembed}.weight"]
    out["unembed.W_U"] = unembed.T
    return out


def _hf_views(spec: ModelSpec, storage: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical views of a Hugging Face state dict: by the family's table, or, for an
    architecture capwrap has no entry for, by what TransformerLens's adapter knows."""
    family = spec.family
    if family is None:
        from capwrap.models.generic import generic_views

        return generic_views(spec, storage)
    return _views(spec, family.tensors, storage)


def canonical_views(spec: ModelSpec, storage: Mapping[str, Tensor], layout: Layout = "checkpoint") -> dict[str, Tensor]:
    """TransformerLens-named views of a state dict (or of its gradients).

    Args:
        spec: the model's shape and architecture.
        storage: parameter names to tensors, as in ``model.state_dict()``.
        layout: ``"checkpoint"``: the names of the spec's checkpoint files (Hugging Face's, or the
            canonical ones for tracr); ``"native"``: TransformerLens's native model's; ``"split"``:
            the checkpoint's, with the bridge's split copies of a fused q/k/v projection.

    Returns:
        Canonical names to views of ``storage``'s tensors (no copies).
    """
    if layout == "native":
        return _views(spec, FAMILIES["tracr"].tensors, storage)
    if layout == "split":  # the tables' names, with the fused projections that were split read from their copies
        names = spec.family.tensors  # type: ignore[union-attr]
        for split in BRIDGE_SPLITS:
            if split.was_split(spec, storage):
                names = dataclasses.replace(names, **split.reads)
        return _views(spec, names, storage)
    missing = sorted(set(checkpoint_shapes(spec)) - set(storage))
    if missing:
        raise ConfigError(f"tensors missing for a {spec.architecture} model of this shape: {missing[:5]}")
    if not spec.has_hf_equivalent:
        return {k: storage[k] for k in canonical_names(spec)}
    try:
        return _hf_views(spec, storage)
    except KeyError as err:
        raise ConfigError(
            f"the {spec.architecture} checkpoint has no tensor {err.args[0]!r} where capwrap expects one; "
            "its layout differs from the family's"
        ) from None


def canonical_views_of_some(spec: ModelSpec, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical views of *some* of a checkpoint's tensors (one layer's, the ones an adapter
    changes ...): the canonical weights that ``tensors`` hold entirely. The other checkpoint
    tensors stand in as ``meta`` placeholders, shapes without memory."""
    storage = {name: torch.empty(shape, device="meta") for name, shape in checkpoint_shapes(spec).items()}
    storage.update(tensors)
    return {k: v for k, v in canonical_views(spec, storage).items() if v.device.type != "meta"}


@functools.lru_cache(maxsize=64)
def canonical_names(spec: ModelSpec) -> tuple[str, ...]:
    """The canonical weight names of a model with this spec, in model order (cached)."""
    return tuple(canonical_shapes(spec))


@functools.lru_cache(maxsize=64)
def canonical_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """Canonical names and shapes of a model with this spec (cached; do not mutate)."""
    if spec.has_hf_equivalent:
        meta = {k: torch.empty(s, device="meta") for k, s in hf_shapes(spec).items()}
        return {k: v.shape for k, v in _hf_views(spec, meta).items()}
    native = {k: torch.empty(s, device="meta") for k, s in _native_shapes(spec).items()}
    return {k: v.shape for k, v in _views(spec, FAMILIES["tracr"].tensors, native).items()}


def _native_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """TransformerLens's native model's tensors (tracr's host on the bridge)."""
    d, h, dh, m = spec.d_model, spec.n_heads, spec.d_head, spec.d_mlp
    shapes: dict[str, tuple[int, ...]] = {"tok_embed.weight": (spec.d_vocab, d), "pos.weight": (spec.n_ctx, d)}
    for layer in range(spec.n_layers):
        p = f"layers.{layer}."
        for n in "qkv":
            shapes[f"{p}attn.{n}.weight"], shapes[f"{p}attn.{n}.bias"] = (h * dh, d), (h * dh,)
        shapes[f"{p}attn.o.weight"], shapes[f"{p}attn.o.bias"] = (d, h * dh), (d,)
        shapes[f"{p}mlp.fc_in.weight"], shapes[f"{p}mlp.fc_in.bias"] = (m, d), (m,)
        shapes[f"{p}mlp.fc_out.weight"], shapes[f"{p}mlp.fc_out.bias"] = (d, m), (d,)
    shapes["head.weight"] = (spec.d_vocab_out, d)
    return shapes


def checkpoint_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """Names and shapes of the tensors in a checkpoint file of a model with this spec."""
    return hf_shapes(spec) if spec.has_hf_equivalent else canonical_shapes(spec)


@functools.lru_cache(maxsize=64)
def hf_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """The Hugging Face parameter names and shapes of a model with this spec (cached; do not mutate)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(spec.to_hf_config())
    return {name: p.shape for name, p in model.named_parameters()}


def one_name_per_tensor(tensors: Mapping[str, Tensor]) -> list[str]:
    """The names of ``tensors``, in order, less any whose memory an earlier name's tensor already is
    (the same storage, offset and size): a tied embedding's unembedding, a view of the embedding."""
    seen: set[tuple[int, int, int]] = set()
    names = []
    for name, tensor in tensors.items():
        region = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if region not in seen:
            seen.add(region)
            names.append(name)
    return names
