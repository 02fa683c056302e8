"""Running the suite: one scenario at a time in worker processes (or Ray tasks), resumable.

Each scenario's result is a JSON *record* written atomically to ``OUT/scenarios/``: the scenario,
the evaluation set's accuracies and gates, each analyzer's statistic with its bootstrap replicates,
the findings, and the library versions that made them (:func:`~capwrap.provenance.environment`). A finished scenario is never rerun (delete its record to redo it). Records keep
everything the verdict rule reads, so a rule can be refitted or perturbed without running a model
(:func:`findings_from_record`).

Workers are the standard library's process pool (``spawn``), one torch thread each by default; with
``ray_address`` the same function runs as Ray tasks on a cluster (the ``ray`` extra) — capwrap does
not schedule anything itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capwrap.analyzers import (
    Analyzer,
    AttentionComparison,
    Evidence,
    Generalization,
    NewLatentProbing,
    Patching,
    Probing,
    Pruning,
    Revival,
    WeightDiff,
)
from capwrap.analyzers.bootstrap import LEVEL, check_n_boot, min_replicates
from capwrap.diagnosis.rule import Finding, VerdictRule, default_rule
from capwrap.diagnosis.run import Memory, check_memory, diagnose, gates
from capwrap.errors import CapwrapError, ConfigError, whole_number
from capwrap.files import check_output_folder, copy_missing, write_json_atomic
from capwrap.provenance import environment
from capwrap.validation.bases import SUITE_ASSETS
from capwrap.validation.scenarios import Scenario, record_truth

__all__ = ["findings_from_record", "record_path", "run_scenario", "run_suite", "suite_analyzers", "load_records"]

#: Fine-tuning budget of the revival control (the scenarios' fine-tuning budget).
CONTROL_STEPS = 300
#: Sequences per test set of each scenario's evaluation set.
EVAL_SIZE = 512


def suite_analyzers(
    control: Any = None, cache: str | os.PathLike | None = None, compiled: bool = False, memory: Memory = "normal"
) -> list[Analyzer]:
    """The analyzers the suite runs: :func:`~capwrap.diagnosis.default_analyzers`, with samples and
    budgets sized for the suite's small models (the revival control given, its runs cached).
    ``compiled``: a Tracr model, pruned by single weights as the paper does (its MLPs have a
    handful of neurons). ``memory="low"``: revival trains as a low-memory diagnosis's does
    (``Revival(low_memory=True)``)."""
    check_memory(memory)
    return [
        Probing(n=1024, steps=200),
        Pruning(ks=(0, 1, 2, 5, 10, 25), score_size=256, granularity="weight" if compiled else "neuron"),
        Revival(max_steps=200, check_size=256, control=control, seeds=2, cache=None if cache is None else str(cache),
                low_memory=memory == "low"),
        WeightDiff(graft_fractions=(0.01, 0.1)),
        AttentionComparison(n=256),
        Patching(n=128),
        Generalization(),
        NewLatentProbing(n=1024, steps=200),
    ]


def record_path(out: str | os.PathLike, scenario: Scenario) -> Path:
    """Where a scenario's record lives in ``out``."""
    return Path(out) / "scenarios" / (scenario.name.replace("/", "__") + ".json")


def run_scenario(scenario: Scenario, cache: str | os.PathLike | None = None, rule: VerdictRule | None = None,
                 n_boot: int = 200, threads: int | None = None, memory: Memory = "normal") -> dict[str, Any]:  # fmt: skip
    """Make the scenario's tuned model and diagnose it (with ``memory``, as :func:`~capwrap.diagnose`
    takes it, and the analyzers a diagnosis of that memory mode runs); the record (see the module
    docstring)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _diagnose_scenario(scenario, cache, rule, n_boot, memory)
    finally:
        torch.set_num_threads(before)  # (run in the caller's process with one worker)


def _diagnose_scenario(scenario: Scenario, cache: str | os.PathLike | None, rule: VerdictRule | None, n_boot: int,
                       memory: Memory) -> dict[str, Any]:  # fmt: skip
    from capwrap.tasks.spec import task_from_spec
    from capwrap.validation.bases import load_base
    from capwrap.validation.build import make_control, make_tuned

    started = time.perf_counter()
    cache = Path(cache) if cache is not None else None
    base = load_base(scenario.base)
    capability = task_from_spec(scenario.capability, model=base)
    downstream = task_from_spec(scenario.downstream, model=base)
    tuned, made = make_tuned(scenario, base, capability, cache)
    built = time.perf_counter() - started
    control = make_control(
        base, downstream, CONTROL_STEPS, seed=0, cache=cache
    )  # shared by scenarios of one base and task
    # one diagnosis seed for the whole suite: scenarios sharing a base share evaluation sequences and
    # the revival control's runs (cached); the scenarios' own seeds vary their fine-tuning
    analyzers = suite_analyzers(control, cache, compiled=base.spec.compiled, memory=memory)
    diagnosis = diagnose(base, tuned, capability, downstream, analyzers=analyzers,
                         eval_size=EVAL_SIZE, seed=0, progress=False, rule=rule, n_boot=n_boot, memory=memory)  # fmt: skip
    rule = rule or default_rule()
    record = {
        "scenario": scenario.to_dict(),
        "made": made,
        "accuracy": diagnosis.accuracy,
        "capability_floor": capability.capability_floor,
        "evidence": [_evidence_record(e) for e in diagnosis.evidence],
        "findings": {f.question: f.to_dict() for f in diagnosis.findings},
        "seconds": {
            "build": round(built, 1),
            "diagnose": round(time.perf_counter() - started - built, 1),
            "analyzers": diagnosis.seconds,
        },  # fmt: skip
        "n_boot": n_boot,
        "memory": memory,
        # the software moves the numbers: records made with other library versions gave anchors up to
        # 0.05 apart (which library, or which change, is not settled); "made" says what made the model
        "environment": environment(),
    }
    record["truth"] = record_truth(record, rule)
    return record


def _evidence_record(e: Evidence) -> dict[str, Any]:
    def num(v: float) -> float | None:
        return round(float(v), 5) if math.isfinite(float(v)) else None

    return {
        "analyzer": e.analyzer, "question": e.question, "kind": e.kind, "statistic": e.statistic,
        "value": num(e.value), "replicates": [num(v) for v in e.replicates], "summary": e.summary,
        "direction": e.direction, "strength": round(e.strength, 4),
        "headline": {k: num(v) if isinstance(v, (int, float)) else v for k, v in e.headline.items()},
    }  # fmt: skip


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while processes start (they inherit it: Python then installs no Ctrl-C handler of
    its own, so a worker stopped while still importing prints no traceback)."""
    try:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to set
        yield
        return
    try:
        yield
    finally:
        if before is not None:  # (None: a handler set outside Python, which cannot be put back from here)
            signal.signal(signal.SIGINT, before)


def _stop_workers(workers: list[Any], settle: float = 2.0, grace: float = 5.0) -> None:
    """Stop a pool's ``workers`` once no new work reaches them: those a terminal's Ctrl-C already
    reached exit within ``settle`` seconds; the others (a SIGTERM to this process alone) get SIGINT
    and stop as :func:`_stop_quietly` says; any still starting up after ``grace`` more get SIGTERM."""
    for deadline, action in ((settle, None), (grace, signal.SIGINT)):
        alive = [w for w in workers if w.is_alive()]
        if action is not None:
            for worker in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, action)
        end = time.monotonic() + deadline
        for worker in alive:
            worker.join(timeout=max(0.0, end - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.terminate()


def _stop_quietly() -> None:
    """A local worker stops on Ctrl-C (SIGINT) without a traceback, whether at work or waiting for
    one: ``SystemExit`` ends a waiting worker silently, and a scenario it was running writes nothing."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(130)

    signal.signal(signal.SIGINT, stop)


def _run_to_file(
    scenario: Scenario, out: str, cache: str | None, rule_dict: dict | None, n_boot: int, memory: Memory, threads: int
) -> str:
    """A local worker's job: run one scenario and write its record (or an error record) to ``out``."""
    try:
        record = _run_record(scenario, cache, rule_dict, n_boot, memory, threads)
    except Exception as exc:  # noqa: BLE001 - reported per scenario, the suite goes on
        _write_error(out, scenario, repr(exc), traceback.format_exc())
        raise
    _write_record(out, scenario, record)
    return scenario.name


def _run_record(
    scenario: Scenario, cache: str | None, rule_dict: dict | None, n_boot: int, memory: Memory, threads: int,
    seed_cache: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run one scenario and return its record. A Ray task returns it to the driver, which writes it
    (so the results folder needs to exist on the driver's machine only); ``seed_cache``: first copy
    the runs capwrap ships into ``cache`` (on another node of a cluster, the driver's copy is not there)."""
    rule = VerdictRule.from_dict(rule_dict) if rule_dict is not None else None
    if seed_cache and cache is not None:
        copy_missing(SUITE_ASSETS / "cache", cache)
    return run_scenario(scenario, cache, rule, n_boot, threads, memory)


def _write_record(out: str | os.PathLike, scenario: Scenario, record: dict[str, Any]) -> None:
    path = record_path(out, scenario)
    write_json_atomic(path, record)
    path.with_suffix(".error.json").unlink(missing_ok=True)


def _write_error(out: str | os.PathLike, scenario: Scenario, error: str, trace: str) -> None:
    write_json_atomic(record_path(out, scenario).with_suffix(".error.json"),
                      {"scenario": scenario.name, "error": error, "traceback": trace})  # fmt: skip


def run_suite(
    scenarios: Sequence[Scenario],
    out: str | os.PathLike,
    workers: int = 2,
    ray_address: str | None = None,
    cache: str | os.PathLike | None = None,
    rule: VerdictRule | None = None,
    n_boot: int = 200,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    memory: Memory = "normal",
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Run every scenario that has no record in ``out`` yet; return all their records.

    Args:
        scenarios: what to run (see :func:`~capwrap.validation.scenarios.scenarios`).
        out: the results folder (records go to ``out/scenarios``).
        workers: local worker processes.
        ray_address: run on a Ray cluster instead (``"local"`` starts one on this machine): one task
            of one CPU per scenario; records come back to this process and are written to ``out``
            here, so the nodes need no shared file system (each keeps its own ``cache``, at the same
            absolute path, and does not retrain what it holds).
        cache: where tuned models and revival controls are kept between runs (default ``out/cache``).
        rule: the verdict rule the records' findings use (default: the fitted rule).
        n_boot: bootstrap replicates.
        progress: a progress bar over scenarios.
        log: called with a line of text per finished or failed scenario.
        memory: each diagnosis's memory mode (``"low"``: the models take turns and revival trains
            in about one model's memory, see :func:`~capwrap.diagnose`); ``out`` must not hold
            records made in the other mode.
        threads: torch threads per scenario, locally and on Ray (default 1). Training and
            reductions on the CPU give other bits with another number of threads, so the records
            are the same whatever ``workers`` or the cluster only at a fixed number.

    Raises:
        CapwrapError: some scenarios failed (their records say why); the others are kept.
        ConfigError: bad arguments; ``out`` holds a record made from another definition of a
            scenario (the suite changed since), or records made with another memory mode, another
            ``n_boot`` or another number of ``threads``.
    """
    from tqdm.auto import tqdm

    if isinstance(scenarios, Scenario) or not all(isinstance(s, Scenario) for s in scenarios):
        raise ConfigError("scenarios must be a list of Scenario, e.g. capwrap.validation.scenarios('held-out')")
    workers, threads = (whole_number(v, name, minimum=1) for name, v in (("workers", workers), ("threads", threads)))
    n_boot = check_n_boot(n_boot, rule.level if rule is not None else LEVEL)
    check_memory(memory)
    out = check_output_folder(out)
    (out / "scenarios").mkdir(parents=True, exist_ok=True)
    cache = (Path(cache) if cache is not None else out / "cache").resolve()  # absolute: Ray nodes get the path
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"the cache {cache} is a file; name a folder (it is created if missing)")
    copy_missing(SUITE_ASSETS / "cache", cache)  # the shipped controls and their runs
    done = [s for s in scenarios if record_path(out, s).exists()]
    kept = load_records(out, done)
    if stale := [s.name for s, r in zip(done, kept, strict=True) if not _same_definition(s, r.get("scenario"))]:
        raise ConfigError(
            f"{out} holds records of {len(stale)} scenarios made from another definition of them ({stale[:3]}): the suite "
            "changed since they were made. Give another --out, or delete those records to run them again"
        )
    # a suite's records are all made alike: what changes their numbers must match the records kept
    # (option: this run's value, how a record says it, why it matters; records older than a field: its default)
    made_with = {
        "memory": (memory, lambda r: r.get("memory", "normal"), "a suite's records are all of one memory mode"),
        "n_boot": (n_boot, lambda r: r.get("n_boot", 200), "their findings' intervals come from that many replicates"),
        "threads": (threads, lambda r: r.get("environment", {}).get("torch_threads", 1),
                    "other threads give other bits, and the records are the same only at one number"),
    }  # fmt: skip
    for option, (value, recorded, why) in made_with.items():
        found = {recorded(r) for r in kept} - {value}
        if found:
            raise ConfigError(
                f"{out} holds records of diagnoses made with {option}={sorted(found, key=str)[0]!r}, not {value!r}; "
                f"give that {option} to go on with them, or another --out ({why})"
            )
    todo = [s for s in scenarios if s not in done]
    if len(todo) < len(scenarios):
        log(
            f"{len(scenarios) - len(todo)} of {len(scenarios)} scenarios already have records in {out}; running {len(todo)}"
        )
    args = (str(out), str(cache), None if rule is None else rule.to_dict(), n_boot, memory)
    failed: list[str] = []
    bar = tqdm(total=len(todo), desc="validate", disable=not progress)
    if todo and ray_address is not None:
        failed = _run_on_ray(todo, args, ray_address, bar, log, threads)
    elif todo and workers == 1:
        for s in todo:
            failed += _one(lambda s=s: _run_to_file(s, *args, threads), s.name, bar, log)
    elif todo:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_stop_quietly)
        others = set(active_children())  # processes of the caller's own, left alone
        try:
            with _sigint_ignored():  # the workers start with Ctrl-C ignored, until _stop_quietly takes it
                futures = {pool.submit(_run_to_file, s, *args, threads): s.name for s in todo}
            for future in as_completed(futures):
                failed += _one(future.result, futures[future], bar, log)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI makes it one): stop the workers too
            pool.shutdown(wait=False, cancel_futures=True)  # no new work; each worker exits after its current one
            # which Ctrl-C ends (a signal to this process alone would leave them running on); the pool's
            # workers are the children it added, found here so an interrupt while submitting finds them too
            _stop_workers([child for child in active_children() if child not in others])
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    if failed:
        raise CapwrapError(
            f"{len(failed)} scenarios failed ({', '.join(failed)}); see their .error.json in {out / 'scenarios'}"
        )
    return load_records(out, scenarios)


def _one(run: Callable[[], Any], name: str, bar: Any, log: Callable[[str], None]) -> list[str]:
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - reported, the suite goes on
        log(f"failed: {name}: {exc!r}")
        bar.update(1)
        return [name]
    log(f"done: {name}")
    bar.update(1)
    return []


def _same_definition(scenario: Scenario, recorded: Any) -> bool:
    """Whether a record's scenario is ``scenario`` as the suite defines it now (fields a record made
    before they existed lacks take their defaults)."""
    try:
        return Scenario.from_dict(recorded) == scenario
    except (TypeError, KeyError, ValueError):  # (ConfigError: a field the suite no longer accepts)
        return False


def _run_on_ray(
    todo: list[Scenario], args: tuple, address: str, bar: Any, log: Callable[[str], None], threads: int
) -> list[str]:
    """Each scenario a Ray task of one CPU; the records come back to this process, which writes them
    (the cluster's nodes need no shared file system; each keeps its own model cache)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("running on Ray needs the ray extra: pip install 'capwrap[ray]'") from None
    out, cache, rule_dict, n_boot, memory = args
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
    largest = max((node.get("Resources", {}).get("CPU", 0) for node in getattr(ray, "nodes", list)()), default=None)
    if largest is not None and threads > largest:
        raise ConfigError(
            f"each scenario asks for {threads} CPUs (--threads) but the cluster's largest node has {largest:g}: its "
            "tasks could never start; pass --threads at most that"
        )
    remote = ray.remote(num_cpus=threads)(_run_record)
    pending = {remote.remote(s, cache, rule_dict, n_boot, memory, threads, True): s for s in todo}
    failed = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        scenario = pending.pop(done[0])

        def finish(ref: Any = done[0], scenario: Scenario = scenario) -> None:
            try:
                record = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported per scenario, the suite goes on
                _write_error(out, scenario, repr(exc), str(exc))
                raise
            _write_record(out, scenario, record)

        failed += _one(finish, scenario.name, bar, log)
    return failed


def load_records(out: str | os.PathLike, scenarios: Sequence[Scenario] | None = None) -> list[dict[str, Any]]:
    """The records in ``out`` (of ``scenarios`` only, in their order, when given)."""
    folder = Path(out) / "scenarios"
    if scenarios is None:
        paths = [p for p in sorted(folder.glob("*.json")) if not p.name.endswith(".error.json")]
    else:
        paths = [record_path(out, s) for s in scenarios if record_path(out, s).exists()]
    return [_read_record(p) for p in paths]


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"the scenario record {path} is corrupt ({exc}); delete it, and the next run measures that scenario again"
        ) from None
    if not isinstance(record, dict):
        raise ConfigError(f"the scenario record {path} holds no record; delete it, and the next run measures it again")
    return record


def findings_from_record(record: dict[str, Any], rule: VerdictRule) -> dict[str, Finding]:
    """Both findings of a record under ``rule`` (the evidence re-judged, the gates re-decided)."""
    evidence = []
    for e in record["evidence"]:
        reps = np.array([np.nan if v is None else v for v in e["replicates"]], dtype=np.float64)
        ev = Evidence(e["analyzer"], dict(e.get("headline", {})), pd.DataFrame(), kind=e["kind"], question=e["question"],
                      statistic=e["statistic"], value=np.nan if e["value"] is None else e["value"], replicates=reps,
                      summary=e["summary"])  # fmt: skip
        if ev.statistic is None:
            ev.direction, ev.strength = e["direction"], e["strength"]
        evidence.append(rule.judge(ev))
    reasons = gates(rule, record["accuracy"], record["capability_floor"])
    n_boot = int(record.get("n_boot", 200))
    if n_boot < (least := min_replicates(rule.level)):
        raise ConfigError(
            f"the record of {record['scenario']['name']} holds {n_boot} bootstrap replicates, too few for the rule's "
            f"{rule.level:.0%} intervals (at least {least}); run the scenario again with n_boot >= {least} (capwrap "
            "validate --n-boot) into another results folder"
        )
    return {q: rule.weigh(q, evidence, reasons[q], n_boot=n_boot) for q in ("deletion", "creation")}
