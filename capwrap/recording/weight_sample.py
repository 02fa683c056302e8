"""Which recorded step of a run a model's weights are: a few fixed weight values per tensor, recorded
with every full step, tell a run's own tuned model from another run's.

A :class:`~capwrap.recording.Recorder` picks :data:`PER_TENSOR` positions in every weight tensor when
a store starts (seeded by the tensor's name, kept in ``meta.json`` as ``weight_sample``) and records
the values there at step 0, every ``every`` steps and at the run's last step (array
``weight_sample``). :func:`match_steps` reads the same positions of a model and says which recorded
steps it equals: a tuned model saved at the end of the run equals the last one, even saved in
bfloat16 or float16, or merged from a LoRA adapter; another run's model equals none.

Examples:
    >>> import tempfile, torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.recording import Recorder, RunStore
    >>> model = build_model(ModelSpec(d_vocab=12, n_ctx=8, n_layers=1, d_model=8, n_heads=2), seed=0)
    >>> path = tempfile.mkdtemp() + "/run"
    >>> with Recorder(model, path, hooks=()) as rec:
    ...     with torch.no_grad():
    ...         _ = model.weights()["blocks.0.mlp.W_in"].add_(0.1)
    ...     rec.step(loss=1.0, final=True)
    >>> store = RunStore.open(path)
    >>> match_steps(store, lambda name: model.weights()[name]).steps
    [1]
    >>> match_steps(store, lambda name: build_model(model.spec, seed=0).weights()[name]).steps  # the start
    [0]
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from capwrap.recording.store import RunStore

__all__ = ["ARRAY", "PER_TENSOR", "SampleMatch", "gather", "match_steps", "positions_from_meta", "sample_positions"]

#: The store array (and ``meta.json`` key) that holds the sampled weight values.
ARRAY = "weight_sample"
#: Positions sampled in each weight tensor (all of a smaller one).
PER_TENSOR = 16
#: How far a model's value may be from the recorded one and still be the same weight, by the
#: coarsest format the model's sampled values fit (a checkpoint saved in bfloat16 or float16 holds
#: the recorded values rounded): ``(relative, absolute)``; the absolute part covers float16's
#: subnormals, the float32 one the float error of merging a LoRA adapter in another order.
TOLERANCES: dict[str, tuple[float, float]] = {
    "bfloat16": (2.0**-6, 0.0),  # two units in the last place: a value rounded twice (a bfloat16 base, then its merge)
    "float16": (2.0**-9, 2.0**-23),
    "float32": (1e-5, 1e-7),
}
#: Mismatched values a step may have and still be the model's: one in a thousand (none in a
#: store of fewer than a thousand sampled values).
MISMATCH_SHARE = 1e-3

Positions = dict[str, Tensor]


def sample_positions(weights: Mapping[str, Tensor], names: list[str], per_tensor: int = PER_TENSOR) -> Positions:
    """Up to ``per_tensor`` distinct flat positions in each weight ``names``, sorted, chosen by a
    generator seeded with the weight's name (the same weights get the same positions)."""
    positions = {}
    for name in sorted(names):
        n = weights[name].numel()
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        chosen = np.arange(n) if n <= per_tensor else rng.choice(n, size=per_tensor, replace=False)
        positions[name] = torch.as_tensor(np.sort(chosen), dtype=torch.long)
    return positions


def positions_from_meta(meta: dict) -> Positions | None:
    """The positions a store's ``meta.json`` keeps (``None`` for a store recorded without them)."""
    kept = meta.get(ARRAY)
    if not isinstance(kept, dict):
        return None
    return {name: torch.tensor(flat, dtype=torch.long) for name, flat in kept.items()}


def positions_to_meta(positions: Positions) -> dict[str, list[int]]:
    """``positions`` as ``meta.json`` keeps them."""
    return {name: flat.tolist() for name, flat in positions.items()}


def gather(
    weight_of: Callable[[str], Tensor],
    positions: Positions,
    index: dict[tuple[str, torch.device], tuple[Tensor, ...]] | None = None,
) -> Float[Tensor, " n_sampled"]:
    """The values at ``positions``, in float32, concatenated in the positions' order, on the weights'
    device (no copy of a whole tensor, even of a strided view). ``index``: a cache of the positions
    as indices of each weight's shape, per device, which a caller gathering at every recorded step
    keeps (one indexing operation per weight then, a kernel launch on a GPU)."""
    index = {} if index is None else index
    values = []
    for name, flat in positions.items():
        weight = weight_of(name).detach()
        key = (name, weight.device)
        if key not in index:
            index[key] = torch.unravel_index(flat.to(weight.device), weight.shape)
        values.append(weight[index[key]])
    return torch.cat(values).float()


@dataclass(frozen=True)
class SampleMatch:
    """Which recorded steps a model's sampled weights equal.

    Attributes:
        steps: the recorded steps the model equals, in order (empty: none).
        last_step: the store's last step with sampled weights.
        mismatched: values that differ from the last step's, beyond the tolerance.
        sampled: values compared per step.
        largest_difference: the largest relative difference from the last step's values.
        precision: the coarsest format the model's values fit, whose rounding the comparison allows.
    """

    steps: list[int]
    last_step: int
    mismatched: int
    sampled: int
    largest_difference: float
    precision: str

    @property
    def ends_the_run(self) -> bool:
        """Whether the model equals the run's last recorded weights."""
        return bool(self.steps) and self.steps[-1] == self.last_step


def match_steps(store: RunStore, weight_of: Callable[[str], Tensor]) -> SampleMatch | None:
    """Compare a model's weights (``weight_of(name)``, canonical names) with each step the store
    sampled; ``None`` for a store without sampled weights (recorded before they were, or not by a
    :class:`~capwrap.recording.Recorder`)."""
    positions = positions_from_meta(store.meta)
    if positions is None or ARRAY not in store.array_names or not store.array_steps(ARRAY):
        return None
    model = gather(weight_of, positions).cpu()
    recorded = store.array(ARRAY).float()
    # the coarser of the two: a checkpoint saved in bfloat16 holds the run's values rounded, and a run of
    # bfloat16 weights (a LoRA adapter merged into a bfloat16 base) recorded them rounded
    precision = next(
        p for p in ("bfloat16", "float16", "float32") if _fits(model, getattr(torch, p)) or _fits(recorded[-1], getattr(torch, p))
    )
    relative, absolute = TOLERANCES[precision]
    difference = (recorded - model).abs()
    # relative to the weight's size at the start too: a value the run moved near 0 was rounded at its old size
    off = difference > relative * torch.maximum(recorded.abs(), recorded[0].abs()) + absolute
    allowed = int(MISMATCH_SHARE * model.numel())
    counts = off.sum(dim=1)
    steps = store.array_steps(ARRAY)
    scale = recorded[-1].abs().clamp_min(float(recorded[-1].abs().median()) or 1.0)  # (a zero bias: its tensor's scale)
    return SampleMatch(
        steps=[s for s, c in zip(steps, counts.tolist(), strict=True) if c <= allowed],
        last_step=steps[-1],
        mismatched=int(counts[-1]),
        sampled=model.numel(),
        largest_difference=float((difference[-1] / scale).max()),
        precision=precision,
    )


def _fits(values: Tensor, dtype: torch.dtype) -> bool:
    """Whether every value is exactly representable in ``dtype``."""
    return bool(torch.equal(values.to(dtype).float(), values))
