"""Griffe extension for the capwrap docs: make Sphinx-flavoured Google docstrings render well.

capwrap's docstrings are Google style (as Sphinx's napoleon reads it), with three conventions Griffe
does not read as intended:

* roles such as ``:class:`CapModel``` or ``:func:`~capwrap.models.default_backend```, which
  Markdown would show as literal text. They become cross-references (``optional`` autorefs, so a
  name that is not documented renders as plain code instead of failing ``mkdocs build --strict``);
* an ``Example:`` heading, which Griffe reads as an admonition rather than an examples section, so
  its ``>>>`` lines would render as nested block quotes. It becomes ``Examples:``;
* ``#:`` comments above a module constant (``PRIORS``), which Griffe does not read as the
  constant's docstring. They become its docstring.

Griffe loads this file through ``plugins.mkdocstrings.handlers.python.options.extensions`` in
``mkdocs.yml``; nothing in the capwrap package depends on it.
"""

from __future__ import annotations

import html
import re
from typing import Any

from griffe import Alias, Attribute, Docstring, Extension, Module, Object

_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|obj|exc|const):`(?P<target>[^`]+)`")
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


def _lookup(root: Module, path: str) -> Object | Alias | None:
    parts = path.split(".")
    if parts[0] != root.name:
        return None
    obj: Any = root
    for part in parts[1:]:
        try:
            obj = obj.members[part]
        except (KeyError, AttributeError):
            return None
    return obj


def _canonical(obj: Object | Alias) -> str:
    try:
        return obj.final_target.path if isinstance(obj, Alias) else obj.path
    except Exception:  # noqa: BLE001 - an alias to something not loaded (torch, transformers ...)
        return obj.target_path if isinstance(obj, Alias) else obj.path


def _resolve(root: Module, scope: Object, target: str) -> str | None:
    """The canonical path of ``target`` as seen from ``scope``, or None when capwrap lacks it."""
    candidates = []
    node: Object | None = scope
    while node is not None:
        candidates.append(f"{node.path}.{target}")
        node = node.parent
    candidates.append(target)
    for path in candidates:
        found = _lookup(root, path)
        if found is not None:
            return _canonical(found)
    return None


def _rewrite(root: Module, obj: Object, text: str) -> str:
    def role(match: re.Match) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        if match["role"] in ("func", "meth"):
            shown += "()"
        title = f"<code>{html.escape(shown)}</code>"
        path = _resolve(root, obj, target)
        if path is None:
            return title
        return f'<autoref identifier="{html.escape(path)}" optional>{title}</autoref>'

    text = _EXAMPLE.sub(lambda m: f"{m['indent']}Examples:", text)
    return _ROLE.sub(role, text)


class CapwrapDocstrings(Extension):
    """Rewrite Sphinx roles, ``Example:`` headings and ``#:`` comments in every docstring of the package."""

    def on_package(self, *, pkg: Module, loader: Any = None, **kwargs: Any) -> None:
        self._loader = loader
        self._walk(pkg, pkg, set())

    def _comment_docstring(self, obj: Object) -> None:
        """Give a module attribute the ``#:`` comment lines right above it as its docstring."""
        if not isinstance(obj, Attribute) or obj.docstring is not None or not obj.lineno:
            return
        if not isinstance(obj.parent, Module):
            return
        lines = obj.parent.lines
        found: list[str] = []
        index = obj.lineno - 2  # the line above, 0-based
        while index >= 0 and lines[index].lstrip().startswith("#:"):
            found.insert(0, lines[index].lstrip()[2:].strip())
            index -= 1
        if found:
            obj.docstring = Docstring(
                "\n".join(found),
                lineno=index + 2,
                parent=obj,
                parser=getattr(self._loader, "docstring_parser", None),
                parser_options=getattr(self._loader, "docstring_options", None),
            )

    def _walk(self, root: Module, obj: Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        self._comment_docstring(obj)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(root, obj, obj.docstring.value)
        for member in obj.members.values():
            if not isinstance(member, Alias):
                self._walk(root, member, seen)
