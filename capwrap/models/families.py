"""The decoder families capwrap knows: one registry entry each, and nothing else per family.

A :class:`Family` says where the family keeps its weights (:class:`TensorNames`: Hugging Face module
names, e.g. ``model.layers.{i}.self_attn.q_proj``), what its blocks compute
(:class:`~capwrap.models.features.BlockFeatures`, the family's defaults), which of those its
``transformers`` config can change, and how to write that config. Everything else — the canonical
weight views, the functional forward pass, the HookedTransformer config, the component map — is
written once over the features, so **adding a family means adding an entry to** :data:`FAMILIES`.

The module names agree with TransformerLens's architecture adapters (a test checks each entry
against the installed ``TransformerBridge`` adapter); architectures the bridge boots but capwrap has
no entry for run through the generic path (:func:`adapter_tensor_names` reads the names from the
adapter itself).

Examples:
    >>> FAMILIES["qwen2"].hf_class
    'Qwen2ForCausalLM'
    >>> FAMILIES["qwen2"].features.qkv_bias, FAMILIES["qwen2"].features.o_bias
    (True, False)
    >>> family_of_model_type("gemma3_text").name
    'gemma3'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from capwrap.models.features import BlockFeatures

if TYPE_CHECKING:
    from capwrap.models.spec import ModelSpec

__all__ = ["Family", "TensorNames", "FAMILIES", "family_of_model_type", "HF_ACTIVATIONS"]


@dataclass(frozen=True)
class TensorNames:
    """Where a family keeps each weight: Hugging Face module names (a tensor is ``{module}.weight``
    or ``{module}.bias``). Block modules are relative to ``{layers}.{i}``, attention projections to
    ``{layers}.{i}.{attn}``, MLP projections to ``{layers}.{i}.{mlp}``. A ``None`` module does not
    exist in the family.

    Args:
        conv1d: projections are GPT-2's ``Conv1D`` (``[in, out]``) rather than ``nn.Linear`` (``[out, in]``).
        qkv: a fused query/key/value projection, ``[q | k | v]`` along its outputs (GPT-2, Phi-3), or
            per head ``[head, (q, k, v), d_head]`` with ``qkv_per_head`` (GPT-NeoX).
        gate_up: a fused ``[gate | up]`` MLP input projection (Phi-3).
        qkv_conv1d: how separate ``q``/``k``/``v`` projections are stored where it differs from
            ``conv1d`` (the bridge's split copies of GPT-2's fused ``Conv1D`` are ``nn.Linear``).
    """

    embed: str
    layers: str
    ln_final: str | None
    unembed: str = "lm_head"
    pos_embed: str | None = None
    ln1: str | None = None
    ln1_post: str | None = None
    ln2: str | None = None
    ln2_post: str | None = None
    attn: str = "self_attn"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None
    qkv_per_head: bool = False
    o: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    mlp: str = "mlp"
    up: str | None = "up_proj"
    gate: str | None = "gate_proj"
    gate_up: str | None = None
    down: str = "down_proj"
    conv1d: bool = False
    qkv_conv1d: bool | None = None


#: transformers' activation names -> BlockFeatures.act.
HF_ACTIVATIONS: dict[str, str] = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
#: BlockFeatures.act -> the name capwrap writes into configs (the fused kernel for GPT-2's GELU).
_ACT_NAMES = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}


@dataclass(frozen=True)
class Family:
    """One decoder family.

    Args:
        name: capwrap's name for it (``ModelSpec.architecture``).
        title: what people call it (docs and messages).
        model_type: the ``model_type`` of its ``transformers`` config.
        hf_class: its ``transformers`` class, which is also the TransformerBridge adapter's key;
            ``None``: no Hugging Face equivalent (tracr).
        features: what its blocks compute by default.
        tensors: where it keeps its weights.
        configurable: what its config can change: :class:`BlockFeatures` fields, and
            ``n_key_value_heads`` (grouped-query attention), ``d_head`` (independent of
            ``d_model / n_heads``), ``attention_bias`` (``qkv_bias`` and ``o_bias``, together),
            ``windows`` (every layer local, one window) and ``layer_types`` (any per-layer pattern of
            local and global layers).
        config: the family's own ``transformers`` config arguments for a spec (beyond the sizes
            every family shares, which :meth:`hf_config` writes).
        size_names: how its config spells the shared sizes where it differs from the common names.
    """

    name: str
    title: str
    model_type: str
    hf_class: str | None
    features: BlockFeatures
    tensors: TensorNames
    configurable: frozenset[str] = frozenset()
    config: Callable[[ModelSpec], dict[str, Any]] = field(default=lambda spec: {}, repr=False, compare=False)
    size_names: dict[str, str] = field(default_factory=dict)

    def hf_config(self, spec: ModelSpec) -> Any:
        """The ``transformers`` config of a spec of this family (dropout off: analyses need determinism)."""
        import transformers

        sizes = {
            "vocab_size": spec.d_vocab,
            "max_position_embeddings": spec.n_ctx,
            "hidden_size": spec.d_model,
            "num_hidden_layers": spec.n_layers,
            "num_attention_heads": spec.n_heads,
            "intermediate_size": spec.d_mlp,
            "tie_word_embeddings": spec.tie_embeddings,
        }
        if "n_key_value_heads" in self.configurable:
            sizes["num_key_value_heads"] = spec.n_key_value_heads
        if "d_head" in self.configurable:
            sizes["head_dim"] = spec.d_head
        kwargs = {self.size_names.get(k, k): v for k, v in sizes.items() if self.size_names.get(k, k)}
        kwargs.update(self.config(spec))
        kwargs.setdefault("architectures", [self.hf_class])
        return transformers.AutoConfig.for_model(self.model_type, **kwargs)

    def supports(self, what: str) -> bool:
        """Whether the family's config can express ``what`` (a feature or one of the extra names above)."""
        return what in self.configurable


# ---- config arguments, shared by several families ----------------------------------------------------
def _rope(spec: ModelSpec, **extra: Any) -> dict[str, Any]:
    params = {"rope_type": "default", "rope_theta": spec.rotary_base, **extra}
    if spec.features.rotary_fraction != 1:
        params["partial_rotary_factor"] = spec.features.rotary_fraction
    return {"rope_parameters": params}


def _one_window(spec: ModelSpec) -> dict[str, Any]:
    """Families with one window for every layer (Mistral, Phi-3): all local, or none."""
    return {"sliding_window": spec.window_size if "local" in spec.attention_kinds else None}


def _layer_types(spec: ModelSpec) -> dict[str, Any]:
    """Families with a per-layer pattern (Qwen2/3, Gemma-2/3)."""
    kinds = {"global": "full_attention", "local": "sliding_attention"}
    out: dict[str, Any] = {"layer_types": [kinds[k] for k in spec.attention_kinds]}
    out["sliding_window"] = spec.window_size or spec.n_ctx
    return out


def _llama_like(spec: ModelSpec) -> dict[str, Any]:
    f = spec.features
    return {"rms_norm_eps": spec.norm_eps, "hidden_act": _ACT_NAMES[f.act], "attention_dropout": 0.0, **_rope(spec)}


def _attention_bias(spec: ModelSpec) -> dict[str, Any]:
    return {"attention_bias": spec.features.qkv_bias}


def _query_pre_attn_scalar(spec: ModelSpec) -> int:
    """Gemma configs scale attention scores by ``query_pre_attn_scalar ** -0.5``, an integer."""
    from capwrap.errors import ConfigError

    scalar = (spec.features.attn_scale or spec.d_head**0.5) ** 2
    if abs(scalar - round(scalar)) > 1e-6:
        raise ConfigError(f"Gemma configs need attn_scale**2 to be an integer, got {scalar:g}")
    return round(scalar)


def _gemma(spec: ModelSpec, **extra: Any) -> dict[str, Any]:
    f = spec.features
    return {
        "rms_norm_eps": spec.norm_eps,
        "hidden_activation": _ACT_NAMES[f.act],
        "query_pre_attn_scalar": _query_pre_attn_scalar(spec),
        "attn_logit_softcapping": f.attn_softcap or None,
        "final_logit_softcapping": f.logit_softcap or None,
        "attention_dropout": 0.0,
        **_attention_bias(spec),
        **_layer_types(spec),
        **extra,
    }


def _gpt2(spec: ModelSpec) -> dict[str, Any]:
    return {
        "activation_function": _ACT_NAMES[spec.features.act],
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": spec.norm_eps,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _gpt_neo(spec: ModelSpec) -> dict[str, Any]:
    return {
        "attention_types": [[[kind], 1] for kind in spec.attention_kinds],
        "window_size": spec.window_size or 256,
        "activation_function": _ACT_NAMES[spec.features.act],
        "resid_dropout": 0.0,
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "layer_norm_epsilon": spec.norm_eps,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _gpt_neox(spec: ModelSpec) -> dict[str, Any]:
    f = spec.features
    return {
        "layer_norm_eps": spec.norm_eps,
        "hidden_act": _ACT_NAMES[f.act],
        "use_parallel_residual": f.parallel,
        "attention_bias": f.qkv_bias,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        **_rope(spec, partial_rotary_factor=f.rotary_fraction),
    }


_LLAMA_FEATURES = BlockFeatures(
    norm="rms", positions="rotary", act="silu", gated=True, qkv_bias=False, o_bias=False, mlp_bias=False
)
_LLAMA_TENSORS = TensorNames(
    embed="model.embed_tokens",
    layers="model.layers",
    ln_final="model.norm",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
)
_GEMMA_TENSORS = TensorNames(
    embed="model.embed_tokens",
    layers="model.layers",
    ln_final="model.norm",
    ln1="input_layernorm",
    ln1_post="post_attention_layernorm",
    ln2="pre_feedforward_layernorm",
    ln2_post="post_feedforward_layernorm",
)
#: GPT-2's module names, which GPT-Neo keeps for everything but its attention.
_GPT2_STYLE_NAMES = dict(
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    layers="transformer.h",
    ln_final="transformer.ln_f",
    ln1="ln_1",
    ln2="ln_2",
)
_GQA = frozenset({"n_key_value_heads"})
_GEMMA_CONFIGURABLE = _GQA | {"d_head", "layer_types", "attn_scale", "attn_softcap", "logit_softcap", "act"}

#: Every family capwrap maps onto TransformerLens components, by ``ModelSpec.architecture``.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gpt2",
            "GPT-2",
            "gpt2",
            "GPT2LMHeadModel",
            BlockFeatures(),
            TensorNames(
                **_GPT2_STYLE_NAMES,
                attn="attn",
                q=None,
                k=None,
                v=None,
                qkv="c_attn",
                o="c_proj",
                up="c_fc",
                gate=None,
                down="c_proj",
                conv1d=True,
            ),
            frozenset({"act"}),
            _gpt2,
            {
                "hidden_size": "n_embd",
                "max_position_embeddings": "n_positions",
                "num_hidden_layers": "n_layer",
                "num_attention_heads": "n_head",
                "intermediate_size": "n_inner",
            },  # fmt: skip
        ),
        Family(
            "gpt_neo",
            "GPT-Neo (TinyStories)",
            "gpt_neo",
            "GPTNeoForCausalLM",
            BlockFeatures(qkv_bias=False, attn_scale=1.0),
            TensorNames(
                **_GPT2_STYLE_NAMES,
                attn="attn.attention",
                o="out_proj",
                up="c_fc",
                gate=None,
                down="c_proj",
            ),
            frozenset({"act", "layer_types"}),
            _gpt_neo,
            {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"},
        ),
        Family(
            "llama",
            "Llama",
            "llama",
            "LlamaForCausalLM",
            _LLAMA_FEATURES,
            _LLAMA_TENSORS,
            # no mlp_bias: a gate's bias is a term capwrap's blocks (and TransformerLens 3's GatedMLP, which
            # adds b_in after the gate's product) do not compute; such checkpoints run on the bridge
            _GQA | {"d_head", "attention_bias", "act"},
            lambda s: {**_llama_like(s), "attention_bias": s.features.qkv_bias, "mlp_bias": s.features.mlp_bias},
        ),
        Family(
            "mistral",
            "Mistral",
            "mistral",
            "MistralForCausalLM",
            _LLAMA_FEATURES,
            _LLAMA_TENSORS,
            _GQA | {"d_head", "windows", "act"},
            lambda s: {**_llama_like(s), **_one_window(s)},
        ),
        Family(
            "qwen2",
            "Qwen2 / Qwen2.5",
            "qwen2",
            "Qwen2ForCausalLM",
            _LLAMA_FEATURES.replace(qkv_bias=True),
            _LLAMA_TENSORS,
            _GQA | {"layer_types", "act"},
            lambda s: {**_llama_like(s), **_layer_types(s), "use_sliding_window": "local" in s.attention_kinds},
        ),
        Family(
            "qwen3",
            "Qwen3",
            "qwen3",
            "Qwen3ForCausalLM",
            _LLAMA_FEATURES.replace(qk_norm="head"),
            TensorNames(**{**_LLAMA_TENSORS.__dict__, "q_norm": "q_norm", "k_norm": "k_norm"}),
            _GQA | {"d_head", "layer_types", "attention_bias", "act"},
            lambda s: {
                **_llama_like(s),
                **_layer_types(s),
                **_attention_bias(s),
                "use_sliding_window": "local" in s.attention_kinds,
            },
        ),
        Family(
            "gpt_neox",
            "Pythia / GPT-NeoX",
            "gpt_neox",
            "GPTNeoXForCausalLM",
            BlockFeatures(parallel=True, positions="rotary", rotary_fraction=0.25, act="gelu"),
            TensorNames(
                embed="gpt_neox.embed_in",
                layers="gpt_neox.layers",
                ln_final="gpt_neox.final_layer_norm",
                ln1="input_layernorm",
                ln2="post_attention_layernorm",
                attn="attention",
                q=None,
                k=None,
                v=None,
                qkv="query_key_value",
                qkv_per_head=True,
                o="dense",
                up="dense_h_to_4h",
                gate=None,
                down="dense_4h_to_h",
            ),
            frozenset({"parallel", "rotary_fraction", "act", "attention_bias"}),
            _gpt_neox,
        ),
        Family(
            "gemma2",
            "Gemma-2",
            "gemma2",
            "Gemma2ForCausalLM",
            _LLAMA_FEATURES.replace(
                norm_offset=1.0,
                post_norm=True,
                act="gelu_tanh",
                attn_softcap=50.0,
                logit_softcap=30.0,
                embed_scale=True,
            ),  # fmt: skip
            _GEMMA_TENSORS,
            _GEMMA_CONFIGURABLE | {"attention_bias"},
            lambda s: {**_gemma(s), **_rope(s)},
        ),
        Family(
            "gemma3",
            "Gemma-3 (text)",
            "gemma3_text",
            "Gemma3ForCausalLM",
            _LLAMA_FEATURES.replace(
                norm_offset=1.0,
                post_norm=True,
                act="gelu_tanh",
                qk_norm="head",
                embed_scale=True,
                rotary_base_local=10000.0,
            ),  # fmt: skip
            TensorNames(**{**_GEMMA_TENSORS.__dict__, "q_norm": "q_norm", "k_norm": "k_norm"}),
            _GEMMA_CONFIGURABLE | {"attention_bias", "rotary_base_local"},
            lambda s: {
                **_gemma(s),
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": s.rotary_base},
                    "sliding_attention": {
                        "rope_type": "default",
                        "rope_theta": s.features.rotary_base_local or s.rotary_base,
                    },
                },
            },
        ),
        Family(
            "phi3",
            "Phi-3",
            "phi3",
            "Phi3ForCausalLM",
            _LLAMA_FEATURES,
            TensorNames(
                **{
                    **_LLAMA_TENSORS.__dict__,
                    "q": None,
                    "k": None,
                    "v": None,
                    "qkv": "qkv_proj",
                    "up": None,
                    "gate": None,
                    "gate_up": "gate_up_proj",
                }  # fmt: skip
            ),
            _GQA | {"windows", "rotary_fraction", "act"},
            lambda s: {
                **_llama_like(s),
                **_one_window(s),
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "pad_token_id": None,
                "bos_token_id": None,
                "eos_token_id": None,
            },  # fmt: skip
        ),
        Family(
            "olmo2",
            "OLMo-2",
            "olmo2",
            "Olmo2ForCausalLM",
            _LLAMA_FEATURES.replace(pre_norm=False, post_norm=True, qk_norm="all"),
            TensorNames(
                embed="model.embed_tokens",
                layers="model.layers",
                ln_final="model.norm",
                ln1_post="post_attention_layernorm",
                ln2_post="post_feedforward_layernorm",
                q_norm="q_norm",
                k_norm="k_norm",
            ),
            _GQA | {"attention_bias", "act"},
            lambda s: {**_llama_like(s), **_attention_bias(s)},
        ),
        Family(
            "tracr",
            "tracr (compiled RASP)",
            "tracr",
            None,
            BlockFeatures(norm="none", act="relu", causal=False),
            # TransformerLens's native model, the bridge's host for tracr (tracr checkpoints keep
            # canonical names: the model has no Hugging Face equivalent).
            TensorNames(
                embed="tok_embed",
                pos_embed="pos",
                layers="layers",
                ln_final=None,
                unembed="head",
                attn="attn",
                q="q",
                k="k",
                v="v",
                o="o",
                up="fc_in",
                gate=None,
                down="fc_out",
            ),
        ),
    )
}


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family whose ``transformers`` config has this ``model_type``, if capwrap has one."""
    return next((f for f in FAMILIES.values() if f.model_type == model_type and f.hf_class), None)
