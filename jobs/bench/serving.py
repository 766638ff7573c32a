"""Benchmark of the serving side: point-lookup latency in a large store, and mixed-batch overhead.

Launch: ``steerstore bench serving`` (100,000 synthetic users on local disk); add
``--s3_uri s3://bucket/prefix`` (with ``--storage.*`` or the AWS environment) to measure over S3
too, e.g. against ``make s3-local`` (the S3 test server on loopback).

1. **Lookups and the version switch.** A synthetic store version of ``--users`` users (CAA vectors of the default
   model's stored shape, BT coordinates, DPS heads, SteerX rows) is written with the store's
   bucketed layout, locally and (``--s3_uri``) to S3-compatible object storage over HTTP. Latency p50/p99 of
   single-user lookups: uncached (each lookup reads its row group; bucket-file footers are open),
   cached, the full ``artifacts`` lookup, and absent ids; the baseline is a filtered scan of the
   whole table (what an unbucketed reader does), measured in the same run. Then a second version
   is published under a ``StoreFollower`` serving the first: the cost of a check when ``LATEST``
   has not moved (paid once per interval), of the switch (read ``LATEST``, open the new version,
   check its weights), and the new version's first lookups (its bucket footers are opened lazily).
2. **Mixed batch.** With the real model and a small synthetic store for its weights, a batch of
   requests mixing users and every method is decoded in one call, per method (one call each),
   and one request at a time; the baseline is the same prompts unsteered in one call. Every row
   decodes exactly ``--new_tokens`` tokens (EOS is ignored), so all arms do the same token work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from steerstore.infra import storage
from steerstore.infra.config import check, option, to_dict
from steerstore.infra.follow import StoreFollower
from steerstore.infra.reader import StoreReader
from steerstore.infra.storage import StorageConfig
from steerstore.infra.store import SteeringStore
from steerstore.jobs.bench.common import latency_percentiles, write_figures
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.serving import METHODS, Request, serve
from steerstore.schemas.store import (
    BUCKETED_TABLES,
    POPULATION_FILE,
    STORE_TABLES,
    Manifest,
    bucket_count,
    conform,
    layout_entry,
    table_entries,
    user_bucket,
)

log = logging.getLogger("steerstore.bench")

STYLE = "This person writes warmly and briefly, with exclamation marks and vivid, positive words."
PROMPTS = ["Tell me about cats.", "What should I cook tonight?", "Describe the sea.", "Give me advice on sleep.",
           "Write a note to a friend.", "What is a good book?", "How do I start running?", "Explain rain."]


@dataclass
class BenchServingConfig:
    users: int = option(100_000, help="synthetic users in the lookup store")
    lookups: int = option(2000, help="timed lookups per local measurement")
    s3_lookups: int = option(400, help="timed lookups per measurement over the S3 test server")
    scans: int = option(10, help="timed full-table filtered scans (the baseline) per backend")
    layers: int = option(9, help="stored layers per vector (the default model stores 9)")
    hidden: int = option(576, help="hidden size of the synthetic vectors (the default model's)")
    users_per_bucket: int = option(4096, help="users per bucket file (as output.users_per_bucket)")
    row_group_bytes: int = option(256 << 10, help="bytes per row group (as output.row_group_bytes)")
    s3_uri: str = option("", help="also measure over S3 here (s3://bucket/prefix; the bucket must exist)")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig,
                                               metadata={"help": "object storage of --s3_uri"})
    generation: bool = option(True, help="measure mixed-batch generation overhead on the real model")
    requests: int = option(24, help="requests in the generation batch")
    new_tokens: int = option(32, help="tokens each request decodes")
    repeats: int = option(2, help="timed repeats of each generation arm (the best is reported)")
    out: str = option("./steerstore-out/bench-serving", help="local folder for the synthetic stores")
    json: str = option("docs/figures/bench-serving.json", help="where the figures are written ('' = print only)")
    seed: int = option(0, help="seed of the synthetic data and the lookup sample")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})

    def __post_init__(self) -> None:
        check(self.users >= 1 and self.lookups >= 1 and self.s3_lookups >= 1 and self.scans >= 1,
              "users, lookups, s3_lookups and scans must be >= 1")
        check(self.layers >= 1 and self.hidden >= 1, "layers and hidden must be >= 1")
        check(self.requests >= len(METHODS) and self.new_tokens >= 1,
              f"requests must be >= {len(METHODS)} (one per method) and new_tokens >= 1")


# ---- a synthetic store ------------------------------------------------------------------------

def _nested(values: np.ndarray) -> pa.Array:
    """(rows, layers, hidden) float32 -> list<list<float32>> without Python loops."""
    rows, layers, hidden = values.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(rows * layers + 1, dtype=np.int32) * hidden),
                                     pa.array(values.reshape(-1)))
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * layers), inner)


def _bucket_tables(ids: list[str], rng: np.random.Generator, meta: dict) -> dict[str, pa.Table]:
    n, layers, hidden = len(ids), meta["layers"], meta["hidden"]
    vectors = rng.standard_normal((n, len(layers), hidden), dtype=np.float32)
    vectors *= meta["norm"] / np.linalg.norm(vectors, axis=-1, keepdims=True)
    model = {"model_id": [meta["model_id"]] * n, "model_fingerprint": [meta["fingerprint"]] * n}
    heads = [[{"layer": int(l), "head": int(h), "kv_head": int(h) // meta["group"], "score": 0.1, "pcs": 0.1}
              for l, h in zip(rng.integers(0, meta["num_layers"], 8), rng.integers(0, meta["num_heads"], 8))]
             for _ in ids]
    return {
        "vectors": pa.table({
            "user_id": ids, "scope": ["user"] * n, "method": ["caa"] * n, "source": ["pairs"] * n,
            "layers": [layers] * n, "vectors": _nested(vectors), "norms": [[meta["norm"]] * len(layers)] * n,
            "hidden_size": [hidden] * n, "hook": ["block_output"] * n, "operation": ["add"] * n,
            "positions": ["response"] * n, "recommended_layers": [meta["recommended"]] * n,
            "recommended_scale": [1.0] * n, "n_pairs": [8] * n, "content_fingerprint": ["synthetic"] * n, **model}),
        "users": pa.table({"user_id": ids, "status": ["stored"] * n, "reason": [None] * n,
                           "methods": [["caa", "bt", "dps", "steerx"]] * n, "n_pairs_in": [8] * n,
                           "n_pairs_valid": [8] * n, "n_pairs_used": [8] * n, "n_histories_in": [4] * n,
                           "n_histories_valid": [4] * n, "content_fingerprint": ["synthetic"] * n,
                           "fingerprints": pa.array([[]] * n, pa.map_(pa.string(), pa.string()))}),
        "bt_coords": pa.table({"user_id": ids, "theta": list(rng.standard_normal((n, meta["k"]), dtype=np.float32)),
                               "n_pairs": [8] * n, "train_accuracy": [1.0] * n, "log_likelihood": [-1.0] * n,
                               "iterations": [5] * n, "prior": [1.0] * n,
                               "model_fingerprint": model["model_fingerprint"]}),
        "dps_heads": pa.table({"user_id": ids, "heads": heads, "source": ["user"] * n, "mode": ["fast"] * n,
                               "pcs_baseline": ["none"] * n, "baseline_users": [0] * n, "cluster": [None] * n,
                               "routing": [[]] * n, "n_items": [4] * n, "n_tokens": [64] * n, "base_nll": [2.0] * n,
                               "gamma": [1.0] * n, "adaptive": [False] * n, "plausibility": [0.1] * n,
                               "content_fingerprint": ["synthetic"] * n, "num_layers": [meta["num_layers"]] * n,
                               "num_heads": [meta["num_heads"]] * n, "num_kv_heads": [meta["num_heads"]
                                                                                     // meta["group"]] * n, **model}),
        "steerx_users": pa.Table.from_pylist([{
            "user_id": u, "anchors": [], "n_items": 4, "n_tokens": 64, "descriptions": [], "context": STYLE,
            "counterfactual": "empty", "anchor_mode": "absolute", "style_template": "{context}\n\n{prompt}",
            "model_id": meta["model_id"], "model_fingerprint": meta["fingerprint"]} for u in ids],
            schema=STORE_TABLES["steerx_users"]),
    }


def synthetic_store(uri: str, cfg: StorageConfig | None, n_users: int, meta: dict, seed: int,
                    users_per_bucket: int, row_group_bytes: int) -> tuple[str, list[str]]:
    """Write and publish a synthetic store version in the bucketed layout; returns (version, user ids)."""
    store = SteeringStore(uri, cfg)
    version = store.next_version_id()
    rng = np.random.default_rng(seed)
    ids = [f"user-{i:07d}" for i in range(n_users)]
    buckets = bucket_count(n_users, users_per_bucket)
    by_bucket: dict[int, list[str]] = {}
    for uid in ids:
        by_bucket.setdefault(user_bucket(uid, buckets), []).append(uid)
    files: dict[str, list[str]] = {t: [] for t in STORE_TABLES}
    for b, members in sorted(by_bucket.items()):
        for table, rows in _bucket_tables(members, rng, meta).items():
            files[table].append(store.write_bucket(version, table, b, rows, STORE_TABLES[table], row_group_bytes))
    layers, hidden = meta["layers"], meta["hidden"]
    population = _bucket_tables(["population"], rng, meta)["vectors"]
    population = population.set_column(0, "user_id", pa.array([None], pa.string()))
    population = population.set_column(1, "scope", pa.array(["population"]))
    storage.write_parquet(storage.join(store.table_uri(version, "vectors"), POPULATION_FILE), population, cfg)
    files["vectors"].append(POPULATION_FILE)
    axes = np.linalg.qr(rng.standard_normal((len(layers), hidden, meta["k"])))[0].transpose(0, 2, 1)
    basis = pa.table({
        "layer": layers, "axes": _nested(axes.astype(np.float32)),  # (layers, k, hidden)
        "population_norm": [meta["norm"]] * len(layers), "feature_norm": [1.0] * len(layers),
        "population_theta": [[1.0] + [0.0] * (meta["k"] - 1)] * len(layers), "k": [meta["k"]] * len(layers),
        "hidden_size": [hidden] * len(layers), "hook": ["block_output"] * len(layers),
        "operation": ["add"] * len(layers), "positions": ["response"] * len(layers),
        "recommended_layers": [meta["recommended"]] * len(layers), "recommended_scale": [1.0] * len(layers),
        "sample_users": [n_users] * len(layers), "model_id": [meta["model_id"]] * len(layers),
        "model_fingerprint": [meta["fingerprint"]] * len(layers)})
    storage.write_parquet(storage.join(store.table_uri(version, "bt_basis"), "part-0.parquet"),
                          conform(basis, STORE_TABLES["bt_basis"]), cfg)
    files["bt_basis"].append("part-0.parquet")
    for table, schema in STORE_TABLES.items():
        if not files[table]:
            files[table].append(store.write_empty(version, table, schema))
    counts = {t: n_users for t in BUCKETED_TABLES}
    counts.update(vectors=n_users + 1, bt_basis=len(layers))
    manifest = Manifest(
        version=version, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model={"name_or_path": meta["name_or_path"], "id": meta["model_id"], "fingerprint": meta["fingerprint"]},
        tables=table_entries(files, counts),
        summary={"synthetic": True, "users_in": n_users}, inputs={}, methods=["caa", "bt", "dps", "steerx"],
        config={"model": meta["model_config"], "steerx": {"vectors": {"source": "blend"}}, "dps": {"top_k": 8}},
        steerstore_version="bench", layout=layout_entry(buckets, BUCKETED_TABLES, row_group_bytes))
    store.publish(version, manifest.to_json_dict())
    return version, ids


# ---- lookups ------------------------------------------------------------------------------------

def _timed(fn, args) -> list[float]:
    out = []
    for a in args:
        start = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - start)
    return out


def measure_switch(uri: str, cfg: StorageConfig | None, republish: Callable[[], str], ids: list[str],
                   n: int, seed: int) -> dict:
    """A follower serving the current version; ``republish()`` publishes the next one; the switch timed."""
    rng = np.random.default_rng(seed + 2)
    sample = [ids[i] for i in rng.choice(len(ids), n, replace=len(ids) < n)]
    follower = StoreFollower(uri, cfg, interval_s=3600)
    for uid in sample:
        follower.current().artifacts(uid)
    unchanged = _timed(lambda _: follower.check(), range(20))
    before = follower.version
    new_version = republish()
    start = time.perf_counter()
    switched = follower.check()
    switch_s = time.perf_counter() - start
    if not switched or follower.version != new_version:
        raise RuntimeError(f"the follower did not switch from {before} to {new_version}: {follower.refused}")
    after = _timed(lambda u: follower.current().artifacts(u), sample)
    return {"check_unchanged": latency_percentiles(unchanged), "switch_ms": round(switch_s * 1e3, 1),
            "first_lookups_after_switch": latency_percentiles(after), "from": before, "to": new_version}


def measure_lookups(uri: str, cfg: StorageConfig | None, version: str, ids: list[str], n: int, scans: int,
                    seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    present = [ids[i] for i in rng.choice(len(ids), n, replace=len(ids) < n)]
    absent = [f"absent-{i}" for i in range(n)]
    start = time.perf_counter()
    uncached = StoreReader(uri, cfg, version, cache_users=0)
    open_s = time.perf_counter() - start
    buckets = uncached.layout["buckets"]
    # open every bucket file of the tables once (footers), untimed per lookup but reported
    first = {user_bucket(u, buckets): u for u in ids}
    start = time.perf_counter()
    for uid in first.values():
        uncached.artifacts(uid)
    footers_s = time.perf_counter() - start
    result = {
        "reader_open_ms": round(open_s * 1e3, 1),
        "first_lookup_per_bucket_ms": round(footers_s * 1e3 / len(first), 2),
        "vectors_uncached": latency_percentiles(_timed(lambda u: uncached.vectors([u]), present)),
        "artifacts_uncached": latency_percentiles(_timed(uncached.artifacts, present)),
        "absent": latency_percentiles(_timed(uncached.artifacts, absent)),
    }
    cached = StoreReader(uri, cfg, version, cache_users=len(present))
    for uid in present:
        cached.artifacts(uid)
    result["artifacts_cached"] = latency_percentiles(_timed(cached.artifacts, present))
    store = SteeringStore(uri, cfg)
    result["scan_baseline"] = latency_percentiles(_timed(
        lambda u: store.read_table("vectors", version, filter=pc.field("user_id") == u), present[:scans]))
    result["speedup_vs_scan_p50"] = round(result["scan_baseline"]["p50_ms"] / result["vectors_uncached"]["p50_ms"], 1)
    return result


# ---- mixed-batch generation ---------------------------------------------------------------------

def measure_generation(config: BenchServingConfig, out: str) -> dict:
    runtime = ModelRuntime(config.model)
    runtime.eos_token_ids = []  # every row decodes exactly new_tokens: the same work in every arm
    n_layers = runtime.num_layers
    stored = list(range(round(0.30 * n_layers), round(0.55 * n_layers) + 1))
    meta = {"layers": stored, "recommended": [round(0.40 * n_layers)], "hidden": runtime.hidden_size, "k": 8,
            "norm": 4.0, "num_layers": n_layers, "num_heads": runtime.num_heads,
            "group": runtime.num_heads // runtime.num_kv_heads, "model_id": runtime.model_id,
            "fingerprint": runtime.fingerprint, "name_or_path": config.model.name_or_path,
            "model_config": to_dict(config.model)}
    version, ids = synthetic_store(storage.join(out, "gen-store"), None, config.requests, meta, config.seed,
                                   config.users_per_bucket, config.row_group_bytes)
    reader = StoreReader(storage.join(out, "gen-store"), None, version)
    methods = [m for m in METHODS if m != "population"]
    requests = [Request(ids[i % len(ids)], PROMPTS[i % len(PROMPTS)], methods[i % len(methods)])
                for i in range(config.requests)]
    unsteered = [dataclasses.replace(r, method="none") for r in requests]
    by_method: dict[str, list[Request]] = {}
    for r in requests:
        by_method.setdefault(r.method, []).append(r)

    def best(fn) -> float:
        times = []
        for _ in range(config.repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    run = lambda reqs: serve(runtime, reader, reqs, config.new_tokens)  # noqa: E731
    run(requests[: len(methods)])  # warm-up
    arms = {
        "unsteered_batch": best(lambda: run(unsteered)),
        "mixed_batch": best(lambda: run(requests)),
        "per_method_batches": best(lambda: [run(reqs) for reqs in by_method.values()]),
        "one_request_at_a_time": best(lambda: [run([r]) for r in requests]),
    }
    tokens = config.requests * config.new_tokens
    return {
        "model": runtime.model_id, "device": str(runtime.device), "dtype": str(next(runtime.model.parameters()).dtype),
        "threads": torch.get_num_threads(), "requests": config.requests, "new_tokens": config.new_tokens,
        "methods": {m: len(r) for m, r in by_method.items()},
        "seconds": {k: round(v, 3) for k, v in arms.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in arms.items()},
        "ratio_to_unsteered": {k: round(v / arms["unsteered_batch"], 2) for k, v in arms.items()},
    }


def main(config: BenchServingConfig) -> dict:
    storage.make_dirs(config.out)
    meta = {"layers": list(range(config.layers)), "recommended": [config.layers // 2], "hidden": config.hidden,
            "k": 8, "norm": 4.0, "num_layers": 30, "num_heads": 9, "group": 3, "model_id": "synthetic",
            "fingerprint": "sha256:synthetic", "name_or_path": "synthetic", "model_config": {}}
    result: dict = {"users": config.users, "vector_shape": [config.layers, config.hidden],
                    "users_per_bucket": config.users_per_bucket, "row_group_bytes": config.row_group_bytes}
    start = time.perf_counter()
    local = storage.join(config.out, "lookup-store")
    version, ids = synthetic_store(local, None, config.users, meta, config.seed, config.users_per_bucket,
                                   config.row_group_bytes)
    result["local_write_s"] = round(time.perf_counter() - start, 1)
    result["local"] = measure_lookups(local, None, version, ids, config.lookups, config.scans, config.seed)
    result["local"]["switch"] = measure_switch(local, None, lambda: synthetic_store(
        local, None, config.users, meta, config.seed + 1, config.users_per_bucket, config.row_group_bytes)[0],
        ids, min(config.lookups, 200), config.seed)
    print(json.dumps({"local": result["local"]}, indent=2), flush=True)
    if config.s3_uri:
        start = time.perf_counter()
        version, ids = synthetic_store(config.s3_uri, config.storage, config.users, meta, config.seed,
                                       config.users_per_bucket, config.row_group_bytes)
        result["s3_write_s"] = round(time.perf_counter() - start, 1)
        result["s3"] = measure_lookups(config.s3_uri, config.storage, version, ids, config.s3_lookups,
                                       max(2, config.scans // 5), config.seed)
        result["s3"]["switch"] = measure_switch(config.s3_uri, config.storage, lambda: synthetic_store(
            config.s3_uri, config.storage, config.users, meta, config.seed + 1, config.users_per_bucket,
            config.row_group_bytes)[0], ids, min(config.s3_lookups, 100), config.seed)
        print(json.dumps({"s3": result["s3"]}, indent=2), flush=True)
    if config.generation:
        result["generation"] = measure_generation(config, config.out)
        print(json.dumps({"generation": result["generation"]}, indent=2), flush=True)
    write_figures(result, config.json, quiet=True)
    return result
