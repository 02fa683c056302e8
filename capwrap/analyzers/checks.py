"""The contract every analyzer keeps (as scikit-learn's ``check_estimator``): run it on a pair and
check what :func:`capwrap.diagnose` relies on.

Examples:
    >>> from capwrap.analyzers import AttentionComparison, ModelPair
    >>> from capwrap.models import ModelSpec, build_model
    >>> from capwrap.tasks import PCFGTask, PCFGConfig
    >>> task = PCFGTask(config=PCFGConfig(length=8, window=4))
    >>> spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=16, n_heads=2)
    >>> ev = check_analyzer(AttentionComparison(n=8), ModelPair(build_model(spec, seed=0), build_model(spec, seed=1)), task, task)
    >>> ev.statistic
    'attention_change'
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import get_args

from capwrap.analyzers.base import Analyzer, Evidence, Kind, ModelPair, Question
from capwrap.recording import RunStore
from capwrap.tasks.base import Task

__all__ = ["check_analyzer"]


def _fingerprint(pair: ModelPair) -> list[float]:
    return [float(w.detach().double().sum()) for m in (pair.base, pair.tuned) for w in m.weights().values()]


def _check_file_round_trip(ev: Evidence) -> None:
    """``ev`` written to an evidence file reads back equal: every field (NaN equal to NaN), the table
    with its dtypes, the replicates bit for bit and the same figure function."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from capwrap.analyzers.evidence_file import read_evidence, to_json_value, write_evidence

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{ev.analyzer}.evidence"
        write_evidence(ev, path)
        back, _ = read_evidence(path)
    for field in dataclasses.fields(Evidence):
        a, b = getattr(ev, field.name), getattr(back, field.name)
        if field.name == "table":
            same = a.equals(b) and a.dtypes.equals(b.dtypes)
        elif field.name == "replicates":
            same = np.array_equal(a, b, equal_nan=True)
        elif field.name == "plot":  # a module-level function (a lambda or closure cannot be named in a file)
            same = a is b
        else:  # JSON values; NaN written and read as NaN
            same = json.dumps(a, default=to_json_value) == json.dumps(b, default=to_json_value)
        assert same, f"{ev.analyzer}'s evidence does not survive a file: its {field.name} reads back different"


def check_analyzer(
    analyzer: Analyzer,
    pair: ModelPair,
    capability: Task,
    downstream: Task,
    store: RunStore | None = None,
    eval_size: int = 64,
) -> Evidence:
    """Run ``analyzer`` twice on the pair and check its contract; return the evidence.

    Checked: the class declares its ``kind``, ``question`` and ``statistic`` (its ``shows`` is
    checked when the class is defined, :meth:`Analyzer.__init_subclass__`); the evidence carries
    the three and the analyzer's name; its value is a number (NaN only
    with a ``summary`` saying why) with bootstrap replicates and an interval around it; the direction is the shipped rule's judgement of
    the value; it serializes to JSON and draws a figure; written to an evidence file it reads back
    equal, figure included (what lets an interrupted diagnosis resume); the same seed gives the same
    value; and the pair's weights are left as they were.

    Raises:
        AssertionError: naming the broken property.
    """
    from capwrap.diagnosis.rule import default_rule

    cls = type(analyzer)
    assert getattr(cls, "kind", None) in get_args(Kind), f"{cls.__name__}.kind must be one of {get_args(Kind)}"
    assert cls.question in get_args(Question), f"{cls.__name__}.question must be one of {get_args(Question)}"
    assert cls.statistic is None or isinstance(cls.statistic, str), f"{cls.__name__}.statistic must be a str or None"
    assert isinstance(analyzer.name, str) and analyzer.name, "an analyzer needs a non-empty name"
    json.dumps(analyzer.settings(), default=str)
    before = _fingerprint(pair)
    ev = analyzer(pair, capability, downstream, store, eval_size=eval_size, seed=0)
    assert _fingerprint(pair) == before, f"{analyzer.name} changed the models' weights"
    assert isinstance(ev, Evidence), f"{analyzer.name} must return Evidence, got {type(ev).__name__}"
    assert ev.analyzer == analyzer.name, f"evidence names {ev.analyzer!r}, the analyzer is {analyzer.name!r}"
    assert (ev.kind, ev.question, ev.statistic) == (cls.kind, cls.question, cls.statistic), (
        "evidence must carry the class's kind, question and statistic"
    )
    assert ev.summary and ev.reasons, (
        f"{analyzer.name} must say what it measured (summary) and why it points where it does"
    )
    if cls.statistic is not None:
        assert isinstance(ev.value, float), f"{analyzer.name}'s value must be a float, got {type(ev.value).__name__}"
        if math.isfinite(ev.value):
            assert len(ev.replicates) > 0, f"{analyzer.name} gave no bootstrap replicates"
            lo, hi = ev.intervals["value"]
            assert lo - 1e-6 <= ev.value <= hi + 1e-6, (
                f"{analyzer.name}'s interval [{lo}, {hi}] misses its value {ev.value}"
            )
        judged = default_rule().judge(copy.copy(ev))
        assert (judged.direction, judged.strength) == (ev.direction, ev.strength), (
            "direction must be the rule's judgement"
        )
    json.dumps(ev.to_dict(), allow_nan=False, default=str)
    assert ev.figure() is not None
    _check_file_round_trip(ev)
    again = analyzer(pair, capability, downstream, store, eval_size=eval_size, seed=0)
    same = (math.isnan(ev.value) and math.isnan(again.value)) or ev.value == again.value
    assert same, f"{analyzer.name} is not reproducible: {ev.value} then {again.value} with the same seed"
    return ev
