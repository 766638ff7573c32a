"""Writing a version's tables: per-user tables bucketed by a hash of the user id, the others as they come."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from steerstore.infra import storage
from steerstore.infra.store import SteeringStore
from steerstore.jobs.refresh.caa import CAAResult
from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.jobs.refresh.reconcile import Reconciled
from steerstore.operators.bt import BTConfig
from steerstore.schemas.store import (
    BT_BASIS_SCHEMA,
    POPULATION_FILE,
    STORE_TABLES,
    VECTORS_SCHEMA,
    TableEntry,
    bucket_count,
    conform,
    layout_entry,
    table_entries,
    user_bucket,
)

log = logging.getLogger("steerstore")


def write_table(ds, store: SteeringStore, version: str, table: str, cfg: RefreshConfig) -> None:
    schema = STORE_TABLES[table]
    fs, path = storage.filesystem(store.table_uri(version, table), cfg.storage)
    storage.make_dirs(store.table_uri(version, table), cfg.storage)
    ds.map_batches(lambda b: conform(b, schema), batch_format="pyarrow").write_parquet(
        path, filesystem=fs, try_create_dir=False, max_rows_per_file=cfg.resources.rows_per_file, schema=schema)


_BUCKET = "__bucket"


def _with_bucket(batch: pa.Table, schema: pa.Schema, buckets: int) -> pa.Table:
    batch = conform(batch, schema)
    return batch.append_column(_BUCKET, pa.array([user_bucket(u, buckets) for u in batch["user_id"].to_pylist()],
                                                 pa.int32()))


def _write_bucket_group(group: pa.Table, store: SteeringStore, version: str, table: str,
                        row_group_bytes: int) -> pa.Table:
    """map_groups function: every row of one hash bucket -> its file; returns (file, rows)."""
    bucket = int(group[_BUCKET][0].as_py())
    name = store.write_bucket(version, table, bucket, group.drop_columns([_BUCKET]), STORE_TABLES[table],
                              row_group_bytes)
    return pa.table({"file": [name], "rows": [group.num_rows]})


def write_bucketed(parts: list, store: SteeringStore, version: str, table: str, buckets: int,
                    cfg: RefreshConfig) -> None:
    """Write a per-user table (the union of ``parts``) as one sorted file per hash bucket of the user id."""
    parts = [p for p in parts if p.count()]  # an empty dataset may have no columns to group by
    if not parts:
        return
    schema = STORE_TABLES[table]
    keyed = [p.map_batches(_with_bucket, fn_kwargs={"schema": schema, "buckets": buckets}, batch_format="pyarrow")
             for p in parts]
    ds = keyed[0].union(*keyed[1:]) if len(keyed) > 1 else keyed[0]
    written = ds.groupby(_BUCKET, num_partitions=min(buckets, cfg.resources.prepare_partitions)).map_groups(
        _write_bucket_group, fn_kwargs={"store": store, "version": version, "table": table,
                                        "row_group_bytes": cfg.output.row_group_bytes},
        batch_format="pyarrow").take_all()
    log.info("wrote %s: %d rows in %d bucket files", table, sum(r["rows"] for r in written), len(written))


def basis_rows(basis: np.ndarray, population_norms: np.ndarray, feature_norms: np.ndarray, theta_pop: np.ndarray,
                population: dict, bt: BTConfig, n_sample: int, scale: float) -> pa.Table:
    rows = [{
        "layer": layer, "axes": basis[j].tolist(), "population_norm": float(population_norms[j]),
        "feature_norm": float(feature_norms[j]), "population_theta": np.asarray(theta_pop).tolist(), "k": bt.k,
        "hidden_size": population["hidden_size"], "hook": population["hook"], "operation": population["operation"],
        "positions": population["positions"], "recommended_layers": population["recommended_layers"],
        "recommended_scale": scale, "sample_users": n_sample, "model_id": population["model_id"],
        "model_fingerprint": population["model_fingerprint"],
    } for j, layer in enumerate(population["layers"])]
    return pa.Table.from_pylist(rows, schema=BT_BASIS_SCHEMA)


def write_version(config: RefreshConfig, store: SteeringStore, version: str, caa: CAAResult, rec: Reconciled,
                  dps_out: dict | None, steerx_out: dict | None) -> tuple[dict[str, TableEntry], dict]:
    """Write every table of the version; returns (manifest table entries, layout).

    Per-user tables go to one file per hash bucket of the user id (point lookups read one small
    row group); the others as they come. Every version has every table, empty when a method did not run.
    """
    import ray.data

    population, n_stored = caa.population, caa.n_stored
    vector_bytes = n_stored * 4 * len(population["layers"]) * int(population["hidden_size"]) if population else 0
    if steerx_out is not None and steerx_out["vectors"] is not None:
        vector_bytes += steerx_out["vectors"].size_bytes()  # materialized: from block metadata
    buckets = bucket_count(rec.summary["users_in"], config.output.users_per_bucket, vector_bytes,
                           config.output.bucket_bytes)
    per_user = {"vectors": [caa.final], "users": [rec.users]}
    rows = {"vectors": n_stored, "users": rec.summary["users_in"], "quarantine": rec.summary["quarantine_rows"],
            "bt_coords": 0, "bt_basis": 0, "dps_heads": dps_out["n_stored"] if dps_out else 0, "dps_clusters": 0,
            "dps_population": 0, "steerx_users": steerx_out["n_stored"] if steerx_out else 0,
            "steerx_token_effects": 0}
    if population is not None:
        storage.write_parquet(storage.join(store.table_uri(version, "vectors"), POPULATION_FILE),
                              pa.Table.from_pylist([population], schema=VECTORS_SCHEMA), config.storage)
        rows["vectors"] += 1
    if caa.theta_pop is not None:
        per_user["bt_coords"] = [caa.final]
        table = basis_rows(caa.basis, np.asarray(population["norms"]), caa.feature_norms, caa.theta_pop, population,
                           config.bt, n_sample=caa.n_sample, scale=caa.scales["bt"])
        write_table(ray.data.from_arrow(table), store, version, "bt_basis", config)
        rows.update(bt_coords=n_stored, bt_basis=table.num_rows)
    if dps_out is not None:
        per_user["dps_heads"] = [dps_out["heads"]]
        for name in ("clusters", "population"):
            if dps_out[name] is not None:
                write_table(ray.data.from_arrow(dps_out[name]), store, version, f"dps_{name}", config)
                rows[f"dps_{name}"] = dps_out[name].num_rows
    if steerx_out is not None:
        per_user["steerx_users"] = [steerx_out["users"]]
        if steerx_out["vectors"] is not None:
            per_user["vectors"].append(steerx_out["vectors"])
            rows["vectors"] += steerx_out["n_vectors"]
        if config.steerx.token_effects:
            effects = steerx_out["effects"].materialize()
            write_table(effects, store, version, "steerx_token_effects", config)
            rows["steerx_token_effects"] = effects.count()
    for name, parts in per_user.items():
        write_bucketed(parts, store, version, name, buckets, config)
    write_table(rec.quarantine, store, version, "quarantine", config)
    for name, schema in STORE_TABLES.items():
        if not store.table_files(version, name):
            store.write_empty(version, name, schema)
    tables = table_entries({name: store.table_files(version, name) for name in STORE_TABLES}, rows)
    return tables, layout_entry(buckets, per_user, config.output.row_group_bytes)
