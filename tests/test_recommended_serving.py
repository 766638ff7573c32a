"""Serving ``recommended``: each user gets the method and strength the refresh chose for them (per condition:
the prompt alone, or on top of their history), else the population's choice, else nothing; a recommended
request decodes exactly as the explicit request it resolves to."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from steerstore.infra.reader import StoreReader, vectors_from_row
from steerstore.jobs.bench import serving as bench_serving
from steerstore.operators.serving import (
    BadRequest,
    Request,
    check_request,
    default_method,
    plan_requests,
    resolve_recommended,
    serve,
)
from steerstore.schemas.store import RECOMMENDED_SCHEMA, user_bucket

HISTORY = [{"input": "Tell me about your weekend.", "output": "Wow, I absolutely love it! Amazing!"}]
PROMPT = "Describe a park."
POPULATION = {"plain": {"method": "dps", "source": None, "multiplier": 2.0, "scale": 2.0, "gain_per_token": 0.01,
                        "key": "plain|dps||2"},
              "history": {"method": "caa", "source": None, "multiplier": 1.0, "scale": 1.5, "gain_per_token": 0.02,
                          "key": "history|caa||1"}}


def _row(user, condition, method, scale=None, layers=None, source=None, chosen_by="user", items=1):
    return {"user_id": user, "condition": condition, "method": method, "source": source, "scale": scale,
            "layers": layers, "chosen_by": chosen_by, "weight": 0.1 if chosen_by == "user" else 0.0, "items": items,
            "tokens": 12 * items, "candidates": [], "fingerprint": "sha256:x", "model_fingerprint": "sha256:x"}


def _manifest_path(uri: str) -> Path:
    reader = StoreReader(uri)
    return Path(reader.store.version_uri(reader.version)) / "manifest.json"


def recommended_store(folder: Path, runtime, population: dict | None = None) -> tuple[str, list[str]]:
    """A synthetic store on ``runtime``'s weights (12 users: CAA vectors, BT, DPS heads, SteerX descriptions; no
    style vectors) whose version holds hand-written ``recommended`` rows for its first four users and a manifest
    ``recommend`` entry with the population's choice (``population``; default POPULATION)."""
    uri = str(folder / "store")
    meta = {"layers": [1, 2], "recommended": [2], "hidden": runtime.hidden_size, "k": 2, "norm": 4.0,
            "num_layers": 4, "num_heads": 4, "group": 2, "model_id": runtime.model_id,
            "fingerprint": runtime.fingerprint, "name_or_path": "tiny-llama",
            "model_config": {"use_chat_template": True}}
    version, ids = bench_serving.synthetic_store(uri, None, 12, meta, 0, users_per_bucket=4, row_group_bytes=1024)
    u = ids
    rows = [_row(u[0], "plain", "caa", 2.5, [1]), _row(u[0], "history", "dps", 1.5),
            _row(u[1], "plain", "influence", 0.75, items=2), _row(u[1], "history", "bt", 3.0, items=2),
            _row(u[2], "plain", "population", 2.0, chosen_by="population", items=0),
            _row(u[2], "history", "none", chosen_by="population", items=0),
            # a style vector the user does not have: the population vector stands in, as for the explicit request
            _row(u[3], "plain", "style_vector", 0.5, [1], source="history")]
    reader = StoreReader(uri)
    buckets: dict[int, list[dict]] = {}
    for r in rows:
        buckets.setdefault(user_bucket(r["user_id"], int(reader.layout["buckets"])), []).append(r)
    files = [reader.store.write_bucket(version, "recommended", b, pa.Table.from_pylist(part, schema=RECOMMENDED_SCHEMA),
                                       RECOMMENDED_SCHEMA, 1024) for b, part in sorted(buckets.items())]
    path = _manifest_path(uri)
    manifest = json.loads(path.read_text())
    manifest["tables"]["recommended"].update(files=files + ["empty.parquet"], rows=len(rows))
    manifest["recommend"] = {"population": POPULATION if population is None else population, "prior_tokens": 300.0}
    path.write_text(json.dumps(manifest))
    return uri, ids


def _variant(uri: str, folder: Path, edit) -> str:
    """A copy of the store whose manifest ``edit`` changes (the copy is what a differently built version reads)."""
    copy = folder / "store"
    shutil.copytree(uri, copy)
    path = _manifest_path(str(copy))
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return str(copy)


def _old(manifest: dict) -> None:
    """A version written before recommendations: neither the table nor the manifest entry."""
    del manifest["tables"]["recommended"]
    del manifest["layout"]["tables"]["recommended"]
    manifest.pop("recommend", None)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_runtime):
    uri, ids = recommended_store(tmp_path_factory.mktemp("recommended"), tiny_runtime)
    return StoreReader(uri), ids


def test_the_reader_returns_each_users_rows_by_condition_and_the_populations_choice(store, tmp_path):
    reader, ids = store
    rows = reader.recommended(ids[0])
    assert set(rows) == {"plain", "history"} and (rows["plain"]["method"], rows["plain"]["layers"]) == ("caa", [1])
    assert reader.recommended(ids[4]) == {} and reader.recommended("nobody") == {}
    for bad in ("", None, 42, "x" * 5000):
        assert reader.recommended(bad) == {}
    assert reader.population_recommendation() == POPULATION
    art = reader.artifacts(ids[1])
    assert art.status == "found" and art.recommended["history"]["method"] == "bt"
    assert reader.artifacts(ids[5]).recommended == {} and reader.artifacts("nobody").recommended == {}
    # vectors_from_row: a stored vectors row as served
    caa = vectors_from_row(reader.store.read_table("vectors", reader.version).to_pylist()[0])
    assert caa.vectors.shape == (2, reader.artifacts(ids[0]).caa.vectors.shape[1])
    # a version that predates the table (and its manifest entry) reads as having no recommendations
    old = StoreReader(_variant(reader.store.uri, tmp_path / "old", _old))
    assert old.recommended(ids[0]) == {} and old.population_recommendation() == {}
    assert old.artifacts(ids[0]).recommended == {} and old.artifacts(ids[0]).caa is not None
    # and an unbucketed version is read by filtering the whole table
    flat = StoreReader(_variant(reader.store.uri, tmp_path / "flat", lambda m: m.update(layout={})))
    assert flat.recommended(ids[0]) == rows and flat.artifacts(ids[1]).recommended == art.recommended


def test_a_recommended_request_resolves_to_the_users_choice_for_its_condition_else_the_populations(store):
    reader, ids = store
    art = {u: reader.artifacts(u) for u in ids[:5]}
    requests = [Request(ids[0], PROMPT, "recommended"), Request(ids[0], PROMPT, "recommended", history=HISTORY),
                Request(ids[1], PROMPT, "recommended"), Request(ids[1], PROMPT, "recommended", history=HISTORY),
                Request(ids[2], PROMPT, "recommended"), Request(ids[2], PROMPT, "recommended", history=HISTORY),
                Request(ids[3], PROMPT, "recommended"),
                Request(ids[4], PROMPT, "recommended"), Request(ids[4], PROMPT, "recommended", history=HISTORY),
                Request("nobody", PROMPT, "recommended")]
    _, served = plan_requests(reader, requests)
    got = [(s.method, s.resolved, s.applied, s.scale, s.layers) for s in served]
    population = reader.population()
    assert got == [
        ("recommended", "caa", "user", 2.5, [1]),
        ("recommended", "dps", "user", 1.5, None),
        ("recommended", "influence", "user", 0.75, None),
        ("recommended", "bt", "user", 3.0, art[ids[1]].bt.recommended_layers),  # no layers stored: the vector's
        ("recommended", "population", "population", 2.0, population.recommended_layers),
        ("recommended", "none", "none", None, None),
        # the population vector stands in for the missing style vector at the population's α (γ is no α)
        ("recommended", "style_vector", "population", pytest.approx(population.recommended_scale), [1]),
        ("recommended", "dps", "user", 2.0, None),  # no row: the population's choice per condition
        ("recommended", "caa", "user", 1.5, art[ids[4]].caa.recommended_layers),
        ("recommended", "dps", "none", None, None)]  # an unknown user: the population's dps, but no heads
    notes = [s.note for s in served]
    assert notes[0] == "recommended for this user: caa α=2.5 at layers [1] (chosen on 1 held-out item)"
    assert notes[1] == "recommended for this user on top of their history: dps γ=1.5 (chosen on 1 held-out item)"
    assert notes[2] == "recommended for this user: influence λ=0.75 (chosen on 2 held-out items)"
    assert notes[4] == "the population's choice: population α=2 (no held-out items for this user)"
    assert notes[5] == "the population's choice on top of their history: none (no held-out items for this user)"
    assert notes[6].startswith("recommended for this user: style_vector (history) γ=0.5 at layers [1]")
    assert "user has no style_vector artifact" in notes[6] and "replaces γ 0.5" in notes[6]
    assert notes[7] == f"the population's choice: dps γ=2 (no choice for this user in store version {reader.version})"
    assert notes[9].startswith("the population's choice: dps γ=2") and "no artifacts for this user" in notes[9]
    # a request naming a method keeps it: resolved is the method itself
    _, (plain,) = plan_requests(reader, [Request(ids[0], PROMPT, "caa")])
    assert (plain.method, plain.resolved, plain.note) == ("caa", "caa", None)
    explicit, note = resolve_recommended(reader, requests[0], art[ids[0]])
    assert (explicit.method, explicit.scale, explicit.layers, explicit.source) == ("caa", 2.5, [1], None)


def test_without_a_choice_a_recommended_request_is_unsteered_and_old_versions_keep_working(store, tmp_path):
    reader, ids = store
    empty = StoreReader(_variant(reader.store.uri, tmp_path / "empty",
                                 lambda m: m["recommend"].update(population={})))  # the population chose nothing
    _, served = plan_requests(empty, [Request(ids[0], PROMPT, "recommended"), Request(ids[4], PROMPT, "recommended"),
                                      Request(ids[4], PROMPT, "recommended", history=HISTORY)])
    assert [(s.resolved, s.applied) for s in served] == [("caa", "user"), ("none", "none"), ("none", "none")]
    assert served[1].note == f"store version {empty.version} recommends nothing for the plain condition: unsteered"
    assert "for the history condition" in served[2].note
    assert default_method(empty) == "recommended"  # the version records recommendations, even if none chosen
    old = StoreReader(_variant(reader.store.uri, tmp_path / "old", _old))
    _, served = plan_requests(old, [Request(ids[0], PROMPT, "recommended")])
    assert (served[0].resolved, served[0].applied) == ("none", "none") and "recommends nothing" in served[0].note
    assert default_method(old) == "caa" and default_method(old, "none") == "none"  # what requests got before
    assert default_method(reader) == "recommended"


def test_scale_layers_and_source_cannot_be_given_with_recommended(store):
    reader, ids = store
    for extra, named in [(dict(scale=2.0), "scale cannot"), (dict(layers=[1]), "layers cannot"),
                         (dict(source="history"), "source cannot"),
                         (dict(scale=1.0, layers=[1]), "scale and layers cannot")]:
        with pytest.raises(BadRequest, match=named):
            check_request(Request(ids[0], PROMPT, "recommended", **extra))
        with pytest.raises(BadRequest, match=rf"request 1: {named} be given with method recommended"):
            plan_requests(reader, [Request(ids[0], PROMPT), Request(ids[0], PROMPT, "recommended", **extra)])
    with pytest.raises(BadRequest, match="unknown method 'magic'; methods: .*dps, recommended"):
        check_request(Request(ids[0], PROMPT, "magic"))


def test_a_recommended_request_decodes_exactly_as_the_explicit_request_it_resolves_to(store, tiny_runtime):
    reader, ids = store
    users = [ids[0], ids[1], ids[2], ids[3], ids[4], "nobody"]
    recommended = [Request(u, PROMPT, "recommended", history=h) for u in users for h in (None, HISTORY)]
    explicit = [resolve_recommended(reader, r, reader.artifacts(r.user_id))[0] for r in recommended]
    assert {e.method for e in explicit} == {"caa", "dps", "influence", "bt", "population", "none", "style_vector"}
    got = serve(tiny_runtime, reader, recommended, 8)
    want = serve(tiny_runtime, reader, explicit, 8)
    assert [g.text for g in got] == [w.text for w in want]
    assert [(g.applied, g.scale, g.layers, g.resolved) for g in got] == \
        [(w.applied, w.scale, w.layers, w.method) for w in want]
    # each recommended row is decoded alone as in the batch, and the steered ones differ from no steering
    alone = [serve(tiny_runtime, reader, [r], 8)[0].text for r in recommended[:4]]
    assert alone == [g.text for g in got[:4]]
    plain = serve(tiny_runtime, reader, [dataclasses.replace(r, method="none") for r in recommended[:4]], 8)
    assert all(g.text != p.text for g, p in zip(got[:4], plain))


def test_generate_and_the_endpoint_default_to_recommended_when_the_store_records_it(store, tmp_path, tiny_runtime,
                                                                                     monkeypatch, capsys):
    from steerstore.jobs import generate
    from steerstore.jobs.serve import ServeConfig, parse_request
    from tests.tiny import write_jsonl

    reader, ids = store
    monkeypatch.setattr(generate, "load_runtime_for", lambda reader, model=None: tiny_runtime)
    out = generate.main(generate.GenerateConfig(store=reader.store.uri, user=ids[0], prompt=PROMPT,
                                                max_new_tokens=4))
    assert (out["method"], out["resolved"], out["scale"], out["layers"]) == ("recommended", "caa", 2.5, [1])
    printed = capsys.readouterr().out
    assert "method recommended → caa" in printed and "alpha 2.5" in printed
    assert "recommendation: recommended for this user: caa α=2.5 at layers [1] (chosen on 1 held-out item)" in printed
    with pytest.raises(BadRequest, match="scale cannot be given with method recommended"):
        generate.main(generate.GenerateConfig(store=reader.store.uri, user=ids[0], prompt=PROMPT,
                                              method="recommended", scale=2.0))
    # a JSONL request without a method gets the default too; one naming a method keeps it
    path = write_jsonl(tmp_path / "requests.jsonl", [{"user_id": ids[1], "prompt": PROMPT},
                                                     {"user_id": ids[1], "prompt": PROMPT, "method": "none"}])
    assert [r.method for r in generate.read_requests(path, None, default_method(reader, "none"))] == \
        ["recommended", "none"]
    served = generate.main(generate.GenerateConfig(store=reader.store.uri, requests=path, max_new_tokens=4))
    assert [(s.method, s.resolved) for s in served] == [("recommended", "influence"), ("none", "none")]
    assert json.loads(capsys.readouterr().out.splitlines()[0])["resolved"] == "influence"
    # the endpoint: the store's default for a body naming no method, serve.method when set
    body = {"user": ids[0], "prompt": PROMPT}
    assert parse_request(body, False, ServeConfig(), default_method(reader))[0].method == "recommended"
    assert parse_request(body, False, ServeConfig(method="dps"), default_method(reader))[0].method == "dps"
    assert parse_request(body, False, ServeConfig())[0].method == "caa"
    with pytest.raises(Exception, match="source cannot be given with method recommended"):
        parse_request({**body, "steerstore": {"method": "recommended", "source": "blend"}}, False, ServeConfig())


# ---- the evaluation ----------------------------------------------------------------------------

def test_recommended_settings_are_planned_as_serving_resolves_them_only_when_the_store_records_them(
        tmp_path, tiny_runtime):
    """recommended (plain prompt) and recommended+history (on the history prompt, against history in prompt): each
    user's row planned as the request serving resolves ``recommended`` to, decoding exactly as serving does."""
    import math

    import pandas as pd

    from steerstore.infra.config import from_dict
    from steerstore.jobs.evaluate import EvalConfig, EvalWorker, Generator
    from steerstore.jobs.evaluate.split import Split
    from steerstore.jobs.evaluate.write import _notes
    from steerstore.operators.metrics import MetricsConfig
    from steerstore.operators.serving import decode_plan

    uri, ids = recommended_store(tmp_path / "rec", tiny_runtime)
    users = ids[:5]
    train = {u: [{"user_id": u, "item_id": f"{u}-{i}", "input": f"Tell me about thing {i}.",
                  "output": f"Wow, thing {i} is amazing!"} for i in range(3)] for u in users}
    heldout = [{"user_id": u, "item_id": f"{u}-h", "input": "Describe a park.", "target": "A green park."}
               for u in users]
    split = Split(train=train, heldout=heldout, train_pairs=[], heldout_pairs=[], notes={})
    config = from_dict(EvalConfig, {"methods": {
        "include": ["none", "history_prompt", "recommended", "recommended+history"], "max_new_tokens": 6}})
    reader = StoreReader(uri)
    gen = Generator(reader, split, config)
    rows = gen.run()
    rec = {(r["method"], r["user_id"]): r for r in rows if r["method"].startswith("recommended")}
    assert len(rec) == 2 * len(users) and not gen.missing
    assert all(not r["parameter"] and math.isnan(r["strength"]) and r["recommended"] for r in rec.values())
    plan = {k: (r["serve"], r["scale"], r["layers"], r["source"]) for k, r in rec.items()}
    population = reader.population()
    assert plan[("recommended", ids[0])] == ("caa", 2.5, [1], None)
    assert plan[("recommended+history", ids[0])] == ("dps", 1.5, None, None)
    assert plan[("recommended", ids[1])] == ("influence", 0.75, None, None)
    assert plan[("recommended+history", ids[2])] == ("none", None, None, None)
    # the style vector the user lacks: planned as the population vector serving puts in its place
    assert plan[("recommended", ids[3])] == ("population", pytest.approx(population.recommended_scale), [1], None)
    assert plan[("recommended", ids[4])] == ("dps", 2.0, None, None)  # no row: the population's choice
    history = {r["user_id"]: r["prompt"] for r in rows if r["method"] == "history_prompt"}
    assert all(r["prompt"] == history[u] for (m, u), r in rec.items() if m == "recommended+history")
    assert gen.baselines["recommended+history"] == "history_prompt"
    assert "Δ vs history in prompt" in rec[("recommended+history", ids[0])]["label"]
    assert gen.recommendations["recommended"]["caa (user)"] == 1
    assert any(n.startswith("recommended per user: each user's choice resolved to") for n in _notes(pd.DataFrame(
        {"empty_outputs": [], "users_without_delta": []}), gen))
    # decoded by the evaluation's worker exactly as serving decodes each user's recommended request
    worker = EvalWorker(config.model, MetricsConfig(), config.methods, runtime=tiny_runtime)
    worker.open(uri, reader.version, None)
    planned = list(rec.values())
    outputs, _ = worker.decode(planned)
    for r, output in zip(planned, outputs):
        items = train[r["user_id"]] if r["method"] == "recommended+history" else None
        serving_plan, _ = plan_requests(reader, [Request(r["user_id"], r["input"], "recommended", history=items)])
        served = decode_plan(tiny_runtime, [r["prompt"]], serving_plan, 6, None, serving_plan.influence(0.6, 0.1))
        assert output == served[0], (r["method"], r["user_id"])
    # a store version without recommendations plans no recommended rows, and says why
    old = StoreReader(_variant(uri, tmp_path / "old", _old))
    gen = Generator(old, split, config)
    assert not [r for r in gen.run() if r["method"].startswith("recommended")]
    assert set(gen.missing) == {"recommended", "recommended+history"}
    assert "records no recommendations" in gen.missing["recommended"][ids[0]]


def test_preference_accuracy_scores_each_pair_under_what_its_users_recommendation_serves(store, tiny_runtime):
    """The eval's ``recommended`` preference rows: each pair's margin gain under what a recommended request for it
    resolves to (the user's own choice, the population's, or nothing), against the unsteered model on the same
    prompt; composed, on top of the user's retrieved training items."""
    import numpy as np

    from steerstore.jobs.evaluate.score import preference_accuracy
    from steerstore.operators.history import HistoryContextConfig, retrieved_prompt
    from steerstore.operators.metrics import MetricsConfig
    from steerstore.operators.serving import vector_steering
    from steerstore.operators.style import style_prompt

    reader, ids = store
    rt = tiny_runtime
    pairs = [{"user_id": u, "prompt": p, "chosen": c, "rejected": r} for u, p, c, r in [
        (ids[0], "Tell me about the weather.", "Wow, I love it!", "Rain, then fog."),
        (ids[1], "Describe your morning.", "Amazing coffee, truly!", "Coffee."),
        (ids[2], "Say hello.", "Hello there, friend.", "Go away."),
        ("nobody", "Hi", "Hi! Great to see you!", "Hello.")]]
    train = {ids[1]: [{"input": "Say hi.", "output": "Greetings, wonderful friend!"}]}
    ctx = HistoryContextConfig(context_items=1, selection="bm25", context_chars=100)

    def gain(prompt, text, steer=None, context=None, lam=None):
        plain, _ = rt.response_logprobs([prompt], [text])
        if context is not None:
            steered, _ = rt.influence_logprobs([prompt], [style_prompt(context, prompt)], [text], [lam])
            return float(steered[0, 0] - plain[0])
        steered, _ = rt.response_logprobs([prompt], [text], steer)
        return float(steered[0] - plain[0])

    def margin(p, prompt=None, **how):
        prompt = prompt or p["prompt"]
        return gain(prompt, p["chosen"], **how) - gain(prompt, p["rejected"], **how)

    art = {u: reader.artifacts(u) for u in ids[:3]}
    population = art[ids[2]].population
    want = [margin(pairs[0], steer=vector_steering([(art[ids[0]].caa, 2.5, [1])])),  # the user's caa α 2.5 at [1]
            margin(pairs[1], context=art[ids[1]].steerx["context"], lam=0.75),  # influence λ 0.75
            margin(pairs[2], steer=vector_steering([(population, 2.0, list(population.recommended_layers))])),
            0.0]  # unknown user: the population's choice is DPS, which it has no heads for: unsteered
    table, _ = preference_accuracy(rt, reader, pairs, MetricsConfig(bootstrap_resamples=20),
                                   ["recommended", "recommended+history"], train, ctx)
    rows = {r["method"]: r for r in table.to_dict("records") if r["pairs"] == "all"}
    assert set(rows) == {"recommended", "recommended+history"}
    assert min(abs(w) for w in want[:3]) > 1e-3, want
    assert rows["recommended"]["mean_margin_gain"] == pytest.approx(np.mean(want), abs=1e-4)
    assert rows["recommended"]["pair_accuracy"] == pytest.approx(np.mean(np.asarray(want) > 0))
    # composed: only ids[1] brings training items (its history choice: bt α 3); the others stay in the plain
    # condition, as a request without history does
    shown = retrieved_prompt(train[ids[1]], pairs[1]["prompt"], ctx)
    composed = [want[0], margin(pairs[1], prompt=shown, steer=vector_steering(
        [(art[ids[1]].bt, 3.0, list(art[ids[1]].bt.recommended_layers))])), want[2], 0.0]
    assert rows["recommended+history"]["mean_margin_gain"] == pytest.approx(np.mean(composed), abs=1e-4)
    # a store without recommendations has no such rows
    class Bare:
        manifest: dict = {}

        def population(self):
            return None

        def vectors(self, user_ids, method="caa", source=None):
            return {}

    table, _ = preference_accuracy(rt, Bare(), pairs, MetricsConfig(bootstrap_resamples=20), ["recommended"])
    assert table.empty
