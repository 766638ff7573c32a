"""Choosing SteerX's τ: the anchor metrics on hand-made word effects, the recommendation rule, the
data split, the two-counterfactual scoring shortcut, and the whole job (tiny model; real model and
real data in the slow test, skipped when ../shared/data is absent)."""

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from steerstore.jobs.bench import tau as st
from steerstore.operators.steerx import loo_prompts, token_effects

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _user(words_by_item, distinctive):
    return ([(f"i{k}", list(ws)) for k, ws in enumerate(words_by_item)], set(distinctive))


# ann: 6 scored types, 2 distinctive (zorb, quill); bob: 4 types, 1 distinctive (fen); cat: none distinctive
USERS = {
    "ann": _user([[("Zorb", 3.0), ("the", 0.2), ("quill", 1.2)],
                  [("zorb", 0.5), ("a", 1.5), ("of", -0.3), ("dog", 0.9)]], {"zorb", "quill"}),
    "bob": _user([[("fen", 0.8), ("and", 2.0)], [("is", 0.1), ("it", -1.0)]], {"fen"}),
    "cat": _user([[("we", 2.5), ("go", 0.4)]], set()),
}


def test_precision_recall_f1_and_lift_micro_and_macro():
    r = st.evaluate(USERS, st.anchor_selector("absolute", 1.0, 1), st._below("absolute", 1.0, 1))
    # anchors (effect >= 1): ann {zorb, a, quill} (2 distinctive), bob {and} (0), cat {we} (0)
    assert r["anchors_per_user"] == pytest.approx(5 / 3)
    assert (r["scored_types"], r["distinctive_types"]) == (12, 3) and r["base_rate"] == pytest.approx(3 / 12)
    assert r["users_with_distinctive"] == 2 and r["users_at_fallback"] == 0
    p, rc = 2 / 5, 2 / 3
    assert r["micro"]["precision"] == pytest.approx(p) and r["micro"]["recall"] == pytest.approx(rc)
    assert r["micro"]["f1"] == pytest.approx(2 * p * rc / (p + rc))
    assert r["micro"]["lift"] == pytest.approx(p / (3 / 12))
    # macro: precision over the 3 users with anchors; recall, F1, lift over ann and bob (who have distinctive words)
    assert r["macro"]["precision"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert r["macro"]["recall"] == pytest.approx((1.0 + 0.0) / 2)
    f1_ann = 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)
    assert r["macro"]["f1"] == pytest.approx(f1_ann / 2)
    assert r["macro"]["f1_se"] == pytest.approx(np.std([f1_ann, 0.0], ddof=1) / np.sqrt(2))
    assert r["macro"]["lift"] == pytest.approx(((2 / 3) / (2 / 6) + 0.0) / 2)
    assert r["user_f1"] == pytest.approx({"ann": f1_ann, "bob": 0.0})


def test_the_min_anchors_fallback_and_percentile_mode_are_steerx_own():
    r = st.evaluate(USERS, st.anchor_selector("absolute", 10.0, 2), st._below("absolute", 10.0, 2))
    assert r["users_at_fallback"] == 3 and r["anchors_per_user"] == 2.0  # top-2 words of each user
    assert r["micro"]["precision"] == pytest.approx(2 / 6)  # ann {zorb, a}, bob {and, fen}, cat {we, go}
    # the 50th percentile of ann's effects is 0.9: zorb, quill, a, dog pass
    assert st.anchor_selector("percentile", 50.0, 1)(USERS["ann"][0]) == {"zorb", "quill", "a", "dog"}
    every = st.evaluate(USERS, st.scored_types)
    assert every["micro"]["recall"] == 1.0 and every["micro"]["lift"] == pytest.approx(1.0)
    assert st.recurring_selector(2)(USERS["ann"][0]) == {"zorb"}


def test_distinctive_words_recur_in_held_out_text_and_are_rare_among_others():
    others = [{"the", "cat"}, {"the", "dog"}, {"the"}, {"dog", "zorb"}, set()]
    got = st.distinctive_words({"the", "zorb", "dog", "quill", "fen"}, {"the", "zorb", "dog", "fen"}, others, 0.3)
    assert got == {"zorb", "fen"}  # dog occurs for 2/5 users (not < 1.5), quill never recurs
    assert st.vocab(["Don't stop, DON'T!", "don’t"]) == {"don't", "stop", "don’t"}


def _row(tau, f1, se=0.0, sig=None, fallback=0, user_f1=None):
    return {"tau": tau, "anchor_sets": sig or f"s{tau}", "users": 4, "users_at_fallback": fallback,
            "macro": {"f1": f1, "f1_se": se}, "user_f1": user_f1 or {}}


def test_recommendation_best_macro_f1_ties_to_the_larger_tau_and_within_one_se():
    rec = st.recommend([_row(0.0, 0.2), _row(0.5, 0.3, 0.05), _row(1.0, 0.3, 0.04), _row(2.0, 0.27), _row(3.0, 0.1)])
    assert rec["tau"] == 1.0 and rec["macro_f1"] == 0.3
    assert rec["tau_within_1se"] == 2.0  # 0.27 >= 0.3 − 0.04; 0.1 is not
    # τ values that select the same anchors are one choice (the smallest), not a tie won by the largest
    rec = st.recommend([_row(0.5, 0.1), _row(2.0, 0.3, sig="top-m", fallback=4),
                        _row(4.0, 0.3, sig="top-m", fallback=4), _row(6.0, 0.3, sig="top-m", fallback=4)])
    assert rec["tau"] == 2.0 and rec["users_at_fallback"] == 4
    assert st.recommend([_row(0.0, None), _row(1.0, 0.0)])["tau"] == 1.0
    # bootstrap over users: τ=1 wins whenever user b is drawn at all, τ=0 only when a alone is drawn twice
    rows = [_row(0.0, 0.25, user_f1={"a": 0.5, "b": 0.0}), _row(1.0, 0.3, user_f1={"a": 0.2, "b": 0.4})]
    wins = st.recommend(rows, resamples=2000)["bootstrap_wins"]
    assert set(wins) == {"0", "1"} and wins["0"] == pytest.approx(0.25, abs=0.04)
    with pytest.raises(ValueError, match="no τ has a macro F1"):
        st.recommend([_row(1.0, None)])


def test_one_pass_for_both_counterfactuals_equals_scoring_each(tiny_runtime):
    from tests.test_steerx import ITEMS, POOL, _config

    empty = loo_prompts("ann", ITEMS, POOL, _config("empty"))
    other = loo_prompts("ann", ITEMS, POOL, _config("other_users"))
    d_empty, d_other = st.effects_both(tiny_runtime, empty, other)
    for got, want in zip(d_empty + d_other, token_effects(tiny_runtime, empty) + token_effects(tiny_runtime, other)):
        np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="same items"):
        st.effects_both(tiny_runtime, empty, other[::-1])


MARK = {0: "zorblax", 1: "quindle", 2: "mirthwood", 3: "flimberry", 4: "snorkade", 5: "vextral"}


def _write_data(folder: Path, users: int = 6, items: int = 6) -> Path:
    rows = []
    for u in range(users):
        texts = [f"Note number {k} from me about the weather today. It felt {MARK[u]} and calm on day {k}, the sun "
                 f"came out and I walked the dog past the old mill by the river again." for k in range(items)]
        rows.append({"user_id": f"u{u}", "meta": {},
                     "items": [{"id": f"u{u}-{k}", "text": t} for k, t in enumerate(texts)]})
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "blogs-dev.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _config(tmp_path, **kw):
    kw = {"data_dir": str(_write_data(tmp_path / "data")), "sources": ["blogs"], "users": 2, "train_items": 2,
          "heldout_items": 2, "words": 12, "pool_users": 2, "taus": [0.0, 1.0], "percentiles": [90.0],
          "cache_dir": str(tmp_path / "cache"), "json": str(tmp_path / "tau.json"), "partition": "all", **kw}
    return st.SteerXTauConfig(**kw)


def test_train_and_held_out_items_are_disjoint_and_the_pool_is_neither_evaluated_nor_reference(tmp_path):
    cfg = _config(tmp_path)
    users = st.load_source(cfg, "blogs")
    for d in users.values():
        assert d["complete"] and len(d["train"]) == 2 and len(d["heldout"]) == 2 and len(d["texts"]) == 4
        assert not any(it["output"] in h for it in d["train"] for h in d["heldout"])
        assert all(it["input"].startswith("Continue this text") for it in d["train"])
    evaluated, pool, reference = st.split_users(users, 2, 2, 0)
    assert evaluated == sorted(set(users) - set(pool))[:2] and len(pool) == 2
    assert not set(pool) & (set(evaluated) | set(reference)) and set(reference) == set(users) - set(pool)
    more, same_pool, _ = st.split_users(users, 3, 2, 0)
    assert same_pool == pool and more[:2] == evaluated  # more users: the same pool, the same first users
    whole = st.load_source(_config(tmp_path, item_format="whole"), "blogs")
    assert whole["u0"]["train"][0]["input"] == st.WHOLE_PROMPT
    assert st.load_source(cfg, "blogs") == users  # seeded
    from steerstore.jobs import devdata

    tuned = st.load_source(_config(tmp_path, partition="tune"), "blogs")  # the default: the tuning half only
    assert set(tuned) == {u for u in users if devdata.partition(u) == "tune"} and 0 < len(tuned) < len(users)


def test_the_job_writes_curves_and_reuses_its_cache(tmp_path, tiny_model_folder, capsys):
    from steerstore.operators.runtime import ModelConfig

    cfg = _config(tmp_path, model=ModelConfig(name_or_path=str(tiny_model_folder)))
    report = st.main(cfg)
    res = report["sources"]["blogs"]
    assert (res["users"], res["pool_users"], res["reference_users"]) == (2, 2, 3)
    assert (res["timing"]["users_scored"], res["timing"]["users_cached"], res["timing"]["items"]) == (2, 0, 4)
    for cf in ("empty", "other_users"):
        c = res["counterfactuals"][cf]
        assert [r["tau"] for r in c["absolute"]] == [0.0, 1.0] and [r["percentile"] for r in c["percentile"]] == [90.0]
        # the recommendation is the documented rule on the reported curve: τ values with the same anchors are
        # one choice (the smallest), then the best macro F1 (the mean of the users' F1), ties to the larger τ
        for row in c["absolute"]:
            assert row["macro"]["f1"] == pytest.approx(np.mean(list(row["user_f1"].values())))
        distinct = {}
        for row in sorted(c["absolute"], key=lambda r: r["tau"]):
            distinct.setdefault(row["anchor_sets"], row)
        best_f1 = max(r["macro"]["f1"] for r in distinct.values())
        want = max(r["tau"] for r in distinct.values() if r["macro"]["f1"] >= best_f1 - 1e-9)
        assert (c["recommended"]["tau"], c["recommended"]["macro_f1"]) == (want, best_f1), c["absolute"]
        assert c["recommended"] == st.recommend(c["absolute"])
        # each user's marker word recurs in their held-out notes and nobody else's: distinctive
        assert c["absolute"][0]["distinctive_types"] == 2
    assert json.loads(Path(cfg.json).read_text())["sources"]["blogs"]["users"] == 2
    assert "recommended τ" in capsys.readouterr().out
    again = st.main(cfg)["sources"]["blogs"]
    assert (again["timing"]["users_scored"], again["timing"]["users_cached"]) == (0, 2)
    assert again["counterfactuals"] == res["counterfactuals"]
    more = st.main(dataclasses.replace(cfg, users=3))["sources"]["blogs"]  # only the new user is scored
    assert (more["timing"]["users_scored"], more["timing"]["users_cached"]) == (1, 2)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    from steerstore.jobs.cli import main

    assert main(["bench", "tau", "--data_dir", str(tmp_path / "nowhere"), "--json", ""]) == 1
    assert "development data blogs-dev.jsonl.gz not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "blogs-dev.jsonl.gz").exists(),
                    reason=f"development data not found at {DATA} (shared beside the checkout, not part of the repo)")
def test_a_small_real_run_on_the_development_data(tmp_path):
    cfg = st.SteerXTauConfig(data_dir=str(DATA), sources=["blogs"], users=2, train_items=2, heldout_items=4,
                             words=16, context_items=1, pool_users=4, taus=[0.0, 1.0, 2.0], percentiles=[90.0],
                             # the first two users of all (not of the tuning half): two users with a distinctive
                             # held-out word, so the run reaches a recommendation
                             partition="all",
                             cache_dir="", json=str(tmp_path / "tau.json"))
    report = st.main(cfg)
    c = report["sources"]["blogs"]["counterfactuals"]
    assert set(c) == {"empty", "other_users"}
    for cf in c.values():
        assert cf["scored_words"] > 16
        assert cf["absolute"][0]["anchors_per_user"] >= cf["absolute"][-1]["anchors_per_user"]


def test_paired_comparison_with_a_baseline_run_is_per_user_and_refuses_other_users():
    def run(f1s):  # one source, one counterfactual, two τ; user -> F1 per τ
        return {"sources": {"blogs": {"counterfactuals": {"other_users": {"absolute": [
            {"tau": t, "user_f1": {u: f[i] for u, f in f1s.items()}} for i, t in enumerate((0.5, 1.0))]}}}}}
    base = run({"a": (0.2, 0.3), "b": (0.1, 0.1), "c": (0.0, 0.4)})
    variant = run({"a": (0.1, 0.3), "b": (0.1, 0.2), "c": (0.3, 0.1)})
    rows = st.paired_vs_baseline(variant, base)["blogs"]["other_users"]
    assert [r["tau"] for r in rows] == [0.5, 1.0]
    assert rows[0]["mean_delta_f1"] == pytest.approx((-0.1 + 0.0 + 0.3) / 3, abs=1e-4)
    assert (rows[0]["users_worse"], rows[0]["users_better"], rows[0]["users"]) == (1, 1, 3)
    assert rows[1]["mean_delta_f1"] == pytest.approx((0.0 + 0.1 - 0.3) / 3, abs=1e-4)
    assert rows[1]["ci95"][0] <= rows[1]["mean_delta_f1"] <= rows[1]["ci95"][1]
    assert rows[1]["ci95"][0] >= -0.3 and rows[1]["ci95"][1] <= 0.1  # resampled means of the three differences
    with pytest.raises(ValueError, match="same users"):
        st.paired_vs_baseline(run({"a": (0.1, 0.3), "d": (0.1, 0.2)}), base)
