"""Self-contained HTML reports: tables and plotly figures, readable offline (no CDN).

Examples:
    >>> import pandas as pd, plotly.express as px, tempfile, pathlib
    >>> report = Report("Demo")
    >>> report.add_text("Accuracies", "Base and tuned models on three test sets.")
    >>> report.add_table(pd.DataFrame({"base": [0.9], "tuned": [0.2]}, index=["count a"]))
    >>> report.add_figure(px.bar(x=["base", "tuned"], y=[0.9, 0.2]))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "report.html"
    >>> report.write(path)
    >>> text = path.read_text()
    >>> "Plotly.newPlot" in text and "<script src=" not in text  # the library is inline
    True
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from capwrap.files import write_text_atomic

__all__ = ["Report"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; color: #333; }
table { border-collapse: collapse; margin: .8em 0; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; }
th { background: #f3f3f3; }
.verdict { font-size: 1.3em; padding: .6em 1em; background: #f5f7ff; border-left: 5px solid #4056b4; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; }
"""


@dataclass
class Report:
    """An HTML report assembled from text, tables and plotly figures, in order."""

    title: str
    _parts: list[str] = field(default_factory=list, init=False, repr=False)

    def add_heading(self, text: str) -> None:
        """A section heading."""
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def add_text(self, heading: str | None, text: str, css_class: str | None = None) -> None:
        """A paragraph (plain text, escaped), under an optional heading."""
        if heading:
            self.add_heading(heading)
        cls = f' class="{css_class}"' if css_class else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def add_table(self, frame: pd.DataFrame, float_format: str = "{:.3f}") -> None:
        """A pandas table, floats formatted with ``float_format``."""
        self._parts.append(frame.to_html(float_format=float_format.format, border=0))

    def add_figure(self, figure: Any) -> None:
        """A plotly figure; its JavaScript library is included once, in the page itself."""
        self._parts.append(figure.to_html(full_html=False, include_plotlyjs=False))

    def add_code(self, text: str) -> None:
        """Preformatted text."""
        self._parts.append(f"<pre>{html.escape(text)}</pre>")

    def to_html(self) -> str:
        """The whole page, with plotly.js inlined once."""
        from plotly.offline import get_plotlyjs

        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{''.join(self._parts)}</body></html>"
        )

    def write(self, path: str | os.PathLike) -> None:
        """Write the report to ``path`` atomically."""
        write_text_atomic(path, self.to_html())
