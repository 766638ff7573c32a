"""Self-contained HTML report of an evaluation run (one file, no external resources).

``render_report(ReportData(...))`` returns the HTML text. Everything is inline: a small CSS block,
the plots as inline SVG drawn with matplotlib (Agg/SVG backend, text kept as ``<text>``), and a
tiny script that, on load, measures every plot and table and writes
``{"plots": N, "plots_visible": M, "tables": T, "tables_visible": V}`` to
``document.body.dataset.rendered`` (the browser test reads it back from the dumped DOM).
Every piece of text from the data is HTML-escaped.

Sections: header (meta), Summary (recommended settings), Dose–response, Token effects,
Per-user gains, Preference accuracy, All settings, Examples.

Δ is always "method minus no personalisation", averaged per user, with the bootstrap CI the
evaluation job computed. It is coloured green (better) or red (worse) only when the CI excludes 0;
for perplexity lower is better, for every other metric higher is better.

Dose–response plots: the quality panel shows Δ ROUGE-L / METEOR / BERTScore with its CI band
against the strength, the dashed line at 0 being no personalisation (Δ rather than raw means so the
three metrics, whose scales differ, share one axis). The fluency panel shows perplexity as the
no-personalisation perplexity + Δ with the CI band of Δ (dashed line: no personalisation). Where
no Δ exists (no "none" row), the plain means are drawn instead. The recommended strength is a
dotted vertical line.
"""

from steerstore.jobs.evaluate.report.formatting import METRICS
from steerstore.jobs.evaluate.report.page import CSS, SCRIPT, ReportData, render_report

__all__ = ["CSS", "METRICS", "SCRIPT", "ReportData", "render_report"]
