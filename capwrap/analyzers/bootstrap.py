"""Bootstrap resampling, the one scheme every analyzer's confidence interval uses.

An analyzer that measures something on evaluation sequences recomputes it on ``n_boot`` resamples
of those sequences (drawn with replacement, reproducible from a seed) and reports the resamples'
``level`` percentile interval. Analyzers that train (revival) also vary their training seed.

Examples:
    >>> import torch
    >>> correct = torch.tensor([1, 1, 1, 0] * 25, dtype=torch.float32)
    >>> idx = resample(len(correct), n_boot=500, seed=0)
    >>> replicates = correct[idx].mean(1)
    >>> lo, hi = percentile_interval(replicates.numpy())
    >>> 0.6 < lo < 0.75 < hi < 0.85
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["resample", "percentile_interval", "LEVEL"]

#: The default coverage of every interval capwrap reports.
LEVEL = 0.9


def resample(n: int, n_boot: int, seed: int) -> Int[Tensor, "n_boot n"]:
    """``n_boot`` resamples (with replacement) of ``n`` indices, reproducible from ``seed``."""
    if n <= 0 or n_boot <= 0:
        return torch.zeros((max(n_boot, 0), max(n, 0)), dtype=torch.long)
    return torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of the finite replicates; ``(nan, nan)`` when there are none."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return (float(lo), float(hi))
