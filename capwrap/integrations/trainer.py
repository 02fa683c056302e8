"""`RecorderCallback`: record a Hugging Face ``Trainer`` run into a :class:`~capwrap.recording.RunStore`.

Add it to any ``transformers.Trainer`` (TRL's ``SFTTrainer`` and other trainers built on it
included) that trains a causal LM of an architecture capwrap supports, full fine-tuning or with a
peft LoRA, DoRA or IA3 adapter. When training starts it wraps the live model with
:func:`~capwrap.models.live.wrap_hf_model` (no weight copy; an adapted model is seen merged) and
opens a :class:`~capwrap.recording.Recorder`; after every optimizer step — with the weights just
updated and the gradients still there — it records the step: the training loss (the mean over the
step's micro-batches, from the model's own output; a Trainer that computes the loss itself, with
``label_smoothing_factor`` or ``compute_loss_func``, passes the model no labels, and the callback
warns that it records none), the learning rate the step used, the gradient
norm (of the parameters the Trainer trains — a LoRA run's adapter factors — before clipping, as the
Trainer logs it), and every ``every`` steps the hooks' activations on the probe batch and the per-component
weight-change and gradient norms. The store has the layout :func:`capwrap.train` writes, so every
analyzer reads it. Evaluation metrics stay in the Trainer's own log (``trainer.state.log_history``).

Examples:
    >>> import tempfile, torch, transformers
    >>> from capwrap.recording import RunStore
    >>> config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    >>> model = transformers.GPT2LMHeadModel(config)
    >>> tokens = torch.randint(0, 40, (16, 12), generator=torch.Generator().manual_seed(0))
    >>> data = [{"input_ids": t, "labels": t} for t in tokens]
    >>> out = tempfile.mkdtemp()
    >>> callback = RecorderCallback(out + "/run", probe=tokens[:4], hooks="blocks.*.hook_resid_post", every=2)
    >>> args = transformers.TrainingArguments(out + "/trainer", max_steps=4, per_device_train_batch_size=4,
    ...     report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    >>> _ = transformers.Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # prints its metrics
    {...}
    >>> store = RunStore.open(out + "/run")
    >>> store.array_steps("blocks.1.hook_resid_post"), sorted(store.scalars().columns)
    ([0, 2, 4], ['grad_norm', 'loss', 'lr', 'weight_delta', 'weight_delta_rel'])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from jaxtyping import Int
from torch import Tensor

from capwrap.errors import CapwrapWarning, ConfigError, StoreError
from capwrap.models.live import wrap_hf_model
from capwrap.recording.recorder import DEFAULT_COMPONENT_KINDS, Recorder, _total_sq
from capwrap.recording.store import RunStore
from capwrap.tasks.base import TaskBatch

__all__ = ["RecorderCallback"]


class RecorderCallback(transformers.TrainerCallback):
    """Records the Trainer's run into a :class:`~capwrap.recording.RunStore` at ``path``.

    Args:
        path: the store's folder (created when training starts; it must not exist unless
            ``overwrite``, or unless the Trainer resumes from a checkpoint at the store's last step).
            A Trainer resumed from a checkpoint into a new folder numbers the store's steps on from
            the checkpoint's (its weight changes are measured from the checkpoint's weights:
            ``meta["first_step"]``). A Trainer that trains again after a failed attempt
            (``auto_find_batch_size``) goes on in the same store, from the step it starts at (the
            failed attempt's weight updates, which transformers keeps, are warned of and noted in
            ``meta["retries"]``).
        probe: the fixed batch activations are recorded on: a :class:`~capwrap.tasks.TaskBatch`
            (its labels are kept for probes) or token ids ``[batch, pos]``.
        hooks: hook names or glob patterns (``"blocks.*.hook_resid_post"``); ``()`` for none.
        every: record activations and component norms every this many optimizer steps (and at 0, at
            every checkpoint the Trainer saves and at the run's last step, early or not).
        component_kinds: component kinds whose weight-change and gradient norms are recorded.
        dtype: ``"float32"`` or ``"float16"`` for stored activations.
        overwrite: replace an existing store.
        meta: extra JSON-serializable information to keep in the store.
        background: measure each due step (activations, weight-change norms) in a background
            thread on a copy of the weights, overlapping the next training steps; see
            :class:`~capwrap.recording.Recorder`.

    Attributes:
        recorder: the :class:`~capwrap.recording.Recorder` while training runs (``None`` before,
            and on processes other than the main one).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        probe: TaskBatch | Int[Tensor, "batch pos"] | None = None,
        hooks: str | Sequence[str] = "blocks.*.hook_resid_post",
        every: int = 10,
        component_kinds: Sequence[str] = DEFAULT_COMPONENT_KINDS,
        dtype: str = "float32",
        overwrite: bool = False,
        meta: dict[str, Any] | None = None,
        background: bool = False,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ConfigError(f"every must be a positive number of steps, got {every!r}")
        if hooks and probe is None:
            raise ConfigError(
                "recording activations needs a fixed probe batch: pass probe=task.sample(256, seed=0) or token ids "
                "[batch, pos] (or hooks=() to record only weights and scalars)"
            )
        self.path = Path(path)
        self.settings = dict(hooks=hooks, probe=probe, every=every, component_kinds=component_kinds, dtype=dtype,
                             overwrite=overwrite, meta=meta, background=background)  # fmt: skip
        self.recorder: Recorder | None = None
        self._losses: list[Tensor] = []
        self._shares = False  # whether the model's losses are shares of the step's (Trainer's num_items_in_batch)
        self._hook: Any = None
        self._grad_hooks: list[Any] = []
        self._trainable: list[torch.nn.Parameter] = []
        self._grad_norm: Tensor | None = None  # the step's gradient norm before clipping, on the device
        self._measuring = False  # a measurement is queued for the end of the running backward pass
        self._scaler: Any = None  # fp16's gradient scaler, whose scale the measured gradients carry
        self._model: torch.nn.Module | None = None  # the live model the recorder watches
        self._last_event: tuple[str, int] | None = None  # (event, global step) last handled
        self._last_state: Any = None  # the TrainerState it came with
        self._warned_no_loss = False

    # ---- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self._repeated("train_begin", state):
            return
        if model is None:  # pragma: no cover - every Trainer passes its model
            raise ConfigError("the Trainer passed no model to RecorderCallback")
        if self.recorder is not None and self.recorder.is_open and self._model is model:
            # the Trainer trains again after a failed attempt (auto_find_batch_size lowers the batch): the
            # store goes on from the step it starts at, without what the failed attempt recorded after it
            self._retried(state.global_step)
        else:
            if self.recorder is not None:  # another model (a Trainer with model_init): a store of its own
                self.recorder.close()
            self._open(model, state.global_step)
        self._remove_hooks()
        self._losses, self._grad_norm, self._measuring, self._warned_no_loss = [], None, False, False
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._grad_hooks = [p.register_post_accumulate_grad_hook(self._gradient_accumulated) for p in self._trainable]
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._repeated("epoch_begin", state)

    def on_epoch_end(self, args, state, control, **kwargs):
        # a run a callback stopped (control.should_training_stop) ends with this step: recorded in full
        if control.should_training_stop and self.recorder is not None and self.recorder.is_open:
            if not self._repeated("epoch_end", state):
                self.recorder.finish()

    def on_save(self, args, state, control, **kwargs):
        # every checkpoint is a step recorded in full: the one a Trainer loads as its best at the end
        # (load_best_model_at_end, as early stopping needs) can be diagnosed with the store rolled back to it
        if self.recorder is not None and self.recorder.is_open and not self._repeated("save", state):
            self.recorder.finish()

    def on_step_begin(self, args, state, control, **kwargs):
        self._repeated("step_begin", state)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.recorder is None or not self.recorder.is_open or self._repeated("optimizer_step", state):
            return
        scalars: dict[str, float | Tensor] = {}
        if optimizer is not None:
            scalars["lr"] = float(optimizer.param_groups[0]["lr"])
        if self._grad_norm is not None:
            scalars["grad_norm"] = self._grad_norm
            self._grad_norm = None
        loss = self._step_loss()
        if loss is None and not self._warned_no_loss:
            self._warned_no_loss = True
            warnings.warn(
                "the model returned no loss, so the store records none: the Trainer computes the loss itself "
                "(label_smoothing_factor, compute_loss_func or a compute_loss of its own) and passes the model no "
                "labels. Its logged loss (every logging_steps) is in trainer.state.log_history",
                CapwrapWarning,
                stacklevel=2,
            )
        # the Trainer counts this step after the callback: it is the last when the count reaches max_steps
        self.recorder.step(loss=loss, final=state.global_step + 1 >= state.max_steps > 0, **scalars)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
        if self.recorder is not None:
            try:
                if self.recorder.is_open:
                    if args.load_best_model_at_end and state.best_model_checkpoint:
                        self._best_loaded(state)
                    else:
                        self.recorder.finish()  # a run stopped early ends with its last step
            finally:
                self.recorder.close()

    # ---- helpers ---------------------------------------------------------------------------------
    def _open(self, model: torch.nn.Module, step: int) -> None:
        """Wrap the live model and open the store: a new one (numbered on from ``step`` when the
        Trainer resumed from a checkpoint), or the one at :attr:`path` when it ends at ``step``."""
        live = wrap_hf_model(model)  # no tokenizer: the probe is token ids, and a Trainer's may be half-made
        resume = step > 0 and (self.path / "meta.json").exists() and not self.settings["overwrite"]
        if resume:
            self._check_resumable(step)
            self.recorder = Recorder(live, self.path, resume=True, **self.settings)
        else:
            self.recorder = Recorder(live, self.path, first_step=step, **self.settings)
        self.recorder.open()
        self._model = model

    def _retried(self, step: int) -> None:
        """Go back to ``step`` after a failed attempt. transformers keeps the weight updates of the
        attempt's optimizer steps (it restores no weights), so those are said: a warning, and the
        store's ``meta["retries"]``."""
        assert self.recorder is not None and self.recorder.store is not None
        ran = self.recorder.current_step - step
        self.recorder.rollback(step)
        if ran > 0:
            retries = [*self.recorder.store.meta.get("retries", []), {"at_step": step, "steps_kept_in_the_weights": ran}]
            self.recorder.store.update_meta(retries=retries)
            warnings.warn(
                f"the Trainer trains again from step {step} after a failed attempt that ran {ran} optimizer steps; "
                "transformers keeps their weight changes, so this store's weight changes and activations from here on "
                "include them (its meta['retries'] says so)",
                CapwrapWarning,
                stacklevel=3,
            )

    def _best_loaded(self, state: Any) -> None:
        """The Trainer ends with its best checkpoint, not the run's last step: said in the store's
        ``meta["best_step"]`` and a warning with the way to diagnose it with this store."""
        assert self.recorder is not None and self.recorder.store is not None
        best = getattr(state, "best_global_step", None)
        if best is None:
            tail = str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[-1]
            best = int(tail) if tail.isdigit() else None
        self.recorder.store.update_meta(best_step=best)
        warnings.warn(
            f"the Trainer loaded its best checkpoint ({state.best_model_checkpoint}, step {best}) at the end, so the "
            f"model it ends with is not the run's last step ({self.recorder.current_step}); to diagnose it with this "
            f"store, roll a copy of the store back to step {best}: shutil.copytree(store, copy); "
            f"RunStore.resume(copy).rollback({best})",
            CapwrapWarning,
            stacklevel=2,
        )

    def _repeated(self, event: str, state: Any) -> bool:
        """Whether this event is the one this callback just handled: a callback given to the Trainer
        twice (which transformers only warns of) sees every event twice in a row, with the same
        ``TrainerState`` (a new ``train()``, or a retry after a failed attempt, makes a new one)."""
        key = (event, state.global_step)
        if self._last_event == key and self._last_state is state:
            return True
        self._last_event, self._last_state = key, state
        return False

    def _keep_loss(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if module.training and isinstance(loss, Tensor):
            self._losses.append(loss.detach())
            self._shares = kwargs.get("num_items_in_batch") is not None

    def _remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks, self._trainable = [], []

    def _gradient_accumulated(self, param: torch.nn.Parameter) -> None:
        """A trained parameter's gradient was accumulated: measure the gradient norm once the running
        backward pass ends. The Trainer clips the gradients after the step's last backward pass, so
        the last measurement of a step is the norm before clipping, which the Trainer keeps to itself
        (it logs it only every ``logging_steps``)."""
        if not self._measuring:
            self._measuring = True
            torch.autograd.Variable._execution_engine.queue_callback(self._measure_last)

    def _measure_last(self) -> None:
        """Queue the measurement behind the end-of-backward work others queued after this one was
        (DDP averages the gradients across processes there): callbacks queued while the engine runs
        its callbacks run after them."""
        torch.autograd.Variable._execution_engine.queue_callback(self._measure_gradients)

    def _measure_gradients(self) -> None:
        """The norm of the trained parameters' gradients, left on the device (read back by the
        recorder's writer thread); with fp16's gradient scaler, unscaled. Under DeepSpeed ZeRO or
        FSDP a process holds only shards of the gradients (or none): the Trainer's own logged
        ``grad_norm`` is the one to read there."""
        self._measuring = False
        grads = [p.grad for p in self._trainable if p.grad is not None]
        if not grads:
            return
        norm = _total_sq(grads).sqrt()
        if self._scaler is not None:  # the scale as a tensor where the scaler offers one: no wait for the device
            scale = getattr(self._scaler, "_get_scale_async", self._scaler.get_scale)()
            norm = norm / scale
        self._grad_norm = norm

    def _step_loss(self) -> Tensor | None:
        """The step's loss: the sum of the micro-batches' shares when the Trainer weighs them by
        tokens (``num_items_in_batch``), else their mean; ``None`` if the model reported none. Left
        on the model's device: the recorder's writer thread reads it back, not the training loop."""
        if not self._losses:
            return None
        losses = torch.stack([loss.float() for loss in self._losses])
        self._losses = []
        return losses.sum() if self._shares else losses.mean()

    def _check_resumable(self, step: int) -> None:
        last = RunStore.open(self.path).last_step
        if last != step:
            raise StoreError(
                f"the Trainer resumes at step {step} but the store at {self.path} ends at step {last}; record the "
                "resumed run to a new folder (or pass overwrite=True to start the store again)"
            )
