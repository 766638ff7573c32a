"""The nightly refresh job: inputs -> shards -> global statistics -> one model pass per user -> a new store version.

Launch: ``steerstore refresh --config refresh.yaml`` (embedded local Ray) or
``steerstore refresh --config refresh.yaml --ray.address auto`` (on a Ray cluster).

1. **Shards** (CPU, Ray Data): read and validate every input row; group rows by a hash bucket of
   the user id; write one shard per bucket (user rows) to the version's staging folder.
2. **Global statistics** from seeded samples, on the model workers: population direction, BT
   basis and θ_pop, α per method, DPS clusters and population baseline, SteerX pool and γ/layer.
   With a current version (incremental refresh, ``incremental.py``), each family's statistics
   are reused (frozen) until they are due.
3. **Shards through the model workers**, streaming (users whose rows, settings and statistics did
   not change are carried forward from the current version without model work): the user pass, descriptions, the
   description pass and the writer; each shard's tables go straight into its bucket files,
   then its completion marker. The model workers are long-lived actors: each loads the model once.
4. **Publish**: the version-wide tables, reconciliation of every input row and user, the publish
   guard (``guard.py``: no empty version, no collapse against the current one), the manifest,
   then ``LATEST``; the staging folder is deleted.

Killed at any point, the same command resumes: the shards, statistics and completed shards of
the unpublished version are reused, and the published version is the one an uninterrupted run
would have written.
"""

from __future__ import annotations

import logging
import math

from steerstore.infra.cluster import connect
from steerstore.infra.lease import StoreLease
from steerstore.infra.store import SteeringStore
from steerstore.jobs.refresh.common import DeadlineExceeded, Timer
from steerstore.jobs.refresh.config import (
    InputsConfig,
    OutputConfig,
    ReconciliationError,
    RefreshConfig,
    ResourcesConfig,
)
from steerstore.jobs.refresh.executor import run_shards
from steerstore.jobs.refresh.globals import compute_globals
from steerstore.jobs.refresh.guard import PublishConfig, PublishRefused
from steerstore.jobs.refresh.incremental import IncrementalConfig, Previous, keep_buckets, previous_version
from steerstore.jobs.refresh.inputs import read_input
from steerstore.jobs.refresh.pool import Pool
from steerstore.jobs.refresh.publish import publish
from steerstore.jobs.refresh.run import Run, run_key
from steerstore.jobs.refresh.shards import Shards, count_users, prepare_shards
from steerstore.operators.runtime.loading import model_shape
from steerstore.operators.smoothing import resolve_model
from steerstore.schemas.store import bucket_count, bucket_of_file

__all__ = ["DeadlineExceeded", "IncrementalConfig", "InputsConfig", "OutputConfig", "PublishConfig", "PublishRefused", "ReconciliationError", "RefreshConfig",
           "ResourcesConfig", "cpus_needed", "main", "read_input"]

log = logging.getLogger("steerstore")


def main(config: RefreshConfig) -> dict:
    """Run the refresh (or resume an interrupted one) and publish a new store version. Returns the summary."""
    timer = Timer(config.resources.deadline_s)
    connect(config.ray, min_cpus=cpus_needed(config.resources))
    if config.steerx.enabled and config.inputs.histories and config.steerx.smoothing.enabled:
        config.steerx.smoothing.check_engine()  # fail before any work when the engine cannot run
    # and when the content guard on strengths (α; SteerX's γ and λ; the recommendation's DPS γ) cannot score BERTScore
    config.scale.check_content_guard(bool(config.inputs.histories and (
        (config.steerx.enabled and config.steerx.vectors.enabled)
        or (config.recommend.enabled and config.dps.enabled and "dps" in config.recommend.methods))))
    inputs = {"preference_pairs": config.inputs.preference_pairs}
    if config.inputs.histories:
        inputs["histories"] = config.inputs.histories
    active = {"dps": config.dps.enabled and "histories" in inputs,
              "steerx": config.steerx.enabled and "histories" in inputs}
    store = SteeringStore(config.output.store, config.storage)
    with StoreLease(store.uri, config.storage, config.lease) as lease:  # one writer at a time
        previous = previous_version(store)  # read under the lease: no other job publishes meanwhile
        timer.lap("start", f"Ray connected, store lease held by {lease.holder}"
                  + (f"; current version {previous.version}" if previous else "; first version"))
        while True:
            summary = _run(config, store, lease, inputs, active, timer, previous)
            if summary is not None:
                return summary  # else: the interrupted run used other weights; a new version starts


def _run(config: RefreshConfig, store: SteeringStore, lease: StoreLease, inputs: dict[str, str], active: dict,
         timer: Timer, previous: Previous | None) -> dict | None:
    run = Run.start(store, run_key(inputs, config, None if previous is None else previous.version))
    shape = model_shape(config.model)
    shards, estimated = _shards(config, run, inputs, active, shape, timer, previous)
    # the model workers start once the CPU phase is done (they hold their CPUs/GPUs for the rest of the run)
    _check_cpus(config)
    pool, gen = _workers(config, active["steerx"], run.globals_uri)
    model = pool.info
    if not run.check_model(model["model_fingerprint"]):
        pool.shutdown()
        gen.shutdown()
        return None
    timer.lap("workers", f"{len(pool)} model workers ({model['model_id']}); version {run.version}"
              + (" (resumed)" if run.resumed else ""))
    try:
        timer.check("the shards phase")
        g = compute_globals(config, run, shards, pool, gen, model, estimated, active, timer, previous)
        timer.check("the global statistics")
        result = run_shards(config, run, _buckets(shards, g, previous), pool, gen, g, timer)
        timer.lap("model pass", f"{result['computed']} shards computed, {result['reused']} reused")
        stats = pool.stats() + ([] if gen is pool else gen.stats())
        return publish(config, run, inputs, shards, g, result, stats, timer, lease)
    finally:
        pool.shutdown()
        if gen is not pool:
            gen.shutdown()


def cpus_needed(res: ResourcesConfig) -> int:
    """Logical CPUs a refresh holds at once: the model workers, the smoothing LLM's, and one for the writer tasks."""
    return math.ceil((res.model_actors + res.generation_actors) * res.cpus_per_actor) + 1


def _check_cpus(config: RefreshConfig) -> None:
    """Fail with the fix when the workers would take every CPU: the writer and reduce tasks would wait forever."""
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    need = cpus_needed(config.resources)
    if have < need:
        raise ValueError(f"the Ray cluster has {have:g} CPUs; this refresh needs {need}: {config.resources.model_actors} "
                         f"model worker(s) and up to {config.resources.generation_actors} smoothing worker(s) of "
                         f"resources.cpus_per_actor={config.resources.cpus_per_actor:g}, plus 1 for the writers. "
                         "Lower resources.cpus_per_actor, or give Ray more (logical) CPUs: ray.num_cpus")


def _workers(config: RefreshConfig, steerx: bool, globals_uri: str) -> tuple[Pool, Pool]:
    """The model workers, and the smoothing LLM's (the same pool when it is the job's model)."""
    pool = Pool(config, config.model, config.resources.model_actors, globals_uri=globals_uri)
    smoothing = resolve_model(config.steerx.smoothing, config.model)
    if not steerx or not config.steerx.smoothing.enabled or smoothing == config.model:
        return pool, pool
    return pool, Pool(config, smoothing, config.resources.generation_actors, name="smoothing",
                      globals_uri=globals_uri)


def _buckets(shards: Shards, g: dict, previous: Previous | None) -> list[int]:
    """The buckets to process: those with input users, and (absent users kept) those of the previous version."""
    carry = g.get("carry")
    if carry is None or carry["absent"] != "keep" or previous is None:
        return shards.with_users
    files = (previous.manifest.get("tables", {}).get("users") or {}).get("files", [])
    before = {b for b in map(bucket_of_file, files) if b is not None}
    return sorted(set(shards.with_users) | before)


def _shards(config: RefreshConfig, run: Run, inputs: dict[str, str], active: dict, model: dict,
            timer: Timer, previous: Previous | None = None) -> tuple[Shards, int]:
    """Phase 1, or its saved result when resuming. ``model``: the model's shape (num_layers, hidden_size),
    for the bucket count (the previous version's, when rows are carried from it)."""
    saved = run.read_json(run.shards_done_uri)
    if saved is not None:
        timer.lap("shards ready", f"{len(saved['summaries'])} shards of the interrupted run reused")
        return Shards(saved["buckets"], saved["summaries"]), saved["estimated_users"]
    estimated = count_users(config, inputs)
    layers, _ = config.caa.resolve_layers(model["num_layers"])
    per_user = len(layers)
    if active["steerx"] and config.steerx.vectors.enabled:
        per_user += len(config.steerx.vectors.resolve_layers(model["num_layers"])) * len(config.steerx.sources)
    buckets = keep_buckets(config, previous, max(
        config.output.min_buckets, bucket_count(estimated, config.output.users_per_bucket,
                                                estimated * per_user * model["hidden_size"] * 4,
                                                config.output.bucket_bytes)))
    shards = prepare_shards(config, run, inputs, active["dps"] or active["steerx"], buckets, estimated)
    run.write_json(run.shards_done_uri, {"buckets": buckets, "summaries": shards.summaries,
                                         "estimated_users": estimated})
    timer.lap("shards", f"{shards.total('records')} input rows, {shards.total('users')} users in "
                        f"{len(shards.with_users)} shards of {buckets} buckets")
    return shards, estimated
