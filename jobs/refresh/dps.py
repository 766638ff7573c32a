"""The DPS stage: clusters, the population baseline, per-user and per-cluster preference heads."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from steerstore.jobs.refresh.common import Timer, exact_sample, failed_users, history_users, model_actors, value_counts
from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.operators.bt import in_sample
from steerstore.operators.cluster import EmbedUsers, kmeans
from steerstore.operators.dps import (
    DPS_OUTPUT_SCHEMA,
    DPSConfig,
    DPSHeads,
    PopulationPCS,
    cluster_sequences,
    dps_user_rows,
)
from steerstore.schemas.store import DPS_CLUSTERS_SCHEMA, DPS_HEADS_SCHEMA, DPS_POPULATION_SCHEMA, conform

log = logging.getLogger("steerstore")


def dps_stage(config: RefreshConfig, ok_users, timer: "Timer") -> dict | None:
    """DPS: per-user (and per-cluster) preference heads. Returns datasets/tables for the store, or None."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    dps, res = config.dps, config.resources
    users = history_users(ok_users, config)
    n_users = users.count()
    if n_users == 0:
        return None
    centroids = None
    if dps.clusters:
        users = users.map_batches(
            EmbedUsers, fn_constructor_kwargs={"encoder": dps.encoder, "max_items": dps.history.max_items,
                                               "keep_columns": True,
                                               "device": "cuda" if res.embed_gpus_per_actor > 0 else "cpu"},
            compute=ActorPoolStrategy(size=res.embed_actors), batch_size=256, num_gpus=res.embed_gpus_per_actor,
            num_cpus=1, batch_format="pyarrow").materialize()
        fraction = min(1.0, _KMEANS_SAMPLE / n_users)
        sample = users.filter(lambda r: in_sample(r["user_id"], dps.seed, fraction)).select_columns(["embedding"])
        emb = np.asarray([r["embedding"] for r in sample.take_all()], dtype=np.float32)
        centroids, _, _ = kmeans(emb, min(dps.clusters, len(emb)), seed=dps.seed)
    rows = users.map_batches(dps_user_rows, fn_kwargs={"history": dps.history, "centroids": centroids,
                                                       "temperature": dps.routing_temperature},
                             batch_format="pyarrow").materialize()
    timer.lap("dps-prepare", f"{n_users} users" + (f", {len(centroids)} clusters" if centroids is not None else ""))

    actors = model_actors(res, res.dps_batch_size)
    population = pop_rows = None
    if dps.pcs_baseline == "population":
        sample = exact_sample(rows, dps.baseline_users, dps.seed, n_users)
        scored_sample = sample.map_batches(
            DPSHeads, fn_constructor_kwargs={"config": dps, "model": config.model, "full": True}, **actors).take_all()
        pop_rows = [r for r in scored_sample if r["status"] == "ok"]
        if not pop_rows:
            reasons = sorted({r["reason"] for r in scored_sample})[:3]
            raise RuntimeError(f"dps: none of the {len(scored_sample)} users of the baseline sample could be scored "
                               f"({reasons}); fix those users or run with dps.pcs_baseline=none")
        population = PopulationPCS.from_rows(pop_rows, (pop_rows[0]["num_layers"], pop_rows[0]["num_heads"]))
        timer.lap("dps-baseline", f"population PCS from {population.users} users")

    # clusters are pseudo-users: a seeded sample of their members' items; scored with the users
    to_score = rows if dps.per_user else None
    cluster_counts: dict[int, int] = {}
    if centroids is not None:
        cluster_counts = {int(c): n for c, n in value_counts(rows, "cluster").items()}
        members = []
        for c, count in sorted(cluster_counts.items()):
            fraction = min(1.0, 4 * dps.cluster_items / count)
            members += rows.filter(lambda r, c=c: r["cluster"] == c and in_sample(r["user_id"], dps.seed + 1, fraction)) \
                .select_columns(["user_id", "cluster", "sequences"]).take_all()
        pseudo = [{"user_id": f"cluster:{c}", "scope": "cluster", "sequences": seqs, "cluster": c, "routing": None,
                   "content_fingerprint": None}
                  for c, seqs in cluster_sequences(members, len(centroids), dps.cluster_items, dps.seed).items()]
        pseudo_ds = ray.data.from_arrow(pa.Table.from_pylist(pseudo, schema=rows.schema().base_schema))
        to_score = pseudo_ds if to_score is None else to_score.union(pseudo_ds)
    scored = None
    if to_score is not None:
        scored = to_score.map_batches(DPSHeads, fn_constructor_kwargs={"config": dps, "model": config.model,
                                                                      "population": population}, **actors).materialize()
    is_cluster = lambda r: r["scope"] == "cluster"  # noqa: E731
    cluster_results = {} if scored is None else {
        int(r["cluster"]): r for r in scored.filter(is_cluster).take_all()}
    model = next(iter(pop_rows or []), None) or next(iter(cluster_results.values()), None)
    if dps.per_user:
        user_results = scored.filter(lambda r: not is_cluster(r))
    else:
        if model is None:
            raise RuntimeError("dps: no cluster could be scored, so users have no heads (dps.per_user=false)")
        user_results = rows.map_batches(cluster_only_rows, fn_kwargs={"model": model}, batch_format="pyarrow")
    failed = failed_users(user_results)
    heads = user_results.filter(lambda r: r["status"] == "ok").map_batches(
        dps_heads_rows, fn_kwargs={"config": dps, "clusters": centroids is not None}, batch_format="pyarrow").materialize()
    n_stored = heads.count()
    model = model or (heads.take(1)[0] if n_stored else None)
    clusters_table = _dps_clusters_table(centroids, cluster_results, cluster_counts, dps, model)
    population_table = _dps_population_table(population, model)
    timer.lap("dps", f"{n_stored} users with heads, {len(cluster_results)} clusters scored, {len(failed)} failed")
    return {"heads": heads, "n_stored": n_stored, "failed": failed, "clusters": clusters_table,
            "population": population_table, "model": model}


_KMEANS_SAMPLE = 50_000  # users k-means is fitted on (all users are routed)


_MODEL_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "model_id", "model_fingerprint")


def cluster_only_rows(batch: pa.Table, model: dict) -> pa.Table:
    """dps.per_user=false: users carry their routing only; their heads are their clusters'."""
    n = batch.num_rows
    out = {name: pa.nulls(n, field.type) for name, field in zip(DPS_OUTPUT_SCHEMA.names, DPS_OUTPUT_SCHEMA)}
    out.update({k: pa.array([model[k]] * n, DPS_OUTPUT_SCHEMA.field(k).type) for k in _MODEL_FIELDS})
    out.update(user_id=batch["user_id"], scope=batch["scope"], status=pa.array(["ok"] * n), cluster=batch["cluster"],
               routing=batch["routing"], content_fingerprint=batch["content_fingerprint"],
               heads=pa.array([[]] * n, DPS_OUTPUT_SCHEMA.field("heads").type))
    return pa.table(out, schema=DPS_OUTPUT_SCHEMA)


def dps_heads_rows(batch: pa.Table, config: DPSConfig, clusters: bool) -> pa.Table:
    rows = []
    for r in batch.to_pylist():
        source = "user" if r["heads"] else ("cluster" if clusters else "none")
        rows.append({**r, "source": source, "gamma": config.gamma, "adaptive": config.adaptive,
                     "plausibility": config.plausibility})
    return conform(pa.Table.from_pylist(rows), DPS_HEADS_SCHEMA) if rows else DPS_HEADS_SCHEMA.empty_table()


def _dps_clusters_table(centroids, results: dict, counts: dict, dps: DPSConfig, model: dict | None) -> pa.Table | None:
    if centroids is None or model is None:
        return None
    rows = []
    for c, centroid in enumerate(centroids):
        r = results.get(c) or {}
        rows.append({"cluster": c, "centroid": centroid.tolist(), "heads": r.get("heads") or [],
                     "n_users": counts.get(c, 0), "n_items": r.get("n_items", 0), "n_tokens": r.get("n_tokens", 0),
                     "mode": dps.mode, "pcs_baseline": dps.pcs_baseline, "encoder": dps.encoder,
                     "routing_temperature": dps.routing_temperature,
                     **{k: model[k] for k in _MODEL_FIELDS}})
    return pa.Table.from_pylist(rows, schema=DPS_CLUSTERS_SCHEMA)


def _dps_population_table(population: PopulationPCS | None, model: dict | None) -> pa.Table | None:
    if population is None or model is None:
        return None
    layers, heads = population.pcs_sum.shape
    per_user = np.stack([p for p, _ in population.own.values()])  # (users, layers, heads)
    group = max(1, model["num_heads"] // model["num_kv_heads"])
    rows = [{"layer": l, "head": h, "kv_head": h // group, "pcs_mean": float(per_user[:, l, h].mean()),
             "pcs_std": float(per_user[:, l, h].std()), "n_users": population.users,
             "attribution_mean": float(population.attribution_sum[l, h] / population.users),
             **{k: model[k] for k in _MODEL_FIELDS}}
            for l in range(layers) for h in range(heads)]
    return pa.Table.from_pylist(rows, schema=DPS_POPULATION_SCHEMA)
