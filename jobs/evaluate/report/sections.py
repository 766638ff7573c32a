"""The report's sections: each turns the evaluation's tables into one HTML ``<section>``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from steerstore.jobs.evaluate.report.formatting import (
    GAIN_METRICS,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    METRICS,
    SYMBOLS,
    TRUNCATE_INPUT,
    TRUNCATE_TEXT,
    _delta_text,
    _digits,
    _esc,
    _finite,
    _int,
    _num,
    _pct,
    _setting,
    _truncate,
)
from steerstore.jobs.evaluate.report.plots import _dose_plot, _gain_plot, _token_plot, _tradeoff_plot
from steerstore.jobs.evaluate.write import ship_line


def _figure(kind: str, key: str, svg: str, caption: str) -> str:
    return (f'<figure class="plot" data-plot="{_esc(f"{kind}-{key}")}">\n{svg}\n'
            f"<figcaption>{caption}</figcaption>\n</figure>")


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
        if key in ("title", "notes", "ship"):
            continue
        sub_unit = " s" if ("second" in str(key).lower() or str(key).lower().endswith("_s")) else ""
        rows.append(f"<tr><th>{_esc(key)}</th><td>{_meta_value(str(key), value, sub_unit)}</td></tr>")
    body = f'<table class="kv">{"".join(rows)}</table>' if rows else ""
    if meta.get("ship"):
        body = f'<p class="ship"><strong>{_esc(ship_line(meta["ship"]))}</strong></p>' + body
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


def _source_section(by_source: pd.DataFrame | None, order, labels) -> str:
    """The summary within each data source (only when the users come from more than one)."""
    if by_source is None or by_source.empty:
        return ""
    parts = ["<p>The same recommended settings, with Δ and CIs over each source's users only "
             "(pooled above).</p>"]
    for name, rows in by_source.groupby("source", sort=True):
        users = int(rows.loc[rows["method"] == "none", "n_users"].max()) if (rows["method"] == "none").any() else 0
        parts.append(f"<h3>{_esc(name)} · {users} users</h3>"
                     + _results_table(_ordered(rows, order), labels, mark_recommended=False))
    return _section("by-source", "By data source", "".join(parts))


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


def tradeoff_points(summary: pd.DataFrame, metric: str = "meteor") -> list[dict]:
    """Each setting with a Δ on ``metric`` and a finite content drift: (method, label, strength, drift, Δ, CI, tag),
    the strength tagged when its method was evaluated at several."""
    need = {"method", "drift", f"delta_{metric}", f"delta_{metric}_lo", f"delta_{metric}_hi"}
    if summary.empty or not need <= set(summary.columns):
        return []
    points = []
    for _, r in summary.iterrows():
        values = [r["drift"], r[f"delta_{metric}"], r[f"delta_{metric}_lo"], r[f"delta_{metric}_hi"]]
        if str(r["method"]) == "none" or not all(_finite(v) for v in values):
            continue
        strength = float(r["strength"]) if _finite(r.get("strength")) else 0.0
        label = str(r.get("label") or r["method"]).split(" (Δ vs ")[0]  # the caption says what each Δ is against
        points.append({"method": str(r["method"]), "label": label, "strength": strength,
                       "parameter": str(r.get("parameter") or ""), "drift": float(r["drift"]),
                       "delta": float(values[1]), "lo": float(values[2]), "hi": float(values[3])})
    several = {m for m in {p["method"] for p in points} if sum(p["method"] == m for p in points) > 1}
    for p in points:
        p["tag"] = (f"{SYMBOLS.get(p['parameter'], p['parameter'])} {p['strength']:g}"
                    if p["method"] in several and p["parameter"] else "")
    return points


def _tradeoff_section(summary: pd.DataFrame, metric: str = "meteor") -> str:
    points = tradeoff_points(summary, metric)
    if not points:
        return _section("tradeoff", "Gain against content drift",
                        '<p class="empty">No setting has both a Δ and a content drift.</p>')
    svg = _tradeoff_plot(points, metric, salt="steerstore-tradeoff")
    caption = (f"Every setting: Δ {METRIC_NAMES[metric]} against its baseline (no personalisation; history in "
               "prompt for a method on top of it), bars: bootstrap CI over users, against its mean content drift "
               "(1 − BERTScore F1 against the unsteered answer to the same prompt; history in prompt against no "
               "personalisation's: what showing the history moves). Up and to the left moves the text toward the "
               "user while keeping its content; a method at several strengths is a line in strength order.")
    return _section("tradeoff", "Gain against content drift", _figure("tradeoff", metric, svg, _esc(caption)))


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


def _preference_section(pref: pd.DataFrame, labels, unsteered: dict | None = None) -> str:
    if (pref is None or pref.empty) and not unsteered:
        return ""
    body = []

    def ci(row, key) -> str:
        lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
        return f' <span class="ci">[{_pct(lo)}, {_pct(hi)}]</span>' if _finite(lo) and _finite(hi) else ""

    for _, row in (pref if pref is not None else pd.DataFrame()).iterrows():
        strength, gain = row.get("strength"), row.get("mean_margin_gain")
        body.append(
            f"<tr><td>{_esc(row.get('label') or labels.get(str(row.get('method')), row.get('method')))}</td>"
            f'<td class="num">{_esc(f"{float(strength):g}") if _finite(strength) else "–"}</td>'
            f'<td class="num">{_pct(row.get("pair_accuracy"))}{ci(row, "pair_accuracy")}</td>'
            f'<td class="num">{_esc(f"{float(gain):+.3f}") if _finite(gain) else "–"}</td>'
            f'<td class="num">{_pct(row.get("user_accuracy"))}{ci(row, "user_accuracy")}</td>'
            f'<td class="num">{_int(row.get("n_pairs"))}</td><td class="num">{_int(row.get("n_users"))}</td></tr>')
    table = ('<table class="compact"><thead><tr><th>Method</th><th class="num">Strength</th>'
             '<th class="num">Pairs where steering helps [CI]</th><th class="num">Mean margin gain (nats)</th>'
             '<th class="num">Mean per-user share [CI]</th>'
             '<th class="num">Pairs</th><th class="num">Users</th></tr></thead>'
             f"<tbody>{''.join(body)}</tbody></table>") if body else ""
    intro = ("<p>Held-out preference pairs: the share of pairs where steering raises the margin of the "
             "user's own text over the other text, log p(own) − log p(other), above the unsteered model's "
             "(chance 0.5). CIs resample users whole.</p>")
    apart = ""
    if unsteered:
        margin = unsteered.get("mean_margin_per_token")
        shown = f"{float(margin):+.3f}" if _finite(margin) else "–"
        apart = (f"<p>Apart, not a steering result: the unsteered model already gives the user's own text the "
                 f"higher per-token log-likelihood in {_pct(unsteered.get('pair_accuracy'))}"
                 f"{ci(unsteered, 'pair_accuracy')} of {_int(unsteered.get('n_pairs'))} pairs (mean per-token "
                 f"margin {_esc(shown)} nats); "
                 "what chance is here depends on how the pairs were built.</p>")
    return _section("preference", "Preference accuracy", intro + table + apart)


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
