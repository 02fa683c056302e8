"""An append-only, crash-safe, on-disk store of one training run.

A :class:`RunStore` is a directory holding

* ``meta.json`` -- user metadata and the declared arrays (shape, dtype, file), rewritten atomically;
* ``steps.jsonl`` -- the commit log, one JSON line per committed step:
  ``{"step": 3, "scalars": {"loss": 2.1}, "arrays": {"blocks.0.hook_mlp_out": 1}}``;
* ``arrays/<name>.bin`` -- raw little-endian records of fixed size, one per commit that recorded it.

Array bytes are written and fsynced *before* the commit line, so a writer killed at any moment
leaves a store that opens and shows exactly the steps whose commit line was completely written.
NaN scalars are stored as ``null`` and infinities as ``"inf"``/``"-inf"``; all read back as floats.

Examples:
    >>> import tempfile, numpy as np
    >>> from capwrap.recording.store import RunStore
    >>> path = tempfile.mkdtemp() + "/run"
    >>> with RunStore.create(path, meta={"lr": 1e-3}) as store:
    ...     for step in range(3):
    ...         store.append(step, scalars={"loss": 1.0 / (step + 1)},
    ...                      arrays={"acts": np.full((2, 4), step, dtype=np.float32)})
    >>> run = RunStore.open(path)
    >>> run.steps, run.meta["lr"]
    ([0, 1, 2], 0.001)
    >>> run.array("acts").shape
    torch.Size([3, 2, 4])
    >>> run.scalars()["loss"].tolist()
    [1.0, 0.5, 0.3333333333333333]
"""

from __future__ import annotations

import datetime
import json
import math
import operator
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from capwrap.errors import ConfigError, StoreError, closest_matches
from capwrap.files import write_json_atomic

try:  # POSIX only: keeps two processes from appending to the same store at once.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunStore"]

FORMAT_VERSION = 1
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
ArraySpec = tuple[tuple[int, ...], str]


def _safe_file_name(name: str, taken: set[str]) -> str:
    """A file name for array ``name``: safe bytes kept, others ``%XX``-escaped, unique ignoring case."""
    base = "".join(chr(b) if chr(b) in _SAFE_CHARS else f"%{b:02X}" for b in name.encode("utf-8"))
    lowered, candidate, n = {t.lower() for t in taken}, base + ".bin", 1
    while candidate.lower() in lowered:  # case-insensitive file systems
        n += 1
        candidate = f"{base}~{n}.bin"
    return candidate


def _sync(fd: int) -> None:
    """Flush a file's data to disk (``fdatasync`` where the platform has it: it skips the
    metadata that reading the data back does not need)."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _encode_scalar(name: Any, value: Any) -> float | str | None:
    if not isinstance(name, str):
        raise ConfigError(f"Scalar name {name!r} is not a string; use string names such as 'loss'.")
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(
            f"Scalar {name!r} has non-numeric value {value!r}; pass a number (e.g. loss.item())."
        ) from None
    if math.isnan(x):
        return None
    return ("inf" if x > 0 else "-inf") if math.isinf(x) else x


def _decode_scalar(value: float | str | None) -> float:
    return math.nan if value is None else float(value)


def _check_spec(name: str, shape: Any, dtype: Any) -> ArraySpec:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Array name {name!r} is invalid; use a non-empty string such as a hook name.")
    if dtype not in _DTYPES:
        raise ConfigError(f"Array {name!r} has dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ConfigError(f"Array {name!r} has shape {shape!r}; pass a tuple of ints.") from None
    if any(d < 0 for d in dims):
        raise ConfigError(f"Array {name!r} has negative size in shape {dims}; pass sizes >= 0.")
    return dims, dtype


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.dtype not in (torch.float16, torch.float32):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class RunStore:
    """One training run on disk: per-step scalars plus fixed-shape float arrays at some steps.

    Build one with :meth:`create`, :meth:`open` (read-only) or :meth:`resume` (append again).
    Readers re-read the commit log when it grew, so a store another process appends to can be
    followed live.
    """

    def __init__(self, path: Path, writable: bool):
        self.path = path
        self._writable = writable
        self._closed = False
        self._log_file = None  # binary handle on steps.jsonl, writers only
        self._load_meta()
        self._log_end = 0  # bytes of steps.jsonl that hold committed lines
        self._seen_size = -1
        self._steps: list[int] = []
        self._scalar_rows: list[dict[str, float]] = []
        self._array_steps: dict[str, list[int]] = {}
        self._refresh()

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        meta: dict | None = None,
        arrays: dict[str, tuple[tuple[int, ...], str]] | None = None,
        overwrite: bool = False,
    ) -> RunStore:
        """Create a new, empty store at ``path`` and open it for appending.

        ``arrays`` may declare arrays up front as ``{name: (shape, dtype)}``; others are declared
        on their first :meth:`append`. ``overwrite=True`` deletes an existing store at ``path``.
        """
        path = Path(path)
        specs = {name: _check_spec(name, *spec) for name, spec in (arrays or {}).items()}
        user = dict(meta or {})
        try:
            json.dumps(user, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"meta is not JSON-serializable ({e}); pass only str/number/list/dict.") from e
        if path.exists():
            if not path.is_dir():
                raise StoreError(f"{path} exists and is a file, not a run store; choose another path.")
            entries = {p.name for p in path.iterdir()}
            if entries and not overwrite:
                raise StoreError(
                    f"{path} already exists and is not empty; pass overwrite=True to replace it, "
                    f"or use RunStore.resume({str(path)!r}) to continue it."
                )
            if entries and not entries & {"meta.json", "steps.jsonl"}:
                raise StoreError(
                    f"{path} is not a run store, so overwrite=True refuses to delete it; "
                    "choose another path or delete it yourself."
                )
            shutil.rmtree(path)
        (path / "arrays").mkdir(parents=True)
        (path / "steps.jsonl").touch()
        info: dict[str, dict] = {}
        for name, (shape, dtype) in specs.items():
            info[name] = {"shape": list(shape), "dtype": dtype, "file": _safe_file_name(name, _files(info))}
            (path / "arrays" / info[name]["file"]).touch()
        created = datetime.datetime.now(datetime.UTC).isoformat()
        doc = {"format_version": FORMAT_VERSION, "created": created, "user": user, "arrays": info}
        write_json_atomic(path / "meta.json", doc, indent=1)  # written last: its presence marks a store
        return cls._writer(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunStore:
        """Open the store at ``path`` read-only."""
        return cls(Path(path), writable=False)

    @classmethod
    def resume(cls, path: str | os.PathLike) -> RunStore:
        """Open the store at ``path`` for appending; uncommitted bytes left by a crash are cut off."""
        return cls._writer(Path(path))

    @classmethod
    def _writer(cls, path: Path) -> RunStore:
        self = cls(path, writable=False)
        (path / "steps.jsonl").touch()
        self._log_file = open(path / "steps.jsonl", "r+b")  # noqa: SIM115 - closed in close()
        if fcntl is not None:
            try:
                fcntl.flock(self._log_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._log_file.close()
                raise StoreError(
                    f"Another process is appending to {path}; close it there first (or open read-only)."
                ) from None
        self._refresh()  # re-read under the lock, then drop everything uncommitted
        self._log_file.truncate(self._log_end)
        self._cut_uncommitted_arrays()
        self._writable = True
        return self

    def _cut_uncommitted_arrays(self) -> None:
        """Truncate each array file to the records the commit log covers."""
        for name, info in self._arrays.items():
            file = self.path / "arrays" / info["file"]
            if file.exists() and file.stat().st_size > self._committed_bytes(name):
                with open(file, "r+b") as f:
                    f.truncate(self._committed_bytes(name))

    def _load_meta(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"No run store at {self.path}: it is a file; a run store is a folder (meta.json, steps.jsonl, ...).")
        if not self.path.is_dir():
            raise StoreError(f"No run store at {self.path}: the directory does not exist; check the path.")
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise StoreError(
                f"{self.path} is not a run store (no meta.json); check the path or create one with RunStore.create()."
            )
        try:
            doc = json.loads(meta_file.read_text(encoding="utf-8"))
            arrays = {n: {**i, "shape": [int(d) for d in i["shape"]]} for n, i in doc["arrays"].items()}
            user, version = doc["user"], doc["format_version"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(
                f"{meta_file} is corrupt ({type(e).__name__}: {e}); restore it from a backup or recreate the store."
            ) from None
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{meta_file} has format_version {version!r}, this capwrap reads "
                f"{FORMAT_VERSION}; use the capwrap version that wrote it."
            )
        self._doc, self._arrays, self.meta = doc, arrays, user

    # ---------------------------------------------------------------- reading the log
    def _refresh(self) -> None:
        """Parse commit lines appended since the last call (cheap when the log did not grow)."""
        log = self.path / "steps.jsonl"
        size = log.stat().st_size if log.exists() else 0
        if size == self._seen_size:
            return
        with open(log, "rb") as f:
            f.seek(self._log_end)
            data = f.read()
        self._seen_size = self._log_end + len(data)
        lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete
        for i, line in enumerate(lines):
            if not self._commit_line(line):
                later = [j for j in range(i + 1, len(lines)) if lines[j].strip()]
                if later:
                    raise StoreError(
                        f"{log} has an undecodable commit line followed by {len(later)} more lines; "
                        "the store is corrupt: truncate the file before that line to recover."
                    )
                break
            self._log_end += len(line) + 1

    def _commit_line(self, line: bytes) -> bool:
        """Apply one commit line to the cached state; False if it is not a valid commit."""
        try:
            rec = json.loads(line)
            step = rec["step"]
            scalars = {str(k): _decode_scalar(v) for k, v in rec.get("scalars", {}).items()}
            arrays = dict(rec.get("arrays", {}))
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        if type(step) is not int or (self._steps and step <= self._steps[-1]):
            return False
        if any(n not in self._arrays for n in arrays):  # declared by another process since we read it
            self._load_meta()
        for name, index in arrays.items():
            if name not in self._arrays or index != len(self._array_steps.get(name, [])):
                return False
        self._steps.append(step)
        self._scalar_rows.append(scalars)
        for name in arrays:
            self._array_steps.setdefault(name, []).append(step)
        return True

    def _committed_bytes(self, name: str) -> int:
        shape, dtype = self.array_spec(name)
        return len(self._array_steps.get(name, [])) * int(np.prod(shape)) * _DTYPES[dtype].itemsize

    # ---------------------------------------------------------------- public reading API
    @property
    def array_names(self) -> list[str]:
        """Names of every declared array."""
        return list(self._arrays)

    def array_spec(self, name: str) -> ArraySpec:
        """``(shape, dtype)`` of one record of array ``name``."""
        info = self._arrays.get(name)
        if info is None:
            self._refresh()
            if name not in self._arrays:
                self._load_meta()
            info = self._arrays.get(name)
        if info is None:
            hint = closest_matches(name, self._arrays)
            raise ConfigError(
                f"Unknown array {name!r} in {self.path}"
                + (f"; did you mean {hint}?" if hint else "")
                + f" Use one of store.array_names: {sorted(self._arrays)}."
            )
        return tuple(info["shape"]), info["dtype"]

    @property
    def steps(self) -> list[int]:
        """Every committed step, in increasing order."""
        self._refresh()
        return list(self._steps)

    @property
    def last_step(self) -> int | None:
        """The last committed step, or None for an empty store."""
        self._refresh()
        return self._steps[-1] if self._steps else None

    def __len__(self) -> int:
        self._refresh()
        return len(self._steps)

    def array_steps(self, name: str) -> list[int]:
        """The steps at which array ``name`` was recorded, in order."""
        self._refresh()
        self.array_spec(name)
        return list(self._array_steps.get(name, []))

    def array(self, name: str) -> torch.Tensor:
        """Every committed record of ``name`` as a memory-mapped ``[n_records, *shape]`` tensor.

        The mapping is copy-on-write: in-place edits of the tensor stay private and never reach
        the file. Record ``i`` belongs to step ``array_steps(name)[i]``.
        """
        self._refresh()
        shape, dtype = self.array_spec(name)
        n = len(self._array_steps.get(name, []))
        if n == 0 or self._committed_bytes(name) == 0:
            return torch.zeros((n, *shape), dtype=getattr(torch, dtype))
        file = self.path / "arrays" / self._arrays[name]["file"]
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < self._committed_bytes(name):
            held = "is missing" if size is None else f"holds {size} bytes"
            raise StoreError(
                f"{file} {held} where the {n} records of array {name!r} that {self.path / 'steps.jsonl'} "
                f"commits need {self._committed_bytes(name)}: the file was cut or lost after it was written "
                "(an incomplete copy?). Copy the store again from where it was recorded, or record the run again."
            )
        mm = np.memmap(file, dtype=_DTYPES[dtype], mode="c", shape=(n, *shape))
        return torch.from_numpy(mm)

    def scalars(self) -> pd.DataFrame:
        """All scalars: index ``step`` (every committed step), one column per scalar name."""
        self._refresh()
        frame = pd.DataFrame(self._scalar_rows, index=pd.Index(self._steps, name="step"), dtype="float64")
        return frame

    # ---------------------------------------------------------------- writing
    def _check_writable(self) -> None:
        if not self._writable or self._closed:
            why = "was opened read-only" if not self._writable else "was closed"
            raise StoreError(f"RunStore at {self.path} {why}; use RunStore.resume(path) to append to it.")

    def append(
        self,
        step: int,
        scalars: dict[str, float] | None = None,
        arrays: dict[str, torch.Tensor | np.ndarray] | None = None,
    ) -> None:
        """Commit ``step`` with its scalars and arrays; it is durable once this returns."""
        self._check_writable()
        try:
            step = operator.index(step)
        except TypeError:
            raise ConfigError(f"step must be an int, got {step!r}; pass the optimizer step number.") from None
        if self._steps and step <= self._steps[-1]:
            raise ConfigError(
                f"step {step} does not follow the last step {self._steps[-1]} of {self.path}; "
                "steps must strictly increase, so append a larger step."
            )
        encoded = {name: _encode_scalar(name, value) for name, value in (scalars or {}).items()}
        data = {name: self._prepare_array(name, value) for name, value in (arrays or {}).items()}
        new = {name: spec for name, (_, spec) in data.items() if name not in self._arrays}
        if new:  # declare before writing any data
            for name, (shape, dtype) in new.items():
                file = _safe_file_name(name, _files(self._arrays))
                self._arrays[name] = {"shape": list(shape), "dtype": dtype, "file": file}
            self._write_doc()
        index = {}
        for name, (arr, _) in data.items():
            index[name] = len(self._array_steps.get(name, []))
            with open(self.path / "arrays" / self._arrays[name]["file"], "ab") as f:
                f.truncate(self._committed_bytes(name))  # drop bytes of a failed earlier append
                f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))  # no copy of the data
                f.flush()
                _sync(f.fileno())
        line = json.dumps({"step": step, "scalars": encoded, "arrays": index}, separators=(",", ":"))
        raw = line.encode("utf-8") + b"\n"
        self._log_file.seek(self._log_end)
        self._log_file.truncate()
        self._log_file.write(raw)
        self._log_file.flush()
        _sync(self._log_file.fileno())
        self._log_end += len(raw)
        self._seen_size = self._log_end
        self._steps.append(step)
        self._scalar_rows.append({k: _decode_scalar(v) for k, v in encoded.items()})
        for name in data:
            self._array_steps.setdefault(name, []).append(step)

    def _prepare_array(self, name: str, value: Any) -> tuple[np.ndarray, ArraySpec]:
        arr = _to_numpy(value)
        if name in self._arrays:
            shape, dtype = self.array_spec(name)
            if tuple(arr.shape) != shape:
                raise ConfigError(
                    f"Array {name!r} was declared with shape {shape} but got shape {tuple(arr.shape)}; "
                    "record the same shape every time (use another array name for a different shape)."
                )
        else:
            dtype = "float16" if arr.dtype == np.float16 else "float32"
            shape, dtype = _check_spec(name, arr.shape, dtype)
        try:
            return np.ascontiguousarray(arr, dtype=_DTYPES[dtype]), (shape, dtype)
        except (TypeError, ValueError):
            raise ConfigError(f"Array {name!r} is not numeric ({arr.dtype}); pass a float tensor.") from None

    def rollback(self, step: int) -> None:
        """Drop every committed step after ``step``, so that appending continues from it.

        A resumed training run goes back to its last checkpoint and records the steps after it
        again; this removes their first recording. Cutting the commit log is the one commit point:
        a crash during the rollback leaves either the old store or the rolled-back one.
        """
        self._check_writable()
        self._refresh()
        keep = sum(1 for s in self._steps if s <= step)
        if keep == len(self._steps):
            return
        with open(self.path / "steps.jsonl", "rb") as f:
            lines = f.read(self._log_end).split(b"\n")
        end = sum(len(line) + 1 for line in lines[:keep])
        self._log_file.truncate(end)
        self._log_file.flush()
        _sync(self._log_file.fileno())
        self._log_end = self._seen_size = end
        self._steps, self._scalar_rows = self._steps[:keep], self._scalar_rows[:keep]
        self._array_steps = {name: [s for s in steps if s <= step] for name, steps in self._array_steps.items()}
        self._cut_uncommitted_arrays()

    def update_meta(self, **entries: Any) -> None:
        """Merge ``entries`` into the user metadata and rewrite ``meta.json`` atomically."""
        self._check_writable()
        try:
            json.dumps(entries, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"meta entries are not JSON-serializable ({e}); pass plain values.") from e
        self.meta.update(entries)
        self._write_doc()

    def _write_doc(self) -> None:
        self._doc.update(user=self.meta, arrays=self._arrays)
        write_json_atomic(self.path / "meta.json", self._doc, indent=1)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop appending (releases the writer lock); reading still works."""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._closed = True

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "append" if self._writable and not self._closed else "read-only"
        return f"RunStore({str(self.path)!r}, steps={len(self._steps)}, arrays={self.array_names}, {mode})"


def _files(arrays: dict[str, dict]) -> set[str]:
    return {info["file"] for info in arrays.values()}
