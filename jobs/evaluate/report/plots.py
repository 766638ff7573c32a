"""The report's figures: matplotlib (Agg) drawings returned as inline SVG text.

matplotlib is imported inside each function so that importing the report costs nothing until a
report is drawn.
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pandas as pd

from steerstore.jobs.evaluate.report.formatting import (
    COLORS,
    GAIN,
    LOSS,
    METRIC_NAMES,
    NEUTRAL,
    QUALITY,
    SYMBOLS,
    _finite,
)


def _mpl_text(text: str) -> str:
    """Text for matplotlib: '$' would start mathtext."""
    return str(text).replace("$", r"\$")


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


def _tradeoff_plot(points: list[dict], metric: str, salt: str) -> str:
    """Gain against content drift: one mark per setting (x: mean drift, y: Δ ``metric`` against its baseline with
    its CI); the settings of one method at several strengths joined in strength order, each labelled."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors
    with _style():
        fig, ax = plt.subplots(figsize=(6.6, 3.4))
        methods = list(dict.fromkeys(p["method"] for p in points))
        for k, method in enumerate(methods):
            mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["strength"])
            color = palette[k % len(palette)]
            x = np.asarray([p["drift"] for p in mine], float)
            y = np.asarray([p["delta"] for p in mine], float)
            err = np.abs(np.asarray([[p["delta"] - p["lo"], p["hi"] - p["delta"]] for p in mine], float).T)
            ax.errorbar(x, y, yerr=err, color=color, marker="o", ms=4, lw=1.1 if len(mine) > 1 else 0,
                        elinewidth=0.8, capsize=2, label=_mpl_text(mine[0]["label"]))
            for p in mine:
                if p["tag"]:
                    ax.annotate(_mpl_text(p["tag"]), (p["drift"], p["delta"]), xytext=(3, 3),
                                textcoords="offset points", fontsize=6.5, color=color)
        ax.axhline(0, color="#444444", ls="--", lw=1)
        ax.set_xlabel("content drift (1 − BERTScore against the unsteered answer; lower keeps more content)")
        ax.set_ylabel(f"Δ {METRIC_NAMES[metric]} vs its baseline")
        ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
        return _svg(fig, salt)
