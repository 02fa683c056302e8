"""`Recorder`: per-step recording that attaches to any training loop.

Every ``every`` steps it runs the model on a fixed probe batch and stores the activations of the
chosen hooks, plus per-component weight-change norms (against the weights at the start) and
gradient norms; every step it stores the loss and any metrics. Everything goes to a
:class:`~capwrap.recording.RunStore`, which survives a crash with every completed step.

Use it around your own loop (call :meth:`Recorder.step` after ``optimizer.step()`` and before
``optimizer.zero_grad()``, so gradients are still there), or pass it to :func:`capwrap.train`.

Examples:
    >>> import tempfile, torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig, answer_loss
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=16, n_heads=2))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> path = tempfile.mkdtemp() + "/run"
    >>> with Recorder(model, path, hooks="blocks.*.hook_resid_post", probe=task.sample(32, seed=0), every=2) as rec:
    ...     for step in range(4):
    ...         batch = task.sample(16, seed=step)
    ...         loss = answer_loss(model(batch.tokens), batch)
    ...         loss.backward()
    ...         opt.step()
    ...         rec.step(loss=loss.item())
    ...         opt.zero_grad()
    >>> from capwrap.recording import RunStore
    >>> store = RunStore.open(path)
    >>> store.array("blocks.1.hook_resid_post").shape  # steps 0, 2, 4
    torch.Size([3, 32, 17, 16])
    >>> list(store.scalars().index)
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from capwrap.checks import check_token_ids
from capwrap.errors import ConfigError, StoreError, closest_matches
from capwrap.files import write_bytes_atomic
from capwrap.models import CapModel
from capwrap.models.components import COMPONENT_KINDS, tensor_norms
from capwrap.models.layouts import one_name_per_tensor
from capwrap.models.live import as_cap_model
from capwrap.recording import weight_sample
from capwrap.recording.store import RunStore
from capwrap.tasks.base import TaskBatch

__all__ = ["Recorder", "CAPTURE_ROWS", "DEFAULT_COMPONENT_KINDS", "load_probe", "start_weights"]

#: Component kinds whose weight-change and gradient norms are recorded by default.
DEFAULT_COMPONENT_KINDS = ("embed", "pos_embed", "unembed", "attn", "head", "mlp", "neuron")
#: Sequences per forward pass over the probe batch, by device type. On a CPU, passes of 64 run
#: faster than one large one (they stay in cache); elsewhere the whole probe goes in one pass (as
#: many sequences as :meth:`~capwrap.models.CapModel.rows_per_pass` allows), since a GPU running a
#: small model is bound by kernel launches, which a pass of four times the rows does not multiply.
CAPTURE_ROWS: dict[str, int | None] = {"cpu": 64}
#: The dtype norms are summed in on devices without float64 (float64 elsewhere).
_SUM_DTYPE = {"mps": torch.float32}
_PROBE_FILE = "probe.safetensors"
_START_FILE = "start_weights.safetensors"


class Recorder:
    """Records a training run of ``model`` into a :class:`RunStore` at ``path``.

    Args:
        model: the model being trained: a :class:`~capwrap.models.CapModel`, or a Hugging Face causal
            LM (or a peft LoRA, DoRA or IA3 model of one) trained by your own loop, which is wrapped with
            :func:`~capwrap.models.live.wrap_hf_model` (no weight copy; ``recorder.model`` is the wrapper).
        path: the store's folder (created; must not exist unless ``resume`` or ``overwrite``).
        hooks: hook names or glob patterns (default ``"blocks.*.hook_resid_post"``); ``()`` for none.
        probe: the fixed batch activations are recorded on (a :class:`TaskBatch`, whose labels are
            kept for probes, or integer token ids ``[batch, pos]``). Needed when ``hooks`` is not empty.
        every: record activations and component norms every this many steps (and at step 0, and
            at the last step of a run that ``train`` or the Trainer callback drives; default 10). Gradient norms are those of the gradients the optimizer applied (after
            clipping).
        component_kinds: component kinds whose weight-change and gradient norms are recorded
            (default :data:`DEFAULT_COMPONENT_KINDS`).
        dtype: ``"float32"`` (default) or ``"float16"`` (halves the disk use) for activations.
        resume: continue an existing store (the step count goes on from its last step).
            ``hooks``, ``probe``, ``every``, ``component_kinds`` and ``dtype`` then default to the
            store's; given, they must match it (a :class:`~capwrap.errors.StoreError` says which
            differs).
        overwrite: replace an existing store.
        meta: extra JSON-serializable information to keep in the store.
        first_step: the optimizer step the run is at when a new store starts (default 0): a run
            resumed from a checkpoint into a new store numbers its steps on from the run's count,
            and its weight changes are measured from the weights at that step (the store's
            ``meta["first_step"]`` says so).
        background: measure a due step in a background thread, on a copy of the weights made at
            that step, while training goes on (default ``False``): the probe's forward passes and
            the weight-change norms overlap the next steps instead of adding to them. It costs one
            more copy of the weights, on the model's device, and pays off when the device has room
            to spare (a GPU running a small model; a CPU with a core torch does not use, as with
            ``torch.set_num_threads(1)`` on two or more cores); where training already keeps every
            core busy, the two compete. The store is the same either way (equal activations and
            norms; gradient norms are taken in the training thread, while the gradients are there).
            Needs the model on one device.
    """

    def __init__(
        self,
        model: CapModel | torch.nn.Module,
        path: str | os.PathLike,
        hooks: str | Sequence[str] | None = None,
        probe: TaskBatch | Int[Tensor, "batch pos"] | None = None,
        every: int | None = None,
        component_kinds: Sequence[str] | None = None,
        dtype: str | None = None,
        resume: bool = False,
        overwrite: bool = False,
        meta: dict[str, Any] | None = None,
        background: bool = False,
        first_step: int = 0,
    ):
        if resume and overwrite:
            raise ConfigError("choose resume=True (continue the store) or overwrite=True (replace it), not both")
        if not isinstance(first_step, int) or isinstance(first_step, bool) or first_step < 0:
            raise ConfigError(f"first_step must be a step count (an integer >= 0), got {first_step!r}")
        if resume and first_step:
            raise ConfigError("a resumed store goes on from its own last step; first_step is for a new store")
        model = as_cap_model(model)  # a live Hugging Face model is wrapped, sharing its weights
        self.model = model
        self.path = Path(path)
        recorded = _recorded_settings(self.path) if resume else {}
        if resume and (detail := model.spec.mismatch(recorded["spec"])):  # before its hooks are looked up in this model
            raise StoreError(_another_shape(self.path, detail))
        given = {"probe": probe, "component_kinds": component_kinds, "dtype": dtype}
        hooks = recorded.get("hooks", "blocks.*.hook_resid_post") if hooks is None else hooks
        every = recorded.get("every", 10) if every is None else every
        component_kinds = (
            recorded.get("component_kinds", DEFAULT_COMPONENT_KINDS) if component_kinds is None else component_kinds
        )
        dtype = recorded.get("dtype", "float32") if dtype is None else dtype
        if isinstance(component_kinds, str):
            raise ConfigError(
                f"component_kinds must be a list of kinds, got the string {component_kinds!r}; "
                f"pass [{component_kinds!r}] for one kind (kinds: {list(COMPONENT_KINDS)})"
            )
        try:
            component_kinds = list(component_kinds)
        except TypeError:
            raise ConfigError(
                f"component_kinds must be a list of kinds such as ['head', 'mlp'], got {component_kinds!r}"
            ) from None
        if unknown := [k for k in component_kinds if not isinstance(k, str) or k not in COMPONENT_KINDS]:
            hints = sorted({h for k in unknown if isinstance(k, str) for h in closest_matches(k, COMPONENT_KINDS)})
            raise ConfigError(
                f"unknown component kind{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in component_kinds"
                + (f"; did you mean {hints}?" if hints else "")
                + f" Choose from {list(COMPONENT_KINDS)}."
            )
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ConfigError(f"every must be a positive number of steps, got {every!r}")
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        if not isinstance(background, bool):
            raise ConfigError(f"background must be True or False, got {background!r}")
        if isinstance(hooks, str) and not hooks.strip():
            raise ConfigError(
                "hooks='' names no hook; pass hook names or patterns such as 'blocks.*.hook_resid_post', "
                "or hooks=() to record only weights and scalars"
            )
        self.hooks = model.resolve_hooks(hooks) if hooks else []
        if probe is None and self.hooks and resume:
            probe = recorded.get("probe")
        self.probe = _as_probe(probe, model)
        # the ids the probe runs on, kept on the host: checked there, they never wait for a device
        self._probe_tokens = None if self.probe is None else self.probe.tokens.cpu()
        if self.hooks and self.probe is None:
            raise ConfigError(
                "recording activations needs a fixed probe batch: pass probe=task.sample(256, seed=0) "
                "(or hooks=() to record only weights and scalars)"
            )
        present = set(model.components.counts())
        self.component_kinds = [k for k in component_kinds if k in present]
        if resume:
            _check_same_settings(self.path, recorded, given, self.probe, self.component_kinds, dtype)
        self.every = every
        self.dtype = dtype
        self.resume = resume
        self.overwrite = overwrite
        self.user_meta = dict(meta or {})
        self.background = background
        self.first_step = first_step
        self.store: RunStore | None = None
        self._step = first_step
        self._start: dict[str, Tensor] = {}
        self._once: list[str] = []  # the weights whose change sums to weight_delta (a tied embedding once)
        self._sampled: weight_sample.Positions | None = None  # where the weights are sampled (a store before them: none)
        self._sample_index: dict = {}  # the sampled positions as indices, per weight and device
        self._shadow: _Shadow | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """Whether the store is open for recording."""
        return self.store is not None

    @property
    def current_step(self) -> int:
        """Optimizer steps seen so far (continuing a resumed store's count)."""
        return self._step

    def open(self) -> Recorder:
        """Create (or resume) the store and record step 0."""
        if self.store is not None:
            return self
        shadow = _Shadow(self.model) if self.background else None  # refused before anything is written
        if self.resume:
            self.store = RunStore.resume(self.path)
            self._writer = self._open_writer()
            self._check_resumable(self.store)
            self._start = self._load_start()
            self._once = one_name_per_tensor(self.model.weights())
            self._start_sq = _start_sq(self._start, self._once)
            self._sampled = weight_sample.positions_from_meta(self.store.meta)
            self._step = self.store.last_step or 0
            self._shadow = shadow
            return self
        weights = self.model.weights()
        self._once = one_name_per_tensor(weights)
        self._sampled = weight_sample.sample_positions(weights, self._once)
        self.store = RunStore.create(self.path, meta=self._meta(), arrays=self._array_specs(), overwrite=self.overwrite)
        self._writer = self._open_writer()
        self._start = {k: v.detach().clone() for k, v in weights.items()}
        self._start_sq = _start_sq(self._start, self._once)
        self._save_tensors(_START_FILE, {k: v.contiguous() for k, v in self.model.checkpoint_state().items()})
        if self.probe is not None:
            self._save_tensors(_PROBE_FILE, {
                "tokens": self.probe.tokens, "answer_pos": self.probe.answer_pos, "answers": self.probe.answers,
                **{f"label.{k}": v for k, v in self.probe.labels.items()},
            })  # fmt: skip
        self._step = self.first_step
        self._shadow = shadow
        self._record(scalars={}, with_grads=False)  # gradients left on the model now are no step of this run's
        return self

    def _open_writer(self) -> _OrderedWriter:
        # in the background, a due step's measuring holds up the writes of the steps after it
        return _OrderedWriter(self.store, max_pending=4 + (self.every if self.background else 0))

    def flush(self) -> None:
        """Wait until every step submitted so far is committed to the store.

        Raises:
            StoreError: a background write failed.
        """
        if self.store is not None:
            self._writer.flush()

    def rollback(self, step: int) -> None:
        """Go back to ``step``: drop the store's later steps and count on from ``step`` (a resumed
        training run does this to continue from its last checkpoint)."""
        if self.store is None:
            raise StoreError("the recorder is not open; use it as a context manager or call .open() first")
        self.flush()
        self.store.rollback(step)
        self._step = step

    def finish(self) -> None:
        """Make the last recorded step a full record, if it is not: a run that ends before its planned
        last step (a Trainer's early stopping) is recorded with the model it ends with. Call it while
        the model still has the weights that step left. The step keeps its scalars and arrays; its
        activations and weight changes are measured now; its gradient norms per component are not
        (the gradients are gone), and the total ``grad_norm`` stays."""
        if self.store is None:
            raise StoreError("the recorder is not open; use it as a context manager or call .open() first")
        self.flush()
        store, last = self.store, self.store.last_step
        if last is None or len(store) < 2:
            return  # nothing recorded after step 0
        row = store.scalars().iloc[-1]  # (one table of every step's scalars, read once)
        if not math.isnan(row["weight_delta"]):
            return  # the last step is already full
        scalars = {k: v for k, v in row.items() if not math.isnan(v)}
        arrays = {name: store.array(name)[-1].clone() for name in store.array_names if store.array_steps(name)[-1:] == [last]}
        store.rollback(store.steps[-2])
        self._step = last - 1  # step() counts on to the step it records again
        self.step(final=True, arrays=arrays, **scalars)
        self.flush()

    def close(self) -> None:
        """Wait for pending writes, then close the store.

        Raises:
            StoreError: a background write failed (the store keeps every step committed before it).
        """
        if self.store is not None:
            try:
                self._writer.close()
            finally:
                self.store.close()
                self.store = None
                self._shadow = None

    def __enter__(self) -> Recorder:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- recording -------------------------------------------------------------------------------
    def step(
        self, loss: float | None = None, *, arrays: Mapping[str, Tensor] | None = None, final: bool = False,
        **metrics: float,
    ) -> None:  # fmt: skip
        """Mark one optimizer step done; record scalars now and arrays when due.

        ``final``: the run's last step, recorded in full (activations and norms) whether due or not,
        so that a recording ends with the model the run ends with (``train`` and the Trainer
        callback pass it).

        Call after ``optimizer.step()`` and before ``optimizer.zero_grad()``. Pass ``grad_norm``
        if your loop already computed it; otherwise the recorder computes it from the gradients.
        ``loss`` and metrics may be numbers or one-element tensors: a tensor is read back by the
        writer thread, so on a GPU the training loop does not wait for the device (nor does
        anything else this method does, recorded step or not).
        ``arrays`` (e.g. a training method's per-step arrays) are stored with this step, due or not.
        Writing to disk happens in a background thread, in order; :meth:`close` waits for it.
        """
        if self.store is None:
            raise StoreError("the recorder is not open; use it as a context manager or call .open() first")
        self._step += 1
        scalars = {k: _scalar(k, v) for k, v in metrics.items()}
        if loss is not None:
            scalars["loss"] = _scalar("loss", loss)
        extra = {name: value.detach().float() for name, value in (arrays or {}).items()}
        if self._step % self.every == 0 or final:
            self._record(scalars, extra)
        else:
            if "grad_norm" not in scalars and (grads := self._grad_total()) is not None:
                scalars["grad_norm"] = grads
            self._submit(scalars, extra)

    def _submit(
        self, scalars: dict[str, float | Tensor], arrays: dict[str, Tensor], measure: _Measurement | None = None
    ) -> None:
        """Hand the step to the writer thread. Every tensor goes to the host first, asynchronously
        from a GPU (pinned memory, then an event the writer waits on), so the writer reads host
        memory only: no wait for the device, on whatever stream the training runs. ``measure``:
        what the writer thread computes for the step before writing it (a background record)."""
        host, ready = _host_copies(scalars, arrays)
        try:
            self._writer.submit(self._step, *host, ready, measure)
        except BaseException:
            if measure is not None:  # never queued: free the copy for the next due step
                measure.release()
            raise

    def _record(
        self, scalars: dict[str, float | Tensor], extra: dict[str, Tensor] | None = None, with_grads: bool = True
    ) -> None:
        """Record the due step. Nothing here waits for the device: activations and norms are
        computed there and copied to the host asynchronously (:meth:`_submit`). In the background
        (:attr:`background`), the activations and weight-change norms are measured by the writer
        thread on a copy of the weights; only the gradient norms are taken here. ``with_grads``:
        record the gradients the model holds (not at step 0: any there are an earlier run's)."""
        assert self.store is not None
        arrays: dict[str, Tensor] = dict(extra or {})
        if with_grads and self._has_grads():  # now or never: the next zero_grad clears them
            grads = self.model.gradients()
            for kind, sq in self.model.components.sq_norms_by_kind(grads, self.component_kinds).items():
                arrays[f"grad_norm.{kind}"] = sq.sqrt().float()
            if "grad_norm" not in scalars and (total := self._grad_total()) is not None:
                scalars["grad_norm"] = total  # over the parameters, as on other steps: a tied embedding once
        if self._shadow is None:
            measured_scalars, measured_arrays = self._measure(self.model)
            self._submit(scalars | measured_scalars, arrays | measured_arrays)
        else:
            self._submit(scalars, arrays, self._shadow.take(self.model, self._measure))

    def _measure(self, model: CapModel) -> tuple[dict[str, Tensor | float], dict[str, Tensor]]:
        """The activations on the probe and the weight-change norms of ``model`` (the trained model,
        or its copy in the background), left on its device."""
        arrays: dict[str, Tensor] = {}
        if self.hooks:
            was_training = model.module.training
            model.eval()
            try:
                rows = CAPTURE_ROWS.get(model.device.type)
                acts = model.capture(self._probe_tokens, self.hooks, batch_size=rows)
            finally:
                model.train(was_training)
            arrays |= {name: act.to(getattr(torch, self.dtype)) for name, act in acts.items()}
        weights = model.weights()
        names = list(weights)
        with torch.no_grad():
            moved = torch._foreach_sub([weights[k] for k in names], [self._start[k] for k in names])
        delta = dict(zip(names, moved, strict=True))
        for kind, sq in model.components.sq_norms_by_kind(delta, self.component_kinds).items():
            arrays[f"weight_delta.{kind}"] = sq.sqrt().float()
        if self._sampled is not None:
            arrays[weight_sample.ARRAY] = weight_sample.gather(weights.__getitem__, self._sampled, self._sample_index)
        total_sq = _total_sq(delta[k] for k in self._once)  # over the parameters: a tied embedding once
        scalars: dict[str, Tensor | float] = {
            "weight_delta": total_sq.sqrt(),
            "weight_delta_rel": (total_sq / self._start_sq).sqrt() if self._start_sq else 0.0,
        }
        return scalars, arrays

    def _has_grads(self) -> bool:
        return any(p.grad is not None for p in self.model.parameters())

    def _grad_total(self) -> Tensor | None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return _total_sq(grads).sqrt() if grads else None

    # ---- metadata --------------------------------------------------------------------------------
    def _array_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        if self.hooks:
            shapes = {
                n: tuple(a.shape)
                for n, a in self.model.capture(self._probe_tokens[:1], self.hooks).items()
            }
            n = len(self.probe)
            specs |= {name: ((n, *shape[1:]), self.dtype) for name, shape in shapes.items()}
        for kind in self.component_kinds:
            size = len(self.model.components.select(kind))
            specs[f"weight_delta.{kind}"] = ((size,), "float32")
            specs[f"grad_norm.{kind}"] = ((size,), "float32")
        if self._sampled is not None:
            specs[weight_sample.ARRAY] = ((sum(len(p) for p in self._sampled.values()),), "float32")
        return specs

    def _meta(self) -> dict[str, Any]:
        return {
            "kind": "capwrap.recording",
            "spec": self.model.spec.to_dict(),
            "backend": self.model.backend,
            "hooks": self.hooks,
            "every": self.every,
            "dtype": self.dtype,
            "probe_size": None if self.probe is None else len(self.probe),
            "first_step": self.first_step,
            "components": {k: [c.name for c in self.model.components.select(k)] for k in self.component_kinds},
            weight_sample.ARRAY: weight_sample.positions_to_meta(self._sampled or {}),
            **self.user_meta,
        }

    def _check_resumable(self, store: RunStore) -> None:
        meta = store.meta
        if detail := self.model.spec.mismatch(meta.get("spec")):
            raise StoreError(_another_shape(self.path, detail))
        if meta.get("hooks") != self.hooks or meta.get("every") != self.every:
            raise StoreError(
                f"the store at {self.path} records hooks {meta.get('hooks')} every {meta.get('every')} steps; "
                "resume with the same hooks and every, or record to a new folder"
            )

    def _save_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save

        write_bytes_atomic(self.path / name, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def _load_start(self) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        from capwrap.models.layouts import canonical_views

        file = self.path / _START_FILE
        if not file.exists():
            raise StoreError(f"{file} is missing, so weight changes cannot be measured; record to a new folder")
        views = canonical_views(self.model.spec, load_file(str(file)))
        current = self.model.weights()  # the start weights go where the model's are (a GPU, several devices)
        return {k: v.to(current[k].device, copy=True) for k, v in views.items()}


def _start_sq(start: dict[str, Tensor], names: Iterable[str]) -> float:
    """The squared norm of the starting weights ``names``, the same to the last bit whether they are
    the model's own (a new run) or read back from the store (a resumed one, whose tensors may be laid
    out otherwise): contiguous tensors, in name order."""
    return float(_total_sq(start[name].contiguous() for name in sorted(names)))


def _total_sq(tensors: Iterable[Tensor]) -> Float[Tensor, ""]:
    """The squared L2 norm of all ``tensors`` together, as a 0-dim tensor on the first one's device,
    read back by nothing: the tensors' norms (:func:`~capwrap.models.components.tensor_norms`), squared
    and summed in float64 where the device has it (:data:`_SUM_DTYPE`)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    norms = tensor_norms(tensors)
    return norms.to(_SUM_DTYPE.get(norms.device.type, torch.float64)).square().sum()


def _scalar(name: str, value: Any) -> float | Tensor:
    """A scalar to store: a number, or a one-element tensor kept as it is now (a copy, on its device)
    for the writer thread to read back."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ConfigError(
                f"{name!r} is a {value.dtype} tensor of shape {tuple(value.shape)}; pass one real number "
                "(or a one-element real tensor)"
            )
        return value.detach().reshape(()).clone()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name!r} is {value!r}, not a number; pass a float or a one-element tensor") from None


def _host_copies(
    scalars: dict[str, float | Tensor], arrays: dict[str, Tensor]
) -> tuple[tuple[dict[str, float | Tensor], dict[str, Tensor]], list[Any]]:
    """``scalars`` and ``arrays`` with every tensor on its way to the host (:func:`_copy_to_host`),
    and the events to wait on before reading them."""
    tensors = {("s", k): v for k, v in scalars.items() if isinstance(v, Tensor)}
    tensors |= {("a", k): v for k, v in arrays.items()}
    host, ready = _copy_to_host(tensors)
    return ({k: host.get(("s", k), v) for k, v in scalars.items()}, {k: host[("a", k)] for k in arrays}), ready


def _copy_to_host(tensors: dict[Any, Tensor]) -> tuple[dict[Any, Tensor], list[Any]]:
    """Start copying ``tensors`` to host memory without waiting for the device. From a CUDA device
    the copies go into pinned memory asynchronously, and one event per device marks when they are
    done (the writer thread waits on them before reading); tensors on the host stay as they are."""
    devices = {t.device for t in tensors.values() if t.device.type == "cuda"}
    if not devices:
        return {k: t if t.device.type == "cpu" else t.cpu() for k, t in tensors.items()}, []
    host = {k: t.to("cpu", non_blocking=True) for k, t in tensors.items()}
    return host, _device_events(devices)


def _as_probe(probe: Any, model: CapModel) -> TaskBatch | None:
    """The probe batch, checked: a :class:`TaskBatch`, or token ids wrapped in one."""
    if probe is None:
        return None
    if not isinstance(probe, TaskBatch | Tensor):
        raise ConfigError(
            f"probe must be a TaskBatch (task.sample(n, seed)) or a tensor of token ids [batch, pos], "
            f"got {type(probe).__name__}"
        )
    tokens = probe.tokens if isinstance(probe, TaskBatch) else probe
    check_token_ids(tokens, model.spec, "the probe batch")
    if len(tokens) == 0:
        raise ConfigError("the probe batch is empty; give it at least one sequence")
    if isinstance(probe, TaskBatch):
        return probe
    zeros = torch.zeros(len(probe), dtype=torch.long)
    return TaskBatch(probe, zeros, zeros.clone())


def _another_shape(path: Path, detail: str) -> str:
    return (f"the store at {path} was recorded from a model of another shape: it differs in {detail} (this model's "
            "value first); resume it with the same model, or record to a new folder")  # fmt: skip


def _check_same_settings(
    path: Path, recorded: dict[str, Any], given: dict[str, Any], probe: TaskBatch | None, kinds: list[str], dtype: str
) -> None:
    """Raise if a setting given to a resumed recorder differs from the one its store was recorded with."""
    differs = []
    if given["probe"] is not None and "probe" in recorded and probe is not None:
        stored = recorded["probe"]
        same = probe.tokens.shape == stored.tokens.shape and torch.equal(probe.tokens.cpu(), stored.tokens)
        if same and isinstance(given["probe"], TaskBatch):  # its answers and labels are kept for probes too
            same = (torch.equal(probe.answer_pos.cpu(), stored.answer_pos)
                    and torch.equal(probe.answers.cpu(), stored.answers) and probe.labels.keys() == stored.labels.keys()
                    and all(torch.equal(probe.labels[k].cpu(), stored.labels[k]) for k in stored.labels))  # fmt: skip
        if not same:
            differs.append("the probe batch (the store's is in probe.safetensors; leave probe out to use it)")
    if given["dtype"] is not None and dtype != recorded["dtype"]:
        differs.append(f"dtype ({dtype!r} given, the store's {recorded['dtype']!r})")
    if given["component_kinds"] is not None and set(kinds) != set(recorded["component_kinds"]):
        differs.append(f"component_kinds ({kinds} given, the store's {recorded['component_kinds']})")
    if differs:
        raise StoreError(
            f"the store at {path} was recorded with other settings: {'; '.join(differs)}. Resume with the store's "
            "settings (leave them out: a resumed recorder takes them from the store), or record to a new folder"
        )


def _recorded_settings(path: Path) -> dict[str, Any]:
    """What a store written by a :class:`Recorder` was recording: the defaults of a resumed one."""
    store = RunStore.open(path)
    meta = store.meta
    if meta.get("kind") != "capwrap.recording":
        raise StoreError(
            f"{path} is a run store but was not written by a Recorder, so a Recorder cannot resume it; "
            "record to a new folder"
        )
    hooks = list(meta.get("hooks", []))
    dtype = meta.get("dtype") or (store.array_spec(hooks[0])[1] if hooks else "float32")
    settings = {
        "hooks": hooks, "every": meta.get("every"), "component_kinds": list(meta.get("components", {})), "dtype": dtype,
        "spec": meta.get("spec"),
    }  # fmt: skip
    if hooks:
        settings["probe"] = load_probe(store)
    return settings


_Measured = tuple[dict[str, float | Tensor], dict[str, Tensor]]


class _Shadow:
    """The copy of the trained model a background record measures: made once, its weights
    refreshed at every due step, used by one record at a time (the next due step waits for the
    last one's measuring to end before it overwrites the weights)."""

    def __init__(self, model: CapModel):
        devices = {w.device for w in model.weights().values()}
        if len(devices) > 1:
            raise ConfigError(
                f"background=True measures a copy of the weights, on the model's device, but this model is spread "
                f"over {len(devices)} devices; record it with background=False"
            )
        self.model = model.clone().eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self._free = threading.Event()
        self._free.set()
        self._stream: Any = None  # the side stream a CUDA copy is measured on

    def take(self, model: CapModel, measure: Callable[[CapModel], _Measured]) -> _Measurement:
        """Wait until the copy is free, give it ``model``'s weights as they are now, and return the
        measurement for the writer thread to run."""
        self._free.wait()
        self.model.copy_weights_from(model)
        self._free.clear()
        return _Measurement(self, measure, _device_events([self.model.device]))

    def release(self) -> None:
        self._free.set()

    @contextmanager
    def side_stream(self, after: Sequence[Any]) -> Iterator[None]:
        """On a GPU, run the measuring on a stream of its own (after the copy's ``after`` events),
        so it overlaps the training's kernels instead of queueing behind them."""
        device = self.model.device
        if device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        for event in after:
            self._stream.wait_event(event)
        with torch.cuda.stream(self._stream):
            yield


class _Measurement:
    """One due step's measuring of the copy, run by the writer thread (:meth:`__call__`) and then
    released, whether it ran or not (:meth:`release`)."""

    def __init__(self, shadow: _Shadow, measure: Callable[[CapModel], _Measured], copied: Sequence[Any]):
        self._shadow, self._measure, self._copied = shadow, measure, copied

    def __call__(self) -> _Measured:
        with self._shadow.side_stream(self._copied):
            measured, ready = _host_copies(*self._measure(self._shadow.model))
        for event in ready:
            event.synchronize()
        return measured

    def release(self) -> None:
        self._shadow.release()


def _device_events(devices: Iterable[torch.device]) -> list[Any]:
    """An event on each CUDA device's current stream: marks the work queued there so far."""
    events = []
    for device in {d for d in devices if d.type == "cuda"}:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return events


class _OrderedWriter:
    """Appends to a :class:`RunStore` from one background thread, in submission order, so disk
    writes and their fsyncs (and a background record's measuring) overlap the next training steps.
    At most ``max_pending`` appends wait; an error is raised on the next :meth:`submit` or at
    :meth:`close`."""

    def __init__(self, store: RunStore, max_pending: int = 4):
        self._store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="capwrap-recorder-writer", daemon=True)
        self._thread.start()

    def submit(
        self,
        step: int,
        scalars: dict[str, float | Tensor],
        arrays: dict[str, Tensor] | None = None,
        ready: Sequence[Any] = (),
        measure: _Measurement | None = None,
    ) -> None:
        """Queue ``step``; ``ready``: events to wait on (``.synchronize()``) before reading its tensors;
        ``measure``: run first, its scalars and arrays written with the step's."""
        self._raise_if_failed()
        self._queue.put((step, scalars, arrays, ready, measure))

    def flush(self) -> None:
        """Wait until every submitted append is done."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            step, scalars, arrays, ready, measure = item
            try:
                if self._error is None:  # after a failure, drain without writing: nothing out of order
                    for event in ready:
                        event.synchronize()
                    if measure is not None:
                        more_scalars, more_arrays = measure()
                        scalars, arrays = scalars | more_scalars, (arrays or {}) | more_arrays
                    self._store.append(step, scalars=scalars, arrays=arrays)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                self._error = exc
            finally:
                if measure is not None:
                    measure.release()
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing the run store failed: {self._error}") from self._error


def load_probe(store: RunStore) -> TaskBatch:
    """The probe batch a :class:`Recorder` saved with ``store`` (tokens, answers and labels)."""
    from safetensors.torch import load_file

    file = Path(store.path) / _PROBE_FILE
    if not file.exists():
        raise StoreError(f"{store.path} has no probe batch (it was recorded without hooks)")
    t = load_file(str(file))
    labels = {k.removeprefix("label."): v for k, v in t.items() if k.startswith("label.")}
    return TaskBatch(t["tokens"], t["answer_pos"], t["answers"], labels)


def start_weights(store: RunStore) -> dict[str, Tensor]:
    """The model's weights (Hugging Face layout) when recording started."""
    from safetensors.torch import load_file

    return load_file(str(Path(store.path) / _START_FILE))
