"""Reading a checkpoint's tensor files safely: safetensors always, pickle files only when asked.

A pickle file (``pytorch_model.bin``, ``adapter_model.bin``) can run arbitrary code when loaded, so
it is refused unless the caller passes ``allow_pickle=True``, and even then read with
``torch.load(weights_only=True)``. Every failure is a :class:`~capwrap.errors.CheckpointError`
that names the file and the fix.

Examples:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"w": torch.ones(2)}, str(path))
    >>> read_safetensors(path, fix="re-save it")["w"].tolist()
    [1.0, 1.0]
    >>> read_pickle_tensors(path.with_name("pytorch_model.bin"), allow_pickle=False,
    ...                     holds="weights", fix="convert it to model.safetensors")
    Traceback (most recent call last):
    ...
    capwrap.errors.CheckpointError: ... holds weights only as a pickle file (pytorch_model.bin). ...
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from capwrap.errors import CheckpointError

__all__ = ["read_pickle_tensors", "read_safetensors"]


def read_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; a corrupt or truncated file raises a
    :class:`~capwrap.errors.CheckpointError` that ends with ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}); {fix}") from exc


def read_pickle_tensors(path: Path, allow_pickle: bool, holds: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of the pickle file ``path`` read with ``torch.load(weights_only=True)``, only when
    ``allow_pickle``; otherwise a :class:`~capwrap.errors.CheckpointError` saying that its folder
    ``holds`` (e.g. ``"weights"``, ``"the adapter"``) only as a pickle file, and naming both ways out:
    ``allow_pickle=True`` (``--allow-pickle`` on the command line) or ``fix``."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path.parent} holds {holds} only as a pickle file ({path.name}). Pickle files can run arbitrary "
            "code when loaded, so capwrap refuses them by default. If you trust the source, pass allow_pickle=True "
            f"(--allow-pickle; capwrap then loads with torch.load(weights_only=True)), or {fix}"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
        # torch's message advises weights_only=False, which runs the pickle's code: only what it met is kept
        met = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please use|\n\n|$)", str(exc), re.S)
        reason = " ".join(met.group(1).split()) if met else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{path} could not be read safely (torch.load with weights_only=True: {reason[:200]}). It is corrupt, or "
            "holds more than tensors; capwrap never loads pickles with weights_only=False. Convert it to safetensors "
            "where its source is trusted (or re-save it there with save_pretrained)"
        ) from exc
