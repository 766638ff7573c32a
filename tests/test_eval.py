"""The evaluation job: the held-out split, the per-user deltas, and a small real run end to end."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from steerstore.jobs.evaluate import EvalDataConfig, per_user_table, split_data, summarise
from steerstore.operators.metrics import MetricsConfig
from tests.tiny import write_jsonl

STYLES = {
    "ann": "Honestly, {t} was zorblax and quindle, truly mirthwood. Cheers, friends!",
    "ben": "Regarding {t}: the matter is settled, and I remain, respectfully, unconvinced.",
    "cat": "omg {t}!!! soooo good lol, cant even, best day ever!!!",
    "dan": "{t}. Fine. Nothing more to say about it, really.",
}
TOPICS = ["the weather", "my garden", "a long walk", "dinner plans", "the new job", "a rainy day"]


def _histories(users=STYLES, n=len(TOPICS), timestamps=True):
    return [{"user_id": u, "item_id": f"{u}-{k}", "input": f"Write a short note about {t}.",
             "output": s.format(t=t), **({"timestamp": 1_700_000_000 + 86400 * k} if timestamps else {})}
            for u, s in users.items() for k, t in enumerate(TOPICS[:n])]


def test_time_split_holds_out_each_users_latest_items_and_training_never_sees_them(tmp_path):
    rows = _histories()
    for r in rows:  # time order differs from id order: item k is written on day (k + 3) % 6
        r["timestamp"] = 1_700_000_000 + 86400 * ((int(r["item_id"].rsplit("-", 1)[1]) + 3) % 6)
    rows.reverse()  # file order must not matter: time does
    cfg = EvalDataConfig(histories=write_jsonl(tmp_path / "h.jsonl", rows), heldout_items=2, min_history=3)
    split = split_data(cfg, None)
    assert sorted(split.train) == sorted(STYLES)
    for u in STYLES:
        held = sorted(h["item_id"] for h in split.heldout if h["user_id"] == u)
        assert held == [f"{u}-1", f"{u}-2"]  # the two latest (days 4 and 5)
        assert [i["item_id"] for i in split.train[u]] == [f"{u}-{k}" for k in (3, 4, 5, 0)]  # oldest first
    targets = {h["target"] for h in split.heldout}
    train_texts = {i["output"] for items in split.train.values() for i in items}
    for p in split.train_pairs:  # nothing the refresh job sees is a held-out target
        assert p["chosen"] not in targets and p["rejected"] not in targets and p["chosen"] in train_texts
    assert all(p["chosen"] in targets and p["rejected"] in targets for p in split.heldout_pairs)
    assert all(p["rejected"] != p["chosen"] for p in split.heldout_pairs)
    assert split.notes["split_modes"] == {"time": 4}


def test_built_pairs_stay_within_one_source_and_neutral_pairs_reject_the_models_own_answer(tmp_path, tiny_runtime):
    from steerstore.jobs.evaluate.split import with_neutral_rejected

    rows = _histories()
    source = {"ann": "blogs", "cat": "blogs", "ben": "reddit", "dan": "reddit"}
    for r in rows:
        r["source"] = source[r["user_id"]]
    split = split_data(EvalDataConfig(histories=write_jsonl(tmp_path / "h.jsonl", rows), heldout_items=1,
                                      min_history=3), None)
    author = {i["output"]: u for u, items in split.train.items() for i in items}
    author.update({h["target"]: h["user_id"] for h in split.heldout})
    for p in split.train_pairs + split.heldout_pairs:  # the other text is a peer's of the same source
        other = author[p["rejected"]]
        assert other != p["user_id"] and source[other] == source[p["user_id"]], p
    assert "same source" in split.notes["pairs"] and split.built_pairs
    # neutral: the rejected side becomes the unsteered model's greedy answer to the very same prompt
    neutral = with_neutral_rejected(split, tiny_runtime.generate, 6)
    prompts = sorted({p["prompt"] for p in split.train_pairs + split.heldout_pairs})
    answers = dict(zip(prompts, tiny_runtime.generate(prompts, 6)))
    assert all(a.strip() for a in answers.values())
    for before, after in zip(split.train_pairs, neutral.train_pairs):
        assert after == dict(before, rejected=answers[before["prompt"]].strip())
    for before, after in zip(split.heldout_pairs, neutral.heldout_pairs):
        assert after == dict(before, rejected=answers[before["prompt"]].strip(), rejected_kind="neutral")
    assert "the model's own greedy answer to the same input, 6 new tokens" in neutral.notes["pairs"]
    assert neutral.train == split.train and neutral.heldout == split.heldout
    # both: each held-out item keeps its other-user pair beside the neutral one; training pairs are neutral
    both = with_neutral_rejected(split, tiny_runtime.generate, 6, keep_other=True)
    assert both.train_pairs == neutral.train_pairs and len(both.heldout_pairs) == 2 * len(split.heldout_pairs)
    assert both.heldout_pairs[len(split.heldout_pairs):] == [
        dict(p, pair_id=f"{p['pair_id']}-other", rejected_kind="other_user") for p in split.heldout_pairs]
    assert len({p["pair_id"] for p in both.heldout_pairs}) == len(both.heldout_pairs)
    # given pairs are never rewritten
    given = dataclasses.replace(split, built_pairs=False)
    assert with_neutral_rejected(given, tiny_runtime.generate, 6) is given


def test_users_without_timestamps_get_a_seeded_split_and_too_few_items_are_reported(tmp_path):
    rows = _histories(timestamps=False) + _histories({"eve": "{t} eh."}, n=2)
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    a = split_data(EvalDataConfig(histories=path, heldout_items=1, seed=1), None)
    b = split_data(EvalDataConfig(histories=path, heldout_items=1, seed=1), None)
    c = split_data(EvalDataConfig(histories=path, heldout_items=1, seed=2), None)
    assert a.heldout == b.heldout and a.heldout != c.heldout
    assert a.notes["split_modes"] == {"seeded": 4} and a.notes["users_with_too_few_items"] == ["eve"]
    with pytest.raises(ValueError, match="at least 2"):
        split_data(EvalDataConfig(histories=path, min_history=10, max_history=10), None)


def test_an_explicit_heldout_file_replaces_the_split_and_bad_rows_are_counted(tmp_path):
    hist = write_jsonl(tmp_path / "h.jsonl", _histories() + [{"user_id": "ann", "item_id": "x", "input": "", "output": "o"}])
    held = write_jsonl(tmp_path / "q.jsonl", [
        {"user_id": "ann", "item_id": "q1", "input": "Write about cats.", "target": "Cats are zorblax."},
        {"user_id": "ben", "item_id": "q2", "input": "Write about dogs.", "target": "Dogs, respectfully."},
        {"user_id": "ben", "item_id": "q3", "input": "", "target": "no input"}])
    split = split_data(EvalDataConfig(histories=hist, heldout=held), None)
    assert [h["item_id"] for h in split.heldout] == ["q1", "q2"]
    assert len(split.train["ann"]) == len(TOPICS)  # the whole history trains
    assert sum(split.notes["skipped_rows"].values()) == 2


def _no_target_trains(split):
    """Nothing the refresh fits (any user's history items or pairs) equals or holds a held-out target."""
    targets = [" ".join(h["target"].split()).casefold() for h in split.heldout]
    texts = [i["output"] for items in split.train.values() for i in items]
    texts += [p[f] for p in split.train_pairs for f in ("chosen", "rejected")]
    for text in texts:
        norm = " ".join(text.split()).casefold()
        assert not any(t == norm or (len(t) >= 32 and t in norm) for t in targets), text
    held_ids = {(h["user_id"], h["item_id"]) for h in split.heldout}
    assert not any((u, i["item_id"]) in held_ids for u, items in split.train.items() for i in items)


def test_a_heldout_file_whose_items_are_also_in_the_histories_never_trains_on_them(tmp_path):
    rows = _histories()
    hist = write_jsonl(tmp_path / "h.jsonl", rows)
    ann4 = next(r for r in rows if r["item_id"] == "ann-4")
    ben2 = next(r for r in rows if r["item_id"] == "ben-2")
    held = write_jsonl(tmp_path / "q.jsonl", [
        # the same item id as a history item, and a different id whose target is another history item's text
        {"user_id": "ann", "item_id": "ann-4", "input": ann4["input"], "target": ann4["output"]},
        {"user_id": "ben", "item_id": "q-ben", "input": ben2["input"], "target": "  " + ben2["output"].upper()}])
    split = split_data(EvalDataConfig(histories=hist, heldout=held, min_history=3), None)
    assert [i["item_id"] for i in split.train["ann"]] == [f"ann-{k}" for k in (0, 1, 2, 3, 5)]
    assert "ben-2" not in [i["item_id"] for i in split.train["ben"]]
    assert split.notes["skipped_rows"]["history item held out (its id or text is a held-out target)"] == 2
    _no_target_trains(split)
    # the pairs built from the histories train on what is left, so they hold no target either
    assert not any(p["pair_id"].startswith(("ann-4", "ben-2")) for p in split.train_pairs)


def test_given_training_pairs_holding_a_heldout_target_are_dropped(tmp_path):
    rows = _histories()
    hist = write_jsonl(tmp_path / "h.jsonl", rows)
    targets = {h: next(r["output"] for r in rows if r["item_id"] == h) for h in ("ann-5", "ben-5")}
    pairs = [{"user_id": u, "pair_id": f"{u}-p{k}", "prompt": "Write a note.", "chosen": STYLES[u].format(t=f"topic {k}"),
              "rejected": "Meh."} for u in ("ann", "ben") for k in range(6)]
    pairs[0]["chosen"] = targets["ann-5"]  # a training candidate that IS a held-out target
    pairs[2]["rejected"] = "Preface. " + targets["ben-5"] + " Afterword."  # holds another user's target
    path = write_jsonl(tmp_path / "p.jsonl", pairs)
    split = split_data(EvalDataConfig(histories=hist, heldout_items=1, min_history=3, preference_pairs=path,
                                      heldout_pairs=2), None)
    held, trained = {p["pair_id"] for p in split.heldout_pairs}, {p["pair_id"] for p in split.train_pairs}
    leaking = {"ann-p0", "ann-p2"}
    assert not leaking & held  # (this seed keeps both among the training candidates)
    assert not leaking & trained and trained | held | leaking == {p["pair_id"] for p in pairs}
    assert split.notes["skipped_rows"]["training pair holding a held-out target"] == 2
    _no_target_trains(split)


def test_deltas_are_per_user_differences_with_a_bootstrap_interval():
    rows = []
    base = {"u1": 0.2, "u2": 0.4, "u3": 0.3}
    gain = {"u1": 0.1, "u2": 0.0, "u3": 0.2}
    for u in base:
        for method, strength, value in (("none", math.nan, base[u]), ("caa", 2.0, base[u] + gain[u]),
                                        ("history_prompt", math.nan, base[u] + 0.05)):
            for k in range(2):  # two items per user; the user mean is the value
                rows.append({"method": method, "label": method, "parameter": "alpha" if method == "caa" else "",
                             "strength": strength, "recommended": True, "user_id": u, "item_id": f"{u}{k}",
                             **{m: value for m in ("rouge1", "rougeL", "meteor", "bleu", "bertscore")},
                             "nll": 2.0 * (k + 1), "tokens": 2, "nll_plain": 3.0, "tokens_plain": 2,
                             "drift": 0.0 if method == "none" else 0.25, "empty": False})
    users = per_user_table(pd.DataFrame(rows))
    assert users["perplexity"].round(6).tolist() == [round(math.exp(6 / 4), 6)] * 9  # exp(Σ NLL / Σ tokens)
    assert users["perplexity_plain"].round(6).tolist() == [round(math.exp(6 / 4), 6)] * 9
    assert users.set_index("method").loc["caa", "drift"].tolist() == [0.25] * 3
    summary, per_user = summarise(users, MetricsConfig(bootstrap_resamples=500))
    caa = summary[summary["method"] == "caa"].iloc[0]
    assert caa["delta_rougeL"] == pytest.approx(0.1)  # mean of 0.1, 0.0, 0.2
    assert caa["delta_rougeL_lo"] <= 0.1 <= caa["delta_rougeL_hi"] and caa["delta_rougeL_hi"] <= 0.2 + 1e-9
    assert caa["delta_perplexity"] == 0.0 and caa["n_users"] == 3 and caa["n_items"] == 6
    assert math.isnan(summary[summary["method"] == "none"].iloc[0]["delta_rougeL"])
    assert len(per_user) == 6  # one row per user and recommended setting (none excluded)
    caa_users = per_user[per_user["method"] == "caa"]
    assert dict(zip(caa_users["user_id"], caa_users["delta_rougeL"].round(6))) == {"u1": 0.1, "u2": 0.0, "u3": 0.2}
    hist = per_user[per_user["method"] == "history_prompt"]
    assert hist["delta_meteor"].round(6).tolist() == [0.05] * 3 and hist["strength"].isna().all()
    # a method decoded on the history prompt (DPS, as in the paper) is compared with history in prompt
    summary, per_user = summarise(users, MetricsConfig(bootstrap_resamples=500), {"caa": "history_prompt"})
    caa = summary[summary["method"] == "caa"].iloc[0]
    assert caa["baseline"] == "history_prompt" and caa["delta_rougeL"] == pytest.approx(0.1 - 0.05)
    caa_users = per_user[per_user["method"] == "caa"]
    assert dict(zip(caa_users["user_id"], caa_users["delta_rougeL"].round(6))) == {"u1": 0.05, "u2": -0.05,
                                                                                    "u3": 0.15}
    assert summary.set_index("method").loc["history_prompt", "baseline"] == "none"


def test_each_data_source_gets_its_own_deltas_over_its_own_users():
    from steerstore.jobs.evaluate.score import summarise_by_source
    from steerstore.jobs.evaluate.write import print_summary

    gain = {"b1": 0.1, "b2": 0.3, "s1": -0.2, "s2": 0.0, "s3": -0.1}
    rows = []
    for u, g in gain.items():
        for method, strength, value, rec in (("none", math.nan, 0.3, True), ("caa", 2.0, 0.3 + g, True),
                                             ("caa", 8.0, 0.9, False)):
            rows.append({"method": method, "label": method, "parameter": "alpha" if method == "caa" else "",
                         "strength": strength, "recommended": rec, "user_id": u, "item_id": f"{u}0",
                         **{m: value for m in ("rouge1", "rougeL", "meteor", "bleu", "bertscore")},
                         "nll": 2.0, "tokens": 2, "nll_plain": 2.0, "tokens_plain": 2, "drift": 0.0, "empty": False})
    users = per_user_table(pd.DataFrame(rows))
    sources = {"b1": "blogs", "b2": "blogs", "s1": "synthpai", "s2": "synthpai", "s3": "synthpai"}
    by = summarise_by_source(users, sources, MetricsConfig(bootstrap_resamples=200))
    caa = by[by["method"] == "caa"].set_index("source")
    assert len(caa) == 2 and caa["recommended"].all()  # the recommended settings only, one row per source
    assert caa.loc["blogs", "delta_meteor"] == pytest.approx(0.2) and caa.loc["blogs", "n_users"] == 2
    assert caa.loc["synthpai", "delta_meteor"] == pytest.approx(-0.1) and caa.loc["synthpai", "n_users"] == 3
    assert caa.loc["synthpai", "delta_meteor_hi"] <= 0.0 + 1e-9
    # one source (or none named): nothing apart from the pooled summary
    assert summarise_by_source(users, {u: "blogs" for u in gain}, MetricsConfig()).empty
    assert summarise_by_source(users, {}, MetricsConfig()).empty
    summary, _ = summarise(users, MetricsConfig(bootstrap_resamples=200))
    print_summary(summary, pd.DataFrame(), by_source=by)


def test_an_empty_output_pays_the_likelihood_of_ending_at_once(tiny_runtime, monkeypatch):
    import torch

    from steerstore.jobs.evaluate import score

    monkeypatch.setattr(score, "text_metrics", lambda outs, targets, cfg, which: {m: [0.0] * len(outs) for m in which})
    rt = tiny_runtime
    assert rt.eos_token_ids
    monkeypatch.setattr(rt, "eos_token_ids", sorted({*rt.eos_token_ids, 5}))  # decoding stops on any of them
    items = pd.DataFrame([
        {"method": m, "label": m, "parameter": "", "strength": math.nan, "recommended": True, "user_id": "u",
         "item_id": "i", "input": "Say something.", "prompt": "Say something.", "target": "hi", "output": out,
         "serve": m}
        for m, out in (("none", "Hello there."), ("caa", ""), ("bt", "  "))])
    scored = score.score_items(items, rt, MetricsConfig())
    prompt = rt.prompt_ids(["Say something."])[0]
    by = scored.set_index("method")

    def log_p(ids):  # a plain forward: log-probabilities of the next token after ids
        with torch.no_grad():
            return torch.log_softmax(rt.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)

    end = torch.logsumexp(log_p(prompt)[rt.eos_token_ids], 0)  # ending is any of the end tokens
    assert by.loc["caa", "tokens"] == 1 and by.loc["caa", "nll"] == pytest.approx(-float(end), abs=1e-4)
    spaces = rt.response_ids(["  "])[0]
    body = sum(float(log_p(prompt + spaces[:k])[t]) for k, t in enumerate(spaces))
    end = torch.logsumexp(log_p(prompt + spaces)[rt.eos_token_ids], 0)
    assert by.loc["bt", "tokens"] == len(spaces) + 1
    assert by.loc["bt", "nll"] == pytest.approx(-(body + float(end)), abs=1e-4)
    assert bool(by.loc["caa", "empty"]) and bool(by.loc["bt", "empty"]) and not bool(by.loc["none", "empty"])
    scored["drift"] = score.content_drift(scored, lambda outs, refs: [1.0 if o == r else 0.5 for o, r in zip(outs, refs)])
    assert scored.set_index("method")["drift"].tolist() == [0.0, 0.5, 0.5]  # against none's answer, same prompt
    users = per_user_table(scored)
    assert np.isfinite(users["perplexity"]).all()


def test_users_without_a_finite_delta_are_counted_apart():
    rows = []
    for u, ppl_tokens in (("u1", 2), ("u2", 2), ("u3", 0)):  # u3's CAA output has no scored token
        for method in ("none", "caa"):
            rows.append({"method": method, "label": method, "parameter": "", "strength": math.nan,
                         "recommended": True, "user_id": u, "item_id": "i",
                         **{m: 0.1 for m in ("rouge1", "rougeL", "meteor", "bleu", "bertscore")},
                         "nll": 2.0, "tokens": ppl_tokens if method == "caa" else 2, "nll_plain": 2.0,
                         "tokens_plain": 2, "drift": 0.0, "empty": False})
    summary, _ = summarise(per_user_table(pd.DataFrame(rows)), MetricsConfig(bootstrap_resamples=50))
    caa = summary.set_index("method").loc["caa"]
    assert caa["n_users"] == 3 and caa["users_without_delta"] == 1 and caa["delta_perplexity"] == 0.0
    assert summary.set_index("method").loc["none", "users_without_delta"] == 0


# ---- end to end: the real default model, real local Ray, the report in headless Chromium ------------

@pytest.mark.slow
def test_eval_end_to_end_writes_metrics_and_a_report_that_renders(ray_cluster, tmp_path, capsys):
    from steerstore.infra.config import from_dict
    from steerstore.jobs import evaluate
    from tests.browser import render, require_chromium

    require_chromium()
    # two data sources of two users each: built pairs stay within a source, and each is reported apart
    sources = {"ann": "forum", "ben": "letters", "cat": "forum", "dan": "letters"}
    hist = write_jsonl(tmp_path / "histories.jsonl", [dict(r, source=sources[r["user_id"]]) for r in _histories()])
    cfg = from_dict(evaluate.EvalConfig, {
        "data": {"histories": hist, "heldout_items": 1, "min_history": 3},
        "methods": {"max_new_tokens": 8, "alpha_grid": [1.0, 4.0], "gamma_grid": [1.0], "lambda_grid": [0.0, 1.0],
                    "dps_gamma_grid": [1.0], "tau_grid": [1.5]},
        "out": str(tmp_path / "eval"), "examples": 2,
        "scale": {"grid": [1.0, 4.0], "sample_pairs": 4}, "ray": {"progress_bars": False},
        "bt": {"sample_users": 4, "k": 2},
        "dps": {"mode": "fast", "candidates": 4, "top_k": 4, "clusters": 0, "pcs_baseline": "none",
                "history": {"context_items": 1, "max_items": 3}},
        "steerx": {"history": {"context_items": 1}, "smoothing": {"max_new_tokens": 48},
                   "vectors": {"layers": [15], "gamma_grid": [1.0], "calibration_users": 1,
                               "neutral_max_new_tokens": 8}}})
    result = evaluate.main(cfg)
    summary = result["summary"]
    rec = summary[summary["recommended"]].set_index("method")
    assert {"none", "history_prompt", "population", "caa", "bt"} <= set(rec.index)
    assert (rec.loc["none", "n_users"], rec.loc["none", "n_items"]) == (4, 4)
    for m in ("rouge1", "rougeL", "meteor", "bleu", "bertscore", "perplexity"):
        assert np.isfinite(rec.loc["none", m]), m
    assert np.isfinite(rec.loc["caa", "delta_rougeL"])
    tau = summary[(summary["method"] == "influence") & (summary["parameter"] == "tau")]
    assert sorted(tau["strength"]) == [0.75, 1.5]  # the store's τ and one side store's
    assert set(result["meta"]["tau_stores"]) == {"1.5"}
    sweep = summary[summary["method"] == "caa"]
    assert sorted(sweep["strength"]) == sorted({1.0, 4.0, rec.loc["caa", "strength"]})
    # every steering method also on top of the history prompt, compared with history in prompt, and every
    # setting's content drift against the unsteered answer to its own prompt
    assert {"caa+history", "population+history", "influence+history"} <= set(rec.index)
    assert set(summary.loc[summary["method"].str.endswith("+history"), "baseline"]) == {"history_prompt"}
    assert rec.loc["none", "drift"] == pytest.approx(0.0, abs=1e-3) and np.isfinite(summary["drift"]).all()
    # the files sit next to the store version they evaluate
    by = result["by_source"]
    assert set(by["source"]) == {"forum", "letters"} and set(by.loc[by["method"] == "none", "n_users"]) == {2}
    forum = by[(by["source"] == "forum") & (by["method"] == "caa")].iloc[0]
    uri = result["uri"]
    assert "/versions/" in uri and "/eval/" in uri
    doc = json.loads((tmp_path / uri.split(str(tmp_path) + "/")[1] / "summary.json").read_text())
    assert doc["meta"]["users"] == 4 and {r["method"] for r in doc["summary"]} >= {"none", "caa"}
    # SteerX: how many users got a valid description, and why the others did not (the refresh's own reasons)
    described = doc["meta"]["steerx_descriptions"]
    assert described["users"] == 4 and described["with_description"] + sum(described["without"].values()) == 4
    assert described["with_description"] == (rec.loc["influence", "n_users"] if "influence" in rec.index else 0)
    assert any(n.startswith(f"SteerX: {described['with_description']} of 4 users got a valid style description")
               for n in doc["meta"]["notes"])
    # preference accuracy: steered rows only (chance 0.5), the unsteered model's preference apart
    pref = doc["preference"]
    assert pref and all(r["method"] != "none" and 0 <= r["pair_accuracy_lo"] <= r["pair_accuracy"]
                        <= r["pair_accuracy_hi"] <= 1 for r in pref)
    assert doc["meta"]["preference_unsteered"]["n_pairs"] == 4
    items = pd.read_parquet(f"{uri}/items.parquet")
    assert len(items[items["method"] == "none"]) == 4 and items["output"].map(type).eq(str).all()
    # DPS decodes on the history-in-prompt prompt (as in the paper) and is compared with it
    dps_rows = items[items["method"] == "dps"]
    # DPS rows exist unless every user is reported without heads (never silently absent)
    assert len(dps_rows) or len(result["meta"]["missing"].get("dps", {})) == 4
    if len(dps_rows):
        hist = items[items["method"] == "history_prompt"].set_index("item_id")["prompt"]
        assert all(p == hist[i] for i, p in zip(dps_rows["item_id"], dps_rows["prompt"]))
        assert set(summary.loc[summary["method"] == "dps", "baseline"]) == {"history_prompt"}
    # the summary's figures, recomputed from the items: ROUGE-L by rouge_score itself, a user's mean over
    # their items, the method's figure the mean over users, Δ the mean of per-user differences
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    items["rougeL_again"] = [scorer.score(t, o)["rougeL"].fmeasure if o.strip() else 0.0
                             for o, t in zip(items["output"], items["target"])]
    np.testing.assert_allclose(items["rougeL_again"], items["rougeL"], atol=1e-9)

    def per_user(method, strength=None):
        rows = items[items["method"] == method]
        if strength is not None:
            rows = rows[np.isclose(rows["strength"].astype(float), strength)]
        return rows.groupby("user_id")["rougeL_again"].mean()

    none = per_user("none")
    # the population direction is one vector for every user, at the store's population α
    pop = items[(items["method"] == "population") & items["recommended"]]
    assert pop["user_id"].nunique() == 4 and set(pop["strength"]) == {rec.loc["population", "strength"]}
    from steerstore.infra.reader import StoreReader

    stored = StoreReader(str(tmp_path / "eval" / "store")).population()
    assert rec.loc["population", "strength"] == pytest.approx(stored.recommended_scale)
    assert rec.loc["none", "rougeL"] == pytest.approx(none.mean(), abs=1e-9)
    caa = per_user("caa", rec.loc["caa", "strength"])
    assert len(caa) == 4
    # a source's Δ is over its own users only
    assert forum["delta_rougeL"] == pytest.approx((caa - none)[["ann", "cat"]].mean(), abs=1e-9)
    assert rec.loc["caa", "rougeL"] == pytest.approx(caa.mean(), abs=1e-9)
    assert rec.loc["caa", "delta_rougeL"] == pytest.approx((caa - none).mean(), abs=1e-9)
    # held-out targets never reached the refresh job's inputs (histories and pairs) nor a generation prompt
    inputs = tmp_path / "eval" / "inputs"
    train = (inputs / "train_histories.jsonl").read_text() + (inputs / "train_pairs.jsonl").read_text()
    assert len(items["target"].unique()) == 4
    assert all(json.dumps(t)[1:-1] not in train for t in items["target"].unique())
    assert not any(t in prompt for t in items["target"].unique() for prompt in items["prompt"])
    out = capsys.readouterr().out
    assert "no personalisation" in out and "ΔROUGE-L" in out and "report:" in out
    rendered = render(f"{uri}/report.html")["rendered"]
    assert rendered["plots"] >= 3 and rendered["plots_visible"] == rendered["plots"], rendered
    assert rendered["tables"] >= 4  # summary, one per source, and more
    assert "By data source" in (tmp_path / uri.split(str(tmp_path) + "/")[1] / "report.html").read_text()


def test_evaluating_an_existing_store_refuses_one_refreshed_on_other_inputs(tmp_path):
    from types import SimpleNamespace

    from steerstore.jobs.evaluate import _check_store_inputs

    (tmp_path / "h.jsonl").write_text("train items\n")
    (tmp_path / "p.jsonl").write_text("train pairs\n")
    reader = SimpleNamespace(version="v1", manifest={"inputs": {"histories": str(tmp_path / "h.jsonl"),
                                                               "preference_pairs": str(tmp_path / "p.jsonl")}})
    same = {"histories": "train items\n", "pairs": "train pairs\n"}
    assert _check_store_inputs(reader, same, None) == {"histories": str(tmp_path / "h.jsonl"),
                                                       "pairs": str(tmp_path / "p.jsonl")}
    with pytest.raises(ValueError, match="not this evaluation's training split"):
        _check_store_inputs(reader, dict(same, pairs="train pairs\nheld-out target\n"), None)
    (tmp_path / "h.jsonl").unlink()
    with pytest.raises(ValueError, match="may have seen held-out targets"):
        _check_store_inputs(reader, same, None)


@pytest.mark.parametrize("fingerprint", ["sha256:other-weights", None])
def test_evaluating_an_existing_store_refuses_other_weights_and_a_version_without_a_fingerprint(
        tmp_path, tiny_model_folder, monkeypatch, fingerprint):
    from steerstore.infra.config import from_dict
    from steerstore.infra.reader import FingerprintMismatch
    from steerstore.infra.store import SteeringStore
    from steerstore.jobs import evaluate
    from steerstore.jobs.evaluate.write import _jsonl

    monkeypatch.setattr(evaluate, "require", lambda *a, **k: None)  # the refusal comes before any metric
    monkeypatch.setattr(evaluate, "ensure_wordnet", lambda *a, **k: None)
    data = {"histories": write_jsonl(tmp_path / "h.jsonl", _histories()), "heldout_items": 1, "min_history": 3}
    # the recorded pairs are the other-user ones: with the default neutral pairs they differ, and the weights
    # are still refused first, with the clear error
    split = split_data(from_dict(EvalDataConfig, dict(data, pair_rejected="other_user")), None)
    (tmp_path / "th.jsonl").write_text(_jsonl([i for items in split.train.values() for i in items]))
    (tmp_path / "tp.jsonl").write_text(_jsonl(split.train_pairs))
    store = SteeringStore(str(tmp_path / "store"))  # refreshed on exactly this split, by other (or unknown) weights
    store.publish(store.next_version_id(), {
        "model": {"name_or_path": "other-model", "id": "other-model", "fingerprint": fingerprint}, "tables": {},
        "inputs": {"histories": str(tmp_path / "th.jsonl"), "preference_pairs": str(tmp_path / "tp.jsonl")},
        "config": {"steerx": {}}})
    config = from_dict(evaluate.EvalConfig, {"data": data, "store": store.uri, "out": str(tmp_path / "out"),
                                             "model": {"name_or_path": str(tiny_model_folder)},
                                             "actors": 0})  # the worker in this process (no Ray in a fast test)
    with pytest.raises(FingerprintMismatch, match="other-weights" if fingerprint else "records no weights fingerprint"):
        evaluate.main(config)


def test_what_to_ship_is_the_best_lower_bound_at_acceptable_fluency_or_nothing():
    from steerstore.jobs.evaluate.score import ship_recommendation
    from steerstore.jobs.evaluate.write import ship_line

    def row(method, strength, lo, ppl, delta=None):
        d = lo + 0.01 if delta is None else delta
        return {"method": method, "label": method.upper(), "parameter": "alpha" if strength else "",
                "strength": strength if strength else math.nan, "recommended": True, "baseline": "none",
                "n_users": 30, "perplexity": ppl, "delta_meteor": d, "delta_meteor_lo": lo, "delta_meteor_hi": d + 0.01}

    # DPS on the history prompt: its summary Δ is against history in prompt (a large bound here), so it is
    # ranked by its Δ against no personalisation, recomputed per user: 0.001..0.003 over three users
    dps = dict(row("dps", 2.0, 0.05, 11.0), parameter="gamma", baseline="history_prompt")
    summary = pd.DataFrame([row("none", None, math.nan, 10.0), row("history_prompt", None, 0.002, 11.0),
                            row("caa", 4.0, 0.010, 16.0),  # the best bound, but perplexity 1.6x: not shipped
                            row("caa", 1.0, 0.004, 12.0), row("bt", 2.0, -0.003, 10.5), dps])
    users = pd.DataFrame([{"method": m, "parameter": p, "strength": st, "recommended": True, "user_id": u,
                           "meteor": v} for u, base, gain in (("u1", 0.1, 0.001), ("u2", 0.2, 0.002), ("u3", 0.3, 0.003))
                          for m, p, st, v in (("none", "", math.nan, base), ("dps", "gamma", 2.0, base + gain))])
    ship = ship_recommendation(summary, users, "meteor", 1.5, "tiny", MetricsConfig(bootstrap_resamples=200))
    assert (ship["method"], ship["strength"], ship["delta_lo"]) == ("caa", 1.0, 0.004)
    assert ship["perplexity_ratio"] == pytest.approx(1.2) and ship["settings"] == 5 and ship["fluent_settings"] == 4
    assert "CAA at alpha = 1" in ship_line(ship) and "tiny" in ship["caveat"]
    # nothing with a lower bound above 0: no personalisation, with the best candidate named
    weak = summary.assign(delta_meteor_lo=summary["delta_meteor_lo"] - 0.02)
    ship = ship_recommendation(weak, users, "meteor", 1.5, "tiny", MetricsConfig(bootstrap_resamples=200))
    assert ship["method"] == "dps" and ship["delta"] == pytest.approx(0.002)  # recomputed against none
    weak = weak[weak["method"] != "dps"]
    ship = ship_recommendation(weak, users, "meteor", 1.5, "tiny")
    assert ship["method"] == "none" and ship["best_candidate"]["method"] == "caa"
    assert ship_line(ship).startswith("What to ship: no personalisation")
    assert "above_zero_but_dysfluent" not in ship
    # a setting above 0 that costs too much fluency is named, with its figures, not passed over in silence
    ship = ship_recommendation(summary[summary["method"].isin(["none", "caa", "bt"])
                                       & ~np.isclose(summary["strength"].fillna(0), 1.0)].assign(
        delta_meteor_lo=[math.nan, 0.010, -0.003]), users, "meteor", 1.5, "tiny")
    assert ship["method"] == "none" and ship["above_zero_but_dysfluent"] == 1
    assert "within 1.5x" in ship["reason"] and "CAA at alpha = 4 has Δmeteor +0.0200 [+0.0100, +0.0300] but " \
                                               "perplexity 1.60x" in ship["reason"]
    # a method on top of the history prompt is held to history in prompt's perplexity (11), not none's (10)
    composed = dict(row("caa+history", 1.0, 0.05, 16.0), baseline="history_prompt")
    users = pd.concat([users, pd.DataFrame([{"method": "caa+history", "parameter": "alpha", "strength": 1.0,
                                             "recommended": True, "user_id": u, "meteor": v + 0.01}
                                            for u, v in (("u1", 0.1), ("u2", 0.2), ("u3", 0.3))])])
    both = pd.DataFrame([row("none", None, math.nan, 10.0), row("history_prompt", None, 0.002, 11.0), composed])
    ship = ship_recommendation(both, users, "meteor", 1.5, "tiny")
    assert ship["method"] == "caa+history" and ship["perplexity_ratio"] == pytest.approx(16 / 11)
    ship = ship_recommendation(both.assign(perplexity=[10.0, 11.0, 17.0]), users, "meteor", 1.5, "tiny")
    assert ship["method"] == "history_prompt" and ship["above_zero_but_dysfluent"] == 1  # 17 / 11 = 1.55x


def test_development_users_split_once_into_a_tuning_and_an_evaluation_half(tmp_path):
    import gzip

    from steerstore.jobs import devdata
    from steerstore.jobs.evaluate.split import dev_histories

    ids = [f"user-{k:03d}" for k in range(40)]
    halves = {u: devdata.partition(u) for u in ids}
    assert set(halves.values()) == {"tune", "eval"} and 10 < sum(h == "tune" for h in halves.values()) < 30
    assert halves == {u: devdata.partition(u) for u in ids}  # fixed: the same split every run
    text = "This is the opening sentence of a post. " + "Then the author goes on with many more words here. " * 6
    with gzip.open(tmp_path / "blogs-dev.jsonl.gz", "wt") as fh:
        for u in ids:
            fh.write(json.dumps({"user_id": u, "items": [{"id": f"{u}-{k}", "text": text} for k in range(6)]}) + "\n")
    cfg = EvalDataConfig(dev_dir=str(tmp_path), dev_sources=["blogs"], dev_users=100)
    users = {r["user_id"] for r in dev_histories(cfg)}
    assert users == {u for u in ids if halves[u] == "eval"}
    every = {r["user_id"] for r in dev_histories(dataclasses.replace(cfg, dev_partition="all"))}
    assert every == set(ids)
    with pytest.raises(ValueError, match="unknown development partition"):
        devdata.in_partition("u", "both")



def test_preference_accuracy_is_reported_pooled_and_per_kind_of_rejected_text():
    from steerstore.jobs.evaluate.score import _accuracy_rows

    pairs = [{"user_id": u, "rejected_kind": k} for u in ("u1", "u2") for k in ("neutral", "other_user")]
    margin = np.asarray([1.0, -1.0, 2.0, 0.5])  # u1: helps vs neutral only; u2: both
    rows = {r["pairs"]: r for r in _accuracy_rows("caa", "CAA", 1.0, pairs, margin, MetricsConfig(bootstrap_resamples=50))}
    assert rows["all"]["pair_accuracy"] == pytest.approx(0.75) and rows["all"]["n_pairs"] == 4
    assert rows["neutral"]["pair_accuracy"] == 1.0 and rows["other_user"]["pair_accuracy"] == 0.5
    assert rows["other_user"]["label"] == "CAA · vs another user's text" and rows["neutral"]["n_pairs"] == 2
    one_kind = _accuracy_rows("caa", "CAA", 1.0, pairs[:1], margin[:1], MetricsConfig(bootstrap_resamples=50))
    assert [r["pairs"] for r in one_kind] == ["all"]


def test_content_drift_references_the_unsteered_answer_to_the_same_prompt_and_history_in_prompt_none():
    from steerstore.jobs.evaluate import score

    rows = [("none", "plain", "A"), ("caa", "plain", "B"), ("history_prompt", "hist", "C"), ("caa+history", "hist", "D"),
            ("dps", "hist", "C")]
    items = pd.DataFrame([{"method": m, "user_id": "u", "item_id": "i", "decoded_from": d, "output": o}
                          for m, d, o in rows]
                         + [{"method": "caa", "user_id": "v", "item_id": "j", "decoded_from": "plain", "output": "E"}])
    pairs, index = score.drift_pairs(items)
    assert [pairs[i] if i >= 0 else None for i in index] == [("A", "A"), ("B", "A"), ("C", "A"), ("D", "C"),
                                                            ("C", "C"), None]  # v's item has no unsteered answer
    f1 = {("A", "A"): 1.0, ("B", "A"): 0.6, ("C", "A"): 0.5, ("D", "C"): 0.8, ("C", "C"): 1.0}
    drift = score.content_drift(items, lambda outs, refs: [f1[(o, r)] for o, r in zip(outs, refs)])
    np.testing.assert_allclose(drift[:5], [0.0, 0.4, 0.5, 0.2, 0.0])
    assert np.isnan(drift[5])
