"""Analyzers: each takes a `ModelPair`, the capability and downstream tasks (and optionally a
`RunStore`) and returns `Evidence`."""

from capwrap.analyzers.adapter_diff import AdapterWeightDiff, adapter_weight_diff
from capwrap.analyzers.attention import AttentionComparison
from capwrap.analyzers.base import Analyzer, Direction, Evidence, ModelPair
from capwrap.analyzers.patching import SITES, Patching, PatchingResult, activation_patching, patch_index
from capwrap.analyzers.probing import ProbeResult, Probing, fit_probes, probe_features
from capwrap.analyzers.pruning import Pruning, prune, unit_scores
from capwrap.analyzers.revival import Revival, steps_to_threshold
from capwrap.analyzers.weight_diff import WeightDiff, effective_rank, graft, weight_change_table

__all__ = [
    "AdapterWeightDiff",
    "Analyzer",
    "AttentionComparison",
    "Direction",
    "Evidence",
    "ModelPair",
    "Patching",
    "PatchingResult",
    "SITES",
    "ProbeResult",
    "Probing",
    "Pruning",
    "Revival",
    "WeightDiff",
    "activation_patching",
    "adapter_weight_diff",
    "effective_rank",
    "fit_probes",
    "graft",
    "patch_index",
    "probe_features",
    "prune",
    "steps_to_threshold",
    "unit_scores",
    "weight_change_table",
]
