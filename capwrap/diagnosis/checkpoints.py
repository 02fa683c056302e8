"""`diagnose` for checkpoints on disk (or the hub) and task specs: what ``capwrap diagnose`` runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capwrap.analyzers import ModelPair
from capwrap.diagnosis.result import Diagnosis, json_default
from capwrap.diagnosis.rule import VerdictRule
from capwrap.diagnosis.run import Memory, check_memory, default_analyzers, diagnose
from capwrap.errors import CapwrapWarning, ConfigError
from capwrap.files import check_output_folder, read_json, write_text_atomic
from capwrap.models.io import check_placement, source_spec, source_tokenizer
from capwrap.models.model import resolve_device, resolve_dtype
from capwrap.models.residency import Residency
from capwrap.models.vocabulary import VocabularyCut, shared_vocabulary
from capwrap.provenance import describe_call, run_provenance
from capwrap.recording import RunStore

if TYPE_CHECKING:
    from capwrap.models import CapModel

__all__ = ["diagnose_checkpoints"]


#: Sequences per test set of the shared evaluation set with ``quick`` (the full diagnosis uses 1,024).
QUICK_EVAL_SIZE = 256

#: The folder in ``out`` that keeps each finished analyzer's evidence (``diagnose(..., evidence_dir=)``).
EVIDENCE_FOLDER = "evidence"


def diagnose_checkpoints(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    capability: str,
    downstream: str,
    out: str | os.PathLike | None = None,
    backend: str | None = None,
    quick: bool = False,
    store: str | os.PathLike | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    progress: bool = True,
    rule: str | os.PathLike | VerdictRule | None = None,
    downstream_free: str | None = None,
    memory: Memory = "normal",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> Diagnosis:
    """:func:`diagnose` for two checkpoints (folders or hub names) and task specs
    (:func:`~capwrap.tasks.spec.task_from_spec`); writes ``summary.json`` and ``report.html`` to ``out``.

    ``tuned`` may be a PEFT adapter folder (LoRA, DoRA, IA3, trainable tokens): the tuned model is then ``base`` with it merged in,
    and ``summary.json`` adds the adapter's own weight diff (``adapter``).

    A ``tuned`` checkpoint that added tokens to the base's (more token rows, the same shape otherwise: a
    chat fine-tune's ``<|im_start|>``, a pad token, an embedding padded to a round size) is compared on the
    base's tokens (:mod:`capwrap.models.vocabulary`): a warning names the tokens left out, and the provenance's
    ``vocabulary`` records them.

    Text tasks read both models' texts with one tokenizer, the base's; a checkpoint folder without a
    tokenizer has its texts read with the other's, and a warning says so. The provenance's
    ``tokenizer`` records the folder each model's tokenizer came from.

    ``quick``: smaller samples and budgets, and an evaluation set of :data:`QUICK_EVAL_SIZE` sequences per task.

    ``out`` also keeps each finished analyzer's evidence (in ``out/evidence``): a call interrupted
    (a crash, a kill, a lost machine) and made again with the same ``out``, models and settings
    resumes, running only the analyzers that had not finished (see :func:`diagnose`'s ``evidence_dir``).

    ``memory="low"``: the two models take turns in memory from the start (the base is written to a
    temporary file and freed before the tuned model is loaded; see :func:`diagnose`), so the pair
    needs about one model of memory.

    ``device``: where the models are loaded and every analyzer runs (default CPU; ``"cuda"`` for a GPU).

    ``dtype``: the precision both models are loaded in (``"bfloat16"`` halves their memory; default
    float32); the analyzers' probes, metrics and sums run in float32 whatever it is.

    ``device_map`` (with ``max_memory``, ``offload_folder``): load each model with accelerate across
    the GPUs, the CPU and disk (:mod:`capwrap.models.dispatch`), for a pair larger than one device.
    The models then take turns as with ``memory="low"``; what does not fit in ``max_memory`` goes to
    ``offload_folder`` (``base/`` and ``tuned/`` in it; default: a temporary folder, removed at the
    end). Reverse fine-tuning does not run on a model with offloaded weights, and says so.

    This is what ``capwrap diagnose BASE TUNED --capability SPEC --downstream SPEC --out DIR`` runs.
    ``downstream_free``: a spec of the downstream task without its spurious correlation (default:
    the downstream task's own correlation-free variant, when it has one). ``rule``: a verdict rule
    or the path of one saved with :meth:`VerdictRule.save` (default: the fitted rule).

    Raises:
        CheckpointError: a checkpoint is missing, corrupt, pickle-only (without ``allow_pickle``) or
            on an unreachable hub.
        ConfigError: the pair differs in architecture, shape or tokenizer; a spec is invalid; a text
            dataset has no example of the feature; the rule file is not a rule; ``device`` and
            ``device_map`` are both given, or ``max_memory``/``offload_folder`` without ``device_map``.
    """

    started = time.perf_counter()
    call = _call(locals())
    if out is not None:
        _check_out_folder(out)
    check_memory(memory)  # before anything is loaded
    device = None if device is None else resolve_device(device)
    dtype = resolve_dtype(dtype)  # a bad name fails before anything is loaded
    check_placement(device, device_map, max_memory, offload_folder)  # before anything is loaded
    verdict_rule = VerdictRule.load(rule) if isinstance(rule, (str, os.PathLike)) else rule
    with contextlib.ExitStack() as stack:
        dispatch: dict[str, Any] | None = None
        if device_map is not None:
            memory = "low"  # a dispatched model is not copied: the pair takes turns
            if offload_folder is None:
                offload_folder = tempfile.mkdtemp(prefix="capwrap-offload-")
                stack.callback(shutil.rmtree, offload_folder, ignore_errors=True)
            dispatch = {"device_map": device_map, "max_memory": max_memory, "offload_folder": Path(offload_folder)}
        residency = None
        if memory == "low":  # models discarded at the end: no need to bring them back
            residency = Residency()
            stack.callback(residency.close, restore=False)
        return _diagnose_files(base, tuned, capability, downstream, out, backend, quick, store, seed, allow_pickle,
                               progress, verdict_rule, downstream_free, residency, started, device, dtype,
                               dispatch, call)  # fmt: skip


class _Given:
    """A value shown in a recorded call by a description (a rule object has no short repr)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _call(arguments: dict[str, Any]) -> str:
    """The Python call that reproduces this diagnosis: :func:`diagnose_checkpoints` with the four
    arguments it needs and every other one given a value other than its default (``progress``, which
    changes no number, left out)."""
    import inspect

    shown = {}
    for name, parameter in inspect.signature(diagnose_checkpoints).parameters.items():
        value = arguments[name]
        if name == "progress" or (parameter.default is not inspect.Parameter.empty and value == parameter.default):
            continue
        if isinstance(value, os.PathLike):
            value = str(value)
        elif isinstance(value, torch.dtype | torch.device):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, VerdictRule):
            value = _Given("a VerdictRule given in Python")
        shown[name] = value
    return describe_call("capwrap.diagnosis.diagnose_checkpoints", **shown)


def _check_out_folder(out: str | os.PathLike) -> None:
    """Refuse ``out`` before any model loads if it cannot hold a diagnosis, or if its ``summary.json``
    is not an earlier ``capwrap diagnose``'s (a demo's, another tool's): the diagnosis would replace
    it and ``report.html``. (An earlier diagnosis's folder is read back, or refused as another
    diagnosis, by its evidence folder.)"""
    folder = check_output_folder(out)
    summary, report = folder / "summary.json", folder / "report.html"
    if not summary.exists():
        if report.exists():  # a diagnosis writes its summary first: a report alone is another tool's
            raise ConfigError(f"{report} is not an earlier `capwrap diagnose`'s report, and the diagnosis would "
                              "replace it; choose another --out, or move it")  # fmt: skip
        return
    data = read_json(summary)
    if not (isinstance(data, dict) and {"base", "tuned", "capability_spec", "downstream_spec"} <= set(data)):
        raise ConfigError(
            f"{summary} is not an earlier `capwrap diagnose`'s summary, and the diagnosis would replace it and "
            f"{folder / 'report.html'}; choose another --out, or move them"
        )


def _diagnose_files(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    capability: str,
    downstream: str,
    out: str | os.PathLike | None,
    backend: str | None,
    quick: bool,
    store: str | os.PathLike | None,
    seed: int,
    allow_pickle: bool,
    progress: bool,
    verdict_rule: VerdictRule | None,
    downstream_free: str | None,
    residency: Residency | None,
    started: float,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    dispatch: dict[str, Any] | None,
    call: str,
) -> Diagnosis:
    from capwrap.models import load_model
    from capwrap.models.adapters import is_adapter_folder, named_base
    from capwrap.tasks.spec import check_spec, parse_spec, task_from_spec

    for spec in (capability, downstream, downstream_free):  # their form, before any model loads
        if spec:
            check_spec(spec)
    if is_adapter_folder(base):
        trained_on = named_base(base)
        raise ConfigError(
            f"BASE {base} is a PEFT adapter, not a base model: the base of a diagnosis is the model before "
            f"fine-tuning, and an adapter goes second, as TUNED (`capwrap diagnose {trained_on or 'BASE'} {base} ...`; "
            "were the two swapped?). To compare two fine-tunes, merge the first adapter into its base "
            "(save_model(load_model(BASE, adapter=ADAPTER), FOLDER)) and pass that folder as BASE"
        )

    def placement(which: str) -> dict[str, Any]:
        """load_model's arguments that say where the model goes (each model offloads to a folder of its own)."""
        if dispatch is None:
            return {"device": device}
        return {**dispatch, "offload_folder": dispatch["offload_folder"] / which}

    adapter = tuned if is_adapter_folder(tuned) else None  # a PEFT adapter: BASE with it merged in
    # a pair that differs only in its token rows is compared on the rows both have (capwrap.models.vocabulary)
    shared = None if adapter else _shared_vocabulary(base, tuned, allow_pickle)
    base_model = load_model(base, backend=backend, allow_pickle=allow_pickle, dtype=dtype, d_vocab=shared,
                            **placement("base"))  # fmt: skip
    if residency is not None:  # the base waits in a file while the tuned model loads
        residency.add(base_model)
        residency.release_all()
    tuned_model = load_model(base if adapter else tuned, backend=backend, allow_pickle=allow_pickle, adapter=adapter,
                             dtype=dtype, d_vocab=base_model.spec.d_vocab if adapter else shared,
                             **placement("tuned"))  # fmt: skip
    ModelPair(base_model, tuned_model, residency)  # one architecture, shape and tokenizer, before the tasks are built
    reads_text = any(spec and "text" in parse_spec(spec) for spec in (capability, downstream, downstream_free))
    _say_vocabulary_cuts({"base": str(base), "tuned": str(tuned)}, base_model, tuned_model, reads_text)
    # the folder each model's tokenizer came from (a grown adapter's: its own folder's)
    folders = {"base": str(base), "tuned": str(tuned_model.metadata.get("tokenizer_source") or (base if adapter else tuned))}
    tokenizer, tokenizer_folders = _pair_tokenizer(folders, base_model, tuned_model, reads_text)
    cap_task = task_from_spec(capability, tokenizer, model=base_model)  # a Tracr task reads the base's vocabularies
    down_task = task_from_spec(downstream, tokenizer, model=base_model)
    free_task = task_from_spec(downstream_free, tokenizer, model=base_model) if downstream_free else "auto"
    run = RunStore.open(store) if store is not None else None
    memory = "low" if residency else "normal"
    diagnosis = diagnose(base_model, tuned_model, cap_task, down_task,
                         analyzers=default_analyzers(quick=quick, memory=memory, compiled=base_model.spec.compiled),
                         eval_size=QUICK_EVAL_SIZE if quick else 1024, store=run, seed=seed, progress=progress,
                         rule=verdict_rule, downstream_free=free_task, memory=memory,
                         evidence_dir=None if out is None else Path(out) / EVIDENCE_FOLDER)  # fmt: skip
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        provenance = run_provenance(
            models={"base": base_model, "tuned": tuned_model}, seeds={"seed": seed}, started=started, call=call,
            tokenizer=tokenizer_folders,
        )  # fmt: skip
        summary = {
            "base": str(base), "tuned": str(tuned), "capability_spec": capability, "downstream_spec": downstream,
            "downstream_free_spec": downstream_free, "spec": base_model.spec.to_dict(), "backend": base_model.backend,
            "quick": quick, "memory": memory, "seed": seed, "store": None if store is None else str(store),
            "dtype": str(dtype or torch.float32).removeprefix("torch."),
            "device_map": {which: m.metadata.get("device_map") for which, m in (("base", base_model), ("tuned", tuned_model))}
            if dispatch is not None else None,
            **diagnosis.to_dict(), "wall_seconds": round(time.perf_counter() - started, 2),
            "provenance": provenance,
        }  # fmt: skip
        if adapter is not None:
            from capwrap.analyzers.adapter_diff import adapter_summary

            summary["adapter"] = adapter_summary(base, adapter, allow_pickle)
        write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2, default=json_default))
        diagnosis.to_html(
            folder / "report.html",
            title=f"capwrap diagnosis: {tuned} vs {base}",
            provenance=provenance,
        )
    return diagnosis


def _shared_vocabulary(base: str | os.PathLike, tuned: str | os.PathLike, allow_pickle: bool) -> int | None:
    """The token rows a pair of checkpoints is compared on, read from their configs (and, for a base
    with more rows than the fine-tune, from its tokenizer), or ``None`` when nothing is cut."""
    base_spec, tuned_spec = source_spec(base, allow_pickle), source_spec(tuned, allow_pickle)
    if tuned_spec.d_vocab >= base_spec.d_vocab:
        return shared_vocabulary(base_spec, tuned_spec)
    tokenizer = source_tokenizer(base, allow_pickle)  # a padded base cut back by the fine-tune: rows its tokens lack?
    return shared_vocabulary(base_spec, tuned_spec, None if tokenizer is None else len(tokenizer))


def _say_vocabulary_cuts(folders: dict[str, str], base: CapModel, tuned: CapModel, reads_text: bool) -> None:
    """Warn of each model of the pair loaded on fewer token rows than its checkpoint has, and say what
    that leaves out; refuse a pair whose texts (``reads_text``) would be read with a tokenizer of tokens
    the base lacks. ``folders``: the checkpoints as given."""
    if reads_text and "vocabulary" in tuned.metadata and base.tokenizer is None and tuned.tokenizer is not None:
        raise ConfigError(
            f"the base checkpoint {folders['base']} has no tokenizer, and the tuned one added tokens the base lacks: its "
            "tokenizer would read the texts with ids (its pad token's among them) no base row holds. Copy the base's "
            f"tokenizer files (tokenizer.json, tokenizer_config.json, ...) into {folders['base']}"
        )
    for role, model in (("base", base), ("tuned", tuned)):
        if "vocabulary" not in model.metadata:
            continue
        cut = VocabularyCut.from_dict(model.metadata["vocabulary"])
        if role == "tuned":
            why = (f"its base {cut.kept}: the fine-tune added tokens, so the pair is compared on the base's tokens — "
                   f"{cut.describe()}. Every analysis sees the tuned model's weights and logits for the base's tokens "
                   "only (its softmax renormalized without the added ones); how the added tokens were trained is not "
                   "measured")  # fmt: skip
        else:
            why = (f"the tuned one {cut.kept}, and no token of the base's tokenizer is beyond them (a padded embedding "
                   f"the fine-tune cut back): the pair is compared on the first {cut.kept} — {cut.describe()}")
        warnings.warn(f"the {role} checkpoint {folders[role]} has {cut.rows} token rows, {why}", CapwrapWarning,
                      stacklevel=4)  # fmt: skip


def _pair_tokenizer(
    folders: dict[str, str], base: CapModel, tuned: CapModel, reads_text: bool
) -> tuple[Any, dict[str, str] | None]:
    """The tokenizer a pair's tasks read text with (the base's, else the tuned model's) and, where the
    tasks read text, the folder each model's tokenizer came from (the provenance's ``tokenizer``).

    ``folders``: the folder each model loaded from (a LoRA-tuned model: its base's). A model whose
    folder has no tokenizer has its texts read with the other's: said in a warning naming both
    folders, since a fine-tune that changed its tokenizer would then be read with the wrong one.
    """
    models = {"base": base, "tuned": tuned}
    tokenizer = base.tokenizer or tuned.tokenizer
    if tokenizer is None or not reads_text:
        return tokenizer, None
    lacking = next((role for role, model in models.items() if model.tokenizer is None), None)
    if lacking is None:
        return tokenizer, dict(folders)
    other = "tuned" if lacking == "base" else "base"
    warnings.warn(
        f"the {lacking} checkpoint {folders[lacking]} has no tokenizer (no readable tokenizer files): the "
        f"{lacking} model's texts are read with the {other} model's tokenizer, from {folders[other]}. If the "
        f"fine-tune changed the tokenizer (added or replaced tokens), copy the tokenizer it was trained with "
        f"(tokenizer.json, tokenizer_config.json, ...) into {folders[lacking]}; if it did not, copy the {other}'s "
        "files there to say so and silence this warning",
        CapwrapWarning,
        stacklevel=4,
    )
    return tokenizer, {**folders, lacking: folders[other]}
