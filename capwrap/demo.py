"""The demo study: fine-tune a PCFG counting model to count ``b`` through a spurious correlation.

A small model pretrained on the paper's PCFG tasks with the ``low`` operand prior counts ``a``
well and ``b`` barely. It is fine-tuned to count ``b`` at a small learning rate on data where
count(b) = count(a) + 1 always holds (C_Tr = 1), with recording on. The paper's finding is that
such a model learns a *wrapper*, "count ``a`` and add one": it counts ``b`` where the correlation
holds (C_Te = 1) and fails where it does not (C_Te = 0).

The base checkpoint ships with capwrap (``capwrap/assets/demo_base``), made by
``scripts/train_demo_base.py`` with :func:`pretrain_demo_base`; ``pretrain=True`` retrains it.
After fine-tuning, :func:`~capwrap.diagnosis.diagnose` weighs the analyzers' evidence into a verdict.

Scenarios:

* ``default``: the study above; the verdict is expected to be ``wrapper``.
* ``removed``: the negative control. Before fine-tuning, every weight of the transformer blocks
  (attention and MLP, where counting is computed) is re-initialized; only the embeddings and the
  unembedding survive — and it is fine-tuned where the correlation never holds (C_Tr = 0), so its
  data cannot teach count ``a`` back. The capability is then truly gone from the tuned model, and a
  verdict of ``wrapper`` would be a false positive.

Examples:
    >>> import tempfile
    >>> result = run_demo(tempfile.mkdtemp(), finetune_steps=20, eval_size=64, progress=False)  # doctest: +SKIP
    >>> sorted(result.summary["accuracy"]["tuned"])  # doctest: +SKIP
    ['capability', 'downstream_correlated', 'downstream_uncorrelated']
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from capwrap.analyzers import (
    Analyzer,
    Revival,
)
from capwrap.analyzers.controls import never_had_it
from capwrap.diagnosis import Diagnosis, diagnose
from capwrap.errors import ConfigError
from capwrap.files import check_output_folder, copy_missing, read_json, write_json_atomic
from capwrap.models import CapModel, ModelSpec, build_model, load_model, save_model
from capwrap.models.io import CAPWRAP_FILE
from capwrap.models.model import PROVENANCE_KEYS, resolve_device
from capwrap.provenance import describe_call, run_provenance
from capwrap.recording import Recorder, RunStore
from capwrap.report import Report, error_bars, proportion_interval
from capwrap.tasks import PCFGConfig, PCFGTask, accuracy
from capwrap.training import TrainConfig, train

__all__ = [
    "DemoResult",
    "demo_tasks",
    "demo_spec",
    "pretrain_demo_base",
    "demo_analyzers",
    "make_demo_control",
    "load_demo_control",
    "remove_capability",
    "run_demo",
    "DEMO_BASE",
    "DEMO_CONTROL",
    "PRETRAIN_CONFIG",
    "FINETUNE_CONFIG",
]

#: The shipped base checkpoint.
DEMO_BASE = resources.files("capwrap") / "assets" / "demo_base"
#: The shipped revival control (:func:`make_demo_control`), with its reverse fine-tuning runs for the
#: default seed in ``revival/`` (the :class:`~capwrap.analyzers.Revival` cache's files).
DEMO_CONTROL = resources.files("capwrap") / "assets" / "demo_control"
#: Steps the revival control trains on the downstream task: the fine-tuning budget.
CONTROL_STEPS = 300
#: Sequences per test set of the diagnosis's evaluation set: the validation suite's, on which the
#: verdict rule was fitted (the summary's accuracies use the demo's larger ``eval_size``).
DIAGNOSIS_EVAL_SIZE = 512
PCFG = PCFGConfig(length=32, window=16, occurrence=3)
PRETRAIN_CONFIG = TrainConfig(steps=3000, batch_size=96, lr=1e-3, warmup=0.2, min_lr_ratio=0.1, seed=0, eval_every=500)
FINETUNE_CONFIG = TrainConfig(steps=300, batch_size=48, lr=3e-5, warmup=0.2, seed=1)
#: C_Tr of each scenario's fine-tuning data. The negative control is fine-tuned where the correlation
#: never holds, so nothing in its data teaches count ``a`` back (built as the validation suite's removed
#: scenarios are; with C_Tr = 1 its labels would be a function of count ``a``).
FINETUNE_CORRELATION: dict[str, float] = {"default": 1.0, "removed": 0.0}
SCENARIOS = tuple(FINETUNE_CORRELATION)


def demo_tasks() -> dict[str, PCFGTask]:
    """The pretraining task and the three evaluation tasks of the demo."""
    return {
        "pretraining": PCFGTask(family=("count", "index"), prior="low", config=PCFG, name="pretraining (low prior)"),
        "capability": PCFGTask("count", "a", config=PCFG, name="count a"),
        "downstream_correlated": PCFGTask("count", "b", correlation=1.0, config=PCFG, name="count b, C_Te=1"),
        "downstream_uncorrelated": PCFGTask("count", "b", correlation=0.0, config=PCFG, name="count b, C_Te=0"),
    }


def demo_spec() -> ModelSpec:
    """The demo model: 4 blocks, 4 heads, d_model 128 (the paper's is 6 x 6 x 192)."""
    task = demo_tasks()["pretraining"]
    return ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=4, d_model=128, n_heads=4)


def pretrain_demo_base(
    config: TrainConfig = PRETRAIN_CONFIG,
    backend: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    spec: ModelSpec | None = None,
) -> CapModel:
    """Pretrain the demo's base model from scratch (about 15 minutes on 2 CPU cores), on ``device``
    (default CPU; the initial weights are drawn on the CPU, so a seed gives the same start anywhere);
    ``spec``: another model than :func:`demo_spec`'s on the same tasks (its vocabulary and context
    must fit them)."""
    tasks = demo_tasks()
    model = build_model(spec or demo_spec(), backend=backend, seed=config.seed)
    evals = {k: tasks[k] for k in ("capability", "downstream_correlated")}
    result = train(
        model,
        tasks["pretraining"],
        dataclasses.replace(config, progress=progress),
        eval_tasks=evals,
        description="pretrain",
        device=device,
    )
    model.metadata = {
        "task": tasks["pretraining"].describe(),
        "train_config": config.to_dict(),
        "final_metrics": result.final_metrics,
        "made_by": "capwrap.demo.pretrain_demo_base",
    }
    return model


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: the summary (as in ``summary.json``), the models, the run."""

    summary: dict[str, Any]
    base: CapModel
    tuned: CapModel
    store: RunStore
    out: Path
    diagnosis: Diagnosis | None = None

    def accuracy_table(self) -> pd.DataFrame:
        """Accuracy of base and tuned models on each test set."""
        return pd.DataFrame(self.summary["accuracy"]).rename_axis("test set")


def run_demo(
    out: str | os.PathLike,
    seed: int = 0,
    scenario: str = "default",
    backend: str | None = None,
    pretrain: bool = False,
    finetune_steps: int | None = None,
    eval_size: int = 2048,
    diagnose_pair: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    device: str | torch.device | None = None,
) -> DemoResult:
    """Run the demo study and write ``summary.json``, ``report.html``, the run store and the tuned model.

    Args:
        out: output folder (created). An earlier demo's outputs in it (which it marks,
            :data:`DEMO_MARK`) are removed as fine-tuning starts, so a demo stopped on the way leaves
            only its partial run store; a ``tuned/``, ``run/``, ``summary.json`` or ``report.html``
            there that no demo wrote is refused before anything runs.
        seed: seeds fine-tuning data, recording probe and evaluation sets.
        scenario: ``"default"`` or ``"removed"`` (the negative control; see the module docstring).
        backend: ``"hooked"`` or ``"bridge"`` (default: the installed TransformerLens's).
        pretrain: pretrain the base model here instead of loading the shipped checkpoint.
        finetune_steps: override the fine-tuning length (default 300).
        eval_size: sequences per test set.
        diagnose_pair: run :func:`~capwrap.diagnosis.diagnose` on (base, tuned) and report its verdict.
        progress: show progress bars.
        log: called with a line of text at each stage (the CLI prints them).
        device: where the models train and are diagnosed (default CPU; ``"cuda"`` for a GPU).
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown demo scenario {scenario!r}; choose from {list(SCENARIOS)}")
    if eval_size <= 0:
        raise ConfigError(f"eval_size must be positive, got {eval_size}")
    device = None if device is None else resolve_device(device)
    out = check_output_folder(out)
    _check_earlier_demo(out)  # before anything runs; removed once the arguments have all been checked
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = demo_tasks()
    test_sets = {k: tasks[k] for k in ("capability", "downstream_correlated", "downstream_uncorrelated")}

    if pretrain:
        log("pretraining the base model (counting and indexing, low prior for b) ...")
        base = pretrain_demo_base(backend=backend, progress=progress, device=device)
    else:
        log(f"loading the shipped base model from {DEMO_BASE}")
        base = load_model(str(DEMO_BASE), backend=backend)
    if device is not None:
        base.to(device)
    finetune = dataclasses.replace(FINETUNE_CONFIG, seed=seed + 1, progress=progress, eval_every=50)
    if finetune_steps is not None:
        finetune = dataclasses.replace(finetune, steps=finetune_steps, eval_every=max(1, finetune_steps // 6))

    batches = {k: t.sample(eval_size, seed=10_000 + seed) for k, t in test_sets.items()}
    acc_base = {k: accuracy(base, b) for k, b in batches.items()}
    tuned = base.clone()
    # what the base's maker wrote about it (its pretraining, accuracy, wall time) is not the tuned model's
    tuned.metadata = {k: v for k, v in tuned.metadata.items() if k in PROVENANCE_KEYS}
    if scenario == "removed":
        log("negative control: re-initializing every transformer block before fine-tuning (the capability is gone)")
        remove_capability(tuned, seed=seed)
    _clear_earlier_demo(out)  # so that a demo stopped from here on leaves no earlier outputs beside its run
    c_tr = FINETUNE_CORRELATION[scenario]
    log(
        f"fine-tuning to count b (C_Tr = {c_tr:g}, lr {finetune.lr:.0e}, {finetune.steps} steps), recording every 10 steps ..."
    )
    ft_task = PCFGTask("count", "b", correlation=c_tr, config=PCFG, name=f"fine-tuning: count b, C_Tr={c_tr:g}")
    probe = tasks["capability"].sample(256, seed=20_000 + seed)
    store_path = out / "run"
    recorder = Recorder(
        tuned, store_path, hooks="blocks.*.hook_resid_post", probe=probe, every=10, overwrite=True,
        meta={"scenario": scenario, "task": ft_task.describe(), MADE_BY: DEMO_MARK},
    )  # fmt: skip
    t0 = time.perf_counter()
    result = train(tuned, ft_task, finetune, recorder=recorder, eval_tasks=test_sets, description="fine-tune")
    ft_seconds = time.perf_counter() - t0
    acc_tuned = {k: accuracy(tuned, b) for k, b in batches.items()}
    save_model(
        tuned,
        out / "tuned",
        overwrite=True,
        metadata={
            "task": ft_task.describe(), "train_config": finetune.to_dict(), "final_metrics": result.final_metrics,
            "accuracy": acc_tuned, "wall_seconds": round(ft_seconds, 1), MADE_BY: DEMO_MARK,
        },  # fmt: skip
    )
    store = RunStore.open(store_path)
    diagnosis = None
    control = None
    if diagnose_pair:
        control = load_demo_control(backend) if finetune.steps == CONTROL_STEPS else None
        if control is not None:
            control.to(base.device)
        log("diagnosing (probing, pruning, revival, weight diff, attention, patching, generalization, new latent) ...")
        cache = out / "revival_cache"
        if control is not None:  # the shipped control's runs (other seeds or settings miss, and are made here)
            copy_missing(DEMO_CONTROL / "revival", cache)
        analyzers = demo_analyzers(finetune.steps, control=control, cache=cache)
        diagnosis = diagnose(
            base, tuned, capability=tasks["capability"], downstream=tasks["downstream_correlated"],
            downstream_free=tasks["downstream_uncorrelated"], analyzers=analyzers, store=store,
            seed=seed, eval_size=min(eval_size, DIAGNOSIS_EVAL_SIZE), progress=progress,
        )  # fmt: skip
        log(f"verdict: {diagnosis.verdict} (score {diagnosis.score:+.2f})")

    summary: dict[str, Any] = {
        MADE_BY: DEMO_MARK,
        "scenario": scenario,
        "seed": seed,
        "verdict": diagnosis.verdict if diagnosis else None,
        "verdict_note": diagnosis.reasons[0] if diagnosis else "diagnosis skipped (diagnose_pair=False)",
        "accuracy": {"base": acc_base, "tuned": acc_tuned},
        "test_sets": {k: t.describe() for k, t in test_sets.items()},
        "eval_size": eval_size,
        "base_model": {"source": base.metadata.get("source", "pretrained here"), "spec": base.spec.to_dict(), "backend": base.backend},
        "finetune": {**finetune.to_dict(), "task": ft_task.describe(), "wall_seconds": round(ft_seconds, 2)},
        "recording": {"store": str(store_path.name), "steps_recorded": len(store.array_steps(store.array_names[0])), "hooks": recorder.hooks, "every": 10},
        "weight_change": _weight_change(store),
        "revival_control": (None if diagnosis is None
                            else "none: revival had nothing to revive, so no control was trained"
                            if "steps_control" not in diagnosis["revival"].headline
                            else f"shipped: {DEMO_CONTROL.name} (make_demo_control: a fresh model trained {CONTROL_STEPS} steps on count b)"
                            if control is not None else f"made here: a fresh model trained {finetune.steps} steps on count b"),
        "diagnosis": diagnosis.to_dict() if diagnosis else None,
        "wall_seconds": None,
    }  # fmt: skip
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    summary["provenance"] = run_provenance(
        models={"base": base, "tuned": tuned}, started=started,
        seeds={"seed": seed, "fine-tuning data": finetune.seed, "test sets": 10_000 + seed, "probe batch": 20_000 + seed},
        call=describe_call("capwrap.run_demo", out=str(out), seed=seed, scenario=scenario, backend=backend,
                           pretrain=pretrain, finetune_steps=finetune_steps, eval_size=eval_size,
                           diagnose_pair=diagnose_pair, device=None if device is None else str(device)),
    )  # fmt: skip
    write_json_atomic(out / "summary.json", summary)
    _write_report(out / "report.html", summary, result.history, store, diagnosis, test_sets)
    log(f"wrote {out / 'summary.json'} and {out / 'report.html'}")
    return DemoResult(summary, base, tuned, store, out, diagnosis)


#: What a demo writes into its folder, beside its run store (``run/``) and revival cache.
DEMO_OUTPUTS = ("summary.json", "report.html", "tuned")
#: The metadata key, and its value, by which the demo marks what it writes (its tuned model, run store
#: and summary): what a later demo may remove from the folder.
MADE_BY, DEMO_MARK = "made_by", "capwrap.run_demo"


def _check_earlier_demo(out: Path) -> None:
    """Refuse ``out`` if a ``tuned/``, ``run/``, ``summary.json`` or ``report.html`` there is not an
    earlier demo's (:data:`DEMO_MARK`): the demo replaces them."""
    tuned, run, summary, report = (out / n for n in ("tuned", "run", "summary.json", "report.html"))
    foreign = [
        path for path, mine in (
            (tuned, lambda: _marked(_json_field(tuned / CAPWRAP_FILE, "metadata"))),
            (run, lambda: run.is_dir() and (not any(run.iterdir()) or _marked(_json_field(run / "meta.json", "user")))),
            (summary, lambda: _marked(read_json(summary))),
            (report, lambda: _marked(read_json(summary))),
        ) if path.exists() and (path.is_symlink() or not mine())
    ]  # fmt: skip
    if foreign:
        raise ConfigError(
            f"{foreign[0]} is not an output of an earlier `capwrap demo` (which marks what it writes since "
            "2026-12-07), and the demo would replace it; choose another --out, or move it"
        )


def _clear_earlier_demo(out: Path) -> None:
    """Remove an earlier demo's outputs from ``out`` (:func:`_check_earlier_demo` first), so that a demo
    stopped on the way never leaves them beside its own partial run."""
    _check_earlier_demo(out)
    for name in DEMO_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _json_field(path: Path, key: str) -> Any:
    doc = read_json(path)
    return doc.get(key) if isinstance(doc, dict) else None


def _marked(meta: Any) -> bool:
    return isinstance(meta, dict) and meta.get(MADE_BY) == DEMO_MARK


def demo_analyzers(
    finetune_steps: int, control: CapModel | None = None, cache: str | os.PathLike | None = None
) -> list[Analyzer]:
    """The demo's analyzers: the validation suite's (:func:`~capwrap.validation.suite_analyzers`:
    the samples and budgets the verdict rule was fitted with), with one reverse fine-tuning seed.
    Revival compares with ``control`` (default: one trained here for the fine-tuning budget, as
    ``control_steps``) and keeps the control's runs in ``cache``."""
    from capwrap.validation.runner import suite_analyzers

    return [
        dataclasses.replace(a, seeds=1, control_steps=finetune_steps) if isinstance(a, Revival) else a
        for a in suite_analyzers(control, cache)
    ]


def make_demo_control(base: CapModel, seed: int = 0) -> CapModel:
    """The demo's revival control: a fresh model of ``base``'s shape that never saw count ``a``,
    trained :data:`CONTROL_STEPS` steps on count ``b`` with C_Tr = 1 (what
    :class:`~capwrap.analyzers.Revival` builds by default). ``scripts/train_demo_base.py --control``
    ships it in :data:`DEMO_CONTROL`, so the demo does not train it on every run."""
    return never_had_it(base, demo_tasks()["downstream_correlated"], CONTROL_STEPS, seed)


def load_demo_control(backend: str | None = None) -> CapModel | None:
    """The shipped revival control (``None`` where the installed package lacks it)."""
    if not (DEMO_CONTROL / "model.safetensors").is_file():
        return None
    return load_model(str(DEMO_CONTROL), backend=backend)


def remove_capability(model: CapModel, seed: int = 0) -> None:
    """Re-initialize every transformer-block weight of ``model`` in place (the negative control):
    attention and MLP weights and norms take the values of a fresh model of the same shape;
    embeddings and unembedding stay."""
    fresh = build_model(model.spec, backend=model.backend, seed=50_000 + seed).weights()
    with torch.no_grad():
        for name, weight in model.weights().items():
            if name.startswith("blocks."):
                weight.copy_(fresh[name].to(weight.device))


def _weight_change(store: RunStore) -> dict[str, Any]:
    """Final change per attention / MLP layer, and the share of the change in the top 1% of neurons."""
    out: dict[str, Any] = {"total_relative": float(store.scalars()["weight_delta_rel"].dropna().iloc[-1])}
    comps = store.meta["components"]
    for kind in ("attn", "mlp"):
        if f"weight_delta.{kind}" in store.array_names:
            final = store.array(f"weight_delta.{kind}")[-1]
            out[kind] = {name: round(float(v), 5) for name, v in zip(comps[kind], final, strict=False)}
    if "weight_delta.neuron" in store.array_names:
        sq = store.array("weight_delta.neuron")[-1].double().pow(2)
        top = sq.sort(descending=True).values
        k = max(1, len(top) // 100)
        out["neuron_top1pct_share"] = round(float(top[:k].sum() / top.sum()), 4) if top.sum() > 0 else 0.0
    return out


def _write_report(
    path: Path,
    summary: dict[str, Any],
    history: pd.DataFrame,
    store: RunStore,
    diagnosis: Diagnosis | None,
    test_sets: dict[str, PCFGTask],
) -> None:
    title = "capwrap demo: fine-tuning a PCFG counter to count b"
    if summary["scenario"] == "removed":
        title += " — negative control (capability removed before fine-tuning)"
    report = Report(title, provenance=summary["provenance"])
    if diagnosis is None:
        report.add_text(None, "Verdict: not computed (diagnosis skipped)", css_class="verdict")
    else:
        diagnosis.add_verdict(report)
    names = {key: task.name for key, task in test_sets.items()}  # "count b, C_Te=1", not downstream_correlated
    table = pd.DataFrame(summary["accuracy"]).rename(index=names).rename_axis("test set")
    n = summary["eval_size"]
    report.add_text("Accuracy", f"Base and fine-tuned model on the capability (count a) and on count b with the "
                    f"spurious correlation present (C_Te=1) and absent (C_Te=0), on {n:,} sequences each; the "
                    "error bars are 95% (Wilson) intervals."
                    + (f" The diagnosis above measures on its own evaluation set ({min(n, DIAGNOSIS_EVAL_SIZE):,} "
                       "sequences per test set, another draw), so the accuracies its reasons cite differ from these "
                       "by sampling." if diagnosis is not None else ""))  # fmt: skip
    report.add_table(table, float_format="{:.1%}")
    fig = go.Figure()
    for model in table.columns:
        low, high = zip(*(proportion_interval(acc, n) for acc in table[model]), strict=True)
        acc = pd.DataFrame({"accuracy": table[model], "accuracy_low": low, "accuracy_high": high})
        fig.add_trace(
            go.Bar(name=f"{model} model", x=acc.index, y=acc["accuracy"], error_y=error_bars(acc, "accuracy"))
        )
    fig.update_layout(barmode="group", xaxis_title="test set", yaxis=dict(title="accuracy", range=[0, 1.05], tickformat=".0%"),
                      height=380, legend_title_text="model")  # fmt: skip
    report.add_figure(fig)

    report.add_text("Fine-tuning", "Loss and test accuracy during fine-tuning.")
    fig = go.Figure(go.Scatter(x=history.index, y=history["loss"], name="training loss"))
    for col in [c for c in history.columns if c.startswith("acc/")]:
        pts = history[col].dropna()
        name = names.get(col.removeprefix("acc/"), col.removeprefix("acc/"))
        fig.add_trace(go.Scatter(x=pts.index, y=pts, name=f"accuracy: {name}", yaxis="y2", mode="lines+markers"))
    fig.update_layout(
        xaxis_title="fine-tuning step", yaxis_title="loss", height=400, legend=dict(x=1.08),
        yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[-0.02, 1.02], tickformat=".0%"),
    )  # fmt: skip
    report.add_figure(fig)

    comps = store.meta["components"]
    steps = store.array_steps("weight_delta.attn")
    report.add_text(
        "Where the weights moved", "Norm of each layer's weight change against the base model, per recorded step."
    )
    fig = go.Figure()
    for kind, label in (("attn", "attention"), ("mlp", "MLP")):
        arr = store.array(f"weight_delta.{kind}")
        for i, name in enumerate(comps[kind]):
            fig.add_trace(go.Scatter(x=steps, y=arr[:, i].numpy(), name=f"{label} {name.split('.')[0]}"))
    fig.update_layout(xaxis_title="fine-tuning step", yaxis_title="‖ΔW‖ (Frobenius norm)", height=400,
                      legend_title_text="layer")  # fmt: skip
    report.add_figure(fig)
    rec = summary["recording"]
    report.add_text(
        "Run",
        f"Fine-tuned for {summary['finetune']['steps']} steps at lr {summary['finetune']['lr']:g} in "
        f"{summary['finetune']['wall_seconds']:.0f} s. The store '{rec['store']}/' holds {rec['steps_recorded']} "
        f"recordings (every {rec['every']} steps) of {', '.join(rec['hooks'])} on a 256-sequence probe batch; "
        "open it with capwrap.RunStore.open.",
    )
    if diagnosis is not None:
        diagnosis.add_evidence(report)
    report.write(path)
