"""The evaluation's generation and scoring on Ray actors: every method of a chunk in one mixed batch,
equal to decoding each planned row alone in this process and to the runtime driven by hand."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from steerstore.infra.config import from_dict
from steerstore.infra.reader import StoreReader
from steerstore.jobs.evaluate import EvalConfig, EvalWorker, Generator, Workers
from steerstore.jobs.evaluate.score import score_items
from steerstore.jobs.evaluate.split import Split
from steerstore.jobs.evaluate.workers import PLAN_FIELDS
from steerstore.operators.runtime import HeadContrast, Influence, ModelConfig, ModelRuntime, Steering

STYLES = {"ann": "Wow, I absolutely love it! Amazing!", "ben": "Noted. Brief and formal.",
          "cat": "Wow, fantastic and wonderful!", "dan": "The quick brown fox."}


def _split() -> Split:
    # the served store's users with its training items; one held-out item each
    train = {u: [{"user_id": u, "item_id": f"{u}{i}", "input": f"Tell me about thing {i}.", "output": f"{t} {i}"}
                 for i in range(3)] for u, t in STYLES.items()}
    heldout = [{"user_id": u, "item_id": f"{u}h", "input": "Tell me about the sea.", "target": f"{t} sea"}
               for u, t in STYLES.items()]
    return Split(train=train, heldout=heldout, train_pairs=[], heldout_pairs=[], notes={})


def _config(folder: str, **extra) -> EvalConfig:
    return from_dict(EvalConfig, {
        "model": {"name_or_path": folder}, "ray": {"progress_bars": False},
        "methods": {"max_new_tokens": 6, "alpha_grid": [2.0], "gamma_grid": [1.0], "lambda_grid": [0.0],
                    "dps_gamma_grid": [2.0]},
        "resources": {"cpus_per_actor": 1}, **extra})


@pytest.mark.slow
def test_actors_decode_mixed_chunks_exactly_as_each_row_alone_and_as_the_runtime_by_hand(served_store):
    uri, folder = served_store
    reader = StoreReader(uri)
    config = _config(folder, actors=2, batch_rows=5)
    gen = Generator(reader, _split(), config)
    rows = gen.run()
    # a τ-sweep row: a side store's description for ann, decoded at the recommended λ
    gen.influence_at_tau({"ann": {"context": "Write tersely, like a telegram.",
                                  "style_template": reader.artifacts("ann").steerx["style_template"]}}, 2.0)
    methods = {r["method"] for r in rows}
    assert {"none", "history_prompt", "caa", "bt", "population", "style_vector:history", "influence",
            "dps"} <= methods, methods
    # every steering method again on top of the history prompt, at the strength chosen in that condition
    history = {r["user_id"]: r["prompt"] for r in rows if r["method"] == "history_prompt"}
    for method in ("population", "caa", "bt", "style_vector:history", "influence"):
        composed = [r for r in rows if r["method"] == method + "+history"]
        assert {r["user_id"] for r in composed} == {r["user_id"] for r in rows if r["method"] == method}, method
        assert all(r["prompt"] == history[r["user_id"]] for r in composed), method
        recommended = {r["strength"] for r in composed if r["recommended"]}
        serve, _, source = method.partition(":")
        layers, strength = reader.composed_choice(serve, source or None)
        assert strength is not None and recommended == {strength}, (method, recommended, strength)
        assert all(r["layers"] == (layers or reader.vectors([r["user_id"]])[r["user_id"]].recommended_layers)
                   for r in composed if serve in ("caa", "style_vector")), method
    assert gen.baselines["caa+history"] == "history_prompt" and "Δ vs history in prompt" in next(
        r["label"] for r in rows if r["method"] == "caa+history")

    workers = Workers(config)
    workers.open(uri, reader.version, None)
    try:
        done = workers.run(rows)
        drift = workers.drift(pd.DataFrame(done))  # once every row is back: BERTScore against unsteered answers
    finally:
        workers.close()
    assert len(done) == len(rows)
    assert all(not set(PLAN_FIELDS) & set(r) for r in done)

    # the reference: the same worker code in this process, each planned row decoded alone
    runtime = ModelRuntime(ModelConfig(name_or_path=folder))
    local = EvalWorker(config.model, config.metrics, config.methods, runtime)
    local.open(uri, reader.version, None)
    alone = [local.decode([r]) for r in rows]
    assert [r["output"] for r in done] == [out[0] for out, _ in alone]
    assert [r["prompt"] for r in done] == [shown[0] for _, shown in alone]
    for r, planned in zip(done, rows):  # each row comes back as planned (order and settings kept)
        assert (r["method"], r["user_id"], r["item_id"]) == (planned["method"], planned["user_id"],
                                                             planned["item_id"])
        assert r["strength"] == planned["strength"] or (math.isnan(r["strength"]) and math.isnan(planned["strength"]))
    # scores: as scoring all outputs at once in this process
    items = pd.DataFrame(rows)  # fluency is scored given the planned prompt (influence: its plain side)
    items["output"] = [r["output"] for r in done]
    ref = score_items(items, runtime, config.metrics)
    for col in ("rougeL", "meteor", "bleu", "nll", "nll_plain"):
        np.testing.assert_allclose([r[col] for r in done], ref[col], rtol=1e-5, atol=1e-6, err_msg=col)
    # BERTScore's encoder pads each of its batches to that batch's longest text, and its batches differ here
    # (chunks of 5 rows against all rows at once): up to ~4e-3 on these short outputs
    np.testing.assert_allclose([r["bertscore"] for r in done], ref["bertscore"], atol=5e-3)
    assert [r["tokens"] for r in done] == ref["tokens"].tolist()
    # drift: 1 − BERTScore against the unsteered answer to the same prompt (none, or history in prompt)
    from steerstore.operators.metrics import text_metrics

    by = {(r["method"], r["user_id"], r["recommended"]): dict(r, drift=d) for r, d in zip(done, drift)}
    for method, base in (("caa", "none"), ("caa+history", "history_prompt"), ("influence+history", "history_prompt"),
                         ("history_prompt", "none")):  # history in prompt itself: what showing the history moves
        r, b = by[(method, "ann", True)], by[(base, "ann", True)]
        f1 = text_metrics([r["output"]], [b["output"]], config.metrics, which=("bertscore",))["bertscore"][0]
        assert r["drift"] == pytest.approx(1 - f1, abs=5e-3), method
    assert abs(by[("none", "ann", True)]["drift"]) < 5e-3
    assert np.isfinite(drift).all()  # every item's unsteered answers were decoded (rows in any chunk)

    # and as the runtime driven by hand, one method at a time (what the evaluation decoded before the actors)
    def row(method, **match):
        return next(k for k, r in enumerate(rows) if r["method"] == method and r["user_id"] == "ann"
                    and all(r[f] == v for f, v in match.items()))

    n = config.methods.max_new_tokens
    ann = reader.artifacts("ann")
    k = row("caa+history", recommended=True)  # CAA on top of the history prompt, at the composed α
    steer = Steering({l: torch.from_numpy(v)[None] for l, v in ann.caa.at(ann.caa.recommended_layers).items()},
                     [rows[k]["strength"]], ann.caa.positions)
    assert done[k]["output"] == runtime.generate([rows[k]["prompt"]], n, steer=steer)[0]
    k = row("caa", strength=2.0)
    steer = Steering({l: torch.from_numpy(v)[None] for l, v in ann.caa.at(ann.caa.recommended_layers).items()},
                     [2.0], ann.caa.positions)
    assert done[k]["output"] == runtime.generate([rows[k]["input"]], n, steer=steer)[0]
    k = row("dps", strength=2.0)
    assert "Tell me about thing" in rows[k]["prompt"]  # decoded on the history-in-prompt prompt
    contrast = HeadContrast([ann.dps.heads], gamma=2.0, adaptive=ann.dps.adaptive, plausibility=ann.dps.plausibility)
    assert done[k]["output"] == runtime.generate([rows[k]["prompt"]], n, contrast=contrast)[0]
    m = config.methods
    for k, context in ((row("influence", parameter="lambda"), ann.steerx["context"]),
                       (row("influence", parameter="tau"), "Write tersely, like a telegram.")):
        influence = Influence([context], lam=rows[k]["scale"], temperature=m.influence_temperature,
                              template=ann.steerx["style_template"], plausibility=m.influence_plausibility)
        assert done[k]["output"] == runtime.generate([rows[k]["input"]], n, influence=influence)[0]
        assert done[k]["prompt"] == influence.with_context([rows[k]["input"]])[0]


def test_rows_are_sent_in_chunks_holding_every_setting_of_a_few_items_and_come_back_in_order():
    config = from_dict(EvalConfig, {"actors": 0, "batch_rows": 4})
    sent = []

    class Local:
        def run(self, chunk):
            sent.append(chunk)
            return [dict(r, output=r["prompt"].upper()) for r in chunk]

    workers = Workers.__new__(Workers)
    workers.config, workers.local, workers.handles = config, Local(), []
    rows = [{"method": m, "user_id": u, "item_id": i, "prompt": f"{m}-{u}-{i}", "serve": "none", "scale": None,
             "source": None, "context": None, "template": None}
            for m in ("none", "caa", "dps") for u in ("b", "a") for i in ("2", "1")]
    done = workers.run(rows)
    assert [r["output"] for r in done] == [r["prompt"].upper() for r in rows]  # the planned order
    assert all(len(c) <= 4 for c in sent) and sum(map(len, sent)) == len(rows)
    # a chunk holds all settings of one item before the next: every method decoded together
    assert [{r["method"] for r in c} for c in sent] == [{"none", "caa", "dps"}] * 4
    assert [(c[0]["user_id"], c[0]["item_id"]) for c in sent] == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
