"""Canonical weight views: Hugging Face tensors seen with TransformerLens names and shapes.

capwrap stores checkpoints in the Hugging Face layout (``transformer.h.0.attn.c_attn.weight``),
while analyses speak TransformerLens (``blocks.0.attn.W_Q`` of shape
``[n_heads, d_model, d_head]``). :func:`canonical_views` maps one onto the other with *views*,
never copies, so the mapping works in both directions: reading a view reads the storage, and
writing into a view (pruning, grafting, loading a HookedTransformer checkpoint back into HF
format) writes the storage.

Canonical names (TransformerLens's, for both backends): ``embed.W_E`` ``[d_vocab, d_model]``,
``pos_embed.W_pos`` ``[n_ctx, d_model]`` (gpt2), ``blocks.{L}.ln1.w``/``.b``, ``blocks.{L}.attn.W_Q``
``[n_heads, d_model, d_head]``, ``W_K``/``W_V`` ``[n_kv_heads, d_model, d_head]``, ``b_Q``
``[n_heads, d_head]``, ``W_O`` ``[n_heads, d_head, d_model]``, ``b_O`` ``[d_model]``,
``blocks.{L}.ln2.w``/``.b``, ``blocks.{L}.mlp.W_in``/``W_gate`` ``[d_model, d_mlp]``, ``b_in``,
``W_out`` ``[d_mlp, d_model]``, ``b_out``, ``ln_final.w``/``.b``, ``unembed.W_U`` ``[d_model, d_vocab]``.

Example:
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

from collections.abc import Mapping

import torch
from torch import Tensor

from capwrap.models.spec import ModelSpec

__all__ = ["canonical_views", "hf_shapes"]


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


def canonical_views(spec: ModelSpec, storage: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """TransformerLens-named views of a Hugging Face state dict (or of its gradients).

    Args:
        spec: the model's shape and architecture.
        storage: Hugging Face parameter names to tensors, as in ``model.state_dict()``.

    Returns:
        Canonical names to views of ``storage``'s tensors (no copies).
    """
    missing = sorted(set(hf_shapes(spec)) - set(storage))
    if missing:
        raise KeyError(f"tensors missing for a {spec.architecture} model: {missing[:5]}")
    return (_gpt2_views if spec.architecture == "gpt2" else _llama_views)(spec, storage)


def hf_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """The Hugging Face parameter names and shapes of a model with this spec."""
    with torch.device("meta"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(spec.to_hf_config())
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return shapes
