"""What works on which family: the support table, rendered from the registry itself.

The documentation's family page (``docs/guide/families.md``) is this module's
:func:`support_table`, inserted when the site is built (``docs/hooks.py``), so it lists exactly
what :data:`~capwrap.models.families.FAMILIES` holds.

Examples:
    >>> rows = support_rows()
    >>> row = next(r for r in rows if r["architecture"] == "qwen2")
    >>> row["patching engine"], row["HookedTransformer (TL 3.x)"]
    ('fast (resumed)', 'yes')
    >>> print(support_table().splitlines()[0])
    | family | architecture | transformers class | what a block computes | its config can change | patching engine | HookedTransformer (TL 3.x) | TransformerBridge |
"""

from __future__ import annotations

from typing import Any

from capwrap.models.families import FAMILIES
from capwrap.models.spec import hooked_problems

__all__ = ["support_rows", "support_table"]

_GENERIC = {
    "family": "any other decoder TransformerLens's bridge runs",
    "architecture": "its `model_type`",
    "transformers class": "its `...ForCausalLM`",
    "what a block computes": "whatever transformers computes (capwrap does not model it)",
    "its config can change": "—",
    "patching engine": "hooks",
    "HookedTransformer (TL 3.x)": "no",
    "TransformerBridge": "yes: loading, hooks, weight diff, every hook-based analyzer (single heads and neurons where q/k/v/o and the MLP are plain linear layers)",
}


def support_rows() -> list[dict[str, Any]]:
    """One row per family (and one for the generic path): what it computes and where it runs."""
    rows = []
    for family in FAMILIES.values():
        problems = hooked_problems(family.features)
        rows.append(
            {
                "family": family.title,
                "architecture": family.name,
                "transformers class": family.hf_class or "none (compiled RASP program)",
                "what a block computes": family.features.describe(),
                "its config can change": ", ".join(sorted(family.configurable)) or "—",
                "patching engine": "fast (resumed)",
                "HookedTransformer (TL 3.x)": "yes" if not problems else "no: " + "; ".join(problems),
                "TransformerBridge": "yes" if family.hf_class else "yes (TransformerLens's native model)",
            }
        )
    return rows + [dict(_GENERIC)]


def support_table() -> str:
    """The rows as a Markdown table."""
    rows = support_rows()
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"`{row[c]}`" if c == "architecture" and row[c] in FAMILIES else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
