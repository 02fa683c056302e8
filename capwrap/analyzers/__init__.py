"""Analyzers: each takes a `ModelPair`, the capability and downstream tasks (and optionally a
`RunStore`) and returns `Evidence`."""

from capwrap.analyzers.base import Analyzer, Direction, Evidence, ModelPair
from capwrap.analyzers.weight_diff import WeightDiff, effective_rank, graft, weight_change_table

__all__ = [
    "Analyzer",
    "Direction",
    "Evidence",
    "ModelPair",
    "WeightDiff",
    "effective_rank",
    "graft",
    "weight_change_table",
]
