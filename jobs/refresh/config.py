"""The refresh job's configuration: inputs, output, scheduling and every method's settings."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from steerstore.infra.cluster import RayConfig
from steerstore.infra.config import check, option
from steerstore.infra.lease import LeaseConfig
from steerstore.infra.lifecycle import RetentionConfig
from steerstore.infra.storage import StorageConfig
from steerstore.jobs.refresh.guard import PublishConfig
from steerstore.jobs.refresh.incremental import IncrementalConfig
from steerstore.operators.bt import BTConfig
from steerstore.operators.caa import CAAConfig
from steerstore.operators.dps import DPSConfig
from steerstore.operators.prepare import PrepareConfig
from steerstore.operators.recommend import RecommendConfig
from steerstore.operators.runtime import ModelConfig
from steerstore.operators.scale import ScaleConfig
from steerstore.operators.steerx import SteerXConfig
from steerstore.operators.validate import ValidateConfig

log = logging.getLogger("steerstore")


@dataclass
class InputsConfig:
    preference_pairs: str = option(
        "", help="URI of preference pairs: a JSON Lines (plain, gzip, zstd or bz2) or Parquet file, or a folder of "
                 "them (local or s3://; names starting with '.' or '_' are skipped)")
    histories: str | None = option(None, help="URI of user histories (same formats); optional for CAA")
    format: Literal["auto", "jsonl", "parquet"] = option(
        "auto", help="input format; auto = each file's own, from its first bytes (Parquet's magic, else JSON Lines)")

    def __post_init__(self) -> None:
        check(bool(self.preference_pairs), "inputs.preference_pairs is required (a file or folder URI)")


@dataclass
class OutputConfig:
    store: str = option("./steerstore-out/store", help="store URI: a local folder or s3://bucket/prefix")
    users_per_bucket: int = option(
        4096, help="users per hash-bucket file of the per-user tables (fewer: smaller files and shuffle groups)")
    row_group_bytes: int = option(
        256 << 10, help="about this many bytes per Parquet row group of the per-user tables (what a lookup reads)")
    vector_dtype: Literal["float32", "float16"] = option(
        "float32", help="how stored vectors hold their values (float16: half the bytes; readers get float32)")
    min_buckets: int = option(
        16, help="at least this many hash buckets (= shards, the unit of work and resume): enough to keep every "
                 "model worker busy even for few users")
    bucket_bytes: int = option(
        64 << 20, help="about this many bytes of vectors per bucket file at most: models with large vectors get "
                       "more buckets than users_per_bucket gives, so file footers and write tasks stay small")

    def __post_init__(self) -> None:
        check(self.users_per_bucket >= 1, "output.users_per_bucket must be >= 1")
        check(self.min_buckets >= 1, "output.min_buckets must be >= 1")
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
    model_actors: int = option(
        1, help="model workers: long-lived actors that each load the model once and do every user's model work "
                "(one per GPU on a GPU cluster)")
    generation_actors: int = option(
        1, help="workers for the smoothing LLM when it is not the job's model (else the model workers generate)")
    caa_batch_size: int = option(16, help="users per model call for CAA activations and SteerX (within a shard)")
    dps_batch_size: int = option(4, help="users per DPS head-scoring call (each user's items × candidate heads)")
    gpus_per_actor: float = option(0.0, help="GPUs per model worker (1 on a GPU cluster)")
    cpus_per_actor: float = option(
        2.0, help="CPUs reserved per model worker; Ray sets the actor's torch threads to this (2 fits the demo machine)")
    shards_in_flight: int = option(
        2, help="shards a model worker holds at once (one computing, one queued): bounds memory, keeps it busy")
    shard_retries: int = option(1, help="retries of a shard's writer task after a failure")
    actor_restarts: int = option(1, help="restarts of a model worker that died (its shard is retried)")
    task_retries: int = option(
        2, help="retries of a CPU task (reading, validation, shard writing) whose worker died; a task that raises "
                "is not retried (its error is deterministic); Ray's default would retry a crashing task forever")
    deadline_s: float = option(
        0.0, help="stop the run with an error after this many seconds (0 = no deadline); completed shards are "
                  "kept, so the same command resumes")

    def __post_init__(self) -> None:
        check(min(self.validate_actors, self.model_actors, self.generation_actors) >= 1,
              "resources: actor counts must be >= 1")
        check(self.shards_in_flight >= 1 and min(self.shard_retries, self.actor_restarts, self.task_retries) >= 0,
              "resources: shards_in_flight >= 1, shard_retries, actor_restarts and task_retries >= 0")
        check(self.deadline_s >= 0, "resources.deadline_s must be >= 0 (0 = no deadline)")
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
    recommend: RecommendConfig = dataclasses.field(
        default_factory=RecommendConfig,
        metadata={"help": "the method and strength each user should get, chosen on the user's held-out items"})
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig, metadata={"help": "scheduling"})
    retention: RetentionConfig = dataclasses.field(
        default_factory=RetentionConfig, metadata={"help": "versions kept after each publish"})
    lease: LeaseConfig = dataclasses.field(
        default_factory=LeaseConfig, metadata={"help": "the store's writer lease: one refresh (or forget) at a time"})
    incremental: IncrementalConfig = dataclasses.field(
        default_factory=IncrementalConfig,
        metadata={"help": "reuse of the current version: frozen global statistics, unchanged users carried forward"})
    publish: PublishConfig = dataclasses.field(
        default_factory=PublishConfig, metadata={"help": "limits a new version must meet before LATEST moves to it"})

    def __post_init__(self) -> None:
        check(self.inputs is not None, "inputs.preference_pairs is required")


class ReconciliationError(RuntimeError):
    """Some input user ended in neither the store nor quarantine: nothing is published."""
