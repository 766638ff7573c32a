"""Phase 4: the version-wide tables, reconciliation from the shard markers, the manifest, then ``LATEST``."""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections import Counter

import numpy as np
import pyarrow as pa

from steerstore.infra import storage
from steerstore.infra.lifecycle import prune
from steerstore.infra.store import StoreNotFound
from steerstore.jobs.refresh.common import Timer, package_version, redacted
from steerstore.jobs.refresh.config import ReconciliationError, RefreshConfig
from steerstore.jobs.refresh.guard import PublishRefused, refusals
from steerstore.jobs.refresh.incremental import incremental_summary, save_state
from steerstore.jobs.refresh.outputs import partial_uri
from steerstore.jobs.refresh.run import Run
from steerstore.jobs.refresh.shards import UNATTRIBUTED, Shards
from steerstore.jobs.refresh.tables import basis_rows, dps_clusters_table, print_summary
from steerstore.schemas.methods import Family
from steerstore.schemas.store import (
    POPULATION_FILE,
    STORE_TABLES,
    UNATTRIBUTED_PART,
    VECTORS_SCHEMA,
    Manifest,
    conform,
    layout_entry,
    table_entries,
    vectors_schema,
)

log = logging.getLogger("steerstore")


def publish(config: RefreshConfig, run: Run, inputs: dict[str, str], shards: Shards, g: dict, result: dict,
            stats: list[dict], timer: Timer, lease=None) -> dict:
    """Write the version-wide tables, reconcile, publish; returns the run summary."""
    store, version = run.store, run.version
    markers = result["markers"]
    files: dict[str, list[str]] = {t: [] for t in STORE_TABLES}
    rows: Counter = Counter()
    for m in markers:
        for table, names in m["files"].items():
            files[table] += names
        rows.update(m["rows"])
    if shards.total("records_quarantined") and any(s["bucket"] == UNATTRIBUTED for s in shards.summaries):
        name = UNATTRIBUTED_PART
        storage.write_parquet(storage.join(store.table_uri(version, "quarantine"), name),
                              _read(run.unattributed_uri, config), config.storage)
        files["quarantine"].append(name)
        rows["quarantine"] += _unattributed(shards)
    schemas = {**STORE_TABLES, "vectors": vectors_schema(g["model"]["hidden_size"], config.output.vector_dtype)}
    _version_tables(config, run, g, markers, files, rows, schemas)
    for name, schema in schemas.items():  # every version has every table, empty when a method did not run
        if not files[name]:
            files[name].append(store.write_empty(version, name, schema))
    summary = _summary(run, shards, markers, result, g, stats)
    summary["population_drift"] = _drift(run, config, markers, g)
    summary["stage_seconds"] = dict(timer.stages)
    methods = [f.value for f in Family if summary["users_by_method"].get(f.value)]
    steerx = ({"steerx": {"recommended": g["steerx_recommended"],
                          "recommended_history": g.get("steerx_recommended_history") or {},
                          "curve": g["steerx_calibration"]}}
              if g["steerx_recommended"] else {})
    model = g["model"]
    manifest = Manifest(
        version=version, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        model={"name_or_path": config.model.name_or_path, "id": model["model_id"],
               "fingerprint": model["model_fingerprint"], "hidden_size": model["hidden_size"]},
        tables=table_entries(files, rows, schemas), vector_dtype=config.output.vector_dtype, summary=summary, config=redacted(config), inputs=inputs,
        layout=layout_entry(shards.buckets, ["vectors", "users", "bt_coords", "dps_heads", "steerx_users", "recommended"],
                            config.output.row_group_bytes),
        methods=methods, steerstore_version=package_version(), scale_choice=dict(g["scale_curves"], **steerx),
        recommend=_recommend_entry(config, g))
    _guard(config, run, summary, g)
    save_state(store, version, g)  # the next incremental refresh starts from these statistics
    if lease is not None:
        lease.check()  # LeaseLost when another job took the store over: never publish beside it
    moved = store.publish(version, manifest.to_json_dict())
    summary["latest_moved"] = moved  # False: a newer version was published meanwhile (LATEST never moves back)
    timer.lap("publish", f"LATEST -> {version}" if moved else f"published {version}; LATEST stays at a newer version")
    summary["stage_seconds"] = dict(timer.stages)
    _report(run, config, {"status": "published", "summary": summary})
    run.cleanup()
    summary["retention"] = prune(store, config.retention, keep={version})
    print_summary(summary, config.output.store)
    return summary


def _recommend_entry(config: RefreshConfig, g: dict) -> dict:
    """The manifest's ``recommend``: the population's choice per condition, the prior it came from, the settings."""
    info = g.get("recommend")
    if not config.recommend.enabled or info is None:
        return {}
    return {"population": info["population"], "prior_per_token": info["prior"], "sample_users": info["users"],
            "sample_tokens": info["tokens"], "prior_tokens": config.recommend.prior_tokens,
            "validation_items": config.recommend.validation_items, "min_items": config.recommend.min_items,
            "multipliers": list(config.recommend.multipliers),
            "strengths": {c: vars(s) for c, s in (g.get("recommend_strengths") or {}).items()},
            "dps_guard": info.get("guard") or {}}


def report_uri(run: Run) -> str:
    """The run report of a version: its summary, and whether (or why not) it was published."""
    return storage.join(run.store.uri, "reports", f"{run.version}.json")


def _report(run: Run, config: RefreshConfig, report: dict) -> None:
    run.write_json(report_uri(run), {"version": run.version, "run": run.key, **report})


def _guard(config: RefreshConfig, run: Run, summary: dict, g: dict) -> None:
    """Refuse (PublishRefused, the version left unpublished and resumable) what must not replace the current version."""
    try:
        current = run.store.latest()
        previous = run.store.read_manifest(current) if current else None
    except StoreNotFound:  # LATEST names a missing version: this publish repairs it
        current, previous = None, None
    mean = g.get("population_mean")
    reasons = refusals(summary, (previous or {}).get("summary"), config.publish,
                       population_finite=mean is None or bool(np.isfinite(mean).all()))
    if not reasons:
        return
    if config.publish.force:
        log.warning("refresh: publishing %s although %s (publish.force)", run.version, "; ".join(reasons))
        summary["forced_past"] = reasons
        return
    _report(run, config, {"status": "refused", "reasons": reasons, "current_version": current, "summary": summary})
    raise PublishRefused(run.version, reasons, report_uri(run))


def _read(uri: str, config: RefreshConfig) -> pa.Table:
    from steerstore.jobs.refresh.workers import read_rows

    return read_rows(uri, config)


def _unattributed(shards: Shards) -> int:
    return sum(int(s["records_quarantined"]) for s in shards.summaries if s["bucket"] == UNATTRIBUTED)


def _version_tables(config: RefreshConfig, run: Run, g: dict, markers: list[dict], files: dict, rows: Counter,
                    schemas: dict) -> None:
    """The population vector, BT basis, DPS clusters (users counted over every shard) and DPS population."""
    store, version = run.store, run.version

    def write(table: str, data: pa.Table | None, name: str = "part-version.parquet") -> None:
        if data is not None and data.num_rows:
            storage.write_parquet(storage.join(store.table_uri(version, table), name),
                                  conform(data, schemas[table]), config.storage)
            files[table].append(name)
            rows[table] += data.num_rows

    caa_stored = sum(m["counts"]["stored"]["caa"] for m in markers)
    if g["population_row"] is not None and caa_stored:
        write("vectors", pa.Table.from_pylist([g["population_row"]], schema=VECTORS_SCHEMA), POPULATION_FILE)
    if g["theta_pop"] is not None and caa_stored:
        write("bt_basis", basis_rows(g["basis"], np.linalg.norm(g["population_mean"], axis=-1), g["feature_norms"],
                                     g["theta_pop"], g["population_row"], config.bt, g["n_sample"], g["scales"]["bt"]))
    if g.get("dps_centroids") is not None:
        counts: Counter = Counter()
        for m in markers:
            counts.update({int(c): n for c, n in m["cluster_counts"].items()})
        write("dps_clusters", dps_clusters_table(g["dps_centroids"], g["dps_clusters"] or {}, dict(counts),
                                                 config.dps, g["dps_model"]))
    write("dps_population", g.get("dps_population_table"))


def _summary(run: Run, shards: Shards, markers: list[dict], result: dict, g: dict, stats: list[dict]) -> dict:
    total: Counter = Counter()
    by_method: Counter = Counter()
    for m in markers:
        c = m["counts"]
        total.update({k: c.get(k, 0) for k in ("users_in", "users_kept_absent", "users_stored", "users_quarantined",
                                               "rows_kept", "rows_quarantined", "quarantine_rows")})
        by_method.update(c["users_by_method"])
    recommended: dict[str, Counter] = {}
    for m in markers:
        for condition, n in (m.get("recommended") or {}).items():
            recommended.setdefault(condition, Counter()).update(n)
    unattributed = _unattributed(shards)
    n_records = shards.total("records")
    by_kind: Counter = Counter()
    for s in shards.summaries:
        by_kind.update(s["records_by_kind"])
    summary = {
        "version": run.version, "input_rows": n_records, "input_rows_by_kind": dict(by_kind),
        "rows_kept": total["rows_kept"], "rows_quarantined": total["rows_quarantined"] + unattributed,
        "rows_without_user": unattributed, "rows_forgotten": shards.total("records_forgotten"),
        "users_in": total["users_in"], "users_kept_absent": total["users_kept_absent"],
        "users_stored": total["users_stored"],
        "users_quarantined": total["users_quarantined"], "users_by_method": dict(by_method),
        "quarantine_rows": total["quarantine_rows"] + unattributed,
        "shards": len(markers), "shards_reused": result["reused"], "shards_computed": result["computed"],
        "samples": g["samples"], "workers": _worker_stats(stats),
        "incremental": incremental_summary(run.store, g, markers),
        # users by the method chosen for them, per condition (population:…: too few items, the population's)
        "recommended": {c: dict(sorted(n.items())) for c, n in sorted(recommended.items())},
    }
    if (summary["rows_kept"] + summary["rows_quarantined"] + summary["rows_forgotten"] != n_records
            or summary["users_stored"] + summary["users_quarantined"] != summary["users_in"] + total["users_kept_absent"]
            or summary["users_in"] != shards.total("users")):
        raise ReconciliationError(f"inputs do not reconcile, nothing published: {summary}")
    return summary


def _worker_stats(stats: list[dict]) -> dict:
    """Model loads, and each stage's busy share of the workers' time alive (all workers together)."""
    alive = sum(s["alive"] for s in stats) or 1.0
    busy: Counter = Counter()
    work: Counter = Counter()
    for s in stats:
        busy.update(s["busy"])
        work.update(s.get("work", {}))
    return {"workers": len(stats), "nodes": len({s.get("node") for s in stats}),
            "model_loads": sum(s["model_loads"] for s in stats),
            "users_computed": dict(work),  # users through the model per method family (sample phase included)
            "busy_seconds": {k: round(v, 2) for k, v in busy.items()},
            "busy_fraction": {k: round(v / alive, 3) for k, v in busy.items() if k != "load"}}


def _drift(run: Run, config: RefreshConfig, markers: list[dict], g: dict) -> dict | None:
    """The sampled population direction against every user's (summed shard by shard): cosine and norm ratio per layer."""
    if g["population_mean"] is None:
        return None
    sums, weight, users = None, 0.0, 0
    for m in markers:
        try:
            data = np.load(io.BytesIO(storage.read_bytes(partial_uri(run, m["bucket"]), config.storage)))
        except FileNotFoundError:
            continue
        sums = data["sums"] if sums is None else sums + data["sums"]
        weight += float(data["weight"])
        users += int(data["users"])
    if sums is None or weight <= 0:
        return None
    full = sums / weight
    sample = g["population_mean"].astype(np.float64)
    cos = (full * sample).sum(-1) / np.maximum(np.linalg.norm(full, axis=-1) * np.linalg.norm(sample, axis=-1), 1e-30)
    return {"users": users, "sample_users": g["n_sample"], "cosine_min": float(cos.min()),
            "norm_ratio_max": float(np.max(np.linalg.norm(sample, axis=-1) / np.maximum(np.linalg.norm(full, axis=-1),
                                                                                        1e-30)))}
