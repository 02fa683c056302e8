"""`diagnose()` and what it needs, one job per module: the verdict rule (:mod:`~capwrap.diagnosis.rule`),
running the analyzers (:mod:`~capwrap.diagnosis.run`), the result and its report
(:mod:`~capwrap.diagnosis.result`), the finished evidence an interrupted diagnosis resumes from
(:mod:`~capwrap.diagnosis.evidence_folder`), and checkpoints plus task specs, as the CLI gives them
(:mod:`~capwrap.diagnosis.checkpoints`)."""

from capwrap.analyzers.base import check_same_tokenizer
from capwrap.diagnosis.checkpoints import diagnose_checkpoints
from capwrap.diagnosis.result import Diagnosis
from capwrap.diagnosis.rule import Anchor, Finding, QuestionRule, Verdict, VerdictRule, default_rule
from capwrap.diagnosis.run import default_analyzers, diagnose, gates

__all__ = [
    "Anchor",
    "Diagnosis",
    "Finding",
    "QuestionRule",
    "Verdict",
    "VerdictRule",
    "check_same_tokenizer",
    "default_analyzers",
    "default_rule",
    "diagnose",
    "diagnose_checkpoints",
    "gates",
]
