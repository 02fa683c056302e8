"""Canonical weight views: Hugging Face tensors seen with TransformerLens names and shapes.

capwrap stores checkpoints in the Hugging Face layout (``transformer.h.0.attn.c_attn.weight``),
while analyses speak TransformerLens (``blocks.0.attn.W_Q`` of shape
``[n_heads, d_model, d_head]``). :func:`canonical_views` maps one onto the other with *views*,
never copies, so the mapping works in both directions: reading a view reads the storage, and
writing into a view (pruning, grafting, loading a HookedTransformer checkpoint back into HF
format) writes the storage.

Canonical names (TransformerLens's, for both backends): ``embed.W_E`` ``[d_vocab, d_model]``,
``pos_embed.W_pos`` ``[n_ctx, d_model]`` (not llama), ``blocks.{L}.ln1.w``/``.b``, ``blocks.{L}.attn.W_Q``
``[n_heads, d_model, d_head]``, ``W_K``/``W_V`` ``[n_kv_heads, d_model, d_head]``, ``b_Q``
``[n_heads, d_head]`` (gpt2, tracr), ``W_O`` ``[n_heads, d_head, d_model]``, ``b_O`` ``[d_model]``,
``blocks.{L}.ln2.w``/``.b``, ``blocks.{L}.mlp.W_in``/``W_gate`` ``[d_model, d_mlp]``, ``b_in``,
``W_out`` ``[d_mlp, d_model]``, ``b_out``, ``ln_final.w``/``.b``, ``unembed.W_U`` ``[d_model, d_vocab]``.

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

import functools
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from capwrap.errors import ConfigError
from capwrap.models.spec import ModelSpec

__all__ = ["canonical_names", "canonical_views", "canonical_views_of_some", "checkpoint_shapes", "hf_shapes", "Layout"]

#: Where tensors live: ``checkpoint`` (the spec's file layout: Hugging Face names for gpt2/llama,
#: canonical names for tracr) or ``native`` (TransformerLens's native model, the bridge's tracr host).
Layout = Literal["checkpoint", "native"]


def _gpt2_views(spec: ModelSpec, t: Mapping[str, Tensor]) -> dict[str, Tensor]:
    d, h, dh = spec.d_model, spec.n_heads, spec.d_head
    out = {"embed.W_E": t["transformer.wte.weight"], "pos_embed.W_pos": t["transformer.wpe.weight"]}
    for layer in range(spec.n_layers):
        p, c = f"transformer.h.{layer}.", f"blocks.{layer}."
        qkv_w, qkv_b = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]  # [d, 3d], [3d]
        for i, name in enumerate("QKV"):
            # Conv1D computes x @ W, so columns are outputs: [d, h*dh] -> [h, d, dh].
            out[c + f"attn.W_{name}"] = qkv_w[:, i * d : (i + 1) * d].unflatten(-1, (h, dh)).permute(1, 0, 2)
            out[c + f"attn.b_{name}"] = qkv_b[i * d : (i + 1) * d].unflatten(-1, (h, dh))
        out[c + "attn.W_O"] = t[p + "attn.c_proj.weight"].unflatten(0, (h, dh))
        out[c + "attn.b_O"] = t[p + "attn.c_proj.bias"]
        out[c + "ln1.w"], out[c + "ln1.b"] = t[p + "ln_1.weight"], t[p + "ln_1.bias"]
        out[c + "ln2.w"], out[c + "ln2.b"] = t[p + "ln_2.weight"], t[p + "ln_2.bias"]
        out[c + "mlp.W_in"], out[c + "mlp.b_in"] = t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"]
        out[c + "mlp.W_out"] = t[p + "mlp.c_proj.weight"]
        out[c + "mlp.b_out"] = t[p + "mlp.c_proj.bias"]
    out["ln_final.w"], out["ln_final.b"] = t["transformer.ln_f.weight"], t["transformer.ln_f.bias"]
    unembed = t["transformer.wte.weight"] if spec.tie_embeddings else t["lm_head.weight"]
    out["unembed.W_U"] = unembed.T
    return out


def _gpt_neo_views(spec: ModelSpec, t: Mapping[str, Tensor]) -> dict[str, Tensor]:
    h, dh = spec.n_heads, spec.d_head
    out = {"embed.W_E": t["transformer.wte.weight"], "pos_embed.W_pos": t["transformer.wpe.weight"]}
    for layer in range(spec.n_layers):
        p, c = f"transformer.h.{layer}.", f"blocks.{layer}."
        a = p + "attn.attention."
        for name in "QKV":  # nn.Linear, no bias: [h*dh, d] -> [h, d, dh]
            out[c + f"attn.W_{name}"] = t[a + f"{name.lower()}_proj.weight"].unflatten(0, (h, dh)).transpose(1, 2)
        out[c + "attn.W_O"] = t[a + "out_proj.weight"].unflatten(1, (h, dh)).permute(1, 2, 0)
        out[c + "attn.b_O"] = t[a + "out_proj.bias"]
        out[c + "ln1.w"], out[c + "ln1.b"] = t[p + "ln_1.weight"], t[p + "ln_1.bias"]
        out[c + "ln2.w"], out[c + "ln2.b"] = t[p + "ln_2.weight"], t[p + "ln_2.bias"]
        out[c + "mlp.W_in"], out[c + "mlp.b_in"] = t[p + "mlp.c_fc.weight"].T, t[p + "mlp.c_fc.bias"]
        out[c + "mlp.W_out"], out[c + "mlp.b_out"] = t[p + "mlp.c_proj.weight"].T, t[p + "mlp.c_proj.bias"]
    out["ln_final.w"], out["ln_final.b"] = t["transformer.ln_f.weight"], t["transformer.ln_f.bias"]
    unembed = t["transformer.wte.weight"] if spec.tie_embeddings else t["lm_head.weight"]
    out["unembed.W_U"] = unembed.T
    return out


def _llama_views(spec: ModelSpec, t: Mapping[str, Tensor]) -> dict[str, Tensor]:
    h, kv, dh = spec.n_heads, spec.n_key_value_heads, spec.d_head
    out = {"embed.W_E": t["model.embed_tokens.weight"]}
    for layer in range(spec.n_layers):
        p, c = f"model.layers.{layer}.", f"blocks.{layer}."
        # nn.Linear stores [out, in]: q_proj [h*dh, d] -> [h, d, dh].
        out[c + "attn.W_Q"] = t[p + "self_attn.q_proj.weight"].unflatten(0, (h, dh)).transpose(1, 2)
        out[c + "attn.W_K"] = t[p + "self_attn.k_proj.weight"].unflatten(0, (kv, dh)).transpose(1, 2)
        out[c + "attn.W_V"] = t[p + "self_attn.v_proj.weight"].unflatten(0, (kv, dh)).transpose(1, 2)
        # o_proj [d, h*dh] -> [h, dh, d].
        out[c + "attn.W_O"] = t[p + "self_attn.o_proj.weight"].unflatten(1, (h, dh)).permute(1, 2, 0)
        out[c + "ln1.w"] = t[p + "input_layernorm.weight"]
        out[c + "ln2.w"] = t[p + "post_attention_layernorm.weight"]
        out[c + "mlp.W_in"] = t[p + "mlp.up_proj.weight"].T
        out[c + "mlp.W_gate"] = t[p + "mlp.gate_proj.weight"].T
        out[c + "mlp.W_out"] = t[p + "mlp.down_proj.weight"].T
    out["ln_final.w"] = t["model.norm.weight"]
    unembed = t["model.embed_tokens.weight"] if spec.tie_embeddings else t["lm_head.weight"]
    out["unembed.W_U"] = unembed.T
    return out


def _native_views(spec: ModelSpec, t: Mapping[str, Tensor]) -> dict[str, Tensor]:
    h, dh = spec.n_heads, spec.d_head
    out = {"embed.W_E": t["tok_embed.weight"], "pos_embed.W_pos": t["pos.weight"]}
    for layer in range(spec.n_layers):
        p, c = f"layers.{layer}.", f"blocks.{layer}."
        for name in "QKV":
            lin = p + f"attn.{name.lower()}."
            out[c + f"attn.W_{name}"] = t[lin + "weight"].unflatten(0, (h, dh)).transpose(1, 2)
            out[c + f"attn.b_{name}"] = t[lin + "bias"].unflatten(0, (h, dh))
        out[c + "attn.W_O"] = t[p + "attn.o.weight"].unflatten(1, (h, dh)).permute(1, 2, 0)
        out[c + "attn.b_O"] = t[p + "attn.o.bias"]
        out[c + "mlp.W_in"], out[c + "mlp.b_in"] = t[p + "mlp.fc_in.weight"].T, t[p + "mlp.fc_in.bias"]
        out[c + "mlp.W_out"], out[c + "mlp.b_out"] = t[p + "mlp.fc_out.weight"].T, t[p + "mlp.fc_out.bias"]
    out["unembed.W_U"] = t["head.weight"].T
    return out


def _canonical_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """Canonical names and shapes of a tracr model (its checkpoint layout is the canonical one)."""
    d, h, dh, m = spec.d_model, spec.n_heads, spec.d_head, spec.d_mlp
    shapes = {"embed.W_E": (spec.d_vocab, d), "pos_embed.W_pos": (spec.n_ctx, d)}
    for layer in range(spec.n_layers):
        c = f"blocks.{layer}."
        for name in "QKV":
            shapes[c + f"attn.W_{name}"], shapes[c + f"attn.b_{name}"] = (h, d, dh), (h, dh)
        shapes[c + "attn.W_O"], shapes[c + "attn.b_O"] = (h, dh, d), (d,)
        shapes[c + "mlp.W_in"], shapes[c + "mlp.b_in"] = (d, m), (m,)
        shapes[c + "mlp.W_out"], shapes[c + "mlp.b_out"] = (m, d), (d,)
    shapes["unembed.W_U"] = (d, spec.d_vocab_out)
    return {k: torch.Size(v) for k, v in shapes.items()}


def canonical_views(spec: ModelSpec, storage: Mapping[str, Tensor], layout: Layout = "checkpoint") -> dict[str, Tensor]:
    """TransformerLens-named views of a state dict (or of its gradients).

    Args:
        spec: the model's shape and architecture.
        storage: parameter names to tensors, as in ``model.state_dict()``.
        layout: ``"checkpoint"``: the names of the spec's checkpoint files (Hugging Face's for
            gpt2 and llama, the canonical ones for tracr); ``"native"``: TransformerLens's
            native model's.

    Returns:
        Canonical names to views of ``storage``'s tensors (no copies).
    """
    if layout == "native":
        return _native_views(spec, storage)
    missing = sorted(set(checkpoint_shapes(spec)) - set(storage))
    if missing:
        raise ConfigError(f"tensors missing for a {spec.architecture} model of this shape: {missing[:5]}")
    if spec.architecture == "tracr":
        return {k: storage[k] for k in _canonical_shapes(spec)}
    return _HF_VIEWS[spec.architecture](spec, storage)


_HF_VIEWS = {"gpt2": _gpt2_views, "gpt_neo": _gpt_neo_views, "llama": _llama_views}


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
    meta = {k: torch.empty(s, device="meta") for k, s in checkpoint_shapes(spec).items()}
    return tuple(canonical_views(spec, meta))


def checkpoint_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """Names and shapes of the tensors in a checkpoint file of a model with this spec."""
    return hf_shapes(spec) if spec.has_hf_equivalent else _canonical_shapes(spec)


@functools.lru_cache(maxsize=64)
def hf_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """The Hugging Face parameter names and shapes of a model with this spec (cached; do not mutate)."""
    with torch.device("meta"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(spec.to_hf_config())
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return shapes
