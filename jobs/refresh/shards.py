"""Phase 1 (CPU, Ray Data): inputs → validated records → one shard per hash bucket of the user id.

A shard holds every user of one store bucket as user rows (``USER_ROW_SCHEMA``: the user's valid
pairs and history items, the rows dropped while preparing, a content fingerprint), plus the
validation quarantine rows of those users. Shards are the unit of everything after this phase:
the model pass, the writers (one bucket file per table and shard) and resume. Grouping rows by
bucket is the only all-to-all step of the refresh, and it moves input text, never vectors.

Each shard also writes the users that can enter a global statistic's seeded sample (a generous
superset, chosen by key against the estimated user count) to a small candidates file, so the
sample phase reads a few thousand users instead of every shard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from steerstore.infra import storage
from steerstore.infra.lifecycle import forgotten_hashes, hashed, names_forgotten
from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.jobs.refresh.inputs import read_input
from steerstore.jobs.refresh.run import Run
from steerstore.jobs.refresh.samples import SAMPLE_KINDS, candidate_mask, sample_plan
from steerstore.operators.prepare import PrepareUsers
from steerstore.operators.validate import ValidateRecords
from steerstore.schemas.store import QUARANTINE_SCHEMA, USER_ROW_SCHEMA, user_bucket

log = logging.getLogger("steerstore")

UNATTRIBUTED = -1  # the group of rows without a user id: quarantined, in no shard
SUMMARY_SCHEMA = pa.schema([
    ("bucket", pa.int32()), ("users", pa.int64()), ("users_ok", pa.int64()), ("records", pa.int64()),
    ("records_quarantined", pa.int64()), ("records_forgotten", pa.int64()), ("candidates", pa.int64()),
    ("records_by_kind", pa.map_(pa.string(), pa.int64())),
    ("eligible", pa.map_(pa.string(), pa.int64())),
])


@dataclass
class Shards:
    buckets: int
    summaries: list[dict]  # one per bucket with users (and the unattributed group), see SUMMARY_SCHEMA

    def total(self, key: str) -> int:
        return sum(int(s.get(key) or 0) for s in self.summaries)

    def eligible(self, kind: str) -> int:
        return sum(int(dict(s["eligible"]).get(kind, 0)) for s in self.summaries)

    @property
    def with_users(self) -> list[int]:
        return sorted(int(s["bucket"]) for s in self.summaries if s["bucket"] != UNATTRIBUTED and s["users"])


def _use_shuffle(config: RefreshConfig) -> None:
    import ray.data

    ray.data.DataContext.get_current().shuffle_strategy = {
        "sort": ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
        "hash": ray.data.context.ShuffleStrategy.HASH_SHUFFLE}[config.resources.shuffle]


def count_users(config: RefreshConfig, inputs: dict[str, str]) -> int:
    """Distinct user ids in the raw inputs (a shuffle of ids only; nothing but the count reaches the driver)."""
    from steerstore.schemas.inputs import parse_json_line, user_id_of

    _use_shuffle(config)

    def ids(batch: pa.Table) -> pa.Table:
        values = [user_id_of(parse_json_line(line)[0]) if line and line.strip() else None
                  for line in batch.column("text").to_pylist()]
        return pa.table({"user_id": pa.array(values, pa.string())}).filter(pc.is_valid(pa.array(values, pa.string())))

    parts = [read_input(uri, config.inputs.format, config.storage).map_batches(ids, batch_format="pyarrow",
                                                                                       max_retries=config.resources.task_retries)
             for uri in inputs.values()]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.groupby("user_id", num_partitions=config.resources.prepare_partitions).count().count()


def _with_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    users = batch.column("user_id").to_pylist()
    return batch.append_column("bucket", pa.array([UNATTRIBUTED if u is None else user_bucket(u, buckets)
                                                   for u in users], pa.int32()))


def _record_quarantine(records: list[dict]) -> list[dict]:
    return [{"input": r["kind"], "source": r["source"], "user_id": r["user_id"], "record_id": r["record_id"],
             "stage": "validate", "reason": r["reason"], "raw": r["raw"]} for r in records]


def write_shard(group: pa.Table, run: Run, config: RefreshConfig, history_methods: bool, plan: dict,
                forgotten: frozenset = frozenset()) -> pa.Table:
    """map_groups function: every validated record of one bucket -> its shard files; returns one summary row.

    Rows of forgotten users (``forgotten``: sha256 of their ids, from ``steerstore forget``) are
    dropped here, counted and nothing else: no quarantine row keeps their text.
    """
    bucket = int(group.column("bucket")[0].as_py())
    records = group.drop_columns(["bucket"]).to_pylist()
    n_in = len(records)
    by_kind: dict[str, int] = {}
    for r in records:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    if forgotten:  # by their id, or (rows without one) by an id named in their raw text
        records = [r for r in records if not (hashed(r["user_id"]) in forgotten if r["user_id"] is not None
                                              else names_forgotten(r["raw"], forgotten))]
    bad = [r for r in records if r["status"] != "ok"]
    summary = {"bucket": bucket, "users": 0, "users_ok": 0, "records": n_in, "records_quarantined": len(bad),
               "records_forgotten": n_in - len(records), "candidates": 0, "records_by_kind": list(by_kind.items()),
               "eligible": []}
    quarantine = pa.Table.from_pylist(_record_quarantine(bad), schema=QUARANTINE_SCHEMA)
    if bucket == UNATTRIBUTED:
        storage.write_parquet(run.unattributed_uri, quarantine, config.storage)
        return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)
    prepare = PrepareUsers(config.prepare, history_methods)
    by_user: dict[str, list[dict]] = {}
    for r in records:
        by_user.setdefault(r["user_id"], []).append(r)
    users = pa.concat_tables([prepare(pa.Table.from_pylist(by_user[u], schema=group.drop_columns(["bucket"]).schema))
                              for u in sorted(by_user)]) if by_user else USER_ROW_SCHEMA.empty_table()
    users = users.set_column(users.schema.get_field_index("bucket"), "bucket",
                             pa.array([bucket] * users.num_rows, pa.int32()))
    storage.write_parquet(run.shard_uri(bucket), users, config.storage)
    storage.write_parquet(run.shard_quarantine_uri(bucket), quarantine, config.storage)
    ok = users.filter(pc.equal(users.column("status"), "ok"))
    eligible = {kind: int(sum(spec.eligible(config, r) for r in ok.select(["pairs", "histories"]).to_pylist()))
                for kind, spec in SAMPLE_KINDS.items()}
    mask = candidate_mask(ok, config, plan)
    candidates = ok.filter(pa.array(mask, pa.bool_()))
    storage.write_parquet(run.candidates_uri(bucket), candidates, config.storage)
    summary.update(users=users.num_rows, users_ok=ok.num_rows, candidates=candidates.num_rows,
                   eligible=list(eligible.items()))
    return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)


def prepare_shards(config: RefreshConfig, run: Run, inputs: dict[str, str], history_methods: bool,
                   buckets: int, estimated_users: int) -> Shards:
    """Validate every input row and write one shard per bucket (CPU only); the summaries come back."""
    from ray.data import ActorPoolStrategy

    res = config.resources
    _use_shuffle(config)
    validated = [
        read_input(uri, config.inputs.format, config.storage).map_batches(
            ValidateRecords, fn_constructor_kwargs={"kind": kind, "config": config.validate, "model": config.model},
            compute=ActorPoolStrategy(size=res.validate_actors), batch_size=res.validate_batch_size,
            batch_format="pyarrow", max_restarts=res.task_retries, max_task_retries=res.task_retries)
        for kind, uri in inputs.items()
    ]
    records = validated[0].union(*validated[1:]) if len(validated) > 1 else validated[0]
    plan = sample_plan(config, estimated_users)
    forgotten = frozenset(forgotten_hashes(run.store))
    summaries = records.map_batches(_with_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow",
                                    max_retries=res.task_retries) \
        .groupby("bucket", num_partitions=min(max(buckets, 1), res.prepare_partitions)) \
        .map_groups(write_shard, fn_kwargs={"run": run, "config": config, "history_methods": history_methods,
                                            "plan": plan, "forgotten": forgotten}, batch_format="pyarrow",
                    max_retries=res.task_retries).take_all()
    for s in summaries:
        s["records_by_kind"] = dict(s["records_by_kind"] or [])
        s["eligible"] = dict(s["eligible"] or [])
    return Shards(buckets=buckets, summaries=sorted(summaries, key=lambda s: s["bucket"]))
