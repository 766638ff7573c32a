"""Serving: point lookups in the bucketed store, and one mixed batch of users and methods."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from steerstore.infra.reader import FingerprintMismatch, StoreReader
from steerstore.operators.runtime import HeadContrast, Influence, ModelConfig, ModelRuntime, Sampling, Steering
from steerstore.operators.serving import BadRequest, Request, personalised_generate, plan_requests, serve
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Tell me about thing 1.", "What do you think of cats?", "Write a note.", "Hi there",
           "Describe the sea in a sentence.", "Say something nice."]


@pytest.fixture(scope="module")
def served(served_store):
    uri, folder = served_store
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return StoreReader(uri), model, tokenizer


# ---- lookups ------------------------------------------------------------------------------

def test_the_per_user_tables_are_one_sorted_file_per_bucket_with_small_row_groups(served):
    reader, _, _ = served
    layout = reader.manifest["layout"]
    assert layout["kind"] == "user-buckets" and layout["buckets"] == 2  # 4 users, 2 per bucket
    assert set(layout["tables"]) >= {"vectors", "users", "bt_coords", "dps_heads", "steerx_users"}
    files = reader.manifest["tables"]["vectors"]["files"]
    assert "population.parquet" in files and all(f.startswith("bucket-") for f in files if f != "population.parquet")
    for f in files:
        if f.startswith("bucket-"):
            path = reader.store.table_uri(reader.version, "vectors") + "/" + f
            assert pq.ParquetFile(path).metadata.num_row_groups > 1
            table = pq.read_table(path)
            keys = list(zip(table["user_id"].to_pylist(), table["method"].to_pylist(), table["source"].to_pylist()))
            assert keys == sorted(keys)


def test_a_lookup_returns_the_same_artifacts_as_a_full_table_scan(served):
    reader, _, _ = served
    import pyarrow.compute as pc

    full = reader.store.read_table("vectors", reader.version, filter=pc.field("scope") == "user").to_pylist()
    for row in full:
        got = reader.vectors([row["user_id"]], row["method"], row["source"])[row["user_id"]]
        np.testing.assert_array_equal(got.vectors, np.asarray(row["vectors"], dtype=np.float32))
        assert got.layers == row["layers"] and got.recommended_scale == pytest.approx(row["recommended_scale"])
    population = reader.population()
    assert population is not None and population.user_id is None


def test_lookups_of_present_absent_and_malformed_ids_never_raise(served):
    reader, _, _ = served
    found = reader.artifacts("ann")
    assert found.status == "found" and found.caa is not None and found.bt is not None and found.dps is not None
    assert found.steerx is not None and found.style_vectors
    absent = reader.artifacts("nobody-like-this")
    assert absent.status == "unknown" and "no artifacts" in absent.reason and absent.population is not None
    for bad, why in [("", "empty"), ("   ", "empty"), (None, "string"), (42, "string"), ("\ud800", "surrogate"),
                     ("x" * 5000, "at most")]:
        art = reader.artifacts(bad)
        assert art.status == "invalid" and why in art.reason, (bad, art.reason)
        assert art.caa is None and art.population is not None
    assert reader.vectors(["ann", "", None, 7, "nobody"]).keys() == {"ann"}
    assert reader.users(["ann", "", "nobody"]).num_rows == 1


def test_repeated_lookups_are_served_from_the_cache(served, monkeypatch):
    reader, _, _ = served
    fresh = StoreReader(reader.store.uri, cache_users=8)
    fresh.vectors(["ben"])
    reads = []
    monkeypatch.setattr("steerstore.infra.reader._BucketFile.groups", lambda self, ids: reads.append(ids) or [])
    assert "ben" in fresh.vectors(["ben"])  # cached: no row group consulted
    assert reads == []
    fresh.vectors(["cat"])
    assert reads == [["cat"]]


def test_an_unbucketed_store_version_is_read_by_filtering_whole_tables(served, tmp_path):
    import shutil

    reader, _, _ = served
    copy = tmp_path / "store"
    shutil.copytree(reader.store.uri, copy)
    import json

    path = copy / "versions" / reader.version / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["layout"] = {}
    path.write_text(json.dumps(manifest))
    old = StoreReader(str(copy))
    for uid in ("ann", "dan"):
        np.testing.assert_array_equal(old.vectors([uid])[uid].vectors, reader.vectors([uid])[uid].vectors)
        assert old.dps([uid])[uid].heads == reader.dps([uid])[uid].heads
    assert old.artifacts("nobody").status == "unknown"
    # a version from before BT, DPS and SteerX: its manifest lists none of their tables
    for table in ("bt_coords", "bt_basis", "dps_heads", "dps_clusters", "dps_population", "steerx_users",
                  "steerx_token_effects"):
        del manifest["tables"][table]
    path.write_text(json.dumps(manifest))
    older = StoreReader(str(copy))
    art = older.artifacts("ann")
    assert art.status == "found" and art.caa is not None and art.bt is None and art.dps is None and art.steerx is None
    assert older.dps(["ann"]) == {} and older.steerx(["ann"]) == {} and older.bt(["ann"]) == {}


def test_bucket_files_beyond_open_files_are_closed_and_lookups_stay_right(served):
    reader, _, _ = served
    small = StoreReader(reader.store.uri, cache_users=0, open_files=1)
    for uid in ["ann", "ben", "cat", "dan", "ann", "dan"]:
        np.testing.assert_array_equal(small.vectors([uid])[uid].vectors, reader.vectors([uid])[uid].vectors)
        assert len(small._files) == 1


def test_large_vectors_get_more_buckets_than_the_user_count_alone():
    from steerstore.schemas.store import bucket_count

    assert bucket_count(100_000, 4096) == 25
    assert bucket_count(100_000, 4096, data_bytes=100_000 * 4 * 9 * 4096 * 4, bucket_bytes=64 << 20) == 879
    assert bucket_count(0, 4096, 0, 64 << 20) == 1


# ---- the mixed batch ----------------------------------------------------------------------

def test_a_batch_mixing_all_and_response_positions_decodes_each_row_as_its_own_steering_alone(tiny_runtime):
    """Per-row vectors, scales and positions in one runtime batch equal each row's own one-row Steering."""
    rt = tiny_runtime
    g = torch.Generator().manual_seed(7)
    prompts = ["Tell me about the weather today, please.", "Hi", "Summarise the plot of a novel in one sentence.",
               "Noted."]
    # per row: its layers' vectors, its scale, its positions; the last row is unsteered
    rows = [({1: torch.randn(rt.hidden_size, generator=g), 2: torch.randn(rt.hidden_size, generator=g)}, 4.0, "all"),
            ({1: torch.randn(rt.hidden_size, generator=g)}, -3.0, "response"),
            ({2: torch.randn(rt.hidden_size, generator=g)}, 6.0, "all"),
            ({}, 0.0, "response")]
    batch = Steering({l: torch.stack([vecs.get(l, torch.zeros(rt.hidden_size)) for vecs, _, _ in rows])
                      for l in (1, 2)}, torch.tensor([s for _, s, _ in rows]), [p for _, _, p in rows])
    got = rt.generate(prompts, 10, steer=batch)

    def alone(prompt, vecs, scale, positions):
        return rt.generate([prompt], 10, steer=Steering({l: v[None] for l, v in vecs.items()}, [scale],
                                                        positions) if vecs else None)[0]

    expected = [alone(p, *row) for p, row in zip(prompts, rows)]
    assert got == expected
    # every steered row is changed by its steering, and by where it applies: a batch that steered
    # a row from the wrong positions (or not at all) could not match
    for p, (vecs, scale, positions), own in zip(prompts[:3], rows[:3], expected):
        assert own != alone(p, {}, 0.0, positions), p
        assert own != alone(p, vecs, scale, "response" if positions == "all" else "all"), p


def mixed_requests():
    methods = ["none", "caa", "bt", "population", "style_vector", "influence", "dps"]
    users = ["ann", "ben", "cat", "dan", "nobody"]
    return [Request(users[k % len(users)], PROMPTS[k % len(PROMPTS)], methods[k % len(methods)])
            for k in range(14)]


def test_one_mixed_batch_equals_serving_each_request_alone(served):
    reader, model, tokenizer = served
    requests = mixed_requests()
    batch = personalised_generate(model, tokenizer, requests, reader, max_new_tokens=8)
    alone = [personalised_generate(model, tokenizer, [r], reader, max_new_tokens=8)[0] for r in requests]
    assert [b.text for b in batch] == [a.text for a in alone]
    assert [(b.applied, b.scale) for b in batch] == [(a.applied, a.scale) for a in alone]
    # every method ran on some user's own artifact in the batch
    assert {b.method for b in batch if b.applied == "user"} == {"caa", "bt", "style_vector", "influence", "dps"}
    # an unknown user falls back to the population vector, or to plain decoding for dps / influence
    nobody = {b.method: b for b in batch if b.user_id == "nobody"}
    assert all(b.applied in ("population", "none") for b in nobody.values())
    assert any(b.note for b in nobody.values())


def test_steered_rows_differ_from_unsteered_ones_and_sampling_is_reproducible(served):
    reader, model, tokenizer = served
    plain = personalised_generate(model, tokenizer, [Request("ann", PROMPTS[0])], reader, max_new_tokens=8)[0]
    strong = personalised_generate(model, tokenizer, [Request("ann", PROMPTS[0], "caa", scale=64.0)], reader,
                                   max_new_tokens=8)[0]
    assert strong.text != plain.text and strong.scale == 64.0
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=3)
    first = personalised_generate(model, tokenizer, mixed_requests(), reader, max_new_tokens=6, sampling=sampling)
    again = personalised_generate(model, tokenizer, mixed_requests(), reader, max_new_tokens=6, sampling=sampling)
    assert [a.text for a in first] == [b.text for b in again]


def test_the_mixed_batch_plan_matches_the_single_mode_runtime_calls(served):
    """Each mode of the mixed batch decodes exactly as the one-mode runtime call does."""
    reader, model, tokenizer = served
    runtime = ModelRuntime(ModelConfig(name_or_path="tiny"), model=model, tokenizer=tokenizer)
    ann = reader.artifacts("ann")
    caa = ann.caa
    steer = Steering({l: torch.from_numpy(v)[None] for l, v in caa.at(caa.recommended_layers).items()},
                     [caa.recommended_scale], caa.positions)
    alone_caa = runtime.generate([PROMPTS[1]], 8, steer=steer)
    alone_dps = runtime.generate([PROMPTS[2]], 8, contrast=HeadContrast([ann.dps.heads], gamma=ann.dps.gamma,
                                                                        adaptive=ann.dps.adaptive,
                                                                        plausibility=ann.dps.plausibility))
    lam = reader.influence_lambda()  # the store's choice on validation items; serving's default without one
    alone_inf = runtime.generate([PROMPTS[3]], 8, influence=Influence([ann.steerx["context"]],
                                                                      lam=1.0 if lam is None else lam,
                                                                      temperature=0.6,
                                                                      template=ann.steerx["style_template"],
                                                                      plausibility=0.1))
    out = serve(runtime, reader, [Request("ann", PROMPTS[1], "caa"), Request("ann", PROMPTS[2], "dps"),
                                  Request("ann", PROMPTS[3], "influence"), Request("ann", PROMPTS[0])], 8)
    assert [o.text for o in out[:3]] == alone_caa + alone_dps + alone_inf


def test_a_request_with_the_users_history_decodes_the_prompt_the_heads_were_chosen_with(served):
    """DPS as in the paper: the user's retrieved history before the prompt, in the refresh's template."""
    from steerstore.operators.history import HistoryContextConfig, history_prompt

    reader, model, tokenizer = served
    runtime = ModelRuntime(ModelConfig(name_or_path="tiny"), model=model, tokenizer=tokenizer)
    ann = reader.artifacts("ann")
    # the heads were scored with the user's items as one conversation (the default): up to max_items − 1 before each
    assert ann.dps.history_items == reader.manifest["config"]["dps"]["history"]["max_items"] - 1
    history = [{"input": "Tell me about your weekend.", "output": "Wow, I absolutely love it! Amazing!"}]
    shown = history_prompt(history, PROMPTS[2], HistoryContextConfig(context_chars=ann.dps.history_chars))
    alone_dps = runtime.generate([shown], 8, contrast=HeadContrast([ann.dps.heads], gamma=ann.dps.gamma,
                                                                   adaptive=ann.dps.adaptive,
                                                                   plausibility=ann.dps.plausibility))
    out = serve(runtime, reader, [Request("ann", PROMPTS[2], "dps", history=history),
                                  Request("ann", PROMPTS[2], "none", history=history),
                                  Request("ann", PROMPTS[2], "dps")], 8)
    assert out[0].text == alone_dps[0] and out[0].note is None
    assert out[1].text == runtime.generate([shown], 8)[0]  # none + history: the history-in-prompt baseline
    assert "chosen with up to 7 history item(s)" in out[2].note  # served without the history it was chosen with
    for bad in ([{"input": "x"}], "text", [{"input": "x", "output": "  "}]):
        with pytest.raises(BadRequest, match="history must be a list"):
            plan_requests(reader, [Request("ann", "Hi", "dps", history=bad)])


def test_a_request_with_history_and_no_strength_gets_the_strength_chosen_on_top_of_retrieved_history(served):
    """Steering composed with the history prompt: the refresh chose α, γ (and layer) and λ in that condition;
    a request with history that names no strength is served at them, one without history at the plain ones."""
    from steerstore.operators.history import HistoryContextConfig, history_prompt
    from steerstore.operators.serving import recommended_lambda

    reader, model, tokenizer = served
    choice = reader.manifest["scale_choice"]["history"]  # the refresh's own choice in the composed condition
    # every sampled pair has history items other than the one with its own prompt (never shown): all 4 scored
    assert {"population", "caa", "bt"} <= set(choice) and choice["pairs"] == 4 and choice["history_items"] == 2
    for method in ("population", "caa", "bt"):
        assert [c["alpha"] for c in choice[method]["curve"]] == [1.0, 4.0] and choice[method]["alpha"] in (1.0, 4.0)
    assert set(reader.manifest["scale_choice"]["steerx"]["recommended_history"]) >= {"history", "influence"}
    composed = StoreReader(reader.store.uri, version=reader.version)  # a copy whose composed choice differs from every plain one
    composed.manifest = {**reader.manifest, "scale_choice": {
        **reader.manifest["scale_choice"], "history": {**choice, "caa": {"alpha": 3.0}, "population": {"alpha": 5.0}},
        "steerx": {**reader.manifest["scale_choice"]["steerx"],
                   "recommended_history": {"history": {"layer": 3, "gamma": 0.75}, "influence": {"lambda": 0.25}}}}}
    runtime = ModelRuntime(ModelConfig(name_or_path="tiny"), model=model, tokenizer=tokenizer)
    history = [{"input": "Tell me about your weekend.", "output": "Wow, I absolutely love it! Amazing!"}]
    caa = composed.vectors(["dan"])["dan"]
    style = composed.vectors(["cat"], method="steerx", source="history")["cat"]
    assert caa.recommended_scale != 3.0 and (style.recommended_layers, style.recommended_scale) != ([3], 0.75)
    out = serve(runtime, composed, [Request("dan", PROMPTS[2], "caa", history=history),
                                    Request("cat", PROMPTS[2], "style_vector", source="history", history=history),
                                    Request("ann", PROMPTS[2], "influence", history=history),
                                    Request("dan", PROMPTS[2], "caa"),
                                    Request("dan", PROMPTS[2], "caa", scale=2.0, history=history)], 8)
    assert [(o.scale, o.layers) for o in out[:2]] == [(3.0, caa.recommended_layers), (0.75, [3])]
    assert out[2].scale == 0.25 and recommended_lambda(composed) == recommended_lambda(reader)
    assert out[3].scale == caa.recommended_scale and out[4].scale == 2.0  # no history / an explicit strength
    # a user without a style vector, with history and an explicit γ: the population vector stands in at the
    # population's α chosen on top of history (γ is no α), as a population request with history gets it
    assert composed.population().recommended_scale != 5.0
    _, (fallback, population) = plan_requests(composed, [
        Request("nobody", PROMPTS[2], "style_vector", scale=3.0, history=history),
        Request("nobody", PROMPTS[2], "population", history=history)])
    assert fallback.applied == "population" and fallback.scale == population.scale == 5.0
    assert "the population's α 5 replaces γ 3" in fallback.note
    shown = history_prompt(history, PROMPTS[2], HistoryContextConfig(context_chars=composed.dps_history()[1]))
    steer = Steering({l: torch.from_numpy(v)[None] for l, v in caa.at(caa.recommended_layers).items()},
                     torch.tensor([3.0]), caa.positions)
    assert out[0].text == runtime.generate([shown], 8, steer=steer)[0]


def test_every_vector_method_of_a_mixed_batch_decodes_as_the_runtime_steered_by_the_readers_vectors(served):
    """bt, population, style_vector (explicit source, layers, γ) and caa (explicit layers) rows, with the
    positions each vector records (CAA-family response, SteerX all), in one batch: each row decodes as
    the one-row runtime call with a Steering built by hand from the reader's own vectors."""
    reader, model, tokenizer = served
    runtime = ModelRuntime(ModelConfig(name_or_path="tiny"), model=model, tokenizer=tokenizer)
    bt = reader.bt(["ben"])["ben"]
    population = reader.population()
    style = reader.vectors(["cat"], method="steerx", source="history")["cat"]
    caa = reader.vectors(["dan"])["dan"]
    # the batch mixes positions: the CAA family steers from the response on, SteerX everywhere
    assert (bt.positions, population.positions, caa.positions, style.positions) == ("response",) * 3 + ("all",)
    assert reader.default_source("steerx") != "history" and caa.recommended_layers != [0]
    rows = [  # (request, the vector it must use, scale, layers, applied); the last row is unsteered
        (Request("ben", PROMPTS[0], "bt"), bt, bt.recommended_scale, bt.recommended_layers, "user"),
        (Request("ann", PROMPTS[4], "population"), population, population.recommended_scale,
         population.recommended_layers, "population"),
        (Request("cat", PROMPTS[1], "style_vector", scale=1.5, source="history", layers=[1, 3]), style, 1.5, [1, 3],
         "user"),
        (Request("dan", PROMPTS[2], "caa", scale=3.0, layers=[0]), caa, 3.0, [0], "user"),
        (Request("ann", PROMPTS[3]), None, None, None, "none")]
    out = serve(runtime, reader, [r for r, *_ in rows], 8)

    def alone(prompt, vec, scale, layers, positions):
        steer = Steering({l: torch.from_numpy(np.array(vec.vectors[vec.layers.index(l)]))[None] for l in layers},
                         torch.tensor([scale]), positions)
        return runtime.generate([prompt], 8, steer=steer)[0]

    expected = [alone(r.prompt, vec, scale, layers, vec.positions) if vec is not None else
                runtime.generate([r.prompt], 8)[0] for r, vec, scale, layers, _ in rows]
    assert [o.text for o in out] == expected
    assert [(o.applied, o.scale, o.layers) for o in out] == [(a, s, l) for _, _, s, l, a in rows]
    # each steered row is changed by its steering and by where it applies, and the explicit rows by
    # their layers (and the style row by its source): a row decoded unsteered, from the other
    # positions, at the vector's default layers or with the default source could not match
    for (r, vec, scale, layers, _), text in zip(rows[:-1], expected):
        assert text != runtime.generate([r.prompt], 8)[0], r
        assert text != alone(r.prompt, vec, scale, layers, "all" if vec.positions == "response" else "response"), r
        if r.layers is not None:
            assert text != alone(r.prompt, vec, scale, vec.recommended_layers, vec.positions), r
    blend = reader.vectors(["cat"], method="steerx")["cat"]
    assert expected[2] != alone(PROMPTS[1], blend, 1.5, [1, 3], blend.positions)


def test_serving_refuses_a_model_whose_weights_differ_from_the_store(served):
    reader, _, _ = served
    built = reader.manifest["model"]
    with pytest.raises(FingerprintMismatch, match=r"Serve it with that model \(`steerstore model --store") as raised:
        personalised_generate(tiny_model(seed=1), tiny_tokenizer(), [Request("ann", "Hi")], reader)
    assert f"built with {built['name_or_path']!r}" in str(raised.value) and built["fingerprint"] in str(raised.value)


def test_bad_requests_get_clear_errors(served):
    reader, _, _ = served
    with pytest.raises(BadRequest, match="unknown method 'magic'"):
        plan_requests(reader, [Request("ann", "Hi", "magic")])
    with pytest.raises(BadRequest, match="prompt must be non-empty"):
        plan_requests(reader, [Request("ann", "  ", "caa")])
    with pytest.raises(BadRequest, match="scale must be a finite number"):
        plan_requests(reader, [Request("ann", "Hi", "caa", scale=float("nan"))])
    with pytest.raises(BadRequest, match=r"request 0 \(user 'ann', caa\): layers \[29\] are not stored"):
        plan_requests(reader, [Request("ann", "Hi", "caa", layers=[29])])
    for bad, why in [(dict(method="caa", source="blend"), "source applies to method style_vector only"),
                     (dict(method="style_vector", source="poetry"), "source applies to method style_vector only"),
                     (dict(method="style_vector", source=[]), "source applies"),
                     (dict(method="caa", layers=12), "layers must be a non-empty list"),
                     (dict(method="caa", layers="12"), "layers must be a non-empty list"),
                     (dict(method="caa", layers=[]), "layers must be a non-empty list"),
                     (dict(method="caa", layers=[1, True]), "layers must be a non-empty list"),
                     (dict(method="dps", layers=[1]), "layers apply to the vector methods"),
                     (dict(method="caa", scale=True), "scale must be a finite number"),
                     (dict(method="caa", scale="2"), "scale must be a finite number")]:
        with pytest.raises(BadRequest, match=why):
            plan_requests(reader, [Request("ann", "Hi", "none"), Request("ann", "Hi", **bad)])


def test_the_fallback_adapts_the_requested_layers_and_strength_to_the_population_vector(served):
    reader, model, tokenizer = served
    population = reader.population()
    user = reader.vectors(["ann"], method="steerx")["ann"]
    only_user = sorted(set(user.layers) - set(population.layers))
    assert only_user  # the tiny store keeps SteerX layers the population vector has not
    _, (own, fallback) = plan_requests(reader, [
        Request("ann", "Hi", "style_vector", scale=3.0, layers=only_user),
        Request("nobody", "Hi", "style_vector", scale=3.0, layers=only_user)])
    assert own.applied == "user" and own.layers == only_user and own.scale == 3.0
    assert fallback.applied == "population" and fallback.layers == population.recommended_layers
    assert fallback.scale == pytest.approx(population.recommended_scale)
    assert "not stored for the population vector" in fallback.note and "replaces γ 3" in fallback.note
    _, (caa,) = plan_requests(reader, [Request("nobody", "Hi", "caa", scale=1.5, layers=population.layers[:1])])
    assert caa.applied == "population" and caa.scale == 1.5 and caa.layers == population.layers[:1]


def test_the_runtime_follows_each_store_prompt_conventions_and_does_not_keep_the_model_alive(served, tmp_path):
    import gc
    import weakref

    from steerstore.operators import serving

    reader, _, tokenizer = served
    other = StoreReader(reader.store.uri)
    other.manifest = {**reader.manifest, "config": {**reader.manifest["config"],
                                                    "model": {**reader.manifest["config"]["model"],
                                                              "use_chat_template": False}}}
    model = tiny_model("llama")
    first, second = serving._runtime_for(model, tokenizer, reader), serving._runtime_for(model, tokenizer, other)
    assert first.config.use_chat_template and not second.config.use_chat_template
    assert first.fingerprint == second.fingerprint and model in serving._FINGERPRINTS
    ref = weakref.ref(model)
    del model, first, second
    gc.collect()
    assert ref() is None


def test_generate_serves_a_jsonl_file_of_mixed_requests_as_one_batch(served, tmp_path, capsys):
    import json

    from steerstore.jobs import cli
    from tests.tiny import write_jsonl

    reader, _, _ = served
    requests = [{"user_id": "ann", "prompt": "Hi", "method": "caa"}, {"user_id": "ben", "prompt": "Hi", "method": "dps"},
                {"user_id": "nobody", "prompt": "Hi", "method": "bt", "scale": 2.0}]
    path = write_jsonl(tmp_path / "requests.jsonl", requests)
    out = tmp_path / "out.jsonl"
    model = reader.manifest["model"]["name_or_path"]
    assert cli.main(["generate", "--store", reader.store.uri, "--requests", path, "--out", str(out),
                     "--model", model, "--max_new_tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["user_id"], r["method"], r["applied"]) for r in rows] == [
        ("ann", "caa", "user"), ("ben", "dps", "user"), ("nobody", "bt", "population")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [requests[0], {"user_id": "ann", "prompt": "Hi", "colour": "red"}])
    assert cli.main(["generate", "--store", reader.store.uri, "--requests", bad]) == 1
    assert "bad.jsonl line 2: unknown fields ['colour']" in capsys.readouterr().err
    assert cli.main(["generate", "--store", reader.store.uri, "--user", "nobody", "--prompt", "Hi",
                     "--method", "caa"]) == 1
    err = capsys.readouterr().err
    assert "ValueError: user 'nobody' has no vectors" in err and "Pass --fallback to answer" in err
    # no --method: the store records recommendations, so the recommendation is what is asked for; a user the store
    # does not know is refused like any other method unless --fallback, which serves the population's choice
    # (nothing here: the tiny users held nothing out)
    assert reader.manifest["recommend"] and cli.main(["generate", "--store", reader.store.uri, "--user", "nobody",
                                                      "--prompt", "Hi", "--max_new_tokens", "4"]) == 1
    err = capsys.readouterr().err
    assert "user 'nobody' has no artifacts" in err and "Pass --fallback to answer with the population's choice" in err
    assert cli.main(["generate", "--store", reader.store.uri, "--user", "nobody", "--prompt", "Hi", "--fallback",
                     "true", "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "method recommended → none" in out and "recommends nothing for the plain condition" in out
    assert cli.main(["generate", "--store", reader.store.uri, "--user", "nobody", "--prompt", "Hi", "--fallback", "true",
                     "--method", "caa", "--max_new_tokens", "4"]) == 0
    assert "fallback: population vector" in capsys.readouterr().out
    assert cli.main(["generate", "--store", reader.store.uri, "--user", "nobody", "--prompt", "Hi", "--method",
                     "influence", "--fallback", "true", "--max_new_tokens", "4"]) == 0
    assert "fallback: unsteered" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad2.jsonl", [requests[0], requests[1], {"user_id": "ann", "prompt": "Hi", "layers": "12"}])
    assert cli.main(["generate", "--store", reader.store.uri, "--requests", bad]) == 1
    assert "bad2.jsonl line 3: layers must be a non-empty list" in capsys.readouterr().err


def test_the_serving_benchmark_writes_a_store_whose_lookups_return_its_vectors(tmp_path):
    from steerstore.jobs.bench import serving as bench_serving

    meta = {"layers": [3, 4], "recommended": [4], "hidden": 8, "k": 2, "norm": 4.0, "num_layers": 6, "num_heads": 4,
            "group": 2, "model_id": "synthetic", "fingerprint": "sha256:x", "name_or_path": "synthetic",
            "model_config": {}}
    version, ids = bench_serving.synthetic_store(str(tmp_path / "s"), None, 300, meta, 0, users_per_bucket=64,
                                                 row_group_bytes=1024)
    reader = StoreReader(str(tmp_path / "s"))
    assert reader.version == version and reader.layout["buckets"] == 5
    art = reader.artifacts(ids[123])
    assert art.status == "found" and art.caa.vectors.shape == (2, 8) and art.bt.vectors.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(art.caa.vectors, axis=-1), 4.0, rtol=1e-5)
    assert len(art.dps.heads) == 8 and art.steerx["context"] == bench_serving.STYLE
    figures = bench_serving.measure_lookups(str(tmp_path / "s"), None, version, ids, n=20, scans=2, seed=0)
    for key in ("vectors_uncached", "artifacts_uncached", "artifacts_cached", "absent", "scan_baseline"):
        assert figures[key]["p50_ms"] > 0 and figures[key]["p99_ms"] >= figures[key]["p50_ms"]
    published = []

    def republish():
        published.append(bench_serving.synthetic_store(str(tmp_path / "s"), None, 300, meta, 1, users_per_bucket=64,
                                                       row_group_bytes=1024)[0])
        return published[-1]

    switch = bench_serving.measure_switch(str(tmp_path / "s"), None, republish, ids, n=10, seed=0)
    assert (switch["from"], switch["to"]) == (version, published[0]) and switch["switch_ms"] > 0
    assert StoreReader(str(tmp_path / "s")).version == published[0]
    assert switch["first_lookups_after_switch"]["p50_ms"] > 0 and switch["check_unchanged"]["p50_ms"] > 0
