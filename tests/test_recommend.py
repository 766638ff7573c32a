"""The per-user recommendation: the held-out split, the candidates' gains against plain references, the
shrunk choice, and the refresh storing it (held-out items never reach a method's inputs)."""

import math

import numpy as np
import pytest
import torch

from steerstore.infra.reader import StoreReader, UserArtifacts, UserHeads, UserVectors
from steerstore.infra.store import SteeringStore
from steerstore.jobs import refresh
from steerstore.operators import recommend as rec
from steerstore.operators.history import HistoryContextConfig, retrieved_prompt
from steerstore.operators.runtime import ModelConfig, ModelRuntime, Steering
from steerstore.operators.style import style_prompt
from tests.test_fleet import STYLES, fleet_config
from tests.tiny import write_jsonl


def item(k, text=None):
    return {"item_id": f"h{k}", "input": f"Write about thing {k}.", "output": text or f"My words on thing {k}.",
            "timestamp": k}


def test_holdout_takes_the_most_recent_items_and_the_pairs_made_from_them_out():
    config = rec.RecommendConfig(validation_items=1, min_items=3)
    user = {"user_id": "u", "histories": [item(k) for k in range(4)],
            "pairs": [{"pair_id": "p0", "prompt": "Write about thing 3.", "chosen": "x", "rejected": "y"},
                      {"pair_id": "p1", "prompt": "Other.", "chosen": "My words on thing 3.", "rejected": "y"},
                      {"pair_id": "p2", "prompt": "Other.", "chosen": "z", "rejected": "y"},
                      {"pair_id": "p3", "prompt": "More.", "chosen": "w", "rejected": "y"}]}
    kept, held = rec.holdout(user, config, min_pairs=2)
    assert [h["item_id"] for h in held] == ["h3"]
    assert [h["item_id"] for h in kept["histories"]] == ["h0", "h1", "h2"]
    assert [p["pair_id"] for p in kept["pairs"]] == ["p2", "p3"]
    # too few items: nothing held out
    assert rec.holdout({**user, "histories": user["histories"][:2]}, config)[1] == []
    # dropping the pairs would leave too few: the user keeps everything and gets no per-user choice
    kept, held = rec.holdout(user, config, min_pairs=3)
    assert held == [] and kept is user
    assert rec.holdout(user, rec.RecommendConfig(enabled=False))[1] == []


def cand(condition, method, multiplier, scale=None):
    return rec.Candidate(condition, method, None, multiplier, scale)


def test_the_choice_is_the_populations_with_little_data_and_the_users_own_with_much():
    cands = [cand("plain", "none", None), cand("plain", "caa", 1.0, 2.0), cand("plain", "dps", 1.0, 1.0)]
    prior = {c.key: v for c, v in zip(cands, [0.0, 0.05, -0.02])}
    gains_per_token = [0.0, -0.01, 0.04]  # the user: dps helps, caa hurts
    for tokens, expected in ((0, "caa"), (10, "caa"), (100000, "dps")):
        gains = [g * tokens for g in gains_per_token]
        best, table, w = rec.choose(cands, gains, tokens, prior, kappa=300.0)["plain"]
        assert best.method == expected, (tokens, table)
        assert w == pytest.approx(tokens / (tokens + 300.0))
        assert table[2]["shrunk"] == pytest.approx(w * gains_per_token[2] + (1 - w) * prior[cands[2].key])
    # a candidate the population never had is ranked on the none prior: the user's evidence must beat doing nothing
    best, table, _ = rec.choose(cands, [0.0, -1.0, -1.0], 10, {}, kappa=300.0)["plain"]
    assert best.method == "none"
    # ties go to none, then the smaller strength
    two = [cand("plain", "none", None), cand("plain", "caa", 2.0, 4.0), cand("plain", "caa", 0.5, 1.0)]
    assert rec.choose(two, [0.0, 0.0, 0.0], 5, {}, 0.0)["plain"][0].method == "none"
    assert rec.choose(two, [0.0, 5.0, 5.0], 5, {}, 0.0)["plain"][0].scale == 1.0


def test_population_choice_is_the_best_pooled_candidate_per_condition():
    cands = {c.key: c for c in [cand("plain", "none", None), cand("plain", "caa", 1.0, 2.0),
                                cand("history", "none", None), cand("history", "dps", 2.0, 2.0)]}
    keys = list(cands)
    chosen = rec.population_choice(cands, {keys[0]: 0.0, keys[1]: -0.1, keys[2]: 0.2, keys[3]: 0.3})
    assert chosen["plain"]["method"] == "none"
    assert chosen["history"]["method"] == "dps" and chosen["history"]["scale"] == 2.0


def test_vector_candidates_stop_at_the_largest_alpha_whose_decoded_answers_kept_fluency():
    """The store's strength curves carry each α's decoded perplexity ratio: a candidate above the largest α that
    passed both fluency guards is not offered (none above the grid either); without ratios there is no cap."""
    from types import SimpleNamespace

    from steerstore.jobs.refresh.recommend import strengths
    from steerstore.operators.scale import ScaleConfig

    def curve(ratios, nll=None):
        return [{"alpha": a, "accuracy": 0.5, "mean_margin": 0.0, "nll_increase": (nll or {}).get(a, 0.1),
                 "perplexity_ratio": r} for a, r in ratios.items()]

    scale = ScaleConfig(grid=[0.5, 1.0, 2.0, 4.0], max_perplexity_ratio=1.5, max_nll_increase=0.5)
    config = SimpleNamespace(scale=scale, steerx=SimpleNamespace(vectors=SimpleNamespace(source="history",
                                                                                        lambda_grid=[0.0])))
    g = {"scales": {"caa": 1.0, "population": 2.0}, "steerx_active": False}
    curves = {"caa": {"alpha": 1.0, "curve": curve({0.5: 1.0, 1.0: 1.2, 2.0: 1.4, 4.0: 1.9})},
              "population": {"alpha": 2.0, "curve": curve({0.5: 1.0, 1.0: 1.1, 2.0: 1.3, 4.0: 1.2}, {4.0: 0.9})},
              "pairs": 16, "history": {"caa": {"alpha": 0.5, "curve": curve({0.5: 1.6, 1.0: 2.0, 2.0: 3.0, 4.0: 4.0})},
                                       "population": {"alpha": 1.0, "curve": [{"alpha": 1.0, "accuracy": 1,
                                                                               "mean_margin": 0, "nll_increase": 0}]}}}
    s = strengths(config, g, curves)
    assert s["plain"].alpha_max == {"caa": 2.0, "population": 2.0}  # population's 4: under 1.5×, but its NLL rose 0.9
    assert s["history"].alpha_max == {"caa": 0.5}  # nothing kept fluency: the chosen α; no ratios: no cap
    rng = np.random.default_rng(0)
    vec = UserVectors("u", [1], rng.normal(size=(1, 4)).astype(np.float32), [1], 1.0, "all", "m", "fp", 3)
    art = UserArtifacts("u", "found", caa=vec, population=vec)
    cands = rec.candidates(art, s, rec.RecommendConfig(multipliers=[0.5, 1.0, 2.0], methods=["caa", "population"]))
    offered = sorted((c.condition, c.method, c.scale) for c in cands if c.method != "none")
    assert offered == [("history", "caa", 0.25), ("history", "caa", 0.5),
                       ("history", "population", 0.5), ("history", "population", 1.0), ("history", "population", 2.0),
                       ("plain", "caa", 0.5), ("plain", "caa", 1.0), ("plain", "caa", 2.0),
                       ("plain", "population", 1.0), ("plain", "population", 2.0)]



def test_style_and_influence_candidates_stop_where_their_decoded_answers_failed_the_guards():
    """The SteerX calibration records the largest γ that passed the decoded guards at the chosen layer and the λ that
    passed: the recommendation offers no style-vector multiple above that γ and no λ that failed; a store
    calibrated without the guard (no such keys) offers every candidate."""
    from types import SimpleNamespace

    from steerstore.jobs.refresh.recommend import strengths
    from steerstore.operators.scale import ScaleConfig

    config = SimpleNamespace(scale=ScaleConfig(), steerx=SimpleNamespace(vectors=SimpleNamespace(
        source="blend", lambda_grid=[0.0, 1.1, 2.0])))
    guarded = {"blend": {"layer": 1, "gamma": 0.5, "gamma_max": 0.5},
               "influence": {"lambda": 0.0, "lambdas": [0.0, float(np.float32(1.1))]}}  # as read back from Parquet
    g = {"scales": {}, "steerx_active": True, "steerx_recommended": guarded,
         "steerx_recommended_history": {"blend": {"layer": 1, "gamma": 1.0}, "influence": {"lambda": 2.0}}}
    s = strengths(config, g, {})
    assert (s["plain"].style_max, s["plain"].lambdas) == (0.5, [0.0, 1.1])
    assert (s["history"].style_max, s["history"].lambdas) == (None, [0.0, 1.1, 2.0])  # no cap (and JSON-safe)
    rng = np.random.default_rng(0)
    style = UserVectors("u", [1], rng.normal(size=(1, 4)).astype(np.float32), [1], 1.0, "all", "m", "fp", 3)
    art = UserArtifacts("u", "found", style_vectors={"blend": style}, steerx={"context": "Short and dry."})
    cands = rec.candidates(art, s, rec.RecommendConfig(multipliers=[0.5, 1.0, 2.0],
                                                       methods=["style_vector", "influence"]))
    offered = sorted((c.condition, c.method, c.scale) for c in cands if c.method != "none")
    assert offered == [("history", "influence", 0.0), ("history", "influence", 1.1), ("history", "influence", 2.0),
                       ("history", "style_vector", 0.5), ("history", "style_vector", 1.0),
                       ("history", "style_vector", 2.0),
                       ("plain", "influence", 0.0), ("plain", "influence", 1.1),
                       ("plain", "style_vector", 0.25), ("plain", "style_vector", 0.5)]


@pytest.fixture(scope="module")
def runtime(tiny_model_folder):
    return ModelRuntime(ModelConfig(name_or_path=str(tiny_model_folder)))


def test_candidate_gains_equal_plain_references(runtime):
    rt = runtime
    rng = np.random.default_rng(0)
    hidden = rt.hidden_size
    vec = UserVectors("u", [1, 2], rng.normal(size=(2, hidden)).astype(np.float32), [2], 1.0, "all", "m", "fp", 3)
    art = UserArtifacts("u", "found", caa=vec, population=vec,
                        steerx={"context": "Short and cheerful."},
                        dps=UserHeads("u", [(1, 0), (2, 1)], "user", 1.0, False, 0.1, None, [], "fast", None, "fp"))
    strengths = {"plain": rec.Strengths({"caa": 2.0, "population": 1.0}, None, "history", [0.0, 1.0]),
                 "history": rec.Strengths({"caa": 1.0, "population": 1.0}, None, "history", [1.0])}
    config = rec.RecommendConfig(multipliers=[0.5, 2.0], methods=["caa", "influence", "dps"])
    cands = rec.candidates(art, strengths, config)
    assert {(c.condition, c.method) for c in cands} == {(c, m) for c in ("plain", "history")
                                                        for m in ("none", "caa", "influence", "dps")}
    train = [item(0, "Cheerful words about zero!"), item(1, "More cheer about one!")]
    held = [item(2, "Cheer for two!"), item(3, "And three, cheerfully.")]
    composed = HistoryContextConfig(context_items=1, selection="bm25", context_chars=100)
    case = rec.UserCase("u", held, train, cands)
    gains, tokens = rec.score(rt, [case], composed)["u"]
    inputs, outputs = [h["input"] for h in held], [h["output"] for h in held]
    base, n = rt.response_logprobs(inputs, outputs)
    assert tokens == int(n.sum())
    prompts = {"plain": inputs, "history": [retrieved_prompt(train, x, composed) for x in inputs]}
    for c, gain in zip(cands, gains):
        p = prompts[c.condition]
        if c.method == "none":
            ref = 0.0 if c.condition == "plain" else float((rt.response_logprobs(p, outputs)[0] - base).sum())
        elif c.method == "caa":
            steer = Steering({2: torch.as_tensor(np.repeat(vec.vectors[1:2], 2, 0))}, torch.full((2,), c.scale), "all")
            ref = float((rt.response_logprobs(p, outputs, steer)[0] - base).sum())
        elif c.method == "influence":
            lp, _ = rt.influence_logprobs(p, [style_prompt("Short and cheerful.", x) for x in p], outputs, [c.scale])
            ref = float((lp[0] - base).sum())
        else:
            lp, _ = rt.contrast_logprobs(p, outputs, [[(1, 0), (2, 1)]] * 2, [c.scale])
            ref = float((lp[0] - base).sum())
        assert gain == pytest.approx(ref, abs=2e-3), c


def test_dps_guard_sums_equal_decoding_each_candidate_as_serving_does(runtime, monkeypatch):
    """Every DPS candidate's recorded answer NLL and tokens equal contrast-decoding its rows one by one (γ, heads,
    adaptivity and plausibility floor as the stored row says) and scoring them under the unsteered model; the
    unsteered sums are the unsteered answers' own; candidates of other methods are not decoded."""
    from steerstore.operators.runtime import HeadContrast
    from steerstore.operators.scale import ScaleConfig

    rt = runtime
    heads = [(1, 0), (2, 1)]
    art = UserArtifacts("u", "found", dps=UserHeads("u", heads, "user", 1.5, True, 0.2, None, [], "fast", None, "fp"))
    strengths = {"plain": rec.Strengths({}, None, "history", []), "history": rec.Strengths({}, None, "history", [])}
    cands = rec.candidates(art, strengths, rec.RecommendConfig(multipliers=[0.5, 2.0], methods=["dps"]))
    train = [item(0, "Cheerful words about zero!"), item(1, "More cheer about one!")]
    held = [item(2, "Cheer for two!"), item(3, "And three, cheerfully.")]
    composed = HistoryContextConfig(context_items=1, selection="bm25", context_chars=100)
    guard = ScaleConfig(fluency_tokens=5, max_drift_ratio=0)  # no content guard: no encoder needed
    found = rec.decoded_guard(rt, [rec.UserCase("u", held, train, cands)], composed, guard)["u"]
    inputs = [h["input"] for h in held]
    prompts = {"plain": inputs, "history": [retrieved_prompt(train, x, composed) for x in inputs]}
    dps = [c for c in cands if c.method == "dps"]
    assert sorted(found) == sorted(c.key for c in dps) and len(dps) == 4
    for c in dps:
        p = prompts[c.condition]
        answers = [rt.generate([x], 5, contrast=HeadContrast([heads], gamma=1.5 * c.multiplier, adaptive=True,
                                                             plausibility=0.2))[0] for x in p]
        lp, n = rt.response_logprobs(p, answers)
        plain = [rt.generate([x], 5)[0] for x in p]
        lp0, n0 = rt.response_logprobs(p, plain)
        got = found[c.key]
        assert (got["condition"], got["multiplier"], got["decoded"]) == (c.condition, c.multiplier, 2)
        assert got["answer_tokens"] == int(n.sum()) and got["unsteered_tokens"] == int(n0.sum())
        assert got["answer_nll"] == pytest.approx(-float(lp.sum()), abs=1e-3)
        assert got["unsteered_nll"] == pytest.approx(-float(lp0.sum()), abs=1e-3)
        assert got["drift"] is None
    # contrast decoding changed some answer (else the parity above says nothing about γ)
    assert any(found[c.key]["answer_nll"] != pytest.approx(found[c.key]["unsteered_nll"], abs=1e-3) for c in dps)
    # the content guard: each candidate's drift from its condition's unsteered answers, and the user's reference (the
    # history prompt's unsteered answers against the plain prompt's), summed over the same items; a stand-in scorer
    def stub(outputs, references, encoder):
        return np.asarray([(len(a) % 7 + 3 * len(b) % 5) / 10 for a, b in zip(outputs, references)], np.float64)

    monkeypatch.setattr(rec, "content_drifts", stub)
    drifted = rec.decoded_guard(rt, [rec.UserCase("u", held, train, cands)], composed,
                                ScaleConfig(fluency_tokens=5, max_drift_ratio=1.0))["u"]
    unsteered = {cond: [rt.generate([x], 5)[0] for x in p] for cond, p in prompts.items()}
    reference = float(stub(unsteered["history"], unsteered["plain"], None).sum())
    for c in dps:
        answers = [rt.generate([x], 5, contrast=HeadContrast([heads], gamma=1.5 * c.multiplier, adaptive=True,
                                                             plausibility=0.2))[0] for x in prompts[c.condition]]
        got = drifted[c.key]
        assert got["drift"] == pytest.approx(float(stub(answers, unsteered[c.condition], None).sum()))
        assert got["drift_reference"] == pytest.approx(reference) and got["drift_items"] == 2
        assert got["answer_nll"] == pytest.approx(found[c.key]["answer_nll"], abs=1e-3)


def test_dps_guard_pools_over_users_and_caps_the_offered_multipliers(caplog):
    """The pooled figures: perplexity from summed NLL and tokens, drift against the pooled reference; a multiplier
    failing either is offered to no user in that condition and is not the population's choice."""
    from steerstore.jobs.refresh.recommend import _guard_dps, prior_from
    from steerstore.operators.scale import ScaleConfig

    guard = ScaleConfig(max_perplexity_ratio=1.5, max_drift_ratio=1.0)

    def sums(cond, m, nll, nll0, drift, ref):
        return {"condition": cond, "multiplier": m, "answer_nll": nll, "answer_tokens": 10, "unsteered_nll": nll0,
                "unsteered_tokens": 10, "decoded": 1, "drift": drift, "drift_reference": ref,
                "drift_items": 0 if drift is None else 1}

    a = {"plain|dps||1": sums("plain", 1.0, 10.0, 10.0, 0.2, 0.4), "plain|dps||2": sums("plain", 2.0, 20.0, 10.0, 0.2, 0.4),
         "history|dps||1": sums("history", 1.0, 10.0, 10.0, 0.6, 0.4)}
    b = {"plain|dps||1": sums("plain", 1.0, 12.0, 10.0, None, None), "plain|dps||2": sums("plain", 2.0, 10.0, 10.0, 0.1, 0.3),
         "history|dps||1": sums("history", 1.0, 10.0, 10.0, 0.3, 0.3)}
    figures = rec.guard_figures([a, b], guard)
    assert figures["plain|dps||1"]["perplexity_ratio"] == pytest.approx(math.exp(1.1 - 1.0))
    assert figures["plain|dps||1"]["content_drift"] == pytest.approx(0.2)  # b has no reference: left out
    assert figures["plain|dps||1"]["drift_limit"] == pytest.approx(0.4)
    assert figures["plain|dps||2"]["perplexity_ratio"] == pytest.approx(math.exp(1.5 - 1.0))  # 1.65 > 1.5
    assert figures["history|dps||1"]["content_drift"] == pytest.approx(0.45)
    assert figures["history|dps||1"]["drift_limit"] == pytest.approx(0.35)
    assert [k for k, f in figures.items() if f["passes"]] == ["plain|dps||1"]
    assert rec.passing_multipliers(figures, "plain") == [1.0] and rec.passing_multipliers(figures, "history") == []
    # the population: DPS at 2× has the best gain on the plain prompt but failed, so the choice is 1×
    def cands(cond):
        return [{"key": f"{cond}|none||", "condition": cond, "method": "none", "source": None, "multiplier": None,
                 "scale": None}] + [{"key": f"{cond}|dps||{m:g}", "condition": cond, "method": "dps", "source": None,
                                     "multiplier": m, "scale": m} for m in (1.0, 2.0)]
    evidence = [{"user_id": u, "candidates": cands("plain") + cands("history")[:2],
                 "gains": [0.0, 1.0, 5.0, 0.0, 9.0], "tokens": 10, "guard": sums_of} for u, sums_of in (("a", a), ("b", b))]
    found = prior_from(evidence, guard)
    assert found["population"]["plain"]["multiplier"] == 1.0 and found["population"]["history"]["method"] == "none"
    assert prior_from(evidence)["population"]["plain"]["multiplier"] == 2.0  # unguarded
    # the strengths: capped where the guard ran, untouched elsewhere
    from types import SimpleNamespace
    g = {"recommend_strengths": {c: rec.Strengths({}, None, "history", []) for c in ("plain", "history")}}
    config = SimpleNamespace(dps=SimpleNamespace(gamma=1.0), scale=guard, recommend=rec.RecommendConfig())
    _guard_dps(config, g, {"plain|dps||1": figures["plain|dps||1"]})
    assert g["recommend_strengths"]["plain"].dps_multipliers == [1.0]
    assert g["recommend_strengths"]["history"].dps_multipliers is None
    # the store's own γ (1×) failing is logged with the figures, a side that decoded nothing included
    import logging
    failed = {**figures, "history|dps||2": {**figures["history|dps||1"], "multiplier": 2.0, "perplexity_ratio": None}}
    with caplog.at_level(logging.WARNING, logger="steerstore"):
        _guard_dps(config, {"recommend_strengths": {"history": rec.Strengths({}, None, "history", [])}}, failed)
    assert "failed the decoded guards on top of retrieved history" in caplog.text
    assert "2×: no tokens decoded" in caplog.text and "only at no strength" in caplog.text
    caplog.clear()  # no 1× figure (the store's γ was not decoded): nothing to say
    with caplog.at_level(logging.WARNING, logger="steerstore"):
        _guard_dps(config, {"recommend_strengths": {"plain": rec.Strengths({}, None, "history", [])}},
                   {"plain|dps||2": figures["plain|dps||2"]})
    assert caplog.text == ""
    art = UserArtifacts("u", "found", dps=UserHeads("u", [(1, 0)], "user", 1.0, False, 0.1, None, [], "fast", None, "fp"))
    offered = rec.candidates(art, g["recommend_strengths"], rec.RecommendConfig(multipliers=[0.5, 1.0, 2.0],
                                                                                methods=["dps"]))
    assert sorted((c.condition, c.multiplier) for c in offered if c.method == "dps") == [
        ("history", 0.5), ("history", 1.0), ("history", 2.0), ("plain", 1.0)]


# ---- the refresh ---------------------------------------------------------------------------------

USERS = [f"user-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def recommended_run(ray_cluster, tmp_path_factory, tiny_model_folder):
    tmp = tmp_path_factory.mktemp("recommend")
    pairs = [{"user_id": u, "pair_id": f"{u}p{k}", "prompt": f"Write about thing {k}.",
              "chosen": f"{STYLES[(i + k) % len(STYLES)]} {k}", "rejected": "Meh. Fine.", "weight": 1.0}
             for i, u in enumerate(USERS) for k in range(5)]
    # user-5 has 3 items: nothing held out, it gets the population's choice
    histories = [{"user_id": u, "item_id": f"{u}h{k}", "input": f"Write about thing {k}.",
                  "output": f"{STYLES[(i + k) % len(STYLES)]} {k}", "timestamp": k}
                 for i, u in enumerate(USERS) for k in range(3 if u == "user-5" else 5)]
    cfg = fleet_config(str(tmp / "store"), str(tiny_model_folder), write_jsonl(tmp / "pairs.jsonl", pairs),
                       write_jsonl(tmp / "histories.jsonl", histories),
                       recommend={"multipliers": [1.0, 2.0], "sample_users": 3})
    summary = refresh.main(cfg)
    return cfg, summary, str(tmp / "store")


def test_the_refresh_stores_each_users_choice_and_the_held_out_items_reach_no_method(recommended_run):
    cfg, summary, uri = recommended_run
    store = SteeringStore(uri)
    version = store.latest()
    manifest = store.read_manifest(version)
    entry = manifest["recommend"]
    assert entry["sample_users"] >= 1 and set(entry["population"]) == {"plain", "history"}
    # the decoded guard on DPS's γ ran on the sample: every multiplier in both conditions, with the figures
    guard = entry["dps_guard"]
    assert sorted((f["condition"], f["multiplier"]) for f in guard.values()) == [
        (c, m) for c in ("history", "plain") for m in (1.0, 2.0)]
    for f in guard.values():
        assert f["decoded"] >= 1 and {"perplexity_ratio", "content_drift", "drift_limit", "passes"} <= set(f)
        assert f["passes"] == ((f["perplexity_ratio"] or math.inf) <= cfg.scale.max_perplexity_ratio
                               and f["content_drift"] <= f["drift_limit"])
    for condition in ("plain", "history"):
        assert entry["strengths"][condition]["dps_multipliers"] == sorted(
            f["multiplier"] for f in guard.values() if f["condition"] == condition and f["passes"])
    rows = store.read_table("recommended", version).to_pylist()
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user_id"], {})[r["condition"]] = r
    assert set(by_user) == set(USERS)
    for u in USERS:
        assert set(by_user[u]) == {"plain", "history"}
        for r in by_user[u].values():
            if u == "user-5":
                assert r["chosen_by"] == "population" and r["items"] == 0
                assert r["method"] == entry["population"][r["condition"]]["method"]
            else:
                assert r["chosen_by"] == "user" and r["items"] == 1 and r["tokens"] > 0
                methods = {c["method"] for c in r["candidates"]}
                assert {"none", "caa", "population"} <= methods, methods
                # DPS is offered at the multipliers that passed the decoded guard on the population's sample
                passed = entry["strengths"][r["condition"]]["dps_multipliers"]
                assert sorted(c["multiplier"] for c in r["candidates"] if c["method"] == "dps") == passed
                best = max(r["candidates"], key=lambda c: c["shrunk"])
                assert best["shrunk"] == pytest.approx(next(c["shrunk"] for c in r["candidates"]
                                                             if c["method"] == r["method"] and c["scale"] == pytest.approx(r["scale"] or 0.0)
                                                             or (r["method"] == "none" and c["method"] == "none")))
    # the held-out item (the most recent) reached no method: DPS and SteerX scored 4 items, CAA used 4 of 5 pairs
    # (the one made from it left out)
    dps = {r["user_id"]: r for r in store.read_table("dps_heads", version).to_pylist()}
    assert dps["user-0"]["n_items"] == 4 and dps["user-5"]["n_items"] == 3
    steerx = {r["user_id"]: r for r in store.read_table("steerx_users", version).to_pylist()}
    assert steerx["user-0"]["n_items"] == 4
    caa = {r["user_id"]: r for r in store.read_table("vectors", version).to_pylist() if r["method"] == "caa"}
    assert caa["user-0"]["n_pairs"] == 4 and caa["user-5"]["n_pairs"] == 5
    # the summary counts users by the method chosen for them
    counts = summary["recommended"]
    assert set(counts) == {"plain", "history"}
    assert all(sum(n.values()) == len(USERS) for n in counts.values())
    assert sum(v for k, v in counts["plain"].items() if k.startswith("population:")) == 1  # user-5
    # a reader sees the rows
    assert StoreReader(uri).recommended("user-0")["plain"]["method"] == by_user["user-0"]["plain"]["method"]


def test_an_unchanged_night_carries_every_choice(recommended_run):
    cfg, _, uri = recommended_run
    store = SteeringStore(uri)
    first = store.read_manifest(store.latest())["recommend"]
    before = store.read_table("recommended", store.latest()).sort_by([("user_id", "ascending"),
                                                                      ("condition", "ascending")]).to_pylist()
    summary = refresh.main(cfg)
    after = store.read_table("recommended", store.latest()).sort_by([("user_id", "ascending"),
                                                                     ("condition", "ascending")]).to_pylist()
    assert summary["incremental"]["users"]["dps"]["carried"] == len(USERS)
    assert store.read_manifest(store.latest())["recommend"] == first  # every family frozen: the prior is reused
    assert after == before
