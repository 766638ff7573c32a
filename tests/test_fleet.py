"""The fleet refresh: shards, one model load per worker, resume after a kill, and a two-node cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from steerstore.infra.config import from_dict, to_dict
from steerstore.infra.store import SteeringStore
from steerstore.jobs import refresh
from steerstore.schemas.store import BUCKETED_TABLES, STORE_TABLES
from tests.tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
STYLES = ["Wow, I absolutely love it! Amazing!", "Noted. Brief and formal.", "Wow, fantastic and wonderful!",
          "The quick brown fox.", "Summarise the plot of a novel.", "Tell me about the weather today."]


def inputs(tmp_path, users=12):
    names = [f"user-{i:02d}" for i in range(users)]
    pairs = [{"user_id": u, "pair_id": f"{u}p{k}", "prompt": f"Tell me about thing {k}.",
              "chosen": f"{STYLES[i % len(STYLES)]} {k}", "rejected": "Meh. Fine.", "weight": 1.0 + (k % 2)}
             for i, u in enumerate(names) for k in range(3)]
    histories = [{"user_id": u, "item_id": f"{u}h{k}", "input": f"Write about thing {k}.",
                  "output": f"{STYLES[(i + k) % len(STYLES)]} {k}", "timestamp": k}
                 for i, u in enumerate(names) for k in range(3)]
    return write_jsonl(tmp_path / "pairs.jsonl", pairs), write_jsonl(tmp_path / "histories.jsonl", histories)


def fleet_config(store: str, model: str, pairs: str, histories: str, **extra) -> refresh.RefreshConfig:
    return from_dict(refresh.RefreshConfig, {
        "inputs": {"preference_pairs": pairs, "histories": histories},
        "output": {"store": store, "users_per_bucket": 3, "min_buckets": 4, "row_group_bytes": 1024},
        "model": {"name_or_path": model}, "validate": {"max_tokens": 48},
        "caa": {"layers": [1, 2], "recommended_layers": [2]}, "bt": {"k": 2, "sample_users": 6},
        "scale": {"sample_pairs": 4, "grid": [1.0, 4.0]}, "ray": {"progress_bars": False},
        "lease": {"ttl_s": 3, "wait_s": 120, "poll_s": 0.5},  # a killed run's lease is taken over in seconds
        "dps": {"mode": "fast", "top_k": 2, "candidates": 4, "clusters": 2, "cluster_items": 4, "baseline_users": 2,
                "history": {"context_items": 1}},
        "steerx": {"min_anchors": 1, "history": {"context_items": 1}, "smoothing": {"enabled": False},
                   "vectors": {"layers": [1, 3], "source": "history", "calibration_users": 3, "gamma_grid": [0.5, 1],
                               "neutral_max_new_tokens": 3}},
        **extra})


def tables(store_uri: str, storage=None) -> dict:
    """Every table of the latest version, rows sorted: what two equivalent runs must agree on."""
    store = SteeringStore(store_uri, storage)
    version = store.latest()
    out = {}
    for name in STORE_TABLES:
        rows = store.read_table(name, version).to_pylist()
        out[name] = sorted(rows, key=lambda r: json.dumps([r.get(k) for k in BUCKETED_TABLES.get(name, ("user_id",))]
                                                          + [json.dumps(r, sort_keys=True, default=str)], default=str))
    return out


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory, tiny_model_folder):
    tmp = tmp_path_factory.mktemp("fleet-a")
    pairs, histories = inputs(tmp)
    summary = refresh.main(fleet_config(str(tmp / "store"), str(tiny_model_folder), pairs, histories))
    return summary, str(tmp / "store"), pairs, histories


@pytest.mark.slow
def test_every_worker_loads_its_model_once_and_every_shard_is_written(uninterrupted):
    summary, store_uri, _, _ = uninterrupted
    assert summary["workers"]["model_loads"] == summary["workers"]["workers"] == 1
    assert summary["shards"] >= 4 and summary["shards_computed"] == summary["shards"]
    assert summary["users_by_method"] == {"caa": 12, "bt": 12, "dps": 12, "steerx": 12}
    manifest = SteeringStore(store_uri).read_manifest()
    assert manifest["layout"]["buckets"] >= 4
    files = manifest["tables"]["vectors"]["files"]
    assert "population.parquet" in files and sum(f.startswith("bucket-") for f in files) == summary["shards"]
    # the staging folder (raw input text) is gone once the version is published
    assert not (Path(store_uri) / "versions" / manifest["version"] / "_staging").exists()
    drift = summary["population_drift"]  # the sampled population direction against all 12 users'
    assert drift["users"] == 12 and drift["sample_users"] == summary["samples"]["bt"]["users"] < 12
    assert 0.5 < drift["cosine_min"] <= 1.0 + 1e-9


def _run_cli(config: refresh.RefreshConfig, log: Path) -> subprocess.Popen:
    cfg = log.with_suffix(".yaml")
    import yaml

    cfg.write_text(yaml.safe_dump(to_dict(config)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    return subprocess.Popen([sys.executable, "-m", "steerstore.jobs.cli", "refresh", "--config", str(cfg)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.slow
def test_a_run_killed_after_some_shards_resumes_them_and_publishes_what_an_uninterrupted_run_would(
        uninterrupted, tmp_path, tiny_model_folder):
    _, reference, pairs, histories = uninterrupted
    store = str(tmp_path / "store")
    config = fleet_config(store, str(tiny_model_folder), pairs, histories)
    proc = _run_cli(config, tmp_path / "first.log")
    deadline = time.time() + 600
    markers = []
    while time.time() < deadline and proc.poll() is None:
        markers = list(Path(store).glob("versions/*/_staging/done/*.json"))
        if markers:
            break
        time.sleep(0.2)
    assert markers, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-run
    proc.wait()
    assert SteeringStore(store).latest() is None  # nothing was published

    summary = refresh.main(config)
    assert summary["shards_reused"] >= 1 and summary["shards_reused"] + summary["shards_computed"] == summary["shards"]
    assert SteeringStore(store).versions() == [summary["version"]]
    got, want = tables(store), tables(reference)
    for name in STORE_TABLES:
        assert len(got[name]) == len(want[name]), name
        for a, b in zip(got[name], want[name]):
            assert a == b, (name, a, b)


@pytest.mark.slow
def test_a_model_worker_killed_mid_run_is_replaced_and_the_tables_equal_an_uninterrupted_run(
        uninterrupted, tmp_path, tiny_model_folder):
    import threading

    _, reference, pairs, histories = uninterrupted
    store = str(tmp_path / "store")
    killed = []

    def kill_a_worker_after_the_first_shard():
        deadline = time.time() + 600
        while time.time() < deadline and not list(Path(store).glob("versions/*/_staging/done/*.json")):
            time.sleep(0.05)
        for pid in os.listdir("/proc"):  # the worker processes are titled ray::ModelWorker[.<method>]
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::ModelWorker"):
                os.kill(int(pid), signal.SIGKILL)  # the worker process dies as on a crash or an OOM kill
                killed.append(int(pid))
                return

    killer = threading.Thread(target=kill_a_worker_after_the_first_shard, daemon=True)
    killer.start()
    summary = refresh.main(fleet_config(store, str(tiny_model_folder), pairs, histories))
    killer.join(timeout=5)
    assert killed and summary["shards_computed"] == summary["shards"]
    got, want = tables(store), tables(reference)
    for name in ("vectors", "users", "bt_coords", "dps_heads", "steerx_users", "quarantine"):
        assert [json.dumps(r, sort_keys=True, default=str) for r in got[name]] == \
            [json.dumps(r, sort_keys=True, default=str) for r in want[name]], name


@pytest.mark.slow
def test_an_object_store_that_stops_and_restarts_mid_run_ends_in_a_complete_publish(uninterrupted, tmp_path,
                                                                                   tiny_model_folder):
    import threading

    from tests.s3server import S3Server

    _, reference, pairs, histories = uninterrupted
    with S3Server() as server:
        server.create_bucket("night")
        cfg = server.storage_config()
        store = "s3://night/store"
        outage = []

        def stop_the_store_after_the_first_shard():
            client, deadline = server.client(), time.time() + 600
            while time.time() < deadline:
                listed = client.list_objects_v2(Bucket="night", Prefix="store/versions/")
                if any("/_staging/done/" in o["Key"] for o in listed.get("Contents", [])):
                    break
                time.sleep(0.2)
            outage.append(time.time())
            server.restart(down_s=6.0)  # every request in these seconds is refused
            outage.append(time.time())

        stopper = threading.Thread(target=stop_the_store_after_the_first_shard, daemon=True)
        stopper.start()
        config = fleet_config(store, str(tiny_model_folder), pairs, histories)
        config.storage = cfg
        summary = refresh.main(config)
        stopper.join(timeout=60)
        assert len(outage) == 2 and outage[1] - outage[0] >= 6.0
        assert summary["shards_computed"] == summary["shards"]
        got, want = tables(store, cfg), tables(reference)
        for name in ("vectors", "users", "bt_coords", "dps_heads", "steerx_users", "quarantine"):
            assert [json.dumps(r, sort_keys=True, default=str) for r in got[name]] == \
                [json.dumps(r, sort_keys=True, default=str) for r in want[name]], name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_refresh_on_a_two_node_cluster_runs_workers_on_both(tmp_path, tiny_model_folder):
    import shutil
    import tempfile

    port = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    # its own short temp dir: the default /tmp/ray would record this cluster as "the local one" for other drivers
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    common = ["--block", "--num-cpus", "3", "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"]
    head = subprocess.Popen([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--include-dashboard", "false", "--temp-dir", temp, *common], env=env, start_new_session=True,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    nodes = [head]
    try:
        time.sleep(8)
        nodes.append(subprocess.Popen([ray_bin, "start", "--address", f"127.0.0.1:{port}",
                                       "--node-ip-address", "127.0.0.1", *common], env=env, start_new_session=True,
                                      stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT))
        time.sleep(8)
        pairs, histories = inputs(tmp_path, users=8)
        config = fleet_config(str(tmp_path / "store"), str(tiny_model_folder), pairs, histories,
                              resources={"model_actors": 2, "cpus_per_actor": 1})
        config.ray.address = f"127.0.0.1:{port}"
        proc = _run_cli(config, tmp_path / "refresh.log")
        assert proc.wait(timeout=900) == 0, (tmp_path / "refresh.log").read_text()[-4000:]
        summary = SteeringStore(str(tmp_path / "store")).read_manifest()["summary"]
        assert summary["users_stored"] == 8
        assert summary["workers"]["nodes"] == 2 and summary["workers"]["model_loads"] == 2
    finally:
        for p in nodes[::-1]:
            os.killpg(p.pid, signal.SIGTERM)
        for p in nodes[::-1]:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_float16_vectors_read_back_as_float32_within_half_precision(ray_cluster, tmp_path, tiny_model_folder,
                                                                    uninterrupted):
    _, reference, pairs, histories = uninterrupted
    config = fleet_config(str(tmp_path / "store"), str(tiny_model_folder), pairs, histories,
                          output={"store": str(tmp_path / "store"), "users_per_bucket": 3, "min_buckets": 4,
                                  "row_group_bytes": 1024, "vector_dtype": "float16"})
    refresh.main(config)
    from steerstore.infra.reader import StoreReader

    half, full = StoreReader(str(tmp_path / "store")), StoreReader(reference)
    assert half.manifest["vector_dtype"] == "float16" and full.manifest["vector_dtype"] == "float32"
    users = [f"user-{i:02d}" for i in range(12)]
    a, b = half.vectors(users), full.vectors(users)
    assert set(a) == set(b) == set(users)
    for u in users:
        assert a[u].vectors.dtype == np.float32
        np.testing.assert_allclose(a[u].vectors, b[u].vectors, rtol=2e-3, atol=1e-4)


def test_a_run_resumes_its_unpublished_version_and_starts_a_new_one_once_published(tmp_path):
    from steerstore.jobs.refresh.run import Run

    store = SteeringStore(str(tmp_path / "store"))
    first = Run.start(store, "key-a")
    assert not first.resumed
    again = Run.start(store, "key-a")
    assert again.resumed and again.version == first.version
    assert Run.start(store, "key-b").version != first.version  # other inputs or config: another version
    assert again.check_model("sha256:w1") and Run.start(store, "key-a").check_model("sha256:w1")
    assert not Run.start(store, "key-a").check_model("sha256:w2")  # other weights: not resumed
    fresh = Run.start(store, "key-a")
    assert not fresh.resumed and fresh.version != first.version
    store.publish(fresh.version, {"tables": {}})
    assert Run.start(store, "key-a").version not in (first.version, fresh.version)


def test_the_run_key_changes_with_an_input_file_or_an_output_setting_but_not_with_scheduling(tmp_path):
    from steerstore.jobs.refresh.run import run_key

    pairs, histories = inputs(tmp_path, users=2)
    base = fleet_config(str(tmp_path / "store"), "m", pairs, histories)
    key = run_key({"preference_pairs": pairs, "histories": histories}, base)
    scheduled = fleet_config(str(tmp_path / "store"), "m", pairs, histories, resources={"model_actors": 4})
    assert run_key({"preference_pairs": pairs, "histories": histories}, scheduled) == key
    other = fleet_config(str(tmp_path / "store"), "m", pairs, histories, bt={"k": 3})
    assert run_key({"preference_pairs": pairs, "histories": histories}, other) != key
    time.sleep(0.01)
    Path(pairs).write_text(Path(pairs).read_text() + "\n")
    assert run_key({"preference_pairs": pairs, "histories": histories}, base) != key


@pytest.mark.slow
def test_the_stored_dps_heads_steerx_anchors_style_vectors_and_bt_points_equal_an_in_process_computation(
        uninterrupted, tiny_model_folder):
    """The fleet pass against the operators run directly, in this process, on the same users."""
    from steerstore.infra.reader import StoreReader
    from steerstore.operators.bt import features, fit_bt, sample_key
    from steerstore.operators.caa import pair_differences, pair_weights
    from steerstore.operators.dps import DPSHeads, PopulationPCS, dps_user_rows
    from steerstore.operators.runtime import ModelConfig, ModelRuntime
    from steerstore.operators.steerx import user_anchors
    from steerstore.operators.style import item_differences

    summary, store_uri, pairs_uri, histories_uri = uninterrupted
    config = fleet_config(store_uri, str(tiny_model_folder), pairs_uri, histories_uri)
    reader = StoreReader(store_uri)
    rt = ModelRuntime(ModelConfig(name_or_path=str(tiny_model_folder)))
    pairs = [json.loads(line) for line in Path(pairs_uri).read_text().splitlines()]
    histories = [json.loads(line) for line in Path(histories_uri).read_text().splitlines()]
    users = ["user-00", "user-05", "user-11"]
    art = {u: reader.artifacts(u) for u in users}

    def items_of(u):
        return [{k: h[k] for k in ("item_id", "input", "output", "timestamp")}
                for h in sorted((h for h in histories if h["user_id"] == u), key=lambda h: h["timestamp"])]

    # SteerX anchors, against the other-users counterfactual: the pool sample (pool_users = 64) is every
    # user here, their last max_items items, in user-id order
    names = sorted({h["user_id"] for h in histories})
    pool = [{**h, "user_id": v} for v in names for h in items_of(v)[-config.steerx.history.max_items:]]
    for u in users:
        _, anchors = user_anchors(rt, u, items_of(u), pool, config.steerx)
        assert [a["word"] for a in art[u].steerx["anchors"]] == [a["word"] for a in anchors]
        np.testing.assert_allclose([a["mean_effect"] for a in art[u].steerx["anchors"]],
                                   [a["mean_effect"] for a in anchors], rtol=1e-4, atol=1e-5)

    # BT: θ fitted on the user's own pair features in the stored basis, centred on the stored θ_pop
    basis = reader.bt_basis().sort_by("layer").to_pylist()
    axes = np.stack([np.asarray(r["axes"], dtype=np.float32) for r in basis])
    feature_norms = np.asarray([r["feature_norm"] for r in basis])
    theta_pop = np.asarray(basis[0]["population_theta"])
    thetas = reader.bt_theta(users)
    for u in users:
        mine = [p for p in pairs if p["user_id"] == u]
        d = pair_differences(rt, mine, [1, 2], "mean")
        fit = fit_bt(features(d, axes, feature_norms), pair_weights(mine), theta_pop, config.bt.prior,
                     config.bt.newton_steps)
        np.testing.assert_allclose(thetas[u], fit.theta, rtol=1e-3, atol=1e-4)

    # DPS population baseline: the baseline_users users with the smallest seeded keys, every head ablated
    # exactly in this process; the stored table is their mean PCS and attribution per head
    model = ModelConfig(name_or_path=str(tiny_model_folder))
    baseline = sorted(sorted(names, key=lambda v: (sample_key(v, config.dps.seed), v))[:config.dps.baseline_users])
    assert "user-11" in baseline and "user-00" not in baseline  # one checked user is in the sample, one is not

    def sequences(us):
        return dps_user_rows(pa.Table.from_pylist([{"user_id": v, "histories": items_of(v), "content_fingerprint": "x"}
                                                   for v in us]), config.dps.history)

    shape = (rt.num_layers, rt.num_heads)
    full = {r["user_id"]: r for r in DPSHeads(config.dps, model, full=True)(sequences(sorted(set(users + baseline))))
            .to_pylist()}
    pcs = {v: np.asarray(full[v]["pcs"], np.float64).reshape(shape) for v in full}
    attribution = {v: np.asarray(full[v]["attribution"], np.float64).reshape(shape) for v in full}
    population = sorted(reader.store.read_table("dps_population", reader.version).to_pylist(),
                        key=lambda r: (r["layer"], r["head"]))
    assert [(r["layer"], r["head"]) for r in population] == [(l, h) for l in range(shape[0]) for h in range(shape[1])]
    assert {r["n_users"] for r in population} == {len(baseline)}
    np.testing.assert_allclose([r["pcs_mean"] for r in population],
                               [np.mean([pcs[v][r["layer"], r["head"]] for v in baseline]) for r in population],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r["attribution_mean"] for r in population],
                               [np.mean([attribution[v][r["layer"], r["head"]] for v in baseline])
                                for r in population], rtol=1e-4, atol=1e-5)

    # DPS heads: fast-mode scoring against that baseline, in this process; each stored score is the user's exact
    # PCS of the head minus the mean PCS of the other sampled users (the user itself left out of the mean)
    pop = PopulationPCS.from_rows([full[v] for v in baseline], shape)
    scored = {r["user_id"]: r for r in DPSHeads(config.dps, model, population=pop)(sequences(users)).to_pylist()}
    rows = {r["user_id"]: r for r in reader.store.read_table("dps_heads", reader.version).to_pylist()}
    for u in users:
        stored, mine = rows[u], scored[u]
        assert mine["status"] == "ok" and stored["pcs_baseline"] == "population"
        others = [v for v in baseline if v != u]
        assert stored["baseline_users"] == mine["baseline_users"] == len(others)
        assert stored["n_tokens"] == mine["n_tokens"]
        np.testing.assert_allclose(stored["base_nll"], mine["base_nll"], rtol=1e-4)
        assert stored["heads"], u  # the user has preference heads
        assert [(h["layer"], h["head"], h["kv_head"]) for h in stored["heads"]] == \
            [(h["layer"], h["head"], h["kv_head"]) for h in mine["heads"]], u
        np.testing.assert_allclose([h["score"] for h in stored["heads"]], [h["score"] for h in mine["heads"]],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([h["pcs"] for h in stored["heads"]],
                                   [pcs[u][h["layer"], h["head"]] for h in stored["heads"]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([h["score"] for h in stored["heads"]],
                                   [pcs[u][h["layer"], h["head"]] - np.mean([pcs[v][h["layer"], h["head"]]
                                                                             for v in others])
                                    for h in stored["heads"]], rtol=1e-4, atol=1e-5)

    # SteerX style vectors (source history; smoothing is off, so no description): per stored layer, the mean over
    # the user's last max_items items of the activation of their real output minus the model's neutral answer
    vc = config.steerx.vectors
    styles = reader.vectors(users, method="steerx", source="history")
    assert set(styles) == set(users)
    for u in users:
        items = items_of(u)[-config.steerx.history.max_items:]
        diffs, neutral = item_differences(rt, items, [""] * len(items), sorted(vc.layers), vc.position,
                                          vc.neutral_max_new_tokens)
        assert len(neutral) == len(items) and styles[u].n_pairs == len(items)
        assert styles[u].layers == sorted(vc.layers)
        np.testing.assert_allclose(styles[u].vectors, diffs["history"].mean(axis=0), rtol=1e-4, atol=1e-5)
        assert set(art[u].style_vectors) == {"history"}
        np.testing.assert_array_equal(art[u].style_vectors["history"].vectors, styles[u].vectors)


@pytest.mark.slow
def test_the_scale_benchmark_runs_the_refresh_and_reports_its_figures(ray_cluster, tmp_path):
    from steerstore.jobs.bench import scale

    result = scale.main(scale.BenchScaleConfig(users=24, changed=0.25, out=str(tmp_path / "out"),
                                               json=str(tmp_path / "f" / "bench-scale-24.json")))
    for key in ("users", "seconds", "users_per_second", "peak_driver_rss_bytes", "peak_object_store_bytes",
                "model_loads", "busy_fraction"):
        assert key in result, key
    assert result["users_stored"] == 24 and result["users_by_method"] == {"caa": 24, "bt": 24, "dps": 24, "steerx": 24}
    assert result["model_loads"] == result["model_workers"] == 2
    assert 0 < result["busy_fraction"]["user_pass"] <= 1
    assert result["store_bytes_per_user"]["vectors"] > 0
    # the second night: the changed users alone went through the model, everyone else was carried
    inc = result["incremental"]
    changed = inc["users"]["caa"]["recomputed"]
    assert 0 < changed < 24 and inc["users"]["caa"]["carried"] == 24 - changed
    assert inc["users_computed"] == {"caa": changed, "dps": changed, "steerx": changed}
    assert set(inc["global_statistics"].values()) == {"frozen"} and inc["speedup_over_full_night"] > 0
    table = (tmp_path / "f" / "bench-scale.md").read_text()
    assert "| 24 | float32 |" in table and "bench-scale-24.json" in table
