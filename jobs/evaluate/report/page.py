"""The whole report page: the sections in order, with the inline CSS and the measuring script."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from steerstore.infra.extras import require
from steerstore.jobs.evaluate.report.formatting import _esc, _labels, _method_order
from steerstore.jobs.evaluate.report.sections import (
    _all_section,
    _dose_section,
    _examples_section,
    _gain_section,
    _header,
    _preference_section,
    _section,
    _source_section,
    _summary_section,
    _token_section,
    _tradeoff_section,
)


@dataclass
class ReportData:
    meta: dict = field(default_factory=dict)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_user: pd.DataFrame = field(default_factory=pd.DataFrame)
    token_effects: np.ndarray | None = None
    tau: float | None = None
    preference: pd.DataFrame = field(default_factory=pd.DataFrame)
    examples: pd.DataFrame = field(default_factory=pd.DataFrame)
    by_source: pd.DataFrame = field(default_factory=pd.DataFrame)  # recommended settings within each data source


CSS = """
:root { --fg:#1d1f23; --muted:#5f6670; --line:#dfe2e6; --zebra:#f6f7f9; --good:#1e7b34; --bad:#b3261e; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; padding: 24px 32px 48px; max-width: 1180px; line-height: 1.45; font-size: 14px; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
h4 { font-size: 12px; margin: 0 0 2px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
p { margin: 6px 0 10px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { padding: 5px 8px; text-align: left; vertical-align: top; border-bottom: 1px solid var(--line); }
thead th { background: #eef0f3; font-weight: 600; white-space: nowrap; border-bottom: 2px solid #c9ced4; }
tbody tr:nth-child(even) { background: var(--zebra); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { color: var(--muted); font-weight: 600; white-space: nowrap; }
table.kv { min-width: 50%; }
table.kv.inner { margin: 0; font-size: 12.5px; }
table.kv.inner th, table.kv.inner td { padding: 1px 10px 1px 0; border: 0; }
table.kv.inner tr { background: none; }
.scroll { overflow-x: auto; }
table.results .v { font-weight: 600; }
table.results .d { font-size: 11.5px; color: var(--muted); }
table.results .d span { white-space: nowrap; }
table.results td.setting { white-space: nowrap; }
table.results .id { font-size: 11px; color: var(--muted); font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
tr.recommended td { background: #fff7dd; }
td.rec { color: #c98a00; text-align: center; }
.better { color: var(--good) !important; font-weight: 600; }
.worse { color: var(--bad) !important; font-weight: 600; }
.d.ref { font-style: italic; }
.ci { color: var(--muted); font-size: 12px; }
.empty { color: var(--muted); font-style: italic; }
ul.notes { color: var(--muted); margin: 4px 0 0; padding-left: 20px; }
figure.plot { margin: 14px 0 22px; padding: 10px 12px 8px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure.plot svg { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 12.5px; color: var(--muted); margin-top: 6px; }
article.example { border: 1px solid var(--line); border-radius: 6px; padding: 4px 14px 6px; margin: 12px 0; }
.io { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; }
table.outputs { width: 100%; }
table.outputs { table-layout: fixed; }
table.outputs thead th:first-child { width: 220px; }
table.outputs tbody th { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(500px, 1fr)); gap: 0 16px; }
.grid figure.plot { margin: 8px 0; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  function visible(el) { if (!el) return false; var r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; }
  var figures = Array.prototype.slice.call(document.querySelectorAll("figure.plot"));
  var tables = Array.prototype.slice.call(document.querySelectorAll("table"));
  document.body.dataset.rendered = JSON.stringify({
    plots: figures.length,
    plots_visible: figures.filter(function (f) { return visible(f.querySelector("svg")); }).length,
    tables: tables.length,
    tables_visible: tables.filter(visible).length
  });
});
"""


def render_report(data: ReportData) -> str:
    """The evaluation report as one self-contained HTML document."""
    require("eval", "the evaluation report")
    import matplotlib

    matplotlib.use("Agg")
    summary = data.summary if data.summary is not None else pd.DataFrame()
    per_user = data.per_user if data.per_user is not None else pd.DataFrame()
    order = _method_order(summary)
    labels = _labels(summary, per_user, data.preference, data.examples)

    title, header = _header(dict(data.meta or {}))
    dose = _dose_section(summary, order, labels) if not summary.empty else \
        _section("dose-response", "Dose–response", '<p class="empty">No results.</p>')
    sections = [
        header,
        _summary_section(summary, order, labels),
        _source_section(data.by_source, order, labels),
        dose,
        _tradeoff_section(summary),
        _token_section(data.token_effects, data.tau),
        _gain_section(per_user, summary, order, labels),
        _preference_section(data.preference, labels, (data.meta or {}).get("preference_unsteered")),
        _all_section(summary, order, labels),
        _examples_section(data.examples),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="steerstore report">\n'
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
