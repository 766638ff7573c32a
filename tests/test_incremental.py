"""The incremental refresh: frozen global statistics, unchanged users carried forward, equal to a full recompute."""

import json
import math
import pickle
import shutil

import numpy as np
import pytest

from steerstore.infra import storage
from steerstore.infra.config import from_dict, to_dict
from steerstore.infra.lifecycle import STATE_FOLDER, _drop_state, hashed
from steerstore.infra.store import SteeringStore
from steerstore.jobs import refresh
from steerstore.jobs.refresh.incremental import (
    Previous,
    family_settings,
    finish_plan,
    fingerprints,
    plan_carry,
    plan_globals,
    save_state,
)
from steerstore.schemas.store import STORE_TABLES, USER_ROW_SCHEMA
from tests.test_fleet import STYLES, fleet_config, tables
from tests.tiny import write_jsonl

USERS = 40


def rows(users: list[str], changed_pair: str | None = None, changed_history: str | None = None):
    """Each user's rows depend on the user alone (not on who else is in the input)."""
    style = {u: sum(map(ord, u)) for u in users}
    pairs = [{"user_id": u, "pair_id": f"{u}p{k}", "prompt": f"Tell me about thing {k}.",
              "chosen": f"{STYLES[style[u] % len(STYLES)]} {k}" + (" Changed!" if u == changed_pair and k == 0 else ""),
              "rejected": "Meh. Fine.", "weight": 1.0 + (k % 2)}
             for u in users for k in range(2)]
    histories = [{"user_id": u, "item_id": f"{u}h{k}", "input": f"Write about thing {k}.",
                  "output": f"{STYLES[(style[u] + k) % len(STYLES)]} {k}"
                            + (" Changed!" if u == changed_history and k == 1 else ""), "timestamp": k}
                 for u in users for k in range(3)]
    return pairs, histories


def write_inputs(folder, users, **changes) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    pairs, histories = rows(users, **changes)
    return write_jsonl(folder / "pairs.jsonl", pairs), write_jsonl(folder / "histories.jsonl", histories)


def config(store, model, inputs, **extra):
    cfg = fleet_config(store, model, *inputs, **extra)
    cfg.output.users_per_bucket = 8  # 40 users -> 5 buckets, at least min_buckets 4
    # the basis sample holds every user: no drift between the sample and everyone (the drift rule has its own test)
    cfg.bt.sample_users = 64
    return cfg


def close(a, b, path=""):
    """Equal, floats within what a different batch composition can change (padding, matmul order)."""
    if isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-4 + 1e-3 * abs(b), (path, a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def nights(ray_cluster, tmp_path_factory, tiny_model_folder):
    """Night 1: a full run. Night 2 (5% of users changed): incremental on one copy, full recompute on another."""
    tmp = tmp_path_factory.mktemp("incremental")
    users = [f"user-{i:02d}" for i in range(USERS)]
    model = str(tiny_model_folder)
    first = refresh.main(config(str(tmp / "a"), model, write_inputs(tmp / "night1", users)))
    shutil.copytree(tmp / "a", tmp / "b")
    tonight = [u for u in users if u != "user-11"] + ["user-new"]  # one dropped, one new
    inputs = write_inputs(tmp / "night2", tonight, changed_pair="user-03", changed_history="user-07")
    with Serving(str(tmp / "a")) as serving:  # a long-lived server reads the store while the night publishes
        incremental = refresh.main(config(str(tmp / "a"), model, inputs))
        serving.until(lambda: serving.follower.version == incremental["version"])
    full = refresh.main(config(str(tmp / "b"), model, inputs, incremental={"enabled": False}))
    return {"tmp": tmp, "model": model, "first": first, "incremental": incremental, "full": full,
            "users": tonight, "serving": serving}


class Serving:
    """A thread that looks users up through a ``StoreFollower`` every few milliseconds, as a server does."""

    def __init__(self, uri: str):
        import threading

        from steerstore.infra.follow import StoreFollower

        self.follower = StoreFollower(uri, interval_s=0.05)
        self.seen: list[tuple[str, str, np.ndarray]] = []  # (version, user, CAA vectors)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            try:
                reader = self.follower.current()
                for user in ("user-03", "user-05"):
                    self.seen.append((reader.version, user, reader.artifacts(user).caa.vectors))
            except BaseException as exc:  # noqa: BLE001
                self.errors.append(exc)
            self._stop.wait(0.02)

    def until(self, condition, timeout_s: float = 10.0):
        import time

        end = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < end:
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


@pytest.mark.slow
def test_an_incremental_night_computes_only_the_changed_users_and_stores_what_a_full_recompute_does(nights):
    first, inc, full = nights["first"], nights["incremental"], nights["full"]
    assert first["incremental"]["from_version"] is None
    assert {f: d["action"] for f, d in first["incremental"]["global_statistics"].items()} == \
        {"caa": "computed", "dps": "computed", "steerx": "computed"}
    # the statistics were frozen in both second nights: the same population, basis, α, clusters, pool
    for summary in (inc, full):
        stats = summary["incremental"]["global_statistics"]
        assert {f: (d["action"], d["computed_in"], d["runs"]) for f, d in stats.items()} == \
            {f: ("frozen", first["version"], 2) for f in ("caa", "dps", "steerx")}
    # model work: exactly the changed and the new users, per family
    assert inc["workers"]["users_computed"] == {"caa": 2, "dps": 2, "steerx": 2}, inc["workers"]
    assert inc["incremental"]["users"] == {
        "caa": {"carried": USERS - 2, "recomputed": 1, "new": 1},  # user-03's pairs changed
        "dps": {"carried": USERS - 2, "recomputed": 1, "new": 1},  # user-07's histories changed
        "steerx": {"carried": USERS - 2, "recomputed": 1, "new": 1}}
    assert inc["incremental"]["users_dropped"] == 1 and inc["incremental"]["dropped_by_method"]["caa"] == 1
    assert full["workers"]["users_computed"]["caa"] == USERS and full["incremental"]["from_version"] is None
    # and the store is the full recompute's
    got, want = tables(str(nights["tmp"] / "a")), tables(str(nights["tmp"] / "b"))
    for name in STORE_TABLES:
        assert len(got[name]) == len(want[name]), name
        close(got[name], want[name], name)
    assert {r["user_id"] for r in got["users"]} == set(nights["users"])
    for key in ("users_in", "users_stored", "users_quarantined", "users_by_method", "rows_kept"):
        assert inc[key] == full[key], key


@pytest.mark.slow
def test_a_server_following_the_store_switches_to_the_new_night_and_serves_each_lookup_from_one_version(nights, capsys):
    from steerstore.infra.reader import StoreReader
    from steerstore.operators.runtime import ModelConfig, ModelRuntime
    from steerstore.operators.serving import Request, personalised_generate

    serving, store = nights["serving"], str(nights["tmp"] / "a")
    old, new = nights["first"]["version"], nights["incremental"]["version"]
    assert not serving.errors, serving.errors
    versions = [v for v, _, _ in serving.seen]
    assert versions[0] == old and versions[-1] == new and set(versions) == {old, new}
    assert versions == sorted(versions, key=[old, new].index)  # never back to the old one
    assert [s[:2] for s in serving.follower.switches] == [(old, new)]
    truth = {v: StoreReader(store, version=v) for v in (old, new)}
    for version, user, vectors in serving.seen:
        np.testing.assert_array_equal(vectors, truth[version].artifacts(user).caa.vectors)
    # user-03's pairs changed that night: the server's answer for it follows the new version
    assert not np.allclose(truth[old].artifacts("user-03").caa.vectors, truth[new].artifacts("user-03").caa.vectors)
    runtime = ModelRuntime(ModelConfig(name_or_path=nights["model"]))
    request = [Request("user-03", "Tell me about thing 1.", method="caa")]
    via_follower = personalised_generate(runtime, None, request, serving.follower, max_new_tokens=6)
    assert via_follower[0].version == new
    assert [s.text for s in via_follower] == [s.text for s in personalised_generate(runtime, None, request, truth[new],
                                                                                   max_new_tokens=6)]


@pytest.mark.slow
def test_absent_users_are_kept_when_the_input_holds_only_users_with_new_data(nights):
    tmp, model = nights["tmp"], nights["model"]
    store = str(tmp / "a")
    before = tables(store)
    only = ["user-03", "user-20"]  # tonight's input: two users, user-20 with a new history item text
    summary = refresh.main(config(store, model, write_inputs(tmp / "night3", only, changed_pair="user-03",
                                                             changed_history="user-20"),
                                  incremental={"absent_users": "keep"}))
    after = tables(store)
    assert summary["users_in"] == 2 and summary["users_kept_absent"] == USERS - 2
    assert summary["users_stored"] == USERS
    assert summary["workers"]["users_computed"] == {"dps": 1, "steerx": 1}  # user-20's histories only
    assert summary["incremental"]["users"]["caa"] == {"carried": 2, "recomputed": 0, "new": 0}
    assert summary["incremental"]["users"]["dps"] == {"carried": 1, "recomputed": 1, "new": 0}
    assert summary["incremental"]["users_dropped"] == 0 and summary["incremental"]["users_kept_absent"] == USERS - 2
    for name in ("vectors", "bt_coords", "dps_heads", "steerx_users", "steerx_token_effects"):
        keep = [r for r in before[name] if r.get("user_id") not in (None, "user-20")]
        close([r for r in after[name] if r.get("user_id") not in (None, "user-20")], keep, name)
    assert {r["user_id"] for r in after["users"]} == {r["user_id"] for r in before["users"]}
    assert {r["user_id"] for r in after["quarantine"]} <= set(only)  # tonight's input only


@pytest.mark.slow
def test_statistics_are_recomputed_on_schedule_and_then_every_user_is(nights, tmp_path):
    tmp, model = nights["tmp"], nights["model"]
    shutil.copytree(tmp / "b", tmp_path / "c")
    summary = refresh.main(config(str(tmp_path / "c"), model, write_inputs(tmp_path / "in", nights["users"]),
                                  incremental={"refresh_globals_after": 2}))
    stats = summary["incremental"]["global_statistics"]
    assert all(d["action"] == "computed" and d["reason"].startswith("scheduled") for d in stats.values()), stats
    assert summary["incremental"]["users"]["caa"]["carried"] == 0
    assert summary["workers"]["users_computed"]["caa"] == len(nights["users"])


# ---- fast: the decisions, without Ray ----------------------------------------------------------------

def _config(**extra):
    return from_dict(refresh.RefreshConfig, {"inputs": {"preference_pairs": "x", "histories": "y"}, **extra})


def _state(config, g, runs=1, computed_in="v000001-a"):
    decisions = {f: {"settings": family_settings(config, f, g), "computed_in": computed_in, "runs": runs,
                     "action": "computed"} for f in ("caa", "dps", "steerx")}
    return {"population_mean": np.ones((2, 4), np.float32), "dps_population": object(),
            "dps_centroids": np.ones((2, 3)), "steerx_pool": [{"user_id": "ann"}],
            "steerx_recommended": {"history": {}}, "globals": finish_plan(decisions, computed_in, {}), "samples": {}}


def test_global_statistics_are_frozen_until_due_and_recomputed_for_each_reason():
    cfg = _config()
    g = {"model": {"model_fingerprint": "m1"}, "smoothing_fingerprint": "s1"}
    active = {"caa": True, "dps": True, "steerx": True}
    prev = Previous("v000001-a", {"summary": {"population_drift": {"cosine_min": 0.99}}}, _state(cfg, g))
    frozen, decisions = plan_globals(cfg, prev, g, active)
    assert set(frozen) == {"caa", "dps", "steerx"} and decisions["caa"]["runs"] == 2
    assert np.array_equal(frozen["caa"]["population_mean"], prev.state["population_mean"])

    def reason(config=cfg, previous=prev, g=g):
        return {f: d.get("reason") for f, d in plan_globals(config, previous, g, active)[1].items()}

    assert set(reason(previous=None).values()) == {"no previous version"}
    assert reason(config=_config(incremental={"freeze_globals": False}))["caa"] == "incremental.freeze_globals is false"
    changed = reason(config=_config(dps={"top_k": 3}))  # one family's settings: only its statistics
    assert changed["dps"] == "its settings or the model changed" and changed["caa"] is None and changed["steerx"] is None
    # how history is shown in the composed condition: the α choice (caa) and SteerX's calibration, not DPS
    changed = reason(config=_config(scale={"history_items": 3}))
    assert changed["caa"] == changed["steerx"] == "its settings or the model changed" and changed["dps"] is None
    assert reason(config=_config(scale={"grid": [1.0, 2.0]}))["steerx"] is None  # the α grid is CAA's alone
    other_model = reason(g={"model": {"model_fingerprint": "m2"}, "smoothing_fingerprint": "s1"})
    assert all(r == "its settings or the model changed" for r in other_model.values())
    smoothing = reason(g={"model": {"model_fingerprint": "m1"}, "smoothing_fingerprint": "s2"})
    assert smoothing["steerx"] and not smoothing["caa"]
    due = Previous(prev.version, prev.manifest, _state(cfg, g, runs=7))
    assert all(r.startswith("scheduled") for r in reason(previous=due).values())
    drifted = Previous(prev.version, {"summary": {"population_drift": {"cosine_min": 0.5}}}, prev.state)
    assert reason(previous=drifted)["caa"].startswith("the population drifted") and reason(previous=drifted)["dps"] is None
    empty = Previous(prev.version, prev.manifest, {**prev.state, "population_mean": None})
    assert "no caa statistics" in reason(previous=empty)["caa"]
    assert set(reason(previous=Previous(prev.version, prev.manifest, None)).values()) == \
        {f"version {prev.version} kept no {f} statistics" for f in ("caa", "dps", "steerx")}


def test_a_fingerprint_changes_with_the_familys_own_rows_settings_and_statistics_only():
    import pyarrow as pa

    cfg = _config()
    g = {"model": {"model_fingerprint": "m1"}, "smoothing_fingerprint": "s1",
         "globals": finish_plan({f: {"settings": "x", "computed_in": None} for f in ("caa", "dps", "steerx")}, "v1", {})}

    def fps(pairs_text="a", history_text="b", g=g, config=cfg):
        row = {"user_id": "ann", "status": "ok", "pairs": [{"pair_id": "p", "prompt": "q", "chosen": pairs_text,
                                                           "rejected": "r", "weight": 1.0}],
               "histories": [{"item_id": "h", "input": "i", "output": history_text, "timestamp": None}]}
        return fingerprints(pa.Table.from_pylist([row], schema=USER_ROW_SCHEMA), config, g)["ann"]

    base = fps()
    assert base == fps() and set(base) == {"caa", "dps", "steerx"}
    new_pairs, new_history = fps(pairs_text="c"), fps(history_text="d")
    assert new_pairs["caa"] != base["caa"] and new_pairs["dps"] == base["dps"] and new_pairs["steerx"] == base["steerx"]
    assert new_history["caa"] == base["caa"] and new_history["dps"] != base["dps"]
    other = {**g, "globals": {**g["globals"], "dps": {**g["globals"]["dps"], "id": "other"}}}
    assert fps(g=other)["dps"] != base["dps"] and fps(g=other)["caa"] == base["caa"]
    assert fps(config=_config(output={"vector_dtype": "float16"}))["caa"] != base["caa"]


def test_carry_takes_only_unchanged_users_whose_family_was_stored_and_counts_the_rest():
    import pyarrow as pa

    users = pa.table({"user_id": ["ann", "ben", "cat", "dan"], "status": ["stored", "stored", "stored", "quarantined"],
                      "methods": [["caa", "bt"], ["caa", "bt", "dps"], ["dps"], []],
                      "fingerprints": pa.array([[("caa", "1")], [("caa", "2"), ("dps", "3")], [("dps", "4")], []],
                                               pa.map_(pa.string(), pa.string()))})
    fps = {"ann": {"caa": "1", "dps": "x"}, "ben": {"caa": "changed", "dps": "3"}, "eve": {"caa": "5"}}
    eligible = {"caa": {"ann", "ben", "eve"}, "dps": {"ann", "ben"}}
    carried, kept, counts = plan_carry({"users": users}, fps, eligible, {"ann", "ben", "eve"}, "drop", frozenset())
    assert carried == {"caa": {"ann"}, "dps": {"ben"}} and kept == set()
    assert counts["families"] == {"caa": {"carried": 1, "recomputed": 1, "new": 1},
                                  "dps": {"carried": 1, "recomputed": 1, "new": 0}}
    assert counts["dropped"] == 2 and counts["dropped_by_method"] == {"dps": 1}
    _, kept, counts = plan_carry({"users": users}, fps, eligible, {"ann", "ben", "eve"}, "keep",
                                 frozenset({hashed("nobody")}))
    assert kept == {"cat"} and counts["kept_absent"] == 1 and counts["dropped"] == 1  # dan had nothing stored
    _, kept, _ = plan_carry({"users": users}, fps, eligible, {"ann", "ben", "eve"}, "keep", frozenset({hashed("cat")}))
    assert kept == set()


def test_forgetting_a_user_held_by_the_saved_statistics_deletes_them(tmp_path):
    store = SteeringStore(str(tmp_path / "store"))
    g = {"caa_sample": ["ann"], "steerx_pool": [{"user_id": "ben", "output": "ben's text"}], "carry": {"x": 1}}
    save_state(store, "v000001-a", g)
    folder = storage.join(store.version_uri("v000001-a"), STATE_FOLDER)
    saved = pickle.loads(storage.read_bytes(storage.join(folder, "globals.pkl")))
    assert "carry" not in saved and saved["steerx_pool"][0]["user_id"] == "ben"
    listed = json.loads(storage.read_text(storage.join(folder, "users.json")))
    assert sorted(listed) == sorted([hashed("ann"), hashed("ben")]) and "ben" not in json.dumps(listed)
    assert not _drop_state(store, "v000001-a", {hashed("cat")})
    assert storage.exists(storage.join(folder, "globals.pkl"))
    assert _drop_state(store, "v000001-a", {hashed("ben")})
    assert not storage.exists(storage.join(folder, "globals.pkl"))


def test_the_incremental_settings_are_checked_and_travel_through_the_config_file():
    from steerstore.infra.config import ConfigError

    cfg = _config(incremental={"absent_users": "keep", "refresh_globals_after": 3})
    assert from_dict(refresh.RefreshConfig, to_dict(cfg)).incremental.absent_users == "keep"
    with pytest.raises(ConfigError):
        _config(incremental={"refresh_globals_after": 0})


def test_statistics_ids_depend_on_their_values_not_on_the_run_that_computed_them():
    import pyarrow as pa

    from steerstore.jobs.refresh.incremental import content_digest

    g = {"population_mean": np.arange(6, dtype=np.float32).reshape(2, 3), "scales": {"caa": 4.0},
         "dps_population_table": pa.table({"x": [1, 2]}), "caa_sample": ["ann", "ben"]}
    same = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in g.items()}
    assert content_digest(g) == content_digest(same)
    moved = {**g, "population_mean": g["population_mean"] + np.float32(1e-6)}
    assert content_digest(moved) != content_digest(g)
    assert content_digest({**g, "scales": {"caa": 2.0}}) != content_digest(g)
    a = finish_plan({"caa": {"settings": "s", "computed_in": None}}, "v000001-a", g)
    b = finish_plan({"caa": {"settings": "s", "computed_in": None}}, "v000009-b", same)
    assert a["caa"]["id"] == b["caa"]["id"] and a["caa"]["computed_in"] != b["caa"]["computed_in"]


def test_a_kept_absent_user_keeps_only_the_families_whose_statistics_stay_frozen():
    import pyarrow as pa

    from steerstore.jobs.refresh.incremental import carried_rows
    from steerstore.schemas.store import USERS_SCHEMA

    users = pa.Table.from_pylist([
        {"user_id": "ann", "status": "stored", "methods": ["caa", "bt", "dps"],
         "fingerprints": [("caa", "1"), ("dps", "2")]},
        {"user_id": "cat", "status": "stored", "methods": ["dps"], "fingerprints": [("dps", "4")]},
    ], schema=USERS_SCHEMA)
    bt = pa.table({"user_id": ["ann"], "theta": [[0.1, 0.2]]})
    dps = pa.table({"user_id": ["ann", "cat"], "cluster": [0, 1]})
    previous = {"users": users, "bt_coords": bt, "dps_heads": dps}
    # tonight recomputes the DPS statistics (new clusters): last night's routing means nothing against them
    carried, kept, counts = plan_carry(previous, {}, {}, set(), "keep", frozenset(), frozenset({"caa"}))
    assert kept == {"ann"} and counts["kept_absent"] == 1 and counts["dropped"] == 1
    assert counts["dropped_by_method"] == {"dps": 2}
    rows = carried_rows(previous, carried, kept, None, frozenset({"caa"}))
    assert rows["bt_coords"].column("user_id").to_pylist() == ["ann"] and "dps_heads" not in rows
    (ann,) = rows["users"].to_pylist()
    assert ann["methods"] == ["caa", "bt"] and ann["fingerprints"] == [("caa", "1")]


def test_a_frozen_familys_decision_carries_no_stale_reason():
    cfg = _config()
    g = {"model": {"model_fingerprint": "m1"}, "smoothing_fingerprint": "s1"}
    state = _state(cfg, g)
    for d in state["globals"].values():
        d["reason"] = "no previous version"  # how the night that computed them recorded it
    _, decisions = plan_globals(cfg, Previous("v000001-a", {"summary": {}}, state), g,
                                {"caa": True, "dps": True, "steerx": True})
    assert all(d["action"] == "frozen" and d["reason"] is None for d in decisions.values())
