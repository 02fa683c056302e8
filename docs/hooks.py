"""MkDocs hooks for the capwrap docs (loaded through ``hooks:`` in ``mkdocs.yml``; not a page).

``<!-- capwrap:support-table -->`` in a page becomes :func:`capwrap.models.support.support_table`:
the table of supported families is rendered from the registry when the site is built, so it
cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- capwrap:support-table -->"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from capwrap.models.support import support_table

    return markdown.replace(MARKER, support_table())
