"""Nightly operations: the publish guard, per-user vector checks (and, below, what keeps a bad night off serving)."""

import json

import numpy as np
import pyarrow as pa
import pytest

from steerstore.infra.reader import StoreReader
from steerstore.infra.store import SteeringStore
from steerstore.jobs import refresh
from steerstore.jobs.refresh.guard import PublishConfig, refusals, vector_problems
from tests.test_refresh import config, pair, write_jsonl


def _vectors(rows):
    return pa.table({"user_id": [u for u, _ in rows],
                     "vectors": pa.array([v for _, v in rows], pa.list_(pa.list_(pa.float32())))})


def test_vectors_that_are_not_finite_or_far_beyond_the_population_are_named_per_user():
    table = _vectors([("ok", [[3.0, 4.0], [0.0, 1.0]]), ("nan", [[np.nan, 0.0], [0.0, 1.0]]),
                      ("inf", [[1.0, 0.0], [np.inf, 1.0]]), ("huge", [[0.0, 1.0], [600.0, 800.0]]),
                      ("overflow", [[1e30, 1e30], [0.0, 1.0]])])
    problems = vector_problems(table, np.array([5.0, 1.0]), 100.0, "caa")
    assert set(problems) == {"nan", "inf", "huge", "overflow"}
    assert "not finite" in problems["nan"] and "not finite" in problems["inf"]
    assert "at its layer 1 is 1e+03x the population" in problems["huge"]
    assert vector_problems(table.slice(0, 1), np.array([5.0, 1.0]), 100.0, "caa") == {}
    assert set(vector_problems(table.slice(1, 3), None, 100.0, "caa")) == {"nan", "inf"}  # a slice; no range check
    styles = pa.table({"user_id": ["a", "b"], "vectors": pa.array([[[[1.0]], [[2.0]]], [[[1.0]], [[np.nan]]]])})
    assert set(vector_problems(styles, None, 100.0, "steerx")) == {"b"}  # per source, per layer


def test_the_guard_refuses_empty_versions_collapses_and_quarantine_surges_against_the_current_version():
    limits = PublishConfig()
    before = {"users_in": 1000, "users_stored": 990, "users_quarantined": 10,
              "users_by_method": {"caa": 990, "bt": 990, "dps": 900}}
    same = dict(before, input_rows=5000)
    assert refusals(same, before, limits) == []
    assert refusals(same, None, limits) == []  # the first version
    empty = {"users_in": 0, "users_stored": 0, "users_quarantined": 0, "users_by_method": {}, "input_rows": 0}
    assert any("stores 0 users" in r for r in refusals(empty, None, limits))
    assert len(refusals(empty, before, limits)) == 5  # min users, users drop, caa, bt and dps drops
    dps_gone = dict(same, users_by_method={"caa": 990, "bt": 990, "dps": 100})
    assert refusals(dps_gone, before, limits) == ["dps users fell from 900 to 100 (more than "
                                                  "publish.max_method_drop=0.3)"]
    assert refusals(dps_gone, before, PublishConfig(max_method_drop=0.95)) == []
    surge = dict(same, users_in=1000, users_stored=800, users_quarantined=200,
                 users_by_method={"caa": 800, "bt": 800, "dps": 800})
    assert refusals(surge, before, limits) == ["the share of users quarantined rose from 1.0% to 20.0% "
                                               "(more than publish.max_quarantine_rise=0.1)"]
    assert refusals(same, before, limits, population_finite=False) == ["the population direction is not finite"]


@pytest.mark.slow
def test_a_refused_version_stays_unpublished_and_force_publishes_it_without_recomputing(ray_cluster, tmp_path,
                                                                                        tiny_model_folder, capsys):
    from steerstore.jobs import cli

    users = [f"u{i}" for i in range(4)]
    first = write_jsonl(tmp_path / "night1.jsonl", [pair(u, f"{u}-{k}", k) for u in users for k in range(2)])
    good = refresh.main(config(tmp_path, tiny_model_folder, first))["version"]
    store = SteeringStore(str(tmp_path / "store"))
    # night 2: three of the four users lose a pair (too few for CAA): the caa and bt counts collapse
    second = write_jsonl(tmp_path / "night2.jsonl", [pair("u0", "u0-0", 0), pair("u0", "u0-1", 1)]
                         + [pair(u, f"{u}-0", 0) for u in users[1:]])
    cfg = config(tmp_path, tiny_model_folder, second)
    with pytest.raises(refresh.PublishRefused) as refused:
        refresh.main(cfg)
    assert store.latest() == good and store.versions() == [good]
    report = json.loads((tmp_path / "store" / "reports" / f"{refused.value.version}.json").read_text())
    assert report["status"] == "refused" and report["current_version"] == good
    assert report["reasons"] == ["users stored fell from 4 to 1 (more than publish.max_users_drop=0.2)",
                                 "bt users fell from 4 to 1 (more than publish.max_method_drop=0.3)",
                                 "caa users fell from 4 to 1 (more than publish.max_method_drop=0.3)",
                                 "the share of users quarantined rose from 0.0% to 75.0% (more than "
                                 "publish.max_quarantine_rise=0.1)"]
    # the command line says so with its own exit status
    import yaml

    from steerstore.infra.config import to_dict

    (tmp_path / "night2.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    args = ["refresh", "--config", str(tmp_path / "night2.yaml")]
    assert cli.main(args) == 3
    assert "publish refused" in capsys.readouterr().err and store.latest() == good
    # forced: the same run resumes (no shard computed again) and publishes
    cfg.publish.force = True
    summary = refresh.main(cfg)
    assert summary["version"] == refused.value.version and summary["shards_computed"] == 0
    assert summary["forced_past"] == report["reasons"] and store.latest() == summary["version"]
    assert set(StoreReader(store.uri).vectors(users)) == {"u0"}


@pytest.mark.slow
def test_an_empty_input_never_replaces_the_current_version(ray_cluster, tmp_path, tiny_model_folder):
    first = write_jsonl(tmp_path / "night1.jsonl", [pair("u", f"p{k}", k) for k in range(2)])
    good = refresh.main(config(tmp_path, tiny_model_folder, first))["version"]
    empty = tmp_path / "night2.jsonl"
    empty.write_text("")
    no_columns = write_jsonl(tmp_path / "night3.jsonl", [{"id": k, "text": "no user column"} for k in range(3)])
    for inputs in (str(empty), no_columns):
        with pytest.raises(refresh.PublishRefused, match="stores 0 users"):
            refresh.main(config(tmp_path, tiny_model_folder, inputs))
    store = SteeringStore(str(tmp_path / "store"))
    assert store.latest() == good and store.versions() == [good]
    assert StoreReader(store.uri).vectors(["u"])["u"].n_pairs == 2


@pytest.mark.slow
def test_a_refresh_that_fails_part_way_leaves_latest_and_running_readers_on_the_previous_version(
        ray_cluster, tmp_path, tiny_model_folder, monkeypatch):
    from steerstore.infra.follow import StoreFollower

    users = [f"u{i}" for i in range(4)]
    output = {"store": str(tmp_path / "store"), "users_per_bucket": 1, "min_buckets": 4}  # several shards a night
    first = write_jsonl(tmp_path / "night1.jsonl", [pair(u, f"{u}-{k}", k) for u in users for k in range(2)])
    good = refresh.main(config(tmp_path, tiny_model_folder, first, output=output))["version"]
    store = SteeringStore(output["store"])
    night1 = {u: v.vectors.copy() for u, v in StoreReader(store.uri).vectors(users).items()}
    assert set(night1) == set(users)
    reader = StoreReader(store.uri)  # a serving process's reader, open across the failed night
    np.testing.assert_array_equal(reader.vectors(["u0"])["u0"].vectors, night1["u0"])  # u0 now in its cache
    follower = StoreFollower(store.uri, interval_s=0.0)  # a serving process that follows LATEST

    # night 2: every user prefers the other answer now; the model pass dies after its first shard is written
    swapped = {"chosen": "Noted. Brief and formal.", "rejected": "Wow, I absolutely love it!"}
    second = write_jsonl(tmp_path / "night2.jsonl",
                         [pair(u, f"{u}-{k}", k, **swapped) for u in users for k in range(2)])
    real_run_shards, failed = refresh.run_shards, []

    def dies_after_one_shard(cfg, run, buckets, *args, **kwargs):
        result = real_run_shards(cfg, run, buckets[:1], *args, **kwargs)
        failed.append((run.version, len(buckets), result["computed"]))
        raise RuntimeError("the model workers were lost")

    monkeypatch.setattr(refresh, "run_shards", dies_after_one_shard)
    with pytest.raises(RuntimeError, match="the model workers were lost"):
        refresh.main(config(tmp_path, tiny_model_folder, second, output=output))
    [(version, planned, computed)] = failed
    assert version != good and computed == 1 and planned > 1  # it failed part-way, one night-2 shard written
    assert store.latest() == good and store.versions() == [good]
    assert follower.current().version == good and not follower.check()
    for open_reader in (reader, follower.current(), StoreReader(store.uri)):
        assert open_reader.version == good
        got = open_reader.vectors(users)
        assert set(got) == set(users)
        for u in users:
            np.testing.assert_array_equal(got[u].vectors, night1[u])

    # the same night rerun: it resumes the failed version and publishes it; the changed users' vectors change
    monkeypatch.undo()
    summary = refresh.main(config(tmp_path, tiny_model_folder, second, output=output))
    assert summary["version"] == version and summary["shards_reused"] >= 1
    assert store.latest() == version and store.versions() == [good, version]
    assert follower.check() and follower.current().version == version
    now = StoreReader(store.uri).vectors(users)
    for u in users:
        assert not np.allclose(now[u].vectors, night1[u], atol=1e-3), u
    np.testing.assert_array_equal(reader.vectors(["u1"])["u1"].vectors, night1["u1"])  # pinned to its version


def test_a_users_weights_are_scaled_to_mean_one_so_no_user_outweighs_another():
    from steerstore.operators.caa import pair_weights

    np.testing.assert_allclose(pair_weights([{"weight": 1000.0}, {"weight": 1000.0}]), [1.0, 1.0])
    np.testing.assert_allclose(pair_weights([{"weight": 3.0}, {"weight": 1.0}, {}]), [1.8, 0.6, 0.6])
    np.testing.assert_allclose(pair_weights([{"weight": 0.0}, {"weight": 0.0}]), [0.0, 0.0])


def _bad_corpus(folder):
    """Input files with every kind of bad row we know of; returns {(user, record id) or marker: reason part}."""
    import gzip

    import pyarrow.parquet as pq

    pairs = folder / "pairs"
    pairs.mkdir(parents=True)

    def line(user, pid, k=0, **change):
        return json.dumps(pair(user, pid, k, **change), ensure_ascii=False).encode()

    good = [line(u, f"{u}-{k}", k) for u in ("ann", "ben", "cat") for k in range(2)]
    rows = good + [
        line("ann", "ann-utf").replace(b"Wow", b"W\xffow"),                 # invalid UTF-8 inside a string
        line("ann", "ann-bigint").replace(b'"weight": 1.0', b'"weight": ' + b"9" * 400),   # int beyond a float
        line("ann", "ann-hugeint").replace(b'"weight": 1.0', b'"weight": ' + b"9" * 5000),  # beyond int parsing
        line("ben", "ben-1e308", weight=1e308), line("ben", "ben-1e308b", weight=1e308),   # would overflow a mean
        line("ben", "ben-1e6", weight=1e6),                                   # beyond validate.max_weight
        line("cat", "cat-surrogate").replace(b"Wow", b"\\ud800 Wow"),         # a lone surrogate (JSON escape)
        b'{"user_id": "\\udfff", "pair_id": "x", "prompt": "p", "chosen": "a", "rejected": "b"}',  # in the id
        b"[" * 100_000 + b"]" * 100_000,                                     # nesting deeper than the parser
        line("dan", "dan-0", chosen="One\u2028two."),  # U+2028 inside a string
        line("dan", "dan-1", 1) + b"\r",                                      # CRLF line end
        b'"just a string"',
    ]
    (pairs / "a.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (pairs / "b.data").write_bytes(gzip.compress(b"\n".join(line("gz", f"gz-{k}", k) for k in range(2))))  # no .gz
    (pairs / "c.jsonl.gz").write_bytes(gzip.compress(b"\n".join(line("eve", f"eve-{k}", k) for k in range(40)))[:300])
    pq.write_table(pa.table({"user_id": ["fay", "fay"], "pair_id": ["fay-0", "fay-1"], "prompt": ["P0", "P1"],
                             "chosen": ["Yes!", "Sure!"], "rejected": ["No.", "Nope."], "weight": [1.0, 2.0]}),
                   pairs / "d.parquet")
    pq.write_table(pa.table({"user_id": [7], "pair_id": [1], "prompt": ["P"], "chosen": ["A"], "rejected": ["B"],
                             "weight": ["heavy"]}), pairs / "e.parquet")  # every column of another type
    (pairs / "_SUCCESS").write_text("")
    histories = folder / "histories.jsonl"
    hist = [{"user_id": u, "item_id": f"{u}-h{k}", "input": "Write.", "output": f"Text {k} of {u}.",
             "timestamp": 1_700_000_000} for u in ("ann", "ben") for k in range(2)]
    hist += [{"user_id": "ann", "item_id": "ann-ns", "input": "Write.", "output": "Nanoseconds.",
              "timestamp": 1_700_000_000_000_000_000}]
    histories.write_text("\n".join(json.dumps(h) for h in hist) + "\n")
    return str(pairs), str(histories)


@pytest.mark.slow
def test_no_bad_row_kills_the_night_each_lands_in_quarantine_with_its_reason(ray_cluster, tmp_path,
                                                                            tiny_model_folder):
    pairs, histories = _bad_corpus(tmp_path / "in")
    summary = refresh.main(config(tmp_path, tiny_model_folder, pairs, histories))
    assert summary["rows_kept"] + summary["rows_quarantined"] == summary["input_rows"]
    assert summary["users_stored"] + summary["users_quarantined"] == summary["users_in"]
    reader = StoreReader(str(tmp_path / "store"))
    stored = reader.vectors(["ann", "ben", "cat", "dan", "gz", "fay"])
    assert set(stored) == {"ann", "ben", "cat", "dan", "gz", "fay"}
    assert stored["dan"].n_pairs == 2 and stored["gz"].n_pairs == 2 and stored["ann"].n_pairs == 2
    for v in stored.values():
        assert np.isfinite(np.asarray(v.vectors)).all()
    q = reader.store.read_table("quarantine", reader.version).to_pylist()
    reasons = {(r["user_id"], r["record_id"]): r["reason"] for r in q}
    expect = {
        ("ann", "ann-utf"): "invalid UTF-8 (byte 0xff",
        ("ann", "ann-bigint"): "got an integer of 1329 bits",
        ("ben", "ben-1e308"): "a number in [0, 1000], got 1e+308",
        ("ben", "ben-1e6"): "a number in [0, 1000], got 1000000.0",
        ("cat", "cat-surrogate"): "field 'chosen' is not valid Unicode (a lone surrogate)",
        ("ann", "ann-ns"): "out of range: epoch seconds between 1900 and 2200",
        ("fay", None): None,
    }
    for key, part in expect.items():
        if part is None:
            assert key not in reasons
        else:
            assert part in reasons[key], (key, reasons.get(key))
    unattributed = [r["reason"] for r in q if r["user_id"] is None]
    for part in ("invalid JSON: ValueError: Exceeds the limit", "invalid JSON: RecursionError",
                 "row is a JSON str", "file unreadable after row", "field 'user_id' must be a string, got int"):
        assert any(part in r for r in unattributed), (part, unattributed)
    sources = {r["source"] for r in q if r["record_id"] == "ann-utf"}
    assert sources == {str(tmp_path / "in" / "pairs" / "a.jsonl") + ":7"}
    assert all(r["raw"] is not None for r in q if r["input"] != "user")


# ---------------------------------------------------------------------------------------------
# one writer at a time: conditional writes, the lease, version order that ignores clocks

@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root"), None
    from tests.s3server import S3Server

    server = S3Server().__enter__()
    request.addfinalizer(lambda: server.__exit__(None, None, None))
    server.create_bucket("ops")
    return "s3://ops/store", server.storage_config()


def test_conditional_writes_create_once_and_replace_only_what_was_read(root):
    from steerstore.infra import conditional, storage

    uri, cfg = root
    target = storage.join(uri, "_lease.json")
    assert conditional.read_tagged(target, cfg) is None
    tag = conditional.write_if(target, b"first", None, cfg)
    with pytest.raises(conditional.PreconditionFailed):
        conditional.write_if(target, b"second", None, cfg)  # exists already
    data, seen = conditional.read_tagged(target, cfg)
    assert data == b"first" and seen == tag
    new = conditional.write_if(target, b"second", seen, cfg)
    with pytest.raises(conditional.PreconditionFailed):
        conditional.write_if(target, b"third", seen, cfg)  # changed since it was read
    assert conditional.read_tagged(target, cfg) == (b"second", new)


def test_one_lease_holder_at_a_time_a_released_lease_is_taken_at_once_and_a_dead_ones_after_its_ttl(root):
    from steerstore.infra.lease import LeaseConfig, LeaseHeld, LeaseLost, StoreLease

    uri, cfg = root
    quick = LeaseConfig(ttl_s=1.0, wait_s=0.3, poll_s=0.05)
    first = StoreLease(uri, cfg, quick).acquire()
    with pytest.raises(LeaseHeld, match="held by"):  # renewed every 0.2 s: never stale while waiting
        StoreLease(uri, cfg, quick).acquire()
    first.release()
    with StoreLease(uri, cfg, quick) as second:  # released: taken at once
        second.check()
    # a holder that died (no heartbeat, no release): taken over once unchanged for ttl_s
    dead = StoreLease(uri, cfg, LeaseConfig(ttl_s=0.5, wait_s=0.0, poll_s=0.05)).acquire()
    dead._stop.set()
    dead._thread.join()
    successor = StoreLease(uri, cfg, LeaseConfig(ttl_s=0.5, wait_s=5.0, poll_s=0.05)).acquire()
    with pytest.raises(LeaseLost, match="taken over by another job"):
        dead.check()  # the dead holder, back to life, must not publish
    successor.release()


def test_versions_are_ordered_by_sequence_so_a_driver_clock_ahead_cannot_pin_latest(root):
    from datetime import datetime, timezone

    uri, cfg = root
    store = SteeringStore(uri, cfg)
    future = store.next_version_id(datetime(2031, 1, 1, tzinfo=timezone.utc))  # a driver clock years ahead
    store.publish(future, {"tables": {}})
    right = store.next_version_id(datetime(2026, 11, 27, tzinfo=timezone.utc))
    assert future.startswith("v000001-2031") and right.startswith("v000002-2026")
    store.publish(right, {"tables": {}})
    assert store.latest() == right
    old = "20261120T000000Z-abcdef"  # an id of the timestamp-only format sorts before every sequenced id
    store.publish(old, {"tables": {}})
    assert store.latest() == right


def test_two_writers_publishing_at_once_leave_latest_at_the_newer_version(tmp_path, monkeypatch):
    """Forty publishes, newest first, in threads that read LATEST and then swap it together (plain writes fail this)."""
    import threading

    import steerstore.infra.store as store_module
    from steerstore.infra import conditional

    store = SteeringStore(str(tmp_path / "store"))
    ids = [f"v{n:06d}-x" for n in range(1, 41)]
    real = conditional.write_if
    barrier = threading.Barrier(8)

    def slow_write_if(*args, **kwargs):  # every writer reads LATEST, then they all try to swap it at once
        try:
            barrier.wait(timeout=0.2)
        except threading.BrokenBarrierError:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "write_if", slow_write_if)
    threads = [threading.Thread(target=store.publish, args=(v, {"tables": {}})) for v in reversed(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.latest() == max(ids)


# ---------------------------------------------------------------------------------------------
# retention and forgetting

def test_retention_keeps_the_newest_versions_and_latest_and_deletes_stale_unfinished_ones(tmp_path):
    from steerstore.infra import storage
    from steerstore.infra.lifecycle import RetentionConfig, prune

    store = SteeringStore(str(tmp_path / "store"))
    versions = [store.next_version_id() for _ in range(1)]
    store.publish(versions[0], {"tables": {}})
    for _ in range(4):
        v = store.next_version_id()
        store.publish(v, {"tables": {}})
        versions.append(v)
    unfinished = store.next_version_id()
    storage.write_text(storage.join(store.version_uri(unfinished), "_staging", "shards.json"), "{}")
    storage.write_text(storage.join(store.uri, "runs", "k.json"), json.dumps({"version": unfinished}))
    kept = prune(store, RetentionConfig(keep_versions=2, unfinished_grace_s=3600))
    assert kept == {"deleted_versions": versions[:3], "deleted_unfinished": []}  # within its grace period
    assert store.versions() == versions[3:] and store.latest() == versions[-1]
    assert prune(store, RetentionConfig(keep_versions=2, unfinished_grace_s=0))["deleted_unfinished"] == [unfinished]
    assert not (tmp_path / "store" / "versions" / unfinished).exists()
    assert not (tmp_path / "store" / "runs" / "k.json").exists()


def _strings_in_store(root) -> list[str]:
    """Every string value of every Parquet file, and the text of every other file, below ``root``."""
    import pyarrow.parquet as pq

    out = []
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        if f.suffix == ".parquet":
            table = pq.read_table(f)
            for col in table.columns:
                flat = col
                while pa.types.is_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
                    flat = pa.compute.list_flatten(flat)
                if pa.types.is_string(flat.type):
                    out += [v for v in flat.to_pylist() if v]
        else:
            out.append(f.read_bytes().decode("utf-8", "replace"))
    return out


@pytest.mark.slow
def test_forget_removes_a_user_from_every_retained_version_and_every_later_refresh(ray_cluster, tmp_path,
                                                                                   tiny_model_folder, capsys):
    from steerstore.jobs import cli

    def night(name, extra=()):
        rows = [pair(u, f"{u}-{k}", k) for u in ("alice.m", "bob", "carol") for k in range(2)]
        return write_jsonl(tmp_path / name, rows + [pair("alice.m", "alice-bad", chosen="")], extra_lines=extra)

    hist = write_jsonl(tmp_path / "h.jsonl", [{"user_id": u, "item_id": f"{u}-h{k}", "input": "Write.",
                                                "output": f"Words {k} by {u}."} for u in ("alice.m", "bob", "carol")
                                               for k in range(2)])
    orphan = '{"user": "alice.m", "pair_id": "lost", "prompt": "x"}'  # no user_id, but it names her
    v1 = refresh.main(config(tmp_path, tiny_model_folder, night("n1.jsonl", [orphan]), hist))["version"]
    v2 = refresh.main(config(tmp_path, tiny_model_folder, night("n2.jsonl"), hist))["version"]
    store_dir = tmp_path / "store"
    assert any("alice.m" in s for s in _strings_in_store(store_dir / "versions"))
    (tmp_path / "forget.txt").write_text("alice.m\n")
    assert cli.main(["forget", "--store", str(store_dir), "--users", str(tmp_path / "forget.txt")]) == 0
    assert "forgot 1 user(s) in 2 version(s)" in capsys.readouterr().out
    leftover = [s[:300] for s in _strings_in_store(store_dir) if "alice.m" in s]
    assert not leftover  # versions, reports, forget log
    store = SteeringStore(str(store_dir))
    for v in (v1, v2):
        reader = StoreReader(store.uri, version=v)
        assert set(reader.vectors(["alice.m", "bob", "carol"])) == {"bob", "carol"}
        manifest = store.read_manifest(v)
        for table in ("vectors", "users", "quarantine", "steerx_users"):
            assert manifest["tables"][table]["rows"] == store.read_table(table, v).num_rows, (v, table)
        assert manifest["forgotten"][0]["users"] == 1
        assert manifest["summary"]["users_stored"] == 2 and manifest["summary"]["users_forgotten"] == 1
        assert manifest["summary"]["users_by_method"]["caa"] == 2  # what the next night's guard compares with
    # a later night still holding her rows: they are dropped, counted, and nothing of hers is written
    summary = refresh.main(config(tmp_path, tiny_model_folder, night("n3.jsonl", [orphan]), hist,
                                  retention={"keep_versions": 2}))
    assert summary["rows_forgotten"] == 6 and summary["users_in"] == 2 and summary["users_stored"] == 2
    assert summary["retention"]["deleted_versions"] == [v1] and store.versions() == [v2, summary["version"]]
    assert not [s[:300] for s in _strings_in_store(store_dir) if "alice.m" in s]


def test_the_row_reader_splits_on_newlines_only_and_bounds_line_length(tmp_path, monkeypatch):
    import gzip

    from steerstore.infra import records

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 40)
    lines = [b'{"a": "one\xe2\x80\xa8two"}', b"x" * 45, b'{"b": 1}\r', b"", b"y" * 100, b'{"c": "\xff"}', b'{"d": 2}']
    (tmp_path / "f.bin").write_bytes(gzip.compress(b"\xef\xbb\xbf" + b"\n".join(lines)))  # gzip, BOM, no .gz name
    rows = [r for t in records.row_batches(str(tmp_path / "f.bin"), chunk_bytes=16) for r in t.to_pylist()]
    got = [(r["line"], r["text"], r["problem"]) for r in rows]
    assert got == [(1, '{"a": "one\u2028two"}', None), (2, "", "line longer than 40 bytes"), (3, '{"b": 1}', None),
                   (5, "", "line longer than 40 bytes"), (6, '{"c": "\ufffd"}', "invalid UTF-8 (byte 0xff at offset 7)"),
                   (7, '{"d": 2}', None)]
