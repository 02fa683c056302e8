"""Tasks from one-line specs, for the command line: ``key=value`` pairs separated by commas.

* PCFG: ``pcfg=count,operand=a`` · ``pcfg=count,operand=b,correlation=1`` (count(b) = count(a) + 1
  in every sequence) · ``pcfg=index,operand=c,correlation=1,source=b,offset=2`` · ``pcfg=index,operand=c``
  (keys: ``pcfg`` (the family), ``operand``, ``prior``, ``correlation``, ``source``, ``offset``,
  ``length``, ``window``, ``occurrence``);
* text: ``text=PATH_OR_HUB_NAME,feature=word:Lily`` (the capability: writing the feature where
  stories mention it) · ``text=PATH,without=word:Lily`` (the filtering protocol: language modeling
  on the texts without the feature) · ``text=PATH`` (language modeling); further keys ``field``,
  ``split``, ``limit``, ``seq_len``, ``relabel=word:Lily->Max`` (the relabeling protocol);
* Tracr (the program's vocabularies come from the model, a checkpoint saved from
  :meth:`~capwrap.tasks.tracr.CompiledProgram.to_model`): ``tracr=counter,operand=b,correlation=1``
  (keys ``operand``, ``correlation``, ``source``, ``offset``, ``length``) ·
  ``tracr=max_identifier,rank=4,correlation=1,source_rank=5,shift=1`` (keys ``rank``,
  ``correlation``, ``source_rank``, ``shift``, ``length``).

Examples:
    >>> task_from_spec("pcfg=count,operand=b,correlation=1").name
    'count b C=1'
    >>> task_from_spec("pcfg=count,operand=q")
    Traceback (most recent call last):
    ...
    capwrap.errors.ConfigError: task spec 'pcfg=count,operand=q': operand must be one of ['a', 'b', 'c'], got 'q'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from capwrap.errors import ConfigError
from capwrap.tasks.base import Task
from capwrap.tasks.pcfg import PRIORS, PCFGConfig, PCFGTask

__all__ = ["check_spec", "parse_spec", "task_from_spec", "spec_help", "SPEC_EXAMPLES"]

_PCFG_KEYS = {"pcfg", "operand", "prior", "correlation", "source", "offset", "length", "window", "occurrence", "name"}
_TEXT_KEYS = {"text", "feature", "without", "relabel", "field", "split", "limit", "seq_len", "name"}
_TRACR_KEYS = {
    "counter": {"tracr", "operand", "correlation", "source", "offset", "length"},
    "max_identifier": {"tracr", "rank", "correlation", "source_rank", "shift", "length"},
}


def parse_spec(spec: str) -> dict[str, str]:
    r"""``a=1,b=2`` → ``{"a": "1", "b": "2"}``; a comma inside a value is written ``\,``.

    Examples:
        >>> parse_spec(r"text=stories.txt,feature=regex:a{1\,3}")
        {'text': 'stories.txt', 'feature': 'regex:a{1,3}'}
    """
    out: dict[str, str] = {}
    parts = (p.replace("\\,", ",").strip() for p in re.split(r"(?<!\\),", spec))
    for part in filter(None, parts):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            last = next(reversed(out), None)  # the key before: the comma may have been inside its value
            hint = f"; if it belongs to {last}=, write its comma as \\, (e.g. {last}={out[last]}\\,{part})" if last and not sep else ""
            raise ConfigError(f"task spec {spec!r}: {part!r} is not key=value (e.g. pcfg=count,operand=a){hint}")
        if key.strip() in out:
            raise ConfigError(f"task spec {spec!r} gives {key.strip()!r} twice; give each key once")
        out[key.strip()] = value.strip()
    if not out:
        raise ConfigError("empty task spec; e.g. pcfg=count,operand=a or text=stories.txt,feature=word:Lily")
    return out


def task_from_spec(spec: str, tokenizer: Any = None, model: Any = None) -> Task:
    """The task a spec describes (text tasks need the model's ``tokenizer``, Tracr tasks the
    compiled ``model`` itself).

    Raises:
        ConfigError: an unknown key or kind, a bad value, a text task without a tokenizer, a Tracr
            task without a compiled model.
    """
    keys = check_spec(spec)
    try:
        if "pcfg" in keys:
            return _pcfg(keys)
        if "text" in keys:
            return _text(keys, tokenizer, model)
        return _tracr(keys, model)
    except ConfigError as err:
        raise ConfigError(f"task spec {spec!r}: {err}") from None


def check_spec(spec: str) -> dict[str, str]:
    """A spec's keys, checked as far as they can be without building the task (no model, no data):
    the key=value form, a task kind, the kind's keys. ``capwrap diagnose`` checks its specs so before
    it loads any model.

    Raises:
        ConfigError: what :func:`task_from_spec` would say of the spec's form.
    """
    keys = parse_spec(spec)
    kind = next((k for k in ("pcfg", "text", "tracr") if k in keys), None)
    if kind is None:
        raise ConfigError(
            f"task spec {spec!r} names no task kind; start it with pcfg=FAMILY, text=PATH_OR_HUB_NAME or tracr=PROGRAM"
        )
    if not keys[kind]:
        raise ConfigError(f"task spec {spec!r}: {kind}= is empty; e.g. {SPEC_EXAMPLES[kind][0]}")
    # a Tracr program's keys: once it is known (an unknown one is named when the task is built)
    allowed = {"pcfg": _PCFG_KEYS, "text": _TEXT_KEYS}.get(kind) or _TRACR_KEYS.get(keys["tracr"], set(keys))
    try:
        _check_keys(keys, allowed)
        if kind == "pcfg":  # a PCFG task needs no model or data: every value is checked by building it
            _pcfg(keys)
    except ConfigError as err:
        raise ConfigError(f"task spec {spec!r}: {err}") from None
    return keys


def _check_keys(keys: dict[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; this kind takes {sorted(allowed)}")


def _number(keys: dict[str, str], key: str, kind: type) -> Any:
    try:
        return kind(keys[key])
    except ValueError:
        raise ConfigError(f"{key}={keys[key]!r} is not a {kind.__name__}") from None


def _pcfg(keys: dict[str, str]) -> PCFGTask:
    _check_keys(keys, _PCFG_KEYS)
    config = PCFGConfig(**{k: _number(keys, k, int) for k in ("length", "window", "occurrence") if k in keys})
    correlation = _number(keys, "correlation", float) if "correlation" in keys else None
    prior: Any = keys.get("prior")
    if prior is not None and "/" in prior:
        try:
            prior = tuple(float(p) for p in prior.split("/"))
        except ValueError:
            raise ConfigError(f"prior={keys['prior']!r} is not 3 probabilities over a/b/c, e.g. prior=0.999/0.001/0") from None
    elif prior is not None and prior not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r}; choose from {sorted(PRIORS)} or give 3 probabilities over a/b/c, "
                          "e.g. prior=0.999/0.001/0")  # fmt: skip
    if correlation is None and ({"source", "offset"} & keys.keys()):
        raise ConfigError("source= and offset= shape the correlation a task plants; give correlation= too (e.g. "
                          "correlation=1), or leave them out")  # fmt: skip
    operand = keys.get("operand")  # (with prior= too: PCFGTask says to give one)
    planted = {"source": keys.get("source", "a"), "offset": _number(keys, "offset", int) if "offset" in keys else 1}
    return PCFGTask(keys["pcfg"], operand, prior=prior, correlation=correlation, config=config, name=keys.get("name"),
                    **planted)  # fmt: skip


def _text(keys: dict[str, str], tokenizer: Any, model: Any = None) -> Task:
    from capwrap.tasks.text import Feature, TextTask, filter_out, load_texts, relabel

    _check_keys(keys, _TEXT_KEYS)
    if tokenizer is None and getattr(getattr(model, "spec", None), "compiled", False):
        raise ConfigError(
            "a text task needs a tokenizer, and this model is a compiled Tracr program: it reads the "
            "program's own vocabulary, not text. Give it a Tracr task, e.g. tracr=counter,operand=a or "
            "tracr=max_identifier,rank=1"
        )
    if tokenizer is None:
        raise ConfigError(
            "a text task needs the model's tokenizer, and this model has none: its folder holds no readable "
            "tokenizer files; copy the base model's (tokenizer.json, tokenizer_config.json, ...) into it"
        )
    limit = _number(keys, "limit", int) if "limit" in keys else None
    if "split" in keys and Path(keys["text"]).expanduser().exists():
        raise ConfigError(
            f"split={keys['split']} picks a split of a hub dataset, but {keys['text']} is a local file or folder, "
            "read whole; leave split out, or point text= at the split's own file"
        )
    ds = load_texts(keys["text"], split=keys.get("split", "train"), field=keys.get("field", "text"), limit=limit)
    if "without" in keys:
        ds = filter_out(ds, keys["without"])
        if len(ds) == 0:
            raise ConfigError(f"every text contains {keys['without']}; nothing is left after filtering it out")
    if "relabel" in keys:
        old, arrow, new = keys["relabel"].partition("->")
        if not arrow:
            raise ConfigError("relabel takes FEATURE->REPLACEMENT, e.g. relabel=word:Lily->Max")
        ds = relabel(ds, Feature.parse(old), new)
    seq_len = _number(keys, "seq_len", int) if "seq_len" in keys else 128
    return TextTask(ds, tokenizer, seq_len=seq_len, feature=keys.get("feature"), name=keys.get("name"))


def _tracr(keys: dict[str, str], model: Any) -> Task:
    from capwrap.tasks.tracr import CompiledProgram, TracrCounterTask, TracrMaxIdentifierTask

    program_name = keys["tracr"]
    if program_name not in _TRACR_KEYS:
        raise ConfigError(f"unknown Tracr program {program_name!r}; choose from {sorted(_TRACR_KEYS)}")
    _check_keys(keys, _TRACR_KEYS[program_name])
    if model is None:
        raise ConfigError("a Tracr task needs the compiled model its vocabularies come from")
    program = CompiledProgram.from_model(model)
    if program.name != program_name:
        raise ConfigError(f"the model was compiled from the {program.name} program, not {program_name}")
    length = _number(keys, "length", int) if "length" in keys else None
    correlation = _number(keys, "correlation", float) if "correlation" in keys else None
    if program_name == "counter":
        offset = _number(keys, "offset", int) if "offset" in keys else 1
        return TracrCounterTask(program, keys.get("operand", "a"), correlation, length, keys.get("source", "a"), offset)
    numbers = {k: _number(keys, k, int) for k in ("rank", "source_rank", "shift") if k in keys}
    return TracrMaxIdentifierTask(program, length=length, correlation=correlation, **numbers)


#: Example specs of each task kind (the help text shows them; the tests parse every one).
SPEC_EXAMPLES = {
    "pcfg": ("pcfg=count,operand=a", "pcfg=count,operand=b,correlation=1", "pcfg=index,operand=c,length=24"),
    "text": ("text=stories.txt,feature=word:Lily", "text=stories.txt,without=word:Lily", "text=stories.txt"),
    "tracr": ("tracr=counter,operand=b,correlation=1", "tracr=max_identifier,rank=2,shift=1"),
}


def spec_help() -> str:
    """What task specs look like: the keys each kind takes, the feature kinds, examples.

    Built from the tables the parser itself checks, so it cannot go stale.

    Examples:
        >>> print(spec_help().splitlines()[0])
        task specs are key=value pairs separated by commas:
    """
    from capwrap.tasks.text import FEATURE_KINDS

    keys = {"pcfg": _PCFG_KEYS, "text": _TEXT_KEYS}
    keys |= {f"tracr={program}": allowed for program, allowed in _TRACR_KEYS.items()}
    lines = ["task specs are key=value pairs separated by commas:"]
    for kind, allowed in keys.items():
        family = kind.split("=")[0]
        lines.append(f"  {kind}: keys {', '.join(sorted(allowed, key=lambda k: (k != family, k)))}")
        lines += [f"    e.g. {example}" for example in SPEC_EXAMPLES[family] if example.startswith(kind)]
    lines.append("  a comma inside a value is written \\, (text=a\\,b.txt); a value that ends in a backslash takes a "
                 "space before the next comma")
    lines.append("features (feature=, without=, relabel=FEATURE->NEW):")
    lines += [f"  {example:<18} {meaning}" for example, meaning in FEATURE_KINDS.values()]
    return "\n".join(lines)
