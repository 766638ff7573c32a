"""Per-user CAA vectors and the population direction on a tiny model."""

import numpy as np
import pyarrow as pa
import pytest

from steerstore.operators.caa import (
    CAAConfig,
    CAAVectors,
    pair_differences,
    population_mean,
    population_partials,
    shrink,
    vectors_array,
)
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.schemas.store import USER_ROW_SCHEMA
from tests.tiny import save_tiny


def user(uid, n, offset=0):
    pairs = [{"pair_id": f"{uid}-{k}", "prompt": f"Tell me about thing {k + offset}.",
              "chosen": "Wow, I absolutely love it!" * (1 + k % 2), "rejected": "Noted. Brief and formal.",
              "weight": 1.0} for k in range(n)]
    return {"user_id": uid, "status": "ok", "reason": None, "pairs": pairs, "histories": [], "n_pairs_in": n,
            "n_histories_in": 0, "dropped": [], "content_fingerprint": f"fp-{uid}", "bucket": 0}


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("tiny"))
    return CAAVectors(CAAConfig(layers=[1, 2], recommended_layers=[2], scale=3.0),
                      ModelConfig(name_or_path=str(folder)))


def test_a_user_vector_is_the_mean_pair_difference_of_that_user(operator):
    users = [user("a", 3), user("b", 2, offset=10)]
    out = operator(pa.Table.from_pylist(users, schema=USER_ROW_SCHEMA)).to_pylist()
    assert [r["user_id"] for r in out] == ["a", "b"]
    for row, u in zip(out, users):
        expected = pair_differences(operator.runtime, u["pairs"], [1, 2], "mean").mean(axis=0)
        np.testing.assert_allclose(np.asarray(row["vectors"]), expected, rtol=1e-4, atol=1e-5)
        assert row["layers"] == [1, 2] and row["recommended_layers"] == [2] and row["recommended_scale"] == 3.0
        assert row["n_pairs"] == len(u["pairs"]) and row["status"] == "ok"
        assert row["model_fingerprint"] == operator.runtime.fingerprint


def test_pair_differences_use_a_plain_per_pair_reference(operator):
    rt: ModelRuntime = operator.runtime
    u = user("a", 3)
    diffs = pair_differences(rt, u["pairs"], [1], "last")
    for k, p in enumerate(u["pairs"]):
        c = rt.activations([p["prompt"]], [p["chosen"]], [1], "last")[0]
        r = rt.activations([p["prompt"]], [p["rejected"]], [1], "last")[0]
        np.testing.assert_allclose(diffs[k], (c - r).numpy(), rtol=1e-4, atol=1e-5)


def test_a_failing_user_is_quarantined_without_sinking_the_batch(operator):
    bad = user("bad", 2)
    bad["pairs"][0]["chosen"] = ""  # no response tokens: activation capture refuses it
    out = operator(pa.Table.from_pylist([user("a", 2), bad, user("c", 2)], schema=USER_ROW_SCHEMA)).to_pylist()
    assert [(r["user_id"], r["status"]) for r in out] == [("a", "ok"), ("bad", "quarantined"), ("c", "ok")]
    assert "empty response" in out[1]["reason"]


def test_the_population_reduce_over_batches_equals_the_weighted_mean_over_all_pairs(operator):
    users = [user("a", 3), user("b", 1, offset=5), user("c", 4, offset=9)]
    weights = {"a": [1.0, 3.0, 0.5], "b": [7.0], "c": [2.0, 0.0, 1.0, 1.0]}
    for u in users:
        for p, w in zip(u["pairs"], weights[u["user_id"]]):
            p["weight"] = w
    out = operator(pa.Table.from_pylist(users, schema=USER_ROW_SCHEMA))
    partials = pa.concat_tables([population_partials(out.slice(0, 1)), population_partials(out.slice(1, 2))])
    mean, n = population_mean(partials)
    # each user's weighted mean difference, the user counting as many pairs as it has (weights only rank a
    # user's own pairs): Σ_u n_u · (Σ_i w_ui d_ui / Σ_i w_ui) / Σ_u n_u
    own = {}
    for u in users:
        d = pair_differences(operator.runtime, u["pairs"], [1, 2], "mean").astype(np.float64)
        w = np.asarray(weights[u["user_id"]])
        own[u["user_id"]] = sum(wi * di for wi, di in zip(w, d)) / w.sum()
    expected = (3 * own["a"] + 1 * own["b"] + 4 * own["c"]) / 8
    assert n == 8
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-5)
    assert float(pa.compute.sum(partials.column("weight")).as_py()) == pytest.approx(8.0)
    # the weights matter: the plain mean over all pairs is another direction
    plain = pair_differences(operator.runtime, [p for u in users for p in u["pairs"]], [1, 2], "mean").mean(axis=0)
    assert np.abs(plain - expected).max() > 1e-3
    assert vectors_array(out).shape == (3, 2, operator.runtime.hidden_size)


def test_default_layers_are_a_band_in_the_middle_of_the_model():
    layers, recommended = CAAConfig().resolve_layers(30)
    assert layers == list(range(9, 17)) and recommended == [12]
    with pytest.raises(ValueError, match="do not exist"):
        CAAConfig(layers=[40]).resolve_layers(30)


def test_pair_weights_make_a_weighted_mean_and_shrinkage_pulls_toward_the_population(operator):
    u = user("w", 3)
    for p, w in zip(u["pairs"], [1.0, 3.0, 0.0]):
        p["weight"] = w
    row = operator(pa.Table.from_pylist([u], schema=USER_ROW_SCHEMA)).to_pylist()[0]
    d = pair_differences(operator.runtime, u["pairs"], [1, 2], "mean")
    np.testing.assert_allclose(np.asarray(row["vectors"]), (d[0] + 3 * d[1]) / 4, rtol=1e-4, atol=1e-5)
    assert row["weight_sum"] == pytest.approx(3.0)  # the weights scaled to mean 1: the user counts as 3 pairs
    population = np.ones_like(d[0])
    mean = np.asarray(row["vectors"])
    np.testing.assert_allclose(shrink(mean, 3.0, population, 0.0), mean, rtol=1e-6)
    np.testing.assert_allclose(shrink(mean, 4.0, population, 4.0), (mean + population) / 2, rtol=1e-5)
    assert np.abs(shrink(mean, 4.0, population, 1e9) - population).max() < 1e-3


def test_the_alpha_choice_scores_each_pair_with_its_users_vector_and_theta_fitted_without_it():
    """Out-of-sample α: a sampled pair is steered by the user's vector (and BT θ) fitted on the other pairs."""
    from types import SimpleNamespace

    from steerstore.jobs.refresh.workers import ModelWorker
    from steerstore.operators.bt import BTConfig
    from steerstore.operators.caa import CAAConfig
    from steerstore.operators.bt import features, fit_bt
    from steerstore.operators.caa import shrink

    g = np.random.default_rng(0)
    worker = object.__new__(ModelWorker)  # the statistics only: no model is loaded
    worker.config = SimpleNamespace(caa=CAAConfig(), bt=BTConfig())
    d = g.standard_normal((3, 2, 8))  # 3 pairs, 2 layers, hidden 8
    w = np.asarray([1.0, 2.0, 0.5])
    worker._sample = {"ann": (d, w, {}), "solo": (d[:1], w[:1], {})}
    population = g.standard_normal((2, 8)).astype(np.float32)
    basis = np.linalg.qr(g.standard_normal((8, 2)))[0].T[None].repeat(2, 0)  # (layers, k, hidden)
    norms, theta_pop = np.ones(2), np.asarray([0.1, -0.2])
    out = worker.sample_finals(["ann", "solo"], population, theta_pop, basis, norms, {"ann": [1], "solo": [0]})
    kappa, bt = worker.config.caa.shrinkage, worker.config.bt
    keep = [0, 2]
    rest = w[keep] * 2 / w[keep].sum()  # the remaining pairs' weights, mean 1 again (as pair_weights scales them)
    mean = np.einsum("n,nlh->lh", rest, d[keep]) / rest.sum()
    np.testing.assert_allclose(out["ann"]["loo"][1]["vectors"], shrink(mean, 2.0, population, kappa), rtol=1e-5)
    theta = fit_bt(features(d[keep], basis, norms), rest, theta_pop, bt.prior, bt.newton_steps).theta
    np.testing.assert_allclose(out["ann"]["loo"][1]["theta"], theta, rtol=1e-5)
    full = np.einsum("n,nlh->lh", w, d) / w.sum()
    np.testing.assert_allclose(out["ann"]["vectors"], shrink(full, w.sum(), population, kappa), rtol=1e-5)
    assert not np.allclose(out["ann"]["loo"][1]["vectors"], out["ann"]["vectors"])
    # the left-out pair's weight and difference, to take it out of the population direction
    assert out["ann"]["pair"][1]["weight"] == pytest.approx(2.0)
    np.testing.assert_allclose(out["ann"]["pair"][1]["difference"], d[1], rtol=1e-6)
    # a user whose only pair is left out falls back to the priors: the population direction and θ_pop
    np.testing.assert_allclose(out["solo"]["loo"][0]["vectors"], population, rtol=1e-6)
    np.testing.assert_allclose(out["solo"]["loo"][0]["theta"], theta_pop, rtol=1e-6)


def test_the_population_direction_without_a_pair_is_the_weighted_mean_of_the_other_pairs():
    from steerstore.jobs.refresh.globals import population_without

    g = np.random.default_rng(1)
    d = g.standard_normal((5, 2, 4))  # 5 pairs of the sample, 2 layers, hidden 4
    w = np.asarray([1.0, 0.5, 2.0, 1.5, 1.0])
    population = (np.einsum("n,nlh->lh", w, d) / w.sum()).astype(np.float32)
    without = population_without(population, float(w.sum()), {"weight": 2.0, "difference": d[2]})
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(without, np.einsum("n,nlh->lh", w[keep], d[keep]) / w[keep].sum(), rtol=1e-5, atol=1e-6)
    # the only pair of the sample left out: nothing remains, the direction stays
    np.testing.assert_allclose(population_without(population, 2.0, {"weight": 2.0, "difference": d[2]}), population)


def test_a_margin_gradient_direction_is_served_from_the_response_on():
    with pytest.raises(ValueError, match="caa.apply_positions=response"):
        CAAConfig(direction="margin_gradient", apply_positions="all")
    CAAConfig(direction="margin_gradient")
