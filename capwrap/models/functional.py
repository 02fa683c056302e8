"""The transformer's arithmetic written out over canonical weights, resumable mid-model.

TransformerLens runs a model from its tokens to its logits. Some analyses need less: to continue a
forward pass from the residual stream at one layer (and one sub-layer: before attention or before
the MLP), for only the positions from ``p0`` on, attending to keys and values of the earlier
positions computed once. Activation patching is the user: a patch at layer L, position p changes
nothing before L, nothing before p (in a causal model) and nothing after the answer position that
the metric reads, so recomputing only that corner of the model gives the same numbers for a fraction
of the arithmetic.

:class:`Functional` reads the canonical TL-named weights of a :class:`~capwrap.models.CapModel`
(views over the real storage, so it always sees the current weights) and implements the four
architectures capwrap knows: ``gpt2`` (LayerNorm, learned positions, tanh-GELU), ``gpt_neo`` (as
gpt2, with unscaled attention scores and local-window layers), ``llama`` (RMSNorm, rotary, gated SiLU
MLP, grouped-query attention) and ``tracr`` (no norm, ReLU, bidirectional attention). Its
:meth:`~Functional.trace` agrees with the model's own hooks to float rounding (tested on both
TransformerLens lines).

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

from capwrap.models.model import CapModel

__all__ = ["Functional", "Trace"]


@dataclass
class Trace:
    """Every intermediate of one forward pass (lists indexed by layer).

    ``resid_pre``/``resid_mid``/``resid_post``/``attn_out``/``mlp_out``: ``[batch, pos, d_model]``;
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
    """A resumable forward pass over a model's canonical weights (see the module docstring)."""

    def __init__(self, model: CapModel):
        self.spec = model.spec
        self.w = {k: v.detach() for k, v in model.weights().items()}
        self.causal = self.spec.architecture != "tracr"
        s = self.spec
        self._group = s.n_heads // s.n_key_value_heads
        if s.architecture == "llama":
            inv = 1.0 / (s.rotary_base ** (torch.arange(0, s.d_head, 2, dtype=torch.float32) / s.d_head))
            angles = torch.arange(s.n_ctx, dtype=torch.float32)[:, None] * inv[None, :]
            angles = torch.cat([angles, angles], -1).to(self.w["embed.W_E"].device)
            self._cos, self._sin = angles.cos(), angles.sin()

    # ---- pieces ------------------------------------------------------------------------------------
    def _norm(self, x: Tensor, name: str) -> Tensor:
        arch = self.spec.architecture
        if arch == "tracr":
            return x
        if arch == "llama":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps) * self.w[f"{name}.w"]
        x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)
        return x * self.w[f"{name}.w"] + self.w[f"{name}.b"]

    def _bias(self, name: str) -> Tensor | float:
        return self.w.get(name, 0.0)

    def _rotate(self, x: Float[Tensor, "... pos head d_head"], p0: int) -> Tensor:
        if self.spec.architecture != "llama":
            return x
        n = x.shape[-3]
        cos, sin = self._cos[p0 : p0 + n, None, :].to(x.dtype), self._sin[p0 : p0 + n, None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def keys_values(
        self, layer: int, resid_pre: Float[Tensor, "batch pos d_model"], p0: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Keys (after rotary) and values of ``resid_pre`` whose first position is ``p0``."""
        a = f"blocks.{layer}.attn"
        x = self._norm(resid_pre, f"blocks.{layer}.ln1")
        k = torch.einsum("bpd,hdk->bphk", x, self.w[f"{a}.W_K"]) + self._bias(f"{a}.b_K")
        v = torch.einsum("bpd,hdk->bphk", x, self.w[f"{a}.W_V"]) + self._bias(f"{a}.b_V")
        return self._rotate(k, p0), v

    def attention(
        self,
        layer: int,
        resid_pre: Float[Tensor, "rows pos d_model"],
        p0: int,
        prefix: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Attention of positions ``p0..`` over ``prefix`` keys/values (positions ``< p0``, ``[batch, p0, ...]``,
        broadcast over ``rows = copies * batch``) and their own. Returns (attn_out, z, k, v)."""
        a = f"blocks.{layer}.attn"
        x = self._norm(resid_pre, f"blocks.{layer}.ln1")
        q = self._rotate(torch.einsum("bpd,hdk->bphk", x, self.w[f"{a}.W_Q"]) + self._bias(f"{a}.b_Q"), p0)
        k, v = self.keys_values(layer, resid_pre, p0)
        k_all, v_all = k, v
        if prefix is not None and prefix[0].shape[1]:
            rows, batch = resid_pre.shape[0], prefix[0].shape[0]
            pk, pv = (t.repeat(rows // batch, 1, 1, 1) for t in prefix)
            k_all, v_all = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        if self._group > 1:
            k_all, v_all = (t.repeat_interleave(self._group, dim=2) for t in (k_all, v_all))
        scores = torch.einsum("bqhk,bshk->bhqs", q, k_all) / self.spec.attn_scale
        if self.causal:
            q_pos = torch.arange(p0, p0 + q.shape[1], device=q.device)
            k_pos = torch.arange(k_all.shape[1], device=q.device)
            hidden = k_pos[None, :] > q_pos[:, None]
            if self.spec.attention_kinds[layer] == "local":  # sees only the last window_size positions
                hidden |= k_pos[None, :] <= q_pos[:, None] - self.spec.window_size
            scores = scores.masked_fill(hidden, float("-inf"))
        pattern = scores.float().softmax(-1).to(q.dtype)
        z = torch.einsum("bhqs,bshk->bqhk", pattern, v_all)
        out = torch.einsum("bqhk,hkd->bqd", z, self.w[f"{a}.W_O"]) + self._bias(f"{a}.b_O")
        return out, z, k, v

    def mlp(self, layer: int, resid_mid: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "rows pos d_model"]:
        """The MLP's output."""
        m = f"blocks.{layer}.mlp"
        x = self._norm(resid_mid, f"blocks.{layer}.ln2")
        pre = x @ self.w[f"{m}.W_in"] + self._bias(f"{m}.b_in")
        arch = self.spec.architecture
        if arch == "llama":
            hidden = F.silu(x @ self.w[f"{m}.W_gate"]) * pre
        elif arch == "tracr":
            hidden = F.relu(pre)
        else:
            hidden = F.gelu(pre, approximate="tanh")
        return hidden @ self.w[f"{m}.W_out"] + self._bias(f"{m}.b_out")

    def unembed(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab_out"]:
        """Logits of a final residual stream."""
        return self._norm(resid, "ln_final") @ self.w["unembed.W_U"] + self._bias("unembed.b_U")

    # ---- whole passes ------------------------------------------------------------------------------
    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Token (+ learned position) embeddings."""
        x = self.w["embed.W_E"][tokens]
        if "pos_embed.W_pos" in self.w:
            x = x + self.w["pos_embed.W_pos"][: tokens.shape[1]]
        return x

    @torch.inference_mode()
    def trace(self, tokens: Int[Tensor, "batch pos"]) -> Trace:
        """One full forward pass, keeping every intermediate."""
        out = Trace([], [], [], [], [], [], [], [], torch.empty(0))
        resid = self.embed(tokens.to(self.w["embed.W_E"].device))
        for layer in range(self.spec.n_layers):
            out.resid_pre.append(resid)
            attn, z, k, v = self.attention(layer, resid, 0)
            resid = resid + attn
            out.resid_mid.append(resid)
            mlp = self.mlp(layer, resid)
            resid = resid + mlp
            out.resid_post.append(resid)
            out.attn_out.append(attn), out.mlp_out.append(mlp), out.z.append(z), out.k.append(k), out.v.append(v)
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
        for current in range(layer, self.spec.n_layers):
            if current > layer or stage == "attn":
                prefix = (base.k[current][:, :p0], base.v[current][:, :p0]) if p0 else None
                resid = resid + self.attention(current, resid, p0, prefix)[0]
            resid = resid + self.mlp(current, resid)
        return resid
