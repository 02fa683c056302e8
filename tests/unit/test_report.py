"""Reports a researcher can cite: provenance, tables and figures for people, escaped user strings."""

from __future__ import annotations

import json
import re

import pandas as pd
import plotly.graph_objects as go
import pytest

from capwrap.analyzers import (
    AttentionComparison,
    Generalization,
    NewLatentProbing,
    Patching,
    Probing,
    Pruning,
    Revival,
    WeightDiff,
)
from capwrap.analyzers.base import Evidence
from capwrap.diagnosis import diagnose
from capwrap.models import ModelSpec, build_model
from capwrap.provenance import invoked_as, run_provenance, weights_sha256
from capwrap.report import Report, error_bars
from capwrap.tasks import PCFGConfig, PCFGTask

EVIL = "<script>alert('x')</script>"


def _cells(html: str) -> list[str]:
    return re.findall(r"<t[dh]>(.*?)</t[dh]>", html)


def test_tables_are_for_people():
    frame = pd.DataFrame({
        "component": ["embed", "L3.attn", "L1.mlp"], "layer": [float("nan"), 3.0, 1.0],
        "relative_change": [0.25, 0.5, float("nan")], "t50_step": [10.0, float("nan"), 250.0], "note": [EVIL, None, "ok"],
    })  # fmt: skip
    report = Report("t")
    report.add_table(frame)
    html = report._parts[-1]
    cells = _cells(html)
    assert cells[:5] == ["component", "layer", "relative change", "t50 step", "note"]  # words, no index column
    assert "3" in cells and "3.000" not in cells and "250" in cells  # integers as integers
    assert cells.count("–") == 4  # NaN and None
    assert "0.250" in cells and EVIL not in html and "&lt;script&gt;" in html
    named = pd.DataFrame({"base": [0.999, 0.0]}, index=pd.Index(["count a", "count b"], name="test set"))
    report.add_table(named, float_format="{:.1%}")
    assert _cells(report._parts[-1]) == ["test set", "base", "count a", "99.9%", "count b", "0.0%"]


def test_an_empty_figure_is_left_out_and_a_legend_keeps_off_a_colorbar():
    report = Report("t")
    assert not report.add_figure(go.Figure(go.Scatter(x=[], y=[])))
    assert not report.add_figure(go.Figure(go.Scatter(x=[1, 2], y=[float("nan")] * 2)), empty_note="No data.")
    assert report._parts == ['<p class="note">No data.</p>']
    fig = go.Figure([go.Heatmap(z=[[1, 2]]), go.Bar(x=["a"], y=[1], name="a"), go.Bar(x=["b"], y=[2], name="b")])
    assert report.add_figure(fig) and fig.layout.legend.orientation == "h"


def test_error_bars_appear_exactly_where_an_interval_is_reported():
    t = pd.DataFrame({"k": [0, 5], "capability_accuracy": [0.9, 0.4], "downstream_accuracy": [0.2, 0.3]})
    ev = Evidence("pruning", {}, t, "neutral", 0.0, ["r"], plot=_pruning_plot())
    fig = ev.figure()
    assert fig.data[0].error_y.array is None
    t["capability_accuracy_low"], t["capability_accuracy_high"] = [0.85, 0.3], [0.95, 0.5]
    fig = ev.figure()
    assert list(fig.data[0].error_y.array) == pytest.approx([0.05, 0.1]) and fig.data[1].error_y.array is None
    assert error_bars(t, "downstream_accuracy") is None


def _pruning_plot():
    from capwrap.analyzers.pruning import _plot

    return _plot


def test_every_report_carries_its_provenance(tmp_path):
    with invoked_as("capwrap demo --out x"):
        html = Report("plain").to_html()
    assert "Provenance" in html and "capwrap demo --out x" in html
    assert re.search(r"TransformerLens</td><td>\d+\.\d+", html) and re.search(r"torch</td><td>\d", html)
    assert "date (UTC)" in html


@pytest.fixture(scope="module")
def diagnosis_with_every_figure():
    """Every analyzer's evidence, on a tiny untrained pair: the figures' plumbing, not their findings."""
    task = PCFGTask("count", "a", config=PCFGConfig(length=8, window=4, occurrence=2), name=f"count a {EVIL}")
    spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=16, n_heads=2)
    base, tuned = build_model(spec, seed=0), build_model(spec, seed=1)
    analyzers = [Probing(n=64, steps=5), Pruning(ks=(0, 2), score_size=32),
                 Revival(max_steps=2, eval_every=1, check_size=32, control_steps=2, batch_size=8, seeds=1),
                 WeightDiff(graft_fractions=(0.5,)), AttentionComparison(n=16), Patching(n=8),
                 Generalization(), NewLatentProbing(n=64, steps=5)]  # fmt: skip
    d = diagnose(base, tuned, task, task, analyzers=analyzers, eval_size=32, progress=False)
    return d, base, tuned


def test_every_analyzer_figure_has_axis_titles_and_readable_legends(diagnosis_with_every_figure):
    d, _, _ = diagnosis_with_every_figure
    for ev in d.evidence:
        fig = ev.figure()
        layout = fig.layout
        for trace in fig.data:
            if trace.type == "table":
                continue
            for axis in ("x", "y"):
                ref = getattr(trace, f"{axis}axis", None) or axis
                name = f"{axis}axis{ref[1:]}"
                assert layout[name].title.text, f"{ev.analyzer}: {name} has no title"
            if trace.type == "heatmap":
                assert trace.colorbar.title.text, f"{ev.analyzer}: a colour bar without a title"
            assert not re.search(r"[a-z]_[a-z]", trace.name or ""), f"{ev.analyzer}: raw key {trace.name!r} in a legend"


def test_a_report_escapes_user_strings_and_states_its_models(diagnosis_with_every_figure, tmp_path):
    d, base, tuned = diagnosis_with_every_figure
    base.metadata["source"] = f"/data/{EVIL}/base"
    provenance = run_provenance(models={"base": base, "tuned": tuned}, seeds={"seed": 0}, call=f"run({EVIL!r})")
    html = d.to_html(tmp_path / "report.html", title=f"diagnosis of {EVIL}", provenance=provenance)
    figures = html.count("Plotly.newPlot")
    assert figures >= 5
    assert html.count("<script") == 1 + figures  # plotly.js itself, then one per figure: nothing of ours
    assert "<script>alert" not in html and "diagnosis of &lt;script&gt;" in html
    assert weights_sha256(base) in html and "/data/&lt;script&gt;" in html
    assert "<pre>" not in html and '<ul class="reasons">' in html  # reasons are prose, not a clipped code block
    json.dumps(provenance)  # JSON-serializable, for summary.json


def test_provenance_names_where_each_model_comes_from(tmp_path):
    # a fine-tune of a copy of the base was named after the base: "tuned model .../demo_base" in every
    # report (the copy kept the base's source, and a saved copy's capwrap.json kept it through loading)
    from capwrap.models import load_model, save_model
    from capwrap.provenance import model_provenance

    spec = ModelSpec(d_vocab=20, n_ctx=16, n_layers=1, d_model=16, n_heads=2)
    save_model(build_model(spec, seed=0), tmp_path / "base")
    base = load_model(tmp_path / "base")
    assert model_provenance(base)["source"] == str(tmp_path / "base")
    copy = base.clone()
    assert model_provenance(copy)["source"].startswith(f"a copy made in memory of {tmp_path / 'base'}")
    assert copy.metadata["source"] == str(tmp_path / "base")  # what a LoRA adapter trained on it names as its base
    save_model(copy, tmp_path / "tuned")
    assert model_provenance(load_model(tmp_path / "tuned"))["source"] == str(tmp_path / "tuned")
    assert "source" not in json.loads((tmp_path / "tuned" / "capwrap.json").read_text())["metadata"]
    assert model_provenance(build_model(spec, seed=1))["source"] == "built in memory"
    copy.metadata["source"] = "run 7"  # a source set on the copy since wins
    assert model_provenance(copy)["source"] == "run 7"
