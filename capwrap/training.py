"""One training loop for pretraining, fine-tuning and reverse fine-tuning.

Read it top to bottom: seed, optional weight noise, optimizer, warmup + cosine schedule, then for
each step a fresh batch (online data, reproducible from the seed), the loss, a finiteness check,
backward, clipping, the update, the recorder and callbacks, periodic evaluation, and, with
``checkpoint_every``, a training checkpoint in the run's store from which a restarted run resumes
(:func:`train`'s ``resume``; the functions under "resuming" at the end).

Examples:
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(family="count", operand="a", config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> result = train(model, task, TrainConfig(steps=5, batch_size=8, lr=1e-3, progress=False))
    >>> len(result.history), list(result.history.columns)[:3]
    (5, ['loss', 'lr', 'grad_norm'])
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from capwrap.checks import check_finite_weights
from capwrap.errors import ConfigError, StoreError, TrainingDivergedError, real_number
from capwrap.methods.base import FineTune, TrainingMethod, step_seed
from capwrap.models import CapModel, ModelSpec
from capwrap.models.model import resolve_dtype
from capwrap.optimizers import OPTIMIZERS, StepInBackward
from capwrap.recording.train_state import load_train_state, rng_state, save_train_state, set_rng_state
from capwrap.tasks.base import Task, accuracy, check_task_fits

if TYPE_CHECKING:
    from capwrap.recording import Recorder

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "StopTraining", "train", "lr_at", "add_weight_noise"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :func:`train`.

    Args:
        steps: optimizer steps.
        batch_size: sequences per step (drawn fresh each step).
        lr: peak learning rate.
        optimizer: ``"adamw"``, ``"sgd"`` (with momentum, as the paper's Tracr runs) or ``"adafactor"``
            (factored second moment, no first moment: next to no optimizer state; see
            :mod:`capwrap.optimizers`).
        weight_decay: the weight decay: decoupled for AdamW and Adafactor, an L2 term in the gradient
            for SGD (as ``torch.optim.SGD`` applies it). Default (``None``): 0.01 for AdamW and
            Adafactor, none for SGD (:attr:`applied_weight_decay` says which).
        momentum: SGD's momentum.
        warmup: fraction of ``steps`` with linear warmup, then cosine decay.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        step_in_backward: update each weight inside ``backward()`` as soon as its gradient is ready
            and drop the gradient (no gradient of the whole model is held; with ``adafactor``,
            training takes about one model's memory besides the activations). Needs
            ``grad_clip=None`` and a method that does not edit gradients.
        recompute_activations: keep only each block's input during the forward pass and run the
            block again in the backward pass (activation checkpointing,
            :mod:`capwrap.models.recompute`): a step holds one block's activations instead of
            every block's, for about one more forward pass of compute; same gradients. Not for
            methods that read activations through hooks (circuit-tuning).
        weight_noise: std of Gaussian noise added to every weight before training (the paper's
            Tracr protocol's N(0, 0.001), read as a standard deviation; read as a variance it would be
            0.032, which leaves the compiled programs at 0–20% on their own task).
        seed: seeds the data, the noise and any randomness of the loop.
        eval_every: evaluate ``eval_tasks`` every this many steps (0: only at the end).
        eval_size: sequences per evaluation.
        progress: show a progress bar.
        checkpoint_every: every this many steps (and at the end), keep everything a resumed run
            needs in the run's store (``0``: never); needs a recorder. See :func:`train`'s ``resume``.
    """

    steps: int = 1000
    batch_size: int = 96
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd", "adafactor"] = "adamw"
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup: float = 0.2
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    step_in_backward: bool = False
    recompute_activations: bool = False
    weight_noise: float = 0.0
    seed: int = 0
    eval_every: int = 0
    eval_size: int = 512
    progress: bool = True
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, kind: type = int) -> None:
            if not isinstance(value, kind) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"TrainConfig.{name} must be a positive {kind.__name__}, got {value!r}")

        positive("steps", self.steps)
        positive("batch_size", self.batch_size)
        positive("lr", float(self.lr) if isinstance(self.lr, int) else self.lr, float)
        positive("eval_size", self.eval_size)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"TrainConfig.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.step_in_backward and self.grad_clip is not None:
            raise ConfigError(
                "step_in_backward updates each weight before the other gradients exist, so the gradient norm "
                "cannot be clipped: pass grad_clip=None (optimizer='adafactor' clips its updates itself)"
            )
        momentum = real_number(self.momentum, "TrainConfig.momentum (SGD's momentum)", minimum=0, below=1,
                               hint="; 0.9 is usual")  # fmt: skip
        object.__setattr__(self, "momentum", momentum)  # a float (a NumPy number would not reach a checkpoint's JSON)
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"TrainConfig.warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip}")
        if self.weight_noise < 0 or self.eval_every < 0 or self.applied_weight_decay < 0:
            raise ConfigError("weight_noise, eval_every and weight_decay must not be negative")
        if (
            not isinstance(self.checkpoint_every, int)
            or isinstance(self.checkpoint_every, bool)
            or self.checkpoint_every < 0
        ):
            raise ConfigError(
                f"TrainConfig.checkpoint_every must be a number of steps >= 0, got {self.checkpoint_every!r}"
            )

    @property
    def applied_weight_decay(self) -> float:
        """The weight decay the optimizer applies: ``weight_decay``, or by default 0.01 for AdamW and
        Adafactor and 0 for SGD (the paper's Tracr runs train with plain momentum SGD)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.0 if self.optimizer == "sgd" else 0.01

    def low_memory(self) -> TrainConfig:
        """This configuration trained in about one model's memory: Adafactor (next to no optimizer
        state) stepped inside the backward pass (no gradient of the whole model held), without
        gradient-norm clipping (Adafactor clips its updates), the blocks recomputed in the backward
        pass (one block's activations held at a time). Same learning rate, steps and data.

        Examples:
            >>> TrainConfig(lr=1e-4).low_memory().optimizer, TrainConfig().low_memory().grad_clip
            ('adafactor', None)
        """
        return replace(self, optimizer="adafactor", grad_clip=None, step_in_backward=True, recompute_activations=True)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict, ``weight_decay`` as applied (:attr:`applied_weight_decay`):
        what a record of the run (metadata, summaries, checkpoints) keeps.

        Examples:
            >>> TrainConfig(optimizer="sgd").to_dict()["weight_decay"], TrainConfig().to_dict()["weight_decay"]
            (0.0, 0.01)
        """
        return asdict(self) | {"weight_decay": self.applied_weight_decay}

    def identity(self) -> dict[str, Any]:
        """The fields that decide what a run computes, as a key for kept runs (a cache's files):
        without ``recompute_activations`` (the same gradients either way), and without the fields
        added after runs were first kept while they hold the value every earlier run had
        (:data:`FIELDS_ADDED_LATER`), so that keys made before a field existed stay valid.

        Examples:
            >>> "step_in_backward" in TrainConfig().identity(), TrainConfig().low_memory().identity()["step_in_backward"]
            (False, True)
        """
        out = self.to_dict()  # (the weight decay as applied: AdamW's default keys as 0.01, as before it could be None)
        del out["recompute_activations"]
        return {k: v for k, v in out.items() if k not in FIELDS_ADDED_LATER or v != FIELDS_ADDED_LATER[k]}


#: TrainConfig fields added after runs were first kept (caches), with the value every earlier run had.
FIELDS_ADDED_LATER: dict[str, Any] = {"step_in_backward": False}


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """Raise from a callback to end training after the current step (the result covers it)."""


@dataclass
class StepInfo:
    """What callbacks see after each optimizer step (``step`` counts from 1)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Per-step history (loss, lr, gradient norm, evaluation metrics) and the final metrics."""

    history: pd.DataFrame
    final_metrics: dict[str, float]
    config: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        """Config, final metrics and step count as a JSON-serializable dict."""
        return {"config": self.config.to_dict(), "final_metrics": self.final_metrics, "steps": len(self.history)}


#: Scalars train passes the recorder itself: a callback's metric of one of these names stays in the history.
_RECORDER_OWN = frozenset({"loss", "lr", "grad_norm", "arrays", "final"})


def _storable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics a recorder stores: numbers (and one-element tensors) under names of their own; others
    (a callback's text or list) stay in the history only. Unlike a setting (:func:`~capwrap.errors.real_number`),
    a metric may be a bool (stored as 0 or 1) or NaN (a measurement that failed, kept as such)."""

    def number(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return value.numel() == 1 and not value.is_complex()
        return isinstance(value, numbers.Real)

    return {k: v for k, v in metrics.items() if k not in _RECORDER_OWN and number(v)}


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine."""
    warm = int(config.warmup * config.steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@torch.no_grad()
def add_weight_noise(model: CapModel, std: float, seed: int) -> None:
    """Add N(0, std²) to every weight of ``model`` in place (reproducible from ``seed``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=gen).to(param) * std)


def _precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The context the forward passes and the loss run in: nothing for float32, autocast for bfloat16."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    if dtype == torch.float16:
        raise ConfigError("training in float16 needs loss scaling, which capwrap does not do; use dtype='bfloat16'")
    if dtype != torch.bfloat16:
        raise ConfigError(f"train's dtype is 'float32' or 'bfloat16', got {dtype}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bfloat16; train in float32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _check_trainable(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise ConfigError(
            f"the weights being trained are {', '.join(low)}: updates smaller than their resolution would be lost. "
            "Load the model in float32 (the default) and pass dtype='bfloat16' to train() for bfloat16 compute"
        )
    return params


def train(
    model: CapModel,
    task: Task,
    config: TrainConfig | None = None,
    *,
    method: TrainingMethod | None = None,
    recorder: Recorder | None = None,
    resume: str | os.PathLike | None = None,
    eval_tasks: Mapping[str, Task] | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    description: str = "train",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``task`` (by default its own loss, fresh data every step).

    Args:
        model: the model to update.
        task: where training batches come from.
        config: hyperparameters (defaults: :class:`TrainConfig`).
        method: the objective and which parameters move (:mod:`capwrap.methods`; default
            :class:`~capwrap.methods.FineTune`, the task's own loss on every parameter). Metrics
            the method returns each step go into the history.
        recorder: a :class:`~capwrap.recording.Recorder` on this model, opened or not; it records
            every step it is due to. With ``config.checkpoint_every``, its store also keeps the
            training checkpoint; a recorder made with ``resume=True`` continues the run from it.
        resume: the folder of a run store with a training checkpoint: continue that run (and its
            recording), as ``recorder=Recorder(model, resume, resume=True)`` does.
        eval_tasks: name -> task, evaluated every ``config.eval_every`` steps and at the end
            (accuracy, reported as ``acc/<name>``).
        callbacks: called with a :class:`StepInfo` after every step, before the recorder; a callback
            may add entries to ``info.metrics`` (they go into the history and the store) or raise
            :class:`StopTraining` to end early (the step it stops at is recorded in full, as a run's
            last step is).
        description: label of the progress bar.
        device: train there (the model is moved there, in place, and stays); default: where it is.
        dtype: the forward passes' precision: ``"float32"`` (default) or ``"bfloat16"`` (autocast:
            matrix products in bfloat16, while the weights, the optimizer's state, the loss, the
            gradients' clipping and every metric stay float32 — the safe way to use bfloat16).

    A resumed run restores the weights, the optimizer, the method's state, the random generators
    and the history from the last checkpoint, drops what the store recorded after it, and goes on
    from there: on CPU its final weights equal, bit for bit, those of a run that was never
    interrupted. ``model`` only has to be of the checkpoint's spec and backend (a fresh
    ``build_model`` does); ``task``, ``method`` and ``config`` must be the run's (only
    ``progress``, ``checkpoint_every`` and ``recompute_activations`` may change). A run that
    finished (or that a callback stopped) is not trained further.

    The model is left in eval mode without gradients: the last step's are freed when the run ends.

    Raises:
        ConfigError: ``dtype`` is float16 (it needs loss scaling: use bfloat16) or bfloat16 on a
            device without it, or the weights being trained are themselves 16-bit (updates smaller
            than their resolution would be lost: load the model in float32).
        TrainingDivergedError: the loss became NaN or infinite (no update is applied for that
            step; the recorder keeps every step before it).
        ConfigError: the model already holds NaN or infinite weights; ``checkpoint_every``
            without a recorder; resuming with another spec, backend, task, method or config.
        StoreError: resuming a store that has no training checkpoint.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        hint = f"TrainConfig(**{config!r})" if isinstance(config, dict) else "TrainConfig(steps=..., lr=...)"
        raise ConfigError(f"config must be a capwrap.TrainConfig, got {type(config).__name__}: pass {hint}")
    if not isinstance(model, CapModel):
        raise ConfigError(
            f"model must be a loaded capwrap model, got {type(model).__name__}: load it with capwrap.load_model(...) "
            "or wrap a live Hugging Face model with capwrap.models.live.wrap_hf_model(...)"
        )
    method = method if method is not None else FineTune()
    if not isinstance(method, TrainingMethod):
        raise ConfigError(f"method must be a capwrap.methods.TrainingMethod, got {type(method).__name__}")
    check_task_fits(model, task)
    eval_tasks = dict(eval_tasks or {})
    for t in eval_tasks.values():
        check_task_fits(model, t)
    recorder = _recorder_to_use(model, recorder, resume)
    if recorder is not None and recorder.model is not model:
        raise ConfigError("the recorder watches another model; create it with Recorder(model, ...) for this one")
    if config.checkpoint_every and recorder is None:
        raise ConfigError(
            "checkpoint_every keeps the training state in the run's store, so it needs a recorder: pass "
            "recorder=Recorder(model, path, hooks=()) (hooks=() records only weights and scalars)"
        )
    if config.step_in_backward and method.edits_gradients:
        raise ConfigError(
            f"the {method.name} method edits the gradients before the update, which step_in_backward applies "
            "inside backward() before the method sees them: train it with step_in_backward=False"
        )
    if config.recompute_activations and method.reads_activations:
        raise ConfigError(
            f"the {method.name} method reads activations through hooks, which would fire again when a "
            "block is recomputed in the backward pass: train it with recompute_activations=False"
        )
    checkpoint = _checkpoint_to_resume(recorder, model, task, config, method)

    if device is not None:
        model.to(device)
    precision = _precision(model.device, resolve_dtype(dtype))
    torch.manual_seed(config.seed)
    if checkpoint is None:
        check_finite_weights(model.weights(), "the model to train")
        if config.weight_noise > 0:
            add_weight_noise(model, config.weight_noise, config.seed)
    optimizer = method.optimizer(_check_trainable(method.setup(model, task, config)), config)
    rows: list[dict[str, float]] = []
    start = 0

    def save_checkpoint(done: int, finished: bool) -> None:
        recorder.flush()  # the store holds every step up to this one before the checkpoint says so
        state = _run_identity(model, task, config, method) | {
            "step": done, "finished": finished, "history": rows, "weights": model.checkpoint_state(),
            "optimizer": optimizer.state_dict(), "method_state": method.state_dict(), "rng": rng_state(),
            "data": {"batches": "capwrap.methods.step_seed(config, step)", "next_step": done},
        }  # fmt: skip
        save_train_state(recorder.path, state)

    opened_here = recorder is not None and not recorder.is_open
    recomputing = contextlib.ExitStack()
    try:  # from here on the optimizer may hold hooks on the model (step_in_backward): removed in finally
        if config.recompute_activations:
            recomputing.enter_context(method.recomputed(model))
        if checkpoint is not None:
            start, rows = _restore(checkpoint, model, optimizer, method)
        eval_batches = {name: t.sample(config.eval_size, seed=config.seed + 7919) for name, t in eval_tasks.items()}
        model.train()
        if opened_here:
            recorder.open()
        if checkpoint is not None:
            recorder.rollback(start)
        elif config.checkpoint_every:
            save_checkpoint(0, finished=False)
        finished = checkpoint is not None and checkpoint["finished"]
        steps = range(config.steps if finished else start, config.steps)
        bar = tqdm(steps, initial=start, total=config.steps, desc=description, disable=not config.progress, leave=False)
        for step in bar:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = task.sample(config.batch_size, seed=step_seed(config, step)).to(model.device)
            with precision:
                loss = method.loss(model, batch, step).float()
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"the loss became {loss.item()} at step {step + 1} of {config.steps} (lr {lr:.3g}); "
                    "no update was applied. Lower the learning rate"
                    + (", or enable grad_clip" if config.grad_clip is None and not config.step_in_backward else ""),
                    step=step + 1,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            metrics: dict[str, float] = dict(method.before_update(model, step))
            grad_norm = _clip_gradients(optimizer, config)
            optimizer.step()
            method.after_update(model, step)

            done = step + 1
            if eval_batches and ((config.eval_every and done % config.eval_every == 0) or done == config.steps):
                metrics |= {f"acc/{name}": accuracy(model, b) for name, b in eval_batches.items()}
                model.train()
            info = StepInfo(done, loss.item(), lr, grad_norm, metrics)
            stop = False
            for callback in callbacks:
                try:
                    callback(info)
                except StopTraining:
                    stop = True
            if recorder is not None:  # after the callbacks: a run they stop ends here, recorded in full
                recorder.step(loss=info.loss, lr=lr, grad_norm=grad_norm, arrays=method.arrays(step),
                              final=done == config.steps or stop, **_storable(info.metrics))  # fmt: skip
            rows.append({"step": done, "loss": info.loss, "lr": lr, "grad_norm": grad_norm, **info.metrics})
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps or stop):
                save_checkpoint(done, finished=stop or done == config.steps)
            if stop:
                break
            accs = {k.split("/")[-1][:12]: f"{v:.2f}" for k, v in metrics.items() if k.startswith("acc/")}
            bar.set_postfix(loss=f"{info.loss:.3f}", **accs)
    finally:
        recomputing.close()
        if isinstance(optimizer, StepInBackward):
            optimizer.remove()
        # the last step's gradients (the model's, and a method's own parameters', e.g. LoRA's factors): a
        # model's size of memory that no one reads after the run
        optimizer.zero_grad(set_to_none=True)
        model.module.zero_grad(set_to_none=True)
        if opened_here and recorder.is_open:
            recorder.close()
        model.eval()
    history = pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()
    final = {k: float(v) for k, v in history.iloc[-1].items() if k.startswith("acc/")} if rows else {}
    return TrainResult(history=history, final_metrics=final, config=config)


def _clip_gradients(optimizer: torch.optim.Optimizer, config: TrainConfig) -> float:
    """Clip the step's gradients to ``config.grad_clip``; their norm before clipping (with
    ``step_in_backward``, the norm of the gradients already applied)."""
    if isinstance(optimizer, StepInBackward):
        optimizer.step()  # what backward() left: groups with a parameter that got no gradient
        return optimizer.pop_grad_norm()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    clip = config.grad_clip if config.grad_clip is not None else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, clip))


# ---- resuming ------------------------------------------------------------------------------------
#: TrainConfig fields that may change when a run resumes: they do not change what is computed.
_RESUMABLE_CHANGES = ("progress", "checkpoint_every", "recompute_activations")


def _recorder_to_use(model: CapModel, recorder: Recorder | None, resume: str | os.PathLike | None) -> Recorder | None:
    if resume is None:
        return recorder
    if recorder is not None:
        raise ConfigError(
            "pass either recorder=Recorder(model, path, resume=True) or resume=path, not both "
            "(resume=path builds that recorder)"
        )
    from capwrap.recording import Recorder

    return Recorder(model, resume, resume=True)


def _run_identity(model: CapModel, task: Task, config: TrainConfig, method: TrainingMethod) -> dict[str, Any]:
    """What a run is, as the checkpoint keeps it and a resumed run must match (JSON values)."""
    return json.loads(json.dumps({
        "config": config.to_dict(), "spec": model.spec.to_dict(), "backend": model.backend,
        "weight_decay_reaches_sgd": True,  # (checkpoints without it: SGD ignored its weight_decay)
        "task": task.describe(), "method": method.describe(),
    }))  # fmt: skip


def _checkpoint_to_resume(
    recorder: Recorder | None, model: CapModel, task: Task, config: TrainConfig, method: TrainingMethod
) -> dict[str, Any] | None:
    """The checkpoint a resumed recorder's store holds, checked against this call; ``None`` for a new run."""
    if recorder is None or not recorder.resume:
        return None
    state = load_train_state(recorder.path)
    if state is None:
        raise StoreError(
            f"the run store at {recorder.path} holds no training checkpoint, so train() cannot continue the "
            "training where it stopped (it would restart the schedule and the data from step 0). Runs keep one "
            "with TrainConfig(checkpoint_every=k). Start this run over in a new folder (or with overwrite=True); "
            "to add steps to the recording of your own loop, use the Recorder without train()"
        )
    now = _run_identity(model, task, config, method)
    where = f"the checkpoint in {recorder.path}"
    if not model.spec.same_as(state["spec"]):
        raise ConfigError(
            f"{where} is of a model of another spec ({ModelSpec.from_dict(state['spec']).differences(model.spec)}, "
            "checkpoint vs given); resume with a model of the run's spec (build_model(spec) will do)"
        )
    if state["backend"] != model.backend:
        raise ConfigError(
            f"{where} was trained on the {state['backend']!r} backend, the model given is {model.backend!r}; "
            f"the optimizer's state is per backend, so resume with backend={state['backend']!r}"
        )
    defaults = {f.name: f.default for f in fields(TrainConfig)}  # a field newer than the checkpoint: its default
    kept = dict(state["config"])
    if kept.get("optimizer") == "sgd" and not state.get("weight_decay_reaches_sgd"):
        kept["weight_decay"] = 0.0  # a checkpoint from before 2026-12-07: SGD ignored the weight_decay it recorded
    changed = [
        f"{k} ({kept.get(k, defaults[k])!r} vs {v!r})"
        for k, v in now["config"].items()
        if k not in _RESUMABLE_CHANGES and kept.get(k, defaults[k]) != v
    ]
    if changed:
        raise ConfigError(
            f"{where} is of a run with another TrainConfig: {', '.join(changed)} (checkpoint vs given); resume "
            f"with the run's config (only {', '.join(_RESUMABLE_CHANGES[:-1])} and {_RESUMABLE_CHANGES[-1]} may change) or start a new run"
        )
    for what in ("task", "method"):
        if state[what] != now[what]:
            raise ConfigError(
                f"{where} was trained with another {what}: {state[what]} (checkpoint) vs {now[what]} (given); "
                f"resume with the run's {what}"
            )
    return state


def _restore(
    state: dict[str, Any], model: CapModel, optimizer: torch.optim.Optimizer, method: TrainingMethod
) -> tuple[int, list[dict[str, float]]]:
    """Put the checkpoint's weights, optimizer, method and random states back; (step, history)."""
    from capwrap.models.layouts import canonical_views

    saved = canonical_views(model.spec, state["weights"])
    with torch.no_grad():
        for name, weight in model.weights().items():
            weight.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    method.load_state_dict(state["method_state"])
    set_rng_state(state["rng"])  # last: rebuilding a method's state may draw random numbers
    return int(state["step"]), list(state["history"])
