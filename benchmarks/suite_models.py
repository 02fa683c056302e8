"""What the benchmarks that rerun an analyzer on suite scenarios share: the command line that names
the scenarios and the `capwrap validate` cache, and loading a scenario's models and tasks from it."""

from __future__ import annotations

import argparse
from pathlib import Path

from capwrap.models import CapModel, load_model
from capwrap.tasks.base import Task
from capwrap.tasks.spec import task_from_spec
from capwrap.validation import Scenario
from capwrap.validation.bases import load_base


def scenario_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the scenario names or patterns, ``--cache`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("scenarios", nargs="+", help="suite scenario names or glob patterns")
    parser.add_argument("--cache", type=Path, required=True, help="the validate run's cache folder")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def scenario_models(s: Scenario, cache: Path) -> tuple[CapModel, CapModel, Task, Task]:
    """The scenario's base, its tuned model from ``cache`` (where ``capwrap validate`` keeps it:
    ``CACHE/tuned/<key>``), its capability task and its downstream task."""
    base = load_base(s.base)
    tuned = load_model(cache / "tuned" / s.key(), backend=base.backend)
    return base, tuned, task_from_spec(s.capability, model=base), task_from_spec(s.downstream, model=base)
