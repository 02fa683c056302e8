"""Weight diff of checkpoints on disk, one layer at a time: pairs larger than memory.

:func:`weight_change_table` needs both models in memory. For big checkpoints (a 1B-parameter pair
is 8 GB in float32), :func:`stream_weight_change` reads the two ``safetensors`` files (single or
sharded) tensor group by tensor group — the embeddings, then each layer — maps each group onto
TransformerLens components with the same layout code the models use (the other layers are
``meta`` tensors: shapes without memory), and accumulates every component's squared change and
norm. Peak memory is about one layer of each model, whatever the model's size.
:func:`stream_weight_diff` adds each matrix's effective rank of change and the concentration
headline: all the :class:`~capwrap.analyzers.WeightDiff` analyzer reports except grafting.

Examples:
    >>> import tempfile, torch
    >>> from capwrap.models import ModelSpec, build_model, save_model
    >>> spec = ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=16, n_heads=2, architecture="llama")
    >>> base = build_model(spec, seed=0)
    >>> tuned = base.clone()
    >>> with torch.no_grad():
    ...     tuned.weights()["blocks.1.mlp.W_out"][5] += 1.0  # neuron 5 of layer 1
    >>> root = tempfile.mkdtemp()
    >>> _ = save_model(base, f"{root}/base"), save_model(tuned, f"{root}/tuned")
    >>> stream_weight_change(f"{root}/base", f"{root}/tuned", kinds=("neuron",)).iloc[0]["component"]
    'L1N5'
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from capwrap.analyzers.weight_diff import _KINDS, GroupChange, accumulate_changes, change_summary, layer_groups
from capwrap.errors import CheckpointError, ConfigError
from capwrap.models.layouts import canonical_views_of_some, checkpoint_shapes
from capwrap.models.spec import ModelSpec
from capwrap.models.vocabulary import cut_state, shared_vocabulary

__all__ = ["stream_weight_diff", "stream_weight_change", "stream_changes", "StreamedWeightDiff", "checkpoint_spec",
           "streams"]



def checkpoint_spec(folder: str | os.PathLike) -> ModelSpec:
    """The :class:`~capwrap.models.ModelSpec` of a checkpoint folder, read from its config files only."""
    from capwrap.models.io import _read_capwrap_file, read_spec

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; check the path")
    return read_spec(folder, _read_capwrap_file(folder))


def _tensor_files(folder: Path, spec: ModelSpec) -> dict[str, tuple[Path, str]]:
    """Checkpoint tensor name -> the safetensors file holding it (single file or sharded with an
    index) and the name it is stored under there (older checkpoints drop the model prefix)."""
    from capwrap.models.io import stored_keys

    files = _stored_files(folder)
    return {name: (files[key], key) for name, key in stored_keys(spec, files).items()}


def streams(folder: str | os.PathLike) -> bool:
    """Whether streaming reads ``folder``'s weights: it holds ``model.safetensors`` or a sharded
    index of them (pickle files it does not read)."""
    return any((Path(folder) / name).exists() for name in (_INDEX, _SINGLE))


_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"


def _stored_files(folder: Path) -> dict[str, Path]:
    """Stored tensor name -> the safetensors file holding it."""
    index = folder / _INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / _SINGLE
    if not single.exists():
        pickled = any(folder.glob("*.bin"))
        raise CheckpointError(
            f"{folder} has no model.safetensors"
            + (
                "; it has only pickle files, which streaming does not read — convert them to safetensors"
                if pickled
                else ""
            )
        )
    from safetensors import safe_open

    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{single} is corrupt or not a safetensors file ({err})") from None


def _read_group(files: dict[str, tuple[Path, str]], names: list[str]) -> dict[str, Tensor]:
    """One group's tensors as float32 copies. The files are opened (memory-mapped) for this group
    only and closed after, so their pages do not pile up in the process's memory."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    with ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, "pt")) for p in {files[n][0] for n in names}}
        for n in names:
            path, key = files[n]
            out[n] = handles[path].get_tensor(key).float().clone()
    return out


@dataclass
class StreamedWeightDiff:
    """What :func:`stream_weight_diff` measures: the weight diff analyzer's numbers without grafting.

    Attributes:
        table: per component (``component, kind, layer, index, change, relative_change``), sorted
            by change, as :func:`~capwrap.analyzers.weight_change_table`.
        ranks: effective rank of each matrix's change, as :func:`~capwrap.analyzers.weight_diff.change_ranks`.
        headline: ``total_change``, ``top1pct_share``, ``top10pct_share``,
            ``median_effective_rank_ratio``, as the :class:`~capwrap.analyzers.WeightDiff` analyzer's.
    """

    table: pd.DataFrame
    ranks: pd.DataFrame
    headline: dict[str, float]


def stream_weight_diff(base: str | os.PathLike, tuned: str | os.PathLike, progress: bool = False) -> StreamedWeightDiff:
    """The weight diff of two checkpoint folders, read one layer at a time: the per-component table,
    each matrix's effective rank of change and the concentration headline — everything the
    :class:`~capwrap.analyzers.WeightDiff` analyzer reports except grafting (which runs models).
    A tuned checkpoint that added tokens is compared on the base's (:mod:`capwrap.models.vocabulary`).

    Raises:
        CheckpointError: a folder is missing, has no safetensors weights, or a file is corrupt.
        ConfigError: the two checkpoints differ in architecture or shape.
    """
    table, ranks, total_sq = _stream(base, tuned, _KINDS, with_ranks=True, progress=progress)
    return StreamedWeightDiff(table, ranks, change_summary(table, ranks, total_sq))


def stream_weight_change(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    kinds: Sequence[str] = _KINDS,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-component change between two checkpoint folders, read one layer at a time.

    Returns the table :func:`~capwrap.analyzers.weight_change_table` returns (``component, kind,
    layer, index, change, relative_change``, sorted by change) with the same numbers.

    Raises:
        CheckpointError: a folder is missing, has no safetensors weights, or a file is corrupt.
        ConfigError: the two checkpoints differ in architecture or shape.
    """
    return _stream(base, tuned, kinds, with_ranks=False, progress=progress)[0]


def _stream(
    base: str | os.PathLike, tuned: str | os.PathLike, kinds: Sequence[str], with_ranks: bool, progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """One pass over the two checkpoints: the change table, the matrices' ranks (if asked) and the
    summed squared change of every canonical weight."""
    spec_b, spec_t = checkpoint_spec(base), checkpoint_spec(tuned)
    d_vocab = shared_vocabulary(spec_b, spec_t)  # a fine-tune that added tokens: compared on the base's
    detail = "" if d_vocab else spec_b.differences(spec_t)
    if detail:
        raise ConfigError(f"the base and tuned checkpoints differ in {detail}")
    files_t = _tensor_files(Path(tuned), spec_t)
    missing = sorted(set(checkpoint_shapes(spec_t)) - set(files_t))
    if missing:
        raise CheckpointError(f"tensors missing from a checkpoint: {missing[:5]}")

    def tuned_minus_base(names: list[str], base_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        tuned_tensors = _read_group(files_t, names)
        if d_vocab:
            tuned_tensors = cut_state(spec_t, tuned_tensors, d_vocab)
        return {n: tuned_tensors[n] - base_tensors[n] for n in names}

    return stream_changes(base, spec_b, tuned_minus_base, kinds, with_ranks, progress)


#: ``change(names, base_tensors)``: the change of a group of checkpoint tensors, given the base's.
ChangeOfGroup = Callable[[list[str], dict[str, Tensor]], dict[str, Tensor]]


def stream_changes(
    base: str | os.PathLike,
    spec: ModelSpec,
    change: ChangeOfGroup,
    kinds: Sequence[str] = _KINDS,
    with_ranks: bool = True,
    progress: bool = False,
    rank_bound: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Read the base checkpoint one tensor group (the embeddings, then each layer) at a time, ask
    ``change`` for that group's change (checkpoint names; tensors it leaves out did not change),
    and accumulate every component's squared change and norm.

    Returns:
        The change table (as :func:`~capwrap.analyzers.weight_change_table`), each changed
        matrix's effective rank (``with_ranks``; ``rank_bound``: a known bound on the change's
        rank, see :func:`~capwrap.analyzers.weight_diff.change_ranks`) and the summed squared
        change of every canonical weight.
    """
    files_b = _tensor_files(Path(base), spec)
    shapes = dict(checkpoint_shapes(spec))
    missing = sorted(set(shapes) - set(files_b))
    if missing:
        raise CheckpointError(f"tensors missing from a checkpoint: {missing[:5]}")

    def groups() -> Iterator[GroupChange]:
        for names in tqdm(layer_groups(list(shapes)), desc="weight diff", disable=not progress, leave=False, unit="layer"):
            base_tensors = _read_group(files_b, names)
            yield canonical_views_of_some(spec, base_tensors), canonical_views_of_some(spec, change(names, base_tensors))

    changes = accumulate_changes(spec, groups(), kinds, with_ranks, rank_bound)
    return changes.table, changes.ranks, changes.total_sq
