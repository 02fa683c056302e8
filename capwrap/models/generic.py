"""The generic path: architectures TransformerLens's bridge runs but capwrap has no family entry for.

Such a model still loads (on the bridge, which runs the ``transformers`` model itself), its hooks
have TransformerLens's names, and its weights get canonical names from what the bridge's
architecture adapter already knows: which module is the embedding, each block's norms, attention
and MLP, the final norm and the unembedding. Weights keep their Hugging Face shapes under those
names — ``blocks.3.attn.q_proj.weight``, ``blocks.3.mlp.fc1.weight``, ``embed.W_E``,
``unembed.W_U`` — so the component map has embeddings, norms, attention and MLP layers (not single
heads or neurons in general: splitting fused projections needs a family's table), weight diffs and the
hook-based analyzers work, and capwrap's fast forward pass declines (``engine="hooks"`` runs instead).
Where the adapter names separate query/key/value/output and MLP projections laid out as ``nn.Linear``
usually is (Llama-like models: Granite, OPT, ...), they get TransformerLens's head and neuron shapes
(``W_Q`` ``[n_heads, d_model, d_head]``, ``W_in`` ``[d_model, d_mlp]``), so single heads and neurons
are components too.

Examples:
    >>> import transformers
    >>> from capwrap.models.spec import ModelSpec
    >>> config = transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
    ...     num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16)
    >>> spec = ModelSpec.from_hf_config(config)
    >>> spec.architecture, spec.family is None
    ('opt', True)
    >>> sorted(n for n in generic_names(spec).values() if n.startswith("blocks.0.attn."))[:3]
    ['blocks.0.attn.W_K', 'blocks.0.attn.W_O', 'blocks.0.attn.W_Q']
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from capwrap.models.spec import ModelSpec

__all__ = ["generic_names", "generic_views", "adapter_for"]

#: Adapter component keys -> canonical whole-matrix names (their ``weight``).
_MATRICES = {"embed": "embed.W_E", "pos_embed": "pos_embed.W_pos", "unembed": "unembed.W_U"}


def adapter_for(spec: ModelSpec) -> Any:
    """TransformerLens's architecture adapter for a spec (built from its config; no model needed)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources import build_bridge_config_from_hf

    from capwrap.models.model import _bridge_architecture

    config = build_bridge_config_from_hf(spec.to_hf_config(), _bridge_architecture(spec), "capwrap", torch.float32)
    return ArchitectureAdapterFactory.select_architecture_adapter(config)


def _prefixes(spec: ModelSpec) -> list[tuple[str, str]]:
    """(Hugging Face module prefix, canonical prefix) pairs from the adapter's component mapping."""
    mapping = adapter_for(spec).component_mapping or {}
    pairs: list[tuple[str, str]] = []
    for key, component in mapping.items():
        if key == "blocks":
            continue
        if component.name:
            pairs.append((component.name, key))
    blocks = mapping.get("blocks")
    if blocks is not None and blocks.name:
        for layer in range(spec.n_layers):
            base = f"{blocks.name}.{layer}"
            for key, sub in blocks.submodules.items():
                if sub.name:
                    pairs.append((f"{base}.{sub.name}", f"blocks.{layer}.{key}"))
                else:  # a container-less sub-layer (OPT's MLP): its parts sit in the block itself
                    pairs += [
                        (f"{base}.{part.name}", f"blocks.{layer}.{key}.{part.name}")
                        for part in sub.submodules.values()
                        if part.name
                    ]
    return sorted(pairs, key=lambda p: -len(p[0]))  # longest prefix first


def _structured(spec: ModelSpec, shapes: dict[str, torch.Size], prefixes: list[tuple[str, str]]) -> dict[str, str]:
    """Hugging Face tensor -> canonical head/neuron-shaped name, for the projections laid out as
    ``nn.Linear`` usually is: separate query, key, value and output projections of ``[heads * d_head,
    d_model]`` (``[d_model, heads * d_head]``), MLP input/gate/output projections of ``[d_mlp,
    d_model]`` (``[d_model, d_mlp]``). Anything else keeps its own name and shape."""
    d, h, kv, dh, m = spec.d_model, spec.n_heads, spec.n_key_value_heads, spec.d_head, spec.d_mlp
    expected = {
        "attn.q": ("attn.W_Q", "attn.b_Q", (h * dh, d)),
        "attn.k": ("attn.W_K", "attn.b_K", (kv * dh, d)),
        "attn.v": ("attn.W_V", "attn.b_V", (kv * dh, d)),
        "attn.o": ("attn.W_O", "attn.b_O", (d, h * dh)),
        "mlp.in": ("mlp.W_in", "mlp.b_in", (m, d)),
        "mlp.gate": ("mlp.W_gate", None, (m, d)),
        "mlp.out": ("mlp.W_out", "mlp.b_out", (d, m)),
    }
    by_prefix = dict((canon, hf) for hf, canon in prefixes)
    out: dict[str, str] = {}
    for layer in range(spec.n_layers):
        found: dict[str, str] = {}
        for role, (weight, bias, shape) in expected.items():
            hf = by_prefix.get(f"blocks.{layer}.{role}")
            if hf is None or tuple(shapes.get(f"{hf}.weight", ())) != shape:
                continue
            found[f"{hf}.weight"] = f"blocks.{layer}.{weight}"
            if bias and f"{hf}.bias" in shapes:
                found[f"{hf}.bias"] = f"blocks.{layer}.{bias}"
        roles = {v.split(".", 2)[2] for v in found.values()}
        if not {"attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O"} <= roles:  # all four, or none
            found = {k: v for k, v in found.items() if ".attn." not in v}
        if not {"mlp.W_in", "mlp.W_out"} <= roles:
            found = {k: v for k, v in found.items() if ".mlp." not in v}
        out.update(found)
    return out


def _prefixes_with_parts(spec: ModelSpec) -> list[tuple[str, str]]:
    """:func:`_prefixes`, plus the attention and MLP projections by role (``blocks.0.attn.q``)."""
    mapping = adapter_for(spec).component_mapping or {}
    pairs = list(_prefixes(spec))
    blocks = mapping.get("blocks")
    if blocks is None or not blocks.name:
        return pairs
    for layer in range(spec.n_layers):
        for key in ("attn", "mlp"):
            sub = blocks.submodules.get(key)
            if sub is None:
                continue
            base = f"{blocks.name}.{layer}" + (f".{sub.name}" if sub.name else "")
            pairs += [
                (f"{base}.{part.name}", f"blocks.{layer}.{key}.{role}")
                for role, part in sub.submodules.items()
                if part.name
            ]
    return pairs


@functools.lru_cache(maxsize=16)
def generic_names(spec: ModelSpec) -> dict[str, str]:
    """Hugging Face tensor name -> canonical name, for every tensor of a generic checkpoint."""
    from capwrap.models.layouts import hf_shapes

    shapes = hf_shapes(spec)
    prefixes = _prefixes(spec)
    structured = _structured(spec, shapes, _prefixes_with_parts(spec))
    out = {}
    for name in shapes:
        canonical = structured.get(name, f"other.{name}")
        if name not in structured:
            for hf, canon in prefixes:
                if name.startswith(hf + "."):
                    rest = name[len(hf) + 1 :]
                    canonical = _MATRICES[canon] if canon in _MATRICES and rest == "weight" else f"{canon}.{rest}"
                    break
        out[name] = canonical
    return out


def generic_views(spec: ModelSpec, storage: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical views of a generic checkpoint's tensors: projections in TransformerLens's head and
    neuron shapes where they are laid out as usual, the unembedding transposed to ``[d_model,
    d_vocab]``, everything else in its own shape."""
    h, kv, dh = spec.n_heads, spec.n_key_value_heads, spec.d_head
    heads = {"W_Q": h, "W_K": kv, "W_V": kv, "b_Q": h, "b_K": kv, "b_V": kv}
    out: dict[str, Tensor] = {}
    for name, canonical in generic_names(spec).items():
        t = storage[name]
        leaf = canonical.rsplit(".", 1)[-1]
        if canonical == "unembed.W_U":
            t = t.T
        elif leaf in ("W_Q", "W_K", "W_V"):
            t = t.unflatten(0, (heads[leaf], dh)).transpose(1, 2)
        elif leaf in ("b_Q", "b_K", "b_V"):
            t = t.unflatten(0, (heads[leaf], dh))
        elif leaf == "W_O":
            t = t.unflatten(1, (h, dh)).permute(1, 2, 0)
        elif leaf in ("W_in", "W_gate", "W_out"):
            t = t.T
        out[canonical] = t
    if spec.tie_embeddings and "unembed.W_U" not in out and "embed.W_E" in out:
        out["unembed.W_U"] = out["embed.W_E"].T
    return out
