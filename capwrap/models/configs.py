"""Reading ``transformers`` configs into specs: one reader for every family.

Configs spell the same things in a few ways (``n_embd``/``hidden_size``, ``rotary_pct``/
``partial_rotary_factor``, ``rope_theta``/``rope_parameters``, ``layer_types``/``sliding_window``/
GPT-Neo's ``attention_layers``). :func:`read_hf_config` reads them all into sizes and
:class:`~capwrap.models.features.BlockFeatures`, starting from the family's defaults
(:data:`~capwrap.models.families.FAMILIES`) and taking from the config what the family lets it
change. What the config says that capwrap does not model (a rope scaling, a bidirectional Gemma)
becomes a *problem*: such checkpoints still load, through TransformerLens's bridge, with the config
kept in the spec.

Examples:
    >>> import transformers
    >>> config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> spec = spec_from_hf_config(config)
    >>> spec.architecture, spec.n_key_value_heads, spec.features.qkv_bias
    ('qwen2', 2, True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from capwrap.errors import ConfigError
from capwrap.models.families import FAMILIES, HF_ACTIVATIONS, Family, family_of_model_type
from capwrap.models.features import BlockFeatures

__all__ = ["read_hf_config", "spec_from_hf_config", "ConfigReading", "bridge_architecture"]


@dataclass
class ConfigReading:
    """What a ``transformers`` config says, in capwrap's terms.

    Attributes:
        family: capwrap's family for the config's ``model_type`` (``None``: none).
        sizes: ``ModelSpec`` fields (sizes, norm epsilon, rotary base, attention pattern).
        features: the block features (the family's defaults, changed where the config says so).
        problems: what the config says that capwrap's features do not describe.
    """

    family: Family | None
    sizes: dict[str, Any]
    features: BlockFeatures
    problems: list[str] = field(default_factory=list)


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the config has (and is not ``None``)."""
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception as exc:  # noqa: BLE001 - transformers raises for a value set per layer (Gemma-4's head_dim)
            raise ConfigError(
                f"the {getattr(config, 'model_type', '?')} config's {name} cannot be read as one value "
                f"({type(exc).__name__}: {exc}); capwrap reads models whose layers share their sizes"
            ) from None
        if value is not None:
            return value
    return default


def _rope_parameters(config: Any) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer kind (``global``/``local``), from either config generation."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or full)
    else:
        full = local = dict(params)
    for p in (full, local):
        p.setdefault("rope_theta", _get(config, "rope_theta", "rotary_emb_base", default=10000.0))
    if getattr(config, "rope_local_base_freq", None) is not None:  # Gemma-3 configs before transformers 5
        local = {**local, "rope_theta": config.rope_local_base_freq}
    return {"global": full, "local": local}


def _attention_layers(config: Any, n_layers: int) -> tuple[tuple[str, ...], int, list[str]]:
    """Per-layer ``global``/``local``, the window, and problems."""
    problems: list[str] = []
    kinds: list[str]
    if getattr(config, "layer_types", None):
        names = {"full_attention": "global", "sliding_attention": "local"}
        unknown = sorted({t for t in config.layer_types if t not in names})
        if unknown:
            problems.append(f"layer types {unknown}")
        kinds = [names.get(t, "global") for t in config.layer_types]
    elif getattr(config, "attention_layers", None):  # GPT-Neo
        kinds = list(config.attention_layers)
    elif _get(config, "sliding_window") and getattr(config, "use_sliding_window", True):
        kinds = ["local"] * n_layers
    else:
        kinds = ["global"] * n_layers
    window = int(_get(config, "sliding_window", "window_size", default=0) or 0) if "local" in kinds else 0
    n_ctx = _get(config, "max_position_embeddings", "n_positions", default=0)
    if window and n_ctx and window >= n_ctx:  # a window as long as the context is no window
        kinds, window = ["global"] * n_layers, 0
    return tuple(kinds), window, problems


def read_hf_config(config: Any) -> ConfigReading:
    """Sizes, features and problems of a ``transformers`` config (see the module docstring)."""
    family = family_of_model_type(getattr(config, "model_type", None))
    base = family.features if family else _guess_features(config)
    problems: list[str] = []
    d_model = _get(config, "hidden_size", "n_embd", "d_model")
    n_heads = _get(config, "num_attention_heads", "n_head", "num_heads")
    n_layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    if not all(isinstance(v, int) for v in (d_model, n_heads, n_layers)):
        raise ConfigError(
            f"the {getattr(config, 'model_type', '?')} config has no hidden size, head count or layer count "
            "capwrap can read; it is not a decoder-only transformer capwrap can map"
        )
    d_head = _get(config, "head_dim")
    if d_head is None:
        if d_model % n_heads:
            raise ConfigError(
                f"d_model={d_model} is not divisible by n_heads={n_heads} and the config gives no head_dim; "
                "the config was edited by hand or is corrupt: fix the hidden size or the head count"
            )
        d_head = d_model // n_heads
    kinds, window, pattern_problems = _attention_layers(config, n_layers)
    problems += pattern_problems
    rope = _rope_parameters(config)
    sizes: dict[str, Any] = {
        "d_vocab": _get(config, "vocab_size"),
        "n_ctx": _get(config, "max_position_embeddings", "n_positions", "n_ctx", "seq_length"),
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": _get(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * d_model),
        "n_key_value_heads": _get(config, "num_key_value_heads", default=n_heads),
        "tie_embeddings": bool(_get(config, "tie_word_embeddings", default=True)),
        "norm_eps": float(_get(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
        "rotary_base": float(rope["global"]["rope_theta"]),
        "attention_layers": kinds,
        "window_size": window,
    }
    observed: dict[str, Any] = {}
    act_name = _get(config, "hidden_activation", "hidden_act", "activation_function")
    if act_name is not None:
        if act_name in HF_ACTIVATIONS:
            observed["act"] = HF_ACTIVATIONS[act_name]
        else:
            problems.append(f"activation {act_name!r} (capwrap computes {sorted(set(HF_ACTIVATIONS.values()))})")
    if getattr(config, "attention_bias", None) is not None:
        observed["qkv_bias"] = observed["o_bias"] = bool(config.attention_bias)
    if getattr(config, "mlp_bias", None) is not None:
        observed["mlp_bias"] = bool(config.mlp_bias)
    if getattr(config, "use_parallel_residual", None) is not None:
        observed["parallel"] = bool(config.use_parallel_residual)
    fraction = _get(config, "partial_rotary_factor", "rotary_pct", default=rope["global"].get("partial_rotary_factor"))
    if fraction is not None:
        observed["rotary_fraction"] = float(fraction)
    if rope["local"]["rope_theta"] != rope["global"]["rope_theta"]:
        observed["rotary_base_local"] = float(rope["local"]["rope_theta"])
    if getattr(config, "query_pre_attn_scalar", None) is not None:
        scale = float(config.query_pre_attn_scalar) ** 0.5
        observed["attn_scale"] = 0.0 if abs(scale - d_head**0.5) < 1e-9 else scale
    for attr, name in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "logit_softcap")):
        if attr in config.to_dict():
            observed[name] = float(getattr(config, attr) or 0.0)
    for kind, params in rope.items():
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            problems.append(
                f"rope scaling {rope_type!r}"
                + (" of local layers" if rope["local"] is not rope["global"] and kind == "local" else "")
            )
    if getattr(config, "use_bidirectional_attention", None):
        problems.append("bidirectional attention (use_bidirectional_attention)")
    if (
        getattr(config, "scale_attn_by_inverse_layer_idx", False)
        or getattr(config, "scale_attn_weights", True) is False
    ):
        problems.append("attention scores scaled by layer index (scale_attn_by_inverse_layer_idx) or unscaled")
    changes = {}
    for name, value in observed.items():
        if value == getattr(base, name):
            continue
        if (
            family is None
            or family.supports(name)
            or (name in ("qkv_bias", "o_bias") and family.supports("attention_bias"))
        ):
            changes[name] = value
        else:
            problems.append(f"{name}={value!r} (capwrap's {family.title} has {getattr(base, name)!r})")
    try:
        features = base.replace(**changes)
    except ConfigError as err:
        problems.append(str(err))
        features = base
    if family is not None:
        problems += _family_problems(family, sizes)
    return ConfigReading(family, sizes, features, sorted(set(problems)))


def _family_problems(family: Family, sizes: dict[str, Any]) -> list[str]:
    """Sizes and patterns the family's config cannot express (a config edited by hand, an older format)."""
    problems = []
    if sizes["n_key_value_heads"] != sizes["n_heads"] and not family.supports("n_key_value_heads"):
        problems.append("grouped-query attention")
    if sizes["d_head"] * sizes["n_heads"] != sizes["d_model"] and not family.supports("d_head"):
        problems.append(f"head_dim {sizes['d_head']} != hidden_size / heads")
    kinds = set(sizes["attention_layers"])
    if "local" in kinds and not (family.supports("layer_types") or (family.supports("windows") and kinds == {"local"})):
        problems.append("sliding-window attention layers")
    return problems


def _guess_features(config: Any) -> BlockFeatures:
    """Features of a config of no known family, from the fields that give them away (for messages)."""
    rms = getattr(config, "rms_norm_eps", None) is not None
    act = HF_ACTIVATIONS.get(_get(config, "hidden_activation", "hidden_act", "activation_function", default=""), "silu")
    rotary = bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))
    biases = bool(getattr(config, "attention_bias", False))
    return BlockFeatures(
        norm="rms" if rms else "layer",
        positions="rotary" if rotary else "learned",
        act=act,  # type: ignore[arg-type]
        gated=rms,  # Llama-style configs (RMSNorm) have gated MLPs; GPT-style ones do not
        qkv_bias=biases,
        o_bias=biases,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )


def model_classes(model_type: str | None, architectures: list[str] | None) -> list[str]:
    """The ``transformers`` class names of a config: those it lists, or, for a config built in memory
    (which lists none), transformers' own causal-LM class for its model type.

    Examples:
        >>> model_classes("qwen2", None), model_classes("qwen2", ["MyQwen"])
        (['Qwen2ForCausalLM'], ['MyQwen'])
    """
    if architectures:
        return list(architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "", "")]


def bridge_architecture(config: Any) -> str | None:
    """The TransformerBridge adapter (a ``...ForCausalLM`` class name) for a config, if the installed
    TransformerLens has one."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    for name in model_classes(getattr(config, "model_type", None), getattr(config, "architectures", None)):
        if name in SUPPORTED_ARCHITECTURES and name.endswith(("ForCausalLM", "LMHeadModel")):
            return name
    return None


#: Config entries that say where and how a checkpoint was saved, not what the model computes: a
#: fine-tune saved elsewhere, by another transformers version or in another dtype is the same model.
_NOT_ARCHITECTURE = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset"}
)


def spec_from_hf_config(config: Any) -> Any:
    """The :class:`~capwrap.models.ModelSpec` of a ``transformers`` config.

    A config of a capwrap family that says nothing capwrap does not model gives a plain spec;
    otherwise, if TransformerLens's bridge runs the architecture, a spec that keeps the config
    (``hf_config``). Anything else is an error that names the families and the closest one.
    """
    from capwrap.models.spec import ModelSpec

    reading = read_hf_config(config)
    family = reading.family
    if family is not None and not reading.problems:
        return ModelSpec(architecture=family.name, features=reading.features, **reading.sizes)
    if family is None and bridge_architecture(config) is None:
        raise ConfigError(_unknown_message(config, reading))
    sizes = dict(reading.sizes)
    if family is not None and reading.problems:
        # Keep the shapes readable by the family's tables; the config carries the rest.
        sizes["attention_layers"], sizes["window_size"] = (), 0
    return ModelSpec(
        architecture=family.name if family else str(config.model_type),
        features=reading.features,
        hf_config=json.dumps(
            {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}, sort_keys=True, default=str
        ),
        **sizes,
    )


def _unknown_message(config: Any, reading: ConfigReading) -> str:
    model_type = getattr(config, "model_type", None)
    classes = getattr(config, "architectures", None) or []
    known = ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values() if f.hf_class)
    message = (
        f"model type {model_type!r} ({', '.join(classes) or 'no architectures listed'}) is neither one of "
        f"capwrap's families — {known} — nor an architecture the installed TransformerLens bridge runs"
    )
    guessed = reading.features
    if guessed.norm == "rms" and guessed.positions == "rotary":
        ranked = sorted(
            (len(f.features.differences(guessed)), f.name, f.features.differences(guessed))
            for f in FAMILIES.values()
            if f.hf_class and f.features.norm == "rms"
        )
        _, name, diffs = ranked[0]
        detail = "has the same block features as far as its config shows" if not diffs else "differs in " + "; ".join(diffs)
        message += (
            f". It reads as a Llama-like decoder (RMSNorm, rotary positions); the closest capwrap family is "
            f"{name!r}, which {detail}. capwrap cannot know its tensor names and block details from the config "
            "alone: convert the checkpoint to a supported family, or ask for the family to be added"
        )
    return message
