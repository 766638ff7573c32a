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

from __future__ import annotations

import hashlib
import html
import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

METRICS = (
    ("rouge1", "ROUGE-1"),
    ("rougeL", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("bleu", "BLEU"),
    ("bertscore", "BERTScore"),
    ("perplexity", "Perplexity"),
)
METRIC_NAMES = dict(METRICS)
LOWER_IS_BETTER = frozenset({"perplexity"})
QUALITY = ("rougeL", "meteor", "bertscore")
GAIN_METRICS = ("rougeL", "meteor")
SYMBOLS = {"alpha": "α", "gamma": "γ", "lambda": "λ", "tau": "τ"}
COLORS = {"rougeL": "#1f6fb4", "meteor": "#e07b12", "bertscore": "#2a9d4b", "perplexity": "#7b4fa8"}
GAIN, LOSS, NEUTRAL = "#2e8540", "#c0392b", "#9aa0a6"
MINUS = "−"  # U+2212, typographic minus in tables

TRUNCATE_INPUT = 700
TRUNCATE_TEXT = 450


@dataclass
class ReportData:
    meta: dict = field(default_factory=dict)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_user: pd.DataFrame = field(default_factory=pd.DataFrame)
    token_effects: np.ndarray | None = None
    tau: float | None = None
    preference: pd.DataFrame = field(default_factory=pd.DataFrame)
    examples: pd.DataFrame = field(default_factory=pd.DataFrame)


# ---------------------------------------------------------------------------------------------
# formatting


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _digits(metric: str) -> int:
    return 2 if metric in LOWER_IS_BETTER else 3


def _num(value, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}".replace("-", MINUS) if _finite(value) else "–"


def _signed(value, digits: int = 3) -> str:
    return f"{float(value):+.{digits}f}".replace("-", MINUS)


def _int(value) -> str:
    return f"{int(value):,}" if _finite(value) else "–"


def _pct(value) -> str:
    return f"{100 * float(value):.1f} %" if _finite(value) else "–"


def _setting(parameter, strength) -> str:
    """'α = 0.5' for a swept method, '' for methods without a strength."""
    if not parameter or (isinstance(parameter, float) and math.isnan(parameter)):
        return ""
    symbol = SYMBOLS.get(str(parameter), str(parameter))
    return f"{symbol} = {float(strength):g}" if _finite(strength) else symbol


def _delta_class(metric: str, lo, hi) -> str:
    if not (_finite(lo) and _finite(hi)):
        return ""
    if float(lo) > 0:
        return "worse" if metric in LOWER_IS_BETTER else "better"
    if float(hi) < 0:
        return "better" if metric in LOWER_IS_BETTER else "worse"
    return ""


def _delta_text(row, metric: str) -> tuple[str, str, str]:
    """('+0.012', '[−0.003, +0.027]', css class); empty strings when there is no Δ (or no CI)."""
    d = row.get(f"delta_{metric}")
    if not _finite(d):
        return "", "", ""
    lo, hi = row.get(f"delta_{metric}_lo"), row.get(f"delta_{metric}_hi")
    digits = _digits(metric)
    ci = f"[{_signed(lo, digits)}, {_signed(hi, digits)}]" if _finite(lo) and _finite(hi) else ""
    return _signed(d, digits), ci, _delta_class(metric, lo, hi)


def _truncate(text, limit: int) -> str:
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit * 0.7:
        cut = cut[:space]
    return f"{cut.rstrip()} … [+{len(text) - len(cut):,} chars]"


def _mpl_text(text: str) -> str:
    """Text for matplotlib: '$' would start mathtext."""
    return str(text).replace("$", r"\$")


def _method_order(summary: pd.DataFrame) -> list[str]:
    if summary.empty or "method" not in summary:
        return []
    seen = list(dict.fromkeys(summary["method"].astype(str)))
    return (["none"] if "none" in seen else []) + [m for m in seen if m != "none"]


def _labels(*frames: pd.DataFrame) -> dict[str, str]:
    out: dict[str, str] = {}
    for frame in frames:
        if frame is not None and not frame.empty and {"method", "label"} <= set(frame.columns):
            for method, label in zip(frame["method"].astype(str), frame["label"]):
                out.setdefault(method, str(label))
    return out


# ---------------------------------------------------------------------------------------------
# plots


def _svg(fig, salt: str) -> str:
    """The figure as an inline <svg> element (prolog, doctype and metadata stripped); closes it."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    try:
        # a distinct hash salt per figure keeps element ids unique across the page (and stable)
        with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
            fig.savefig(buf, format="svg", bbox_inches="tight", pad_inches=0.05,
                        metadata={"Date": None, "Creator": None})
    finally:
        plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
    # matplotlib names every group (figure_1, axes_1, ...): the same names in every figure. Drop the
    # ids nothing refers to and prefix the rest, so ids stay unique in the page.
    referenced = set(re.findall(r'href="#([^"]+)"', text)) | set(re.findall(r"url\(#([^)]+)\)", text))
    prefix = "f" + hashlib.sha1(salt.encode()).hexdigest()[:6] + "-"

    def fix_id(match):
        name = match.group(1)
        return f' id="{prefix}{name}"' if name in referenced else ""

    text = re.sub(r'\sid="([^"]+)"', fix_id, text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", text)
    # matplotlib's "*{...}" style would apply to the whole page: scope it to the plots
    text = text.replace("<style type=\"text/css\">*{", "<style type=\"text/css\">figure.plot svg *{")
    # smaller: coordinates to 2 decimals (inside tags only, never in text), no indentation
    text = re.sub(r"<[^>]+>", lambda t: re.sub(r"\s+", " ", re.sub(r"(\d\.\d\d)\d+", r"\1", t.group(0))), text)
    text = re.sub(r">\s+<", "><", text)
    return text.strip()


def _figure(kind: str, key: str, svg: str, caption: str) -> str:
    return (f'<figure class="plot" data-plot="{_esc(f"{kind}-{key}")}">\n{svg}\n'
            f"<figcaption>{caption}</figcaption>\n</figure>")


def _style():
    import matplotlib

    return matplotlib.rc_context({
        "font.family": "DejaVu Sans",
        "font.size": 8.5,
        "axes.titlesize": 9,
        "axes.labelsize": 8.5,
        "legend.fontsize": 7.5,
        "xtick.labelsize": 7.5,
        "ytick.labelsize": 7.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e6e6e6",
        "grid.linewidth": 0.6,
        "axes.edgecolor": "#888888",
        "axes.axisbelow": True,
    })


def _strength_axis(ax, strengths: np.ndarray, parameter: str) -> None:
    positive = strengths[strengths > 0]
    if len(positive) == len(strengths) and positive.max() / positive.min() >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(strengths)
        ax.set_xticklabels([f"{s:g}" for s in strengths])
        ax.minorticks_off()
    ax.set_xlabel(f"{SYMBOLS.get(parameter, parameter)} ({parameter})")


def _dose_plot(rows: pd.DataFrame, none_row, parameter: str, salt: str) -> tuple[str, float | None, str]:
    """(svg, recommended strength, caption text describing what the two panels show)."""
    import matplotlib.pyplot as plt

    rows = rows.sort_values("strength")
    x = rows["strength"].to_numpy(float)
    symbol = SYMBOLS.get(parameter, parameter)
    recommended = rows.loc[rows["recommended"].astype(bool), "strength"] if "recommended" in rows else []
    rec = float(recommended.iloc[0]) if len(recommended) else None

    def col(name):
        return rows[name].to_numpy(float) if name in rows else np.full(len(rows), np.nan)

    with _style():
        fig, (qa, pa) = plt.subplots(1, 2, figsize=(9.0, 2.9), gridspec_kw={"wspace": 0.28})
        # quality: Δ vs no personalisation (plain means when no Δ exists)
        use_delta = any(np.isfinite(col(f"delta_{m}")).any() for m in QUALITY)
        drawn = []
        for m in QUALITY:
            y = col(f"delta_{m}") if use_delta else col(m)
            if not np.isfinite(y).any():
                continue
            drawn.append(m)
            qa.plot(x, y, marker="o", ms=3.5, lw=1.4, color=COLORS[m], label=METRIC_NAMES[m])
            lo, hi = col(f"delta_{m}_lo"), col(f"delta_{m}_hi")
            if use_delta and np.isfinite(lo).any():
                qa.fill_between(x, lo, hi, color=COLORS[m], alpha=0.15, lw=0)
        names = " / ".join(METRIC_NAMES[m] for m in drawn)
        if use_delta:
            qa.axhline(0, color="#444444", ls="--", lw=1, label="no personalisation")
            qa.set_ylabel("Δ vs no personalisation")
            left = (f"Left: Δ {names} vs no personalisation (dashed, Δ = 0), shaded: bootstrap CI."
                    if drawn else "Left: quality not computed.")
        else:
            qa.set_ylabel("mean")
            left = f"Left: mean {names} (no Δ available)." if drawn else "Left: quality not computed."
        qa.set_title("Quality", loc="left")
        if not drawn:
            qa.text(0.5, 0.5, "not computed", transform=qa.transAxes, ha="center", va="center", color="#777777")
        # fluency: perplexity = baseline + Δ (plain means when no Δ exists)
        base = float(none_row["perplexity"]) if none_row is not None and _finite(none_row.get("perplexity")) else None
        d = col("delta_perplexity")
        right = "Right: perplexity not computed."
        if base is not None and np.isfinite(d).any():
            right = ("Right: perplexity = no-personalisation perplexity + Δ, shaded: CI of Δ; "
                     "dashed: no personalisation.")
            pa.plot(x, base + d, marker="o", ms=3.5, lw=1.4, color=COLORS["perplexity"], label="perplexity")
            lo, hi = col("delta_perplexity_lo"), col("delta_perplexity_hi")
            if np.isfinite(lo).any():
                pa.fill_between(x, base + lo, base + hi, color=COLORS["perplexity"], alpha=0.15, lw=0)
        elif np.isfinite(col("perplexity")).any():
            right = "Right: mean perplexity."
            pa.plot(x, col("perplexity"), marker="o", ms=3.5, lw=1.4, color=COLORS["perplexity"], label="perplexity")
        else:
            pa.text(0.5, 0.5, "not computed", transform=pa.transAxes, ha="center", va="center", color="#777777")
        if base is not None:
            pa.axhline(base, color="#444444", ls="--", lw=1, label="no personalisation")
        pa.set_ylabel("perplexity (lower is better)")
        pa.set_title("Fluency", loc="left")
        for ax in (qa, pa):
            _strength_axis(ax, x, parameter)
            if rec is not None:
                ax.axvline(rec, color="#333333", ls=":", lw=1.1, label=_mpl_text(f"recommended {symbol} = {rec:g}"))
        legend = {}
        for ax in (qa, pa):
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        if legend:
            fig.legend(legend.values(), legend.keys(), frameon=False, loc="center left",
                       bbox_to_anchor=(0.91, 0.5))
        svg = _svg(fig, salt)
    return svg, rec, f"{left} {right}"


def _token_plot(effects: np.ndarray, tau: float | None, salt: str) -> str:
    import matplotlib.pyplot as plt

    with _style():
        fig, ax = plt.subplots(figsize=(7.2, 2.6))
        ax.hist(effects, bins=min(60, max(10, int(np.sqrt(len(effects))))), color="#5b8db8", edgecolor="white", lw=0.3)
        if tau is not None and _finite(tau):
            ax.axvline(tau, color=LOSS, lw=1.3, label=f"τ = {tau:.3g}")
            ax.legend(frameon=False, loc="upper right")
        ax.set_xlabel("leave-one-out effect per word (Σ of its tokens' Δ, nats)")
        ax.set_ylabel("words")
        return _svg(fig, salt)


def _gain_plot(deltas: dict[str, np.ndarray], salt: str) -> str:
    import matplotlib.pyplot as plt

    with _style():
        fig, axes = plt.subplots(1, len(deltas), figsize=(2.9 * len(deltas), 2.3), squeeze=False,
                                 gridspec_kw={"wspace": 0.3})
        for ax, (metric, values) in zip(axes[0], deltas.items()):
            values = np.sort(values)
            colors = [GAIN if v > 0 else LOSS if v < 0 else NEUTRAL for v in values]
            ranks = np.arange(1, len(values) + 1)
            if len(values) <= 60:
                ax.vlines(ranks, 0, values, colors=colors, lw=1.2)
                ax.scatter(ranks, values, c=colors, s=10, zorder=3, linewidths=0)
            else:
                ax.bar(ranks, values, width=1.0, color=colors, lw=0)
            ax.axhline(0, color="#444444", lw=0.9)
            ax.set_title(f"Δ {METRIC_NAMES[metric]}", loc="left")
            ax.set_xlabel("users, sorted by Δ")
            ax.set_xlim(0.3, len(values) + 0.7)
        return _svg(fig, salt)


# ---------------------------------------------------------------------------------------------
# sections


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{_esc(title)}</h2>\n{body}\n</section>'


def _meta_value(key: str, value, unit: str = "") -> str:
    if isinstance(value, dict):
        sub_unit = " s" if ("second" in key.lower() or key.lower().endswith("_s")) else ""
        rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_meta_value(str(k), v, sub_unit)}</td></tr>"
                       for k, v in value.items())
        return f'<table class="kv inner">{rows}</table>'
    if isinstance(value, (list, tuple)):
        return ", ".join(_meta_value(key, v, unit) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}{_esc(unit)}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if unit else f"{v:.4g}"
        return text + _esc(unit)
    if key.lower() in ("command", "store", "data", "model", "run_id") or any(
            w in key.lower() for w in ("path", "uri", "fingerprint")):
        return f"<code>{_esc(value)}</code>"
    return _esc(value)


def _header(meta: dict) -> tuple[str, str]:
    title = str(meta.get("title") or "steerstore evaluation report")
    rows = []
    for key, value in meta.items():
        if key in ("title", "notes"):
            continue
        sub_unit = " s" if ("second" in str(key).lower() or str(key).lower().endswith("_s")) else ""
        rows.append(f"<tr><th>{_esc(key)}</th><td>{_meta_value(str(key), value, sub_unit)}</td></tr>")
    body = f'<table class="kv">{"".join(rows)}</table>' if rows else ""
    notes = meta.get("notes") or []
    if isinstance(notes, str):
        notes = [notes]
    if notes:
        body += '<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"
    return title, f'<header id="meta">\n<h1>{_esc(title)}</h1>\n{body}\n</header>'


def _metric_cell(row, metric: str, none_method: bool) -> str:
    value = _num(row.get(metric), _digits(metric))
    if none_method:
        return f'<td class="num"><div class="v">{value}</div><div class="d ref">reference</div></td>' \
            if value != "–" else '<td class="num"><div class="v">–</div></td>'
    text, ci, cls = _delta_text(row, metric)
    delta = ""
    if text:
        ci_html = f' <span class="band">{_esc(ci)}</span>' if ci else ""
        delta = f'<div class="{f"d {cls}".strip()}"><span>{_esc(text)}</span>{ci_html}</div>'
    return f'<td class="num"><div class="v">{value}</div>{delta}</td>'


def _results_table(rows: pd.DataFrame, labels: dict[str, str], mark_recommended: bool) -> str:
    head = ["Method", "Setting"] + (["Rec."] if mark_recommended else []) + ["Users", "Items"]
    head_html = "".join(f"<th>{h}</th>" for h in head)
    for metric, name in METRICS:
        arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
        head_html += f'<th class="num">{_esc(name)} {arrow}</th>'
    body = []
    for _, row in rows.iterrows():
        method = str(row.get("method"))
        rec = bool(row.get("recommended", False))
        cells = [f"<td>{_esc(row.get('label') or labels.get(method, method))}"
                 f'<div class="id">{_esc(method)}</div></td>',
                 f"<td class=\"setting\">{_esc(_setting(row.get('parameter'), row.get('strength')))}</td>"]
        if mark_recommended:
            cells.append(f'<td class="rec">{"★" if rec else ""}</td>')
        cells += [f'<td class="num">{_int(row.get("n_users"))}</td>', f'<td class="num">{_int(row.get("n_items"))}</td>']
        cells += [_metric_cell(row, m, method == "none") for m, _ in METRICS]
        cls = ' class="recommended"' if mark_recommended and rec else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table class="results"><thead><tr>{head_html}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _ordered(summary: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(order)}
    frame = summary.assign(_rank=summary["method"].astype(str).map(rank),
                           _s=pd.to_numeric(summary.get("strength"), errors="coerce"))
    return frame.sort_values(["_rank", "_s"], kind="stable").drop(columns=["_rank", "_s"])


def _summary_section(summary: pd.DataFrame, order, labels) -> str:
    if summary.empty:
        return _section("summary", "Summary", '<p class="empty">No results.</p>')
    rec = _ordered(summary[summary["recommended"].astype(bool)], order)
    intro = ("<p>Each method at its recommended strength on the held-out items. Cells show the mean and, "
             "below it, Δ vs no personalisation (mean per-user difference) with its bootstrap CI; "
             '<span class="better">green</span> / <span class="worse">red</span> only when the CI excludes 0 '
             "(lower perplexity is better). “–”: not computed.</p>")
    return _section("summary", "Summary", intro + _results_table(rec, labels, mark_recommended=False))


def _none_row(summary: pd.DataFrame):
    if summary.empty:
        return None
    rows = summary[summary["method"].astype(str) == "none"]
    return rows.iloc[0] if len(rows) else None


def _dose_section(summary: pd.DataFrame, order, labels) -> str:
    figures = []
    none_row = _none_row(summary)
    for method in order:
        rows = summary[(summary["method"].astype(str) == method)]
        params = [p for p in dict.fromkeys(rows["parameter"].fillna("").astype(str)) if p]
        swept = []
        for p in params:
            sub = rows[(rows["parameter"].astype(str) == p) & rows["strength"].map(_finite)]
            if sub["strength"].nunique() >= 2:
                swept.append((p, sub))
        for p, sub in swept:
            key = method if len(swept) == 1 else f"{method}-{p}"
            svg, rec, panels = _dose_plot(sub, none_row, p, salt=f"steerstore-dose-{key}")
            symbol = SYMBOLS.get(p, p)
            caption = (f"<b>{_esc(labels.get(method, method))}</b> against {_esc(symbol)} "
                       f"({sub['strength'].nunique()} strengths"
                       + (f"; recommended {_esc(symbol)} = {rec:g}, dotted" if rec is not None else "")
                       + "). " + _esc(panels))
            figures.append(_figure("dose", key, svg, caption))
    body = "\n".join(figures) if figures else '<p class="empty">No method was evaluated at two or more strengths.</p>'
    return _section("dose-response", "Dose–response", body)


def _token_section(effects, tau) -> str:
    values = np.asarray(effects if effects is not None else [], dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return _section("token-effects", "Token effects", '<p class="empty">Token effects: not computed.</p>')
    svg = _token_plot(values, tau, salt="steerstore-token-effects")
    caption = (f"SteerX leave-one-out effects of {values.size:,} history words (a word's effect is the sum of "
               "its tokens' Δ; the anchor threshold applies to these)")
    if tau is not None and _finite(tau):
        above = float(np.mean(values >= tau))
        caption += (f"; anchor threshold τ = {float(tau):.3g} (red line): "
                    f"{above * 100:.1f} % of words reach τ")
    caption += f"; median {np.median(values):.3g} nats."
    return _section("token-effects", "Token effects", _figure("token-effects", "steerx", svg, _esc(caption)))


def _gain_section(per_user: pd.DataFrame, summary: pd.DataFrame, order, labels) -> str:
    if per_user is None or per_user.empty or "method" not in per_user:
        return _section("per-user", "Per-user gains", '<p class="empty">No per-user results.</p>')
    methods = list(dict.fromkeys([m for m in order if m in set(per_user["method"].astype(str))]
                                 + list(per_user["method"].astype(str))))
    figures, rows = [], []
    for method in methods:
        if method == "none":
            continue
        sub = per_user[per_user["method"].astype(str) == method]
        if "strength" in sub and sub["strength"].map(_finite).any() and sub["strength"].nunique() > 1:
            # several settings: keep the recommended one
            rec = summary[(summary["method"].astype(str) == method) & summary["recommended"].astype(bool)] \
                if not summary.empty else summary
            keep = float(rec["strength"].iloc[0]) if len(rec) and _finite(rec["strength"].iloc[0]) \
                else float(sub["strength"].dropna().iloc[0])
            sub = sub[np.isclose(sub["strength"].astype(float), keep)]
        deltas = {}
        for m in GAIN_METRICS:
            col = f"delta_{m}"
            if col in sub:
                v = sub.groupby("user_id", sort=False)[col].mean().to_numpy(float)
                v = v[np.isfinite(v)]
                if v.size:
                    deltas[m] = v
        if not deltas:
            continue
        first = sub.iloc[0]
        setting = _setting(first.get("parameter"), first.get("strength"))
        label = str(first.get("label") or labels.get(method, method))
        svg = _gain_plot(deltas, salt=f"steerstore-gain-{method}")
        parts = []
        for m, v in deltas.items():
            gain = int((v > 0).sum())
            parts.append(f"{gain} of {v.size} users gain on {METRIC_NAMES[m]} ({100 * gain / v.size:.0f} %)")
        head = f"<b>{_esc(label)}</b>" + (f" at {_esc(setting)}" if setting else "")
        caption = head + ": per-user Δ vs no personalisation, sorted; " + _esc("; ".join(parts)) + "."
        figures.append(_figure("per-user", method, svg, caption))
        stats = {m: (int((v > 0).sum()), v.size) for m, v in deltas.items()}
        rows.append((label, setting, stats))
    if not figures:
        return _section("per-user", "Per-user gains", '<p class="empty">No per-user results.</p>')
    head = "".join(f'<th class="num">users gaining on {METRIC_NAMES[m]}</th>' for m in GAIN_METRICS)
    body = ""
    for label, setting, stats in rows:
        cells = "".join(f'<td class="num">{stats[m][0]} / {stats[m][1]} ({100 * stats[m][0] / stats[m][1]:.0f} %)</td>'
                        if m in stats else '<td class="num">–</td>' for m in GAIN_METRICS)
        body += f"<tr><td>{_esc(label)}</td><td>{_esc(setting)}</td>{cells}</tr>"
    table = (f'<table class="compact"><thead><tr><th>Method</th><th>Setting</th>{head}</tr></thead>'
             f"<tbody>{body}</tbody></table>")
    intro = "<p>Each method at its recommended strength: one mark per user (green: gain, red: loss).</p>"
    return _section("per-user", "Per-user gains", intro + table + '\n<div class="grid">\n' + "\n".join(figures) + "\n</div>")


def _preference_section(pref: pd.DataFrame, labels) -> str:
    if pref is None or pref.empty:
        return ""
    body = []
    for _, row in pref.iterrows():
        lo, hi = row.get("user_accuracy_lo"), row.get("user_accuracy_hi")
        ci = f' <span class="ci">[{_pct(lo)}, {_pct(hi)}]</span>' if _finite(lo) and _finite(hi) else ""
        strength = row.get("strength")
        body.append(
            f"<tr><td>{_esc(row.get('label') or labels.get(str(row.get('method')), row.get('method')))}</td>"
            f'<td class="num">{_esc(f"{float(strength):g}") if _finite(strength) else "–"}</td>'
            f'<td class="num">{_pct(row.get("pair_accuracy"))}</td>'
            f'<td class="num">{_pct(row.get("user_accuracy"))}{ci}</td>'
            f'<td class="num">{_int(row.get("n_pairs"))}</td><td class="num">{_int(row.get("n_users"))}</td></tr>')
    table = ('<table class="compact"><thead><tr><th>Method</th><th class="num">Strength</th>'
             '<th class="num">Pair accuracy</th><th class="num">User accuracy [CI]</th>'
             '<th class="num">Pairs</th><th class="num">Users</th></tr></thead>'
             f"<tbody>{''.join(body)}</tbody></table>")
    intro = ("<p>Held-out preference pairs: the share of pairs (and the mean per-user share) where "
             "the method prefers the user's own continuation.</p>")
    return _section("preference", "Preference accuracy", intro + table)


def _all_section(summary: pd.DataFrame, order, labels) -> str:
    if summary.empty:
        return _section("all-settings", "All settings", '<p class="empty">No results.</p>')
    intro = "<p>Every evaluated (method, strength); ★ marks the recommended strength.</p>"
    return _section("all-settings", "All settings",
                    intro + _results_table(_ordered(summary, order), labels, mark_recommended=True))


def _examples_section(examples: pd.DataFrame) -> str:
    if examples is None or examples.empty:
        return ""
    blocks = []
    for (user, item), group in examples.groupby(["user_id", "item_id"], sort=False):
        first = group.iloc[0]
        rows = "".join(f'<tr><th>{_esc(r.get("label"))}</th><td class="text">{_esc(_truncate(r.get("output"), TRUNCATE_TEXT))}</td></tr>'
                       for _, r in group.iterrows())
        blocks.append(
            f'<article class="example"><h3>User {_esc(user)} · item {_esc(item)}</h3>'
            f'<div class="io"><div><h4>Input</h4><p class="text">{_esc(_truncate(first.get("input"), TRUNCATE_INPUT))}</p></div>'
            f'<div><h4>Target (the user\'s own text)</h4><p class="text">{_esc(_truncate(first.get("target"), TRUNCATE_TEXT))}</p></div></div>'
            f'<table class="outputs"><thead><tr><th>Method</th><th>Output</th></tr></thead><tbody>{rows}</tbody></table>'
            "</article>")
    intro = f"<p>{len(blocks)} held-out item(s), every method at its recommended strength (long texts truncated).</p>"
    return _section("examples", "Examples", intro + "\n".join(blocks))


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
        dose,
        _token_section(data.token_effects, data.tau),
        _gain_section(per_user, summary, order, labels),
        _preference_section(data.preference, labels),
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
