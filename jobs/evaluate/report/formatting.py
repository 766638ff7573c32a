"""What every part of the report shares: metric names and colours, and how values become text.

Numbers use a typographic minus and "–" for anything not computed, so a missing value never
reads as a zero; every piece of text from the data goes through ``_esc``.
"""

from __future__ import annotations

import html
import math

import pandas as pd

METRICS = (
    ("rouge1", "ROUGE-1"),
    ("rougeL", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("bleu", "BLEU"),
    ("bertscore", "BERTScore"),
    ("drift", "Drift"),
    ("perplexity", "Perplexity"),
    ("perplexity_plain", "Perplexity (plain prompt)"),
)
METRIC_NAMES = dict(METRICS)
LOWER_IS_BETTER = frozenset({"perplexity", "perplexity_plain", "drift"})
QUALITY = ("rougeL", "meteor", "bertscore")
GAIN_METRICS = ("rougeL", "meteor")
SYMBOLS = {"alpha": "α", "gamma": "γ", "lambda": "λ", "tau": "τ"}
COLORS = {"rougeL": "#1f6fb4", "meteor": "#e07b12", "bertscore": "#2a9d4b", "perplexity": "#7b4fa8"}
GAIN, LOSS, NEUTRAL = "#2e8540", "#c0392b", "#9aa0a6"
MINUS = "−"  # U+2212, typographic minus in tables

TRUNCATE_INPUT = 700
TRUNCATE_TEXT = 450


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
