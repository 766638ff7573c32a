"""Per-user preference accuracy on real development data (skipped when ../shared/data is absent)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from steerstore.jobs.bench import pref_accuracy as pref_eval

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
real_data = [pytest.mark.slow, pytest.mark.skipif(
    not (DATA / "blogs-dev.jsonl.gz").exists(),
    reason=f"development data not found at {DATA} (it is shared beside the checkout, not part of the repo)")]


def _with_real_data(test):
    for mark in real_data:
        test = mark(test)
    return test


def _steered_margin(runtime, pair, vectors, alpha=1.0):
    """One pair scored alone: (log p_α(chosen) − log p_0(chosen)) − (log p_α(rejected) − log p_0(rejected))."""
    from steerstore.operators.runtime import Steering

    steer = Steering({l: torch.as_tensor(np.asarray(v)[None], dtype=torch.float32) for l, v in vectors.items()},
                     torch.tensor([float(alpha)]), "response")
    scored = []
    for response in (pair["chosen"], pair["rejected"]):
        steered, _ = runtime.response_logprobs([pair["prompt"]], [response], steer)
        plain, _ = runtime.response_logprobs([pair["prompt"]], [response])
        scored.append(float(steered[0] - plain[0]))
    return scored[0] - scored[1]


def _per_token_prefers_chosen(runtime, pair):
    c, n_c = runtime.response_logprobs([pair["prompt"]], [pair["chosen"]])
    r, n_r = runtime.response_logprobs([pair["prompt"]], [pair["rejected"]])
    return float(c[0]) / int(n_c[0]) > float(r[0]) / int(n_r[0])


def _user_mean(pairs, hits):
    by_user = {}
    for p, h in zip(pairs, hits):
        by_user.setdefault(p["user_id"], []).append(float(h))
    return float(np.mean([np.mean(v) for v in by_user.values()]))


def small_config(tmp_path):
    from steerstore.infra.config import from_dict

    return from_dict(pref_eval.PrefEvalConfig, {
        "data_dir": str(DATA), "sources": ["blogs"], "users": 3, "train_pairs": 3, "heldout_pairs": 1,
        "words": 20, "out": str(tmp_path), "json": str(tmp_path / "figures.json"), "scale": {"sample_pairs": 3, "grid": [1.0, 2.0]},
        "ray": {"progress_bars": False}})


@_with_real_data
def test_held_out_pairs_never_reach_the_refresh_job():
    cfg = pref_eval.PrefEvalConfig(data_dir=str(DATA), sources=["blogs"], users=4, train_pairs=3, heldout_pairs=2)
    train, heldout = pref_eval.build_pairs(cfg)
    assert len(train) == 12 and len(heldout) == 8
    assert not {p["pair_id"] for p in train} & {p["pair_id"] for p in heldout}
    assert not {p["chosen"] for p in train} & {p["chosen"] for p in heldout}
    assert all(p["chosen"] != p["rejected"] for p in train + heldout)
    assert pref_eval.build_pairs(cfg) == (train, heldout)  # deterministic for a seed


@_with_real_data
def test_the_evaluation_scores_every_method_on_held_out_pairs_of_real_users(ray_cluster, tmp_path):
    from steerstore.infra.reader import StoreReader
    from steerstore.operators.runtime import ModelRuntime

    cfg = small_config(tmp_path)
    report = pref_eval.main(cfg)
    assert report["pairs"] == {"train": 9, "heldout": 3} and report["users"] == 3
    assert report["store"]["caa_vector_bytes_per_user_raw"] == 8 * 576 * 4
    assert report["store"]["bt_theta_bytes_per_user_raw"] == 8 * 4
    assert json.loads((tmp_path / "results.json").read_text())["methods"] == report["methods"]
    # α per method: the documented rule on the curve the refresh recorded (within the fluency guards, the best
    # accuracy, ties to the larger mean margin, then the smaller α)
    reader = StoreReader(str(tmp_path / "store"))
    curves = reader.manifest["scale_choice"]
    for method in ("population", "caa", "bt"):
        curve = curves[method]["curve"]
        assert sorted(c["alpha"] for c in curve) == [1.0, 2.0]
        allowed = [c for c in curve if c["nll_increase"] <= cfg.scale.max_nll_increase
                   and c["perplexity_ratio"] <= cfg.scale.max_perplexity_ratio
                   and c.get("content_drift", 0.0) <= c.get("drift_limit", float("inf"))] or curve[:1]
        top = max(round(c["accuracy"], 6) for c in allowed)
        tied = [c for c in allowed if round(c["accuracy"], 6) == top]
        top_margin = max(c["mean_margin"] for c in tied)
        expected_alpha = min(c["alpha"] for c in tied if c["mean_margin"] == top_margin)
        assert curves[method]["alpha"] == expected_alpha and report["methods"][method]["alpha"] == expected_alpha
    # accuracy per method: each held-out pair's margin recomputed alone with the stored vectors
    _, heldout = pref_eval.build_pairs(cfg)
    runtime = ModelRuntime(cfg.model)
    layers = reader.population().recommended_layers
    assert report["layers"] == layers
    stored = {"population": lambda u: reader.population(), "caa": lambda u: reader.vectors([u])[u],
              "bt": lambda u: reader.bt([u])[u]}
    for method, get in stored.items():
        alpha = report["methods"][method]["alpha"]
        m = np.asarray([_steered_margin(runtime, p, get(p["user_id"]).at(layers), alpha) for p in heldout])
        assert np.abs(m).min() > 1e-3, (method, m)  # no margin near 0: its sign is unambiguous
        got = report["methods"][method]
        assert got["accuracy"] == pytest.approx(float((m > 0).mean()), abs=1e-9), (method, m)
        assert got["per_user_accuracy"] == pytest.approx(_user_mean(heldout, m > 0), abs=1e-9), (method, m)
        assert got["mean_margin"] == pytest.approx(float(m.mean()), rel=1e-2, abs=2e-2), (method, m)
    reference = [_per_token_prefers_chosen(runtime, p) for p in heldout]
    assert report["methods"]["unsteered (reference)"]["accuracy"] == pytest.approx(float(np.mean(reference)))


def test_eval_preference_accuracy_counts_pairs_whose_margin_each_users_scaled_vector_makes_positive(tiny_runtime):
    from steerstore.infra.reader import UserVectors
    from steerstore.jobs.evaluate.score import preference_accuracy
    from steerstore.operators.metrics import MetricsConfig, bootstrap_ci

    rt = tiny_runtime
    pairs = [
        {"user_id": "cat", "prompt": "Say hello.", "chosen": "Hello there, friend.", "rejected": "Go away."},
        {"user_id": "ann", "prompt": "Tell me about the weather today, please.", "chosen": "Wow, I love it!",
         "rejected": "The fox jumps."},
        {"user_id": "bob", "prompt": "Hi", "chosen": "Noted. The answer is brief and formal.", "rejected": "Sure thing!"},
        {"user_id": "ann", "prompt": "Summarise the plot of a novel in one sentence.", "chosen": "A boy finds a dragon.",
         "rejected": "Wow, amazing!!"},
        {"user_id": "bob", "prompt": "Describe your morning.", "chosen": "I woke early and read.",
         "rejected": "Coffee!!! Then chaos, lol."},
    ]
    g = np.random.default_rng(5)
    scales = {"ann": 3.0, "bob": 0.5}  # each user's own α; cat has no vectors
    found = {u: UserVectors(user_id=u, layers=[1, 2], vectors=g.standard_normal((2, rt.hidden_size)).astype(np.float32),
                            recommended_layers=[2], recommended_scale=scales[u], positions="response", model_id="tiny",
                            model_fingerprint="tiny", n_pairs=2) for u in ("ann", "bob")}

    class Reader:  # what preference_accuracy reads: CAA vectors; no BT in this store
        def vectors(self, user_ids, method="caa", source=None):
            assert method == "caa"
            return {u: found[u] for u in user_ids if u in found}

        def bt(self, user_ids):
            raise KeyError("bt_coords")

    metrics = MetricsConfig(bootstrap_resamples=200)
    table, unsteered = preference_accuracy(rt, Reader(), pairs, metrics, ["caa", "bt"])
    assert table["method"].tolist() == ["caa", "random"]  # steered rows (and their null); unsteered apart
    rows = {r["method"]: r for r in table.to_dict("records")}
    # the unsteered model's own preference: chosen has the higher per-token log-likelihood
    reference = [_per_token_prefers_chosen(rt, p) for p in pairs]
    assert unsteered["pair_accuracy"] == pytest.approx(np.mean(reference))
    assert unsteered["user_accuracy"] == pytest.approx(_user_mean(pairs, reference))
    assert (unsteered["n_pairs"], unsteered["n_users"]) == (5, 3)
    # CAA: only users with vectors; pair i steered at the recommended layer by its user's vector × its user's α
    evaluated = [p for p in pairs if p["user_id"] in found]
    m = np.asarray([_steered_margin(rt, p, {2: found[p["user_id"]].vectors[1]}, scales[p["user_id"]])
                    for p in evaluated])
    assert np.abs(m).min() > 0.05, m  # no margin near 0: its sign is unambiguous
    hits = m > 0
    assert hits.tolist() == [False, False, False, True], m  # mixed, and unlike unscaled or shared-α vectors
    assert rows["caa"]["pair_accuracy"] == pytest.approx(hits.mean())
    per_user = [np.mean([h for p, h in zip(evaluated, hits) if p["user_id"] == u]) for u in ("ann", "bob")]
    assert rows["caa"]["user_accuracy"] == pytest.approx(np.mean(per_user))
    assert (rows["caa"]["user_accuracy_lo"], rows["caa"]["user_accuracy_hi"]) == pytest.approx(
        bootstrap_ci(per_user, metrics)[1:])
    assert rows["caa"]["mean_margin_gain"] == pytest.approx(m.mean(), abs=1e-4)
    # the pooled share's CI resamples users whole: recomputed by hand with the same seed
    counts = np.asarray([sum(p["user_id"] == u for p in evaluated) for u in ("ann", "bob")], dtype=float)
    rng = np.random.default_rng(metrics.seed)
    idx = rng.integers(0, 2, size=(metrics.bootstrap_resamples, 2))
    shares = (counts[idx] * np.asarray(per_user)[idx]).sum(1) / counts[idx].sum(1)
    assert (rows["caa"]["pair_accuracy_lo"], rows["caa"]["pair_accuracy_hi"]) == pytest.approx(
        tuple(np.quantile(shares, [0.025, 0.975])))
    assert (rows["caa"]["n_pairs"], rows["caa"]["n_users"], rows["caa"]["strength"]) == (4, 2, 3.0)
    # the null: per pair, a seeded random direction with the norm of the pair's scaled CAA vector
    from steerstore.jobs.evaluate.score import _random_like

    scaled = np.stack([found[p["user_id"]].vectors[1] * scales[p["user_id"]] for p in evaluated])
    null = _random_like(scaled, metrics.seed, 2)
    np.testing.assert_allclose(np.linalg.norm(null, axis=-1), np.linalg.norm(scaled, axis=-1), rtol=1e-5)
    m0 = np.asarray([_steered_margin(rt, p, {2: v}) for p, v in zip(evaluated, null)])
    assert rows["random"]["pair_accuracy"] == pytest.approx((m0 > 0).mean())
    assert rows["random"]["mean_margin_gain"] == pytest.approx(m0.mean(), abs=1e-4)


def test_eval_preference_accuracy_scores_the_population_direction_for_every_user(tiny_runtime):
    """The central comparison: one population direction at its α for every user, beside per-user CAA."""
    from steerstore.infra.reader import UserVectors
    from steerstore.jobs.evaluate.score import preference_accuracy
    from steerstore.operators.metrics import MetricsConfig

    rt = tiny_runtime
    pairs = [{"user_id": u, "prompt": p, "chosen": c, "rejected": r} for u, p, c, r in [
        ("ann", "Tell me about the weather today, please.", "Wow, I love it!", "The fox jumps."),
        ("bob", "Describe your morning.", "I woke early and read.", "Coffee!!! Then chaos, lol."),
        ("cat", "Say hello.", "Hello there, friend.", "Go away.")]]
    g = np.random.default_rng(23)  # mixed hits at α = 2, and different ones at α = 1
    population = UserVectors(user_id=None, layers=[1, 2], vectors=g.standard_normal((2, rt.hidden_size)).astype(np.float32),
                             recommended_layers=[2], recommended_scale=2.0, positions="response", model_id="tiny",
                             model_fingerprint="tiny", n_pairs=9)

    class Reader:  # a store with the population vector only (no user has CAA vectors)
        def population(self):
            return population

        def vectors(self, user_ids, method="caa", source=None):
            return {}

    table, _ = preference_accuracy(rt, Reader(), pairs, MetricsConfig(bootstrap_resamples=50), ["population", "caa"])
    assert table["method"].tolist() == ["population"]
    row = table.set_index("method").loc["population"]
    m = np.asarray([_steered_margin(rt, p, {2: population.vectors[1]}, 2.0) for p in pairs])
    assert np.abs(m).min() > 0.05, m
    assert (m > 0).tolist() == [False, False, True], m
    assert row["pair_accuracy"] == pytest.approx((m > 0).mean())
    assert (row["n_pairs"], row["n_users"], row["strength"]) == (3, 3, 2.0)


def test_eval_preference_accuracy_on_top_of_the_history_prompt_uses_the_composed_strength(tiny_runtime):
    """caa+history: each pair's prompt after its user's retrieved training items, the vector at the α the store
    chose in that condition, the margin against the unsteered model on the same history prompt."""
    from steerstore.infra.reader import UserVectors
    from steerstore.jobs.evaluate.score import preference_accuracy
    from steerstore.operators.history import HistoryContextConfig, retrieved_prompt
    from steerstore.operators.metrics import MetricsConfig

    rt = tiny_runtime
    pairs = [{"user_id": "ann", "prompt": "Tell me about the weather.", "chosen": "Wow, I love it!", "rejected": "Rain."},
             {"user_id": "ann", "prompt": "Describe your morning.", "chosen": "Amazing coffee!", "rejected": "Coffee."},
             {"user_id": "bob", "prompt": "Hi", "chosen": "Noted. Brief and formal.", "rejected": "Sure thing!"}]
    train = {"ann": [{"input": "Tell me about the sea.", "output": "Wow, the sea is amazing!"},
                     {"input": "What about mornings?", "output": "Mornings are fantastic!"}],
             "bob": [{"input": "Say hi.", "output": "Greetings. Regards."}]}
    g = np.random.default_rng(3)
    found = {u: UserVectors(user_id=u, layers=[1, 2], vectors=g.standard_normal((2, rt.hidden_size)).astype(np.float32),
                            recommended_layers=[2], recommended_scale=0.5, positions="response", model_id="tiny",
                            model_fingerprint="tiny", n_pairs=2) for u in ("ann", "bob")}

    class Reader:
        def vectors(self, user_ids, method="caa", source=None):
            return {u: found[u] for u in user_ids if u in found}

        def composed_choice(self, method, source=None):
            return None, 4.0  # the α chosen on top of history (plain: each vector's 0.5)

    ctx = HistoryContextConfig(context_items=1, selection="bm25", context_chars=100)
    table, _ = preference_accuracy(rt, Reader(), pairs, MetricsConfig(bootstrap_resamples=50),
                                   ["caa", "caa+history"], train, ctx)
    rows = {r["method"]: r for r in table.to_dict("records") if r["pairs"] == "all"}
    assert set(rows) == {"caa", "random", "caa+history", "random+history"}
    assert (rows["caa"]["strength"], rows["caa+history"]["strength"]) == (0.5, 4.0)
    shown = [dict(p, prompt=retrieved_prompt(train[p["user_id"]], p["prompt"], ctx)) for p in pairs]
    assert all("Earlier responses written by this user" in p["prompt"] for p in shown)
    m = np.asarray([_steered_margin(rt, p, {2: found[p["user_id"]].vectors[1]}, 4.0) for p in shown])
    assert rows["caa+history"]["pair_accuracy"] == pytest.approx((m > 0).mean())
    assert rows["caa+history"]["mean_margin_gain"] == pytest.approx(m.mean(), abs=1e-4)
    plain = np.asarray([_steered_margin(rt, p, {2: found[p["user_id"]].vectors[1]}, 0.5) for p in pairs])
    assert rows["caa"]["mean_margin_gain"] == pytest.approx(plain.mean(), abs=1e-4)
    # without the users' training items there is nothing to show: plain rows only
    table, _ = preference_accuracy(rt, Reader(), pairs, MetricsConfig(bootstrap_resamples=50), ["caa", "caa+history"])
    assert set(table["method"]) == {"caa", "random"}
