"""The training checkpoint a run store keeps: everything :func:`capwrap.train` needs to continue.

:func:`capwrap.train` with ``TrainConfig(checkpoint_every=k)`` writes ``train_state.safetensors``
into the run's store every ``k`` steps and at the end: the model's weights, the optimizer's state,
the training method's state, the random number generators' states, the history so far, and what
the run was (config, model spec and backend, task, method) so that a resumed run can be checked
against it. It is one file, written atomically (a temporary file, then a rename), so a crash leaves
the previous checkpoint or the new one, never half of one.

The file is a safetensors file: the tensors, flattened under dotted names, and the rest as JSON in
the header's metadata (``capwrap.train_state``), with the tensors referenced by name. Reading it
never runs code (no pickle).

Examples:
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> save_train_state(folder, {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}})
    >>> state = load_train_state(folder)
    >>> state["step"], state["optimizer"]["state"][0]["exp_avg"]
    (3, tensor([1., 1.]))
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capwrap.errors import StoreError
from capwrap.files import write_bytes_atomic

__all__ = ["TRAIN_STATE_FILE", "save_train_state", "load_train_state", "rng_state", "set_rng_state"]

#: The checkpoint's file name inside a run store.
TRAIN_STATE_FILE = "train_state.safetensors"
_HEADER_KEY = "capwrap.train_state"


def save_train_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts, lists, tuples, numbers, strings, tensors and NumPy arrays)
    to ``folder/train_state.safetensors`` atomically."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    data = save(tensors, metadata={_HEADER_KEY: json.dumps(skeleton), "format": "pt"})
    write_bytes_atomic(Path(folder) / TRAIN_STATE_FILE, data)


def load_train_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The state :func:`save_train_state` wrote to ``folder``, or ``None`` if there is none.

    Raises:
        StoreError: the file exists but is not a readable training checkpoint.
    """
    from safetensors import SafetensorError, safe_open

    file = Path(folder) / TRAIN_STATE_FILE
    if not file.exists():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            header = (f.metadata() or {}).get(_HEADER_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if header is None:
            raise ValueError(f"no {_HEADER_KEY} entry in its header")
        return _unflatten(json.loads(header), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"{file} is not a readable training checkpoint ({exc}); delete it to start the run over, "
            "or restore it from a backup"
        ) from None


def rng_state() -> dict[str, Any]:
    """The states of the random number generators a training run may draw from: torch (CPU and
    every CUDA device that was initialized), NumPy's global generator and Python's ``random``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---- (de)serialization -------------------------------------------------------------------------
def _flatten(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of ``obj``; tensors go into ``tensors`` under unique dotted names.

    Dicts with string keys stay JSON objects; other dicts (the optimizer's state is keyed by
    parameter index) and tuples are tagged so that they come back as they were.
    """
    if isinstance(obj, torch.Tensor):
        while name in tensors:  # a dict key with a dot can spell another entry's path
            name += "~"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: no shared storage
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _flatten(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, f"{name}.{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a training checkpoint (at {name})")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__items__" in obj:
        return {_key(k): _unflatten(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return {k: _unflatten(v, tensors) for k, v in obj.items()}


def _key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
