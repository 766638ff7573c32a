"""Step 4 of the evaluation: score the outputs, per user and per setting, against no personalisation."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict

import numpy as np
import pandas as pd
import torch

from steerstore.infra.reader import StoreReader, UserVectors
from steerstore.jobs.evaluate.config import COMPOSED_SUFFIX, KEYS, LABELS, METRICS
from steerstore.jobs.evaluate.split import Split
from steerstore.operators.history import HistoryContextConfig, retrieved_prompt
from steerstore.operators.metrics import METRICS as TEXT_METRICS
from steerstore.operators.metrics import MetricsConfig, bootstrap_ci, text_metrics
from steerstore.operators.runtime import Encoded, ModelRuntime
from steerstore.operators.scale import baseline, margins, unsteered_margin_per_token
from steerstore.operators.serving import Request, plan_requests, recommended_setting
from steerstore.operators.steerx import word_effects
from steerstore.schemas.methods import Family


def score_items(items: pd.DataFrame, runtime: ModelRuntime, metrics: MetricsConfig) -> pd.DataFrame:
    """Per item: the text metrics against the target, and the output's NLL under the unsteered model given the
    prompt it was decoded from (``prompt``: the input, or the history prompt; kept as ``decoded_from``) and
    given the plain input. Content drift needs every row of an item: ``content_drift``, once all are back."""
    pairs = list(dict.fromkeys(zip(items["output"], items["target"])))
    values = text_metrics([p for p, _ in pairs], [t for _, t in pairs], metrics, which=TEXT_METRICS)
    index = {pair: k for k, pair in enumerate(pairs)}
    rows = [index[p] for p in zip(items["output"], items["target"])]
    out = items.copy()
    for name in TEXT_METRICS:
        out[name] = np.asarray(values[name], dtype=np.float64)[rows]
    # fluency: log-likelihood of the output, nothing steered, given the prompt it was decoded from (greedy
    # unsteered decoding is the model's most likely answer there) and given the plain input (what the
    # history prompt adds shows as a higher perplexity here); each distinct prompt/output once, in one pass
    # (a row decoded from the plain input needs the same score twice)
    scores = _nll(runtime, list(dict.fromkeys([*zip(items["prompt"], items["output"]),
                                               *zip(items["input"], items["output"])])))
    for column, prompt in (("nll", "prompt"), ("nll_plain", "input")):
        found = [scores.get(t, (math.nan, 0)) for t in zip(items[prompt], items["output"])]
        out[column] = np.asarray([v for v, _ in found], dtype=np.float64)
        out[column.replace("nll", "tokens")] = np.asarray([c for _, c in found], dtype=np.int64)
    out["empty"] = ~out["output"].str.strip().astype(bool)
    out["decoded_from"] = items["prompt"]
    return out


def _nll(runtime: ModelRuntime, texts: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, int]]:
    """(NLL, tokens) of each (prompt, output) under the unsteered model; an empty output pays for ending."""
    scored = [t for t in texts if t[1].strip()]
    scores: dict[tuple[str, str], tuple[float, int]] = {}
    if scored:
        lp, n = runtime.response_logprobs([x for x, _ in scored], [y for _, y in scored])
        scores = {t: (-s, c) for t, s, c in zip(scored, lp.tolist(), n.tolist())}
    scores.update(_blank_nll(runtime, [t for t in texts if not t[1].strip()]))
    return scores


UNSTEERED = ("none", "history_prompt")  # greedy answers of the unsteered model: the references of content drift


def drift_pairs(items: pd.DataFrame) -> tuple[list[tuple[str, str]], list[int]]:
    """The distinct (output, reference) pairs of scored rows, and each row's index into them (−1: the reference
    was not decoded). The reference is the unsteered answer to the same prompt (``decoded_from``: the planned
    prompt), except for history in prompt itself, whose reference is no personalisation's answer to the same
    item: its drift is what showing the history moves, the scale of the steered rows' drift on top of it."""
    keys = list(zip(items["user_id"], items["item_id"], items["decoded_from"]))
    unsteered = {k: o for k, o, m in zip(keys, items["output"], items["method"]) if m in UNSTEERED}
    plain = {k[:2]: o for k, o, m in zip(keys, items["output"], items["method"]) if m == "none"}
    pairs: dict[tuple[str, str], int] = {}
    index = []
    for k, o, m in zip(keys, items["output"], items["method"]):
        reference = plain.get(k[:2]) if m == "history_prompt" else unsteered.get(k)
        index.append(-1 if reference is None else pairs.setdefault((o, reference), len(pairs)))
    return list(pairs), index


def content_drift(items: pd.DataFrame, bertscore) -> np.ndarray:
    """Per row: 1 − BERTScore F1 of its output against the unsteered answer decoded from the same prompt (no
    personalisation's, or history in prompt's for a method on top of it; for history in prompt itself, no
    personalisation's); NaN without one. ``bertscore`` maps
    (outputs, references) to F1 values (the workers' scorer)."""
    pairs, index = drift_pairs(items)
    f1 = np.asarray(bertscore([p for p, _ in pairs], [r for _, r in pairs]) if pairs else [], dtype=np.float64)
    return np.asarray([1.0 - f1[i] if i >= 0 else np.nan for i in index], dtype=np.float64)


def _blank_nll(runtime: ModelRuntime, texts: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, int]]:
    """An empty (or whitespace-only) output pays its likelihood too: its tokens and then ending there.

    Without this a method that stops at once would have no perplexity at all. Decoding stops on any
    end-of-sequence id, so ending costs −log Σ_e p(e | ...) over all of them (one token). A model
    without one leaves these outputs unscored (NaN).
    """
    if not texts or not runtime.eos_token_ids:
        return {}
    base = runtime.encode([x for x, _ in texts], [y for _, y in texts])
    per_stop = [runtime.token_logprobs([Encoded(e.ids + [stop], e.prompt_len) for e in base])
                for stop in runtime.eos_token_ids]
    out = {}
    for k, t in enumerate(texts):
        body = per_stop[0][k][:-1]  # the output's own tokens (the same under every end token)
        end = torch.logsumexp(torch.stack([lps[k][-1] for lps in per_stop]), 0)
        out[t] = (-float(body.sum() + end), int(body.numel()) + 1)
    return out


def per_user_table(items: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, user): mean text metrics and drift; perplexity = exp(Σ NLL / Σ tokens) over the user's
    items, given the prompt decoded from (``perplexity``) and given the plain input (``perplexity_plain``)."""
    keys = KEYS + ["user_id"]
    g = items.fillna({"strength": -1.0}).groupby(keys, sort=False)
    users = g[list(TEXT_METRICS)].mean()
    users["drift"] = g["drift"].mean()
    for suffix in ("", "_plain"):
        sums = g[[f"nll{suffix}", f"tokens{suffix}"]].sum()
        users[f"perplexity{suffix}"] = np.where(sums[f"tokens{suffix}"] > 0, np.exp(
            sums[f"nll{suffix}"] / sums[f"tokens{suffix}"].clip(lower=1)), np.nan)
    users["n_items"] = g.size()
    users["empty_outputs"] = g["empty"].sum()
    users = users.reset_index()
    users["strength"] = users["strength"].where(users["parameter"] != "", np.nan)
    return users


def summarise(users: pd.DataFrame, metrics: MetricsConfig,
              baselines: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary per setting with Δ vs its baseline and bootstrap CIs over users, per-user Δ rows).

    The baseline is no personalisation unless ``baselines`` names another method for a method (e.g. DPS
    decoded on the history-in-prompt prompt is compared with history in prompt); ``baseline`` says which.
    """
    baselines = baselines or {}
    bases = {}
    for name in {"none", *baselines.values()}:
        bases[name] = users[(users["method"] == name) & users["recommended"]].set_index("user_id")
    if bases["none"].empty:
        raise ValueError("the evaluation needs the 'none' method (the baseline of every delta)")
    summary: list[dict] = []
    per_user: dict[tuple, dict] = {}  # (setting, user) -> the user's Δ per metric, recommended settings only
    for key, grp in users.groupby(KEYS, sort=False, dropna=False):
        row = dict(zip(KEYS, key))
        row["baseline"] = baselines.get(row["method"], "none")
        base = bases[row["baseline"]]
        present = grp["user_id"].isin(base.index).to_numpy()
        row["n_users"] = int(grp["user_id"].nunique())
        row["n_items"] = int(grp["n_items"].sum())
        row["empty_outputs"] = int(grp["empty_outputs"].sum())
        dropped: set[str] = set()  # users without a finite Δ in some metric: out of that metric's mean and CI
        for m in METRICS:
            vals = grp[m].to_numpy(dtype=float)
            row[m] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
            deltas = np.full(len(vals), np.nan)  # a user the baseline has no row for has no Δ
            deltas[present] = vals[present] - base.loc[grp["user_id"][present], m].to_numpy(dtype=float)
            finite = deltas[np.isfinite(deltas)]
            if row["method"] != row["baseline"]:
                dropped |= set(grp["user_id"][~np.isfinite(deltas)])
            if row["method"] == row["baseline"] or not len(finite):
                row[f"delta_{m}"] = row[f"delta_{m}_lo"] = row[f"delta_{m}_hi"] = math.nan
            else:
                mean, lo, hi = bootstrap_ci(finite, metrics)
                row[f"delta_{m}"], row[f"delta_{m}_lo"], row[f"delta_{m}_hi"] = mean, lo, hi
            if row["recommended"] and row["method"] != "none":
                for uid, d in zip(grp["user_id"], deltas):
                    entry = per_user.setdefault((key, uid), {
                        "user_id": uid, **{k: row[k] for k in ("method", "label", "parameter", "strength", "baseline")}})
                    entry[f"delta_{m}"] = float(d)
        row["users_without_delta"] = len(dropped)
        summary.append(row)
    return pd.DataFrame(summary), pd.DataFrame(list(per_user.values()))


# ---- what to ship ----------------------------------------------------------------------------

def ship_recommendation(summary: pd.DataFrame, users: pd.DataFrame, metric: str, max_perplexity_ratio: float,
                        model: str | None, metrics: MetricsConfig | None = None) -> dict:
    """The method and strength to ship: the best lower CI bound of Δ ``metric`` against no personalisation
    among settings whose perplexity stays within ``max_perplexity_ratio`` × their baseline's (no
    personalisation's; history in prompt's for a method decoded on top of it: both perplexities are taken
    given the prompt decoded from). None of them when no lower bound is above 0: then no personalisation
    is what the data supports.

    Every setting is ranked against no personalisation (a row the summary compares with another baseline,
    e.g. DPS on the history prompt, gets its Δ against none recomputed from ``users``)."""
    none = summary[summary["method"] == "none"]
    ref = float(none["perplexity"].iloc[0]) if len(none) else math.nan
    rows = summary[summary["method"] != "none"].copy()
    recommended = summary[summary["recommended"].astype(bool)]
    refs = dict(zip(recommended["method"], recommended["perplexity"].astype(float)))
    # each setting's fluency against its own baseline's (a composed method's: history in prompt's)
    reference = np.asarray([refs.get(r.get("baseline", "none"), ref) for _, r in rows.iterrows()], dtype=float)
    base = users[(users["method"] == "none")].set_index("user_id")[metric]
    for i, r in rows.iterrows():
        if r.get("baseline", "none") == "none":
            continue
        strength = -1.0 if not isinstance(r["strength"], float) or math.isnan(r["strength"]) else r["strength"]
        grp = users[(users["method"] == r["method"]) & (users["parameter"] == r["parameter"])
                    & (users["recommended"] == r["recommended"])
                    & np.isclose(users["strength"].fillna(-1.0).astype(float), strength)]
        d = (grp.set_index("user_id")[metric] - base).dropna().to_numpy(dtype=float)
        d = d[np.isfinite(d)]
        mean, lo, hi = bootstrap_ci(d, metrics) if len(d) else (math.nan,) * 3
        rows.loc[i, [f"delta_{metric}", f"delta_{metric}_lo", f"delta_{metric}_hi"]] = [mean, lo, hi]
    lo = f"delta_{metric}_lo"
    finite = np.isfinite(rows[lo].astype(float)).to_numpy()
    rows, reference = rows[finite], reference[finite]
    ratio = pd.Series(rows["perplexity"].astype(float).to_numpy() / np.where(reference > 0, reference, np.nan),
                      index=rows.index)
    fluent = rows[ratio.le(max_perplexity_ratio).to_numpy()]
    caveat = (f"chosen among {len(rows)} evaluated settings on the same users (the best of many is optimistic: "
              f"confirm on other users); measured with {model or 'this model'}: steering strengths and gains do "
              "not transfer across model sizes")
    out = {"metric": metric, "max_perplexity_ratio": max_perplexity_ratio, "settings": int(len(rows)),
           "fluent_settings": int(len(fluent)), "caveat": caveat}
    # settings whose Δ is above 0 with its CI but that cost too much fluency: said, never silently passed over
    above = rows[(rows[lo].astype(float) > 0).to_numpy() & ~ratio.le(max_perplexity_ratio).to_numpy()]
    dysfluent = "".join(f"; {r['label']}{setting_text(r['parameter'], r['strength'])} has Δ{metric} {r[f'delta_{metric}']:+.4f} [{r[lo]:+.4f}, "
                        f"{r[f'delta_{metric}_hi']:+.4f}] but perplexity {ratio[i]:.2f}x its baseline's"
                        for i, r in above.iterrows())
    if dysfluent:
        out["above_zero_but_dysfluent"] = int(len(above))
    if fluent.empty:
        return dict(out, method="none", reason="no personalised setting kept perplexity within "
                                              f"{max_perplexity_ratio:g}x of its baseline's" + dysfluent)
    best_index = fluent[lo].astype(float).idxmax()
    best = fluent.loc[best_index]
    found = {k: (None if isinstance(best[k], float) and math.isnan(best[k]) else best[k])
             for k in ("method", "label", "parameter", "strength")}
    figures = {"delta": float(best[f"delta_{metric}"]), "delta_lo": float(best[lo]),
               "delta_hi": float(best[f"delta_{metric}_hi"]), "perplexity_ratio": float(ratio[best_index]),
               "n_users": int(best["n_users"])}
    if figures["delta_lo"] <= 0:
        return dict(out, method="none", best_candidate={**found, **figures},
                    reason=f"no setting with perplexity within {max_perplexity_ratio:g}x of its baseline's has a "
                           f"Δ{metric} against it with a CI above 0 (best lower bound {figures['delta_lo']:+.4f}, "
                           f"{found['label']}): no personalisation is what this evaluation supports" + dysfluent)
    return dict(out, **found, **figures, reason=f"the best lower 95% bound of Δ{metric} against no personalisation "
                                               f"at perplexity within {max_perplexity_ratio:g}x of its baseline's")


def setting_text(parameter: str | None, strength) -> str:
    """" at α = 2" for a setting with a strength; "" for one without (no personalisation, history)."""
    if not parameter or not isinstance(strength, numbers.Real) or math.isnan(strength):
        return ""
    return f" at {parameter} = {strength:g}"


def summarise_by_source(users: pd.DataFrame, sources: dict[str, str], metrics: MetricsConfig,
                        baselines: dict[str, str] | None = None) -> pd.DataFrame:
    """The recommended settings' summary within each data source (``sources``: user -> source), with Δ and
    CIs over that source's users only; empty when the users come from fewer than two sources."""
    names = sorted({s for s in sources.values() if s})
    if len(names) < 2:
        return pd.DataFrame()
    parts = []
    for name in names:
        mine = users[users["user_id"].map(sources).eq(name)]
        if mine.empty or not ((mine["method"] == "none") & mine["recommended"]).any():
            continue
        summary, _ = summarise(mine[mine["recommended"]], metrics, baselines)
        parts.append(summary.assign(source=name))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ---- preference accuracy ---------------------------------------------------------------------

def preference_accuracy(runtime: ModelRuntime, reader: StoreReader, pairs: list[dict], metrics: MetricsConfig,
                        include: list[str], train: dict[str, list[dict]] | None = None,
                        history: HistoryContextConfig | None = None) -> tuple[pd.DataFrame, dict]:
    """(one row per steered method, the unsteered model's own preference) on the held-out pairs.

    A steered row counts the pairs where steering raises the own-vs-other margin,
    (log p(chosen) − log p(rejected)) steered minus unsteered: chance is about 0.5 (a small random
    push is as likely to raise as to lower it), and a ``random`` row measures it: a random direction
    with each CAA vector's norm, at the same layers and α. Its CI resamples
    users whole (their pairs pooled). The unsteered model's own preference — the share of pairs whose
    chosen text it already gives the higher per-token log-likelihood — answers another question
    (chance depends on the pairs) and is returned apart. A composed method (``caa+history``, ...) in
    ``include`` gets its row on top of the history prompt: each pair's prompt after the user's ``train``
    items retrieved as ``history`` shows them, its vectors at the strength chosen in that condition, the
    margin against the unsteered model on the same prompt.
    """
    if not pairs:
        return pd.DataFrame(), {}
    users = sorted({p["user_id"] for p in pairs})
    base = baseline(runtime, pairs)
    per_token = unsteered_margin_per_token(runtime, pairs, base)
    unsteered = _accuracy_row("none", "unsteered model (not a steering result)", math.nan, pairs, per_token > 0,
                              per_token, metrics)
    unsteered = {k.replace("mean_margin_gain", "mean_margin_per_token"): v for k, v in unsteered.items()}
    wanted = {m for m in ("population", "caa", "bt", "style_vector:history", "style_vector:description",
                          "style_vector:blend") if m in include or m + COMPOSED_SUFFIX in include}
    sources: dict[str, dict[str, UserVectors]] = {}
    if "population" in wanted and reader.population() is not None:  # one direction for all: the baseline
        sources["population"] = {u: reader.population() for u in users}
    if "caa" in wanted:
        sources["caa"] = reader.vectors(users)
    if "bt" in wanted:
        try:
            sources["bt"] = reader.bt(users)
        except KeyError:
            pass
    for source in ("history", "description", "blend"):
        if f"style_vector:{source}" in wanted:
            sources[f"style_vector:{source}"] = reader.vectors(users, method=Family.STEERX, source=source)
    rows = []
    for method, found in sources.items():
        if method in include:
            rows += _method_rows(runtime, reader, method, found, pairs, base, metrics, composed=False)
    composed = [m for m in sources if m + COMPOSED_SUFFIX in include]
    if composed and train is not None and history is not None:
        shown = [dict(p, prompt=retrieved_prompt(train.get(p["user_id"], []), p["prompt"], history)) for p in pairs]
        base = baseline(runtime, shown)
        for method in composed:
            rows += _method_rows(runtime, reader, method, sources[method], shown, base, metrics, composed=True)
    if getattr(reader, "manifest", {}).get("recommend"):  # each pair under what its user's recommendation serves
        if "recommended" in include:
            rows += recommended_rows(runtime, reader, pairs, metrics, composed=False)
        if "recommended" + COMPOSED_SUFFIX in include and train is not None and history is not None:
            rows += recommended_rows(runtime, reader, pairs, metrics, composed=True, train=train, history=history)
    return pd.DataFrame(rows), unsteered


def recommended_rows(runtime: ModelRuntime, reader: StoreReader, pairs: list[dict], metrics: MetricsConfig,
                     composed: bool, train: dict[str, list[dict]] | None = None,
                     history: HistoryContextConfig | None = None) -> list[dict]:
    """The ``recommended`` (``composed``: ``recommended+history``) preference rows: each pair's prompt sent as a
    ``recommended`` request (composed: with its user's training items as the request's history) and planned by
    serving's ``plan_requests``; chosen and rejected are scored under what it resolved to (a vector at its
    strength and layers, influence at its λ, DPS contrast at its γ, or nothing) by the recommendation's own
    candidate scorer. The margin gain is against the unsteered model on the same prompt (the history prompt for
    a request that has history), so a pair whose user is recommended nothing counts as not raised."""
    from steerstore.operators.recommend import Candidate, UserCase  # noqa: PLC0415
    from steerstore.operators.recommend import score as score_candidates  # noqa: PLC0415

    train = train or {}
    shown = {u: [{"input": t["input"], "output": t["output"]} for t in train.get(u, []) if (t.get("output") or "").strip()]
             for u in {p["user_id"] for p in pairs}} if composed else {}
    requests = [Request(p["user_id"], p["prompt"], "recommended", history=shown.get(p["user_id"]) or None)
                for p in pairs]
    plan, records = plan_requests(reader, requests)
    cases = []
    for k, (p, req, record) in enumerate(zip(pairs, requests, records)):
        condition = "history" if req.history else "plain"
        chosen = Candidate(condition, str(record.resolved))
        if plan.vectors[k] is not None:
            chosen.vector, chosen.scale, chosen.layers = plan.vectors[k]
        elif plan.contexts[k] is not None:
            chosen.method, chosen.scale, chosen.context = "influence", plan.lam[k], plan.contexts[k]
        elif plan.heads[k] is not None:
            chosen.method, chosen.scale, chosen.heads = "dps", plan.gamma[k], plan.heads[k]
            chosen.adaptive = plan.dps_settings[0]
        else:
            chosen.method = "none"
        for side in ("chosen", "rejected"):
            cases.append(UserCase(f"{k}|{side}", [{"input": p["prompt"], "output": p[side]}],
                                  req.history or [], [Candidate(condition, "none"), chosen]))
    gains = score_candidates(runtime, cases, history if composed else None)

    def gain(k: int, side: str) -> float:  # over the unsteered model on the request's own prompt
        (unsteered, steered), _ = gains[f"{k}|{side}"]
        return steered - unsteered

    margin = np.asarray([gain(k, "chosen") - gain(k, "rejected") for k in range(len(pairs))])
    name = "recommended" + (COMPOSED_SUFFIX if composed else "")
    return _accuracy_rows(name, LABELS[name], math.nan, pairs, margin, metrics)


def _method_rows(runtime: ModelRuntime, reader: StoreReader, method: str, found: dict[str, UserVectors],
                 pairs: list[dict], base, metrics: MetricsConfig, composed: bool) -> list[dict]:
    """A method's preference rows (and, for CAA, the random direction's) at its recommended setting."""
    evaluated = [p for p in pairs if p["user_id"] in found]
    if not evaluated:
        return []
    idx = [k for k, p in enumerate(pairs) if p["user_id"] in found]
    first = found[evaluated[0]["user_id"]]
    serve, _, source = method.partition(":")
    # each user's vector at its own recommended α (composed: the store's α in that condition)
    setting = {u: recommended_setting(reader, serve, source or None, found[u], composed)
               for u in {p["user_id"] for p in evaluated}}
    layers, scale = setting[evaluated[0]["user_id"]]
    vectors = {l: np.stack([found[p["user_id"]].at([l])[l] * setting[p["user_id"]][1] for p in evaluated])
               for l in layers}
    margin, _ = margins(runtime, evaluated, vectors, 1.0, base.select(idx), first.positions)
    name = method + COMPOSED_SUFFIX if composed else method
    rows = _accuracy_rows(name, LABELS[name], scale, evaluated, margin, metrics)
    if method == "caa":  # the null: a random direction of the same norm, at the same layers and α
        null = {l: _random_like(v, metrics.seed, l) for l, v in vectors.items()}
        margin, _ = margins(runtime, evaluated, null, 1.0, base.select(idx), first.positions)
        label = "random direction (null: CAA's norm, layers and α)" + (" + history in prompt" if composed else "")
        rows += _accuracy_rows("random" + (COMPOSED_SUFFIX if composed else ""), label, scale, evaluated, margin,
                               metrics)
    return rows


KINDS = {"neutral": "the model's own answer", "other_user": "another user's text"}


def _accuracy_rows(method: str, label: str, strength: float, pairs: list[dict], margin: np.ndarray,
                   metrics: MetricsConfig) -> list[dict]:
    """The method's row over all pairs (``pairs``: all), and one per kind of rejected text when they are mixed."""
    rows = [dict(_accuracy_row(method, label, strength, pairs, margin > 0, margin, metrics), pairs="all")]
    kinds = [p.get("rejected_kind") for p in pairs]
    if len(set(kinds)) > 1:
        for kind in sorted(set(kinds), key=str):
            idx = [k for k, x in enumerate(kinds) if x == kind]
            rows.append(dict(_accuracy_row(method, f"{label} · vs {KINDS.get(kind, kind)}", strength,
                                           [pairs[k] for k in idx], margin[idx] > 0, margin[idx], metrics),
                             pairs=kind))
    return rows


def _random_like(vectors: np.ndarray, seed: int, layer: int) -> np.ndarray:
    """Per row, a seeded random direction with that row's norm."""
    g = np.random.default_rng([seed, layer])
    r = g.standard_normal(vectors.shape)
    return (r / np.linalg.norm(r, axis=-1, keepdims=True) * np.linalg.norm(vectors, axis=-1, keepdims=True)
            ).astype(np.float32)


def _accuracy_row(method: str, label: str, strength: float, pairs: list[dict], hits: np.ndarray,
                  margin: np.ndarray, metrics: MetricsConfig) -> dict:
    by_user: dict[str, list[bool]] = defaultdict(list)
    for p, h in zip(pairs, hits):
        by_user[p["user_id"]].append(bool(h))
    acc = np.asarray([np.mean(v) for v in by_user.values()])
    counts = np.asarray([len(v) for v in by_user.values()], dtype=np.float64)
    share, share_lo, share_hi = bootstrap_ci(acc, metrics, weights=counts)  # pairs pooled, users resampled
    mean, lo, hi = bootstrap_ci(acc, metrics)
    return {"method": method, "label": label, "strength": strength, "pair_accuracy": share,
            "pair_accuracy_lo": share_lo, "pair_accuracy_hi": share_hi,
            "mean_margin_gain": float(np.mean(margin)),
            "user_accuracy": mean, "user_accuracy_lo": lo, "user_accuracy_hi": hi,
            "n_pairs": len(pairs), "n_users": len(by_user)}


# ---- token effects ---------------------------------------------------------------------------

def anchor_word_effects(reader: StoreReader, runtime: ModelRuntime, split: Split) -> np.ndarray:
    """The per-word leave-one-out effects the anchor threshold τ is applied to (Σ Δ of a word's tokens)."""
    table = reader.store.read_table("steerx_token_effects", reader.version)
    texts = {(u, i["item_id"]): i["output"] for u, items in split.train.items() for i in items}
    values = []
    for row in table.to_pylist():
        text = texts.get((row["user_id"], row["item_id"]))
        if text is None or row["delta"] is None:
            continue
        values.extend(e for _, e in word_effects(runtime.tokenizer, text, np.asarray(row["delta"])))
    return np.asarray(values, dtype=np.float64)
