"""Activation patching, batched: which activations carry a behaviour?

A *patch* replaces one activation of a *target* run by the same activation of a *source* run and
measures a metric of the target's output. Two settings share one engine:

* **within one model**: source = the model on clean inputs, target = the same model on corrupted
  inputs (TransformerLens's ``patching`` functions compute the same numbers, one forward per patch);
* **across models**: source and target are the two models of a pair on the *same* inputs — e.g. the
  base model's activation patched into the tuned model: which components, given back their base
  output, give the capability back?

Sites: ``resid_pre`` / ``resid_mid`` / ``resid_post`` (the residual stream), ``attn_out``,
``mlp_out`` (layer outputs), ``head`` (one head's output ``hook_z``), each at every single position
or at all positions at once. Many patches run in one forward pass: the target batch is repeated
once per patch of a chunk, and one hook per hook point writes every patch of the chunk; the chunk
size follows a memory budget. ``method="attribution"`` is the gradient approximation (Nanda, 2023):
``(source - target) · ∂metric/∂activation`` for every site from one forward and one backward pass.

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=16, n_heads=2))
    >>> batch = task.sample(8, seed=0)
    >>> result = activation_patching(model, batch, source=model, sites=("attn_out",), positions="all", progress=False)
    >>> result.table[["site", "layer", "effect"]].round(6).to_dict("records")  # a model patched with itself: no effect
    [{'site': 'attn_out', 'layer': 0, 'effect': 0.0}, {'site': 'attn_out', 'layer': 1, 'effect': 0.0}]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import groupby
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from capwrap.analyzers.base import Analyzer, Context, Direction, Evidence, Kind, ModelPair
from capwrap.circuits.metrics import metric_values
from capwrap.errors import ConfigError
from capwrap.models import CapModel
from capwrap.models.functional import Functional, Trace
from capwrap.tasks.base import TaskBatch, answer_logits

__all__ = [
    "SITES",
    "Patching",
    "PatchingResult",
    "activation_patching",
    "answer_logprob",
    "answer_logit",
    "patch_index",
    "EngineSettings",
    "ENGINE_DEFAULTS",
    "engine_settings",
]

#: Patchable sites and their TransformerLens hook names.
SITES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
}
#: A metric maps the logits at each sequence's answer position to one number per sequence.
Metric = Callable[[Float[Tensor, "batch d_vocab"], TaskBatch], Float[Tensor, " batch"]]
Positions = Literal["each", "all", "both"] | Sequence[int]


def answer_logprob(logits: Float[Tensor, "batch d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Log-probability of the correct answer (the default metric)."""
    return F.log_softmax(logits.float(), -1).gather(-1, batch.answers.to(logits.device)[:, None])[:, 0]


def answer_logit(logits: Float[Tensor, "batch d_vocab"], batch: TaskBatch) -> Float[Tensor, " batch"]:
    """Logit of the correct answer."""
    return logits.float().gather(-1, batch.answers.to(logits.device)[:, None])[:, 0]


def patch_index(
    n_layers: int, n_heads: int, seq_len: int, sites: Sequence[str], positions: Positions = "each"
) -> pd.DataFrame:
    """One row per patch: ``site, layer, pos, head`` (``pos = -1``: all positions; ``head = -1``: no head).

    Examples:
        >>> patch_index(2, 4, 8, ["mlp_out", "head"], positions="all").shape
        (10, 4)
    """
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ConfigError(f"unknown patching sites {unknown or sites!r}; choose from {list(SITES)}")
    if isinstance(positions, str):
        if positions not in ("each", "all", "both"):
            raise ConfigError(f"positions must be 'each', 'all', 'both' or a list of positions, got {positions!r}")
        pos_list = {"each": list(range(seq_len)), "all": [-1], "both": [-1, *range(seq_len)]}[positions]
    else:
        pos_list = [int(p) for p in positions]
        bad = [p for p in pos_list if not 0 <= p < seq_len]
        if bad or not pos_list:
            raise ConfigError(f"positions {bad or pos_list} are outside the sequences' 0..{seq_len - 1}")
    rows = [
        (site, layer, pos, head)
        for site in sites
        for layer in range(n_layers)
        for pos in pos_list
        for head in (range(n_heads) if site == "head" else [-1])
    ]
    return pd.DataFrame(rows, columns=["site", "layer", "pos", "head"])


@dataclass
class PatchingResult:
    """A patching sweep.

    Attributes:
        table: one row per patch: ``site, layer, pos, head, value`` (metric after the patch,
            averaged over the batch), ``effect`` (value − the unpatched target's) and
            ``restored`` (effect / (source − target), the share of the gap the patch closes; NaN
            when the gap is under 1e-6).
        values: per-sequence metric after each patch, ``[patch, batch]``.
        target_baseline: the unpatched target's metric, ``[batch]``.
        source_baseline: the source's own metric on the target's batch, ``[batch]``.
        method: ``exact`` or ``attribution``.
    """

    table: pd.DataFrame
    values: Float[Tensor, "patch batch"]
    target_baseline: Float[Tensor, " batch"]
    source_baseline: Float[Tensor, " batch"]
    method: str
    shape: dict[str, int] = field(default_factory=dict)

    def grid(self, site: str, all_positions: bool = False) -> Float[Tensor, "layer ..."]:
        """Mean patched metric of one site as TransformerLens lays it out: ``[layer, pos]``,
        ``[layer, pos, head]`` for heads; with ``all_positions``, ``[layer]`` or ``[layer, head]``."""
        part = self.table[(self.table["site"] == site) & ((self.table["pos"] == -1) == all_positions)]
        if part.empty:
            raise ConfigError(
                f"the sweep has no {site!r} patches {'at all positions' if all_positions else 'by position'}"
            )
        dims = ["layer"] + ([] if all_positions else ["pos"]) + (["head"] if site == "head" else [])
        part = part.sort_values(dims)
        shape = [part[d].nunique() for d in dims]
        return torch.tensor(part["value"].to_numpy(), dtype=torch.float32).reshape(shape)


@dataclass(frozen=True)
class EngineSettings:
    """How exact patches run: the engine and the memory budget of one batched forward pass. In
    :data:`ENGINE_DEFAULTS`, ``free_share`` caps a GPU's default budget at that share of the memory
    free when patching starts (memory PyTorch holds in its cache but does not use counts as free)."""

    engine: Literal["resumed", "hooks"]
    memory_mb: float
    free_share: float = 1.0


#: What ``engine="auto"`` and ``memory_mb=None`` pick on each device type, as measured on the demo
#: sweep (``benchmarks/RESULTS.md``): on a CPU the resumed engine is 5x-8x faster than the hook
#: engine and gains nothing from larger passes; on a CUDA GPU (an H200) the hook engine's whole batched
#: passes are the faster ones (0.52 s against 0.73 s at 128 MB) and larger passes make them 5x faster
#: again (0.106-0.109 s at 4096 MB, 108x-119x TransformerLens, in two leases). Other device types
#: (not measured: MPS, XPU) get the CPU's settings.
ENGINE_DEFAULTS: dict[str, EngineSettings] = {
    "cpu": EngineSettings("resumed", 128.0),
    "cuda": EngineSettings("hooks", 4096.0, free_share=0.25),
}


def engine_settings(
    model: CapModel, engine: Literal["auto", "resumed", "hooks"] = "auto", memory_mb: float | None = None
) -> EngineSettings:
    """The engine and memory budget exact patching uses on ``model``'s device: given values win;
    ``auto`` and ``None`` take :data:`ENGINE_DEFAULTS` for the device's type, and ``auto`` takes the
    hook engine where capwrap's fast forward pass does not compute the model.

    Examples:
        >>> from capwrap.models import ModelSpec, build_model
        >>> model = build_model(ModelSpec(d_vocab=8, n_ctx=4, n_layers=1, d_model=8, n_heads=2))
        >>> engine_settings(model)  # on a CPU
        EngineSettings(engine='resumed', memory_mb=128.0, free_share=1.0)
        >>> engine_settings(model, "hooks", 512).memory_mb
        512.0
    """
    if engine not in ("auto", "resumed", "hooks"):
        raise ConfigError(f"engine must be 'auto', 'resumed' or 'hooks', got {engine!r}")
    _check_memory_mb(memory_mb)
    device = model.device
    defaults = ENGINE_DEFAULTS.get(device.type, ENGINE_DEFAULTS["cpu"])
    chosen: Literal["resumed", "hooks"] = (
        ("hooks" if Functional.unsupported(model.spec) else defaults.engine) if engine == "auto" else engine
    )
    if memory_mb is not None:
        return EngineSettings(chosen, float(memory_mb))
    budget = defaults.memory_mb
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # PyTorch's unused cache
        budget = max(1.0, min(budget, defaults.free_share * free / 2**20))
    return EngineSettings(chosen, float(budget))


def _check_memory_mb(memory_mb: float | None, name: str = "memory_mb") -> None:
    if memory_mb is not None and not memory_mb > 0:
        raise ConfigError(f"{name} must be positive, got {memory_mb} (or None: the device's default)")


def _bytes_per_position(model: CapModel, context: int) -> int:
    """Peak bytes one sequence position of one forward pass holds (float32): residual copies, the MLP's
    hidden layer, attention scores over ``context`` keys, logits."""
    s = model.spec
    return 4 * (8 * s.d_model + 3 * s.d_mlp + 3 * s.n_heads * context + 2 * s.d_vocab_out)


def _tile(batch: TaskBatch, times: int) -> TaskBatch:
    return batch[torch.arange(len(batch), device=batch.tokens.device).repeat(times)]


def _indices(values: Sequence[int] | np.ndarray, device: torch.device) -> Tensor:
    """Host integers as an ``int64`` index tensor on ``device``; to a GPU through pinned memory, so
    that the copy does not wait for the device's queued work."""
    host = torch.as_tensor(np.asarray(values, dtype=np.int64))
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def _check_inputs(target: CapModel, source: CapModel, batch: TaskBatch, source_tokens: Tensor) -> None:
    ModelPair(source, target, roles=("source", "target"))  # same architecture and shape, or a clear error
    if source_tokens.shape != batch.tokens.shape:
        raise ConfigError(
            f"source tokens {tuple(source_tokens.shape)} and target tokens {tuple(batch.tokens.shape)} must have the "
            "same shape: patching swaps activations position by position"
        )
    if len(batch) == 0:
        raise ConfigError("the patching batch is empty; sample at least one sequence")


def activation_patching(
    target: CapModel,
    batch: TaskBatch,
    *,
    source: CapModel | None = None,
    source_tokens: Int[Tensor, "batch pos"] | None = None,
    sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "head"),
    positions: Positions = "each",
    index: pd.DataFrame | None = None,
    metric: Metric = answer_logprob,
    method: Literal["exact", "attribution"] = "exact",
    engine: Literal["auto", "resumed", "hooks"] = "auto",
    memory_mb: float | None = None,
    progress: bool = True,
) -> PatchingResult:
    """Patch activations of ``source`` (on ``source_tokens``) into ``target`` (on ``batch``).

    Within one model: ``activation_patching(model, corrupted_batch, source_tokens=clean_tokens)``.
    Across models: ``activation_patching(tuned, batch, source=base)`` (same tokens).

    Args:
        target: the model that is run and patched.
        batch: the target's inputs (the metric reads its answers and answer positions).
        source: the model whose activations are patched in; default: ``target``.
        source_tokens: the source's inputs, same shape as ``batch.tokens``; default: ``batch.tokens``.
        sites: which activations (keys of :data:`SITES`).
        positions: ``each`` position separately, ``all`` at once, ``both``, or a list of positions.
        index: the patches as a DataFrame (``site, layer, pos, head``), instead of ``sites``/``positions``.
        metric: ``f(answer-position logits, batch) -> [batch]``.
        method: ``exact`` (patched forward passes) or ``attribution`` (gradient approximation).
        engine: how exact patches run: ``resumed`` resumes the forward pass where the patch enters,
            for the positions it can change, over the model's canonical weights
            (:class:`~capwrap.models.functional.Functional`); ``hooks`` runs whole forward passes with
            TransformerLens hooks writing the patches — the definition; slower on a CPU, faster on a
            GPU, where whole batched passes cost little. ``auto`` (default): the faster one on the
            target's device (:data:`ENGINE_DEFAULTS`: ``resumed`` on a CPU, ``hooks`` on a CUDA GPU;
            on an H200, 108x-119x TransformerLens against 13x-18x resumed, ``benchmarks/RESULTS.md``),
            and ``hooks`` for a model the fast forward pass does not compute.
        memory_mb: memory budget of one batched forward pass; sets how many patches share one.
            Default: 128 MB on a CPU; on a CUDA GPU 4096 MB, or a quarter of the free memory if less.
        progress: show a progress bar.

    Raises:
        ConfigError: unknown sites or positions, a source of another shape, tokens of another shape.
    """
    source = target if source is None else source
    source_tokens = batch.tokens if source_tokens is None else source_tokens
    _check_inputs(target, source, batch, source_tokens)
    if method not in ("exact", "attribution"):
        raise ConfigError(f"method must be 'exact' or 'attribution', got {method!r}")
    settings = engine_settings(target, engine, memory_mb)
    engine, memory_mb = settings.engine, settings.memory_mb
    spec, seq_len = target.spec, batch.tokens.shape[1]
    if index is None:
        index = patch_index(spec.n_layers, spec.n_heads, seq_len, sites, positions)
    else:
        index = index[["site", "layer", "pos", "head"]].reset_index(drop=True)
        if len(index) == 0:
            raise ConfigError("the patch index is empty; give at least one patch")
        patch_index(spec.n_layers, spec.n_heads, seq_len, sorted(set(index["site"])), "all")  # validates the sites
    hooks = sorted({SITES[s].format(layer=layer) for s, layer in zip(index["site"], index["layer"], strict=True)})
    target.resolve_hooks(hooks)  # a clear error if the backend lacks one
    device = target.device
    batch = batch.to(device)
    with torch.inference_mode():  # each model's logits only while its metric is read
        target_base = metric(answer_logits(target(batch.tokens), batch), batch).float()
        source_base = metric(answer_logits(source(source_tokens.to(source.device)).to(device), batch), batch).float()
    if method == "exact" and engine == "resumed":
        values = _resumed(target, source, batch, source_tokens, index, metric, memory_mb, progress)
    else:
        source_acts = source.capture(source_tokens.to(source.device), hooks, batch_size=128)
        source_acts = {k: v.to(device) for k, v in source_acts.items()}
        if method == "exact":
            values = _exact_hooks(target, batch, source_acts, index, metric, memory_mb, progress)
        else:
            values = _attribution(target, batch, source_acts, index, metric) + target_base.cpu()
    table = index.copy()
    table["hook"] = [SITES[s].format(layer=layer) for s, layer in zip(index["site"], index["layer"], strict=True)]
    table["value"] = values.mean(1).cpu().numpy()
    table["effect"] = table["value"] - float(target_base.mean())
    gap = float(source_base.mean() - target_base.mean())
    table["restored"] = table["effect"] / gap if abs(gap) > 1e-6 else math.nan
    return PatchingResult(
        table,
        values.cpu(),
        target_base.cpu(),
        source_base.cpu(),
        method,
        {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "pos": seq_len},
    )


@dataclass(frozen=True)
class _Writes:
    """Where one hook writes the source's activation into a batch of tiled patches: the patches
    of single positions (their slots, positions and heads) and those of every position (their
    slots and heads); heads are ``None`` at hooks without a head axis. Decided on the host (no
    boolean masks on the device, whose every use waits for it)."""

    one: tuple[Tensor, Tensor, Tensor | None] | None
    every: tuple[Tensor, Tensor | None] | None

    @classmethod
    def of(cls, slots: np.ndarray, pos: np.ndarray, head: np.ndarray, device: torch.device) -> _Writes:
        put = functools.partial(_indices, device=device)
        heads = bool(head[0] >= 0)  # a hook point holds either head patches or none
        one, every = pos >= 0, pos < 0
        return cls(
            (put(slots[one]), put(pos[one]), put(head[one]) if heads else None) if one.any() else None,
            (put(slots[every]), put(head[every]) if heads else None) if every.any() else None,
        )

    def write(self, act: Tensor, src: Tensor, n_batch: int) -> Tensor:
        """Write ``src`` [batch, pos, ...] into the rows of ``act`` [slot*batch, pos, ...] of each patch."""
        act = act.view(-1, n_batch, *act.shape[1:])  # [slot, batch, pos, ...]
        if self.one is not None:
            slots, p, h = self.one
            if h is None:  # residual / layer outputs: [slot, batch, pos, d]
                act[slots, :, p] = src[:, p].transpose(0, 1)
            else:  # heads: [slot, batch, pos, head, d_head]
                act[slots, :, p, h] = src[:, p, h].transpose(0, 1)
        if self.every is not None:
            slots, h = self.every
            if h is None:
                act[slots] = src
            else:
                act[slots, :, :, h] = src[:, :, h].permute(2, 0, 1, 3)
        return act.view(-1, *act.shape[2:])


@torch.inference_mode()
def _resumed(
    target: CapModel,
    source: CapModel,
    batch: TaskBatch,
    source_tokens: Tensor,
    index: pd.DataFrame,
    metric: Metric,
    memory_mb: float,
    progress: bool,
) -> Float[Tensor, "patch batch"]:
    """Exact patching that recomputes only what a patch can change.

    Every patch is a change of the residual stream at one layer and sub-layer (a head's output
    enters through its ``W_O``, and its block's post-norm if any: ``Functional.head_delta``; where
    it enters: ``Functional.entry``); the target's forward pass is resumed there, for the positions from
    the first changed one to the last answer position (causal models), with earlier positions' keys
    and values taken from the unpatched run. Patches that change nothing are not run at all.
    """
    # The source first: with a residency (diagnose(memory="low")) the models take turns in memory,
    # and the target's weights must stay in memory from here on.
    # Neither trace keeps its logits (for a large vocabulary they outweigh the rest): the baseline
    # unembeds the answer positions only.
    src = Functional(source).trace(source_tokens.to(source.device), logits=False)
    read = {"z" if site == "head" else site for site in set(index["site"])}  # what the patches take from the source
    src = _to_device(replace(src, **{f.name: [] for f in fields(src) if f.name not in read | {"logits"}}), target.device)
    fn = Functional(target)
    tgt = fn.trace(batch.tokens, logits=False)
    n_batch, seq_len = batch.tokens.shape
    n_layers = target.spec.n_layers
    answer_pos = batch.answer_pos.to(target.device)
    end = int(answer_pos.max()) + 1 if fn.causal else seq_len
    rows = torch.arange(n_batch, device=answer_pos.device)
    baseline = metric(fn.unembed(tgt.resid_post[-1][rows, answer_pos]), batch).float().to(target.device)
    out = baseline.repeat(len(index), 1)

    def delta(site: str, layer: int, head: int) -> Tensor:
        """What replacing the target's activation by the source's adds to the residual stream where
        it enters, at every position ``[batch, pos, d_model]`` (a patch takes its own positions)."""
        if head >= 0:  # what the head's change adds to the residual stream
            return fn.head_delta(layer, head, tgt.z[layer], src.z[layer])
        return src.activation(site, layer) - tgt.activation(site, layer)

    # Which positions each activation changes: one test per (site, layer, head) — not per patch —
    # and one transfer to the host for all of them (on a GPU every transfer waits for the device).
    patches: list[tuple[str, int, int, int]] = [
        (site, int(layer), int(pos), int(head))
        for site, layer, pos, head in index[["site", "layer", "pos", "head"]].itertuples(index=False, name=None)
    ]
    keys = sorted({(site, layer, head) for site, layer, _, head in patches})
    moved = torch.stack([delta(*key).abs().amax((0, 2)) > 0 for key in keys]).cpu()  # [key, pos]
    if fn.causal:
        moved[:, end:] = False  # nothing after the last answer is read
    row_of = {key: r for r, key in enumerate(keys)}
    # Each patch as (entry layer, stage, first changed position) -> its (site, layer, head, pos,
    # row). Patches that write what is already there are not run: their metric is the baseline.
    plans: dict[tuple[int, str, int], list[tuple[str, int, int, int, int]]] = {}
    for i, (site, layer, pos, head) in enumerate(patches):
        changed = moved[row_of[site, layer, head]]
        if not bool(changed[pos] if pos >= 0 else changed.any()):
            continue
        p0 = (pos if pos >= 0 else int(changed.nonzero()[0])) if fn.causal else 0
        entry_layer, stage = fn.entry(site, layer)
        plans.setdefault((entry_layer, stage, p0), []).append((site, layer, head, pos, i))

    bar = tqdm(total=len(index), desc="patching", disable=not progress, leave=False, unit="patch")
    bar.update(len(index) - sum(len(v) for v in plans.values()))
    order: list[int] = []  # the rows of `results`, in order
    results: list[Tensor] = []
    tiled: dict[int, TaskBatch] = {}
    for (entry_layer, stage, p0), planned in sorted(plans.items()):
        # each activation's patches side by side, so that each (activation, position) writes one
        # range of slots: no index tensors (a GPU waits for each one sent to it)
        planned.sort()
        width = end - p0
        per_patch = n_batch * _bytes_per_position(target, end) * width
        chunk = max(1, int(memory_mb * 2**20 // per_patch))
        if entry_layer == n_layers:
            start_resid = tgt.resid_post[-1][:, p0:end]
        else:
            start_resid = (tgt.resid_pre if stage == "attn" else tgt.resid_mid)[entry_layer][:, p0:end]
        rel = (answer_pos - p0).clamp(min=0)
        before = answer_pos < p0  # the patch lies after these sequences' answers: baseline
        for c in range(0, len(planned), chunk):
            part = planned[c : c + chunk]
            n = len(part)
            resid = start_resid.unsqueeze(0).repeat(n, 1, 1, 1)  # [n, batch, width, d_model]
            # the deltas are made here, once per activation of the chunk, so that memory holds
            # one chunk's; a patch adds its activation's delta at its own positions
            slot = 0
            for activation, same_activation in groupby(part, key=lambda patch: patch[:3]):
                diff = delta(*activation)[:, p0:end]
                for pos, same_position in groupby(same_activation, key=lambda patch: patch[3]):
                    k = len(list(same_position))
                    if pos < 0:
                        resid[slot : slot + k] += diff
                    else:
                        resid[slot : slot + k, :, pos - p0] += diff[:, pos - p0]
                    slot += k
            resid = resid.flatten(0, 1)
            if entry_layer < n_layers:
                resid = fn.resume(resid, entry_layer, stage, p0, tgt)
            final = resid.view(n, n_batch, width, -1)[:, rows, rel]  # [n, batch, d_model]
            logits = fn.unembed(final).flatten(0, 1)
            if n not in tiled:
                tiled[n] = _tile(batch, n)
            values = metric_values(metric, logits, tiled[n]).to(target.device).view(n, n_batch)
            results.append(torch.where(before, baseline, values))
            order.extend(patch[4] for patch in part)
            bar.update(n)
    bar.close()
    if results:
        out[_indices(order, target.device)] = torch.cat(results)
    return out.cpu()


def _to_device(trace: Trace, device: torch.device) -> Trace:
    return Trace(
        *[[t.to(device) for t in getattr(trace, f)] for f in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "k", "v")],
        logits=trace.logits.to(device),
    )  # fmt: skip


def _exact_hooks(
    target: CapModel,
    batch: TaskBatch,
    source_acts: dict[str, Tensor],
    index: pd.DataFrame,
    metric: Metric,
    memory_mb: float,
    progress: bool,
) -> Float[Tensor, "patch batch"]:
    n_batch, seq_len = batch.tokens.shape
    per_patch = n_batch * seq_len * _bytes_per_position(target, seq_len)
    chunk = max(1, int(memory_mb * 2**20 // per_patch))
    hooks = [SITES[s].format(layer=layer) for s, layer in zip(index["site"], index["layer"], strict=True)]
    pos_all, head_all = index["pos"].to_numpy(), index["head"].to_numpy()
    out = torch.empty(len(index), n_batch, device=target.device)
    bar = tqdm(total=len(index), desc="patching", disable=not progress, leave=False, unit="patch")
    tiled_cache: dict[int, tuple[Tensor, TaskBatch]] = {}
    for start in range(0, len(index), chunk):
        stop = min(start + chunk, len(index))
        n = stop - start
        if n not in tiled_cache:
            tiled_cache[n] = (batch.tokens.repeat(n, 1), _tile(batch, n))
        tokens, tiled = tiled_cache[n]
        groups: dict[str, list[int]] = {}
        for i in range(start, stop):
            groups.setdefault(hooks[i], []).append(i)
        fwd = []
        for name, rows in groups.items():
            rows_a = np.asarray(rows)
            for sel in (head_all[rows_a] >= 0, head_all[rows_a] < 0):  # a hook point holds either head patches or not
                if sel.any():
                    r = rows_a[sel]
                    writes = _Writes.of(r - start, pos_all[r], head_all[r], target.device)
                    fwd.append((name, _patch_hook(source_acts[name], writes, n_batch)))
        with torch.inference_mode(), target.hooks(fwd):
            logits = answer_logits(target(tokens), tiled)
        out[start:stop] = metric_values(metric, logits, tiled).view(n, n_batch)
        bar.update(n)
    bar.close()
    return out.cpu()


def _patch_hook(src: Tensor, writes: _Writes, n_batch: int):
    def hook(act: Tensor, hook=None) -> Tensor:
        return writes.write(act, src.to(act.dtype), n_batch)

    return hook


def _attribution(
    target: CapModel, batch: TaskBatch, source_acts: dict[str, Tensor], index: pd.DataFrame, metric: Metric
) -> Float[Tensor, "patch batch"]:
    """First-order estimate of each patch's effect: (source − target) · ∂metric/∂activation."""
    acts: dict[str, Tensor] = {}
    shifts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> Tensor:
            shift = torch.zeros_like(act, requires_grad=True)  # d metric / d shift == d metric / d act
            shifts[name], acts[name] = shift, act.detach()
            return act + shift

        return hook

    names = list(source_acts)
    with torch.enable_grad(), target.hooks([(n, keep(n)) for n in names]):
        logits = answer_logits(target(batch.tokens), batch)
        metric_values(metric, logits, batch, differentiable=True).sum().backward()  # sequences are independent
    out = torch.empty(len(index), len(batch))
    for i, (site, layer, pos, head) in enumerate(index[["site", "layer", "pos", "head"]].itertuples(index=False)):
        name = SITES[site].format(layer=layer)
        contrib = (source_acts[name] - acts[name]) * shifts[name].grad  # [batch, pos, d] or [batch, pos, head, d_head]
        if head >= 0:
            contrib = contrib[:, :, head]
        contrib = contrib if pos < 0 else contrib[:, pos : pos + 1]
        out[i] = contrib.flatten(1).sum(1).detach().cpu()
    target.module.zero_grad(set_to_none=True)
    return out


@dataclass
class Patching(Analyzer):
    """Across-model patching on the capability task: give single components of the tuned model their
    base output back — which of them restore the capability, and how much?

    What a restoring patch says depends on what follows it: restoring the capability from an early
    component means the tuned model's own later layers still compute it; restoring it from the last
    layer only replaces the read-out. Statistic ``patching_deep_restore``: the largest, over
    components, of the share of the capability's log-probability gap its base output restores times
    the share of layers after it (a share capped at 1: a patch can overshoot the base's
    log-probability). Near 1: one early component's base output brings the capability back
    through the tuned model's own later layers (a wrapper); near 0: no single component does. Not
    applicable when the tuned model's answer log-probability is within ``min_gap`` nats of the
    base's (or above it), nor with ``method="attribution"``, whose linear estimates of the patches
    are on another scale than the exact patches the verdict rule's anchor was fitted on (the table
    and headline numbers are kept). The interval resamples the sequences.

    Args:
        sites: the sites to patch (keys of :data:`SITES`), each at all positions.
        n: sequences (the first ``n`` of the diagnosis's capability evaluation set).
        method: ``exact`` or ``attribution``.
        memory_mb: memory budget of one batched forward pass (default: the device's,
            :func:`engine_settings`).
        min_gap: the statistic applies when the base's answer log-probability exceeds the tuned
            model's by at least this many nats.
    """

    sites: tuple[str, ...] = ("attn_out", "mlp_out", "head")
    n: int = 256
    method: Literal["exact", "attribution"] = "exact"
    memory_mb: float | None = None
    min_gap: float = 0.1
    name: str = "patching"
    kind: ClassVar[Kind] = "structural"
    statistic: ClassVar[str | None] = "patching_deep_restore"
    #: One early component whose base output brings the capability back through the tuned model's
    #: own later layers shows that those layers still compute it (a wrapper); no single component
    #: doing so shows nothing (the change fine-tuning made may be spread over several).
    shows: ClassVar[tuple[Direction, ...]] = ("wrapper",)

    def __post_init__(self) -> None:
        patch_index(1, 1, 1, self.sites, "all")
        if self.n <= 0:
            raise ConfigError(f"Patching.n must be positive, got {self.n}")
        _check_memory_mb(self.memory_mb, "Patching.memory_mb")

    def analyze(self, context: Context) -> Evidence:
        pair = context.pair
        batch = context.eval.batches["capability"][: self.n]
        result = activation_patching(
            pair.tuned, batch, source=pair.base, sites=self.sites, positions="all", method=self.method,
            memory_mb=self.memory_mb, progress=False,
        )  # fmt: skip
        n_layers = pair.spec.n_layers
        table = result.table.drop(columns=["pos"])
        table.insert(0, "component", [_component(r.site, r.layer, r.head) for r in table.itertuples()])
        after = ((n_layers - 1 - table["layer"]) / max(1, n_layers - 1)).to_numpy()
        table["after_share"] = after
        table["wrapper_evidence"] = table["restored"].clip(lower=0, upper=1) * table["after_share"]
        gap = float(result.source_baseline.mean() - result.target_baseline.mean())
        # one layer: no component has a layer after it, so the statistic is 0 whatever patching restores
        applicable = gap >= self.min_gap and n_layers > 1
        scored = applicable and self.method == "exact"
        value = float(table["wrapper_evidence"].max()) if scored else math.nan
        # bootstrap over sequences: per replicate, each patch's restored share times its after share
        idx = context.resample(len(batch), self.name)
        patched = result.values.float()[:, idx].mean(-1)  # [patch, n_boot]
        target, source = result.target_baseline.float()[idx].mean(-1), result.source_baseline.float()[idx].mean(-1)
        restored = (patched - target) / (source - target)
        reps = (restored.clamp(0, 1) * torch.tensor(after, dtype=torch.float32)[:, None]).max(0).values.numpy()
        order = table.sort_values("restored", ascending=False, ignore_index=True)
        headline = {
            "logprob_base": float(result.source_baseline.mean()),
            "logprob_tuned": float(result.target_baseline.mean()),
            "best_restored": float(order["restored"].max()) if gap >= self.min_gap else math.nan,
            "patching_deep_restore": value,
            "patches": float(len(table)),
        }
        nats = f"({headline['logprob_tuned']:.2f} → {headline['logprob_base']:.2f} nats)"
        if gap < 0:
            summary = (f"the tuned model's answer log-probability is above the base's {nats}: it lost nothing "
                       "to restore")  # fmt: skip
        elif gap < self.min_gap:
            summary = f"the tuned model's answer log-probability is within {gap:.2f} nats of the base's; nothing to restore"
        elif not applicable:
            top = order.iloc[0]
            summary = (f"a one-layer model has no layers after any component, so no restoration can show its later "
                       f"layers computing the capability: not applicable (largest restoration: {top.component}, "
                       f"{_share(top.restored)} of the gap {nats})")  # fmt: skip
        else:
            best = table.sort_values(["wrapper_evidence", "restored"], ascending=False).iloc[0]
            top = order.iloc[0]
            summary = (f"giving {best.component} its base output back restores {_share(best.restored)} of the "
                       f"capability's log-probability gap {nats} with {best.after_share:.0%} of the layers after it "
                       f"(largest restoration: {top.component}, {_share(top.restored)})")  # fmt: skip
            if not scored:
                summary += ("; estimated by attribution (linear), which the verdict does not weigh: its anchor was "
                            "fitted on exact patches")  # fmt: skip
        return Evidence(self.name, headline, order, plot=_plot, value=value, replicates=reps,
                        intervals={"patching_deep_restore": context.interval(reps),
                                   "logprob_base": context.interval(source.numpy()),
                                   "logprob_tuned": context.interval(target.numpy()),
                                   "best_restored": context.interval(restored.max(0).values.numpy())},
                        summary=summary)  # fmt: skip


def _component(site: str, layer: int, head: int) -> str:
    return f"L{layer}H{head}" if site == "head" else f"L{layer}.{site}"


def _share(restored: float) -> str:
    """A restored share in words: a patch can overshoot the whole gap."""
    return f"{restored:.0%}" if restored <= 1 else f"all ({restored:.0%}: it overshoots the base)"


def _plot(evidence: Evidence):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from capwrap.report import error_bars

    table = evidence.table
    heads = table[table["site"] == "head"]
    layers = table[table["site"] != "head"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("layer outputs", "heads"), column_widths=[0.4, 0.6])
    for site, part in layers.groupby("site"):
        part = part.sort_values("layer")
        fig.add_trace(go.Bar(x=[f"L{int(x)}" for x in part["layer"]], y=part["restored"], name=str(site).replace("_", " "),
                             error_y=error_bars(part, "restored")), row=1, col=1)  # fmt: skip
    if not heads.empty:
        grid = heads.pivot(index="layer", columns="head", values="restored").sort_index()
        fig.add_trace(
            go.Heatmap(z=grid.values, x=[f"H{int(h)}" for h in grid.columns], y=[f"L{int(x)}" for x in grid.index],
                       colorscale="RdBu", zmid=0, colorbar=dict(title="share of<br>gap restored", tickformat=".0%")),
            row=1, col=2,
        )  # fmt: skip
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="share of the gap restored", tickformat=".0%", row=1, col=1)
    fig.update_xaxes(title_text="head", row=1, col=2)
    fig.update_yaxes(title_text="layer", row=1, col=2)
    fig.update_layout(height=400, title=f"patching base → tuned: {evidence.direction} ({evidence.strength:.2f})",
                      legend=dict(title="patched site", orientation="h", yanchor="top", y=-0.25, x=0))  # fmt: skip
    return fig


def correlation(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])
