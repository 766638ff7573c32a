"""bench directions: per-user steering directions scored on held-out own-vs-other pairs (tiny model)."""

import json

import numpy as np
import pytest
import torch

from steerstore.operators.runtime import Steering

TEXTS = {"ann": ["Wow, I love it so much!", "Amazing, fantastic day!", "I adore this, wow!"],
         "ben": ["Noted. The answer is brief.", "Acknowledged. Proceed.", "The report is filed."]}


def _pairs(user, other, tag=None):
    out = [{"user_id": user, "pair_id": f"{user}{k}", "prompt": f"Tell me about thing {k}.", "chosen": text,
            "rejected": TEXTS[other][k], "weight": 1.0} for k, text in enumerate(TEXTS[user])]
    return [dict(p, rejected_kind=tag) for p in out] if tag else out


def test_the_directions_are_the_documented_estimators_and_the_shares_count_raised_margins(tiny_model_folder,
                                                                                           tmp_path):
    from steerstore.jobs.bench.directions import BenchDirectionsConfig, directions, main
    from steerstore.operators.caa import margin_gradients, pair_differences
    from steerstore.operators.runtime import ModelConfig, ModelRuntime

    rt = ModelRuntime(ModelConfig(name_or_path=str(tiny_model_folder)))
    train = {"ann": _pairs("ann", "ben")[:2], "ben": _pairs("ben", "ann")[:2]}
    found = directions(rt, train, 1, kappa=2.0, seed=0)
    d = {u: pair_differences(rt, train[u], [1], "mean")[:, 0] for u in train}
    g = {u: margin_gradients(rt, train[u], [1])[:, 0] for u in train}
    pop_d = np.concatenate(list(d.values())).mean(0)
    caa = (d["ann"].sum(0) + 2.0 * pop_d) / (2 + 2.0)  # κ = 2 pseudo-pairs of the population
    np.testing.assert_allclose(found["caa"]["ann"], caa, rtol=1e-4, atol=1e-5)
    grad = g["ann"].sum(0)
    np.testing.assert_allclose(found["margin_gradient_sum"]["ann"], grad / np.linalg.norm(grad) * np.linalg.norm(caa),
                               rtol=1e-4, atol=1e-5)
    # the refresh's vector under caa.direction=margin_gradient: per pair the gradient at the activation difference's
    # norm, the user's mean shrunk toward the population's (here compared in direction: every estimator is rescaled)
    e = {u: pair_differences(rt, train[u], [1], "mean", "margin_gradient")[:, 0] for u in train}
    for u in train:
        np.testing.assert_allclose(np.linalg.norm(e[u], axis=-1), np.linalg.norm(d[u], axis=-1), rtol=1e-4)
        cos = e[u] @ g[u].T / np.outer(np.linalg.norm(e[u], axis=-1), np.linalg.norm(g[u], axis=-1))
        np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-5)
    pop_e = np.concatenate(list(e.values())).mean(0)
    want = (e["ann"].sum(0) + 2.0 * pop_e) / 4.0
    got = found["caa_margin_gradient"]["ann"]
    np.testing.assert_allclose(got / np.linalg.norm(got), want / np.linalg.norm(want), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(found["population_gradient"]["ben"] / np.linalg.norm(found["population_gradient"]["ben"]),
                               pop_e / np.linalg.norm(pop_e), rtol=1e-4, atol=1e-5)
    # the gradient is the derivative of the training margin: a small step along it raises the summed margins
    eps = 1e-2
    prompts = [p["prompt"] for p in train["ann"]]

    def margin(v):
        steer = Steering({1: torch.as_tensor(np.stack([v] * 2))}, torch.ones(2), "response")
        c, nc = rt.response_logprobs(prompts, [p["chosen"] for p in train["ann"]], steer)
        r, nr = rt.response_logprobs(prompts, [p["rejected"] for p in train["ann"]], steer)
        return float((c / nc - r / nr).sum())
    unit = grad / np.linalg.norm(grad)
    assert (margin(eps * unit) - margin(-eps * unit)) / (2 * eps) == pytest.approx(float(np.linalg.norm(grad)),
                                                                                   rel=2e-2)
    # the bench end to end: every estimator scored on the held-out pairs of both kinds, with CIs over users
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "train_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for u in train for p in train[u]))
    held = [_pairs("ann", "ben", "other_user")[2], _pairs("ben", "ann", "other_user")[2]]
    held += [dict(p, pair_id=p["pair_id"] + "n", rejected="I do not know.", rejected_kind="neutral") for p in held]
    (folder / "heldout_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in held))
    out = main(BenchDirectionsConfig(inputs=str(folder), layer=1, json=str(tmp_path / "fig.json"),
                                     model=ModelConfig(name_or_path=str(tiny_model_folder))))
    assert json.loads((tmp_path / "fig.json").read_text())["results"] == out["results"]
    assert set(out["results"]) == {"caa", "caa_margin_gradient", "margin_gradient_sum", "population_gradient", "random"}
    # each share is the hand-counted share of pairs whose steered margin rose
    prompts = [p["prompt"] for p in held]
    vecs = np.stack([found["caa_margin_gradient"][p["user_id"]] for p in held])
    base_c, _ = rt.response_logprobs(prompts, [p["chosen"] for p in held])
    base_r, _ = rt.response_logprobs(prompts, [p["rejected"] for p in held])
    steer = Steering({1: torch.as_tensor(vecs)}, torch.full((4,), 0.5), "response")
    c, _ = rt.response_logprobs(prompts, [p["chosen"] for p in held], steer)
    r, _ = rt.response_logprobs(prompts, [p["rejected"] for p in held], steer)
    raised = ((c - base_c) - (r - base_r)).numpy() > 0
    row = out["results"]["caa_margin_gradient"]
    assert row["all"]["share"] == pytest.approx(raised.mean(), abs=1e-4) and row["all"]["pairs"] == 4
    assert row["neutral"]["share"] == pytest.approx(raised[2:].mean(), abs=1e-4) and row["neutral"]["users"] == 2
    assert row["all"]["ci"][0] <= row["all"]["share"] <= row["all"]["ci"][1]
