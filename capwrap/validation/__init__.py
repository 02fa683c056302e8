"""Validation: a suite of fine-tuning scenarios with known ground truth, the runner behind
``capwrap validate``, the verdict's measured accuracy, and the fit of the verdict rule.

Examples:
    >>> from capwrap.validation import scenarios
    >>> held_out = scenarios("held-out")
    >>> all(s.split == "held-out" for s in held_out) and len(held_out) > 20
    True
"""

from capwrap.validation.fit import cross_validate, fit_anchor, fit_rule, sensitivity
from capwrap.validation.results import ValidationResult, auc, score_records
from capwrap.validation.runner import findings_from_record, load_records, run_scenario, run_suite, suite_analyzers
from capwrap.validation.scenarios import BASES, SUITE, Recipe, Scenario, scenario, scenarios

__all__ = [
    "BASES",
    "Recipe",
    "SUITE",
    "Scenario",
    "ValidationResult",
    "auc",
    "cross_validate",
    "findings_from_record",
    "fit_anchor",
    "fit_rule",
    "load_records",
    "run_scenario",
    "run_suite",
    "scenario",
    "scenarios",
    "score_records",
    "sensitivity",
    "suite_analyzers",
]
