"""`ModelSpec`: the shape of a transformer, independent of the backend that runs it.

A spec is a family (:data:`~capwrap.models.families.FAMILIES`: where the weights live), sizes, and
:class:`~capwrap.models.features.BlockFeatures` (what a block computes; the family's defaults unless
given). It converts to a Hugging Face config (the on-disk format of capwrap checkpoints, and what
:class:`TransformerBridge` wraps) and to a ``HookedTransformerConfig`` (TransformerLens 3.x).

A checkpoint whose config says more than capwrap's features describe (a rope scaling, a family
capwrap has no entry for but TransformerLens's bridge runs) keeps that config in ``hf_config``: it
loads, and everything that runs through TransformerLens's hooks works on it, but capwrap's own
forward pass (:class:`~capwrap.models.functional.Functional`) does not claim to compute it.

Examples:
    >>> spec = ModelSpec(d_vocab=50, n_ctx=64, n_layers=2, d_model=32, n_heads=4)
    >>> spec.d_head, spec.d_mlp
    (8, 128)
    >>> ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    True
    >>> gemma = ModelSpec(d_vocab=50, n_ctx=64, d_model=32, n_heads=4, architecture="gemma2")
    >>> gemma.features.attn_softcap, gemma.features.norm_offset
    (50.0, 1.0)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from capwrap.errors import ConfigError, check_fields
from capwrap.models.families import FAMILIES, Family
from capwrap.models.features import BlockFeatures

__all__ = ["ModelSpec", "ARCHITECTURES", "hooked_problems"]

#: Architectures capwrap maps onto TransformerLens components, with their HF class names
#: (``tracr``: compiled RASP programs, which have no Hugging Face equivalent). Derived from
#: :data:`~capwrap.models.families.FAMILIES`.
ARCHITECTURES: dict[str, str] = {name: f.hf_class or "TransformerLensNative" for name, f in FAMILIES.items()}

#: The longest context a HookedTransformer of a rotary model is built for (see ``to_hooked_config``).
HOOKED_MAX_CONTEXT = 4096
#: Spec fields that only some families' configs can express (see ``Family.configurable``).
_ATTENTION_BIAS = ("qkv_bias", "o_bias")
#: Fields added to the spec after its dict first keyed caches, left out of :meth:`ModelSpec.identity`
#: when they hold what the other fields imply (``features``: the architecture's block features).
IMPLIED_FIELDS: tuple[str, ...] = ("features",)


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
        architecture: the family, a key of :data:`~capwrap.models.families.FAMILIES`: ``"gpt2"``,
            ``"gpt_neo"`` (the TinyStories models), ``"llama"``, ``"mistral"``, ``"qwen2"``,
            ``"qwen3"``, ``"gpt_neox"`` (Pythia), ``"gemma2"``, ``"gemma3"``, ``"phi3"``,
            ``"olmo2"``, ``"tracr"`` (a compiled RASP program); or, with ``hf_config``, any
            ``model_type`` TransformerLens's bridge runs.
        n_key_value_heads: key/value heads for grouped-query attention.
        tie_embeddings: whether the unembedding is the transpose of the embedding.
        norm_eps: epsilon of the normalization layers.
        rotary_base: base of the rotary embedding (of global layers).
        d_vocab_out: size of the output vocabulary (tracr only; others predict tokens).
        attention_layers: per layer, ``"global"`` or ``"local"`` (empty: all global). A local
            layer's queries see only the last ``window_size`` positions.
        window_size: how many positions a local attention layer sees (its own included).
        features: what a block computes; default: the family's. A family accepts only the
            features its Hugging Face config can express.
        hf_config: the checkpoint's Hugging Face config as JSON, for models the features do not
            describe completely (set by :meth:`from_hf_config`; empty for fully described models).
    """

    d_vocab: int
    n_ctx: int
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 0
    d_mlp: int = 0
    architecture: str = "gpt2"
    n_key_value_heads: int = 0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rotary_base: float = 10000.0
    d_vocab_out: int = 0
    attention_layers: tuple[str, ...] = ()
    window_size: int = 0
    features: BlockFeatures | None = None
    hf_config: str = ""

    def __post_init__(self) -> None:
        family = FAMILIES.get(self.architecture)
        if family is None and not self.hf_config:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; capwrap supports {sorted(FAMILIES)} "
                "(and, loaded from a checkpoint, any architecture TransformerLens's bridge runs)"
            )
        for field in ("d_vocab", "n_ctx", "n_layers", "d_model", "n_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelSpec.{field} must be a positive integer, got {value!r}")
        features = self.features
        if isinstance(features, dict):
            features = BlockFeatures.from_dict(features)
        object.__setattr__(self, "features", features or (family.features if family else BlockFeatures()))
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
        object.__setattr__(self, "rotary_base", float(self.rotary_base))
        if self.n_heads % self.n_key_value_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_key_value_heads={self.n_key_value_heads}"
            )
        self._check_attention_layers()
        if family is not None and not self.hf_config:
            self._check_family(family)

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
        if "local" in layers and self.window_size <= 0:
            raise ConfigError("local attention layers need a positive window_size (TinyStories models use 256)")
        if "local" not in layers:
            layers = ()  # all global: one spelling, so equal models have equal specs
        object.__setattr__(self, "attention_layers", layers)

    def _check_family(self, family: Family) -> None:
        """Whether the family's Hugging Face config can express this spec; a clear error if not."""
        which = _families_with
        if family.hf_class is None:  # a native model (tracr): TransformerLens's config takes any shape
            return
        if self.d_vocab_out != self.d_vocab:
            raise ConfigError("a separate output vocabulary (d_vocab_out) needs architecture='tracr'")
        if self.n_key_value_heads != self.n_heads and not family.supports("n_key_value_heads"):
            raise ConfigError(
                f"grouped-query attention (n_key_value_heads) is not expressible in {family.title} models; "
                f"families with it: {which('n_key_value_heads')}"
            )
        if self.d_head * self.n_heads != self.d_model and not family.supports("d_head"):
            raise ConfigError(
                f"{family.name} models need d_head * n_heads == d_model; families with a free d_head: {which('d_head')}"
            )
        kinds = set(self.attention_kinds)
        if "local" in kinds and not (
            family.supports("layer_types") or (family.supports("windows") and kinds == {"local"})
        ):
            fix = "every layer local, or none" if family.supports("windows") else "no local layers"
            raise ConfigError(
                f"this pattern of local attention layers is not expressible in {family.title} models ({fix}); "
                f"families with any pattern: {which('layer_types')}"
            )
        defaults, own = family.features.to_dict(), self.features.to_dict()  # type: ignore[union-attr]
        for name, value in own.items():
            if value == defaults[name]:
                continue
            if name in _ATTENTION_BIAS and family.supports("attention_bias"):
                if own["qkv_bias"] != own["o_bias"]:
                    raise ConfigError(
                        f"{family.title} configs bias q/k/v and the output projection together (attention_bias): "
                        "set qkv_bias and o_bias to the same value"
                    )
                continue
            if not family.supports(name):
                raise ConfigError(
                    f"{family.title} models have {name}={defaults[name]!r}, not {value!r}; "
                    + (f"families whose {name} can differ: {which(name)}" if which(name)
                       else f"every family fixes {name}: choose the architecture whose value it is")
                )

    # ---- derived ---------------------------------------------------------------------------
    @property
    def family(self) -> Family | None:
        """The family's registry entry (``None`` for an architecture capwrap has no entry for)."""
        return FAMILIES.get(self.architecture)

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """``"global"`` or ``"local"`` for each layer."""
        return self.attention_layers or ("global",) * self.n_layers

    @property
    def attn_scale(self) -> float:
        """What attention scores are divided by: sqrt(d_head) unless the features say otherwise."""
        return self.features.attn_scale or float(self.d_head) ** 0.5  # type: ignore[union-attr]

    @property
    def has_hf_equivalent(self) -> bool:
        """Whether checkpoints of this architecture are Hugging Face folders."""
        family = self.family
        return family is None or family.hf_class is not None

    @property
    def compiled(self) -> bool:
        """Whether models of this architecture are compiled programs (tracr), not trained networks: their
        weights are set by a compiler, their MLPs have a handful of neurons, and their softmaxes and
        ReLUs saturate, so gradients at the model's own activations miss edges that matter."""
        return not self.has_hf_equivalent

    @property
    def hf_class(self) -> str:
        """The Hugging Face (and TransformerBridge adapter) class name."""
        if self.hf_config:
            from capwrap.models.configs import model_classes

            config = json.loads(self.hf_config)
            return model_classes(config.get("model_type"), config.get("architectures"))[0]
        return ARCHITECTURES[self.architecture]

    @property
    def unsupported(self) -> list[str]:
        """What the checkpoint's config says that capwrap's features do not describe (empty for
        fully described models): why :class:`~capwrap.models.functional.Functional` and the
        HookedTransformer backend refuse it."""
        if not self.hf_config:
            return []
        from capwrap.models.configs import read_hf_config

        return read_hf_config(self.to_hf_config()).problems

    @property
    def n_params(self) -> int:
        """Number of parameters in the checkpoint format (tied embeddings counted once)."""
        from capwrap.models.layouts import checkpoint_shapes

        return sum(shape.numel() for shape in checkpoint_shapes(self).values())

    def with_vocabulary(self, d_vocab: int) -> ModelSpec:
        """This spec with ``d_vocab`` tokens: the shape of a fine-tune that added tokens cut back to
        its base's vocabulary, or of a base grown by them (see :mod:`capwrap.models.vocabulary`). A kept
        Hugging Face config says ``vocab_size=d_vocab``, and its token ids beyond it (a pad or end
        token the fine-tune added) become ``None``.

        Examples:
            >>> ModelSpec(d_vocab=66, n_ctx=8).with_vocabulary(64).d_vocab_out
            64
        """
        if self.d_vocab_out != self.d_vocab:
            raise ConfigError(f"{self.architecture} models have a separate output vocabulary; their tokens are not cut")
        hf_config = self.hf_config
        if hf_config:
            config = json.loads(hf_config)
            config["vocab_size"] = d_vocab
            for key, value in config.items():
                if key.endswith("token_id") and isinstance(value, int) and value >= d_vocab:
                    config[key] = None
                elif key.endswith("token_id") and isinstance(value, list):  # several end tokens
                    config[key] = [v for v in value if not isinstance(v, int) or v < d_vocab] or None
            hf_config = json.dumps(config, sort_keys=True)
        return dataclasses.replace(self, d_vocab=d_vocab, d_vocab_out=d_vocab, hf_config=hf_config)

    # ---- dicts -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serializable dict (what reading it back from JSON gives)."""
        data = dataclasses.asdict(self)
        data["attention_layers"] = list(self.attention_layers)
        if not data["hf_config"]:
            del data["hf_config"]
        return data

    def identity(self) -> dict[str, Any]:
        """The spec as a dict for cache keys: :meth:`to_dict` without the fields that hold only what
        the rest implies (:data:`IMPLIED_FIELDS`), so that keys made before such a field existed
        still find what they cached (the suite's shipped controls).

        Examples:
            >>> spec = ModelSpec(d_vocab=9, n_ctx=8, n_layers=2)
            >>> "features" in spec.to_dict(), "features" in spec.identity()
            (True, False)
            >>> ModelSpec.from_dict(spec.identity()) == spec
            True
        """
        data = self.to_dict()
        for name in IMPLIED_FIELDS:
            rest = {k: v for k, v in data.items() if k != name}
            if ModelSpec.from_dict(rest) == self:
                data = rest
        return data

    def differences(self, other: ModelSpec) -> str:
        """The fields in which ``other`` differs, as ``"n_layers (2 vs 4), d_model (...)"``; empty if none.

        Examples:
            >>> ModelSpec(d_vocab=9, n_ctx=8, n_layers=2).differences(ModelSpec(d_vocab=9, n_ctx=8, n_layers=4))
            'n_layers (2 vs 4)'
        """
        a, b = self.to_dict(), other.to_dict()
        out = []
        for f in self.differing(other):
            if f == "features":
                out += [f"features.{d}" for d in self.features.differences(other.features)]  # type: ignore[union-attr]
            elif f == "hf_config":
                ca, cb = _computing_entries(self.hf_config), _computing_entries(other.hf_config)
                keys = sorted(k for k in {*ca, *cb} if ca.get(k) != cb.get(k))
                named = f" in {', '.join(keys[:6])}" + (f" and {len(keys) - 6} more" if len(keys) > 6 else "") if keys else ""
                out.append(f"hf_config (the checkpoints' Hugging Face configs differ{named})")
            else:
                out.append(f"{f} ({a.get(f)} vs {b.get(f)})")
        return ", ".join(out)

    def differing(self, other: ModelSpec) -> list[str]:
        """The names of the fields in which ``other`` differs (what :meth:`differences` describes).
        Two kept Hugging Face configs that differ only in token ids (``pad_token_id``, ``eos_token_id``
        ...: a chat fine-tune's end token) do not differ: the ids say how text is framed, not what
        the model computes.

        Examples:
            >>> ModelSpec(d_vocab=9, n_ctx=8).differing(ModelSpec(d_vocab=10, n_ctx=8))
            ['d_vocab', 'd_vocab_out']
        """
        a, b = self.to_dict(), other.to_dict()
        if "hf_config" in a and "hf_config" in b:  # configs alike but for token ids compute alike
            a["hf_config"], b["hf_config"] = _computing_entries(a["hf_config"]), _computing_entries(b["hf_config"])
        return [f for f in dict.fromkeys([*a, *b]) if a.get(f) != b.get(f)]

    def mismatch(self, recorded: dict[str, Any] | None) -> str:
        """How a spec saved as a dict (a run store's, a checkpoint's) differs from this model's, as
        :meth:`differences` says it (this model's value first); empty when it describes this model.

        Examples:
            >>> spec = ModelSpec(d_vocab=9, n_ctx=8, n_layers=2)
            >>> spec.mismatch(ModelSpec(d_vocab=9, n_ctx=8, n_layers=4).to_dict()), spec.mismatch(spec.to_dict())
            ('n_layers (2 vs 4)', '')
        """
        if recorded is None:
            return "its spec, which was not recorded"
        try:
            other = ModelSpec.from_dict(recorded)
        except (ConfigError, TypeError, AttributeError):
            return "its spec, which cannot be read"
        return "" if other == self else self.differences(other) or "its spec"

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
        check_fields(cls, data)
        return cls(**data)

    # ---- Hugging Face --------------------------------------------------------------------
    def to_hf_config(self) -> Any:
        """The equivalent ``transformers`` config (dropout off: analyses need determinism)."""
        if self.hf_config:
            return copy.deepcopy(_config_from_json(self.hf_config))
        family = self.family
        if family is None or family.hf_class is None:
            raise ConfigError(f"{self.architecture} models have no Hugging Face equivalent")
        return family.hf_config(self)

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        """Read a ``transformers`` config (see :func:`capwrap.models.configs.read_hf_config`).

        Raises:
            ConfigError: neither capwrap nor the installed TransformerBridge knows the architecture;
                the message lists the families and, for a Llama-like model, the closest one.
        """
        from capwrap.models.configs import spec_from_hf_config

        return spec_from_hf_config(config)

    # ---- TransformerLens HookedTransformer (TL 3.x) -------------------------------------------
    def to_hooked_config(self) -> Any:
        """The equivalent ``HookedTransformerConfig`` (TransformerLens 3.x only), from the features."""
        from transformer_lens import HookedTransformerConfig

        if self.hf_config:
            raise ConfigError(
                f"HookedTransformer cannot run this {self.architecture} checkpoint: "
                f"{'; '.join(self.unsupported) or 'capwrap has no feature description of its architecture'}. "
                "Load it with backend='bridge'"
            )
        f: BlockFeatures = self.features  # type: ignore[assignment]
        rotary = f.positions == "rotary"
        problems = hooked_problems(f)
        if problems:
            raise ConfigError(f"HookedTransformer cannot run this model: {'; '.join(problems)}; use backend='bridge'")
        post_only = f.post_norm and not f.pre_norm
        local = "local" in self.attention_kinds
        return HookedTransformerConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            d_vocab_out=self.d_vocab_out,
            # HookedTransformer holds an n_ctx x n_ctx mask per layer: cap rotary models' contexts
            # (Mistral's config says 131,072), as TransformerLens's own loader does.
            n_ctx=min(self.n_ctx, HOOKED_MAX_CONTEXT) if rotary else self.n_ctx,
            eps=self.norm_eps,
            default_prepend_bos=False,
            act_fn={"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}[f.act],
            normalization_type={"layer": "LN", "rms": "RMS", "none": None}[f.norm],
            final_rms=f.norm == "rms",
            gated_mlp=f.gated,
            parallel_attn_mlp=f.parallel,
            use_normalization_before_and_after=f.pre_norm and f.post_norm,
            original_architecture="Olmo2ForCausalLM" if post_only else self.hf_class,
            positional_embedding_type="rotary" if rotary else "standard",
            rotary_dim=f.rotary_dim(self.d_head) if rotary else None,
            rotary_base=self.rotary_base,
            rotary_base_local=(f.rotary_base_local or None) if rotary else None,
            rotary_adjacent_pairs=False,
            n_key_value_heads=self.n_key_value_heads if self.n_key_value_heads != self.n_heads else None,
            use_qk_norm=f.qk_norm == "head",
            use_attn_scale=True,
            attn_scale=self.attn_scale,
            attn_scores_soft_cap=f.attn_softcap or -1.0,
            output_logits_soft_cap=f.logit_softcap or -1.0,
            use_local_attn=local,
            attn_types=list(self.attention_kinds) if local else None,
            window_size=self.window_size or None,
            attention_dir="causal" if f.causal else "bidirectional",
        )

    # ---- TransformerLens TransformerBridge over its native model (tracr) ---------------------------
    def to_native_config(self) -> Any:
        """The ``TransformerBridgeConfig`` of TransformerLens's native model (tracr only)."""
        from transformer_lens.config import TransformerBridgeConfig

        if self.has_hf_equivalent:
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


def hooked_problems(features: BlockFeatures) -> list[str]:
    """What keeps TransformerLens 3.x's HookedTransformer from computing blocks with these features
    (empty: it computes them; capwrap adds Gemma's norm offset and embedding scale itself)."""
    post_only = features.post_norm and not features.pre_norm
    if post_only != (features.qk_norm == "all"):
        # TransformerLens 3.x keys both on OLMo-2's architecture name, so only both together run.
        return ["post-norm-only blocks run only with q/k norm over all heads, as in OLMo-2"]
    return []


def _families_with(what: str) -> str:
    """The families whose config can express ``what``, for error messages."""
    names = [
        f.name
        for f in FAMILIES.values()
        if f.supports(what) or (what in _ATTENTION_BIAS and f.supports("attention_bias"))
    ]
    return ", ".join(names)


@functools.lru_cache(maxsize=32)
def _config_from_json(text: str) -> Any:
    """A ``transformers`` config from its JSON (cached: callers get copies)."""
    import transformers

    data = json.loads(text)
    return transformers.AutoConfig.for_model(data.pop("model_type"), **data)


def _computing_entries(hf_config: str) -> dict[str, Any]:
    """A kept Hugging Face config (JSON) less its token ids (``*_token_id``), which do not change
    what the model computes."""
    return {k: v for k, v in json.loads(hf_config).items() if not k.endswith("token_id")} if hf_config else {}
