"""Step 5 of the evaluation: the run's files (Parquet tables, summary.json, the report) and the printed table."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from steerstore.infra import storage
from steerstore.infra.storage import StorageConfig
from steerstore.jobs.evaluate.config import LABELS
from steerstore.jobs.evaluate.score import setting_text

if TYPE_CHECKING:  # only for annotations: writing needs no model
    from steerstore.jobs.evaluate.generate import Generator


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in rows)


def _json_default(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _notes(summary: pd.DataFrame, gen: Generator) -> list[str]:
    notes = []
    if gen.descriptions:
        d = gen.descriptions
        notes.append(f"SteerX: {d['with_description']} of {d['users']} users got a valid style description"
                     + "".join(f"; {n} without: {why}" for why, n in d["without"].items()))
    for method, chosen in getattr(gen, "recommendations", {}).items():
        notes.append(f"{LABELS[method]}: each user's choice resolved to "
                     + ", ".join(f"{what}: {n} user{'s' * (n != 1)}" for what, n in chosen.most_common()))
    for method, users in gen.missing.items():
        why = Counter(users.values()).most_common()
        notes.append(f"{LABELS[method]}: {len(users)} of {len(gen.users)} users not evaluated ("
                     + "; ".join(f"{n}: {reason}" for reason, n in why) + ")")
    empty = summary[summary["empty_outputs"] > 0]
    for _, r in empty.iterrows():
        notes.append(f"{r['label']} at {r['parameter'] or 'default'} {r['strength']:g}: {r['empty_outputs']} empty "
                     "outputs (scored as written; their perplexity is that of ending the answer at once)")
    for _, r in summary[summary.get("users_without_delta", pd.Series(0, index=summary.index)) > 0].iterrows():
        notes.append(f"{r['label']} at {r['parameter'] or 'default'} {r['strength']:g}: {r['users_without_delta']} "
                     f"of {r['n_users']} users have a non-finite Δ in some metric and are left out of its mean and CI")
    return notes


def _examples(scored: pd.DataFrame, n: int) -> pd.DataFrame:
    """Every method's recommended output for the first held-out item of the first ``n`` users."""
    rec = scored[scored["recommended"]]
    first: dict[str, tuple] = {}
    for key in zip(rec["user_id"], rec["item_id"]):
        first.setdefault(key[0], key)
    keys = set(list(first.values())[:n])
    picked = rec[[k in keys for k in zip(rec["user_id"], rec["item_id"])]]
    return picked[["user_id", "item_id", "input", "target", "label", "output"]].reset_index(drop=True)


def _write(uri: str, cfg: StorageConfig, html: str, items: pd.DataFrame, summary: pd.DataFrame,
           per_user: pd.DataFrame, preference: pd.DataFrame, meta: dict,
           by_source: pd.DataFrame | None = None) -> None:
    def parquet(df: pd.DataFrame) -> bytes:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        return sink.getvalue()

    storage.write_text(storage.join(uri, "report.html"), html, cfg)
    by_source = by_source if by_source is not None else pd.DataFrame()
    tables = [("items", items), ("summary", summary), ("per_user", per_user), ("preference", preference)]
    for name, df in tables + ([("by_source", by_source)] if not by_source.empty else []):
        storage.write_bytes(storage.join(uri, f"{name}.parquet"), parquet(df), cfg)
    doc = {"meta": meta, "summary": summary.to_dict("records"), "preference": preference.to_dict("records"),
           "by_source": by_source.to_dict("records")}
    storage.write_text(storage.join(uri, "summary.json"),
                       json.dumps(_finite(doc), indent=2, default=_json_default, ensure_ascii=False), cfg)


def _finite(value):
    """NaN / inf as null, so summary.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def ship_line(ship: dict) -> str:
    """One sentence: what to ship, by what figure, and the caveat."""
    if not ship:
        return ""
    if ship["method"] == "none":
        return f"What to ship: no personalisation — {ship['reason']}. Caveat: {ship['caveat']}."
    return (f"What to ship: {ship['label']}{setting_text(ship.get('parameter'), ship.get('strength'))} — Δ{ship['metric']} {ship['delta']:+.4f} "
            f"[{ship['delta_lo']:+.4f}, {ship['delta_hi']:+.4f}] over {ship['n_users']} users, perplexity "
            f"{ship['perplexity_ratio']:.2f}x its baseline's ({ship['reason']}). Caveat: {ship['caveat']}.")


def print_summary(summary: pd.DataFrame, preference: pd.DataFrame, unsteered: dict | None = None,
                  ship: dict | None = None, by_source: pd.DataFrame | None = None, metric: str = "meteor") -> None:
    """The recommended setting of each method: metric means and Δ vs no personalisation [95% CI]."""
    rec = summary[summary["recommended"]]
    print(f"\n{'method':<36}{'strength':>9}{'users':>6}{'ROUGE-1':>9}{'ROUGE-L':>9}{'METEOR':>8}{'BLEU':>7}"
          f"{'BERTSc':>8}{'PPL':>8}{'drift':>7}   ΔROUGE-L [CI]           ΔMETEOR [CI]")
    for _, r in rec.iterrows():
        strength = "" if r["parameter"] == "" else f"{r['parameter'][:1]}={r['strength']:g}"
        line = (f"{r['label']:<36}{strength:>9}{r['n_users']:>6}{r['rouge1']:>9.4f}{r['rougeL']:>9.4f}"
                f"{r['meteor']:>8.4f}{r['bleu']:>7.2f}{r['bertscore']:>8.4f}{r['perplexity']:>8.2f}{r['drift']:>7.3f}")
        if r["method"] != "none":
            line += (f"   {r['delta_rougeL']:+.4f} [{r['delta_rougeL_lo']:+.4f},{r['delta_rougeL_hi']:+.4f}]"
                     f"  {r['delta_meteor']:+.4f} [{r['delta_meteor_lo']:+.4f},{r['delta_meteor_hi']:+.4f}]")
        print(line)
    if not preference.empty:
        print("\npreference accuracy: share of held-out pairs where steering raises the own-vs-other margin "
              "(chance 0.5; CI: users resampled)")
        print(f"{'method':<36}{'strength':>9}{'pairs':>7}{'users':>7}{'share [CI]':>24}{'margin gain':>13}")
        for _, r in preference.iterrows():
            print(f"{r['label']:<36}{r['strength']:>9.3g}{r['n_pairs']:>7}{r['n_users']:>7}"
                  f"   {r['pair_accuracy']:.3f} [{r['pair_accuracy_lo']:.3f},{r['pair_accuracy_hi']:.3f}]"
                  f"{r['mean_margin_gain']:>+13.3f}")
    if unsteered:
        print(f"unsteered model, apart: prefers the user's own text (per-token log-likelihood) in "
              f"{unsteered['pair_accuracy']:.3f} [{unsteered['pair_accuracy_lo']:.3f},"
              f"{unsteered['pair_accuracy_hi']:.3f}] of {unsteered['n_pairs']} pairs "
              f"(mean margin {unsteered['mean_margin_per_token']:+.3f} nats/token; chance depends on the pairs)")
    if by_source is not None and not by_source.empty:
        print(f"\nby data source: Δ{metric} vs the baseline [CI] (users)")
        names = sorted(by_source["source"].unique())
        print(f"{'method':<36}" + "".join(f"{n:>34}" for n in names))
        for label, grp in by_source[by_source["method"] != "none"].groupby("label", sort=False):
            cells = []
            for n in names:
                r = grp[grp["source"] == n]
                cells.append("" if r.empty else
                             f"{r[f'delta_{metric}'].iloc[0]:+.4f} [{r[f'delta_{metric}_lo'].iloc[0]:+.4f},"
                             f"{r[f'delta_{metric}_hi'].iloc[0]:+.4f}] ({r['n_users'].iloc[0]})")
            print(f"{str(label)[:35]:<36}" + "".join(f"{c:>34}" for c in cells))
    if ship:
        print("\n" + ship_line(ship))
