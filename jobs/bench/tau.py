"""Choose SteerX's anchor threshold τ (nats) on the development data.

Launch: ``steerstore bench tau`` (the default model; reads ``../shared/data``; writes
``docs/figures/bench-tau.json``). Rerunnable: the word effects are cached per user (keyed by the
exact prompts and the model), so a rerun with another grid or rarity threshold does not score
again, a run with more users scores only the new ones, and an interrupted run resumes.

Criterion: anchors should be words characteristic of the user — they recur in the user's
*unseen* text and are not common among other users. Per source, each evaluated user has
``train_items`` items, scored by SteerX exactly as the refresh job scores history items
(``loo_prompts`` → ``token_effects`` → ``word_effects``; the other train items are the
context), and ``heldout_items`` further items that are never scored. A scored word type
(lowercase) is *user-distinctive* when it occurs in the user's held-out text and in the texts
of fewer than ``rarity`` × the reference users. For each τ the anchors are what
``select_anchors`` returns (absolute mode, with its ``min_anchors`` fallback) and are scored,
pooled over users (micro) and per user then averaged (macro): anchors per user, precision
(anchor types that are distinctive), recall (distinctive scored types that are anchors), F1 and
lift = precision / base rate (the distinctive fraction of all scored types). The recommended τ
has the best macro F1 (ties → the larger τ); the largest τ within one standard error of that
best is reported as the parsimonious choice, and a bootstrap over users says how often each τ
would have won (how firmly the data pin τ down). Percentile mode and two model-free references
(every scored word; words in ≥ 2 of the user's train items) are scored the same way.

Items. ``opening`` (blogs): as ``devdata`` builds them — the input asks to continue the
first sentence, the output is the next ``words`` words. ``whole`` (SynthPAI, whose comments are
mostly one short sentence, so few have an opening to split off): a fixed instruction, the
output is the comment's first ``words`` words. Held-out and reference texts are whole items,
each cut to ``text_words`` words so that every user contributes a similar amount of text.

The other-users counterfactual draws from a pool built like the refresh job builds it (the
train items of ``pool_users`` users, a seeded sample) — but from users that are neither
evaluated nor used as the rarity reference, so the words the counterfactual happens to show
cannot also decide which words count as common. Both counterfactuals are computed with
``token_effects`` in two passes that share the user-context condition (``effects_both``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from steerstore.infra.config import check, option
from steerstore.jobs import devdata
from steerstore.jobs.bench.common import write_figures
from steerstore.jobs.bench.tau_report import paired_vs_baseline, print_report
from steerstore.jobs.devdata import PROMPT, SOURCES
from steerstore.operators.history import HistoryContextConfig
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.steerx import _WORD, SteerXConfig, loo_prompts, select_anchors, token_effects, word_effects

log = logging.getLogger(__name__)

WHOLE_PROMPT = "Write a short post in your own voice."
ITEM_FORMATS = {"blogs": "opening", "synthpai": "whole"}
COUNTERFACTUALS = ("empty", "other_users")

ItemWords = list[tuple[str, list[tuple[str, float]]]]  # (item_id, [(word, effect nats)]) per scored item


@dataclass
class SteerXTauConfig:
    data_dir: str = option("../shared/data", help="folder with the development data")
    sources: list[str] = option(["blogs", "synthpai"], help="data sets (each is evaluated on its own)")
    users: int = option(16, help="evaluated users per source (the first N by id with enough items)")
    partition: str = option("tune", help="development users from this half only: tune (disjoint from the users "
                                         "steerstore eval evaluates by default), eval or all")
    train_items: int = option(4, help="scored items per user (each with the user's other train items as context)")
    heldout_items: int = option(8, help="further items per user, never scored: where a distinctive word must recur")
    words: int = option(60, help="words per scored output")
    text_words: int = option(200, help="held-out and reference texts: each item cut to this many words (0 = whole)")
    item_format: str = option("auto", help="opening (continue the first sentence), whole (fixed instruction), "
                                           "or auto (blogs: opening, synthpai: whole)")
    context_items: int = option(4, help="other train items of the user shown as context (k), as SteerX's default")
    pool_users: int = option(16, help="users (seeded, neither evaluated nor reference) whose train items form "
                                      "the other-users counterfactual pool")
    counterfactuals: list[str] = option(list(COUNTERFACTUALS), help="empty and/or other_users")
    counterfactual_draw: str = option("item", help="other_users: one draw of other users' items per user, per "
                                                   "factual context or per item (steerx.counterfactual_draw)")
    selection: str = option("recent", help="which other train items are the context: recent, bm25 or blocks "
                                           "(steerx.history.selection)")
    taus: list[float] = option([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
                               help="absolute-mode τ grid (nats)")
    percentiles: list[float] = option([80.0, 90.0, 95.0], help="percentile-mode grid, for comparison")
    min_anchors: int = option(5, help="SteerX's fallback: when fewer words pass, the top-m are kept")
    rarity: float = option(0.1, help="a distinctive word occurs for fewer than this fraction of the reference users")
    seed: int = option(0, help="seed of the item order, the pool and the counterfactual")
    threads: int | None = option(None, help="torch CPU threads; default torch's")
    cache_dir: str = option("./steerstore-out/steerx-tau-cache", help="word-effect cache ('' = no cache)")
    json: str = option("docs/figures/bench-tau.json", help="where the figures are written ('' = print only)")
    baseline: str = option("", help="a figures file of an earlier run on the same users (e.g. another selection or "
                                    "draw): each τ's per-user F1 is compared with it, paired (variant − baseline)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})

    def __post_init__(self) -> None:
        check(bool(self.sources) and set(self.sources) <= set(SOURCES), f"sources must be among {sorted(SOURCES)}")
        check(bool(self.counterfactuals) and set(self.counterfactuals) <= set(COUNTERFACTUALS),
              f"counterfactuals must be among {list(COUNTERFACTUALS)}")
        check(self.item_format in ("auto", "opening", "whole"), "item_format must be auto, opening or whole")
        check(self.counterfactual_draw in ("user", "context", "item"),
              "counterfactual_draw must be user, context or item")
        check(self.selection in ("recent", "bm25", "blocks"), "selection must be recent, bm25 or blocks")
        check(self.users >= 2 and self.train_items >= 2 and self.heldout_items >= 1,
              "need >= 2 users, >= 2 train items and >= 1 held-out item per user")
        check(self.words >= 2 and self.text_words >= 0, "words must be >= 2 and text_words >= 0")
        check(0 < self.rarity <= 1, "rarity must be in (0, 1]")
        check(self.pool_users >= 2, "pool_users must be >= 2")
        check(self.partition in devdata.PARTITIONS, f"partition must be one of {list(devdata.PARTITIONS)}")
        check(self.min_anchors >= 1, "min_anchors must be >= 1")
        check(bool(self.taus), "taus must not be empty")
        check(all(0 < p < 100 for p in self.percentiles), "percentiles must be in (0, 100)")


# ---------------------------------------------------------------------------------- the data

def _cut(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts[:words] if words else parts)


def load_source(config: SteerXTauConfig, source: str) -> dict[str, dict]:
    """user_id -> {"train": [SteerX items], "heldout": [texts], "texts": [texts]} for every user of the source.

    Items are shuffled per user (seeded, in the same order as ``devdata.segments``);
    the train items are the first ``train_items`` usable ones, the held-out items the next
    ``heldout_items`` of the rest. ``texts`` (train + held-out, whole, cut to ``text_words``) is
    what the rarity reference sees of the user. A user is complete when both lists are full.
    """
    fmt = ITEM_FORMATS[source] if config.item_format == "auto" else config.item_format
    rows = [r for r in devdata.read_users(config.data_dir, source) if devdata.in_partition(r["user_id"],
                                                                                           config.partition)]
    rng = random.Random(config.seed)
    users = {}
    for row in rows:
        uid = row["user_id"]
        items = sorted(row["items"], key=lambda it: it["id"])
        rng.shuffle(items)
        train, used = [], set()
        for k, it in enumerate(items):
            if len(train) == config.train_items:
                break
            if fmt == "opening":
                split = devdata.split_opening(it["text"], config.words)
                if split is None:
                    continue
                prompt, output = PROMPT.format(opening=split[0]), split[1]
            else:
                output = _cut(it["text"], config.words)
                if len(output.split()) < 3:
                    continue
                prompt = WHOLE_PROMPT
            train.append({"item_id": f"{uid}/{it['id']}", "user_id": uid, "input": prompt, "output": output})
            used.add(k)
        heldout = [_cut(it["text"], config.text_words) for k, it in enumerate(items) if k not in used]
        heldout = heldout[: config.heldout_items]
        texts = [_cut(items[k]["text"], config.text_words) for k in sorted(used)] + heldout
        users[uid] = {"train": train, "heldout": heldout, "texts": texts,
                      "complete": len(train) == config.train_items and len(heldout) == config.heldout_items}
    return users


def vocab(texts: Sequence[str]) -> set[str]:
    """Lowercase word types, with SteerX's word pattern."""
    return {m.group().lower() for t in texts for m in _WORD.finditer(t)}


def split_users(users: dict[str, dict], n_eval: int, n_pool: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(evaluated, pool, reference) user ids.

    The pool is a seeded sample of ``n_pool`` complete users (drawn first, so that it does not
    change with ``n_eval``); the evaluated users are the first ``n_eval`` other complete users
    by id; everyone not in the pool is reference (each evaluated user for the others).
    """
    complete = sorted(u for u, d in users.items() if d["complete"])
    pool = sorted(random.Random(seed + 2).sample(complete, min(n_pool, max(0, len(complete) - 2))))
    evaluated = [u for u in complete if u not in set(pool)][:n_eval]
    if len(evaluated) < 2:
        raise ValueError(f"only {len(evaluated)} users have enough usable items; lower train_items, heldout_items "
                         "or words, or use item_format=whole")
    reference = sorted(u for u in users if u not in set(pool))
    return evaluated, pool, reference


def distinctive_words(scored: set[str], heldout: set[str], others: Sequence[set[str]], rarity: float) -> set[str]:
    """Scored types that recur in the held-out text and occur for fewer than ``rarity`` × len(others) other users."""
    limit = rarity * len(others)
    return {w for w in scored & heldout if sum(w in o for o in others) < limit}


# ---------------------------------------------------------------------------------- the metrics

def scored_types(item_words: ItemWords) -> set[str]:
    return {w.lower() for _, words in item_words for w, _ in words}


def anchor_selector(mode: str, value: float, min_anchors: int) -> Callable[[ItemWords], set[str]]:
    """SteerX's own selection (``select_anchors``) as a set of word types."""
    sx = SteerXConfig(anchor_mode=mode, min_anchors=min_anchors,  # type: ignore[arg-type]
                      **({"tau": value} if mode == "absolute" else {"percentile": value}))
    return lambda item_words: {a["word"] for a in select_anchors(item_words, sx)}


def recurring_selector(min_items: int = 2) -> Callable[[ItemWords], set[str]]:
    """Model-free reference: word types that occur in at least ``min_items`` of the user's scored items."""
    def select(item_words: ItemWords) -> set[str]:
        counts: dict[str, int] = {}
        for _, words in item_words:
            for w in {w.lower() for w, _ in words}:
                counts[w] = counts.get(w, 0) + 1
        return {w for w, c in counts.items() if c >= min_items}
    return select


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def evaluate(users: dict[str, tuple[ItemWords, set[str]]], select: Callable[[ItemWords], set[str]],
             fallback: Callable[[ItemWords], bool] | None = None) -> dict:
    """Micro and macro anchor metrics over users given (item words, distinctive types) per user.

    Macro precision averages the users with anchors; macro recall, F1 and lift the users with at
    least one distinctive scored type (F1 is 0 for such a user when no anchor is distinctive).
    """
    tp = n_anchor = n_dist = n_scored = 0
    per_p, per_r, per_f1, per_lift, per_a, n_fallback, user_f1 = [], [], [], [], [], 0, {}
    signature = hashlib.sha256()
    for user, (item_words, distinctive) in sorted(users.items()):
        scored = scored_types(item_words)
        dist = distinctive & scored
        anchors = select(item_words)
        signature.update(json.dumps([user, sorted(anchors)]).encode())
        hit = len(anchors & dist)
        tp, n_anchor, n_dist, n_scored = tp + hit, n_anchor + len(anchors), n_dist + len(dist), n_scored + len(scored)
        per_a.append(len(anchors))
        n_fallback += bool(fallback and fallback(item_words))
        p = hit / len(anchors) if anchors else None
        if p is not None:
            per_p.append(p)
        if dist:
            r = hit / len(dist)
            per_r.append(r)
            per_f1.append(_f1(p or 0.0, r))
            user_f1[user] = per_f1[-1]
            if p is not None:
                per_lift.append(p / (len(dist) / len(scored)))
    p = tp / n_anchor if n_anchor else 0.0
    r = tp / n_dist if n_dist else 0.0
    base = n_dist / n_scored if n_scored else 0.0
    f1_se = float(np.std(per_f1, ddof=1) / math.sqrt(len(per_f1))) if len(per_f1) > 1 else 0.0
    return {
        "users": len(users), "users_with_distinctive": len(per_r), "users_at_fallback": n_fallback,
        "anchor_sets": signature.hexdigest()[:12],
        "anchors_per_user": float(np.mean(per_a)) if per_a else 0.0, "scored_types": n_scored,
        "distinctive_types": n_dist, "base_rate": base,
        "micro": {"precision": p, "recall": r, "f1": _f1(p, r), "lift": p / base if base else None},
        "macro": {"precision": _mean(per_p), "recall": _mean(per_r), "f1": _mean(per_f1), "f1_se": f1_se,
                  "lift": _mean(per_lift)},
        "user_f1": user_f1,
    }


def _below(mode: str, value: float, min_anchors: int) -> Callable[[ItemWords], bool]:
    """Whether SteerX falls back to the top-m for this user (fewer than ``min_anchors`` words pass)."""
    def check_user(item_words: ItemWords) -> bool:
        effects = np.asarray([e for _, words in item_words for _, e in words])
        if effects.size == 0:
            return True
        threshold = value if mode == "absolute" else float(np.percentile(effects, value))
        return int((effects >= threshold).sum()) < min_anchors
    return check_user


def _choose(rows: Sequence[dict], f1: Sequence[float], tol: float) -> dict:
    best = max(f1)
    return max((r for r, f in zip(rows, f1) if f >= best - tol), key=lambda r: r["tau"])


def recommend(rows: Sequence[dict], tol: float = 1e-9, resamples: int = 1000, seed: int = 0) -> dict:
    """The τ with the best macro F1 (ties → the larger τ), the largest τ within one SE of that best,
    and how often each τ wins when the users are resampled (bootstrap; the same rule).

    τ values that select exactly the same anchors (typically every user at the ``min_anchors``
    fallback) are one choice, represented by the smallest of them: a larger τ there changes nothing.
    """
    distinct: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["tau"]):
        distinct.setdefault(r["anchor_sets"], r)
    scored = [r for r in distinct.values() if r["macro"]["f1"] is not None]
    if not scored:
        raise ValueError("no τ has a macro F1 (no user has a distinctive scored word)")
    best = _choose(scored, [r["macro"]["f1"] for r in scored], tol)
    floor = best["macro"]["f1"] - best["macro"]["f1_se"] - tol
    parsimonious = max((r for r in scored if r["macro"]["f1"] >= floor), key=lambda r: r["tau"])
    wins: dict[float, int] = {}
    users = sorted(best.get("user_f1", {}))
    if resamples and users:
        f1 = np.asarray([[r["user_f1"][u] for u in users] for r in scored])  # (τ, users)
        rng = np.random.default_rng(seed)
        for _ in range(resamples):
            pick = _choose(scored, f1[:, rng.integers(0, len(users), len(users))].mean(1).tolist(), tol)
            wins[pick["tau"]] = wins.get(pick["tau"], 0) + 1
    return {"tau": best["tau"], "macro_f1": best["macro"]["f1"], "macro_f1_se": best["macro"]["f1_se"],
            "users_at_fallback": best["users_at_fallback"], "users": best["users"],
            "tau_within_1se": parsimonious["tau"], "macro_f1_within_1se": parsimonious["macro"]["f1"],
            "bootstrap_wins": {f"{t:g}": round(n / resamples, 3) for t, n in sorted(wins.items())}}


def curves(users: dict[str, tuple[ItemWords, set[str]]], config: SteerXTauConfig) -> dict:
    """Every metric along the τ grid and the percentile grid, the references and the recommendation."""
    m = config.min_anchors
    absolute = [{"tau": t, **evaluate(users, anchor_selector("absolute", t, m), _below("absolute", t, m))}
                for t in sorted(config.taus)]
    percentile = [{"percentile": q, **evaluate(users, anchor_selector("percentile", q, m), _below("percentile", q, m))}
                  for q in sorted(config.percentiles)]
    references = {"all scored words": evaluate(users, lambda iw: scored_types(iw)),
                  "in >= 2 train items": evaluate(users, recurring_selector(2))}
    return {"absolute": absolute, "percentile": percentile, "references": references,
            "recommended": recommend(absolute)}


# ---------------------------------------------------------------------------------- scoring

def steerx_config(config: SteerXTauConfig, cf: str) -> SteerXConfig:
    return SteerXConfig(counterfactual=cf, seed=config.seed, min_anchors=config.min_anchors,  # type: ignore[arg-type]
                        counterfactual_draw=config.counterfactual_draw,  # type: ignore[arg-type]
                        history=HistoryContextConfig(context_items=config.context_items, max_items=config.train_items,
                                                     selection=config.selection))  # type: ignore[arg-type]


def effects_both(runtime: ModelRuntime, empty: Sequence[dict], other: Sequence[dict]) -> tuple[list, list]:
    """Δ under both counterfactuals with ``token_effects``, scoring the user-context condition once.

    ``empty`` and ``other`` are ``loo_prompts`` of the same items (same prompt, same output). The
    second pass scores the other-users prompt against the empty one, so
    Δ_other = (log p_user − log p_∅) − (log p_other − log p_∅): the long user-context condition is
    scored once instead of twice.
    """
    for e, o in zip(empty, other, strict=True):
        if e["prompt"] != o["prompt"] or e["output"] != o["output"]:
            raise ValueError("both counterfactuals must score the same items with the same context")
    d_empty = token_effects(runtime, empty)
    swapped = [{"prompt": o["counterfactual"], "counterfactual": e["counterfactual"], "output": o["output"]}
               for e, o in zip(empty, other)]
    d_swap = token_effects(runtime, swapped)
    return d_empty, [de - ds for de, ds in zip(d_empty, d_swap)]


def _user_key(model: str, scored: dict[str, list[dict]]) -> str:
    """What one user's word effects depend on: the model and every scored prompt pair."""
    blob = json.dumps([model, {cf: [(s["item_id"], s["prompt"], s["counterfactual"], s["output"]) for s in items]
                               for cf, items in sorted(scored.items())}])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Scorer:
    """Loads the model on first use; word effects per user, through a per-user cache when there is one.

    The cache (one JSON file per source) is written after every few users, so an interrupted run
    resumes, and a run with more users scores only the new ones.
    """

    def __init__(self, config: SteerXTauConfig):
        self.config = config
        self._runtime: ModelRuntime | None = None

    @property
    def runtime(self) -> ModelRuntime:
        if self._runtime is None:
            if self.config.threads:
                import torch  # noqa: PLC0415

                torch.set_num_threads(self.config.threads)
            self._runtime = ModelRuntime(self.config.model)
        return self._runtime

    def word_effects(self, source: str, train: dict[str, list[dict]], pool: list[dict]) -> tuple[dict, dict]:
        """({counterfactual: {user: item words}}, timing) for one source, all counterfactuals."""
        cfs = list(self.config.counterfactuals)
        scored = {u: {cf: loo_prompts(u, items, pool, steerx_config(self.config, cf)) for cf in cfs}
                  for u, items in train.items()}
        keys = {u: _user_key(self.config.model.name_or_path, scored[u]) for u in train}
        path = Path(self.config.cache_dir) / f"steerx-tau-{source}.json" if self.config.cache_dir else None
        cache = json.loads(path.read_text()) if path is not None and path.exists() else {}
        words: dict[str, dict[str, ItemWords]] = {cf: {} for cf in cfs}
        todo = []
        for u in train:
            hit = cache.get(u)
            if hit and hit["key"] == keys[u]:
                for cf in cfs:
                    words[cf][u] = [(i, [(w, e) for w, e in ws]) for i, ws in hit["words"][cf]]
            else:
                todo.append(u)
        if len(todo) < len(train):
            log.info("steerx-tau: %s: %d users' word effects from the cache %s", source, len(train) - len(todo), path)
        start, tokens = time.perf_counter(), 0
        for first in range(0, len(todo), 4):  # a few users per pass: full micro-batches, progress, resumable
            rt = self.runtime
            chunk = todo[first:first + 4]
            items = {cf: [s for u in chunk for s in scored[u][cf]] for cf in cfs}
            if len(cfs) == 2:
                deltas = dict(zip(COUNTERFACTUALS, effects_both(rt, items["empty"], items["other_users"])))
                prompts = ([s["prompt"] for s in items["empty"]] + [s["counterfactual"] for s in items["empty"]] * 2
                           + [s["counterfactual"] for s in items["other_users"]])
                outputs = [s["output"] for s in items["empty"]] * 4
            else:
                deltas = {cfs[0]: token_effects(rt, items[cfs[0]])}
                prompts = [s["prompt"] for s in items[cfs[0]]] + [s["counterfactual"] for s in items[cfs[0]]]
                outputs = [s["output"] for s in items[cfs[0]]] * 2
            tokens += sum(len(e.ids) for e in rt.encode(prompts, outputs))
            for cf in cfs:
                pairs = iter(zip(items[cf], deltas[cf]))
                for u in chunk:
                    words[cf][u] = [(s["item_id"], word_effects(rt.tokenizer, s["output"], d))
                                    for s, d in (next(pairs) for _ in scored[u][cf])]
            if path is not None:
                cache.update({u: {"key": keys[u], "words": {cf: words[cf][u] for cf in cfs}} for u in chunk})
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cache))
                tmp.replace(path)
            log.info("steerx-tau: %s: %d/%d users scored (%.0f s)", source, first + len(chunk), len(todo),
                     time.perf_counter() - start)
        seconds = time.perf_counter() - start
        timing = {"seconds": round(seconds, 1), "users_scored": len(todo), "users_cached": len(train) - len(todo),
                  "items": sum(len(scored[u][cfs[0]]) for u in todo), "tokens": tokens,
                  "tokens_per_s": round(tokens / seconds, 1) if todo and seconds else None}
        return words, timing


# ---------------------------------------------------------------------------------- the job

def run_source(config: SteerXTauConfig, source: str, scorer: _Scorer) -> dict:
    users = load_source(config, source)
    evaluated, pool_users, reference = split_users(users, config.users, config.pool_users, config.seed)
    if "other_users" in config.counterfactuals and len(pool_users) < 2:
        raise ValueError(f"{source}: only {len(pool_users)} users for the other-users pool; the source has too few "
                         "users with enough items")
    pool = [it for u in pool_users for it in users[u]["train"]]
    vocabs = {u: vocab(users[u]["texts"]) for u in reference}
    heldout = {u: vocab(users[u]["heldout"]) for u in evaluated}
    result = {"users": len(evaluated), "pool_users": len(pool_users), "pool_items": len(pool),
              "reference_users": len(reference) - 1, "item_format": ITEM_FORMATS[source]
              if config.item_format == "auto" else config.item_format, "counterfactuals": {}}
    all_words, timing = scorer.word_effects(source, {u: users[u]["train"] for u in evaluated}, pool)
    result["timing"] = timing
    for cf in config.counterfactuals:
        words = all_words[cf]
        labelled = {u: (words[u], distinctive_words(scored_types(words[u]), heldout[u],
                                                    [vocabs[v] for v in reference if v != u], config.rarity))
                    for u in evaluated}
        effects = np.asarray([e for u in evaluated for _, ws in words[u] for _, e in ws])
        result["counterfactuals"][cf] = {
            "scored_words": int(effects.size),
            "effect_percentiles": {str(q): round(float(np.percentile(effects, q)), 3)
                                   for q in (10, 50, 80, 90, 95, 99)},
            **curves(labelled, config)}
    return result


def main(config: SteerXTauConfig) -> dict:
    start = time.perf_counter()
    scorer = _Scorer(config)
    report = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k != "model"},
              "model": config.model.name_or_path, "sources": {}}
    for source in config.sources:
        report["sources"][source] = run_source(config, source, scorer)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if config.baseline:
        report["paired_vs_baseline"] = paired_vs_baseline(report, json.loads(Path(config.baseline).read_text()),
                                                          config.seed)
        report["baseline"] = config.baseline
    print_report(report)
    print(f"\ntotal {report['seconds']} s")
    if config.json:
        write_figures(report, config.json, quiet=True)
        print(f"written to {config.json}")
    return report


COMMAND = (SteerXTauConfig, main, "choose SteerX's anchor threshold τ on the development data (precision/recall "
                                  "of anchors against words the user reuses in unseen text)")
