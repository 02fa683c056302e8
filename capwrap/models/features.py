"""`BlockFeatures`: what a transformer block computes, as data.

Decoder families differ in a handful of choices — which normalization and where, whether attention
and MLP run in parallel, how positions enter, which MLP, which attention variants. capwrap describes a
model by these choices (TransformerLens's config flags do the same) instead of by its family's name,
so that the functional forward pass (:mod:`capwrap.models.functional`), the weight layout
(:mod:`capwrap.models.layouts`), the component map and the HookedTransformer config all read the same
description, and a new family is a new combination, not new code.

Examples:
    >>> llama = BlockFeatures(norm="rms", positions="rotary", act="silu", gated=True,
    ...                       qkv_bias=False, o_bias=False, mlp_bias=False)
    >>> gemma2 = llama.replace(norm_offset=1.0, post_norm=True, act="gelu_tanh", attn_softcap=50.0,
    ...                        logit_softcap=30.0, embed_scale=True)
    >>> llama.differences(gemma2)
    ['norm_offset (0.0 vs 1.0)', 'post_norm (False vs True)', 'act (silu vs gelu_tanh)', 'attn_softcap (0.0 vs 50.0)', 'logit_softcap (0.0 vs 30.0)', 'embed_scale (False vs True)']
    >>> gemma2.describe()
    'RMSNorm (1 + w), pre- and post-norm, rotary, GeGLU (tanh), no biases, attention soft-cap 50, logit soft-cap 30, embedding scale'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from capwrap.errors import ConfigError, check_fields

__all__ = ["BlockFeatures", "Norm", "Act", "Positions", "QKNorm"]

Norm = Literal["layer", "rms", "none"]
Act = Literal["gelu_tanh", "gelu", "silu", "relu"]
Positions = Literal["learned", "rotary"]
QKNorm = Literal["none", "head", "all"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "norm": get_args(Norm),
    "act": get_args(Act),
    "positions": get_args(Positions),
    "qk_norm": get_args(QKNorm),
}


@dataclass(frozen=True)
class BlockFeatures:
    """The computation of a decoder block (and of the embedding and read-out around the blocks).

    Args:
        norm: ``"layer"`` (LayerNorm: centred, weight and bias), ``"rms"`` (RMSNorm: weight only) or
            ``"none"``. Every normalization of the model, the final one included, is of this kind.
        norm_offset: RMSNorm scales by ``norm_offset + w`` (Gemma stores ``w`` and adds 1).
        pre_norm: the attention and MLP read a normalized residual stream (``ln1``, ``ln2``).
        post_norm: the attention and MLP outputs are normalized before they are added to the
            residual stream (``ln1_post``, ``ln2_post``): Gemma-2/3 (with pre-norm), OLMo-2 (without).
        parallel: attention and MLP both read the block's input and add their outputs together
            (GPT-NeoX/Pythia); otherwise the MLP reads the residual stream after attention.
        positions: ``"learned"`` (a position embedding added to the token embedding) or
            ``"rotary"`` (queries and keys rotated by position).
        rotary_fraction: share of each head's dimensions that are rotated (Pythia: 0.25).
        rotary_base_local: rotary base of local (sliding-window) layers; 0: the model's
            ``rotary_base`` (Gemma-3 uses 10,000 locally and 1,000,000 globally).
        act: the MLP's activation: ``"gelu_tanh"`` (GPT-2's tanh approximation), ``"gelu"``
            (exact), ``"silu"`` or ``"relu"``.
        gated: the MLP computes ``act(x W_gate) * (x W_in)`` (SwiGLU, GeGLU).
        qkv_bias: queries, keys and values have biases.
        o_bias: the attention output projection has a bias.
        mlp_bias: the MLP's projections have biases.
        qk_norm: RMSNorm of queries and keys before rotary: ``"head"`` (over each head's
            ``d_head``, one weight shared by the heads: Qwen3, Gemma-3), ``"all"`` (over all heads
            at once: OLMo-2) or ``"none"``.
        attn_scale: what attention scores are divided by; 0: ``sqrt(d_head)``. GPT-Neo: 1;
            Gemma: ``sqrt(query_pre_attn_scalar)``.
        attn_softcap: attention scores become ``cap * tanh(scores / cap)``; 0: no cap (Gemma-2: 50).
        logit_softcap: the same for the output logits (Gemma-2: 30).
        embed_scale: token embeddings are multiplied by ``sqrt(d_model)`` (Gemma).
        causal: each position attends only to itself and earlier positions (not so in tracr's
            compiled models).
    """

    norm: Norm = "layer"
    norm_offset: float = 0.0
    pre_norm: bool = True
    post_norm: bool = False
    parallel: bool = False
    positions: Positions = "learned"
    rotary_fraction: float = 1.0
    rotary_base_local: float = 0.0
    act: Act = "gelu_tanh"
    gated: bool = False
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    qk_norm: QKNorm = "none"
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0
    embed_scale: bool = False
    causal: bool = True

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"BlockFeatures.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("norm_offset", "rotary_base_local", "attn_scale", "attn_softcap", "logit_softcap"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"BlockFeatures.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))  # JSON and configs give ints: one spelling
        if not 0 < self.rotary_fraction <= 1:
            raise ConfigError(f"BlockFeatures.rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
        object.__setattr__(self, "rotary_fraction", float(self.rotary_fraction))
        if self.norm == "none" and (self.post_norm or self.qk_norm != "none" or not self.pre_norm):
            raise ConfigError("a model without normalization (norm='none') has no post-norm or q/k norm")
        if self.norm_offset and self.norm != "rms":
            raise ConfigError("norm_offset applies to RMSNorm only (norm='rms')")
        if not (self.pre_norm or self.post_norm) and self.norm != "none":
            raise ConfigError("a normalized model needs pre_norm or post_norm (or both)")
        if self.parallel and self.post_norm:
            raise ConfigError("parallel attention and MLP with post-norms is not a known block; set one of them")

    @property
    def has_norm(self) -> bool:
        """Whether the model normalizes at all."""
        return self.norm != "none"

    def rotary_dim(self, d_head: int) -> int:
        """How many of a head's ``d_head`` dimensions rotary positions rotate (as transformers rounds)."""
        return int(d_head * self.rotary_fraction) if self.positions == "rotary" else 0

    def replace(self, **changes: Any) -> BlockFeatures:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The features as a JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockFeatures:
        """Inverse of :meth:`to_dict`; unknown fields are an error, missing ones take their defaults."""
        check_fields(cls, data)
        return cls(**data)

    def differences(self, other: BlockFeatures) -> list[str]:
        """The fields in which ``other`` differs, as ``"act (silu vs gelu)"``."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{f} ({a[f]} vs {b[f]})" for f in a if a[f] != b[f]]

    def describe(self) -> str:
        """A short human-readable summary (what ``capwrap info`` and the docs print)."""
        parts = []
        norm = {"layer": "LayerNorm", "rms": "RMSNorm", "none": "no normalization"}[self.norm]
        if self.norm_offset:
            norm += f" ({self.norm_offset:g} + w)"
        parts.append(norm)
        if self.has_norm and (self.post_norm or not self.pre_norm):
            parts.append("pre- and post-norm" if self.pre_norm else "post-norm")
        if self.parallel:
            parts.append("parallel attention and MLP")
        if self.positions == "rotary":
            fraction = "" if self.rotary_fraction == 1 else f" on {self.rotary_fraction:g} of each head"
            parts.append(f"rotary{fraction}")
        else:
            parts.append("learned positions")
        act = {"gelu_tanh": "GELU (tanh)", "gelu": "GELU", "silu": "SiLU", "relu": "ReLU"}[self.act]
        if self.gated:
            act = {"silu": "SwiGLU", "gelu_tanh": "GeGLU (tanh)", "gelu": "GeGLU", "relu": "ReGLU"}[self.act]
        parts.append(act)
        biases = [n for n, on in (("q/k/v", self.qkv_bias), ("output", self.o_bias), ("MLP", self.mlp_bias)) if on]
        if len(biases) < 3:
            parts.append(f"{', '.join(biases)} biases" if biases else "no biases")
        if self.qk_norm != "none":
            parts.append("q/k norm" + (" per head" if self.qk_norm == "head" else " over all heads"))
        if self.attn_scale:
            parts.append(f"attention scores / {self.attn_scale:g}")
        if self.attn_softcap:
            parts.append(f"attention soft-cap {self.attn_softcap:g}")
        if self.logit_softcap:
            parts.append(f"logit soft-cap {self.logit_softcap:g}")
        if self.embed_scale:
            parts.append("embedding scale")
        if not self.causal:
            parts.append("bidirectional")
        return ", ".join(parts)
