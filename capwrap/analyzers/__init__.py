"""Analyzers: each reads a :class:`Context` (the pair, the tasks, the shared evaluation set) and
returns :class:`Evidence` about one of diagnose's two questions."""

from capwrap.analyzers.adapter_diff import AdapterWeightDiff, adapter_weight_diff
from capwrap.analyzers.attention import AttentionComparison
from capwrap.analyzers.base import (
    Analyzer,
    Context,
    Direction,
    EvalSet,
    Evidence,
    Kind,
    ModelPair,
    Question,
    analyzer_of,
)
from capwrap.analyzers.controls import untrained_like
from capwrap.analyzers.generalization import Generalization
from capwrap.analyzers.patching import (
    ENGINE_DEFAULTS,
    SITES,
    EngineSettings,
    Patching,
    PatchingResult,
    activation_patching,
    engine_settings,
    patch_index,
)
from capwrap.analyzers.probing import NewLatentProbing, ProbeResult, Probing, fit_probes, probe_features
from capwrap.analyzers.pruning import Pruning, prune, unit_scores
from capwrap.analyzers.revival import Revival, steps_to_threshold
from capwrap.analyzers.subgraph import Subgraph
from capwrap.analyzers.weight_diff import WeightDiff, effective_rank, graft, weight_change_table

__all__ = [
    "AdapterWeightDiff",
    "Analyzer",
    "AttentionComparison",
    "Context",
    "Direction",
    "ENGINE_DEFAULTS",
    "EngineSettings",
    "EvalSet",
    "Evidence",
    "Generalization",
    "Kind",
    "ModelPair",
    "NewLatentProbing",
    "Patching",
    "PatchingResult",
    "Question",
    "SITES",
    "ProbeResult",
    "Probing",
    "Pruning",
    "Revival",
    "Subgraph",
    "WeightDiff",
    "activation_patching",
    "adapter_weight_diff",
    "analyzer_of",
    "effective_rank",
    "engine_settings",
    "fit_probes",
    "graft",
    "patch_index",
    "probe_features",
    "prune",
    "steps_to_threshold",
    "unit_scores",
    "untrained_like",
    "weight_change_table",
]
