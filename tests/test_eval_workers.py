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

    workers = Workers(config)
    workers.open(uri, reader.version, None)
    try:
        done = workers.run(rows)
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
    items = pd.DataFrame(rows)
    items["output"] = [r["output"] for r in done]
    items["prompt"] = [r["prompt"] for r in done]
    ref = score_items(items, runtime, config.metrics)
    for col in ("rougeL", "meteor", "bleu", "nll"):
        np.testing.assert_allclose([r[col] for r in done], ref[col], rtol=1e-5, atol=1e-6, err_msg=col)
    # BERTScore's encoder pads each of its batches to that batch's longest text: float32 noise of ~1e-4
    np.testing.assert_allclose([r["bertscore"] for r in done], ref["bertscore"], atol=1e-3)
    assert [r["tokens"] for r in done] == ref["tokens"].tolist()

    # and as the runtime driven by hand, one method at a time (what the evaluation decoded before the actors)
    def row(method, **match):
        return next(k for k, r in enumerate(rows) if r["method"] == method and r["user_id"] == "ann"
                    and all(r[f] == v for f, v in match.items()))

    n = config.methods.max_new_tokens
    ann = reader.artifacts("ann")
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
