"""One analyzer's :class:`~capwrap.analyzers.base.Evidence` as one file, read back equal.

The file is a safetensors file (no pickle): the bootstrap replicates as a float64 tensor, the
table as Parquet bytes (dtypes kept) and everything else as JSON in its metadata, floats written
exactly. ``extra`` is any JSON object stored with the evidence (a diagnosis keeps the analyzer's
settings and its seconds there). It is written atomically: a reader finds the whole file or none.

A figure is a function of the evidence; the file names it (``module:function``) and reading the
file looks it up again, in capwrap's modules or in one already imported. Evidence whose figure
cannot be named that way (a lambda, a closure) is read back without one, and
:meth:`~capwrap.analyzers.base.Evidence.figure` then draws its headline numbers as a table.

Examples:
    >>> import tempfile, pandas as pd
    >>> from capwrap.analyzers import Evidence
    >>> ev = Evidence("mine", {"share": 0.25}, pd.DataFrame({"layer": [0, 1], "change": [0.1, 0.3]}),
    ...               direction="wrapper", strength=0.5, reasons=["a quarter moved"])
    >>> path = tempfile.mkdtemp() + "/mine.evidence"
    >>> write_evidence(ev, path, extra={"seconds": 1.5})
    >>> back, extra = read_evidence(path)
    >>> back.headline, back.table.equals(ev.table), back.direction, extra
    ({'share': 0.25}, True, 'wrapper', {'seconds': 1.5})
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from capwrap.errors import ConfigError
from capwrap.files import write_bytes_atomic

if TYPE_CHECKING:
    from capwrap.analyzers.base import Evidence

__all__ = ["read_evidence", "to_json_value", "write_evidence"]

#: Version of the file layout (read back only when equal).
FORMAT = 1

_FIELDS = ("analyzer", "headline", "direction", "strength", "reasons", "details", "kind", "question", "statistic",
           "value", "summary")  # fmt: skip


def write_evidence(evidence: Evidence, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``evidence`` (and the JSON object ``extra``) to ``path``, atomically.

    Raises:
        ConfigError: ``details`` or ``extra`` is not JSON (the evidence contract asks for JSON details).
    """
    from safetensors.numpy import save

    fields = {name: getattr(evidence, name) for name in _FIELDS}
    fields["intervals"] = {k: list(v) for k, v in evidence.intervals.items()}
    meta = {"format": FORMAT, "evidence": fields, "plot": _plot_name(evidence.plot), "extra": extra or {}}
    try:
        text = json.dumps(meta, default=to_json_value)
    except TypeError as err:
        raise ConfigError(f"the evidence of {evidence.analyzer!r} cannot be written: {err} (details must be JSON)") from None
    table = io.BytesIO()
    evidence.table.to_parquet(table)
    tensors = {
        "replicates": np.ascontiguousarray(evidence.replicates, dtype=np.float64),
        "table": np.frombuffer(table.getvalue(), dtype=np.uint8),
    }
    write_bytes_atomic(path, save(tensors, metadata={"capwrap_evidence": text}))


def read_evidence(path: str | os.PathLike) -> tuple[Evidence, dict[str, Any]]:
    """The evidence in ``path`` (written by :func:`write_evidence`) and its ``extra`` object.

    Raises:
        ConfigError: the file is missing, not an evidence file, or of another layout version.
    """
    from safetensors import SafetensorError, safe_open

    from capwrap.analyzers.base import Evidence

    try:
        with safe_open(str(path), framework="numpy") as file:
            meta_text = (file.metadata() or {}).get("capwrap_evidence")
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - not a dict
    except OSError as err:
        raise ConfigError(f"cannot read the evidence file {path}: {err.strerror or err}") from None
    except (SafetensorError, ValueError) as err:
        raise ConfigError(f"{path} is not an evidence file ({err}); delete it to measure the evidence again") from None
    if meta_text is None:
        raise ConfigError(f"{path} is not an evidence file (no capwrap_evidence metadata); delete it")
    meta = json.loads(meta_text)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is an evidence file of layout {meta.get('format')}, this capwrap reads {FORMAT}: "
                          "delete it to measure the evidence again")  # fmt: skip
    fields = meta["evidence"]
    fields["intervals"] = {k: (float(a), float(b)) for k, (a, b) in fields["intervals"].items()}
    table = pd.read_parquet(io.BytesIO(tensors["table"].tobytes()))
    evidence = Evidence(table=table, replicates=tensors["replicates"], plot=_find_plot(meta["plot"]), **fields)
    return evidence, meta["extra"]


def to_json_value(value: Any) -> Any:
    """``json.dumps``'s fallback: numpy scalars as Python numbers (floats exactly), arrays as lists;
    anything else is refused."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _plot_name(plot: Callable[..., Any] | None) -> str | None:
    """``module:qualname`` of a module-level function; ``None`` for no figure or one that cannot be named."""
    module, name = getattr(plot, "__module__", None), getattr(plot, "__qualname__", "")
    if plot is None or module is None or "<" in name:
        return None
    return f"{module}:{name}"


def _find_plot(name: str | None) -> Callable[..., Any] | None:
    """The function :func:`_plot_name` named, from a capwrap module or one already imported (a file
    never makes another module run); ``None`` when it is not there."""
    if name is None:
        return None
    module_name, _, qualname = name.partition(":")
    if module_name in sys.modules:
        module = sys.modules[module_name]
    elif module_name.split(".")[0] == "capwrap":
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    else:
        return None
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target if callable(target) else None
