"""The per-shard writer (a CPU task): one shard's rows of every table, straight into the version's layout.

Per-user tables (``vectors``, ``users``, ``bt_coords``, ``dps_heads``, ``steerx_users``) get the
shard's bucket file; ``quarantine`` and ``steerx_token_effects`` a part file per shard. The last
write is the shard's completion marker: its files, row counts, reconciliation counts, and the
shard's partial population sums (for the full-population drift check at publish). A shard with
a marker is never computed again by a resumed run.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steerstore.infra import storage
from steerstore.jobs.refresh.config import ReconciliationError, RefreshConfig
from steerstore.jobs.refresh.run import Run
from steerstore.jobs.refresh.tables import concat as _concat
from steerstore.jobs.refresh.tables import conformed as _conformed
from steerstore.jobs.refresh.tables import steerx_effect_rows, store_tables, user_quarantine
from steerstore.jobs.refresh.workers import read_rows
from steerstore.schemas.store import (
    QUARANTINE_SCHEMA,
    STEERX_TOKEN_EFFECTS_SCHEMA,
    STORE_TABLES,
    conform,
    part_file,
    vectors_schema,
)


def write_shard(state: dict, run: Run, config: RefreshConfig, g: dict) -> dict:
    """Write the shard's rows of every table, then its marker; returns the marker."""
    bucket, users, failed = state["bucket"], state["users"], state["failed"]
    sx = config.steerx
    tables, steerx_ok, eligibility = store_tables(state, config, g)
    carried = state.get("carried") or {}
    tables["recommended"] = _concat([state.get("recommended")])  # the recommend pass's (computed and carried)
    store = run.store
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    schemas = {**STORE_TABLES, "vectors": vectors_schema(g["model"]["hidden_size"], config.output.vector_dtype)}
    for table, data in tables.items():
        if data is not None and data.num_rows:
            files[table] = [store.write_bucket(run.version, table, bucket, data, schemas[table],
                                               config.output.row_group_bytes)]
            rows[table] = data.num_rows
    try:
        validation = read_rows(run.shard_quarantine_uri(bucket), config)
    except FileNotFoundError:  # a bucket without input tonight (absent users kept)
        validation = None
    quarantine = _concat([validation, user_quarantine(users, failed)]) or QUARANTINE_SCHEMA.empty_table()
    name = part_file(bucket)
    if quarantine.num_rows:
        storage.write_parquet(storage.join(store.table_uri(run.version, "quarantine"), name),
                              conform(quarantine, QUARANTINE_SCHEMA), config.storage)
        files["quarantine"], rows["quarantine"] = [name], quarantine.num_rows
    if sx.token_effects:
        effects = _concat([None if steerx_ok is None else steerx_effect_rows(steerx_ok),
                           _conformed(carried.get("steerx_token_effects"), STEERX_TOKEN_EFFECTS_SCHEMA)])
        if effects is not None:
            effects = effects.sort_by([("user_id", "ascending"), ("item_id", "ascending")])
            storage.write_parquet(storage.join(store.table_uri(run.version, "steerx_token_effects"), name),
                                  conform(effects, STEERX_TOKEN_EFFECTS_SCHEMA), config.storage)
            files["steerx_token_effects"], rows["steerx_token_effects"] = [name], effects.num_rows
    marker = {"bucket": bucket, "files": files, "rows": rows,
              "counts": _counts(tables["users"], quarantine, tables, state),
              "incremental": state.get("incremental"),
              "cluster_counts": _cluster_counts(tables["dps_heads"]),  # computed and carried users
              "recommended": _recommended_counts(tables["recommended"]),
              "model_fingerprint": g["model"]["model_fingerprint"]}
    if state.get("caa_partial") is not None:
        buf = io.BytesIO()
        np.savez(buf, **state["caa_partial"])
        storage.write_bytes(partial_uri(run, bucket), buf.getvalue(), config.storage)
    run.write_json(run.marker_uri(bucket), marker)
    return marker


def _counts(users: pa.Table, quarantine: pa.Table, tables: dict, state: dict) -> dict:
    """The shard's reconciliation; ``users`` holds tonight's input users and the absent users kept."""
    status = Counter(users.column("status").to_pylist())
    methods = Counter(m for ms in users.column("methods").to_pylist() for m in ms)
    by_input = Counter(quarantine.column("input").to_pylist())
    vectors = tables["vectors"]
    stored = {"caa": 0 if vectors is None else pc.sum(pc.equal(vectors.column("method"), "caa")).as_py() or 0,
              "dps": 0 if tables["dps_heads"] is None else tables["dps_heads"].num_rows,
              "steerx": 0 if tables["steerx_users"] is None else tables["steerx_users"].num_rows}
    tonight = state["users"]
    kept = users.num_rows - tonight.num_rows
    counts = {"users_in": tonight.num_rows, "users_kept_absent": kept, "users_stored": status.get("stored", 0),
              "users_quarantined": status.get("quarantined", 0), "users_by_method": dict(methods),
              "rows_kept": int((pc.sum(pc.list_value_length(tonight.column("pairs"))).as_py() or 0)
                               + (pc.sum(pc.list_value_length(tonight.column("histories"))).as_py() or 0)),
              "rows_quarantined": sum(n for k, n in by_input.items() if k != "user"),
              "quarantine_rows": quarantine.num_rows, "stored": stored}
    if (counts["users_stored"] + counts["users_quarantined"] != counts["users_in"] + kept
            or any(methods.get(m, 0) != n for m, n in stored.items())):
        raise ReconciliationError(f"shard {state['bucket']} does not reconcile: {counts}")
    return counts


def _recommended_counts(rows: pa.Table | None) -> dict[str, dict[str, int]]:
    """Per condition, users by chosen method ('population:' prefix: the population's choice, no held-out items)."""
    if rows is None or not rows.num_rows:
        return {}
    out: dict[str, Counter] = {}
    for r in rows.select(["condition", "method", "chosen_by"]).to_pylist():
        key = r["method"] if r["chosen_by"] == "user" else f"population:{r['method']}"
        out.setdefault(r["condition"], Counter())[key] += 1
    return {c: dict(n) for c, n in out.items()}


def _cluster_counts(dps: pa.Table | None) -> dict[str, int]:
    if dps is None or "cluster" not in dps.column_names:
        return {}
    return {str(c): n for c, n in Counter(c for c in dps.column("cluster").to_pylist() if c is not None).items()}


def partial_uri(run: Run, bucket: int) -> str:
    return storage.join(run.staging, "partials", f"{bucket:05d}.npz")


__all__ = ["partial_uri", "write_shard"]
