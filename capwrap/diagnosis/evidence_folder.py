"""A diagnosis that survives: each finished analyzer's evidence kept in a folder, read back on a rerun.

A diagnosis of a large pair runs for hours (a day for a 1.1B pair on a laptop CPU: revival's
reverse fine-tuning alone takes most of it). With ``diagnose(..., evidence_dir=DIR)`` (and
``capwrap diagnose ... --out OUT``, which keeps them in ``OUT/evidence``) every analyzer that
finishes writes its evidence there; a later call with the same folder reads back what is there
and runs only the rest. Its numbers are those an uninterrupted run gives: every analyzer derives
its randomness from the diagnosis's seed and its own name, never from what ran before it.

What the evidence belongs to is written once, in ``DIR/diagnosis.json``: both models' weights
(:func:`~capwrap.provenance.weights_sha256`), the tasks, the evaluation set's size and seed, the
bootstrap, the verdict rule and capwrap's version; each evidence file adds its analyzer's class
and settings. A call that differs in any of them is refused, naming what differs, rather than
mixing two diagnoses' evidence.

A folder that holds no evidence yet (a run stopped before its first analyzer finished) is taken
over by the next diagnosis, whatever it is.

Examples:
    >>> import tempfile, pandas as pd
    >>> from capwrap.analyzers import Evidence, Generalization
    >>> folder = EvidenceFolder.open(tempfile.mkdtemp(), {"seed": 0})
    >>> folder.write(Generalization(), Evidence("generalization", {}, pd.DataFrame()), seconds=1.5)
    >>> evidence, seconds = folder.read(Generalization())
    >>> evidence.analyzer, seconds
    ('generalization', 1.5)
    >>> EvidenceFolder.open(folder.path, {"seed": 1})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    capwrap.errors.ConfigError: ... holds the evidence of another diagnosis: seed differs (0 there, 1 here); ...
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capwrap.analyzers.evidence_file import read_evidence, write_evidence
from capwrap.errors import ConfigError
from capwrap.files import write_json_atomic

if TYPE_CHECKING:
    from capwrap.analyzers.base import Analyzer, Evidence

__all__ = ["EvidenceFolder", "analyzer_identity"]

IDENTITY_FILE = "diagnosis.json"
SUFFIX = ".evidence"


def analyzer_identity(analyzer: Analyzer) -> dict[str, Any]:
    """What makes one analyzer's evidence: its class and its settings (JSON values)."""
    cls = type(analyzer)
    settings = json.loads(json.dumps(analyzer.settings(), default=_stable))
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "settings": settings}


def _stable(value: Any) -> Any:
    """A setting that is not JSON as text that is the same in every run (a path as itself; an object
    whose text names its address by its type)."""
    if isinstance(value, numbers.Number):  # numpy's
        return float(value)
    text = str(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


@dataclass(frozen=True)
class EvidenceFolder:
    """The folder of one diagnosis's finished evidence (see the module's docstring).

    Attributes:
        path: the folder.
        identity: what the evidence belongs to (JSON values).
    """

    path: Path
    identity: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike, identity: dict[str, Any]) -> EvidenceFolder:
        """The folder at ``path`` for a diagnosis of ``identity``: made if missing; refused if it
        holds another diagnosis's evidence.

        Raises:
            ConfigError: ``path`` is a file, or its ``diagnosis.json`` differs from ``identity``.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"the evidence folder {path} is a file; choose a folder (it is created if missing)")
        identity = json.loads(json.dumps(identity))  # as it reads back (tuples become lists)
        record = path / IDENTITY_FILE
        held = None
        if record.is_file():
            try:
                held = json.loads(record.read_text())
            except (OSError, ValueError):
                held = "unreadable"
        if held != identity:
            if held is not None and any(path.glob(f"*{SUFFIX}")):  # evidence to keep: never mixed with another's
                raise ConfigError(
                    f"{path} holds the evidence of another diagnosis: {_differences(held, identity)}; delete the "
                    "folder to start afresh, or choose another one (capwrap diagnose: another --out)"
                )
            path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(record, identity)
        return cls(path, identity)

    def file(self, analyzer: Analyzer) -> Path:
        """Where ``analyzer``'s evidence goes."""
        return self.path / f"{analyzer.name}{SUFFIX}"

    def read(self, analyzer: Analyzer) -> tuple[Evidence, float] | None:
        """``analyzer``'s evidence and the seconds it took, when the folder holds them; ``None``
        when it does not yet.

        Raises:
            ConfigError: the file there was made by an analyzer of another class or other settings.
        """
        path = self.file(analyzer)
        if not path.is_file():
            return None
        evidence, extra = read_evidence(path)
        if extra.get("diagnosis") != self.digest:  # a file from another diagnosis's folder, moved here
            raise ConfigError(f"{path} holds evidence of another diagnosis than {self.path / IDENTITY_FILE} "
                              "records; delete that file to measure it again")  # fmt: skip
        held, wanted = extra.get("analyzer"), analyzer_identity(analyzer)
        if held != wanted:
            raise ConfigError(
                f"{path} holds the evidence of {analyzer.name!r} measured with other settings: "
                f"{_differences(held, wanted)}; delete that file to measure it again with these"
            )
        return evidence, float(extra.get("seconds", float("nan")))

    def write(self, analyzer: Analyzer, evidence: Evidence, seconds: float) -> None:
        """Keep ``analyzer``'s evidence (atomically)."""
        extra = {"diagnosis": self.digest, "analyzer": analyzer_identity(analyzer), "seconds": seconds}
        write_evidence(evidence, self.file(analyzer), extra=extra)

    @property
    def digest(self) -> str:
        """SHA-256 of the identity: each evidence file carries it, so that a file can be matched to its diagnosis."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()


def _differences(held: Any, wanted: dict[str, Any], prefix: str = "") -> str:
    """The fields that differ, as ``name differs (THERE there, HERE here)``, nested names dotted."""
    if not isinstance(held, dict):
        return "its record cannot be read"
    parts = []
    for key in sorted(set(held) | set(wanted), key=lambda k: (k.endswith("sha256"), k)):  # digests last
        a, b = held.get(key, "nothing"), wanted.get(key, "nothing")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(_differences(a, b, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key} differs ({_short(a)} there, {_short(b)} here)")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
