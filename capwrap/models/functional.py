"""The transformer's arithmetic written out over canonical weights, resumable mid-model.

TransformerLens runs a model from its tokens to its logits. Some analyses need less: to continue a
forward pass from the residual stream at one layer (and one sub-layer: before attention or before
the MLP), for only the positions from ``p0`` on, attending to keys and values of the earlier
positions computed once. Activation patching is the user: a patch at layer L, position p changes
nothing before L, nothing before p (in a causal model) and nothing after the answer position that
the metric reads, so recomputing only that corner of the model gives the same numbers for a fraction
of the arithmetic.

:class:`Functional` reads the canonical TL-named weights of a :class:`~capwrap.models.CapModel`
(views over the real storage, so it always sees the current weights) and computes what the model's
:class:`~capwrap.models.features.BlockFeatures` say: LayerNorm or RMSNorm (with Gemma's ``1 + w``),
before and/or after each sub-layer; sequential or parallel attention and MLP; learned or (partial)
rotary positions; GELU, SiLU or ReLU MLPs, gated or not; biases, q/k norms, soft-capping, scaled
embeddings, local (sliding-window) layers with their own rotary base; causal or bidirectional
attention. That covers every family of :data:`~capwrap.models.families.FAMILIES`; a model whose
checkpoint config says more than its features (``spec.unsupported``) is refused with the reason.
Its :meth:`~Functional.trace` agrees with the model's own hooks to float rounding (tested on both
TransformerLens lines, for every family).

Pieces, for analyses that build on them (activation patching; edge attribution): :meth:`embed`,
:meth:`norm` (and its parts at a frozen scale, :meth:`norm_scale` and :meth:`norm_linear`),
:meth:`attention` (from a residual stream, optionally over cached earlier keys and values),
:meth:`attn_sum` (the heads' outputs added up, before a post-norm), :meth:`keys_values`, :meth:`mlp`, :meth:`unembed`, :meth:`trace` (a full pass keeping every
intermediate, a :class:`Trace`), :meth:`resume` (continue a pass from mid-model), :meth:`entry`
(where a change of an activation enters the residual stream) and :meth:`head_delta` (what one
head's change adds to it).

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=16, n_heads=2))
    >>> tokens = torch.randint(0, 20, (3, 10))
    >>> trace = Functional(model).trace(tokens)
    >>> torch.allclose(trace.logits, model(tokens), atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from capwrap.errors import ConfigError
from capwrap.models.features import BlockFeatures
from capwrap.models.model import CapModel
from capwrap.models.spec import ModelSpec

__all__ = ["Functional", "Trace"]

_ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


@dataclass
class Trace:
    """Every intermediate of one forward pass (lists indexed by layer).

    ``resid_pre``/``resid_mid``/``resid_post``/``attn_out``/``mlp_out``: ``[batch, pos, d_model]``
    (``resid_mid`` of a parallel block: ``resid_pre + attn_out``, which no sub-layer reads);
    ``z``: ``[batch, pos, head, d_head]``; ``k``/``v``: ``[batch, pos, kv_head, d_head]`` (keys after
    rotary); ``logits``: ``[batch, pos, d_vocab_out]``.
    """

    resid_pre: list[Tensor]
    resid_mid: list[Tensor]
    resid_post: list[Tensor]
    attn_out: list[Tensor]
    mlp_out: list[Tensor]
    z: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]
    logits: Tensor

    def activation(self, site: str, layer: int) -> Tensor:
        """The activation of a patching site (``resid_pre``, ``attn_out``, ``head`` (= ``z``), ...)."""
        return getattr(self, "z" if site == "head" else site)[layer]


class Functional:
    """A resumable forward pass over a model's canonical weights (see the module docstring).

    Args:
        model: the model.
        check: refuse a model whose checkpoint says more than its features describe (as a forward
            pass must); ``False`` for callers that use only the norms and :meth:`attn_sum`, which
            such extras (rope scaling, ...) do not touch.

    Raises:
        ConfigError: the model's checkpoint says more than its features describe; the message
            says what, and that ``engine="hooks"`` runs it through TransformerLens instead.
    """

    def __init__(self, model: CapModel, check: bool = True):
        self.spec = model.spec
        problems = Functional.unsupported(self.spec) if check else []
        if problems:
            raise ConfigError(
                f"capwrap's fast forward pass does not compute this {self.spec.architecture} model: "
                f"{'; '.join(problems)}. Use the hooks engine instead (activation_patching(..., engine='hooks')), "
                "which runs the model through TransformerLens"
            )
        self.features: BlockFeatures = self.spec.features  # type: ignore[assignment]
        self.w = {k: v.detach() for k, v in model.weights().items()}
        self.causal = self.features.causal
        self._group = self.spec.n_heads // self.spec.n_key_value_heads
        self._rotary: dict[str, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def unsupported(spec: ModelSpec) -> list[str]:
        """Why :class:`Functional` cannot compute a model of ``spec`` (empty: it can)."""
        if spec.family is None:
            return [f"capwrap has no feature description of {spec.architecture!r} models"]
        return spec.unsupported

    # ---- pieces ------------------------------------------------------------------------------------
    def norm(self, x: Float[Tensor, "... d"], name: str) -> Float[Tensor, "... d"]:
        """The normalization ``name`` (``blocks.0.ln1``, ``ln_final``, ``blocks.0.attn.q_norm`` ...)
        of ``x`` over its last dimension, as the features say (identity without normalization):
        ``norm_linear(x * norm_scale(x))`` plus a LayerNorm's bias."""
        f = self.features
        if f.norm == "none":
            return x
        if f.norm == "rms":
            return self.norm_linear(x.float() * self.norm_scale(x), name).to(x.dtype)
        return self.norm_linear(x * self.norm_scale(x).to(x.dtype), name) + self.w[f"{name}.b"]

    def norm_scale(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... 1"]:
        """What the normalization multiplies ``x`` by (float32): ``1 / sqrt(mean(x²) + eps)``, of the
        centered ``x`` for a LayerNorm (1 without normalization).

        Frozen at one stream's value it makes the norm linear, which splits a normalized sum into
        its summands' shares: ``norm(Σ xᵢ) = Σ norm_linear(xᵢ * norm_scale(Σ xᵢ))`` (+ a LayerNorm's
        bias) — how each head's output joins the stream behind a post-norm."""
        f = self.features
        x = x.float()
        if f.norm == "none":
            return torch.ones_like(x[..., :1])
        if f.norm == "layer":
            x = x - x.mean(-1, keepdim=True)
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)

    def norm_linear(self, y: Float[Tensor, "... d"], name: str) -> Float[Tensor, "... d"]:
        """The normalization ``name`` at a fixed scale, a linear map of the last dimension:
        ``y * (offset + w)`` (RMSNorm, float32) or ``(y - mean(y)) * w`` (LayerNorm, no bias)."""
        f = self.features
        if f.norm == "none":
            return y
        if f.norm == "rms":
            return y.float() * (f.norm_offset + self.w[f"{name}.w"].float())
        return (y - y.mean(-1, keepdim=True)) * self.w[f"{name}.w"]

    def _bias(self, name: str) -> Tensor | float:
        return self.w.get(name, 0.0)

    def _cos_sin(self, layer: int, end: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Rotary cos/sin tables for positions ``0..end`` of ``layer``'s kind (cached, grown on demand)."""
        f, s = self.features, self.spec
        kind = s.attention_kinds[layer]
        cached = self._rotary.get(kind)
        if cached is None or cached[0].shape[0] < end:
            base = f.rotary_base_local if kind == "local" and f.rotary_base_local else s.rotary_base
            dim = f.rotary_dim(s.d_head)
            inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
            angles = torch.arange(max(end, 64), device=device, dtype=torch.float32)[:, None] * inv[None, :]
            angles = torch.cat([angles, angles], -1)
            cached = self._rotary[kind] = (angles.cos(), angles.sin())
        return cached

    def _rotate(self, x: Float[Tensor, "... pos head d_head"], layer: int, p0: int) -> Tensor:
        if self.features.positions != "rotary":
            return x
        n = x.shape[-3]
        cos, sin = self._cos_sin(layer, p0 + n, x.device)
        cos, sin = cos[p0 : p0 + n, None, :].to(x.dtype), sin[p0 : p0 + n, None, :].to(x.dtype)
        dim = cos.shape[-1]
        rot, keep = x[..., :dim], x[..., dim:]
        half = dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        return torch.cat([rot * cos + rotated * sin, keep], -1)

    def _project(self, x: Tensor, layer: int, which: str) -> Tensor:
        """Queries or keys (``which``: ``Q``/``K``) of a normalized input, q/k-normed, before rotary."""
        a = f"blocks.{layer}.attn"
        out = torch.einsum("bpd,hdk->bphk", x, self.w[f"{a}.W_{which}"]) + self._bias(f"{a}.b_{which}")
        qk_norm = self.features.qk_norm
        if qk_norm == "head":
            out = self.norm(out, f"{a}.{which.lower()}_norm")
        elif qk_norm == "all":
            out = self.norm(out.flatten(-2), f"{a}.{which.lower()}_norm").view(out.shape)
        return out

    def _attn_input(self, layer: int, resid: Tensor) -> Tensor:
        return self.norm(resid, f"blocks.{layer}.ln1") if self.features.pre_norm else resid

    def keys_values(
        self, layer: int, resid_pre: Float[Tensor, "batch pos d_model"], p0: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Keys (after rotary) and values of ``resid_pre`` whose first position is ``p0``."""
        a = f"blocks.{layer}.attn"
        x = self._attn_input(layer, resid_pre)
        k = self._project(x, layer, "K")
        v = torch.einsum("bpd,hdk->bphk", x, self.w[f"{a}.W_V"]) + self._bias(f"{a}.b_V")
        return self._rotate(k, layer, p0), v

    def attention(
        self,
        layer: int,
        resid_pre: Float[Tensor, "rows pos d_model"],
        p0: int,
        prefix: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Attention of positions ``p0..`` over ``prefix`` keys/values (positions ``< p0``, ``[batch, p0, ...]``,
        broadcast over ``rows = copies * batch``) and their own. Returns (attn_out, z, k, v): ``attn_out``
        is what the sub-layer adds to the residual stream (after its post-norm, if any)."""
        f, s = self.features, self.spec
        x = self._attn_input(layer, resid_pre)
        q = self._rotate(self._project(x, layer, "Q"), layer, p0)
        k, v = self.keys_values(layer, resid_pre, p0)
        k_all, v_all = k, v
        if prefix is not None and prefix[0].shape[1]:
            rows, batch = resid_pre.shape[0], prefix[0].shape[0]
            pk, pv = (t.repeat(rows // batch, 1, 1, 1) for t in prefix)
            k_all, v_all = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        if self._group > 1:
            k_all, v_all = (t.repeat_interleave(self._group, dim=2) for t in (k_all, v_all))
        scores = torch.einsum("bqhk,bshk->bhqs", q, k_all) / s.attn_scale
        if f.attn_softcap:
            scores = torch.tanh(scores / f.attn_softcap) * f.attn_softcap
        if self.causal:
            q_pos = torch.arange(p0, p0 + q.shape[1], device=q.device)
            k_pos = torch.arange(k_all.shape[1], device=q.device)
            hidden = k_pos[None, :] > q_pos[:, None]
            if s.attention_kinds[layer] == "local":  # sees only the last window_size positions
                hidden |= k_pos[None, :] <= q_pos[:, None] - s.window_size
            scores = scores.masked_fill(hidden, float("-inf"))
        pattern = scores.float().softmax(-1).to(q.dtype)
        z = torch.einsum("bhqs,bshk->bqhk", pattern, v_all)
        return self.attn_output(layer, z), z, k, v

    def attn_output(self, layer: int, z: Float[Tensor, "rows pos head d_head"]) -> Float[Tensor, "rows pos d_model"]:
        """What attention adds to the residual stream given its heads' outputs ``z``."""
        out = self.attn_sum(layer, z)
        return self.norm(out, f"blocks.{layer}.ln1_post") if self.features.post_norm else out

    def attn_sum(self, layer: int, z: Float[Tensor, "rows pos head d_head"]) -> Float[Tensor, "rows pos d_model"]:
        """The heads' outputs and the output bias added up: ``Σ_h z[h] @ W_O[h] + b_O`` (what a
        post-norm normalizes; otherwise the attention's output itself)."""
        a = f"blocks.{layer}.attn"
        return torch.einsum("bqhk,hkd->bqd", z, self.w[f"{a}.W_O"]) + self._bias(f"{a}.b_O")

    def head_delta(
        self,
        layer: int,
        head: int,
        z: Float[Tensor, "batch pos head d_head"],
        z_new: Float[Tensor, "batch pos head d_head"],
    ) -> Float[Tensor, "batch pos d_model"]:
        """How the residual stream changes when ``head``'s output in ``z`` becomes its output in
        ``z_new``: ``(z_new - z)[head] @ W_O[head]``, or, behind a post-norm, the change of the
        normalized attention output."""
        w_o = self.w[f"blocks.{layer}.attn.W_O"][head]
        delta = (z_new[:, :, head] - z[:, :, head]) @ w_o
        if not self.features.post_norm:
            return delta
        raw = self.attn_sum(layer, z)
        ln = f"blocks.{layer}.ln1_post"
        return self.norm(raw + delta, ln) - self.norm(raw, ln)

    def mlp(self, layer: int, resid: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "rows pos d_model"]:
        """The MLP's output (what it adds to the residual stream) for the residual stream it reads:
        ``resid_mid`` (sequential blocks) or ``resid_pre`` (parallel blocks)."""
        f, m = self.features, f"blocks.{layer}.mlp"
        x = self.norm(resid, f"blocks.{layer}.ln2") if f.pre_norm else resid
        pre = x @ self.w[f"{m}.W_in"] + self._bias(f"{m}.b_in")
        act = _ACTIVATIONS[f.act]
        hidden = act(x @ self.w[f"{m}.W_gate"]) * pre if f.gated else act(pre)
        out = hidden @ self.w[f"{m}.W_out"] + self._bias(f"{m}.b_out")
        return self.norm(out, f"blocks.{layer}.ln2_post") if f.post_norm else out

    def unembed(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab_out"]:
        """Logits of a final residual stream."""
        logits = self.norm(resid, "ln_final") @ self.w["unembed.W_U"] + self._bias("unembed.b_U")
        cap = self.features.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Token (scaled, for Gemma; + learned position) embeddings."""
        x = self.w["embed.W_E"][tokens]
        if self.features.embed_scale:
            x = x * torch.tensor(self.spec.d_model**0.5, dtype=x.dtype)
        if "pos_embed.W_pos" in self.w:
            x = x + self.w["pos_embed.W_pos"][: tokens.shape[1]]
        return x

    def block(
        self,
        layer: int,
        resid: Float[Tensor, "rows pos d_model"],
        p0: int = 0,
        prefix: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One block: (resid_mid, resid_post, attn_out, mlp_out, z, k, v)."""
        attn, z, k, v = self.attention(layer, resid, p0, prefix)
        mid = resid + attn
        mlp = self.mlp(layer, resid if self.features.parallel else mid)
        return mid, mid + mlp, attn, mlp, z, k, v

    def entry(self, site: str, layer: int) -> tuple[int, str]:
        """Where a change of ``site`` at ``layer`` enters the residual stream: (layer, ``attn`` |
        ``mlp``), the sub-layer it is read by first; layer ``n_layers`` = the unembedding. In a
        parallel block nothing reads the middle of the block, so attention's changes enter after it."""
        if site == "resid_pre":
            return layer, "attn"
        if site in ("resid_mid", "attn_out", "head") and not self.features.parallel:
            return layer, "mlp"
        if site == "resid_mid":
            raise ConfigError("parallel attention and MLP blocks have no resid_mid: nothing reads it")
        return layer + 1, "attn"  # resid_post, mlp_out; attn_out and head of parallel blocks

    # ---- whole passes ------------------------------------------------------------------------------
    @torch.inference_mode()
    def trace(self, tokens: Int[Tensor, "batch pos"], logits: bool = True) -> Trace:
        """One full forward pass, keeping every intermediate; ``logits=False`` leaves ``logits`` empty
        (for a large vocabulary they outweigh the rest: unembed ``resid_post[-1]`` where needed)."""
        out = Trace([], [], [], [], [], [], [], [], torch.empty(0))
        resid = self.embed(tokens.to(self.w["embed.W_E"].device))
        for layer in range(self.spec.n_layers):
            out.resid_pre.append(resid)
            mid, resid, attn, mlp, z, k, v = self.block(layer, resid)
            out.resid_mid.append(mid), out.resid_post.append(resid)
            out.attn_out.append(attn), out.mlp_out.append(mlp), out.z.append(z), out.k.append(k), out.v.append(v)
        if logits:
            out.logits = self.unembed(resid)
        return out

    @torch.inference_mode()
    def resume(
        self,
        resid: Float[Tensor, "rows pos d_model"],
        layer: int,
        stage: str,
        p0: int,
        base: Trace,
    ) -> Float[Tensor, "rows pos d_model"]:
        """Continue from ``resid`` — the residual stream before ``stage`` (``attn`` or ``mlp``) of
        ``layer``, for positions ``p0..`` — to the final residual stream. Earlier positions' keys and
        values come from ``base`` (the unpatched run; ``rows`` must be a multiple of its batch)."""
        if stage == "mlp" and self.features.parallel:
            raise ConfigError("a parallel block's MLP reads the block's input: resume parallel models at 'attn'")
        for current in range(layer, self.spec.n_layers):
            if current > layer or stage == "attn":
                prefix = (base.k[current][:, :p0], base.v[current][:, :p0]) if p0 else None
                resid = self.block(current, resid, p0, prefix)[1]
            else:
                resid = resid + self.mlp(current, resid)
        return resid
