"""The evaluation job: does each method personalise held-out text, and at what cost to fluency?

Launch: ``steerstore eval`` (the development data in ``../shared/data``, the default model) or
``steerstore eval --data.histories s3://bucket/histories.jsonl --out s3://bucket/eval-run``.

1. **Split.** Per user, the last ``data.heldout_items`` items by time are held out (a seeded
   split for users whose items lack timestamps, or when ``data.split`` is ``seeded``). A held-out
   item's ``input`` (e.g. the opening of a text) is the prompt and its ``output`` the target.
   An explicit held-out file (``data.heldout``, e.g. from ``steerstore import --format lamp``)
   replaces the split. Preference pairs are split per user the same way (seeded); without
   pairs, pairs are built from the histories: (input, the user's own output, a rejected text),
   training pairs from training items, held-out pairs from held-out items; the rejected side is by default the model's own greedy answer to the same input
   (``data.pair_rejected: neutral``), or another user's text from the same source (``other_user``).
   Nothing the refresh job fits — per-user or population — sees a held-out target.
2. **Refresh** on the training split only, into ``<out>/store`` (a new store version).
3. **Generate**, greedy, on every held-out item: no personalisation, history in the prompt
   (top-k training items by BM25), SteerX style vectors (history / description / blend
   sources: the disentangling ablation), SteerX influence decoding, per-user CAA, BT and DPS (on
   the history-in-prompt prompt, as in the paper, and compared with it), each at its recommended strength plus sweeps of γ / α / λ (and τ: each extra τ reruns the
   SteerX anchor and smoothing stages into a side store).
   When the store version records per-user recommendations, also each user's ``recommended``
   method and strength (alone, and on top of the history prompt: ``recommended+history``),
   resolved and decoded exactly as serving resolves a ``recommended`` request.
4. **Score**: ROUGE-1/L, METEOR, BLEU, BERTScore against the target; fluency as the perplexity
   of the output under the unsteered model (given the plain prompt); per-user deltas against
   no personalisation with bootstrap confidence intervals over users; preference accuracy on
   held-out pairs (the share where steering raises the own-vs-other margin; chance 0.5), with
   the unsteered model's own preference shown apart.
5. **Write** ``report.html`` (self-contained), ``items.parquet``, ``summary.parquet``,
   ``per_user.parquet``, ``preference.parquet`` and ``summary.json`` to
   ``<store>/versions/<version>/eval/<run id>/`` and print the summary table.

A user a method has no artifact for (quarantined for it, or no DPS head with a positive score)
is not evaluated for that method: ``n_users`` per row says how many were, and the missing
users are listed in ``summary.json`` with the reason, never silently replaced by another
method's output.
"""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pandas as pd

from steerstore.infra import storage
from steerstore.infra.config import from_dict
from steerstore.infra.extras import require
from steerstore.infra.reader import StoreReader
from steerstore.jobs import refresh
from steerstore.jobs.evaluate.config import (
    KEYS,
    LABELS,
    METHODS,
    METRICS,
    EvalConfig,
    EvalDataConfig,
    MethodsConfig,
    _flags,
    _refresh_config,
)
from steerstore.jobs.evaluate.generate import Generator, Setting, tau_curve, tau_sweep, with_main_tau
from steerstore.jobs.evaluate.score import (
    anchor_word_effects,
    per_user_table,
    preference_accuracy,
    score_items,
    ship_recommendation,
    summarise,
    summarise_by_source,
)
from steerstore.jobs.evaluate.split import (
    Split,
    _check_store_inputs,
    dev_histories,
    split_data,
    with_neutral_rejected,
)
from steerstore.jobs.evaluate.workers import EvalWorker, Workers
from steerstore.jobs.evaluate.write import _examples, _jsonl, _notes, _write, print_summary
from steerstore.operators.metrics import ensure_wordnet
from steerstore.operators.steerx import SteerXConfig

__all__ = ["KEYS", "LABELS", "METHODS", "METRICS", "EvalConfig", "EvalDataConfig", "Generator", "MethodsConfig",
           "Setting", "Split", "Workers", "EvalWorker", "anchor_word_effects", "dev_histories", "main", "per_user_table", "preference_accuracy",
           "print_summary", "score_items", "split_data", "summarise"]


def main(config: EvalConfig) -> dict:
    require("eval", "steerstore eval (metrics and the report)")  # fail before any work without the extra
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    ensure_wordnet(config.metrics)  # fail before any work when METEOR cannot run
    split = split_data(config.data, config.storage)
    workers = None
    if config.store:  # evaluate a store version refreshed earlier, on exactly this training split
        reader = StoreReader(config.store, config.storage, config.version)
        workers = Workers(config)
        reader.check_model(workers.fingerprint(), "the evaluation model")  # other weights: refused first, clearly
    if config.data.pair_rejected in ("neutral", "both") and split.built_pairs:
        # built pairs contrast the user with the model's own answer; without --store the workers are let go
        # before the refresh, whose actors load their own
        writer = workers or Workers(config)
        split = with_neutral_rejected(split, writer.generate, config.data.neutral_max_new_tokens,
                                      keep_other=config.data.pair_rejected == "both")
        if workers is None:
            writer.close()
            del writer
            _release_memory()
    texts = {"histories": _jsonl([i for items in split.train.values() for i in items]),
             "pairs": _jsonl(split.train_pairs)}
    if config.store:
        inputs = _check_store_inputs(reader, texts, config.storage)
        store_uri, summary_refresh = config.store, reader.manifest.get("summary", {})
        steerx = from_dict(SteerXConfig, reader.manifest["config"]["steerx"])
    else:
        inputs = {"histories": storage.join(config.out, "inputs", "train_histories.jsonl"),
                  "pairs": storage.join(config.out, "inputs", "train_pairs.jsonl")}
        for kind, uri in inputs.items():
            storage.write_text(uri, texts[kind], config.storage)
        steerx = config.steerx
    storage.write_text(storage.join(config.out, "inputs", "heldout.jsonl"), _jsonl(split.heldout), config.storage)
    storage.write_text(storage.join(config.out, "inputs", "heldout_pairs.jsonl"), _jsonl(split.heldout_pairs),
                       config.storage)
    lap("split")
    if not config.store:
        store_uri = storage.join(config.out, "store")
        summary_refresh = refresh.main(_refresh_config(config, inputs, store_uri))
        reader = StoreReader(store_uri, config.storage, summary_refresh["version"])
    lap("refresh")
    gen = Generator(reader, split, config)
    rows = gen.run()
    tau_stores = tau_sweep(config, inputs, gen, steerx)  # side stores' refreshes, before the workers load
    lap("tau sweep")
    workers = workers or Workers(config)
    workers.open(store_uri, reader.version, config.storage)  # each worker checks the store's weights are its own
    done = workers.run(rows)
    scored = pd.DataFrame(with_main_tau(done, steerx.tau, tau_curve(config)))
    scored["drift"] = workers.drift(scored)
    lap("generate and score")
    users = per_user_table(scored)
    summary, per_user = summarise(users, config.metrics, gen.baselines)
    by_source = summarise_by_source(users, split.sources, config.metrics, gen.baselines)
    ship = ship_recommendation(summary, users, config.methods.ship_metric, config.methods.max_perplexity_ratio,
                               reader.manifest["model"].get("id"), config.metrics)
    lap("metrics")
    preference, unsteered = workers.preference(split.heldout_pairs, config.methods.include, split.train)
    lap("preference accuracy")
    effects = workers.anchor_effects(split) if any(
        m.startswith(("style_vector", "influence")) for m in config.methods.include) else np.zeros(0)
    fingerprint = workers.fingerprint()  # checked against the store's by open()
    workers.close()
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_uri = storage.join(reader.store.version_uri(reader.version), "eval", run_id)
    meta = {"title": "steerstore evaluation", "store": store_uri, "version": reader.version,
            "model": reader.manifest["model"].get("id"), "model_fingerprint": fingerprint, "run_id": run_id,
            "command": "steerstore eval " + " ".join(_flags(config)),
            "users": len(gen.users), "heldout_items": len(split.heldout), "train_items":
                sum(len(v) for v in split.train.values()),
            "train_pairs": len(split.train_pairs), "heldout_pairs": len(split.heldout_pairs),
            "decoding": f"greedy, {config.methods.max_new_tokens} new tokens",
            "data": split.notes, "missing": gen.missing, "tau": steerx.tau, "tau_stores": tau_stores,
            "refresh_stage_seconds": summary_refresh.get("stage_seconds"), "seconds": timings,
            "ship": ship, "preference_unsteered": unsteered, "steerx_descriptions": gen.descriptions,
            "recommendations": {m: dict(c) for m, c in gen.recommendations.items()}, "notes": _notes(summary, gen)}
    examples = _examples(scored, config.examples)
    from steerstore.jobs.evaluate.report import ReportData, render_report  # noqa: PLC0415  (matplotlib only when reporting)

    html = render_report(ReportData(meta=meta, summary=summary, per_user=per_user, token_effects=effects,
                                    tau=steerx.tau, preference=preference, examples=examples,
                                    by_source=by_source))
    lap("report")
    meta["seconds"] = timings
    _write(out_uri, config.storage, html, scored, summary, per_user, preference, meta, by_source)
    print_summary(summary, preference, unsteered, ship, by_source, config.methods.ship_metric)
    print(f"\nreport: {storage.join(out_uri, 'report.html')}")
    return {"uri": out_uri, "summary": summary, "per_user": per_user, "preference": preference, "meta": meta,
            "items": scored, "by_source": by_source}


def _release_memory() -> None:
    """Free a dropped model's memory (on a GPU, the caching allocator's too) before Ray actors load theirs."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
