"""Residency: several models, at most one of them in memory; the others wait in files.

A diagnosis compares two models (and trains copies of them, and a control). Held together they
need several models of memory; :class:`Residency` lets them take turns. Each member model's
weight storage is written once to a raw file in a private folder; *releasing* a member frees that
storage (the tensors, their views and every parameter object stay — only their memory goes, the
way FSDP frees sharded parameters), *activating* one reads it back into the same storage. Nothing
else of the model changes: hooks, modules, views and optimizer references stay valid, and a restored
model is bit-for-bit the model it was.

Running a released model, or asking for its :meth:`CapModel.weights`, activates it first
(releasing the model resident before). A tensor taken from a model *before* it was released must
not be used after: like a parameter FSDP has freed, it points at memory that is gone (reading it
crashes the process). So code that needs two models' weights at once reads the released one's a
weight at a time (:meth:`Residency.read_weight`), and code that runs two models finishes with one
before it starts the other. :meth:`Residency.scratch`
lends a member for changes that are then undone (a copy's work done in place: pruning, grafting,
reverse fine-tuning).

Changes made to a resident member outside :meth:`scratch` are kept: a member whose tensors were
modified since they were last written (their version counters moved) is written again when
released.

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> spec = ModelSpec(d_vocab=20, n_ctx=16, n_layers=2, d_model=16, n_heads=2)
    >>> base, tuned = build_model(spec, seed=0), build_model(spec, seed=1)
    >>> tokens = torch.randint(0, 20, (3, 8))
    >>> expected = base(tokens)
    >>> with Residency() as residency:
    ...     _ = residency.add(base)
    ...     _ = residency.add(tuned)         # base is written out and freed
    ...     residency.is_resident(base), residency.is_resident(tuned)
    ...     torch.equal(base(tokens), expected)  # running base brings it back (and frees tuned)
    ...     residency.is_resident(tuned)
    (False, True)
    True
    False
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from capwrap.errors import ConfigError
from capwrap.models.allocator import LARGE_MODEL_BYTES, return_freed_memory
from capwrap.models.model import CapModel
from capwrap.provenance import forget_weights_digest

__all__ = ["Residency"]

#: Bytes copied at a time between a file and a storage that is not in CPU memory.
_CHUNK = 64 << 20


@dataclass
class _View:
    """Where a canonical weight lies in a member's storage list (to read it from the file)."""

    storage: int
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Member:
    """One model of a residency: its storages, their file, and whether they are in memory."""

    model: CapModel
    path: Path
    storages: list[torch.UntypedStorage] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # bytes per storage
    starts: list[int] = field(default_factory=list)  # byte offset of each storage in the file
    views: dict[str, _View] = field(default_factory=dict)
    written: bool = False
    resident: bool = True
    versions: tuple[int, ...] = ()
    hook: torch.utils.hooks.RemovableHandle | None = None

    def __post_init__(self) -> None:
        self._collect()
        self.versions = self._versions()

    def _collect(self) -> None:
        """Every storage the canonical weights live in (a view covers one storage; several views
        share one): exactly what the model's weights are, whatever the backend's layout."""
        _own_memory(self.model)
        self.storages, self.sizes, self.views = [], [], {}
        index: dict[int, int] = {}
        for name, view in self.model.weights().items():
            storage = view.untyped_storage()
            key = storage.data_ptr()
            if key not in index:
                if not storage.resizable():
                    raise ConfigError(
                        f"{name}'s memory belongs to something else than the model, so a Residency cannot free it"
                    )
                index[key] = len(self.storages)
                self.storages.append(storage)
                self.sizes.append(storage.nbytes())
            self.views[name] = _View(index[key], view.storage_offset(), tuple(view.shape), tuple(view.stride()), view.dtype)
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        self.starts = starts

    def _tensors(self) -> list[Tensor]:
        """Everything a change of the weights goes through: the storage tensors and every parameter
        object of the module (some backends train separate parameters that view the storage; the
        ``meta`` placeholders of weights accelerate offloaded hold nothing)."""
        return [*self.model._storage.values(), *(p for p in self.model.module.parameters() if not p.is_meta)]

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self._tensors())

    def modified(self) -> bool:
        """Whether the weights changed since they were last written or read."""
        return self._versions() != self.versions

    def write(self) -> None:
        """Write every storage's bytes to the member's file (temporary file, then rename)."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for storage in self.storages:
                for buffer, device_part in _cpu_bytes(storage):
                    if device_part is not None:
                        torch.frombuffer(buffer, dtype=torch.uint8).copy_(device_part)
                    f.write(buffer)
        os.replace(tmp, self.path)
        self.written, self.versions = True, self._versions()

    def release(self) -> None:
        if not self.resident:
            return
        if not self.written or self.modified():
            self.write()
        self.model.module.zero_grad(set_to_none=True)
        if not all(storage.resizable() for storage in self.storages):
            self._collect()  # something shared a weight's memory (tensor.numpy()): the model gets its own again
        for storage in self.storages:
            storage.resize_(0)
        self.resident = False

    def restore(self) -> None:
        """Read the weights back from the file (into freed storage, or over changed weights)."""
        with open(self.path, "rb") as f:
            for storage, size in zip(self.storages, self.sizes, strict=True):
                if storage.nbytes() != size:
                    storage.resize_(size)
                for buffer, device_part in _cpu_bytes(storage):
                    f.readinto(buffer)
                    if device_part is not None:
                        device_part.copy_(torch.frombuffer(buffer, dtype=torch.uint8))
        self.resident, self.versions = True, self._versions()
        forget_weights_digest(self.model)  # (read into their memory: no version counter saw it)

    def read_weight(self, name: str) -> Tensor:
        """One canonical weight, read from the file (a new tensor on the CPU)."""
        view = self.views[name]
        item = view.dtype.itemsize
        extent = 1 + sum((s - 1) * st for s, st in zip(view.shape, view.stride, strict=True)) if all(view.shape) else 0
        with open(self.path, "rb") as f:
            f.seek(self.starts[view.storage] + view.offset * item)
            data = bytearray(f.read(extent * item))
        return torch.frombuffer(data, dtype=view.dtype).as_strided(view.shape, view.stride) if extent else torch.empty(view.shape, dtype=view.dtype)


@torch.no_grad()
def _own_memory(model: CapModel) -> None:
    """Move weights whose memory the model does not own (the memory-mapped file a checkpoint was
    read from) into memory of its own, one storage at a time, so that it can be freed and refilled.
    Every parameter, buffer and storage tensor of the model on such a storage is pointed at the copy."""
    tensors = [*model.module.parameters(), *model.module.buffers(), *model._storage.values()]
    moved: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        old = t.untyped_storage()
        if old.resizable() or old.nbytes() == 0:
            continue
        key = old.data_ptr()
        if key not in moved:
            new = torch.UntypedStorage(old.nbytes(), device=old.device)
            new.copy_(old)
            moved[key] = new
        t.set_(moved[key], t.storage_offset(), t.shape, t.stride())


def _cpu_bytes(storage: torch.UntypedStorage) -> Iterator[tuple[memoryview, Tensor | None]]:
    """The storage's bytes as writable buffers, in order: for a CPU storage, one buffer over its
    own memory (through ctypes: a numpy view would make the storage non-resizable for good); for
    another device, CPU buffers of up to ``_CHUNK`` bytes, each with the device tensor it mirrors."""
    n = storage.nbytes()
    if storage.device.type == "cpu":
        if n:
            yield memoryview((ctypes.c_char * n).from_address(storage.data_ptr())).cast("B"), None
        return
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    for start in range(0, n, _CHUNK):
        part = whole[start : start + _CHUNK]
        buffer = torch.empty(part.numel(), dtype=torch.uint8)
        yield memoryview((ctypes.c_char * buffer.numel()).from_address(buffer.data_ptr())).cast("B"), part


class Residency:
    """Models that take turns in memory: at most one member is resident at a time.

    Args:
        folder: where the members' weight files go (default: a new temporary folder, removed by
            :meth:`close`). Each member needs its weights' size on disk.

    Use it as a context manager, or call :meth:`close` (by default it brings every member back, so
    the models are as they were given).
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="capwrap-residency-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._members: dict[int, _Member] = {}
        self._active: CapModel | None = None
        self._lent: set[int] = set()

    # ---- membership ----------------------------------------------------------------------------
    def add(self, model: CapModel) -> CapModel:
        """Make ``model`` a member and the resident one (the member resident before is released).
        Adding a member again only activates it. Returns ``model``."""
        other = getattr(model, "_residency", None)
        if other is not None and other is not self:
            raise ConfigError("this model already takes turns in another Residency; close that one first")
        if id(model) not in self._members:
            if model.spec.n_params * model.dtype.itemsize >= LARGE_MODEL_BYTES:
                return_freed_memory()  # released weights and each step's transients go back to the system
            if self._active is not None:
                self._member(self._active).release()
                self._active = None
            number = len(self._members)
            member = _Member(model, self.folder / f"model-{number}.bin")
            # Anything that runs the module (the model's forward, hooks, training) makes it resident first.
            member.hook = model.module.register_forward_pre_hook(lambda module, args: model._use())
            self._members[id(model)] = member
            model._residency = self
            self._active = model
        return self.activate(model)

    def remove(self, model: CapModel, restore: bool = True) -> None:
        """End ``model``'s membership and delete its file. With ``restore`` a released model is
        brought back into memory (beside the resident member, if any); without, a released model
        stays empty (for a model that is discarded: a control)."""
        member = self._member(model)
        if restore and not member.resident:
            member.restore()
        member.hook.remove()
        member.path.unlink(missing_ok=True)
        del self._members[id(model)]
        model._residency = None
        if self._active is model:
            self._active = None

    def __contains__(self, model: object) -> bool:
        return id(model) in self._members

    def _member(self, model: CapModel) -> _Member:
        try:
            return self._members[id(model)]
        except KeyError:
            raise ConfigError("this model is not a member of the Residency; add it first") from None

    # ---- turns ---------------------------------------------------------------------------------
    def is_resident(self, model: CapModel) -> bool:
        """Whether ``model``'s weights are in memory."""
        return self._member(model).resident

    def activate(self, model: CapModel) -> CapModel:
        """Bring ``model``'s weights into memory, releasing the member resident before."""
        member = self._member(model)
        if member.resident:
            self._active = model
            return model
        if self._active is not None:
            if id(self._active) in self._lent:
                raise ConfigError(
                    "a model lent by Residency.scratch is still in use while another one is needed; "
                    "finish the scratch work first (a scratch copy and another member cannot be resident together)"
                )
            self._member(self._active).release()
        member.restore()
        self._active = model
        return model

    def release_all(self) -> None:
        """Release every member (before building a model of another origin, e.g. a control)."""
        for member in self._members.values():
            member.release()
        self._active = None

    @contextmanager
    def scratch(self, model: CapModel) -> Iterator[CapModel]:
        """Lend ``model`` itself, resident, for changes that are undone afterwards (its weights
        are read back from its file on exit): a copy's work without the copy's memory."""
        member = self._member(model)
        self.activate(model)
        if member.modified() or not member.written:
            member.write()
        self._lent.add(id(model))
        try:
            yield model
        finally:
            self._lent.discard(id(model))
            model.module.zero_grad(set_to_none=True)
            member.restore()
            self._active = model

    def revert(self, model: CapModel) -> None:
        """Undo the changes made so far to ``model``, lent by :meth:`scratch` (read it back)."""
        if id(model) not in self._lent:
            raise ConfigError("only a model lent by Residency.scratch can be reverted")
        self._member(model).restore()

    def read_weight(self, model: CapModel, name: str) -> Tensor:
        """One canonical weight of ``model`` without making it resident: the weight itself when it
        is in memory, else a copy read from its file."""
        member = self._member(model)
        if member.resident:
            return model.weights()[name]
        if member.modified():  # cannot happen for a released member; a guard against misuse
            raise ConfigError("the model changed while released")
        return member.read_weight(name)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self, restore: bool = True) -> None:
        """End the residency and delete the weight files. With ``restore`` every released member
        is brought back into memory (all of them at once: their combined size), so the models are
        as they were given; without, released members stay empty (for models that are discarded)."""
        for member in list(self._members.values()):
            self.remove(member.model, restore)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Residency:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        states = ", ".join(f"{m.path.stem}: {'resident' if m.resident else 'released'}" for m in self._members.values())
        return f"Residency({self.folder}; {states})"
