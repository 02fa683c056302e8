"""The weight diff of a PEFT adapter, read straight from its factors (LoRA) or formed per module (DoRA, IA3).

A PEFT LoRA adapter *is* a weight change: ``ΔW = scaling · B·A`` per adapted module.
:func:`adapter_weight_diff` reads the base checkpoint one layer at a time, forms each module's
``ΔW`` only for that layer, maps it onto TransformerLens components with the component map, and
reports what :func:`~capwrap.analyzers.streaming.stream_weight_diff` reports for a merged pair —
the same per-component table (plus each component's share of its kind's squared change), each
matrix's effective rank of change (found in ``O(size · r)``: the change has rank at most ``r``)
and the concentration headline — plus one row per adapted module: its rank, scaling, ``‖ΔW‖``
(from the factors alone) and share. The merged model is never built.

DoRA and IA3 changes are not low-rank and depend on the base's weights (DoRA rescales each output
row of ``W + scaling · B·A``; IA3 scales a module's inputs or outputs): their ``ΔW`` is formed
densely, module by module, from the base's tensors of the layer being read, the effective ranks
are found without a rank bound, and a module's ``change`` is the norm of that dense change (an
IA3 output scaling's bias change included). The adapter's description says which
(``delta``: ``"low-rank"`` or ``"dense"``).

Examples:
    >>> import json, tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> from capwrap.models import ModelSpec, build_model, save_model
    >>> spec = ModelSpec(d_vocab=20, n_ctx=8, n_layers=2, d_model=8, n_heads=2, architecture="llama")
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = save_model(build_model(spec, seed=0), root / "base")
    >>> (root / "adapter").mkdir()
    >>> _ = (root / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1,
    ...     "lora_alpha": 1, "target_modules": ["o_proj"], "base_model_name_or_path": str(root / "base")}))
    >>> b = torch.zeros(8, 1); b[0] = 1.0  # writes only output dimension 0 of layer 1's attention
    >>> a = torch.zeros(1, 8); a[0, 4:] = 1.0  # reads only head 1's values (d_head 4)
    >>> prefix = "base_model.model.model.layers.1.self_attn.o_proj"
    >>> save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(root / "adapter" / "adapter_model.safetensors"))
    >>> diff = adapter_weight_diff(root / "base", root / "adapter")
    >>> top = diff.table[diff.table["kind"] == "head"].iloc[0]
    >>> top["component"], float(top["share"])
    ('L1H1', 1.0)
    >>> diff.modules[["module", "rank", "change"]].values.tolist()
    [['model.layers.1.self_attn.o_proj', 1, 2.0]]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import Tensor

from capwrap.analyzers.streaming import StreamedWeightDiff, checkpoint_spec, stream_changes, streams
from capwrap.analyzers.weight_diff import change_summary
from capwrap.errors import CheckpointError
from capwrap.models.adapters import LoraAdapter, LoraModule, adapter_base, read_adapter
from capwrap.models.io import read_tokenizer
from capwrap.models.layouts import checkpoint_shapes
from capwrap.models.vocabulary import vocabulary_cut

__all__ = ["AdapterWeightDiff", "adapter_weight_diff", "adapter_summary"]


@dataclass
class AdapterWeightDiff(StreamedWeightDiff):
    """What :func:`adapter_weight_diff` measures.

    Attributes:
        table: per component, as :func:`~capwrap.analyzers.weight_change_table`, plus ``share``:
            the component's share of the squared change of all components of its kind.
        ranks: effective rank of each changed matrix's change.
        headline: ``total_change``, ``top1pct_share``, ``top10pct_share``,
            ``median_effective_rank_ratio`` (as :func:`~capwrap.analyzers.streaming.stream_weight_diff`).
        modules: one row per adapted module (``module, kind, method, rank, scaling, change, share``;
            ``method``: ``"lora"``, ``"dora"`` or ``"ia3"``; ``rank`` and ``scaling`` are the factors',
            none for IA3) and per tensor the adapter replaces whole with other values (``kind``
            ``"replaced"``; a copy equal to the base's is named in ``adapter["unchanged_copies"]``
            instead).
        adapter: the adapter's description (:meth:`~capwrap.models.adapters.LoraAdapter.describe`).
    """

    modules: pd.DataFrame
    adapter: dict


def adapter_weight_diff(
    base: str | os.PathLike | None,
    adapter: str | os.PathLike,
    allow_pickle: bool = False,
    progress: bool = False,
) -> AdapterWeightDiff:
    """The weight diff of a PEFT adapter (LoRA, DoRA, IA3, trainable tokens) against its base checkpoint folder, one
    layer at a time (DoRA and IA3 modules: each change formed densely from the layer's base tensors).

    Args:
        base: the base model's folder (``None``: the one ``adapter_config.json`` names).
        adapter: the adapter folder, as peft's ``save_pretrained`` writes it (LoRA, DoRA, IA3, trainable tokens).
        allow_pickle: also accept ``adapter_model.bin`` (the base must be safetensors).
        progress: show a progress bar over the layers.

    An adapter trained on the base grown by added tokens (peft saved the grown embedding layers) is
    measured on the base's tokens, and its description's ``vocabulary`` says what that left out
    (:mod:`capwrap.models.vocabulary`).

    Raises:
        CheckpointError: a folder is missing or corrupt, or the adapter does not fit the base.
    """
    lora = read_adapter(adapter, allow_pickle)
    base = Path(base if base is not None else adapter_base(adapter))
    spec = checkpoint_spec(base)
    trained = lora.trained_spec(spec)
    if trained is not spec:  # trained on the base grown by added tokens: its change to the base's tokens
        lora = lora.cut_tokens(trained, spec.d_vocab)
    lora.check_fits(spec, checkpoint_shapes(spec))
    replaced_change: dict[str, float] = {}
    dense_change: dict[str, float] = {}  # DoRA and IA3 modules: ‖ΔW‖ of the change formed from the base

    def change(names: list[str], base_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            if name in lora.replaced:
                out[name] = lora.replaced[name].float() - base_tensors[name]
                replaced_change[name] = float(out[name].double().square().sum()) ** 0.5
        base_now = {**base_tensors, **{name: t.float() for name, t in lora.replaced.items() if name in base_tensors}}
        for module in lora.modules.values():
            if module.weight_name not in names:
                continue
            deltas = lora.deltas(spec, [module.weight_name], base_now)  # DoRA, IA3: from the base, replaced put in
            if module.method != "lora":
                dense_change[module.name] = sum(float(d.double().square().sum()) for d in deltas.values()) ** 0.5
            for name, delta in deltas.items():
                out[name] = out[name] + delta if name in out else delta
        return out

    # Whole replaced matrices can have any rank; LoRA changes have rank at most r, DoRA and IA3 changes any.
    low_rank = lora.low_rank and not any(t.ndim >= 2 for t in lora.replaced.values())
    bound = max((m.rank for m in lora.modules.values()), default=None) if low_rank else None
    table, ranks, total_sq = stream_changes(base, spec, change, rank_bound=bound, progress=progress)
    if not lora.modules and not replaced_change:
        raise CheckpointError(f"the adapter at {lora.path} changes nothing in {base}")
    kind_sq = (table["change"] ** 2).groupby(table["kind"]).transform("sum")
    table["share"] = (table["change"] ** 2 / kind_sq).where(kind_sq > 0)
    unchanged = [name for name, change in replaced_change.items() if change == 0]  # a copy of the base's tensor
    modules = _module_table(lora, replaced_change, dense_change)
    described = lora.describe(unchanged)
    if trained is not spec:
        described["vocabulary"] = vocabulary_cut(trained.d_vocab, spec.d_vocab, read_tokenizer(lora.path)).to_dict()
    return AdapterWeightDiff(table, ranks, change_summary(table, ranks, total_sq), modules, described)


def _module_table(lora: LoraAdapter, replaced_change: dict[str, float], dense_change: dict[str, float]) -> pd.DataFrame:
    """One row per adapted module (plain LoRA: ``‖ΔW‖`` from the factors; DoRA, IA3: of the change
    formed from the base) and per replaced tensor that differs from the base's."""
    rows = [
        (m.name, m.kind, m.method, m.rank, getattr(m, "scaling", None),
         math.sqrt(m.sq_norm()) if isinstance(m, LoraModule) and m.method == "lora" else dense_change[m.name])
        for m in lora.modules.values()
    ]  # fmt: skip
    rows += [(name, "replaced", None, None, None, change) for name, change in replaced_change.items() if change > 0]
    table = pd.DataFrame(rows, columns=["module", "kind", "method", "rank", "scaling", "change"])
    total = float((table["change"] ** 2).sum())
    table["share"] = table["change"] ** 2 / total if total > 0 else math.nan
    return table.sort_values("change", ascending=False, ignore_index=True)


def adapter_summary(base: str | os.PathLike, adapter: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """The adapter's description and, when ``base`` is a local folder of safetensors files, its
    weight diff's headline and five largest modules, as JSON-serializable data (``summary.json``'s
    ``adapter`` entry; a base of pickle files, which the streamed diff does not read, gets
    ``weight_diff_skipped`` instead: the diagnosis's own weight diff measures the merged change)."""
    folder = Path(base)
    if folder.is_dir() and streams(folder):  # the diff's description of the adapter knows the base's tensors
        diff = adapter_weight_diff(base, adapter, allow_pickle)
        heads = diff.table[diff.table["kind"].isin(("head", "neuron"))].head(5)
        return {"adapter": diff.adapter, "applied_to": str(base), "weight_diff": diff.headline,
                "largest_modules": diff.modules.head(5).to_dict(orient="records"),
                "largest_units": heads[["component", "change", "share"]].to_dict(orient="records")}  # fmt: skip
    out: dict = {"adapter": read_adapter(adapter, allow_pickle).describe(), "applied_to": str(base)}
    if folder.is_dir():
        out["weight_diff_skipped"] = (
            "the base folder holds pickle files only, which the streamed adapter diff does not read; the diagnosis's "
            "weight_diff evidence measures the merged change"
        )
    return out
