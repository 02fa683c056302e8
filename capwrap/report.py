"""Self-contained HTML reports: text, tables and plotly figures, readable offline (no CDN).

A report is something a researcher cites, so every one carries its provenance (what made it, from
which models, with which software, when: see :mod:`capwrap.provenance`) and renders what it is
given for people: column names in words, integers as integers, missing values as "–", no pandas
index, reasons as wrapped prose, figures only when they have data, user strings escaped.

Examples:
    >>> import pandas as pd, plotly.express as px, tempfile, pathlib
    >>> report = Report("Demo")
    >>> report.add_text("Accuracies", "Base and tuned models on three test sets.")
    >>> report.add_table(pd.DataFrame({"layer": [0.0, 3.0], "relative_change": [0.5, float("nan")]}))
    >>> report.add_figure(px.bar(x=["base", "tuned"], y=[0.9, 0.2]))
    True
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "report.html"
    >>> report.write(path)
    >>> text = path.read_text()
    >>> "Plotly.newPlot" in text and "<script src=" not in text  # the library is inline
    True
    >>> "<td>3</td>" in text and "<th>relative change</th>" in text and "Provenance" in text
    True
"""

from __future__ import annotations

import html
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from capwrap.files import write_text_atomic

__all__ = ["Report", "error_bars", "proportion_interval", "human_label", "signed_percent", "INTEGER_COLUMNS"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; color: #333; }
table { border-collapse: collapse; margin: .8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.verdict { font-size: 1.3em; padding: .6em 1em; background: #f5f7ff; border-left: 5px solid #4056b4; }
ul.reasons { padding-left: 1.4em; max-width: 60em; }
ul.reasons li { margin: .35em 0; overflow-wrap: anywhere; }
.made-with { color: #555; font-size: .92em; }
.note { color: #666; font-style: italic; }
table.provenance td { text-align: left; font-size: .9em; overflow-wrap: anywhere; max-width: 50em; }
table.provenance td:first-child { white-space: nowrap; color: #444; }
code { background: #f3f3f3; padding: 0 .25em; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; white-space: pre-wrap; }
"""

#: Column names whose whole-numbered values are counts or indices (shown as integers even when
#: every value is 0 or 1, and however pandas stored them: a NaN makes an int column float).
INTEGER_COLUMNS = ("layer", "head", "step", "k", "n", "neuron", "position", "seed", "rank", "index", "steps")


def signed_percent(share: float) -> str:
    """A change as a signed whole percentage, without the "-0%" a tiny loss rounds to.

    Examples:
        >>> signed_percent(0.126), signed_percent(-0.002), signed_percent(-0.02)
        ('+13%', '+0%', '-2%')
    """
    text = f"{share:+.0%}"
    return "+0%" if text == "-0%" else text


def human_label(key: Any) -> str:
    """A column or key for people: ``downstream_correlated`` → ``downstream correlated``."""
    return str(key).replace("_", " ").strip()


def proportion_interval(share: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``share`` measured on ``n`` trials (an accuracy
    on ``n`` sequences): it stays inside [0, 1] and is sensible at 0% and 100%.

    Examples:
        >>> lo, hi = proportion_interval(0.9, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.826, 0.945)
    """
    if n <= 0 or not math.isfinite(share):
        return (math.nan, math.nan)
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def error_bars(table: pd.DataFrame, column: str) -> dict[str, Any] | None:
    """Plotly ``error_y`` (or ``error_x``) for the values in ``column`` when ``table`` also holds
    their interval as ``<column>_low`` and ``<column>_high``; ``None`` (no bars) otherwise.

    This is the convention analyzers use to report per-row intervals in their tables; a figure
    passes ``error_y=error_bars(table, "probe_accuracy")`` and shows bars exactly when they exist.

    Examples:
        >>> t = pd.DataFrame({"acc": [0.5, 0.8], "acc_low": [0.4, 0.7], "acc_high": [0.55, 0.9]})
        >>> bars = error_bars(t, "acc")
        >>> [round(v, 2) for v in bars["array"]], [round(v, 2) for v in bars["arrayminus"]]
        ([0.05, 0.1], [0.1, 0.1])
        >>> error_bars(t, "other") is None
        True
    """
    low, high = f"{column}_low", f"{column}_high"
    if column not in table or low not in table or high not in table:
        return None
    value = table[column].astype(float)
    return {
        "type": "data",
        "symmetric": False,
        "array": (table[high].astype(float) - value).clip(lower=0).tolist(),
        "arrayminus": (value - table[low].astype(float)).clip(lower=0).tolist(),
        "thickness": 1.2,
    }


@dataclass
class Report:
    """An HTML report assembled from text, tables and plotly figures, in order.

    Attributes:
        title: the page's title (escaped).
        provenance: what the report came from (a record from :func:`capwrap.provenance.run_provenance`,
            or any JSON dict); the software versions, the command line and the date are filled in
            when missing, so every report has them.
    """

    title: str
    provenance: dict[str, Any] = field(default_factory=dict)
    _parts: list[str] = field(default_factory=list, init=False, repr=False)

    def add_heading(self, text: str) -> None:
        """A section heading."""
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def add_text(self, heading: str | None, text: str, css_class: str | None = None) -> None:
        """A paragraph (plain text, escaped), under an optional heading."""
        if heading:
            self.add_heading(heading)
        cls = f' class="{html.escape(css_class)}"' if css_class else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def add_list(self, heading: str | None, items: Sequence[str]) -> None:
        """Sentences as a bulleted list of wrapped prose (reasons, findings), escaped."""
        if heading:
            self.add_heading(heading)
        if items:
            self._parts.append('<ul class="reasons">' + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def add_table(
        self, frame: pd.DataFrame, float_format: str = "{:.3f}", labels: Mapping[str, str] | None = None
    ) -> None:
        """A table for people: a meaningful index becomes the first column (a default one is
        dropped), column names are put in words (``labels`` maps names to headers), whole-numbered
        columns show integers, missing values "–"; text is escaped."""
        self._parts.append(_table_html(frame, float_format, dict(labels or {})))

    def add_figure(self, figure: Any, empty_note: str | None = None) -> bool:
        """A plotly figure (its JavaScript library is included once, in the page itself). A figure
        without data is left out (with ``empty_note`` in its place, if given); returns whether the
        figure was added."""
        if not _has_data(figure):
            if empty_note:
                self._parts.append(f'<p class="note">{html.escape(empty_note)}</p>')
            return False
        _keep_legend_off_colorbars(figure)
        self._parts.append(figure.to_html(full_html=False, include_plotlyjs=False))
        return True

    def add_code(self, text: str) -> None:
        """Preformatted text (code, a command line); wrapped, never cut off."""
        self._parts.append(f"<pre>{html.escape(text)}</pre>")

    def to_html(self) -> str:
        """The whole page, with plotly.js inlined once and the provenance at the end."""
        from plotly.offline import get_plotlyjs

        record = _complete(self.provenance)
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{_made_with(record)}{''.join(self._parts)}"
            f"<h2>Provenance</h2>{_provenance_html(record)}</body></html>"
        )

    def write(self, path: str | os.PathLike) -> None:
        """Write the report to ``path`` atomically."""
        write_text_atomic(path, self.to_html())


# ---- tables ------------------------------------------------------------------------------------
def _table_html(frame: pd.DataFrame, float_format: str, labels: dict[str, str]) -> str:
    frame = frame.copy()
    if not (isinstance(frame.index, pd.RangeIndex) and frame.index.name is None):
        names = [n if n is not None else "" for n in frame.index.names]
        frame.index.names = names
        frame = frame.reset_index()
    shown = pd.DataFrame({i: _column_text(frame[c], str(c), float_format) for i, c in enumerate(frame.columns)})
    shown.columns = [labels.get(str(c), human_label(c)) for c in frame.columns]
    return shown.to_html(index=False, border=0, escape=True)


def _column_text(column: pd.Series, name: str, float_format: str) -> list[str]:
    """The cells of one column as text."""
    if column.dtype == bool:
        return [str(v) for v in column]
    numeric = pd.api.types.is_numeric_dtype(column)
    if not numeric:
        return ["–" if _missing(v) else _text(v, float_format) for v in column]
    values = column.astype(float).to_numpy()
    finite = values[np.isfinite(values)]
    whole = len(finite) > 0 and bool(np.all(finite == np.round(finite)))
    integer = pd.api.types.is_integer_dtype(column) or whole and (
        name.split("_")[-1] in INTEGER_COLUMNS or name in INTEGER_COLUMNS or bool(np.any(np.abs(finite) > 1))
    )
    return [_number(v, float_format, integer) for v in values]


def _number(value: float, float_format: str, integer: bool) -> str:
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{int(value):d}" if integer else float_format.format(value)


def _text(value: Any, float_format: str) -> str:
    if isinstance(value, float):
        return _number(value, float_format, False)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---- figures -----------------------------------------------------------------------------------
def _has_data(figure: Any) -> bool:
    """Whether any trace of ``figure`` has a value to draw (shapes and annotations alone are not data)."""
    for trace in getattr(figure, "data", ()):
        data = trace.to_plotly_json()
        if trace.type == "table":
            if data.get("cells", {}).get("values") is not None and len(data["cells"]["values"]):
                return True
            continue
        keys = [k for k in ("y", "z", "values", "r") if data.get(k) is not None] or ["x"]
        if any(_has_values(data.get(k)) for k in keys):
            return True
    return False


def _has_values(values: Any) -> bool:
    if values is None:
        return False
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):  # categories or ragged rows: data if there are any
        return len(values) > 0
    return array.size > 0 and bool(np.isfinite(array).any())


def _keep_legend_off_colorbars(figure: Any) -> None:
    """A figure with both a colour bar (a heatmap) and a legend: put the legend under the plot, where
    the colour bar cannot cover it."""
    bars = any(t.type in ("heatmap", "contour") and t.showscale is not False for t in figure.data)
    legend = (
        sum(
            1
            for t in figure.data
            if t.type not in ("heatmap", "contour", "table") and getattr(t, "showlegend", None) is not False
        )
        > 1
    )
    if bars and legend and figure.layout.legend.orientation is None:
        figure.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0))


# ---- provenance --------------------------------------------------------------------------------
def _complete(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with the software, command line and date filled in where it lacks them."""
    from capwrap.provenance import run_provenance

    defaults = run_provenance()
    return {**defaults, **{k: v for k, v in record.items() if v is not None or k not in defaults}}


_PROVENANCE_LABELS = {
    "capwrap": "capwrap", "transformer_lens": "TransformerLens", "torch": "torch", "transformers": "transformers",
    "python": "Python", "platform": "platform", "device": "device", "torch_threads": "torch threads",
    "command": "command", "call": "Python call", "date": "date (UTC)", "wall_seconds": "wall time (s)",
}  # fmt: skip


def _made_with(record: Mapping[str, Any]) -> str:
    software = ", ".join(
        f"{_PROVENANCE_LABELS[k]} {record[k]}" for k in ("capwrap", "transformer_lens", "torch") if record.get(k)
    )
    wall = f", in {record['wall_seconds']:.0f} s" if isinstance(record.get("wall_seconds"), int | float) else ""
    return (
        f'<p class="made-with">Made on {html.escape(str(record.get("date", "")))}{wall} by '
        f"<code>{html.escape(str(record.get('command', '')))}</code> with {html.escape(software)}. "
        "Full provenance at the end.</p>"
    )


def _provenance_html(record: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    for key, value in record.items():
        if value is None or value == {}:
            continue
        if key == "models":
            for name, model in value.items():
                rows += _model_rows(name, model)
        elif key == "seeds":
            rows.append(("seeds", ", ".join(f"{k} {v}" for k, v in value.items())))
        else:
            rows.append((_PROVENANCE_LABELS.get(key, human_label(key)), _plain(value)))
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="provenance">{cells}</table>'


def _model_rows(name: str, model: Mapping[str, Any]) -> list[tuple[str, str]]:
    spec = model.get("spec", {})
    shape = ", ".join(
        f"{label} {spec[key]}"
        for key, label in (
            ("n_layers", "layers"),
            ("d_model", "d_model"),
            ("n_heads", "heads"),
            ("d_mlp", "d_mlp"),
            ("d_vocab", "vocabulary"),
            ("n_ctx", "context"),
        )  # fmt: skip
        if key in spec
    )
    rows = [(f"{name} model", str(model.get("source", "")))]
    if model.get("revision"):
        rows.append((f"{name} revision", str(model["revision"])))
    rows.append(
        (f"{name} architecture", f"{model.get('architecture', '')} ({shape}), backend {model.get('backend', '')}")
    )
    if model.get("vocabulary"):
        from capwrap.models.vocabulary import VocabularyCut

        rows.append((f"{name} vocabulary", "compared on " + VocabularyCut.from_dict(model["vocabulary"]).describe()))
    if model.get("weights_sha256"):
        rows.append((f"{name} weights SHA-256", str(model["weights_sha256"])))
    return rows


def _plain(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    return str(value)
