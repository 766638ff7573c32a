"""Dataset helpers the refresh stages share: filters, counts, seeded samples, actor specs, stage timing."""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from steerstore.infra.config import to_dict
from steerstore.jobs.refresh.config import RefreshConfig, ResourcesConfig
from steerstore.operators.bt import in_sample, sample_key

log = logging.getLogger("steerstore")


def where(ds, column: str, value: str, equal: bool = True):
    """Rows whose ``column`` equals (or differs from / is null for) ``value``, as an Arrow batch filter."""
    def fn(batch: pa.Table) -> pa.Table:
        match = pc.fill_null(pc.equal(batch[column], value), False)
        return batch.filter(match if equal else pc.invert(match))
    return ds.map_batches(fn, batch_format="pyarrow")


class Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._t, 3)
        self._t = now
        log.info("stage %-10s %7.1f s  %s", stage, self.stages[stage], detail)


def redacted(config: RefreshConfig) -> dict:
    data = to_dict(config)
    for key in ("access_key_id", "secret_access_key", "session_token"):
        if data["storage"].get(key):
            data["storage"][key] = "***"
    return data


def where_not_null(ds, column: str):
    return ds.map_batches(lambda b: b.filter(pc.is_valid(b[column])), batch_format="pyarrow")


def value_counts(ds, column: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow"):
        for item in pc.value_counts(batch[column]).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steerstore")
    except PackageNotFoundError:
        return "unknown"


def min_list_length(batch: pa.Table, column: str, minimum: int) -> pa.Table:
    return batch.filter(pc.greater_equal(pc.fill_null(pc.list_value_length(batch[column]), 0), minimum))


def history_users(ok_users, config: RefreshConfig):
    """Prepared users with at least ``prepare.min_histories`` history items (the history methods' input)."""
    return ok_users.map_batches(min_list_length, fn_kwargs={"column": "histories",
                                                             "minimum": config.prepare.min_histories},
                                batch_format="pyarrow")


def model_actors(res: ResourcesConfig, batch_size: int) -> dict:
    """map_batches arguments of a model-actor stage (each actor loads the model once)."""
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=res.caa_actors), "batch_size": batch_size,
            "num_gpus": res.gpus_per_actor, "num_cpus": res.cpus_per_actor, "batch_format": "pyarrow"}


def exact_sample(ds, size: int, seed: int, total: int):
    """Exactly min(size, total) users: those with the smallest seeded keys.

    Users are over-sampled by their seeded key (the fraction doubles until enough are drawn),
    then cut to the ``size`` smallest keys; only user ids reach the driver.
    """
    want = min(size, total)
    fraction = min(1.0, 2.0 * size / max(total, 1))
    while True:
        ids = [r["user_id"] for r in ds.select_columns(["user_id"]).filter(
            lambda r, f=fraction: in_sample(r["user_id"], seed, f)).take_all()]
        if len(ids) >= want or fraction >= 1.0:
            break
        fraction = min(1.0, 2 * fraction)
    keep = set(sorted(ids, key=lambda u: sample_key(u, seed))[:size])
    return ds.filter(lambda r: r["user_id"] in keep)


def inner_join(left, right, partitions: int):
    """Rows of ``left`` whose user_id is in ``right``, with right's columns (materialized).

    An empty ``right`` (every user failed the stage) gives an empty result: Ray's hash join
    cannot join against blocks without columns.
    """
    if right.count() == 0:
        return left.limit(0).materialize()
    return left.join(right, "inner", num_partitions=partitions, on=("user_id",)).materialize()


def failed_users(ds) -> dict[str, str]:
    return {r["user_id"]: r["reason"] for r in where(ds, "status", "ok", equal=False)
            .select_columns(["user_id", "reason"]).take_all()}
