"""The nightly refresh job: inputs -> validated -> one row per user -> CAA vectors -> new store version.

Launch: ``steerstore refresh --config refresh.yaml`` (embedded local Ray) or
``steerstore refresh --config refresh.yaml --ray.address auto`` (on a Ray cluster).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra import storage
from infra.cluster import RayConfig, connect
from infra.config import check, option, to_dict
from infra.storage import SteeringStore, StorageConfig
from operators.bt import (BTConfig, build_basis, compose, feature_scales, finalize_users, in_sample,
                          population_theta, sample_key)
from operators.cluster import EmbedUsers, kmeans
from operators.dps import (DPS_OUTPUT_SCHEMA, DPSConfig, DPSHeads, PopulationPCS, cluster_sequences,
                           dps_user_rows)
from operators.caa import (CAAConfig, CAAVectors, population_mean, population_partials, vector_row,
                           vectors_array)
from operators.prepare import PrepareConfig, prepare_user_group
from operators.runtime import ModelConfig, TextEncoder
from operators.scale import ScaleConfig, choose_scales_task
from operators.smoothing import PROMPT_VERSION as SMOOTHING_PROMPT_VERSION
from operators.smoothing import (hf_engine, resolve_model, smooth, special_strings, user_context,
                                 vllm_engine)
from operators.steerx import STYLE_TEMPLATE, SteerXAnchors, SteerXConfig, SteerXStyleVectors, choose_recommended
from operators.validate import ValidateConfig, ValidateRecords
from schemas.store import (BT_BASIS_SCHEMA, BUCKETED_TABLES, DPS_CLUSTERS_SCHEMA, DPS_HEADS_SCHEMA,
                           DPS_POPULATION_SCHEMA, LAYOUT_KIND, POPULATION_FILE, QUARANTINE_SCHEMA, STEERX_USERS_SCHEMA,
                           STEERX_TOKEN_EFFECTS_SCHEMA, STORE_TABLES, USERS_SCHEMA, VECTORS_SCHEMA, Manifest,
                           TableEntry, bucket_count, conform, user_bucket)

log = logging.getLogger("steerstore")


@dataclass
class InputsConfig:
    preference_pairs: str = option(
        "", help="URI of preference pairs: a .jsonl/.jsonl.gz/.parquet file or a folder of them (local or s3://)")
    histories: str | None = option(None, help="URI of user histories (same formats); optional for CAA")
    format: Literal["auto", "jsonl", "parquet"] = option("auto", help="input format; auto = from the file extension")

    def __post_init__(self) -> None:
        check(bool(self.preference_pairs), "inputs.preference_pairs is required (a file or folder URI)")


@dataclass
class OutputConfig:
    store: str = option("./steerstore-out/store", help="store URI: a local folder or s3://bucket/prefix")
    users_per_bucket: int = option(
        4096, help="users per hash-bucket file of the per-user tables (fewer: smaller files and shuffle groups)")
    row_group_bytes: int = option(
        256 << 10, help="about this many bytes per Parquet row group of the per-user tables (what a lookup reads)")
    bucket_bytes: int = option(
        64 << 20, help="about this many bytes of vectors per bucket file at most: models with large vectors get "
                       "more buckets than users_per_bucket gives, so file footers and write tasks stay small")

    def __post_init__(self) -> None:
        check(self.users_per_bucket >= 1, "output.users_per_bucket must be >= 1")
        check(self.row_group_bytes >= 1024, "output.row_group_bytes must be >= 1024")
        check(self.bucket_bytes >= self.row_group_bytes, "output.bucket_bytes must be >= output.row_group_bytes")


@dataclass
class ResourcesConfig:
    """How stages are scheduled (operators know nothing of this)."""

    validate_actors: int = option(1, help="actors validating input rows (each loads the tokenizer once)")
    validate_batch_size: int = option(2048, help="input rows per validation batch")
    shuffle: Literal["sort", "hash"] = option(
        "sort", help="how rows are grouped by user: sort (tasks; fast to start) or hash (aggregator actors; "
                     "Ray's default, starts ~10 s slower but scales to very many partitions)")
    prepare_partitions: int = option(
        8, help="hash partitions when grouping rows by user (raise to a few per CPU on a cluster)")
    caa_actors: int = option(1, help="model actors per model stage (activations, DPS scoring; each loads the model once)")
    caa_batch_size: int = option(16, help="users per activation batch")
    dps_batch_size: int = option(4, help="users per DPS head-scoring batch (each user's items × candidate heads)")
    embed_actors: int = option(1, help="sentence-encoder actors embedding users' histories for DPS clusters")
    embed_gpus_per_actor: float = option(0.0, help="GPUs per sentence-encoder actor (0: CPU, one core each)")
    gpus_per_actor: float = option(0.0, help="GPUs per activation actor (1 on a GPU cluster)")
    cpus_per_actor: float = option(
        2.0, help="CPUs reserved per activation actor; Ray sets the actor's torch threads to this (2 fits the demo machine)")
    rows_per_file: int = option(100_000, help="most rows per Parquet file in the store")

    def __post_init__(self) -> None:
        check(min(self.validate_actors, self.caa_actors, self.embed_actors) >= 1, "resources: actor counts must be >= 1")
        check(self.embed_gpus_per_actor >= 0, "resources.embed_gpus_per_actor must be >= 0")
        check(self.prepare_partitions >= 1, "resources.prepare_partitions must be >= 1")
        check(min(self.validate_batch_size, self.caa_batch_size, self.dps_batch_size) >= 1,
              "resources: batch sizes must be >= 1")
        check(self.gpus_per_actor >= 0 and self.cpus_per_actor > 0, "resources: gpus >= 0 and cpus > 0 per actor")


@dataclass
class RefreshConfig:
    inputs: InputsConfig = option(None, help="where the input tables are")
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig, metadata={"help": "where the store is"})
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})
    ray: RayConfig = dataclasses.field(default_factory=RayConfig, metadata={"help": "Ray connection"})
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig, metadata={"help": "validation"})
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig, metadata={"help": "per-user prepare"})
    caa: CAAConfig = dataclasses.field(default_factory=CAAConfig, metadata={"help": "CAA vectors"})
    bt: BTConfig = dataclasses.field(default_factory=BTConfig, metadata={"help": "preference basis and ideal points"})
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig, metadata={"help": "choice of α per method"})
    dps: DPSConfig = dataclasses.field(default_factory=DPSConfig, metadata={"help": "DPS preference heads"})
    steerx: SteerXConfig = dataclasses.field(default_factory=SteerXConfig,
                                             metadata={"help": "SteerX leave-one-out token effects and anchors"})
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig, metadata={"help": "scheduling"})

    def __post_init__(self) -> None:
        check(self.inputs is not None, "inputs.preference_pairs is required")


class ReconciliationError(RuntimeError):
    """Some input user ended in neither the store nor quarantine: nothing is published."""


def _where(ds, column: str, value: str, equal: bool = True):
    """Rows whose ``column`` equals (or differs from / is null for) ``value``, as an Arrow batch filter."""
    def fn(batch: pa.Table) -> pa.Table:
        match = pc.fill_null(pc.equal(batch[column], value), False)
        return batch.filter(match if equal else pc.invert(match))
    return ds.map_batches(fn, batch_format="pyarrow")


_PARQUET_EXT = (".parquet", ".pq")
_JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")


def _input_format(uri: str, fmt: str, cfg: StorageConfig | None = None) -> str:
    if fmt != "auto":
        return fmt
    name = uri.rstrip("/").lower()
    if name.endswith(_PARQUET_EXT):
        return "parquet"
    if name.endswith(_JSONL_EXT):
        return "jsonl"
    files = storage.list_files(uri, cfg)
    kinds = {_input_format(f, "auto") for f in files if f.lower().endswith(_PARQUET_EXT + _JSONL_EXT)}
    if len(kinds) != 1:
        raise ValueError(f"cannot tell the format of {uri}: set inputs.format to jsonl or parquet")
    return kinds.pop()


def read_input(uri: str, fmt: str, cfg: StorageConfig):
    """A Ray dataset of raw rows: JSONL lines (``text``) or Parquet rows, with ``path``."""
    import ray.data

    fs, path = storage.filesystem(uri, cfg)
    fmt = _input_format(uri, fmt, cfg)
    if fmt == "parquet":
        return ray.data.read_parquet(path, filesystem=fs, include_paths=True)
    gz = path.endswith(".gz")
    return ray.data.read_text(path, filesystem=fs, include_paths=True,
                              arrow_open_stream_args={"compression": "gzip"} if gz else None)


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._t, 3)
        self._t = now
        log.info("stage %-10s %7.1f s  %s", stage, self.stages[stage], detail)


def _write(ds, store: SteeringStore, version: str, table: str, cfg: RefreshConfig) -> None:
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


def _write_bucketed(parts: list, store: SteeringStore, version: str, table: str, buckets: int,
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


def _redacted(config: RefreshConfig) -> dict:
    data = to_dict(config)
    for key in ("access_key_id", "secret_access_key", "session_token"):
        if data["storage"].get(key):
            data["storage"][key] = "***"
    return data


def main(config: RefreshConfig) -> dict:
    """Run the refresh and publish a new store version. Returns the run summary."""
    import ray.data
    from ray.data import ActorPoolStrategy

    timer = _Timer()
    connect(config.ray)
    ray.data.DataContext.get_current().shuffle_strategy = {
        "sort": ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
        "hash": ray.data.context.ShuffleStrategy.HASH_SHUFFLE}[config.resources.shuffle]
    if config.steerx.enabled and config.inputs.histories and config.steerx.smoothing.enabled:
        config.steerx.smoothing.check_engine()  # fail before any work when the engine cannot run
    store = SteeringStore(config.output.store, config.storage)
    version = store.new_version_id()
    res = config.resources
    log.info("refresh -> %s version %s", config.output.store, version)

    # 1. read + validate every input row (bad rows stay, marked quarantined)
    inputs = {"preference_pairs": config.inputs.preference_pairs}
    if config.inputs.histories:
        inputs["histories"] = config.inputs.histories
    validated = [
        read_input(uri, config.inputs.format, config.storage).map_batches(
            ValidateRecords, fn_constructor_kwargs={"kind": kind, "config": config.validate, "model": config.model},
            compute=ActorPoolStrategy(size=res.validate_actors), batch_size=res.validate_batch_size,
            batch_format="pyarrow")
        for kind, uri in inputs.items()
    ]
    records = (validated[0].union(*validated[1:]) if len(validated) > 1 else validated[0]).materialize()
    n_records = records.count()
    timer.lap("validate", f"{n_records} input rows")

    # 2. one row per user (CPU); duplicate ids and too-few-rows checks happen here
    attributed = _where_not_null(records, "user_id")
    dps_active = config.dps.enabled and "histories" in inputs
    steerx_active = config.steerx.enabled and "histories" in inputs
    users = attributed.groupby("user_id", num_partitions=res.prepare_partitions).map_groups(
        prepare_user_group, fn_kwargs={"config": config.prepare, "history_methods": dps_active or steerx_active},
        batch_format="pyarrow").materialize()
    n_users = users.count()
    timer.lap("prepare", f"{n_users} users")

    # 3. basis sample: a seeded sample of users through the model, reduced to a preference basis
    ok_users = _where(users, "status", "ok")
    caa_users = ok_users.map_batches(_min_list_length, fn_kwargs={"column": "pairs", "minimum": config.prepare.min_pairs},
                                     batch_format="pyarrow")
    caa_kwargs = {"config": config.caa, "model": config.model}
    actors = _model_actors(res, res.caa_batch_size)
    bt = config.bt if config.bt.enabled else None
    basis = feature_norms = None
    sample_fraction = 0.0
    if bt is not None:
        n_ok = caa_users.count()
        sample_fraction = min(1.0, bt.sample_users / max(n_ok, 1))
        sample = caa_users.filter(lambda row: in_sample(row["user_id"], bt.seed, sample_fraction))
        sample_rows = _where(sample.map_batches(CAAVectors, fn_constructor_kwargs=caa_kwargs, **actors),
                             "status", "ok").to_arrow_refs()
        sample_table = pa.concat_tables(ray.get(sample_rows)) if sample_rows else None
        if sample_table is not None and sample_table.num_rows:
            w = sample_table.column("weight_sum").to_numpy()
            means = vectors_array(sample_table)
            sample_population = np.einsum("u,ulh->lh", w, means) / w.sum()
            basis = build_basis(means, sample_population, bt.k)
            feature_norms = feature_scales(means)
        timer.lap("bt-basis", f"basis k={bt.k} from {0 if sample_table is None else sample_table.num_rows} users")

    # 4. activations -> per-user weighted directions and BT features (model actors; errors -> quarantine)
    caa = caa_users.map_batches(
        CAAVectors, fn_constructor_kwargs={**caa_kwargs, "basis": basis, "population_norms": feature_norms},
        **actors).materialize()
    stored = _where(caa, "status", "ok").materialize()
    n_stored = stored.count()
    timer.lap("caa", f"{n_stored} users with vectors")

    # 5. population direction (per-batch partial sums reduced on the driver: a few rows), θ_pop,
    #    then a CPU pass: shrink each user toward the population and fit their BT ideal point
    partials = stored.map_batches(population_partials, batch_format="pyarrow").to_arrow_refs()
    partials = pa.concat_tables(ray.get(partials)) if partials else None
    model_info: dict = {"name_or_path": config.model.name_or_path}
    population = theta_pop = None
    final = stored
    if n_stored:
        first = stored.take(1)[0]
        model_info.update(id=first["model_id"], fingerprint=first["model_fingerprint"],
                          hidden_size=first["hidden_size"])
        mean, n_pairs = population_mean(partials)
        population = vector_row(
            None, "population", mean, n_pairs, None, layers=list(first["layers"]),
            recommended=list(first["recommended_layers"]), positions=config.caa.apply_positions,
            scale=config.caa.scale, hidden_size=first["hidden_size"], model_id=first["model_id"],
            model_fingerprint=first["model_fingerprint"])
        if basis is not None:
            pooled = [r for r in stored.select_columns(["user_id", "bt_features", "bt_weights"])
                      .filter(lambda row: in_sample(row["user_id"], bt.seed, sample_fraction)).take_all()]
            x = np.asarray([f for r in pooled for f in r["bt_features"]], dtype=np.float64).reshape(-1, bt.k)
            w = np.asarray([v for r in pooled for v in r["bt_weights"]], dtype=np.float64)
            theta_pop = population_theta(x, w, bt)
        final = stored.map_batches(
            finalize_users, fn_kwargs={"population": mean, "kappa": config.caa.shrinkage, "theta_pop": theta_pop,
                                       "config": bt or config.bt}, batch_format="pyarrow").materialize()
    timer.lap("population", f"{population['n_pairs'] if population else 0} pairs; users shrunk"
              + ("; BT fitted" if theta_pop is not None else ""))

    # 5b. recommended α per method, chosen on a seeded sample of the users' own training pairs
    scales = {"population": config.caa.scale, "caa": config.caa.scale, "bt": config.bt.scale}
    scale_curves: dict = {}
    if config.scale.enabled and population is not None:
        scale_curves = _choose_scales(config, users, final, population, basis, theta_pop, sample_fraction)
        scales.update({m: r["alpha"] for m, r in scale_curves.items() if m in scales})
        final = final.map_batches(_with_scale, fn_kwargs={"scale": scales["caa"]}, batch_format="pyarrow").materialize()
        population["recommended_scale"] = scales["population"]
        timer.lap("scale", ", ".join(f"{m} α={a:g}" for m, a in scales.items() if m in scale_curves))

    # 5d. DPS preference heads (users with enough history items; clusters; population baseline)
    dps_out = _dps_stage(config, ok_users, timer) if dps_active else None
    if dps_out is not None and not n_stored and dps_out["model"] is not None:
        model_info.update(id=dps_out["model"]["model_id"], fingerprint=dps_out["model"]["model_fingerprint"])
    # 5e. SteerX leave-one-out token effects and anchors
    steerx_out = _steerx_stage(config, ok_users, timer) if steerx_active else None
    if steerx_out is not None and "fingerprint" not in model_info and steerx_out["model"] is not None:
        model_info.update(id=steerx_out["model"]["model_id"], fingerprint=steerx_out["model"]["model_fingerprint"])

    # 5c. reconciliation tables: users (one row per input user) and quarantine (every rejected row/user)
    failed = {"caa": _failed(caa),
              "dps": dps_out["failed"] if dps_out else {},
              "steerx": steerx_out["failed"] if steerx_out else {}}
    eligibility = {"min_pairs": config.prepare.min_pairs, "min_histories": config.prepare.min_histories,
                   "dps": dps_active, "steerx": steerx_active, "bt": theta_pop is not None}
    users_table = users.map_batches(_users_rows, fn_kwargs={"failed": failed, "eligibility": eligibility},
                                    batch_format="pyarrow")
    quarantine = _where(records, "status", "ok", equal=False).map_batches(_record_quarantine, batch_format="pyarrow")
    quarantine = quarantine.union(users.map_batches(_user_quarantine, fn_kwargs={"failed": failed},
                                                    batch_format="pyarrow"))
    users_table = users_table.materialize()
    quarantine = quarantine.materialize()
    status_counts = _value_counts(users_table, "status")
    method_counts = _value_counts(users_table.map_batches(
        lambda b: pa.table({"method": pc.list_flatten(b["methods"])}), batch_format="pyarrow"), "method") \
        if n_users else {}
    n_dps = dps_out["n_stored"] if dps_out else 0
    n_steerx = steerx_out["n_stored"] if steerx_out else 0
    quarantine_by_input = _value_counts(quarantine, "input")
    kept = sum(int(users_table.sum(c) or 0) for c in ("n_pairs_valid", "n_histories_valid")) if n_users else 0
    summary = {
        "version": version,
        "input_rows": n_records,
        "input_rows_by_kind": _value_counts(records, "kind"),
        "rows_kept": kept,  # valid rows in user rows (of stored or quarantined users)
        "rows_quarantined": sum(c for k, c in quarantine_by_input.items() if k != "user"),
        "rows_without_user": n_records - attributed.count(),
        "users_in": n_users,
        "users_stored": status_counts.get("stored", 0),
        "users_quarantined": status_counts.get("quarantined", 0),
        "users_by_method": method_counts,
        "quarantine_rows": sum(quarantine_by_input.values()),
    }
    # nothing lost: every row is kept or quarantined, every user stored or quarantined
    if (summary["rows_kept"] + summary["rows_quarantined"] != n_records
            or summary["users_stored"] + summary["users_quarantined"] != n_users
            or method_counts.get("caa", 0) != n_stored or method_counts.get("dps", 0) != n_dps
            or method_counts.get("steerx", 0) != n_steerx):
        raise ReconciliationError(f"inputs do not reconcile, nothing published: {summary}")

    # 6. write the version, then publish (manifest, then LATEST). Per-user tables go to one file per
    # hash bucket of the user id (point lookups read one small row group); the others as they come.
    vector_bytes = n_stored * 4 * len(population["layers"]) * int(population["hidden_size"]) if population else 0
    if steerx_out is not None and steerx_out["vectors"] is not None:
        vector_bytes += steerx_out["vectors"].size_bytes()  # materialized: from block metadata
    buckets = bucket_count(n_users, config.output.users_per_bucket, vector_bytes, config.output.bucket_bytes)
    per_user = {"vectors": [final], "users": [users_table]}
    rows = {"vectors": n_stored, "users": n_users, "quarantine": summary["quarantine_rows"], "bt_coords": 0,
            "bt_basis": 0, "dps_heads": n_dps, "dps_clusters": 0, "dps_population": 0, "steerx_users": n_steerx,
            "steerx_token_effects": 0}
    if population is not None:
        storage.write_parquet(storage.join(store.table_uri(version, "vectors"), POPULATION_FILE),
                              pa.Table.from_pylist([population], schema=VECTORS_SCHEMA), config.storage)
        rows["vectors"] += 1
    if theta_pop is not None:
        per_user["bt_coords"] = [final]
        basis_rows = _basis_rows(basis, np.asarray(population["norms"]), feature_norms, theta_pop, population,
                                 bt, n_sample=int(sample_table.num_rows), scale=scales["bt"])
        _write(ray.data.from_arrow(basis_rows), store, version, "bt_basis", config)
        rows.update(bt_coords=n_stored, bt_basis=basis_rows.num_rows)
    if dps_out is not None:
        per_user["dps_heads"] = [dps_out["heads"]]
        for name in ("clusters", "population"):
            if dps_out[name] is not None:
                _write(ray.data.from_arrow(dps_out[name]), store, version, f"dps_{name}", config)
                rows[f"dps_{name}"] = dps_out[name].num_rows
    if steerx_out is not None:
        per_user["steerx_users"] = [steerx_out["users"]]
        if steerx_out["vectors"] is not None:
            per_user["vectors"].append(steerx_out["vectors"])
            rows["vectors"] += steerx_out["n_vectors"]
        if config.steerx.token_effects:
            effects = steerx_out["effects"].materialize()
            _write(effects, store, version, "steerx_token_effects", config)
            rows["steerx_token_effects"] = effects.count()
    for name, parts in per_user.items():
        _write_bucketed(parts, store, version, name, buckets, config)
    _write(quarantine, store, version, "quarantine", config)
    for name, schema in STORE_TABLES.items():  # every version has every table, empty when a method did not run
        if not store.table_files(version, name):
            store.write_empty(version, name, schema)
    tables = {name: TableEntry(files=[f.rsplit("/", 1)[-1] for f in store.table_files(version, name)],
                               rows=rows[name], schema=storage.schema_to_b64(schema))
              for name, schema in STORE_TABLES.items()}
    timer.lap("write", f"{sum(t.rows for t in tables.values())} rows")
    summary["stage_seconds"] = dict(timer.stages)
    manifest = Manifest(
        version=version, created_at=dt.datetime.now(dt.timezone.utc).isoformat(), model=model_info, tables=tables,
        summary=summary, config=_redacted(config), inputs=inputs,
        layout={"kind": LAYOUT_KIND, "buckets": buckets, "tables": {t: list(BUCKETED_TABLES[t]) for t in per_user},
                "row_group_bytes": config.output.row_group_bytes},
        methods=[m for m in ("caa", "bt", "dps", "steerx") if method_counts.get(m)], steerstore_version=_package_version(),
        scale_choice=dict(scale_curves, **({"steerx": {"recommended": steerx_out["recommended"],
                                                        "curve": steerx_out["calibration"]}}
                                           if steerx_out and steerx_out["recommended"] else {})))
    store.publish(version, manifest.to_json_dict())
    timer.lap("publish", f"LATEST -> {version}")
    summary["stage_seconds"] = dict(timer.stages)
    _print_summary(summary, config.output.store)
    return summary


def _with_scale(batch: pa.Table, scale: float) -> pa.Table:
    idx = batch.schema.get_field_index("recommended_scale")
    return batch.set_column(idx, batch.schema.field(idx), pa.array([scale] * batch.num_rows, pa.float32()))


def _choose_scales(config: RefreshConfig, users, final, population: dict, basis, theta_pop, sample_fraction: float):
    """Per method, the chosen α and its curve, from the training pairs of a seeded sample of stored users (one Ray task)."""
    import ray

    seed, fraction = config.bt.seed, (sample_fraction or min(1.0, config.bt.sample_users / max(final.count(), 1)))
    rows = {r["user_id"]: r for r in final.filter(lambda r: in_sample(r["user_id"], seed, fraction)).take_all()}
    user_pairs = users.filter(lambda r: r["user_id"] in rows).select_columns(["user_id", "pairs"]).take_all()
    candidates = [(u["user_id"], p) for u in sorted(user_pairs, key=lambda u: u["user_id"]) for p in u["pairs"]]
    rng = np.random.default_rng(config.scale.seed)
    picked = [candidates[i] for i in sorted(rng.choice(len(candidates), min(config.scale.sample_pairs,
                                                                             len(candidates)), replace=False))]
    layers = list(population["recommended_layers"])
    stored_layers = list(population["layers"])
    at = [stored_layers.index(l) for l in layers]
    pop = np.asarray(population["vectors"], dtype=np.float32)
    methods = {
        "population": {l: np.stack([pop[j]] * len(picked)) for l, j in zip(layers, at)},
        "caa": {l: np.stack([np.asarray(rows[u]["vectors"][j], dtype=np.float32) for u, _ in picked])
                for l, j in zip(layers, at)},
    }
    if theta_pop is not None:
        norms = np.asarray(population["norms"], dtype=np.float64)
        composed = {u: compose(np.asarray(rows[u]["theta"]), basis, norms) for u, _ in picked}
        methods["bt"] = {l: np.stack([composed[u][j] for u, _ in picked]) for l, j in zip(layers, at)}
    task = ray.remote(choose_scales_task).options(num_gpus=config.resources.gpus_per_actor,
                                                  num_cpus=config.resources.cpus_per_actor)
    result = ray.get(task.remote(config.model, [p for _, p in picked], methods, config.scale,
                                 population["positions"]))
    return {**result, "pairs": len(picked), "users": len({u for u, _ in picked})}


def _basis_rows(basis: np.ndarray, population_norms: np.ndarray, feature_norms: np.ndarray, theta_pop: np.ndarray,
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


def _print_summary(summary: dict, store_uri: str) -> None:
    s = summary
    print(f"published {store_uri} version {s['version']}\n"
          f"  users: {s['users_in']} in = {s['users_stored']} stored + {s['users_quarantined']} quarantined\n"
          f"  rows:  {s['input_rows']} in = {s['rows_kept']} kept + {s['rows_quarantined']} quarantined "
          f"({s['rows_without_user']} without a user id)\n"
          "  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items()), flush=True)


def _where_not_null(ds, column: str):
    return ds.map_batches(lambda b: b.filter(pc.is_valid(b[column])), batch_format="pyarrow")


def _value_counts(ds, column: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow"):
        for item in pc.value_counts(batch[column]).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def _user_methods(u: dict, failed: dict[str, dict[str, str]], eligibility: dict) -> tuple[list[str], list[str]]:
    """Methods with artifacts for a prepared user, and the reasons of the methods that failed."""
    methods, reasons = [], []
    if u["status"] == "ok" and len(u["pairs"]) >= eligibility["min_pairs"]:
        if u["user_id"] in failed["caa"]:
            reasons.append(failed["caa"][u["user_id"]])
        else:
            methods += ["caa"] + (["bt"] if eligibility["bt"] else [])
    if u["status"] == "ok" and eligibility["dps"] and len(u["histories"]) >= eligibility["min_histories"]:
        if u["user_id"] in failed["dps"]:
            reasons.append(failed["dps"][u["user_id"]])
        else:
            methods.append("dps")
    if u["status"] == "ok" and eligibility["steerx"] and len(u["histories"]) >= eligibility["min_histories"]:
        if u["user_id"] in failed["steerx"]:
            reasons.append(failed["steerx"][u["user_id"]])
        else:
            methods.append("steerx")
    return methods, reasons


def _users_rows(batch: pa.Table, failed: dict[str, dict[str, str]], eligibility: dict) -> pa.Table:
    rows = []
    for u in batch.to_pylist():
        methods, reasons = _user_methods(u, failed, eligibility)
        if u["status"] != "ok":
            status, reason = "quarantined", u["reason"]
        elif methods:
            status, reason = "stored", ("; ".join(reasons) or None)
        else:
            status, reason = "quarantined", "; ".join(reasons) or "no method could use this user's rows"
        rows.append({
            "user_id": u["user_id"], "status": status, "reason": reason, "methods": methods,
            "n_pairs_in": u["n_pairs_in"], "n_pairs_valid": len(u["pairs"]),
            "n_pairs_used": len(u["pairs"]) if "caa" in methods else 0, "n_histories_in": u["n_histories_in"],
            "n_histories_valid": len(u["histories"]), "content_fingerprint": u["content_fingerprint"],
        })
    return pa.Table.from_pylist(rows, schema=USERS_SCHEMA)


def _record_quarantine(batch: pa.Table) -> pa.Table:
    rows = [{"input": r["kind"], "source": r["source"], "user_id": r["user_id"], "record_id": r["record_id"],
             "stage": "validate", "reason": r["reason"], "raw": r["raw"]} for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def _user_quarantine(batch: pa.Table, failed: dict[str, dict[str, str]]) -> pa.Table:
    rows = []
    for u in batch.to_pylist():
        for d in u["dropped"]:
            rows.append({"input": d["kind"], "source": d["source"], "user_id": u["user_id"],
                         "record_id": d["record_id"], "stage": "prepare", "reason": d["reason"], "raw": d["raw"]})
        if u["status"] != "ok":
            rows.append({"input": "user", "source": None, "user_id": u["user_id"], "record_id": None,
                         "stage": "prepare", "reason": u["reason"], "raw": None})
        else:
            for stage, reasons in failed.items():
                if u["user_id"] in reasons:
                    rows.append({"input": "user", "source": None, "user_id": u["user_id"], "record_id": None,
                                 "stage": stage, "reason": reasons[u["user_id"]], "raw": None})
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steerstore")
    except PackageNotFoundError:
        return "unknown"


def _dps_stage(config: RefreshConfig, ok_users, timer: "_Timer") -> dict | None:
    """DPS: per-user (and per-cluster) preference heads. Returns datasets/tables for the store, or None."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    dps, res = config.dps, config.resources
    users = _history_users(ok_users, config)
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

    actors = _model_actors(res, res.dps_batch_size)
    population = pop_rows = None
    if dps.pcs_baseline == "population":
        sample = _exact_sample(rows, dps.baseline_users, dps.seed, n_users)
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
        cluster_counts = {int(c): n for c, n in _value_counts(rows, "cluster").items()}
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
        user_results = rows.map_batches(_cluster_only_rows, fn_kwargs={"model": model}, batch_format="pyarrow")
    failed = _failed(user_results)
    heads = user_results.filter(lambda r: r["status"] == "ok").map_batches(
        _dps_heads_rows, fn_kwargs={"config": dps, "clusters": centroids is not None}, batch_format="pyarrow").materialize()
    n_stored = heads.count()
    model = model or (heads.take(1)[0] if n_stored else None)
    clusters_table = _dps_clusters_table(centroids, cluster_results, cluster_counts, dps, model)
    population_table = _dps_population_table(population, model)
    timer.lap("dps", f"{n_stored} users with heads, {len(cluster_results)} clusters scored, {len(failed)} failed")
    return {"heads": heads, "n_stored": n_stored, "failed": failed, "clusters": clusters_table,
            "population": population_table, "model": model}


_KMEANS_SAMPLE = 50_000  # users k-means is fitted on (all users are routed)


def _exact_sample(ds, size: int, seed: int, total: int):
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


def _min_list_length(batch: pa.Table, column: str, minimum: int) -> pa.Table:
    return batch.filter(pc.greater_equal(pc.fill_null(pc.list_value_length(batch[column]), 0), minimum))


def _history_users(ok_users, config: RefreshConfig):
    """Prepared users with at least ``prepare.min_histories`` history items (the history methods' input)."""
    return ok_users.map_batches(_min_list_length, fn_kwargs={"column": "histories",
                                                             "minimum": config.prepare.min_histories},
                                batch_format="pyarrow")


def _model_actors(res: ResourcesConfig, batch_size: int) -> dict:
    """map_batches arguments of a model-actor stage (each actor loads the model once)."""
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=res.caa_actors), "batch_size": batch_size,
            "num_gpus": res.gpus_per_actor, "num_cpus": res.cpus_per_actor, "batch_format": "pyarrow"}


_MODEL_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "model_id", "model_fingerprint")


def _cluster_only_rows(batch: pa.Table, model: dict) -> pa.Table:
    """dps.per_user=false: users carry their routing only; their heads are their clusters'."""
    n = batch.num_rows
    out = {name: pa.nulls(n, field.type) for name, field in zip(DPS_OUTPUT_SCHEMA.names, DPS_OUTPUT_SCHEMA)}
    out.update({k: pa.array([model[k]] * n, DPS_OUTPUT_SCHEMA.field(k).type) for k in _MODEL_FIELDS})
    out.update(user_id=batch["user_id"], scope=batch["scope"], status=pa.array(["ok"] * n), cluster=batch["cluster"],
               routing=batch["routing"], content_fingerprint=batch["content_fingerprint"],
               heads=pa.array([[]] * n, DPS_OUTPUT_SCHEMA.field("heads").type))
    return pa.table(out, schema=DPS_OUTPUT_SCHEMA)


def _dps_heads_rows(batch: pa.Table, config: DPSConfig, clusters: bool) -> pa.Table:
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


def _steerx_stage(config: RefreshConfig, ok_users, timer: "_Timer") -> dict | None:
    """SteerX per user with enough history items: anchors, descriptions, style vectors (stages 1–4).

    A user failing any stage is quarantined for SteerX with that stage's reason; the stored
    users have every artifact the configuration asks for.
    """
    sx, res = config.steerx, config.resources
    users = _history_users(ok_users, config).materialize()
    n_users = users.count()
    if n_users == 0:
        return None
    pool = []
    if sx.counterfactual == "other_users":
        sample = _exact_sample(users, sx.pool_users, sx.seed + 2, n_users).select_columns(["user_id", "histories"])
        for r in sorted(sample.take_all(), key=lambda r: r["user_id"]):
            pool += [{**h, "user_id": r["user_id"]} for h in r["histories"][-sx.history.max_items:]]
    actors = _model_actors(res, res.caa_batch_size)
    scored = users.map_batches(SteerXAnchors, fn_constructor_kwargs={"config": sx, "model": config.model, "pool": pool},
                               **actors).materialize()
    failed = _failed(scored)
    ok = _where(scored, "status", "ok").materialize()
    timer.lap("steerx anchors", f"{ok.count()} users with anchors, {len(failed)} failed, pool of {len(pool)} items")

    if sx.smoothing.enabled and ok.count():
        smoothing_model = resolve_model(sx.smoothing, config.model)
        engine = (vllm_engine(smoothing_model, sx.smoothing) if sx.smoothing.engine == "vllm"
                  else hf_engine(smoothing_model, sx.smoothing, actors))
        specials = special_strings(TextEncoder.load(smoothing_model).tokenizer)
        smoothed = smooth(ok.select_columns(["user_id", "anchors", "histories"]), sx.smoothing, engine,
                          specials, res.prepare_partitions).materialize()
        failed.update(_failed(smoothed))
        described = _where(smoothed, "status", "ok").drop_columns(["status", "reason"])
        ok = _inner_join(ok, described, res.prepare_partitions)
        timer.lap("steerx smoothing", f"{ok.count()} users described ({sx.smoothing.engine}), "
                                      f"{len(failed)} failed so far")

    vectors, recommended, curve = None, {}, []
    if sx.vectors.enabled and ok.count():
        n_ok = ok.count()
        calibrate = None if n_ok <= sx.vectors.calibration_users else {  # None: every user calibrates
            r["user_id"] for r in _exact_sample(ok, sx.vectors.calibration_users, sx.vectors.seed + 3, n_ok)
            .select_columns(["user_id"]).take_all()}
        inputs = ok.map_batches(_style_inputs, fn_kwargs={"calibrate": calibrate}, batch_format="pyarrow")
        styled = inputs.map_batches(SteerXStyleVectors, fn_constructor_kwargs={"config": sx, "model": config.model},
                                    **actors).materialize()
        failed.update(_failed(styled))
        styled = _where(styled, "status", "ok").materialize()
        curve = [c for r in styled.filter(lambda r: r["calibration"] is not None)
                 .select_columns(["calibration"]).take_all() for c in r["calibration"]]
        recommended = choose_recommended(curve)
        for source, choice in recommended.items():
            if not choice["improves"]:
                log.warning("steerx %s vectors: no layer and γ of steerx.vectors.gamma_grid raised the held-out "
                            "likelihood of the calibration users' responses (best %+.3f nats/token at layer %d, "
                            "γ=%g); add smaller γ or other layers", source, choice["gain_per_token"],
                            choice["layer"], choice["gamma"])
        vectors = styled.map_batches(_steerx_vector_rows, fn_kwargs={"config": sx, "recommended": recommended},
                                     batch_format="pyarrow").materialize()
        keep = styled.select_columns(["user_id"])
        ok = _inner_join(ok, keep, res.prepare_partitions)
        timer.lap("steerx vectors", f"{ok.count()} users, " + ", ".join(
            f"{s}: layer {r['layer']} γ={r['gamma']:g} ({r['gain_per_token']:+.3f} nats/token)"
            for s, r in recommended.items()))

    user_rows = ok.map_batches(_steerx_user_rows, fn_kwargs={"config": sx}, batch_format="pyarrow").materialize()
    n_stored = user_rows.count()
    model = user_rows.take(1)[0] if n_stored else None
    return {"users": user_rows, "vectors": vectors, "n_vectors": vectors.count() if vectors is not None else 0,
            "effects": ok.map_batches(_steerx_effect_rows, batch_format="pyarrow"),
            "n_stored": n_stored, "failed": failed, "model": model,
            "recommended": recommended, "calibration": curve}


def _inner_join(left, right, partitions: int):
    """Rows of ``left`` whose user_id is in ``right``, with right's columns (materialized).

    An empty ``right`` (every user failed the stage) gives an empty result: Ray's hash join
    cannot join against blocks without columns.
    """
    if right.count() == 0:
        return left.limit(0).materialize()
    return left.join(right, "inner", num_partitions=partitions, on=("user_id",)).materialize()


def _failed(ds) -> dict[str, str]:
    return {r["user_id"]: r["reason"] for r in _where(ds, "status", "ok", equal=False)
            .select_columns(["user_id", "reason"]).take_all()}


def _style_inputs(batch: pa.Table, calibrate: set[str] | None) -> pa.Table:
    ids = batch.column("user_id").to_pylist()
    descriptions = batch.column("descriptions") if "descriptions" in batch.column_names else \
        pa.array([[] for _ in ids], STEERX_USERS_SCHEMA.field("descriptions").type)
    return pa.table({"user_id": batch.column("user_id"), "histories": batch.column("histories"),
                     "descriptions": descriptions,
                     "calibrate": pa.array([calibrate is None or u in calibrate for u in ids], pa.bool_())})


def _steerx_vector_rows(batch: pa.Table, config: SteerXConfig, recommended: dict[str, dict]) -> pa.Table:
    """One ``vectors`` row per user and source (method steerx) with the recommended layer and γ."""
    rows = []
    for r in batch.select(["user_id", "layers", "sources", "vectors", "n_items", "model_id", "model_fingerprint",
                           "hidden_size"]).to_pylist():
        for source, vecs in zip(r["sources"], r["vectors"]):
            rec = recommended.get(source)
            rows.append(vector_row(
                r["user_id"], "user", np.asarray(vecs, dtype=np.float32), r["n_items"], None, layers=r["layers"],
                recommended=[rec["layer"]] if rec else [r["layers"][len(r["layers"]) // 2]],
                positions=config.vectors.apply_positions, scale=rec["gamma"] if rec else 1.0,
                hidden_size=r["hidden_size"], model_id=r["model_id"], model_fingerprint=r["model_fingerprint"],
                method="steerx", source=source))
    return pa.Table.from_pylist(rows, schema=VECTORS_SCHEMA)


def _steerx_user_rows(batch: pa.Table, config: SteerXConfig) -> pa.Table:
    n = batch.num_rows
    sm = config.smoothing
    described = "descriptions" in batch.column_names
    descriptions = batch.column("descriptions").to_pylist() if described else [[]] * n
    settings = {"counterfactual": config.counterfactual, "anchor_mode": config.anchor_mode, "tau": config.tau,
                "percentile": config.percentile, "min_anchors": config.min_anchors,
                "context_items": config.history.context_items, "selection": config.history.selection,
                "granularity": sm.granularity if described else None,
                "smoothing_engine": sm.engine if described else None,
                "smoothing_prompt": SMOOTHING_PROMPT_VERSION if described else None,
                "style_template": STYLE_TEMPLATE, "vector_source": config.vectors.source if config.vectors.enabled else None}
    out = batch.select(["user_id", "anchors", "n_items", "n_tokens", "content_fingerprint", "model_id",
                        "model_fingerprint"])
    for name, value in settings.items():
        out = out.append_column(name, pa.array([value] * n, STEERX_USERS_SCHEMA.field(name).type))
    for name in ("smoothing_model_id", "smoothing_model_fingerprint"):
        out = out.append_column(name, batch.column(name) if name in batch.column_names
                                else pa.nulls(n, pa.string()))
    out = out.append_column("descriptions", pa.array(descriptions, STEERX_USERS_SCHEMA.field("descriptions").type))
    out = out.append_column("context", pa.array([user_context(d) or None for d in descriptions], pa.string()))
    return conform(out, STEERX_USERS_SCHEMA)


def _steerx_effect_rows(batch: pa.Table) -> pa.Table:
    rows = [{"user_id": r["user_id"], "item_id": e["item_id"], "tokens": e["tokens"], "delta": e["delta"],
             "model_fingerprint": r["model_fingerprint"]}
            for r in batch.select(["user_id", "token_effects", "model_fingerprint"]).to_pylist()
            for e in (r["token_effects"] or [])]
    return pa.Table.from_pylist(rows, schema=STEERX_TOKEN_EFFECTS_SCHEMA)
