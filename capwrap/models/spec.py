"""`ModelSpec`: the shape of a transformer, independent of the backend that runs it.

A spec converts to a Hugging Face config (the on-disk format of capwrap checkpoints, and what
:class:`TransformerBridge` wraps) and to a ``HookedTransformerConfig`` (TransformerLens 3.x).

Examples:
    >>> spec = ModelSpec(d_vocab=50, n_ctx=64, n_layers=2, d_model=32, n_heads=4)
    >>> spec.d_head, spec.d_mlp
    (8, 128)
    >>> ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from capwrap.errors import ConfigError

__all__ = ["ModelSpec", "ARCHITECTURES"]

Architecture = Literal["gpt2", "gpt_neo", "llama", "tracr"]
#: Architectures capwrap maps onto TransformerLens components, with their HF class names
#: (``tracr``: compiled RASP programs, which have no Hugging Face equivalent).
ARCHITECTURES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM",
    "llama": "LlamaForCausalLM",
    "tracr": "TransformerLensNative",
}


@dataclass(frozen=True)
class ModelSpec:
    """Shape and architecture of a decoder-only transformer.

    Args:
        d_vocab: vocabulary size.
        n_ctx: context length (longest sequence the model can embed).
        n_layers: number of transformer blocks.
        d_model: width of the residual stream.
        n_heads: attention heads per block.
        d_head: width of one head; defaults to ``d_model // n_heads``.
        d_mlp: hidden width of the MLPs; defaults to ``4 * d_model``.
        architecture: ``"gpt2"`` (learned positions, LayerNorm, GELU MLP), ``"gpt_neo"`` (as
            gpt2, but separate query/key/value projections without biases, unscaled attention
            scores, and some layers attending only to a local window: the TinyStories models),
            ``"llama"`` (rotary positions, RMSNorm, gated SiLU MLP, optional grouped-query
            attention) or ``"tracr"`` (a compiled RASP program: learned positions, no
            normalization, ReLU MLP, bidirectional attention, an output vocabulary of its own).
        n_key_value_heads: key/value heads for grouped-query attention (llama only).
        tie_embeddings: whether the unembedding is the transpose of the embedding.
        norm_eps: epsilon of the normalization layers.
        rotary_base: base of the rotary embedding (llama only).
        d_vocab_out: size of the output vocabulary (tracr only; others predict tokens).
        attention_layers: per layer, ``"global"`` or ``"local"`` (gpt_neo only; empty: all
            global). A local layer's queries see only the last ``window_size`` positions.
        window_size: how many positions a local attention layer sees (its own included).
    """

    d_vocab: int
    n_ctx: int
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 0
    d_mlp: int = 0
    architecture: Architecture = "gpt2"
    n_key_value_heads: int = 0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rotary_base: float = 10000.0
    d_vocab_out: int = 0
    attention_layers: tuple[str, ...] = ()
    window_size: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; capwrap supports {sorted(ARCHITECTURES)}")
        for field in ("d_vocab", "n_ctx", "n_layers", "d_model", "n_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelSpec.{field} must be a positive integer, got {value!r}")
        if self.d_head == 0:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "choose n_heads that divides d_model or give d_head explicitly"
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.d_mlp == 0:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        if self.n_key_value_heads == 0:
            object.__setattr__(self, "n_key_value_heads", self.n_heads)
        if self.d_vocab_out == 0:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        if self.architecture != "tracr" and self.d_vocab_out != self.d_vocab:
            raise ConfigError("a separate output vocabulary (d_vocab_out) needs architecture='tracr'")
        if self.architecture != "llama" and self.n_key_value_heads != self.n_heads:
            raise ConfigError("grouped-query attention (n_key_value_heads) needs architecture='llama'")
        if self.n_heads % self.n_key_value_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_key_value_heads={self.n_key_value_heads}"
            )
        if self.architecture in ("gpt2", "gpt_neo") and self.d_head * self.n_heads != self.d_model:
            raise ConfigError(f"{self.architecture} models need d_head * n_heads == d_model")
        self._check_attention_layers()

    def _check_attention_layers(self) -> None:
        layers = tuple(self.attention_layers)  # JSON gives lists; keep specs comparable
        if layers and len(layers) != self.n_layers:
            raise ConfigError(
                f"attention_layers names {len(layers)} layers but the model has n_layers={self.n_layers}; "
                "give one 'global' or 'local' per layer"
            )
        wrong = sorted({kind for kind in layers if kind not in ("global", "local")})
        if wrong:
            raise ConfigError(f"attention_layers may hold only 'global' and 'local', got {wrong}")
        if "local" in layers:
            if self.architecture != "gpt_neo":
                raise ConfigError("local attention layers need architecture='gpt_neo'")
            if self.window_size <= 0:
                raise ConfigError("local attention layers need a positive window_size (TinyStories models use 256)")
        else:
            layers = ()  # all global: one spelling, so equal models have equal specs
        object.__setattr__(self, "attention_layers", layers)

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """``"global"`` or ``"local"`` for each layer."""
        return self.attention_layers or ("global",) * self.n_layers

    @property
    def attn_scale(self) -> float:
        """What attention scores are divided by: sqrt(d_head), or 1 for gpt_neo (unscaled)."""
        return 1.0 if self.architecture == "gpt_neo" else float(self.d_head) ** 0.5

    @property
    def has_hf_equivalent(self) -> bool:
        """Whether checkpoints of this architecture are Hugging Face folders."""
        return self.architecture != "tracr"

    @property
    def n_params(self) -> int:
        """Number of parameters in the checkpoint format (tied embeddings counted once)."""
        d, h, dh, kv, m = self.d_model, self.n_heads, self.d_head, self.n_key_value_heads, self.d_mlp
        if self.architecture == "tracr":
            attn = 4 * h * d * dh + 3 * h * dh + d
            return self.d_vocab * d + self.n_ctx * d + self.n_layers * (attn + 2 * d * m + m + d) + d * self.d_vocab_out
        embed = self.d_vocab * d * (1 if self.tie_embeddings else 2)
        if self.architecture in ("gpt2", "gpt_neo"):
            qkv_bias = 3 * d if self.architecture == "gpt2" else 0
            block = 4 * d + (3 * d * d + qkv_bias) + (d * d + d) + (d * m + m) + (m * d + d)
            return embed + self.n_ctx * d + self.n_layers * block + 2 * d
        block = 2 * d + d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * m
        return embed + self.n_layers * block + d

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serializable dict (what reading it back from JSON gives)."""
        data = dataclasses.asdict(self)
        data["attention_layers"] = list(self.attention_layers)
        return data

    def differences(self, other: ModelSpec) -> str:
        """The fields in which ``other`` differs, as ``"n_layers (2 vs 4), d_model (...)"``; empty if none.

        Examples:
            >>> ModelSpec(d_vocab=9, n_ctx=8, n_layers=2).differences(ModelSpec(d_vocab=9, n_ctx=8, n_layers=4))
            'n_layers (2 vs 4)'
        """
        a, b = self.to_dict(), other.to_dict()
        return ", ".join(f"{f} ({a[f]} vs {b[f]})" for f in a if a[f] != b[f])

    def same_as(self, recorded: dict[str, Any] | None) -> bool:
        """Whether a spec saved as a dict (a run store's, a checkpoint's) describes this model.
        Fields the saved dict lacks (written by an older capwrap) take their defaults."""
        try:
            return recorded is not None and ModelSpec.from_dict(recorded) == self
        except (ConfigError, TypeError):
            return False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown fields are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelSpec fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    # ---- Hugging Face --------------------------------------------------------------------
    def to_hf_config(self) -> Any:
        """The equivalent ``transformers`` config (dropout off: analyses need determinism)."""
        import transformers

        if not self.has_hf_equivalent:
            raise ConfigError(f"{self.architecture} models have no Hugging Face equivalent")
        if self.architecture == "gpt2":
            return transformers.GPT2Config(
                vocab_size=self.d_vocab,
                n_positions=self.n_ctx,
                n_embd=self.d_model,
                n_layer=self.n_layers,
                n_head=self.n_heads,
                n_inner=self.d_mlp,
                # GPT-2's tanh-approximate GELU; PyTorch's fused kernel for it ("gelu_new" is the same
                # function written as Python-level tensor operations, several times slower on CPU).
                activation_function="gelu_pytorch_tanh",
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                layer_norm_epsilon=self.norm_eps,
                tie_word_embeddings=self.tie_embeddings,
                bos_token_id=None,
                eos_token_id=None,
                architectures=[ARCHITECTURES["gpt2"]],
            )
        if self.architecture == "gpt_neo":
            return transformers.GPTNeoConfig(
                vocab_size=self.d_vocab,
                max_position_embeddings=self.n_ctx,
                hidden_size=self.d_model,
                num_layers=self.n_layers,
                num_heads=self.n_heads,
                intermediate_size=self.d_mlp,
                attention_types=[[[kind], 1] for kind in self.attention_kinds],
                window_size=self.window_size or 256,
                activation_function="gelu_pytorch_tanh",  # = the checkpoints' gelu_new, fused
                resid_dropout=0.0,
                embed_dropout=0.0,
                attention_dropout=0.0,
                layer_norm_epsilon=self.norm_eps,
                tie_word_embeddings=self.tie_embeddings,
                bos_token_id=None,
                eos_token_id=None,
                architectures=[ARCHITECTURES["gpt_neo"]],
            )
        return transformers.LlamaConfig(
            vocab_size=self.d_vocab,
            max_position_embeddings=self.n_ctx,
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_key_value_heads,
            head_dim=self.d_head,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rotary_base,
            tie_word_embeddings=self.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            architectures=[ARCHITECTURES["llama"]],
        )

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        """Read a ``transformers`` config of a supported architecture."""
        model_type = getattr(config, "model_type", None)
        if model_type == "gpt2":
            _check_tanh_gelu(config)
            return cls(
                architecture="gpt2",
                d_vocab=config.vocab_size,
                n_ctx=config.n_positions,
                n_layers=config.n_layer,
                d_model=config.n_embd,
                n_heads=config.n_head,
                d_mlp=config.n_inner or 4 * config.n_embd,
                tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
                norm_eps=config.layer_norm_epsilon,
            )
        if model_type == "gpt_neo":
            _check_tanh_gelu(config)
            layers = tuple(config.attention_layers)
            return cls(
                architecture="gpt_neo",
                d_vocab=config.vocab_size,
                n_ctx=config.max_position_embeddings,
                n_layers=config.num_layers,
                d_model=config.hidden_size,
                n_heads=config.num_heads,
                d_mlp=config.intermediate_size or 4 * config.hidden_size,
                tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
                norm_eps=config.layer_norm_epsilon,
                attention_layers=layers,
                window_size=config.window_size if "local" in layers else 0,
            )
        if model_type == "llama":
            if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
                raise ConfigError("llama checkpoints with attention or MLP biases are not supported")
            rope = getattr(config, "rope_scaling", None) or {}
            if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ConfigError(f"llama rope scaling {rope!r} is not supported yet")
            base = getattr(config, "rope_theta", None)
            if base is None:
                base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
            return cls(
                architecture="llama",
                d_vocab=config.vocab_size,
                n_ctx=config.max_position_embeddings,
                n_layers=config.num_hidden_layers,
                d_model=config.hidden_size,
                n_heads=config.num_attention_heads,
                d_head=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                d_mlp=config.intermediate_size,
                n_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                norm_eps=config.rms_norm_eps,
                rotary_base=float(base),
            )
        raise ConfigError(
            f"model type {model_type!r} is not supported; capwrap maps these architectures onto "
            f"TransformerLens components: {sorted(ARCHITECTURES)}"
        )

    # ---- TransformerLens HookedTransformer (TL 3.x) -------------------------------------------
    def to_hooked_config(self) -> Any:
        """The equivalent ``HookedTransformerConfig`` (TransformerLens 3.x only)."""
        from transformer_lens import HookedTransformerConfig

        common = dict(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            n_ctx=self.n_ctx,
            eps=self.norm_eps,
            default_prepend_bos=False,
        )
        if self.architecture == "gpt2":
            return HookedTransformerConfig(act_fn="gelu_pytorch_tanh", normalization_type="LN", **common)
        if self.architecture == "gpt_neo":
            return HookedTransformerConfig(
                act_fn="gelu_pytorch_tanh",
                normalization_type="LN",
                use_attn_scale=False,
                use_local_attn="local" in self.attention_layers,
                attn_types=list(self.attention_kinds),
                window_size=self.window_size or None,
                **common,
            )
        if self.architecture == "tracr":
            return HookedTransformerConfig(
                act_fn="relu",
                normalization_type=None,
                attention_dir="bidirectional",
                d_vocab_out=self.d_vocab_out,
                **common,
            )
        return HookedTransformerConfig(
            act_fn="silu",
            normalization_type="RMS",
            final_rms=True,
            gated_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=self.d_head,
            rotary_base=int(self.rotary_base),
            rotary_adjacent_pairs=False,
            n_key_value_heads=self.n_key_value_heads if self.n_key_value_heads != self.n_heads else None,
            **common,
        )

    # ---- TransformerLens TransformerBridge over its native model (tracr) ---------------------------
    def to_native_config(self) -> Any:
        """The ``TransformerBridgeConfig`` of TransformerLens's native model (tracr only)."""
        from transformer_lens.config import TransformerBridgeConfig

        if self.architecture != "tracr":
            raise ConfigError("only tracr models use TransformerLens's native model; others wrap Hugging Face models")
        return TransformerBridgeConfig(
            d_model=self.d_model,
            d_head=self.d_head,
            n_layers=self.n_layers,
            n_ctx=self.n_ctx,
            n_heads=self.n_heads,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            d_vocab_out=self.d_vocab_out,
            act_fn="relu",
            normalization_type=None,
            attention_dir="bidirectional",
            positional_embedding_type="standard",
            default_prepend_bos=False,
            architecture="TransformerLensNative",
        )


def _check_tanh_gelu(config: Any) -> None:
    """GPT-2 and GPT-Neo checkpoints must use the tanh-approximate GELU capwrap's models compute."""
    act = getattr(config, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{config.model_type} checkpoints with activation {act!r} are not supported")
