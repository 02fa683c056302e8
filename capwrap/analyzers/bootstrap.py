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
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["resample", "percentile_interval", "check_n_boot", "min_replicates", "LEVEL"]

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


def min_replicates(level: float = LEVEL) -> int:
    """The fewest bootstrap replicates that place both ends of a central ``level`` interval: one
    replicate in each tail of ``(1 - level) / 2`` (20 for a 90% interval).

    Example:
        >>> min_replicates(0.9), min_replicates(0.95)
        (20, 40)
    """
    return math.ceil(round(2 / (1 - level), 9))


def check_n_boot(n_boot: Any, level: float = LEVEL) -> int:
    """``n_boot`` as an ``int``, or a :class:`~capwrap.errors.ConfigError` when it is not a whole number
    or too few to place a ``level`` interval's ends (:func:`min_replicates`): with fewer, the
    "interval" is a replicate or two, which need not even contain the point.

    Example:
        >>> check_n_boot(5)
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: n_boot=5 bootstrap replicates cannot place the ends of a 90% interval (each end cuts off 5% of the replicates): give n_boot >= 20 (the default is 200)
    """
    from capwrap.errors import ConfigError, whole_number

    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level!r}")
    n_boot = whole_number(n_boot, "n_boot (bootstrap replicates)", minimum=1)
    if n_boot < (least := min_replicates(level)):
        tail = (1 - level) / 2
        raise ConfigError(
            f"n_boot={n_boot} bootstrap replicates cannot place the ends of a {level:.0%} interval (each end cuts off "
            f"{tail:.0%} of the replicates): give n_boot >= {least} (the default is 200)"
        )
    return n_boot
