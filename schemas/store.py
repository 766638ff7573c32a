"""Tables of the steering store and of the pipeline between stages.

Store version layout: ``<store>/versions/<version>/<table>/*.parquet`` for the tables below,
then ``manifest.json`` (written last but one) and the store's ``LATEST`` pointer (last).

- ``vectors``: one row per user (``scope='user'``) plus one population row
  (``scope='population'``, ``user_id`` null): per-layer steering vectors with the conventions
  needed to apply them anywhere.
- ``users``: one row per input user — the reconciliation (stored or quarantined, with why).
- ``quarantine``: one row per rejected input row or user, with the reason and the raw text.
- ``bt_coords``: one row per stored user: Bradley-Terry ideal point θ (k floats) and fit diagnostics.
- ``bt_basis``: one row per layer: the version's orthonormal preference basis (k × hidden).
- ``dps_heads``: one row per user with histories: the user's preference heads (own, when
  scored individually), the user's cluster and soft routing weights over the clusters.
- ``dps_clusters``: one row per cluster: centroid and the cluster's preference heads.
- ``dps_population``: one row per attention head: mean PCS and attribution over the
  baseline sample (what ``pcs_baseline='population'`` subtracts).
- ``steerx_users``: one row per SteerX user: preference anchor words, the style description(s)
  S written by the smoothing LLM, the serving context, and every setting they were made with
  (the user's style vectors are rows of ``vectors`` with ``method='steerx'``, one per source);
  ``steerx_token_effects``: per scored item, every token's leave-one-out effect (only with
  ``steerx.token_effects``).
- ``recommended``: per user and condition (``plain`` prompt, or ``history``: on top of the user's
  retrieved history), the method and strength the user should get, chosen on the user's own
  held-out items and shrunk toward the population's choice, with the evidence it was chosen on.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import asdict, dataclass, field

import pyarrow as pa

# 2: vectors.source (caa: pairs; steerx: history | description | blend); steerx_anchors became steerx_users
# 3: vectors as fixed-size lists of a recorded dtype (float32 or float16)
STORE_SCHEMA_VERSION = 5  # 4: users.fingerprints (per method family, for the incremental refresh)
# 5: the recommended table (per user: the method and strength chosen on their held-out items)


def _meta(table: str) -> dict[str, str]:
    return {"steerstore.table": table, "steerstore.schema_version": str(STORE_SCHEMA_VERSION)}


# ---- pipeline: one row per input record after validation -----------------------------------

RECORD_SCHEMA = pa.schema([
    pa.field("kind", pa.string()),  # histories | preference_pairs
    pa.field("source", pa.string()),  # the input file
    pa.field("user_id", pa.string()),
    pa.field("record_id", pa.string()),  # item_id / pair_id
    pa.field("status", pa.string()),  # ok | quarantined
    pa.field("reason", pa.string()),
    pa.field("raw", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
    pa.field("weight", pa.float64()),
    pa.field("input", pa.string()),
    pa.field("output", pa.string()),
    pa.field("timestamp", pa.timestamp("us", tz="UTC")),
], metadata=_meta("records"))

PAIR_STRUCT = pa.struct([
    ("pair_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
    ("rejected", pa.string()), ("weight", pa.float64()),
])
HISTORY_STRUCT = pa.struct([
    ("item_id", pa.string()), ("input", pa.string()), ("output", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
])
DROPPED_STRUCT = pa.struct([
    ("kind", pa.string()), ("source", pa.string()), ("record_id", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()),
])

# ---- pipeline: one row per user after prepare -----------------------------------------------

USER_ROW_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("status", pa.string()),  # ok | quarantined
    pa.field("reason", pa.string()),
    pa.field("pairs", pa.list_(PAIR_STRUCT)),  # sorted by pair_id
    pa.field("histories", pa.list_(HISTORY_STRUCT)),  # sorted by (timestamp, item_id)
    pa.field("n_pairs_in", pa.int32()),
    pa.field("n_histories_in", pa.int32()),
    pa.field("dropped", pa.list_(DROPPED_STRUCT)),  # rows of this user rejected in prepare
    pa.field("content_fingerprint", pa.string()),
    pa.field("bucket", pa.int32()),
], metadata=_meta("user_rows"))

# ---- store tables ---------------------------------------------------------------------------

VECTORS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),  # null for the population row
    pa.field("scope", pa.string(), nullable=False),  # user | population
    pa.field("method", pa.string(), nullable=False),  # caa | steerx
    pa.field("source", pa.string(), nullable=False),  # caa: pairs; steerx: history | description | blend
    pa.field("layers", pa.list_(pa.int32()), nullable=False),  # layer i = output of block i
    pa.field("vectors", pa.list_(pa.list_(pa.float32())), nullable=False),  # (len(layers), hidden)
    pa.field("norms", pa.list_(pa.float32())),
    pa.field("hidden_size", pa.int32(), nullable=False),
    pa.field("hook", pa.string(), nullable=False),  # block_output (= HF hidden_states[i + 1])
    pa.field("operation", pa.string(), nullable=False),  # add
    pa.field("positions", pa.string(), nullable=False),  # response | all
    pa.field("recommended_layers", pa.list_(pa.int32())),
    pa.field("recommended_scale", pa.float32()),
    pa.field("n_pairs", pa.int32()),  # caa: training pairs; steerx: history items
    pa.field("content_fingerprint", pa.string()),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_fingerprint", pa.string(), nullable=False),
], metadata=_meta("vectors"))

USERS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # stored (some method stored artifacts) | quarantined
    pa.field("reason", pa.string()),
    pa.field("methods", pa.list_(pa.string())),  # artifact families stored for this user: caa, bt, dps, steerx
    pa.field("n_pairs_in", pa.int32()),  # rows in the input, valid or not
    pa.field("n_pairs_valid", pa.int32()),  # rows that passed validation and de-duplication
    pa.field("n_pairs_used", pa.int32()),  # rows behind the stored vectors (0 when quarantined)
    pa.field("n_histories_in", pa.int32()),
    pa.field("n_histories_valid", pa.int32()),
    pa.field("content_fingerprint", pa.string()),
    # family (caa | dps | steerx) -> sha256 of what its artifacts depend on: the user's rows of that input,
    # the family's settings, the model and its global statistics. Equal next night: carried forward.
    pa.field("fingerprints", pa.map_(pa.string(), pa.string())),
], metadata=_meta("users"))

QUARANTINE_SCHEMA = pa.schema([
    pa.field("input", pa.string(), nullable=False),  # histories | preference_pairs | user
    pa.field("source", pa.string()),
    pa.field("user_id", pa.string()),
    pa.field("record_id", pa.string()),
    pa.field("stage", pa.string(), nullable=False),  # validate | prepare | caa | dps | steerx
    pa.field("reason", pa.string(), nullable=False),
    pa.field("raw", pa.string()),
], metadata=_meta("quarantine"))

BT_COORDS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("theta", pa.list_(pa.float32()), nullable=False),  # (k,) ideal point in the version's basis
    pa.field("n_pairs", pa.int32()),
    pa.field("train_accuracy", pa.float32()),  # fraction of the user's pairs with θ·x > 0
    pa.field("log_likelihood", pa.float32()),  # Σ w log σ(θ·x), without the prior
    pa.field("iterations", pa.int32()),
    pa.field("prior", pa.float32()),
    pa.field("model_fingerprint", pa.string(), nullable=False),
], metadata=_meta("bt_coords"))

BT_BASIS_SCHEMA = pa.schema([
    pa.field("layer", pa.int32(), nullable=False),  # layer i = output of block i
    pa.field("axes", pa.list_(pa.list_(pa.float32())), nullable=False),  # (k, hidden), orthonormal; axis 0 = population
    pa.field("population_norm", pa.float32(), nullable=False),  # ‖p_l‖: composed vectors are rescaled to it
    pa.field("feature_norm", pa.float32(), nullable=False),  # s_l: RMS norm of sample users' means; divides features
    pa.field("population_theta", pa.list_(pa.float32()), nullable=False),  # θ_pop, the prior's centre
    pa.field("k", pa.int32(), nullable=False),
    pa.field("hidden_size", pa.int32(), nullable=False),
    pa.field("hook", pa.string(), nullable=False),
    pa.field("operation", pa.string(), nullable=False),
    pa.field("positions", pa.string(), nullable=False),
    pa.field("recommended_layers", pa.list_(pa.int32())),
    pa.field("recommended_scale", pa.float32()),
    pa.field("sample_users", pa.int32()),  # users the basis was fitted on
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_fingerprint", pa.string(), nullable=False),
], metadata=_meta("bt_basis"))

# an attention head: query head ``head`` of decoder block ``layer``; with grouped-query attention
# it reads key/value head ``kv_head`` = head // (num_heads // num_kv_heads)
HEAD_STRUCT = pa.struct([
    ("layer", pa.int32()), ("head", pa.int32()), ("kv_head", pa.int32()),
    ("score", pa.float32()),  # what heads are ranked by: pcs, minus the population mean when pcs_baseline=population
    ("pcs", pa.float32()),  # exact PCS: Δ mean NLL per token (nats) when the head is ablated
])

_DPS_MODEL_FIELDS = [
    pa.field("num_layers", pa.int32()),
    pa.field("num_heads", pa.int32()),  # query heads per layer
    pa.field("num_kv_heads", pa.int32()),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_fingerprint", pa.string(), nullable=False),
]

DPS_HEADS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("heads", pa.list_(HEAD_STRUCT)),  # the user's own heads, best first (empty: use the clusters')
    pa.field("source", pa.string(), nullable=False),  # user | cluster: where serving takes the heads from
    pa.field("mode", pa.string()),  # exact | fast (null when only clusters were scored)
    pa.field("pcs_baseline", pa.string()),  # none | population
    pa.field("baseline_users", pa.int32()),  # other users behind the subtracted mean
    pa.field("cluster", pa.int32()),  # most likely cluster (null without clusters)
    pa.field("routing", pa.list_(pa.float32())),  # soft weights over clusters, sum 1
    pa.field("n_items", pa.int32()),  # history items scored
    pa.field("n_tokens", pa.int32()),
    pa.field("base_nll", pa.float32()),  # mean NLL per token of those items, nothing ablated
    pa.field("gamma", pa.float32()),  # recommended contrast strength
    pa.field("adaptive", pa.bool_()),
    pa.field("plausibility", pa.float32()),
    pa.field("content_fingerprint", pa.string()),
    # dps.verify=departures: the share of the cluster's heads among the user's attribution top-k (null: not
    # compared); a user at or above dps.departure_overlap was not verified and is served its cluster's heads
    pa.field("cluster_overlap", pa.float32()),
    *_DPS_MODEL_FIELDS,
], metadata=_meta("dps_heads"))

DPS_CLUSTERS_SCHEMA = pa.schema([
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("centroid", pa.list_(pa.float32()), nullable=False),  # in the sentence encoder's space
    pa.field("heads", pa.list_(HEAD_STRUCT)),
    pa.field("n_users", pa.int32()),  # users whose most likely cluster this is
    pa.field("n_items", pa.int32()),  # members' history items scored for the cluster
    pa.field("n_tokens", pa.int32()),
    pa.field("mode", pa.string()),
    pa.field("pcs_baseline", pa.string()),
    pa.field("encoder", pa.string()),
    pa.field("routing_temperature", pa.float32()),
    *_DPS_MODEL_FIELDS,
], metadata=_meta("dps_clusters"))

DPS_POPULATION_SCHEMA = pa.schema([
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("head", pa.int32(), nullable=False),
    pa.field("kv_head", pa.int32(), nullable=False),
    pa.field("pcs_mean", pa.float32(), nullable=False),  # mean exact PCS over the sample
    pa.field("pcs_std", pa.float32()),
    pa.field("attribution_mean", pa.float32()),  # mean first-order estimate −∂NLL/∂gate
    pa.field("n_users", pa.int32(), nullable=False),
    *_DPS_MODEL_FIELDS,
], metadata=_meta("dps_population"))

STEERX_ANCHOR_STRUCT = pa.struct([("word", pa.string()), ("count", pa.int32()), ("mean_effect", pa.float32()),
                                  ("items", pa.list_(pa.string()))])

STEERX_DESCRIPTION_STRUCT = pa.struct([
    ("item_id", pa.string()),  # null for a user-level description
    ("description", pa.string()),
    ("attempts", pa.int32()),  # 1, or 2 when the first output was invalid
    ("variant", pa.string()),  # excerpts | anchors: what the smoothing prompt showed
    ("anchor_words", pa.list_(pa.string())),
])

STEERX_USERS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("anchors", pa.list_(STEERX_ANCHOR_STRUCT)),  # lowercase word, times it passed, mean effect (nats), items; best first
    pa.field("n_items", pa.int32()),  # history items scored (leave-one-out)
    pa.field("n_tokens", pa.int32()),  # output tokens with an effect
    pa.field("descriptions", pa.list_(STEERX_DESCRIPTION_STRUCT)),  # empty when smoothing is off
    pa.field("context", pa.string()),  # the style text S serving puts in the prompt (influence decoding)
    pa.field("counterfactual", pa.string(), nullable=False),  # empty | other_users
    pa.field("anchor_mode", pa.string(), nullable=False),  # absolute | percentile
    pa.field("tau", pa.float32()),
    pa.field("percentile", pa.float32()),
    pa.field("min_anchors", pa.int32()),
    pa.field("context_items", pa.int32()),  # k
    pa.field("selection", pa.string()),  # recent | bm25 | blocks
    pa.field("granularity", pa.string()),  # user | item (null when smoothing is off)
    pa.field("smoothing_engine", pa.string()),  # hf | vllm
    pa.field("smoothing_prompt", pa.string()),  # prompt version
    pa.field("smoothing_model_id", pa.string()),
    pa.field("smoothing_model_fingerprint", pa.string()),
    pa.field("style_template", pa.string()),  # how S enters a prompt ({context}, {prompt})
    pa.field("vector_source", pa.string()),  # the vectors' default source for serving
    pa.field("content_fingerprint", pa.string()),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_fingerprint", pa.string(), nullable=False),
], metadata=_meta("steerx_users"))

STEERX_TOKEN_EFFECTS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string()),
    pa.field("tokens", pa.list_(pa.string())),  # the output's tokens as the tokenizer spells them
    pa.field("delta", pa.list_(pa.float32())),  # Δ per token, nats
    pa.field("model_fingerprint", pa.string(), nullable=False),
], metadata=_meta("steerx_token_effects"))

RECOMMENDED_CANDIDATE_STRUCT = pa.struct([
    ("method", pa.string()), ("source", pa.string()), ("multiplier", pa.float32()), ("scale", pa.float32()),
    ("gain", pa.float64()),  # the user's own log-likelihood gain per held-out token over the plain prompt (nats)
    ("prior", pa.float64()),  # the population's gain per token for this candidate (the sample's, pooled)
    ("shrunk", pa.float64()),  # w·gain + (1 − w)·prior: what the choice ranks
])

RECOMMENDED_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("condition", pa.string(), nullable=False),  # plain | history (on top of retrieved history)
    pa.field("method", pa.string(), nullable=False),  # none | caa | bt | population | style_vector | influence | dps
    pa.field("source", pa.string()),  # style_vector: its source
    pa.field("scale", pa.float32()),  # α, γ or λ (null for none)
    pa.field("layers", pa.list_(pa.int32())),  # vector methods: the steered layers
    pa.field("chosen_by", pa.string(), nullable=False),  # user (own held-out items, shrunk) | population (no items held out)
    pa.field("weight", pa.float64()),  # w = tokens / (tokens + recommend.prior_tokens)
    pa.field("items", pa.int32()),  # the user's held-out items scored
    pa.field("tokens", pa.int64()),  # their output tokens
    pa.field("candidates", pa.list_(RECOMMENDED_CANDIDATE_STRUCT)),
    pa.field("fingerprint", pa.string()),  # what the choice depends on (the incremental refresh compares it)
    pa.field("model_fingerprint", pa.string(), nullable=False),
], metadata=_meta("recommended"))

STORE_TABLES: dict[str, pa.Schema] = {
    "vectors": VECTORS_SCHEMA, "users": USERS_SCHEMA, "quarantine": QUARANTINE_SCHEMA,
    "bt_coords": BT_COORDS_SCHEMA, "bt_basis": BT_BASIS_SCHEMA, "dps_heads": DPS_HEADS_SCHEMA,
    "dps_clusters": DPS_CLUSTERS_SCHEMA, "dps_population": DPS_POPULATION_SCHEMA,
    "steerx_users": STEERX_USERS_SCHEMA, "steerx_token_effects": STEERX_TOKEN_EFFECTS_SCHEMA,
    "recommended": RECOMMENDED_SCHEMA,
}


# ---- point-lookup layout -------------------------------------------------------------------
# The per-user tables are written as one file per hash bucket of the user id,
# ``<table>/bucket-<b>.parquet``, sorted by the table's keys and cut into small row groups, so a
# lookup of one user opens one file (its footer is cached) and reads one row group found from the
# row groups' user_id statistics. The population vector row is ``vectors/population.parquet``.
LAYOUT_KIND = "user-buckets"
BUCKETED_TABLES: dict[str, tuple[str, ...]] = {
    "vectors": ("user_id", "method", "source"), "users": ("user_id",), "bt_coords": ("user_id",),
    "dps_heads": ("user_id",), "steerx_users": ("user_id",), "recommended": ("user_id", "condition"),
}
POPULATION_FILE = "population.parquet"


def user_bucket(user_id: str, buckets: int) -> int:
    """The hash bucket of a user id: the first 32 bits of sha256(utf-8) modulo ``buckets``."""
    return int(hashlib.sha256(user_id.encode()).hexdigest()[:8], 16) % buckets


def bucket_file(bucket: int) -> str:
    return f"bucket-{bucket:05d}.parquet"


def bucket_of_file(name: str) -> int | None:
    """The bucket a ``bucket_file`` name holds (None for any other file, e.g. ``empty.parquet``)."""
    m = re.fullmatch(r"bucket-(\d+)\.parquet", name)
    return None if m is None else int(m.group(1))


def part_file(bucket: int) -> str:
    """One shard's file of the per-shard tables (``quarantine``, ``steerx_token_effects``)."""
    return f"part-{bucket:05d}.parquet"


UNATTRIBUTED_PART = "part-unattributed.parquet"  # the quarantine rows without a user id


def bucket_count(n_users: int, users_per_bucket: int, data_bytes: int = 0, bucket_bytes: int = 0) -> int:
    """Hash buckets for ``n_users``: at most ``users_per_bucket`` users and, when ``bucket_bytes`` is
    set, about ``data_bytes / bucket_bytes`` buckets or more, so that large models (vectors of 100+
    KB per row) get more, smaller files: a bucket file's footer lists every row group, and its
    first lookup reads that footer."""
    by_bytes = math.ceil(data_bytes / bucket_bytes) if bucket_bytes > 0 else 1
    return max(1, math.ceil(n_users / users_per_bucket), by_bytes)


# nullable columns added to a table after its schema version: rows written before them (an older version's rows
# carried forward, a builder that predates them) get nulls
ADDED_COLUMNS = {"dps_heads": ("cluster_overlap",)}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to exactly ``schema`` (an error names what is off)."""
    name = (schema.metadata or {}).get(b"steerstore.table", b"").decode()
    for column in ADDED_COLUMNS.get(name, ()):
        if column not in table.column_names:
            table = table.append_column(schema.field(column), pa.nulls(table.num_rows, schema.field(column).type))
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing} required by schema "
                         f"{schema.metadata.get(b'steerstore.table', b'?').decode()}")
    return table.select(schema.names).cast(schema)


VECTOR_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def vectors_schema(hidden_size: int, dtype: str = "float32") -> pa.Schema:
    """The ``vectors`` table as a version stores it: each row's per-layer vectors as fixed-size lists of ``dtype``.

    ``VECTORS_SCHEMA`` is the logical schema (any hidden size, float32); a version's files use this
    one, and ``conform`` casts to it. Readers get float32 either way.
    """
    field = pa.field("vectors", pa.list_(pa.list_(VECTOR_DTYPES[dtype], int(hidden_size))), nullable=False)
    return VECTORS_SCHEMA.set(VECTORS_SCHEMA.get_field_index("vectors"), field)


def schema_to_b64(schema: pa.Schema) -> str:
    """An Arrow schema as base64 text (how the manifest records each table's schema)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_b64(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


@dataclass
class TableEntry:
    """A table of a store version as the manifest lists it."""

    files: list[str]
    rows: int
    schema: str  # base64 of the serialized Arrow schema
    schema_version: int = STORE_SCHEMA_VERSION


@dataclass
class Manifest:
    """``manifest.json`` of a store version: what is in it and how it was made."""

    version: str
    created_at: str
    model: dict  # name_or_path, id, fingerprint, hidden_size
    tables: dict[str, TableEntry]
    summary: dict  # reconciliation counts and per-stage timings
    config: dict  # the full job config (storage secrets redacted)
    inputs: dict  # input table -> URI
    methods: list[str]  # e.g. ["caa", "bt"]
    steerstore_version: str
    scale_choice: dict = field(default_factory=dict)  # per method: chosen α and its curve
    # the per-user choice: the population's choice per condition (users without their own), its prior, settings
    recommend: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)  # kind, buckets, tables (sort keys), row_group_bytes; {} = unbucketed
    vector_dtype: str = "float32"  # how the vectors table stores its values (readers return float32)
    store_schema_version: int = STORE_SCHEMA_VERSION

    def to_json_dict(self) -> dict:
        return asdict(self)


def table_entries(files: dict[str, list[str]], rows: dict[str, int],
                  schemas: dict[str, pa.Schema] | None = None) -> dict[str, TableEntry]:
    """The manifest's ``tables``: every store table with its file names (not paths), row count and schema
    (``schemas`` overrides a table's, e.g. the version's ``vectors_schema``)."""
    schemas = {**STORE_TABLES, **(schemas or {})}
    return {name: TableEntry(files=[f.rsplit("/", 1)[-1] for f in files.get(name, [])], rows=int(rows.get(name, 0)),
                             schema=schema_to_b64(schemas[name]))
            for name in STORE_TABLES}


def layout_entry(buckets: int, tables, row_group_bytes: int) -> dict:
    """The manifest's ``layout``: the per-user ``tables`` bucketed into ``buckets`` files by user id."""
    return {"kind": LAYOUT_KIND, "buckets": int(buckets), "tables": {t: list(BUCKETED_TABLES[t]) for t in tables},
            "row_group_bytes": int(row_group_bytes)}
