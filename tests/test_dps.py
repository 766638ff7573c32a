"""DPS: per-user and per-cluster preference heads, history context, serving head choice, refresh end to end."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from steerstore.infra.artifacts import serving_heads
from steerstore.infra.config import from_dict
from steerstore.infra.store import SteeringStore
from steerstore.jobs import refresh
from steerstore.jobs.refresh import tables as refresh_tables
from steerstore.operators.dps import DPSConfig, DPSHeads, PopulationPCS, dps_user_rows
from steerstore.operators.history import HistoryContextConfig, bm25_scores, context_indices, scoring_sequences
from steerstore.operators.runtime import ModelConfig
from tests.tiny import answers, write_jsonl

ITEMS = [
    {"input": "Describe your weekend.", "output": "Wow, I absolutely love the weather today!"},
    {"input": "Review a novel.", "output": "Noted. The plot is brief and formal."},
    {"input": "Describe the weather.", "output": "The quick brown fox jumps over the lazy dog."},
    {"input": "Summarise the plot of a novel.", "output": "Amazing, fantastic, wonderful novel!"},
]


def _user(uid, items=ITEMS, k=2):
    cfg = HistoryContextConfig(context_items=k)
    return {"user_id": uid, "sequences": [{"prompt": p, "output": o} for p, o in scoring_sequences(items, cfg)]}


def test_context_never_contains_the_scored_item_and_prefers_recent_items():
    cfg = HistoryContextConfig(context_items=2)
    for j in range(len(ITEMS)):
        assert j not in context_indices(ITEMS, j, cfg)
    assert context_indices(ITEMS, 3, cfg) == [1, 2]  # the two items just before it
    assert context_indices(ITEMS, 0, cfg) == [1, 2]  # nothing before: the next ones
    prompt, output = scoring_sequences(ITEMS, cfg)[3]
    assert output == ITEMS[3]["output"] and ITEMS[3]["output"] not in prompt and ITEMS[2]["output"] in prompt


def test_bm25_selection_picks_the_most_similar_items():
    scores = bm25_scores("weather today", ["a novel plot", "the weather today is fine", "weather"])
    assert scores[1] > scores[2] > scores[0] == 0
    cfg = HistoryContextConfig(context_items=1, selection="bm25")
    assert context_indices(ITEMS, 3, cfg) == [1]  # "Review a novel." is closest to "...plot of a novel."


@pytest.fixture(scope="module")
def scorer(tiny_model_folder):
    def make(**cfg):
        # the users below bring per-item sequences (their prompts hold their context items)
        config = DPSConfig(**{"top_k": 4, "candidates": 6, "pcs_baseline": "none", "history": HistoryContextConfig(),
                              **cfg})
        return DPSHeads(config, ModelConfig(name_or_path=str(tiny_model_folder)))
    return make


def _pcs_by_loop(rt, user):
    enc = rt.encode([s["prompt"] for s in user["sequences"]], [s["output"] for s in user["sequences"]])
    tokens = sum(len(e.ids) - e.prompt_len for e in enc)
    base = float(rt.sequence_nll(enc).sum())
    return {(l, h): (float(rt.sequence_nll(enc, rt.head_gates([[(l, h)]] * len(enc))).sum()) - base) / tokens
            for l in range(rt.num_layers) for h in range(rt.num_heads)}, base / tokens


def test_exact_mode_scores_equal_a_per_head_loop_and_are_pooled_per_user(scorer):
    dps = scorer(mode="exact", top_k=16, candidates=16)
    users = [_user("u1"), _user("u2", ITEMS[:3], k=1)]
    rows = dps(pa.Table.from_pylist(users)).to_pylist()
    for user, row in zip(users, rows):
        loop, base = _pcs_by_loop(dps.runtime, user)
        assert row["status"] == "ok" and row["mode"] == "exact"
        assert row["base_nll"] == pytest.approx(base, rel=1e-4)
        assert row["heads"], "no head with a positive PCS on a random model"
        for h in row["heads"]:
            assert h["pcs"] == pytest.approx(loop[(h["layer"], h["head"])], abs=1e-4)
            assert h["kv_head"] == h["head"] // 2  # 4 query heads share 2 kv heads
        positive = sorted((v for v in loop.values() if v > 0), reverse=True)
        assert [h["pcs"] for h in row["heads"]] == pytest.approx(positive[:16], abs=1e-4)


CONVERSATION = HistoryContextConfig(arrangement="conversation")


def _turn_prefixes(conv):
    """A conversation's turns as plain sequences: each output behind every token before it."""
    from steerstore.operators.runtime import Encoded

    return [Encoded(conv.ids[:end], start) for start, end in conv.spans]


def test_a_conversation_scores_each_output_after_the_turns_before_it(tiny_runtime):
    rt = tiny_runtime
    turns = scoring_sequences(ITEMS, CONVERSATION)
    assert [o for _, o in turns] == [it["output"] for it in ITEMS]  # time order, every item
    assert not any(it["output"] in p for p, _ in turns for it in ITEMS)  # the earlier turns are the context
    conv = rt.encode_conversation(turns)
    for (start, end), (_, output) in zip(conv.spans, turns):  # each span is exactly its output's tokens
        assert conv.ids[start:end] == rt.response_ids([output])[0]
    assert conv.scored == sum(end - start for start, end in conv.spans) and conv.prompt_len == conv.spans[0][0]
    messages = [m for p, o in turns for m in ({"role": "user", "content": p}, {"role": "assistant", "content": o})]
    assert rt.tokenizer.apply_chat_template(messages, tokenize=False).startswith(rt.tokenizer.decode(conv.ids))
    prefixes = _turn_prefixes(conv)
    assert float(rt.sequence_nll([conv])[0]) == pytest.approx(float(rt.sequence_nll(prefixes).sum()), rel=1e-5)
    attribution = rt.head_attribution([conv], [0], 1)  # mean NLL per scored token of the group, either way
    assert torch.allclose(attribution, rt.head_attribution(prefixes, [0] * len(prefixes), 1), atol=1e-5)


def test_a_template_that_trims_turns_still_scores_each_raw_output_and_one_that_rewrites_them_fails_early(
        tiny_runtime, tiny_model_folder):
    """Llama 3's template trims every message: the text after each output is the template's own; a template
    that rewrites earlier turns cannot hold a conversation, and DPS says so when it starts, not per user."""
    import copy

    from steerstore.operators.runtime import TextEncoder

    trim = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = copy.deepcopy(tiny_runtime.tokenizer)
    tokenizer.chat_template = trim
    text = TextEncoder(tokenizer)
    turns = [("Prompt: a", "  Wow, I love it!  "), ("Prompt: b", "Noted. \n"), ("Prompt: c", "The fox.")]
    conv = text.encode_conversation(turns)
    for (start, end), (_, output) in zip(conv.spans, turns):  # the raw output's tokens, whitespace and all
        assert conv.ids[start:end] == text.response_ids([output])[0]
    between = tokenizer.decode(conv.ids[conv.spans[0][1]:conv.spans[1][0]])  # the template's own text after a turn
    assert between == "<|im_end|>\n<|im_start|>user\nPrompt: b<|im_end|>\n<|im_start|>assistant\n"
    rewrite = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
               "(earlier answer)<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.chat_template = rewrite
    with pytest.raises(ValueError, match="rewrites earlier turns.*dps.history.arrangement=items"):
        TextEncoder(tokenizer).encode_conversation(turns)
    import transformers

    folder = tiny_model_folder.parent / "rewriting-template"
    if not folder.exists():
        import shutil

        shutil.copytree(tiny_model_folder, folder)
        saved = transformers.AutoTokenizer.from_pretrained(folder)
        saved.chat_template = rewrite
        saved.save_pretrained(folder)
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        DPSHeads(DPSConfig(history=CONVERSATION), ModelConfig(name_or_path=str(folder)))
    DPSHeads(DPSConfig(history=HistoryContextConfig()), ModelConfig(name_or_path=str(folder)))  # items: fine


def test_dps_over_a_conversation_equals_a_per_head_loop_over_its_turns(scorer):
    dps = scorer(mode="exact", top_k=16, candidates=16, history=CONVERSATION)
    user = {"user_id": "u1", "sequences": [{"prompt": p, "output": o} for p, o in scoring_sequences(ITEMS, CONVERSATION)]}
    row = dps(pa.Table.from_pylist([user])).to_pylist()[0]
    rt = dps.runtime
    conv = rt.encode_conversation([(s["prompt"], s["output"]) for s in user["sequences"]])
    prefixes = _turn_prefixes(conv)
    base = float(rt.sequence_nll(prefixes).sum())
    assert row["status"] == "ok" and row["n_items"] == 4 and row["n_tokens"] == conv.scored
    assert row["base_nll"] == pytest.approx(base / conv.scored, rel=1e-4)
    assert row["heads"]
    for h in row["heads"]:
        gates = rt.head_gates([[(h["layer"], h["head"])]] * len(prefixes))
        assert h["pcs"] == pytest.approx((float(rt.sequence_nll(prefixes, gates).sum()) - base) / conv.scored, abs=1e-4)
    fast = scorer(mode="fast", top_k=4, candidates=6, history=CONVERSATION)(pa.Table.from_pylist([user])).to_pylist()[0]
    assert fast["status"] == "ok" and fast["heads"] and fast["n_tokens"] == conv.scored


def test_a_conversation_longer_than_a_backward_micro_batch_is_split_and_scores_every_output_once(tiny_model_folder):
    config = DPSConfig(mode="exact", top_k=2, candidates=2, pcs_baseline="none", history=CONVERSATION)
    whole = DPSHeads(config, ModelConfig(name_or_path=str(tiny_model_folder)))
    user = {"user_id": "u1", "sequences": [{"prompt": p, "output": o} for p, o in scoring_sequences(ITEMS, CONVERSATION)]}
    (one,) = whole._encode([user])[0]
    budget = len(one.ids) // 2  # the whole conversation needs two backward micro-batches
    split = DPSHeads(config, ModelConfig(name_or_path=str(tiny_model_folder), max_backward_tokens=budget))
    parts = split._encode([user])[0]
    assert len(parts) >= 2 and all(len(e.ids) <= budget for e in parts)
    turns = [(s["prompt"], s["output"]) for s in user["sequences"]]
    assert sum(len(e.spans) for e in parts) == len(turns)  # each output once, in consecutive conversations
    first = 0
    for e in parts:  # each part is the conversation of its own turns, from its first
        assert e.ids == split.runtime.encode_conversation(turns[first:first + len(e.spans)]).ids
        first += len(e.spans)
    row = split(pa.Table.from_pylist([user])).to_pylist()[0]
    assert row["status"] == "ok" and row["n_tokens"] == sum(e.scored for e in parts) == one.scored


def test_only_dps_scores_a_conversation():
    from steerstore.infra.config import ConfigError
    from steerstore.operators.steerx import SteerXConfig

    with pytest.raises(ConfigError, match="steerx.history.arrangement must be items"):
        SteerXConfig(history=HistoryContextConfig(arrangement="conversation"))


def test_fast_mode_with_every_head_as_candidate_equals_exact_mode(scorer):
    users = pa.Table.from_pylist([_user("u1")])
    exact = scorer(mode="exact")(users).to_pylist()[0]["heads"]
    fast = scorer(mode="fast", candidates=16)(users).to_pylist()[0]["heads"]
    assert [(h["layer"], h["head"]) for h in fast] == [(h["layer"], h["head"]) for h in exact]
    assert [h["score"] for h in fast] == pytest.approx([h["score"] for h in exact], abs=1e-5)


def test_fast_mode_verifies_only_candidates_ranked_by_attribution(scorer):
    dps = scorer(mode="fast", candidates=4, top_k=4)
    user = _user("u1")
    row = dps(pa.Table.from_pylist([user])).to_pylist()[0]
    enc = dps.runtime.encode([s["prompt"] for s in user["sequences"]], [s["output"] for s in user["sequences"]])
    estimate = -dps.runtime.head_attribution(enc, [0] * len(enc), 1)[0].reshape(-1).numpy()
    top = {(int(i) // 4, int(i) % 4) for i in np.argsort(-estimate)[:4]}
    assert {(h["layer"], h["head"]) for h in row["heads"]} <= top


def test_departures_verify_only_users_whose_attribution_leaves_their_clusters_heads(tiny_model_folder):
    from steerstore.jobs.bench.cost import BlockCounter

    model = ModelConfig(name_or_path=str(tiny_model_folder))
    config = dict(mode="fast", top_k=4, candidates=6, pcs_baseline="none", clusters=2, history=HistoryContextConfig())
    every = DPSHeads(DPSConfig(**config), model)
    users = [dict(_user("u1"), cluster=0, routing=[1.0, 0.0]), dict(_user("u2", ITEMS[:3], k=1), cluster=1,
                                                                     routing=[0.0, 1.0])]
    rt = every.runtime
    top = {}
    for u in users:  # each user's own attribution top-4, as the operator ranks it
        enc = rt.encode([s["prompt"] for s in u["sequences"]], [s["output"] for s in u["sequences"]])
        estimate = -rt.head_attribution(enc, [0] * len(enc), 1)[0].reshape(-1).numpy()
        top[u["user_id"]] = [every.all_heads[i] for i in np.argsort(-estimate, kind="stable")[:4] if estimate[i] > 0]
    others = [h for h in every.all_heads if h not in top["u2"]][:4]
    # u1's cluster holds u1's own top heads (agrees: not verified); u2's holds none of u2's (departs: verified)
    as_rows = lambda hs: {"heads": [{"layer": l, "head": h, "score": 1.0 - 0.1 * i}  # noqa: E731
                                    for i, (l, h) in enumerate(hs)]}
    clusters = {0: as_rows(top["u1"][:2] + [h for h in every.all_heads if h not in top["u1"]][:2]), 1: as_rows(others)}
    dps = DPSHeads(DPSConfig(**config, verify="departures", departure_overlap=0.5), model, clusters=clusters)
    batch = pa.Table.from_pylist(users)
    counts = {}
    for name, op in (("all", every), ("departures", dps)):
        counter = BlockCounter(rt)
        with counter, counter.at("dps"):
            rows = op(batch).to_pylist()
        counts[name] = counter.figures()["dps"]["forward_token_equivalents"]
        if name == "all":
            reference = rows
    agreed, departed = rows
    assert agreed["status"] == "ok" and agreed["heads"] == [] and agreed["cluster_overlap"] == 0.5
    assert departed["cluster_overlap"] == 0.0 and departed["heads"] == reference[1]["heads"]  # verified as before
    assert reference[0]["heads"] and reference[0]["cluster_overlap"] is None  # verify=all: no comparison
    assert counts["departures"] < counts["all"]  # u1's exact ablations were skipped
    store_rows = refresh_tables.dps_heads_rows(dps(batch), DPSConfig(**config, verify="departures"), clusters=True)
    assert store_rows.column("source").to_pylist() == ["cluster", "user"]
    assert store_rows.column("cluster_overlap").to_pylist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="verify=departures needs"):
        DPSConfig(verify="departures", clusters=0)
    # the serving settings are checked too
    with pytest.raises(ValueError, match="dps.gamma must be >= 0"):
        DPSConfig(gamma=-1.0)
    with pytest.raises(ValueError, match=r"dps.plausibility must be in \[0, 1\)"):
        DPSConfig(plausibility=1.0)


def test_population_baseline_subtracts_the_mean_of_other_users():
    shape = (2, 2)
    rows = [{"user_id": u, "pcs": np.full(4, v).tolist(), "attribution": np.full(4, 2 * v).tolist()}
            for u, v in (("a", 1.0), ("b", 3.0), ("c", 5.0))]
    pop = PopulationPCS.from_rows(rows, shape)
    pcs, attr, n = pop.for_user("a")
    assert n == 2 and np.allclose(pcs, 4.0) and np.allclose(attr, 8.0)  # mean of b and c only
    pcs, _, n = pop.for_user("outsider")
    assert n == 3 and np.allclose(pcs, 3.0)
    lonely = PopulationPCS.from_rows(rows[:1], shape)
    assert lonely.for_user("a")[2] == 0


def test_population_baseline_changes_the_ranking(scorer, tiny_model_folder):
    user = pa.Table.from_pylist([_user("u1")])
    raw = scorer(mode="exact", top_k=16, candidates=16)(user).to_pylist()[0]["heads"]
    rt_shape = (4, 4)
    other = {"user_id": "other", "pcs": np.zeros(16).tolist(), "attribution": np.zeros(16).tolist()}
    loud = (l, h) = (raw[0]["layer"], raw[0]["head"])
    other["pcs"][l * 4 + h] = 10.0  # the user's top head matters even more for everyone else
    dps = DPSHeads(DPSConfig(mode="exact", top_k=16, candidates=16, pcs_baseline="population"),
                   ModelConfig(name_or_path=str(tiny_model_folder)),
                   population=PopulationPCS.from_rows([other], rt_shape))
    row = dps(user).to_pylist()[0]
    assert row["pcs_baseline"] == "population" and row["baseline_users"] == 1
    assert loud not in [(h["layer"], h["head"]) for h in row["heads"]]
    for h in row["heads"]:
        assert h["score"] == pytest.approx(h["pcs"], abs=1e-6)  # other heads: baseline 0


def test_a_user_that_cannot_be_scored_is_quarantined_not_the_batch(scorer):
    dps = scorer()
    rows = dps(pa.Table.from_pylist([_user("good"), {"user_id": "empty", "sequences": []}])).to_pylist()
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "quarantined" and "no history items" in rows[1]["reason"]


def test_serving_heads_prefer_the_users_own_then_mix_clusters_by_routing():
    own = {"heads": [{"layer": 3, "head": 1, "score": 0.5}], "routing": [1.0, 0.0]}
    clusters = {0: {"heads": [{"layer": 1, "head": 0, "score": 1.0}, {"layer": 2, "head": 2, "score": 0.2}]},
                1: {"heads": [{"layer": 2, "head": 2, "score": 1.0}]}}
    assert serving_heads(own, clusters, 4) == [(3, 1)]
    routed = {"heads": [], "routing": [0.3, 0.7]}
    assert serving_heads(routed, clusters, 4) == [(2, 2), (1, 0)]  # 0.3*0.2 + 0.7*1.0 > 0.3*1.0
    assert serving_heads(routed, clusters, 1) == [(2, 2)]
    assert serving_heads(None, clusters, 4) == []


def test_user_rows_get_sequences_and_routing():
    from steerstore.schemas.store import USER_ROW_SCHEMA
    hist = [{"item_id": str(i), "input": it["input"], "output": it["output"], "timestamp": None}
            for i, it in enumerate(ITEMS)]
    batch = pa.Table.from_pylist([{"user_id": "u", "histories": hist, "content_fingerprint": "x"}])
    batch = batch.append_column("embedding", pa.array([[1.0, 0.0]], pa.list_(pa.float32())))
    out = dps_user_rows(batch, HistoryContextConfig(max_items=3), np.asarray([[0.0, 1.0], [1.0, 0.0]]), 0.1)
    row = out.to_pylist()[0]
    assert len(row["sequences"]) == 3 and row["cluster"] == 1 and sum(row["routing"]) == pytest.approx(1.0)
    assert row["sequences"][-1]["output"] == ITEMS[-1]["output"]
    assert set(USER_ROW_SCHEMA.names) >= {"user_id", "histories", "content_fingerprint"}


# ---- end to end on real Ray ---------------------------------------------------------------

STYLES = {"ann": "Wow, I absolutely love it! Amazing!", "ben": "Noted. Brief and formal.",
          "cat": "Wow, fantastic and wonderful!", "dan": "The quick brown fox.", "gus": "Meh, it is fine I guess."}


def _history(uid):
    return [{"user_id": uid, "item_id": f"{uid}{i}", "input": f"Tell me about thing {i}.",
             "output": f"{STYLES[uid]} {i}", "timestamp": i} for i in range(3)]


@pytest.fixture(scope="module")
def dps_run(ray_cluster, tmp_path_factory, tiny_model_folder):
    tmp = tmp_path_factory.mktemp("dps-run")
    histories = [h for u in STYLES for h in _history(u)]
    histories.append({"user_id": "eve", "item_id": "e0", "input": "Hi", "output": "One item only.", "timestamp": 1})
    pairs = [{"user_id": u, "pair_id": f"{u}p{k}", "prompt": f"Tell me about thing {k}.",
              "chosen": STYLES[u], "rejected": "Meh.", "weight": 1.0} for u in ("ann", "ben") for k in range(2)]
    # gus: 2 valid pairs whose weights are all 0 (validation accepts 0) -> CAA fails inside the job, not in prepare
    pairs += [{"user_id": "gus", "pair_id": f"gusp{k}", "prompt": f"Tell me about thing {k}.",
               "chosen": STYLES["gus"], "rejected": "Meh.", "weight": 0.0} for k in range(2)]
    cfg = from_dict(refresh.RefreshConfig, {
        "inputs": {"preference_pairs": write_jsonl(tmp / "pairs.jsonl", pairs),
                   "histories": write_jsonl(tmp / "histories.jsonl", histories)},
        "output": {"store": str(tmp / "store")}, "model": {"name_or_path": str(tiny_model_folder)},
        "validate": {"max_tokens": 48}, "caa": {"layers": [1, 2], "recommended_layers": [2]},
        "bt": {"enabled": False}, "scale": {"enabled": False}, "ray": {"progress_bars": False},
        "dps": {"mode": "fast", "top_k": 3, "candidates": 6, "clusters": 2, "cluster_items": 4,
                "baseline_users": 2, "history": {"context_items": 1}},
        "steerx": {"token_effects": True, "min_anchors": 2, "history": {"context_items": 1},
                   "smoothing": {"enabled": False},  # descriptions need a real model: tests/test_steerx.py
                   "vectors": {"source": "history", "layers": [1, 3], "calibration_users": 2, "gamma_grid": [0.5, 1],
                               "validation_items": 1, "neutral_max_new_tokens": 4}}})
    return refresh.main(cfg), str(tmp / "store"), cfg


def _expected_dps_heads(cfg, tiny_model_folder) -> dict[str, dict]:
    """Each history user's DPS row recomputed in this process: the population baseline from an exact (every
    head) scoring of the dps.baseline_users users with the smallest seeded keys, then the configured scoring."""
    from steerstore.operators.bt import sample_key

    model = ModelConfig(name_or_path=str(tiny_model_folder))
    users = {u: {"user_id": u, "sequences": [{"prompt": p, "output": o}
                                             for p, o in scoring_sequences(_history(u), cfg.dps.history)]}
             for u in STYLES}
    baseline = sorted(STYLES, key=lambda u: sample_key(u, cfg.dps.seed))[: cfg.dps.baseline_users]
    full = DPSHeads(cfg.dps, model, full=True)(pa.Table.from_pylist([users[u] for u in baseline])).to_pylist()
    population = PopulationPCS.from_rows(full, (4, 4))
    dps = DPSHeads(cfg.dps, model, population=population)
    return {u: dps(pa.Table.from_pylist([users[u]])).to_pylist()[0] for u in STYLES}


@pytest.mark.slow
def test_refresh_with_departures_serves_agreeing_users_their_clusters_heads(dps_run, tmp_path):
    """dps.verify=departures in the job: with departure_overlap 0 every user agrees with its cluster, so no user is
    verified, each is stored with source cluster and its overlap, and the reader serves the cluster's heads."""
    from steerstore.infra.reader import StoreReader

    _, _, cfg = dps_run
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, store=str(tmp_path / "store")),
                              dps=dataclasses.replace(cfg.dps, verify="departures", departure_overlap=0.0),
                              steerx=dataclasses.replace(cfg.steerx, enabled=False), caa=cfg.caa)
    summary = refresh.main(cfg)
    reader = StoreReader(str(tmp_path / "store"))
    rows = {r["user_id"]: r for r in reader.store.read_table("dps_heads", reader.version).to_pylist()}
    assert set(rows) == set(STYLES), [(r["user_id"], r["source"]) for r in rows.values()]
    clusters = {r["cluster"]: r["heads"] for r in reader.store.read_table("dps_clusters", reader.version).to_pylist()}
    for uid, row in rows.items():
        assert row["source"] == "cluster" and row["heads"] == [] and 0 <= row["cluster_overlap"] <= 1, row
        served = reader.dps([uid])[uid].heads
        assert served and set(served) <= {(h["layer"], h["head"]) for c in clusters.values() for h in c}
    computed = summary["workers"]["users_computed"]
    assert computed["dps"] >= len(STYLES) and computed.get("dps_verified", 0) == 0  # (dps counts the sample phase)


@pytest.mark.slow
def test_refresh_stores_dps_heads_clusters_and_population(dps_run, tiny_model_folder):
    summary, uri, cfg = dps_run
    store = SteeringStore(uri)
    version = store.latest()
    manifest = store.read_manifest(version)
    assert "dps" in manifest["methods"]
    users = {r["user_id"]: r for r in store.read_table("users", version).to_pylist()}
    # ann/ben: pairs + histories; cat/dan: histories only; eve: one history item and no pairs;
    # gus: histories and 2 pairs of weight 0, so CAA fails for gus inside the job (covered below)
    assert users["ann"]["methods"] == ["caa", "dps", "steerx"] and users["cat"]["methods"] == ["dps", "steerx"]
    assert users["eve"]["status"] == "quarantined" and "prepare.min_histories" in users["eve"]["reason"]
    assert summary["users_by_method"] == {"caa": 2, "dps": 5, "steerx": 5}
    heads = {r["user_id"]: r for r in store.read_table("dps_heads", version).to_pylist()}
    assert set(heads) == set(STYLES)
    expected = _expected_dps_heads(cfg, tiny_model_folder)
    for uid, row in heads.items():
        assert row["mode"] == "fast" and row["pcs_baseline"] == "population"
        assert row["cluster"] in (0, 1) and sum(row["routing"]) == pytest.approx(1.0, abs=1e-5)
        assert row["model_fingerprint"] == manifest["model"]["fingerprint"]
        assert row["num_heads"] == 4 and row["num_kv_heads"] == 2 and row["n_items"] == 3
        # exactly the heads an in-process scoring against the same population baseline picks
        want = expected[uid]
        assert [(h["layer"], h["head"]) for h in row["heads"]] == [(h["layer"], h["head"]) for h in want["heads"]], uid
        assert [h["score"] for h in row["heads"]] == pytest.approx([h["score"] for h in want["heads"]], abs=1e-4)
        assert [h["pcs"] for h in row["heads"]] == pytest.approx([h["pcs"] for h in want["heads"]], abs=1e-4)
        assert row["baseline_users"] == want["baseline_users"] and row["n_tokens"] == want["n_tokens"]
        assert row["base_nll"] == pytest.approx(want["base_nll"], rel=1e-4)
        assert row["source"] == ("user" if want["heads"] else "cluster")
        if row["source"] == "user":
            assert 1 <= len(row["heads"]) <= 3 and all(h["score"] > 0 for h in row["heads"])
    assert sum(r["source"] == "user" for r in heads.values()) >= 1  # the check above ran on some user's heads
    clusters = store.read_table("dps_clusters", version).to_pylist()
    assert [c["cluster"] for c in clusters] == [0, 1]
    assert sum(c["n_users"] for c in clusters) == 5 and all(c["n_items"] > 0 for c in clusters)
    population = store.read_table("dps_population", version).to_pylist()
    assert len(population) == 16 and {p["n_users"] for p in population} == {2}
    # SteerX anchors (leave-one-out effects against other users' items) and the per-token effects
    anchors = {r["user_id"]: r for r in store.read_table("steerx_users", version).to_pylist()}
    assert set(anchors) == set(STYLES)
    for row in anchors.values():
        assert row["counterfactual"] == "other_users" and row["context_items"] == 1 and row["n_items"] == 3
        assert len(row["anchors"]) >= 1 and row["model_fingerprint"] == manifest["model"]["fingerprint"]
        assert all(a["word"] == a["word"].lower() and a["count"] >= 1 for a in row["anchors"])
        assert row["descriptions"] == [] and row["context"] is None and row["vector_source"] == "history"
    # StyleVector (history source) vectors: one row per SteerX user, recommended layer/γ from calibration
    vectors = [r for r in store.read_table("vectors", version).to_pylist() if r["method"] == "steerx"]
    assert sorted(r["user_id"] for r in vectors) == sorted(STYLES)
    rec = manifest["scale_choice"]["steerx"]["recommended"]["history"]
    for r in vectors:
        assert r["source"] == "history" and r["layers"] == [1, 3] and r["n_pairs"] == 3
        assert r["recommended_layers"] == [rec["layer"]] and r["recommended_scale"] == rec["gamma"]
        assert np.asarray(r["vectors"]).shape == (2, 64) and np.linalg.norm(r["vectors"]) > 0
    curve = manifest["scale_choice"]["steerx"]["curve"]
    assert len([c for c in curve if c["condition"] == "plain"]) == 2 * 2 * 2  # 2 users × 2 layers × 2 γ
    assert len([c for c in curve if c["condition"] == "history"]) == 2 * (2 * 2 + 1)  # and the history alone
    assert manifest["tables"]["vectors"]["rows"] == 2 + 1 + 5  # caa users, population, steerx users
    effects = store.read_table("steerx_token_effects", version).to_pylist()
    assert len(effects) == 15 and all(len(e["tokens"]) == len(e["delta"]) > 0 for e in effects)
    assert manifest["tables"]["steerx_token_effects"]["rows"] == 15


@pytest.mark.slow
def test_a_user_whose_caa_fails_inside_the_job_keeps_the_other_methods_and_is_quarantined_for_caa(dps_run):
    from steerstore.infra.reader import StoreReader

    summary, uri, _ = dps_run
    reader = StoreReader(uri)
    gus = next(r for r in reader.users().to_pylist() if r["user_id"] == "gus")
    assert gus["status"] == "stored" and gus["methods"] == ["dps", "steerx"]
    assert "caa failed" in gus["reason"] and "all pair weights are 0" in gus["reason"]
    assert (gus["n_pairs_valid"], gus["n_pairs_used"], gus["n_histories_valid"]) == (2, 0, 3)
    quarantine = [q for q in reader.store.read_table("quarantine", reader.version).to_pylist() if q["user_id"] == "gus"]
    assert [(q["input"], q["stage"], q["record_id"]) for q in quarantine] == [("user", "caa", None)]
    assert "all pair weights are 0" in quarantine[0]["reason"]
    assert reader.vectors(["gus"]) == {} and set(reader.dps(["gus"])) == {"gus"}
    # reconciliation: every input user is stored or quarantined, and the per-method counts add up
    assert summary["users_in"] == 6 and (summary["users_stored"], summary["users_quarantined"]) == (5, 1)
    assert summary["users_stored"] + summary["users_quarantined"] == summary["users_in"]
    assert reader.manifest["summary"]["users_by_method"]["caa"] == 2


@pytest.mark.slow
def test_reader_resolves_heads_and_generate_decodes_with_them(dps_run, capsys):
    from steerstore.infra.reader import StoreReader
    from steerstore.jobs import cli

    summary, uri, _ = dps_run
    reader = StoreReader(uri)
    found = reader.dps(["ann", "cat", "nobody"])
    assert set(found) == {"ann", "cat"}
    for uid, user in found.items():
        row = reader.store.read_table("dps_heads", reader.version).to_pylist()
        row = next(r for r in row if r["user_id"] == uid)
        if row["heads"]:
            assert user.source == "user" and user.heads == [(h["layer"], h["head"]) for h in row["heads"]]
        else:
            assert user.source in ("cluster", "none")
    user = next((u for u, h in found.items() if h.heads), None)
    assert user is not None, "no user has heads to decode with"
    assert cli.main(["generate", "--store", uri, "--user", user, "--prompt", "Tell me about thing 1.",
                     "--method", "dps", "--scale", "2", "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "method dps" in out
    plain, steered = answers(out)
    assert steered != plain  # the head contrast changed the answer
    assert cli.main(["generate", "--store", uri, "--user", "eve", "--prompt", "Hi", "--method", "dps"]) == 1
    assert "quarantined" in capsys.readouterr().err


def test_cluster_only_users_get_valid_store_rows_with_the_model():
    from steerstore.infra.config import ConfigError
    from steerstore.schemas.store import DPS_HEADS_SCHEMA

    batch = pa.table({"user_id": ["a", "b"], "scope": ["user", "user"], "cluster": pa.array([0, 1], pa.int32()),
                      "routing": pa.array([[0.9, 0.1], [0.2, 0.8]], pa.list_(pa.float32())),
                      "content_fingerprint": ["x", "y"]})
    model = {"num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "model_id": "tiny", "model_fingerprint": "sha256:1"}
    rows = refresh_tables.dps_heads_rows(refresh_tables.cluster_only_rows(batch, model), DPSConfig(per_user=False), clusters=True)
    assert rows.schema.equals(DPS_HEADS_SCHEMA, check_metadata=False)
    assert rows.column("source").to_pylist() == ["cluster", "cluster"]
    assert rows.column("model_fingerprint").to_pylist() == ["sha256:1"] * 2 and rows.column("heads").to_pylist() == [[], []]
    with pytest.raises(ConfigError, match="needs dps.clusters > 0"):
        from_dict(refresh.RefreshConfig, {"inputs": {"preference_pairs": "x"}, "dps": {"per_user": False, "clusters": 0}})


def test_users_rows_keep_the_methods_that_worked_and_quarantine_each_failed_stage():
    from steerstore.schemas.store import USER_ROW_SCHEMA

    pair = {"pair_id": "p", "prompt": "P", "chosen": "C", "rejected": "R", "weight": 1.0}
    item = {"item_id": "h", "input": "I", "output": "O", "timestamp": None}
    dropped = {"kind": "preference_pairs", "source": "pairs.jsonl", "record_id": "p9", "reason": "bad row", "raw": "{}"}

    def row(uid, pairs=0, histories=0, status="ok", reason=None, drops=()):
        return {"user_id": uid, "status": status, "reason": reason, "pairs": [pair] * pairs,
                "histories": [item] * histories, "n_pairs_in": pairs + len(drops), "n_histories_in": histories,
                "dropped": list(drops), "content_fingerprint": f"fp-{uid}", "bucket": 0}

    batch = pa.Table.from_pylist([
        row("both", 2, 3),                      # CAA fails, the history methods work: stored without caa
        row("pairs_only", 2, 0),                # CAA fails and nothing else applies: quarantined
        row("hist_only", 0, 3),                 # DPS and SteerX both fail: quarantined with both reasons
        row("fine", 2, 3, drops=[dropped]),     # nothing fails; one of its rows was dropped in prepare
        row("early", 1, 0, status="quarantined", reason="too few pairs"),
    ], schema=USER_ROW_SCHEMA)
    failed = {"caa": {"both": "caa failed: zero weights", "pairs_only": "caa failed: nan"},
              "dps": {"hist_only": "dps failed: x"}, "steerx": {"hist_only": "steerx failed: y"}}
    eligibility = {"min_pairs": 2, "min_histories": 2, "bt": True, "dps": True, "steerx": True}
    fps = {u: {"caa": "c", "dps": "d", "steerx": "s"} for u in ("both", "fine")}
    users = {r["user_id"]: r for r in refresh_tables.users_rows(batch, failed, eligibility, fps).to_pylist()}
    got = {u: (r["status"], r["methods"], r["reason"]) for u, r in users.items()}
    assert got == {
        "both": ("stored", ["dps", "steerx"], "caa failed: zero weights"),
        "pairs_only": ("quarantined", [], "caa failed: nan"),
        "hist_only": ("quarantined", [], "dps failed: x; steerx failed: y"),
        "fine": ("stored", ["caa", "bt", "dps", "steerx"], None),
        "early": ("quarantined", [], "too few pairs"),
    }
    assert (users["both"]["n_pairs_valid"], users["both"]["n_pairs_used"]) == (2, 0)
    assert users["fine"]["n_pairs_used"] == 2 and users["fine"]["n_pairs_in"] == 3
    assert users["both"]["fingerprints"] == [("dps", "d"), ("steerx", "s")]  # none for the failed family
    assert users["fine"]["fingerprints"] == [("caa", "c"), ("dps", "d"), ("steerx", "s")]

    quarantine = refresh_tables.user_quarantine(batch, failed).to_pylist()
    assert sorted((q["input"], q["user_id"], q["record_id"], q["stage"], q["reason"]) for q in quarantine) == sorted([
        ("user", "both", None, "caa", "caa failed: zero weights"),
        ("user", "pairs_only", None, "caa", "caa failed: nan"),
        ("user", "hist_only", None, "dps", "dps failed: x"),
        ("user", "hist_only", None, "steerx", "steerx failed: y"),
        ("preference_pairs", "fine", "p9", "prepare", "bad row"),
        ("user", "early", None, "prepare", "too few pairs"),
    ])


@pytest.mark.parametrize("size", [1, 2, 5, 40])
def test_an_exact_sample_has_exactly_the_requested_users_whatever_their_order(size):
    from steerstore.jobs.refresh.samples import choose
    from steerstore.operators.bt import sample_key

    cfg = from_dict(refresh.RefreshConfig, {"inputs": {"preference_pairs": "x"}, "dps": {"baseline_users": size}})
    rows = [{"user_id": f"user-{i}", "pairs": [], "histories": [None, None]} for i in range(30)]
    first = choose("dps_baseline", cfg, rows, 30, {}).users
    assert len(first) == min(size, 30)
    assert first == choose("dps_baseline", cfg, rows[::-1], 30, {}).users
    keys = sorted(sample_key(r["user_id"], cfg.dps.seed) for r in rows)
    assert max(sample_key(u, cfg.dps.seed) for u in first) == keys[min(size, 30) - 1]  # the smallest keys


def test_adaptive_gamma_scales_by_entropy_and_is_finite_with_masked_logits():
    from steerstore.operators.runtime import HeadContrast, ModelRuntime

    logits = torch.tensor([[0.0, float("-inf"), 1.0], [3.0, 0.0, 0.0],   # full branch rows
                           [1.0, 0.0, 0.0], [3.0, 0.0, -3.0]])           # masked branch rows
    fixed = ModelRuntime._contrast_score(logits, HeadContrast([[], []], gamma=2.0, plausibility=0.0)).argmax(-1)
    adaptive = ModelRuntime._contrast_score(logits, HeadContrast([[], []], gamma=2.0, adaptive=True,
                                                                 plausibility=0.0)).argmax(-1)
    assert fixed.tolist() == [2, 2] and adaptive.tolist() == [2, 0]  # the confident row 1 is steered less
