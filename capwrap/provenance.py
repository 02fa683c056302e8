"""Provenance: what a result came from, so that a researcher can cite it and someone can redo it.

Every report and ``summary.json`` carries a provenance record: the software (capwrap,
TransformerLens, torch, Python and their platform), the command line (``capwrap ...``) or the
Python call that made it, the models (where they came from, their spec, backend, and a SHA-256 of
their weights that pins the exact numbers analyzed), the seeds, the date and the wall time.

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2), seed=0)
    >>> record = run_provenance(models={"base": model}, seeds={"seed": 0}, call="example()")
    >>> sorted(record)[:5]
    ['call', 'capwrap', 'command', 'date', 'device']
    >>> record["models"]["base"]["source"], len(record["models"]["base"]["weights_sha256"])
    ('built in memory', 64)
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import shlex
import sys
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from capwrap.models import CapModel

__all__ = [
    "environment",
    "model_provenance",
    "run_provenance",
    "command_line",
    "invoked_as",
    "tensors_sha256",
    "weights_sha256",
    "forget_weights_digest",
    "describe_call",
]

_COMMAND: ContextVar[str | None] = ContextVar("capwrap_command", default=None)


def environment() -> dict[str, Any]:
    """The software and machine: capwrap, TransformerLens, torch, transformers, Python, platform,
    torch threads and device."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from capwrap import __version__

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:  # pragma: no cover - a dependency is always installed
            return None

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "capwrap": __version__,
        "transformer_lens": installed("transformer-lens"),
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }


def command_line() -> str:
    """The command that is running: ``capwrap ...`` inside the CLI (see :func:`invoked_as`),
    otherwise the Python process's own command line."""
    command = _COMMAND.get()
    if command is not None:
        return command
    argv = sys.argv or [""]
    program = os.path.basename(argv[0]) or "python"
    return shlex.join([program, *argv[1:]]) if program == "capwrap" else shlex.join(["python", *argv])


@contextlib.contextmanager
def invoked_as(command: str) -> Iterator[None]:
    """Within the block, :func:`command_line` is ``command`` (the CLI sets its own command line)."""
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def tensors_sha256(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 over named tensors, in the order given: each name, dtype and raw bytes (read from a
    copy: a NumPy view of a model's weight would pin its memory, and a Residency could not free it)."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in tensors:
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().to("cpu", copy=True).contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_sha256(model: CapModel) -> str:
    """SHA-256 over the model's canonical weights (TransformerLens names, in name order, raw bytes):
    the same weights give the same digest on either backend.

    The digest is kept with the model until a weight changes (its memory or its in-place version
    counter), so that a diagnosis that names the weights twice — its evidence folder's identity, its
    provenance — reads them once (about 2 s per GB).

    Examples:
        >>> import torch
        >>> from capwrap.models import ModelSpec, build_model
        >>> model = build_model(ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2), seed=0)
        >>> first = weights_sha256(model)
        >>> with torch.no_grad():
        ...     _ = model.weights()["blocks.0.mlp.W_out"].mul_(2)
        >>> weights_sha256(model) != first
        True
    """
    weights = sorted(model.weights().items())
    try:  # what the digest was computed from: each weight's memory and in-place version
        state = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in weights)
    except RuntimeError:  # (an inference tensor has no version counter: no digest is kept)
        return tensors_sha256(weights)
    kept = _DIGESTS.get(model)
    if kept is not None and kept[0] == state:
        return kept[1]
    digest = tensors_sha256(weights)
    _DIGESTS[model] = (state, digest)
    return digest


#: The last weights digest of each model, with the state of the weights it was computed from.
_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def forget_weights_digest(model: CapModel) -> None:
    """Drop the digest :func:`weights_sha256` keeps for ``model``: for code that writes its weights'
    memory without a tensor operation (a :class:`~capwrap.models.residency.Residency` reading them back
    from its file), which their version counters do not see."""
    _DIGESTS.pop(model, None)


def model_provenance(model: CapModel) -> dict[str, Any]:
    """Where ``model`` came from (its folder or hub name, and hub revision when known; the adapter merged
    into it, and the token rows it was loaded without, if any), its spec, backend and :func:`weights_sha256`."""
    from capwrap.models.model import COPY_OF

    meta = model.metadata
    source = str(meta.get("source") or "built in memory")
    if meta.get(COPY_OF) is not None and meta[COPY_OF] == meta.get("source"):  # (a source set since wins)
        source = f"a copy made in memory of {meta[COPY_OF]} (its weights' digest says whether it changed since)"
    adapter = meta.get("adapter", {})
    return {
        "source": source,
        **({"adapter": str(adapter["path"])} if isinstance(adapter, dict) and adapter.get("path") else {}),
        **({"vocabulary": meta["vocabulary"]} if meta.get("vocabulary") else {}),  # loaded on fewer tokens
        "revision": meta.get("revision"),
        "architecture": model.spec.architecture,
        "backend": model.backend,
        "spec": model.spec.to_dict(),
        "weights_sha256": weights_sha256(model),
    }


def run_provenance(
    *,
    models: Mapping[str, CapModel] | None = None,
    seeds: Mapping[str, int] | None = None,
    call: str | None = None,
    started: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The provenance record of a run: :func:`environment`, the command line, the Python ``call``
    that made the result, each model's :func:`model_provenance`, the ``seeds``, the date (UTC) and,
    given ``started`` (a ``time.perf_counter()`` reading), the wall time. ``extra`` entries are
    added as they are (JSON values)."""
    record: dict[str, Any] = environment()
    record |= {
        "command": command_line(),
        "call": call,
        "models": {name: model_provenance(m) for name, m in (models or {}).items()},
        "seeds": dict(seeds or {}),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": None if started is None else round(time.perf_counter() - started, 2),
    }
    return record | extra


def describe_call(function: str, **arguments: Any) -> str:
    """``function(name=value, ...)`` with ``repr`` values: the Python call behind a result."""
    return f"{function}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"
