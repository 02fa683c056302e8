"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed into place.

A reader never sees a half-written file, and a crash leaves either the old file or the new one.

Examples:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "summary.json"
    >>> write_json_atomic(path, {"verdict": None})
    >>> path.read_text()
    '{\\n  "verdict": null\\n}'
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from capwrap.errors import ConfigError

__all__ = [
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "read_json",
    "fsync_dir",
    "umask",
    "check_output_folder",
    "copy_missing",
]


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (its folder is created if missing).

    Raises:
        ConfigError: ``path`` is a folder (the rename would fail naming the temporary file).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder where a file is to be written; move it, or write elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600 files; give the usual permissions
            os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at ``path``, or ``None`` when it cannot be read or is not JSON (for checks
    that only ask whether a file is one capwrap wrote)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def check_output_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder outputs can go into: it may exist (as a folder) or not; a file there is
    refused before any work starts, with a :class:`~capwrap.errors.ConfigError`."""
    if not str(path).strip():  # Path("") is the current folder: an empty --out wrote outputs there, unsaid
        raise ConfigError("the output folder is empty (''); name a folder (it is created if missing), '.' for this one")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the output folder {path} is a file; choose a folder (it is created if missing)")
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if not path.exists() and above is not None and not above.is_dir():
        raise ConfigError(f"the output folder {path} cannot be created: {above} is a file; choose another folder")
    return path


def copy_missing(source: Any, target: str | os.PathLike) -> int:
    """Copy every file under ``source`` (a folder, or an ``importlib.resources`` traversable: shipped
    assets) that ``target`` lacks, keeping relative paths; each file is written atomically. Returns
    how many were copied. Used to seed a cache with the runs capwrap ships.

    Examples:
        >>> import tempfile
        >>> src, dst = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> _ = (src / "a").mkdir(), (src / "a" / "x.pt").write_bytes(b"1"), (dst / "y.pt").write_bytes(b"2")
        >>> copy_missing(src, dst), copy_missing(src, dst), sorted(p.name for p in dst.rglob("*.pt"))
        (1, 0, ['x.pt', 'y.pt'])
    """
    copied = 0

    def walk(folder: Any, into: Path) -> None:
        nonlocal copied
        for item in folder.iterdir():
            if item.is_dir():
                walk(item, into / item.name)
            elif not (into / item.name).exists():
                into.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(into / item.name, item.read_bytes())
                copied += 1

    if source.is_dir():
        walk(source, Path(target))
    return copied
