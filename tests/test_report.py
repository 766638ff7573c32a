"""The HTML evaluation report (jobs/report.py) on synthetic results: structure, escaping,
self-containment, and a headless-Chromium render that checks every plot and table is visible."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest

from steerstore.jobs.evaluate.report import METRICS, ReportData, render_report
from tests.browser import render, require_chromium, screenshot

XSS = "<script>alert(1)</script>"
ODD_USER = 'u<7>&"x'

# method, label, parameter, strengths, recommended strength
METHODS = [
    ("none", "No personalisation", "", [np.nan], np.nan),
    ("history_prompt", "History (BM25)", "", [np.nan], np.nan),
    ("style_vector:history", "SteerX vector (history)", "alpha", [0.25, 0.5, 1.0, 2.0, 4.0], 1.0),
    ("style_vector:description", "SteerX vector (description)", "alpha", [1.0], 1.0),
    ("influence", "SteerX influence", "lambda", [0.0, 0.5, 1.0], 0.5),
    ("caa", "CAA", "alpha", [0.5, 1.0, 2.0], 0.5),
    ("bt", "BT", "alpha", [1.0], 1.0),
    ("dps", "DPS", "gamma", [0.25, 0.5, 1.0, 2.0], 2.0),
]
SWEPT = [m for m, _, _, s, _ in METHODS if len(s) >= 2]
NON_BASE = [m for m, *_ in METHODS if m != "none"]
BASE = {"rouge1": 0.30, "rougeL": 0.20, "meteor": 0.18, "bleu": 0.04, "bertscore": 0.86, "drift": 0.0,
        "perplexity": 14.0, "perplexity_plain": 16.0}
SCALE = {"rouge1": 1.2, "rougeL": 1.0, "meteor": 0.7, "bleu": 0.3, "bertscore": 0.4, "drift": 2.0, "perplexity": 40.0,
         "perplexity_plain": 40.0}


def synthetic(seed: int = 0, nan_metrics=("bleu",), n_users: int = 24, full: bool = True) -> ReportData:
    rng = np.random.default_rng(seed)
    users = [ODD_USER] + [f"user{i:02d}" for i in range(1, n_users)]
    summary, per_user = [], []
    for method, label, parameter, strengths, rec in METHODS:
        for s in strengths:
            is_rec = method == "none" or not parameter or np.isclose(s, rec)
            shift = 0.0 if method == "none" else rng.normal(0.01, 0.01) * (1 + (s if np.isfinite(s) else 0))
            row = {"method": method, "label": label, "parameter": parameter, "strength": s,
                   "recommended": bool(is_rec), "n_users": n_users, "n_items": 5 * n_users}
            for m, _ in METRICS:
                if m in nan_metrics:
                    row[m] = np.nan
                    for suffix in ("", "_lo", "_hi"):
                        row[f"delta_{m}{suffix}"] = np.nan
                    continue
                d = np.nan if method == "none" else SCALE[m] * shift + rng.normal(0, 0.003)
                row[m] = BASE[m] + (0 if method == "none" else d)
                half = abs(rng.normal(0.008, 0.003)) * SCALE[m]  # perplexity rises with strength
                row[f"delta_{m}"] = d
                row[f"delta_{m}_lo"] = d - half
                row[f"delta_{m}_hi"] = d + half
            summary.append(row)
            if is_rec:
                for u in users:
                    pu = {"user_id": u, "method": method, "label": label, "parameter": parameter, "strength": s}
                    for m, _ in METRICS:
                        pu[f"delta_{m}"] = np.nan if (method == "none" or m in nan_metrics) \
                            else rng.normal(row[f"delta_{m}"], 0.03)
                    per_user.append(pu)
    summary = pd.DataFrame(summary)
    # a known Δ for the formatting check
    i = summary.index[summary["method"] == "history_prompt"][0]
    summary.loc[i, ["delta_rougeL", "delta_rougeL_lo", "delta_rougeL_hi"]] = [0.012, -0.003, 0.027]
    summary.loc[i, ["delta_meteor", "delta_meteor_lo", "delta_meteor_hi"]] = [0.02, 0.005, 0.035]
    summary.loc[i, ["delta_perplexity", "delta_perplexity_lo", "delta_perplexity_hi"]] = [0.5, 0.2, 0.8]
    j = summary.index[summary["method"] == "bt"][0]
    summary.loc[j, ["delta_perplexity", "delta_perplexity_lo", "delta_perplexity_hi"]] = [-0.4, -0.7, -0.1]

    if not full:
        return ReportData(meta={"title": "steerstore eval (minimal)"}, summary=summary,
                          per_user=pd.DataFrame(per_user), token_effects=None, tau=None,
                          preference=pd.DataFrame(), examples=pd.DataFrame())
    preference = pd.DataFrame([
        {"method": m, "label": lab, "strength": s, "pair_accuracy": 0.55 + 0.02 * k,
         "pair_accuracy_lo": 0.5 + 0.02 * k, "pair_accuracy_hi": 0.6 + 0.02 * k, "mean_margin_gain": 0.1 * k,
         "user_accuracy": 0.56 + 0.02 * k, "user_accuracy_lo": 0.5 + 0.02 * k,
         "user_accuracy_hi": 0.62 + 0.02 * k, "n_pairs": 240, "n_users": n_users}
        for k, (m, lab, s) in enumerate([("population", "CAA population direction", 2.0), ("caa", "CAA", 0.5),
                                         ("bt", "BT", 1.0)])
    ])
    examples = []
    for user, item in [(ODD_USER, "item-1"), ("user03", "item-7")]:
        for method, label, *_ in METHODS:
            out = XSS if (user == ODD_USER and method == "caa") else f"{label} says: " + "words " * 150
            examples.append({"user_id": user, "item_id": item, "input": "Continue: " + "It was a dark night. " * 60,
                             "target": "The user's own text & more " * 30, "label": label, "output": out})
    meta = {
        "title": "steerstore evaluation — synthetic",
        "store": "s3://bucket/store", "version": "v0007", "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "run_id": "run-2024-01-01", "command": "steerstore evaluate --users 24 --items 5",
        "data": "../shared/data/blogs-dev.jsonl.gz", "users": n_users, "items": 5 * n_users, "pairs": 240,
        "seconds": {"generate": 123.4, "score": 45.6, "bertscore": 12.0},
        "notes": ["BLEU not computed", "a note with <b>markup</b>"],
        "ship": {"method": "caa", "label": "CAA (per-user)", "parameter": "alpha", "strength": 0.5, "metric": "meteor",
                 "delta": 0.02, "delta_lo": 0.005, "delta_hi": 0.035, "perplexity_ratio": 1.1, "n_users": n_users,
                 "reason": "the best lower bound", "caveat": "one model <size>"},
        "preference_unsteered": {"pair_accuracy": 0.71, "pair_accuracy_lo": 0.64, "pair_accuracy_hi": 0.78,
                                 "mean_margin_per_token": 0.123, "n_pairs": 240, "n_users": n_users},
    }
    effects = np.concatenate([rng.normal(0, 0.05, 3000), rng.exponential(0.3, 400)])
    return ReportData(meta=meta, summary=summary, per_user=pd.DataFrame(per_user), token_effects=effects,
                      tau=0.25, preference=preference, examples=pd.DataFrame(examples))


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def check_structure(page: str, expected_plots: int) -> None:
    assert page.startswith("<!DOCTYPE html>")
    for sid in ("summary", "dose-response", "token-effects", "per-user", "all-settings"):
        assert re.search(rf'<section id="{sid}">\s*<h2>', page), sid
    assert page.count('<figure class="plot"') == expected_plots
    assert page.count("<svg") == expected_plots
    assert page.count("<figcaption>") == expected_plots
    # self-contained: every src/href is an in-page reference; http only in XML namespace declarations
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', page):
        assert value.startswith("#") or value.startswith("data:"), (attr, value)
    for name, value in re.findall(r'([\w:-]+)\s*=\s*"(https?://[^"]*)"', page):
        assert name.startswith("xmlns"), (name, value)
    assert "<link" not in page and "@import" not in page and "url(http" not in page
    assert page.count("<script") == 1  # only the report's own measuring script
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    # ids stay unique across the inline SVGs
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def full():
    data = synthetic()
    return data, render_report(data)


@pytest.fixture(scope="module")
def minimal():
    data = synthetic(seed=1, nan_metrics=("bertscore", "bleu"), full=False)
    return data, render_report(data)


def test_report_structure_and_escaping(full):
    data, page = full
    n_plots = len(SWEPT) + 1 + len(NON_BASE) + 1  # dose per swept method, token effects, per user, the trade-off
    check_structure(page, n_plots)
    assert 'data-plot="tradeoff-meteor"' in page and '<section id="tradeoff">' in page
    for sid in ("preference", "examples"):
        assert f'<section id="{sid}">' in page
    pref = text(page[page.index('<section id="preference">'):page.index("</section>", page.index('id="preference"'))])
    assert "59.0 % [54.0 %, 64.0 %]" in pref and "+0.200" in pref  # bt: pooled share with its CI, margin gain
    head = text(page[page.index('<header id="meta">'):page.index("</header>")])
    assert "What to ship: CAA (per-user) at alpha = 0.5 — Δmeteor +0.0200 [+0.0050, +0.0350]" in head
    assert "one model <size>" in head and "one model <size>" not in page  # escaped
    assert "Apart, not a steering result" in pref and "71.0 % [64.0 %, 78.0 %] of 240 pairs" in pref and "+0.123" in pref
    for m in SWEPT:
        assert f'data-plot="dose-{m}"' in page
    for m in NON_BASE:
        assert f'data-plot="per-user-{m}"' in page
    assert 'data-plot="token-effects-steerx"' in page
    assert page.count("Left: Δ ROUGE-L / METEOR / BERTScore vs no personalisation") == len(SWEPT)
    # escaping: the raw script / user id never appear, their escaped forms do
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert ODD_USER not in page and "u&lt;7&gt;&amp;&quot;x" in page
    assert "<b>markup</b>" not in page and "&lt;b&gt;markup&lt;/b&gt;" in page
    # Δ formatting and colouring: CI excluding 0 is coloured, including 0 is not
    deltas = {text(m[2]): m[1] for m in re.finditer(r'<div class="(d[^"]*)">(.*?)</div>', page)}
    assert deltas["+0.012 [−0.003, +0.027]"] == "d"
    assert deltas["+0.020 [+0.005, +0.035]"] == "d better"
    # perplexity up with a CI above 0 is worse, down with a CI below 0 better (direction-aware)
    assert deltas["+0.50 [+0.20, +0.80]"] == "d worse"
    assert deltas["−0.40 [−0.70, −0.10]"] == "d better"
    # τ marked and the share above it in the caption
    effects = data.token_effects
    assert f"{np.mean(effects >= 0.25) * 100:.1f} % of words reach τ" in page
    assert "τ = 0.25" in page
    # the not-computed metric shows a dash; long examples are truncated
    assert "–" in page and "chars]" in page
    # a summary row per method, the "All settings" table a row per setting
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert summary.count("<tr>") == 1 + len(METHODS)
    every = page.split('<section id="all-settings">')[1].split("</section>")[0]
    assert every.count("<tr") == 1 + len(data.summary)


def test_report_minimal_inputs(minimal):
    _, page = minimal
    check_structure(page, len(SWEPT) + len(NON_BASE) + 1)
    assert "not computed" in page
    # the dose captions name only the metrics drawn (BERTScore not computed here)
    assert page.count("Left: Δ ROUGE-L / METEOR vs no personalisation") == len(SWEPT)
    assert '<section id="preference">' not in page and '<section id="examples">' not in page
    assert "<title>steerstore eval (minimal)</title>" in page
    # no summary and no per-user data at all still renders
    empty = render_report(ReportData(meta={}, summary=pd.DataFrame(), per_user=pd.DataFrame(),
                                     token_effects=np.array([]), tau=None,
                                     preference=pd.DataFrame(), examples=pd.DataFrame()))
    assert '<section id="summary">' in empty and "<figure" not in empty


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "minimal"])
def test_report_renders_in_chromium(tmp_path, request, case):
    require_chromium()
    _, page = request.getfixturevalue(case)
    full = case == "full"
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    result = render(path)
    rendered = result["rendered"]
    expected = len(SWEPT) + len(NON_BASE) + (1 if full else 0) + 1  # + the gain-against-drift figure
    assert rendered["plots"] == rendered["plots_visible"] == expected, rendered
    assert rendered["tables"] == rendered["tables_visible"] == page.count("<table"), rendered
    # the page's own script is the only script element; injected text stays text
    assert re.findall(r"<script\b", result["dom"], flags=re.IGNORECASE) == ["<script"], result["dom"][:2000]
    if "&lt;script&gt;alert(1)" in page:
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in result["dom"]
    if full:
        png = screenshot(path, tmp_path / "report.png")
        assert png.stat().st_size > 50_000


def test_require_chromium_skips_or_fails(monkeypatch):
    import tests.browser as browser

    monkeypatch.setattr(browser, "chromium", lambda: None)
    monkeypatch.delenv("STEERSTORE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make system"):
        browser.require_chromium()
    monkeypatch.setenv("STEERSTORE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="make system"):
        browser.require_chromium()


def test_the_tradeoff_points_are_the_settings_with_a_delta_and_a_drift(full):
    from steerstore.jobs.evaluate.report.sections import tradeoff_points

    data, _ = full
    points = tradeoff_points(data.summary)
    finite = data.summary[(data.summary["method"] != "none") & data.summary["drift"].notna()
                          & data.summary["delta_meteor"].notna()]
    assert len(points) == len(finite) and {p["method"] for p in points} == set(finite["method"])
    for p in points:
        row = finite[(finite["method"] == p["method"]) & (finite["strength"].fillna(0.0) == p["strength"])].iloc[0]
        assert (p["drift"], p["delta"], p["lo"], p["hi"]) == (row["drift"], row["delta_meteor"], row["delta_meteor_lo"],
                                                            row["delta_meteor_hi"])
        swept = (finite["method"] == p["method"]).sum() > 1
        assert bool(p["tag"]) == bool(swept and p["parameter"]), p
    assert tradeoff_points(data.summary.drop(columns=["drift"])) == []
