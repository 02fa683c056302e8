"""An append-only, crash-safe, on-disk store of one training run.

A :class:`RunStore` is a directory holding

* ``meta.json`` -- user metadata and the declared arrays (shape, dtype, file), rewritten atomically;
* ``steps.jsonl`` -- the commit log, one JSON line per committed step:
  ``{"step": 3, "scalars": {"loss": 2.1}, "arrays": {"blocks.0.hook_mlp_out": 1}}``;
* ``arrays/<name>.bin`` -- raw little-endian records of fixed size, one per commit that recorded it.

Array bytes are written and fsynced *before* the commit line, so a writer killed at any moment
leaves a store that opens and shows exactly the steps whose commit line was completely written.
A writer never shrinks an array file below the records a reader may have memory-mapped: only a
:meth:`RunStore.rollback` drops committed records, and it puts a shortened copy in the file's place
(the readers' mappings keep the old file), so a reader is never killed by ``SIGBUS``.
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

import contextlib
import datetime
import json
import math
import operator
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from capwrap.errors import ConfigError, StoreError, closest_matches
from capwrap.files import fsync_dir, write_json_atomic

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


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest folder above ``path`` that exists as a file, if one does (``path`` cannot be made)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _copy_prefix(src: Path, dst: Path, n: int) -> None:
    """Write the first ``n`` bytes of ``src`` to a new file ``dst`` and flush them to disk."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        left = n
        if hasattr(os, "copy_file_range"):  # in the kernel; a reflink where the file system can
            try:
                while left and (done := os.copy_file_range(fin.fileno(), fout.fileno(), left)):
                    left -= done
            except OSError:  # not supported here: copy through memory from where it stopped
                fin.seek(n - left)
                fout.seek(n - left)
        while left:
            chunk = fin.read(min(left, 1 << 24))
            if not chunk:
                raise StoreError(f"{src} ended {left} bytes short of the {n} bytes to keep while copying it")
            fout.write(chunk)
            left -= len(chunk)
        fout.flush()
        _sync(fout.fileno())


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Hold the writer lock of the store at ``path`` (if it has a commit log) while the block runs.

    Raises:
        StoreError: another process holds it (is appending to the store).
    """
    log = path / "steps.jsonl"
    if fcntl is None or not log.is_file():
        yield
        return
    try:
        f = open(log, "r+b")  # noqa: SIM115 - as a writer opens it (some file systems lock only such)
    except PermissionError:  # a read-only log: its folder may still be deleted
        f = open(log, "rb")  # noqa: SIM115
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(
                f"Another process is appending to {path}, so overwrite=True refuses to delete it; "
                "close the store there first (or choose another path). In this process, a RunStore or Recorder "
                "left open holds it too (a Trainer run that failed before its end): close it (recorder.close())."
            ) from None
        yield


def _rollback_copy(file: Path) -> Path:
    """Where :meth:`RunStore.rollback` prepares the shortened copy of array file ``file``."""
    return file.with_name(file.name + ".rollback")


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
    Readers re-read the commit log when it changed, so a store another process appends to (or
    rolls back) can be followed live.
    """

    def __init__(self, path: Path, writable: bool):
        self.path = path
        self._writable = writable
        self._closed = False
        self._log_file = None  # binary handle on steps.jsonl, writers only
        self._load_meta()
        self._forget_log()
        self._reparses = 0  # times the log was parsed again from its start (a rollback was seen)
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
        on their first :meth:`append`. ``overwrite=True`` deletes an existing store at ``path``
        (a :class:`~capwrap.errors.StoreError` if another process is appending to it).
        """
        path = Path(path)
        specs = {name: _check_spec(name, *spec) for name, spec in (arrays or {}).items()}
        user = dict(meta or {})
        try:
            json.dumps(user, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"meta is not JSON-serializable ({e}); pass only str/number/list/dict.") from e
        if (blocker := _file_in_the_way(path)) is not None:
            raise StoreError(
                f"Cannot create a run store at {path}: {blocker} is a file, not a folder; "
                "choose a path under a folder (or move that file)."
            )
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
            with _writer_lock(path):  # never delete a store another process is appending to
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
        """Open the store at ``path`` for appending; uncommitted bytes left by a crash are cut off
        (and a :meth:`rollback` a crash interrupted is finished or undone)."""
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
                    f"Another process is appending to {path}; close it there first (or open read-only). In this "
                    "process, a RunStore or Recorder left open holds it too (a Trainer run that failed before its "
                    "end): close it (recorder.close())."
                ) from None
        self._refresh()  # re-read under the lock, then drop everything uncommitted
        self._log_file.truncate(self._log_end)
        self._finish_rollback()
        self._cut_uncommitted_arrays()
        self._writable = True
        return self

    def _finish_rollback(self) -> None:
        """Complete a rollback a crash interrupted after its commit point: put each shortened copy
        it prepared in its array's place, or delete copies of a rollback that did not commit."""
        found = False
        for name, info in self._arrays.items():
            copy = _rollback_copy(self.path / "arrays" / info["file"])
            if copy.is_file():  # it holds fewer records than the log committed before the cut
                found = True
                if copy.stat().st_size == self._committed_bytes(name):  # the cut was made
                    os.replace(copy, self.path / "arrays" / info["file"])
                else:
                    copy.unlink()
        if found:
            fsync_dir(self.path / "arrays")

    def _cut_uncommitted_arrays(self) -> None:
        """Truncate each array file to the records the commit log covers. The bytes cut were never
        committed (a rollback shortens files by replacing them), so no reader has them mapped."""
        for name, info in self._arrays.items():
            file = self.path / "arrays" / info["file"]
            if file.exists() and file.stat().st_size > self._committed_bytes(name):
                with open(file, "r+b") as f:
                    f.truncate(self._committed_bytes(name))

    def _load_meta(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"No run store at {self.path}: it is a file; a run store is a folder (meta.json, steps.jsonl, ...).")
        if not self.path.is_dir():
            if (blocker := _file_in_the_way(self.path)) is not None:
                raise StoreError(f"No run store at {self.path}: {blocker} is a file, not a folder; check the path.")
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
    def _forget_log(self) -> None:
        """Drop what was parsed of the commit log (it is parsed again from its start)."""
        self._log_end = 0  # bytes of steps.jsonl that hold committed lines
        self._last_line = b""  # the last committed line, with its newline: ends at _log_end
        self._steps: list[int] = []
        self._scalar_rows: list[dict[str, float]] = []
        self._array_steps: dict[str, list[int]] = {}

    def _read_log(self, start: int) -> bytes:
        try:
            with open(self.path / "steps.jsonl", "rb") as f:
                f.seek(start)
                return f.read()
        except FileNotFoundError:
            return b""

    def _refresh(self) -> None:
        """Parse the commit lines appended since the last call.

        A writer's :meth:`rollback` (a resumed training run does one) cuts the log and appends
        other lines in place of the dropped ones, so the last line parsed is read again: if it
        changed, or the log no longer reaches it, the log is parsed again from its start.
        """
        if self._writable and not self._closed:  # the one writer: nobody else changes the log
            return
        start = self._log_end - len(self._last_line)
        data = self._read_log(start)
        if data.startswith(self._last_line) and self._parse(data[len(self._last_line) :], raise_corrupt=False):
            return
        self._forget_log()  # rolled back since it was read (or read while being rolled back)
        self._reparses += 1
        self._parse(self._read_log(0), raise_corrupt=True)

    def _parse(self, data: bytes, raise_corrupt: bool) -> bool:
        """Apply the commit lines of ``data``, which starts at ``_log_end``; False where a line that
        is no commit is followed by more lines (corrupt, or read across a rollback)."""
        lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete
        for i, line in enumerate(lines):
            if not self._commit_line(line):
                later = [j for j in range(i + 1, len(lines)) if lines[j].strip()]
                if not later:
                    break
                if raise_corrupt:
                    raise StoreError(
                        f"{self.path / 'steps.jsonl'} has an undecodable commit line followed by {len(later)} "
                        "more lines; the store is corrupt: truncate the file before that line to recover."
                    )
                return False
            self._log_end += len(line) + 1
            self._last_line = line + b"\n"
        return True

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

    def _record_bytes(self, name: str) -> int:
        shape, dtype = self.array_spec(name)
        return int(np.prod(shape)) * _DTYPES[dtype].itemsize

    def _committed_bytes(self, name: str) -> int:
        return len(self._array_steps.get(name, [])) * self._record_bytes(name)

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
        file = self.path / "arrays" / self._arrays[name]["file"]
        for _ in range(3):  # again while a writer's rollback replaces the file under this read
            reparses = self._reparses
            n, need = len(self._array_steps.get(name, [])), self._committed_bytes(name)
            if n == 0 or need == 0:
                return torch.zeros((n, *shape), dtype=getattr(torch, dtype))
            size, mm = None, None
            with contextlib.suppress(FileNotFoundError), open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size  # measured and mapped: one and the same file
                if size >= need:
                    mm = np.memmap(f, dtype=_DTYPES[dtype], mode="c", shape=(n, *shape))
            self._refresh()
            if self._reparses == reparses:  # no rollback since the log was read: the file is the one it commits
                break
        if mm is None:
            held = "is missing" if size is None else f"holds {size} bytes"
            raise StoreError(
                f"{file} {held} where the {n} records of array {name!r} that {self.path / 'steps.jsonl'} "
                f"commits need {need}: the file was cut or lost after it was written "
                "(an incomplete copy?). Copy the store again from where it was recorded, or record the run again."
            )
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
        if isinstance(step, (bool, np.bool_)) or (isinstance(step, torch.Tensor) and step.dtype == torch.bool):
            raise ConfigError(f"step must be an int, got the bool {step!r}; pass the optimizer step number.")
        try:
            step = operator.index(step)
        except TypeError:
            raise ConfigError(f"step must be an int, got {step!r}; pass the optimizer step number.") from None
        if step < 0:
            raise ConfigError(
                f"step must be >= 0, got {step}; pass the optimizer step number (0 before the first update)."
            )
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
            file = self.path / "arrays" / self._arrays[name]["file"]
            with open(file, "ab") as f:
                committed, size = self._committed_bytes(name), os.fstat(f.fileno()).st_size
                if size < committed:
                    raise StoreError(
                        f"{file} holds {size} bytes where the records of array {name!r} committed so far need "
                        f"{committed}: the file was cut or lost after it was written. Record into a new store "
                        "(or roll this one back to a step before the loss)."
                    )
                if size > committed:  # bytes of a failed earlier append: committed nowhere, mapped by no reader
                    f.truncate(committed)
                if arr.nbytes:  # a record of size 0 has no bytes to write
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
        self._last_line = raw
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
        again; this removes their first recording. Readers may have the dropped records
        memory-mapped, so an array file is never shortened in place: in order,

        1. each array file that loses committed records gets a copy of the records it keeps beside
           it (``<file>.rollback``, fsynced; the disk needs room for them);
        2. the commit log is cut after ``step``'s line (fsynced): the one commit point;
        3. each copy replaces its array file (``os.replace``; a reader's mapping keeps the old file).

        A crash before 2 leaves the old store (:meth:`resume` deletes the copies), a crash after it
        the rolled-back one (:meth:`resume` puts the copies in place).
        """
        self._check_writable()
        keep = sum(1 for s in self._steps if s <= step)
        if keep == len(self._steps):
            return
        array_steps = {name: [s for s in steps if s <= step] for name, steps in self._array_steps.items()}
        with open(self.path / "steps.jsonl", "rb") as f:
            lines = f.read(self._log_end).split(b"\n")
        end = sum(len(line) + 1 for line in lines[:keep])
        copies = []
        try:
            for name, info in self._arrays.items():
                file = self.path / "arrays" / info["file"]
                kept = len(array_steps.get(name, [])) * self._record_bytes(name)
                if kept < self._committed_bytes(name) and file.is_file() and file.stat().st_size > kept:
                    copies.append((_rollback_copy(file), file))
                    _copy_prefix(file, copies[-1][0], kept)
            if copies:
                fsync_dir(self.path / "arrays")
            self._log_file.truncate(end)  # the commit point
        except BaseException:  # nothing was cut: the store is as it was
            for copy, _ in copies:
                copy.unlink(missing_ok=True)
            raise
        self._log_end = end
        self._last_line = lines[keep - 1] + b"\n" if keep else b""
        self._steps, self._scalar_rows = self._steps[:keep], self._scalar_rows[:keep]
        self._array_steps = array_steps
        self._log_file.flush()
        _sync(self._log_file.fileno())
        for copy, file in copies:
            os.replace(copy, file)
        if copies:
            fsync_dir(self.path / "arrays")
        self._cut_uncommitted_arrays()  # bytes of a failed append, never committed

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
