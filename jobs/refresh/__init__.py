"""The nightly refresh job: inputs -> validated -> one row per user -> CAA vectors -> new store version.

Launch: ``steerstore refresh --config refresh.yaml`` (embedded local Ray) or
``steerstore refresh --config refresh.yaml --ray.address auto`` (on a Ray cluster).
"""

from __future__ import annotations

import datetime as dt
import logging

from steerstore.infra.cluster import connect
from steerstore.infra.store import SteeringStore
from steerstore.jobs.refresh.caa import caa_stage
from steerstore.jobs.refresh.common import Timer, package_version, redacted, where, where_not_null
from steerstore.jobs.refresh.config import (
    InputsConfig,
    OutputConfig,
    ReconciliationError,
    RefreshConfig,
    ResourcesConfig,
)
from steerstore.jobs.refresh.dps import dps_stage
from steerstore.jobs.refresh.inputs import read_input
from steerstore.jobs.refresh.reconcile import print_summary, reconcile
from steerstore.jobs.refresh.steerx import steerx_stage
from steerstore.jobs.refresh.write import write_version
from steerstore.operators.prepare import prepare_user_group
from steerstore.operators.validate import ValidateRecords
from steerstore.schemas.methods import Family
from steerstore.schemas.store import Manifest

__all__ = ["InputsConfig", "OutputConfig", "ReconciliationError", "RefreshConfig", "ResourcesConfig", "main",
           "read_input"]

log = logging.getLogger("steerstore")


def main(config: RefreshConfig) -> dict:
    """Run the refresh and publish a new store version. Returns the run summary."""
    timer = Timer()
    _start_ray(config)
    if config.steerx.enabled and config.inputs.histories and config.steerx.smoothing.enabled:
        config.steerx.smoothing.check_engine()  # fail before any work when the engine cannot run
    store = SteeringStore(config.output.store, config.storage)
    version = store.new_version_id()
    log.info("refresh -> %s version %s", config.output.store, version)
    inputs = {"preference_pairs": config.inputs.preference_pairs}
    if config.inputs.histories:
        inputs["histories"] = config.inputs.histories

    records = validate(config, inputs, timer)
    attributed = where_not_null(records, "user_id")
    dps_active = config.dps.enabled and "histories" in inputs
    steerx_active = config.steerx.enabled and "histories" in inputs
    users = prepare(config, attributed, dps_active or steerx_active, timer)
    ok_users = where(users, "status", "ok")
    caa = caa_stage(config, users, ok_users, timer)
    dps_out = dps_stage(config, ok_users, timer) if dps_active else None
    steerx_out = steerx_stage(config, ok_users, timer) if steerx_active else None
    model_info = _model_info(caa.model_info, caa.n_stored, dps_out, steerx_out)
    eligibility = {"min_pairs": config.prepare.min_pairs, "min_histories": config.prepare.min_histories,
                   "dps": dps_active, "steerx": steerx_active, "bt": caa.theta_pop is not None}
    rec = reconcile(version, records, attributed, users, caa, dps_out, steerx_out, eligibility)
    summary = rec.summary
    tables, layout = write_version(config, store, version, caa, rec, dps_out, steerx_out)
    timer.lap("write", f"{sum(t.rows for t in tables.values())} rows")
    summary["stage_seconds"] = dict(timer.stages)
    steerx_choice = ({"steerx": {"recommended": steerx_out["recommended"], "curve": steerx_out["calibration"]}}
                     if steerx_out and steerx_out["recommended"] else {})
    manifest = Manifest(
        version=version, created_at=dt.datetime.now(dt.timezone.utc).isoformat(), model=model_info, tables=tables,
        summary=summary, config=redacted(config), inputs=inputs, layout=layout,
        methods=[f.value for f in Family if rec.method_counts.get(f)],
        steerstore_version=package_version(), scale_choice=dict(caa.scale_curves, **steerx_choice))
    store.publish(version, manifest.to_json_dict())
    timer.lap("publish", f"LATEST -> {version}")
    summary["stage_seconds"] = dict(timer.stages)
    print_summary(summary, config.output.store)
    return summary


def _start_ray(config: RefreshConfig) -> None:
    import ray.data

    connect(config.ray)
    ray.data.DataContext.get_current().shuffle_strategy = {
        "sort": ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
        "hash": ray.data.context.ShuffleStrategy.HASH_SHUFFLE}[config.resources.shuffle]


def validate(config: RefreshConfig, inputs: dict[str, str], timer: Timer):
    """Every input row read and validated (bad rows stay, marked quarantined); materialized."""
    from ray.data import ActorPoolStrategy

    res = config.resources
    validated = [
        read_input(uri, config.inputs.format, config.storage).map_batches(
            ValidateRecords, fn_constructor_kwargs={"kind": kind, "config": config.validate, "model": config.model},
            compute=ActorPoolStrategy(size=res.validate_actors), batch_size=res.validate_batch_size,
            batch_format="pyarrow")
        for kind, uri in inputs.items()
    ]
    records = (validated[0].union(*validated[1:]) if len(validated) > 1 else validated[0]).materialize()
    timer.lap("validate", f"{records.count()} input rows")
    return records


def prepare(config: RefreshConfig, attributed, history_methods: bool, timer: Timer):
    """One row per user (CPU); duplicate ids and too-few-rows checks happen here; materialized."""
    users = attributed.groupby("user_id", num_partitions=config.resources.prepare_partitions).map_groups(
        prepare_user_group, fn_kwargs={"config": config.prepare, "history_methods": history_methods},
        batch_format="pyarrow").materialize()
    timer.lap("prepare", f"{users.count()} users")
    return users


def _model_info(info: dict, n_caa: int, dps_out: dict | None, steerx_out: dict | None) -> dict:
    """The manifest's model entry: from CAA's rows, else DPS's, else SteerX's."""
    info = dict(info)
    if dps_out is not None and not n_caa and dps_out["model"] is not None:
        info.update(id=dps_out["model"]["model_id"], fingerprint=dps_out["model"]["model_fingerprint"])
    if steerx_out is not None and "fingerprint" not in info and steerx_out["model"] is not None:
        info.update(id=steerx_out["model"]["model_id"], fingerprint=steerx_out["model"]["model_fingerprint"])
    return info
