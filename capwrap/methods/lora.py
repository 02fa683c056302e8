"""LoRA: fine-tune low-rank adapters (peft) instead of the weights themselves.

:class:`LoRA` puts a peft LoRA adapter on a Hugging Face copy of the model (frozen: the base
weights ``W0``) and trains only the adapter's factors, with the task's own loss computed through
that copy. After every optimizer step it writes the merged weights ``W0 + scaling·B·A`` into the
model being trained (with ``dora=True``: each merged direction rescaled to its trained
magnitudes), so the model :func:`capwrap.train` returns *is* the fine-tuned model — its
accuracy, its checkpoint, the analyzers, and a :class:`~capwrap.recording.Recorder`'s weight
changes (the merged deltas: of rank at most ``r`` per adapted matrix for plain LoRA) all see it. The adapter
itself can be saved as a peft adapter folder (:meth:`LoRA.save_adapter`), which
``load_model(BASE, adapter=...)`` merges back.

The base weights get no gradient, so a recorder stores no per-component gradient norms during a
LoRA run; the ``grad_norm`` scalar is the adapter's.

Examples:
    >>> import torch
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGConfig, PCFGTask
    >>> from capwrap.training import TrainConfig, train
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> model = build_model(ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2))
    >>> before = {k: w.clone() for k, w in model.weights().items()}
    >>> _ = train(model, task, TrainConfig(steps=3, batch_size=8, lr=1e-2, progress=False), method=LoRA(r=2, target=["c_attn"]))
    >>> sorted(k for k, w in model.weights().items() if not torch.equal(w, before[k]))
    ['blocks.0.attn.W_K', 'blocks.0.attn.W_Q', 'blocks.0.attn.W_V']
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from capwrap.errors import ConfigError, real_number
from capwrap.methods.base import TrainingMethod
from capwrap.models.adapters import tied_change
from capwrap.models.layouts import canonical_views_of_some
from capwrap.models.peft_layers import merged_tensors
from capwrap.tasks.base import Task, TaskBatch, task_loss

if TYPE_CHECKING:
    from capwrap.models import CapModel
    from capwrap.training import TrainConfig

__all__ = ["LoRA"]


class LoRA(TrainingMethod):
    """Low-rank adaptation with peft: only the adapter's factors train; the model gets the merged weights.

    Args:
        r: the adapter's rank.
        alpha: ``lora_alpha``; the change is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        target: which modules get an adapter: a list of their Hugging Face names (``["c_attn"]`` for
            GPT-2, ``["q_proj", "v_proj"]`` for Llama), ``"all-linear"``, or, as in peft, a string
            that is a regular expression matched against each module's full name
            (``".*(c_attn|c_fc)"``; ``"c_attn"`` alone matches no module:
            ``transformer.h.0.attn.c_attn`` is a full name); ``None``: peft's default for the
            architecture (GPT-2: ``c_attn``; Llama: ``q_proj``, ``v_proj``).
        dropout: dropout on the adapter's input during training.
        rslora: rank-stabilized scaling.
        dora: weight-decomposed LoRA (peft's ``use_dora``): each adapted weight's direction is
            ``W0 + scaling·B·A`` and a trained magnitude per output scales each row of it; the
            model gets the merged weights as peft merges them.

    Raises:
        ConfigError: peft is not installed (``pip install 'capwrap[hf]'``), the model has no Hugging
            Face form (tracr), or ``target`` names no module of the model (a string that matches no
            full module name: the error suggests the list form).
    """

    name: ClassVar[str] = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        target: str | Sequence[str] | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
    ):
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"LoRA's rank r must be a positive integer, got {r!r}")
        self.r = r
        self.alpha = real_number(alpha, "LoRA's alpha", above=0, hint="; twice r is usual")
        self.dropout = real_number(dropout, "LoRA's dropout", minimum=0, below=1)
        self.rslora, self.dora = bool(rslora), bool(dora)
        self.target = target if target is None or isinstance(target, str) else list(target)
        self._peft: nn.Module | None = None
        self._model: CapModel | None = None
        self._source: str | None = None

    # ---- the TrainingMethod interface ---------------------------------------------------------------
    def setup(self, model: CapModel, task: Task, config: TrainConfig) -> list[nn.Parameter]:
        super().setup(model, task, config)
        peft = _import_peft()
        if not model.spec.has_hf_equivalent:
            raise ConfigError(f"LoRA trains Hugging Face layers; {model.spec.architecture} models have none")
        shell = _frozen_hf_copy(model)
        options = dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_rslora=self.rslora,
                       use_dora=self.dora)  # fmt: skip
        try:
            config = peft.LoraConfig(target_modules=self.target, task_type="CAUSAL_LM", **options)
            self._peft = peft.get_peft_model(shell, config)
        except ValueError as exc:
            full = [n for n, m in shell.named_modules() if isinstance(m, _adaptable_types())]
            names = sorted({n.rsplit(".", 1)[-1] for n in full})
            regex = ""
            if isinstance(self.target, str) and full:  # peft: a string is a regular expression over full names
                named = [n for n in full if n.rsplit(".", 1)[-1] == self.target]
                fix = (
                    f"to adapt the layers named {self.target!r}, give a list: target=[{self.target!r}]"
                    if named
                    else f"give a list of layer names, e.g. target=[{names[0]!r}]"
                )
                regex = (
                    ". A string target is a regular expression that peft matches against each module's full name "
                    f"({(named or full)[0]!r}), not a layer's name: {fix}"
                )
            raise ConfigError(
                f"LoRA target {self.target!r} does not fit this {model.spec.architecture} model ({exc}); "
                f"its layers are {names}{regex}"
            ) from exc
        adapted = [f"{name}.weight" for name in self._layers()]
        if tied := tied_change(model.spec, adapted):
            kept = sorted({n.rsplit(".", 2)[-2] for n in adapted} - {tied[0].rsplit(".", 2)[-2]}) or None
            self._peft = None
            raise ConfigError(
                f"LoRA target {self.target!r} adapts {tied[0]}, which this model ties to its {tied[1]}: peft trains "
                "that side only and leaves the other on the base's weights, so the trained model would no longer tie "
                f"them, which a model of this shape cannot hold; leave it out of target (e.g. target={kept})"
            )
        self._peft.to(model.device)
        self._model, self._source = model, model.metadata.get("source")
        return [p for p in self._peft.parameters() if p.requires_grad]

    def loss(self, model: CapModel, batch: TaskBatch, step: int) -> Float[Tensor, ""]:
        peft_model = self._require_setup()
        peft_model.train()
        return task_loss(peft_model(input_ids=batch.tokens).logits, batch)

    def after_update(self, model: CapModel, step: int) -> None:
        self.write_merged(model)

    @contextmanager
    def recomputed(self, model: CapModel) -> Iterator[None]:
        """The adapted Hugging Face model's own gradient checkpointing (its layers recomputed in the
        backward pass, non-reentrant), on while training: the capwrap model's blocks do not run."""
        hf = self._require_setup().get_base_model()
        hf.config.use_cache = False
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        renamed = hasattr(hf, "activation_checkpointing_enable")
        prefix = "activation" if renamed else "gradient"
        getattr(hf, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
        try:
            yield
        finally:
            getattr(hf, f"{prefix}_checkpointing_disable")()

    def state_dict(self) -> dict[str, Any]:
        """The adapter's factors and the base weights they apply to: a resumed run continues exactly,
        even from a checkpoint of the model (which holds the merged weights)."""
        return {
            "adapter": {name: p.detach().clone() for name, p in self._trainable().items()},
            "base": {name: layer.get_base_layer().weight.detach().clone() for name, layer in self._layers().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainable, layers = self._trainable(), self._layers()
        if set(state.get("adapter", {})) != set(trainable) or set(state.get("base", {})) != set(layers):
            raise ConfigError(
                "this LoRA state was saved for another adapter (other targets or model); resume with the same LoRA settings"
            )
        with torch.no_grad():
            for name, tensor in state["adapter"].items():
                trainable[name].copy_(tensor)
            for name, tensor in state["base"].items():
                layers[name].get_base_layer().weight.copy_(tensor)
        assert self._model is not None, "setup() runs before load_state_dict()"
        self.write_merged(self._model)

    def describe(self) -> dict[str, Any]:
        described = {"method": self.name, "r": self.r, "alpha": self.alpha, "target": self.target,
                     "dropout": self.dropout, "rslora": self.rslora}  # fmt: skip
        # (named only when on: a checkpoint of a plain LoRA run from before the option still resumes)
        return described | ({"dora": True} if self.dora else {})

    # ---- LoRA's own --------------------------------------------------------------------------------
    @torch.no_grad()
    def write_merged(self, model: CapModel) -> None:
        """Write every adapted weight, merged as peft merges it (``W0 + scaling·B·A``; DoRA: rescaled
        to its magnitudes), into ``model`` (canonical views, so any backend)."""
        merged: dict[str, Tensor] = {}
        for name, layer in self._layers().items():
            merged.update(merged_tensors(name, layer))
        weights = model.weights()
        for canonical, value in canonical_views_of_some(model.spec, merged).items():
            weights[canonical].copy_(value)

    def save_adapter(self, path: str | os.PathLike, base: str | None = None) -> None:
        """Save the adapter as a peft adapter folder (``adapter_config.json`` +
        ``adapter_model.safetensors``), naming ``base`` (default: the model's ``metadata["source"]``)
        as its base model."""
        peft_model = self._require_setup()
        peft_model.peft_config["default"].base_model_name_or_path = base or self._source
        peft_model.save_pretrained(str(path))

    def _require_setup(self) -> nn.Module:
        if self._peft is None:
            raise ConfigError("LoRA has no adapter yet: train(model, task, config, method=lora) sets it up")
        return self._peft

    def _layers(self) -> dict[str, nn.Module]:
        """The adapted layers by their module name in the Hugging Face model (``transformer.h.0.attn.c_attn``)."""
        from peft.tuners.lora import LoraLayer

        root = self._require_setup().get_base_model()
        return {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer)}

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self._require_setup().named_parameters() if p.requires_grad}


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("LoRA needs peft: pip install 'capwrap[hf]' (or pip install peft)") from exc
    return peft


def _frozen_hf_copy(model: CapModel) -> nn.Module:
    """A Hugging Face model with a copy of ``model``'s weights, every parameter frozen."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_config(model.spec.to_hf_config(), attn_implementation="eager")
    hf.load_state_dict(model.checkpoint_state(), strict=False)  # (a tied lm_head is not stored)
    hf.requires_grad_(False)
    return hf


def _adaptable_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, Conv1D)
