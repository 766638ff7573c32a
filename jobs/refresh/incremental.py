"""Incremental refresh: frozen global statistics, per-user per-method fingerprints, unchanged users carried forward.

Each published version keeps the global statistics it used (``_state/globals.pkl``, beside a list
of the sha256 of every user id they contain, so ``forget`` can drop them). The next night:

- **Global statistics** are frozen per family (``caa``: population direction, BT basis, θ_pop, α;
  ``dps``: clusters, population baseline, cluster heads; ``steerx``: counterfactual pool, layer
  and γ) and recomputed only when the family's settings or the model changed, after
  ``incremental.refresh_globals_after`` runs, when the previous run measured the population
  drifting (``incremental.min_drift_cosine``), or always with ``incremental.freeze_globals=false``.
- **Per user and family**, a fingerprint of what the artifact depends on: the user's own valid
  rows of that input (pairs for ``caa``/``bt``; histories for ``dps``/``steerx``), the settings
  that shape them (validation, prepare, the family's sections, the vector dtype), the model's
  weights fingerprint and the id of the family's global statistics. It is stored in the
  ``users`` table (``fingerprints``).
- A user whose fingerprint for a family equals the previous version's, and who had that family
  stored there, is **carried forward**: the previous version's rows of that family are copied
  into the new bucket file, and the model never sees the user for it. Everyone else is computed.
  Users absent from tonight's input are dropped (``incremental.absent_users=drop``, the input is
  a full snapshot) or kept as they were (``keep``, the input holds only users with new data).

Carrying needs the previous version's bucket count: the refresh keeps it unless the users
outgrow it twice over (then it re-buckets and computes everyone once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steerstore.infra import storage
from steerstore.infra.config import check, option, to_dict
from steerstore.infra.lifecycle import STATE_FOLDER, STATE_USERS, hashed
from steerstore.infra.store import SteeringStore, StoreNotFound
from steerstore.schemas.store import bucket_file, bucket_of_file, part_file

log = logging.getLogger("steerstore")

FAMILIES = ("caa", "dps", "steerx")
FAMILY_SECTIONS = {"caa": ("caa", "bt", "scale"), "dps": ("dps",), "steerx": ("steerx",)}
# a family is stored for a user when the users table lists the method of the same name; bt belongs to caa
METHOD_FAMILY = {"caa": "caa", "bt": "caa", "dps": "dps", "steerx": "steerx"}
GLOBAL_KEYS = {
    "caa": ("population_mean", "population_row", "basis", "feature_norms", "theta_pop", "n_sample",
            "sample_fraction", "caa_sample", "scales", "scale_curves"),
    "dps": ("dps_centroids", "dps_population", "dps_model", "dps_clusters", "dps_sample_counts",
            "dps_population_table"),
    "steerx": ("steerx_pool", "steerx_recommended", "steerx_recommended_history", "steerx_calibration",
               "steerx_calibrated", "steerx_uncalibrated"),
}
STATE_FILE = "globals.pkl"
CARRIED_TABLES = ("vectors", "bt_coords", "dps_heads", "steerx_users", "steerx_token_effects")


@dataclass
class IncrementalConfig:
    enabled: bool = option(
        True, help="carry users whose rows and settings did not change forward from the current version "
                   "(LATEST) without model work; false recomputes every user")
    absent_users: Literal["drop", "keep"] = option(
        "drop", help="users of the current version absent from tonight's input: drop (the input is a full "
                     "snapshot) or keep their artifacts as they are (the input holds only users with new data)")
    freeze_globals: bool = option(
        True, help="reuse the current version's global statistics (population direction, basis, α, DPS "
                   "clusters, SteerX pool) unless they are due; false recomputes them (and so every user)")
    refresh_globals_after: int = option(
        7, help="recompute a family's global statistics after this many runs used them")
    min_drift_cosine: float = option(
        0.95, help="recompute the CAA/BT statistics when the previous run measured the sampled population "
                   "direction's cosine to every user's below this at some layer (summary.population_drift)")

    def __post_init__(self) -> None:
        check(self.refresh_globals_after >= 1, "incremental.refresh_globals_after must be >= 1")
        check(-1.0 <= self.min_drift_cosine <= 1.0, "incremental.min_drift_cosine must be in [-1, 1]")


@dataclass
class Previous:
    """The version LATEST names: what tonight can reuse."""

    version: str
    manifest: dict
    state: dict | None  # its global statistics (None: an older version, or scrubbed by forget)

    @property
    def buckets(self) -> int:
        return int((self.manifest.get("layout") or {}).get("buckets", 0))


def _state_uri(store: SteeringStore, version: str, name: str) -> str:
    return storage.join(store.version_uri(version), STATE_FOLDER, name)


def previous_version(store: SteeringStore) -> Previous | None:
    """The current version and its saved statistics, or None before the first publish."""
    try:
        version = store.latest()
        if version is None:
            return None
        manifest = store.read_manifest(version)
    except StoreNotFound:
        return None
    try:
        state = pickle.loads(storage.read_bytes(_state_uri(store, version, STATE_FILE), store.storage))
    except FileNotFoundError:
        state = None
    return Previous(version, manifest, state)


def save_state(store: SteeringStore, version: str, g: dict) -> None:
    """Keep the version's global statistics with it (and the hashed ids of the users they hold, for forget)."""
    users = set(g.get("caa_sample") or []) | set(g.get("steerx_calibrated") or []) \
        | set(g.get("recommend_sample") or []) | {item["user_id"] for item in g.get("steerx_pool") or []}
    storage.write_text(_state_uri(store, version, STATE_USERS), json.dumps(sorted(hashed(u) for u in users)) + "\n",
                       store.storage)
    state = {k: v for k, v in g.items() if k != "carry"}
    storage.write_bytes(_state_uri(store, version, STATE_FILE), pickle.dumps(state), store.storage)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def family_settings(config, family: str, g: dict) -> str:
    """What a family's statistics and artifacts depend on besides data: its settings and the model(s)."""
    sections = {name: to_dict(getattr(config, name)) for name in FAMILY_SECTIONS[family]}
    if family == "steerx":  # its calibration also scores on top of retrieved history, shown as scale.history_* say,
        sc = config.scale    # under the strengths' decoded guards
        sections["scale.history"] = [sc.history_items, sc.history_chars]
        sections["scale.guards"] = [sc.fluency_tokens, sc.max_perplexity_ratio, sc.max_drift_ratio, sc.drift_encoder]
    sections["recommend.holdout"] = config.recommend.settings()  # the items held out of every family's inputs
    models = [g["model"]["model_fingerprint"]] + ([g.get("smoothing_fingerprint")] if family == "steerx" else [])
    return _digest([family, sections, to_dict(config.validate), to_dict(config.prepare), models])


def plan_globals(config, previous: Previous | None, g: dict, active: dict[str, bool]) -> tuple[dict, dict]:
    """Per active family: the frozen statistics to reuse ({family: {key: value}}) and the decision with its reason."""
    inc = config.incremental
    frozen, decisions = {}, {}
    old = (previous.state or {}).get("globals", {}) if previous else {}
    for family in FAMILIES:
        if not active.get(family, family == "caa"):
            continue
        settings = family_settings(config, family, g)
        prior = old.get(family)
        reason = None
        if not inc.freeze_globals:
            reason = "incremental.freeze_globals is false"
        elif previous is None:
            reason = "no previous version"
        elif prior is None:
            reason = f"version {previous.version} kept no {family} statistics"
        elif _empty(family, previous.state, config):
            reason = f"version {previous.version} has no {family} statistics to reuse"
        elif prior["settings"] != settings:
            reason = "its settings or the model changed"
        elif prior["runs"] >= inc.refresh_globals_after:
            reason = f"scheduled: used by {prior['runs']} runs (incremental.refresh_globals_after)"
        elif family == "caa" and _drifted(previous, inc.min_drift_cosine):
            reason = (f"the population drifted: cosine {previous.manifest['summary']['population_drift']['cosine_min']:.3f}"
                      f" < incremental.min_drift_cosine {inc.min_drift_cosine}")
        if reason is None:
            frozen[family] = {k: previous.state[k] for k in GLOBAL_KEYS[family] if k in previous.state}
            decisions[family] = {**prior, "runs": prior["runs"] + 1, "action": "frozen", "reason": None}
        else:
            decisions[family] = {"settings": settings, "computed_in": None, "runs": 1, "action": "computed",
                                 "reason": reason}
    return frozen, decisions


def _empty(family: str, state: dict, config) -> bool:
    """Whether a family's saved statistics lack what its users need (nothing could be computed that night)."""
    if family == "caa":
        return state.get("population_mean") is None
    if family == "dps":
        return ((config.dps.pcs_baseline == "population" and state.get("dps_population") is None)
                or (config.dps.clusters > 0 and state.get("dps_centroids") is None))
    return ((config.steerx.counterfactual == "other_users" and not state.get("steerx_pool"))
            or (config.steerx.vectors.enabled and not state.get("steerx_recommended")
                and not state.get("steerx_uncalibrated")))  # (no user long enough to calibrate on: nothing to redo)


def _drifted(previous: Previous, min_cosine: float) -> bool:
    drift = (previous.manifest.get("summary") or {}).get("population_drift")
    return bool(drift) and drift.get("cosine_min", 1.0) < min_cosine


def finish_plan(decisions: dict, version: str, g: dict) -> dict:
    """Statistics computed by this run get this version as their origin, and an id the fingerprints include:
    a digest of their settings and values, so two runs that compute the same statistics (resumed, or on
    another copy of the store) write the same fingerprints."""
    for family, d in decisions.items():
        if d["computed_in"] is None:
            d["computed_in"] = version
            d["id"] = _digest([d["settings"], content_digest({k: g.get(k) for k in GLOBAL_KEYS[family]})])
    return decisions


def content_digest(value) -> str:
    """A digest of nested statistics (arrays by dtype, shape and bytes; tables by their IPC bytes)."""
    h = hashlib.sha256()

    def walk(v) -> None:
        if isinstance(v, np.ndarray):
            h.update(f"nd{v.dtype}{v.shape}".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        elif isinstance(v, pa.Table):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, v.schema) as writer:
                writer.write_table(v)
            h.update(sink.getvalue().to_pybytes())
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                walk(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                walk(x)
            h.update(b"]")
        elif hasattr(v, "__dict__"):
            h.update(type(v).__name__.encode())
            walk(vars(v))
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()[:32]


def carry_plan(config, previous: Previous | None, buckets: int) -> dict | None:
    """Where the workers find carried rows: the previous version, when its layout matches tonight's."""
    if previous is None or not config.incremental.enabled:
        return None
    if previous.buckets != buckets:
        log.info("refresh: %s has %d buckets, this run %d: every user is computed", previous.version,
                 previous.buckets, buckets)
        return None
    return {"version": previous.version, "buckets": buckets, "absent": config.incremental.absent_users}


def keep_buckets(config, previous: Previous | None, wanted: int) -> int:
    """Tonight's bucket count: the previous version's (so rows can be carried) unless it is outgrown twice over."""
    if previous is None or not config.incremental.enabled or previous.buckets < 1:
        return wanted
    if wanted > 2 * previous.buckets:
        log.info("refresh: %d buckets needed, %s has %d: re-bucketing (every user is computed once)", wanted,
                 previous.version, previous.buckets)
        return wanted
    return max(previous.buckets, config.output.min_buckets)


def fingerprints(users: pa.Table, config, g: dict) -> dict[str, dict[str, str]]:
    """user_id -> {family: fingerprint} for the ok users of a shard, over tonight's active families."""
    families = [f for f in FAMILIES if f in g.get("globals", {})]
    if not families or users.num_rows == 0:
        return {}
    common = [config.output.vector_dtype]
    out = {}
    for u in users.select(["user_id", "pairs", "histories"]).to_pylist():
        out[u["user_id"]] = {f: "sha256:" + _digest([f, u["pairs"] if f == "caa" else u["histories"],
                                                     g["globals"][f]["id"], common]) for f in families}
    return out


def read_previous(config, carry: dict, bucket: int) -> dict[str, pa.Table]:
    """The previous version's rows of one bucket: users and every per-user table (absent ones left out)."""
    store = SteeringStore(config.output.store, config.storage)
    out = {}
    for table in ("users",) + CARRIED_TABLES + ("recommended",):
        name = part_file(bucket) if table == "steerx_token_effects" else bucket_file(bucket)
        try:
            out[table] = storage.open_parquet(storage.join(store.table_uri(carry["version"], table), name),
                                              config.storage).read()
        except FileNotFoundError:
            pass
    users = out.get("users")
    if users is not None and "fingerprints" not in users.column_names:  # a version written before fingerprints
        out["users"] = users.append_column("fingerprints", pa.nulls(users.num_rows, pa.map_(pa.string(), pa.string())))
    return out


def plan_carry(previous: dict[str, pa.Table], fps: dict[str, dict[str, str]], eligible: dict[str, set[str]],
               present: set[str], absent: str, forgotten: frozenset,
               frozen: frozenset = frozenset(FAMILIES)) -> tuple[dict[str, set[str]], set[str], dict]:
    """Which users each family carries, which absent users are kept, and the counts for the summary.

    ``eligible``: per family, tonight's users with enough rows for it; ``present``: every user of
    tonight's shard (quarantined ones too); ``frozen``: the families whose statistics tonight reuses.
    An absent user keeps only the families in ``frozen`` (a θ in last night's basis, or a routing
    over last night's clusters, means nothing against new ones), and is dropped when none is left.
    """
    prev = previous.get("users")
    before = {} if prev is None else {r["user_id"]: r for r in prev.select(
        ["user_id", "methods", "fingerprints"]).to_pylist()}
    carried: dict[str, set[str]] = {}
    counts: dict = {"families": {}}
    for family, users in eligible.items():
        same = {u for u in users if u in before and family in (before[u]["methods"] or [])
                and dict(before[u]["fingerprints"] or []).get(family) == fps.get(u, {}).get(family)}
        carried[family] = same
        counts["families"][family] = {"carried": len(same), "recomputed": len([u for u in users - same if u in before]),
                                      "new": len([u for u in users if u not in before])}
    absent_ids = {u for u in before if u not in present}
    kept = set()
    if absent == "keep" and prev is not None:  # users with stored artifacts keep them; quarantined ones: nothing to keep
        stored = set(prev.filter(pc.equal(prev.column("status"), "stored")).column("user_id").to_pylist())
        kept = {u for u in absent_ids & stored if hashed(u) not in forgotten
                and any(METHOD_FAMILY.get(m) in frozen for m in before[u]["methods"] or [])}
    counts["absent"] = len(absent_ids)
    counts["kept_absent"] = len(kept)
    counts["dropped"] = len(absent_ids) - len(kept)
    counts["dropped_by_method"] = {}
    for u in absent_ids:
        for m in before[u]["methods"] or []:
            if u not in kept or METHOD_FAMILY.get(m) not in frozen:
                counts["dropped_by_method"][m] = counts["dropped_by_method"].get(m, 0) + 1
    return carried, kept, counts


def carried_rows(previous: dict[str, pa.Table], carried: dict[str, set[str]], kept: set[str],
                 content: dict[str, str] | None = None,
                 frozen: frozenset = frozenset(FAMILIES)) -> dict[str, pa.Table]:
    """The previous version's rows to copy: carried families' rows, and kept absent users' rows of the
    ``frozen`` families (their ``users`` rows listing only those methods).

    ``content``: tonight's ``content_fingerprint`` per user (of all their rows), stamped on carried rows
    as a recompute would (a user whose histories changed keeps a CAA row that names tonight's content).
    """
    def ids(family: str) -> pa.Array:
        return pa.array(sorted(carried.get(family, set()) | (kept if family in frozen else set())), pa.string())

    def pick(table: str, family: str, method: str | None = None) -> pa.Table | None:
        t = previous.get(table)
        if t is None:
            return None
        mask = pc.is_in(t.column("user_id"), ids(family))
        if method is not None:
            mask = pc.and_(mask, pc.equal(t.column("method"), method))
        return t.filter(mask)

    vectors = [v for v in (pick("vectors", "caa", "caa"), pick("vectors", "steerx", "steerx")) if v is not None]
    out = {"vectors": pa.concat_tables(vectors) if vectors else None, "bt_coords": pick("bt_coords", "caa"),
           "dps_heads": pick("dps_heads", "dps"), "steerx_users": pick("steerx_users", "steerx"),
           "steerx_token_effects": pick("steerx_token_effects", "steerx")}
    content = content or {}
    for table, t in list(out.items()):
        if t is not None and t.num_rows and "content_fingerprint" in t.column_names:
            i = t.schema.get_field_index("content_fingerprint")
            stamped = [None if old is None else content.get(u, old)  # rows that record none keep none
                       for u, old in zip(t.column("user_id").to_pylist(), t.column(i).to_pylist())]
            out[table] = t.set_column(i, t.schema.field(i), pa.array(stamped, t.schema.field(i).type))
    if kept and previous.get("users") is not None:
        rows = previous["users"].filter(pc.is_in(previous["users"].column("user_id"),
                                                 pa.array(sorted(kept), pa.string()))).to_pylist()
        for r in rows:
            r["methods"] = [m for m in r["methods"] or [] if METHOD_FAMILY.get(m) in frozen]
            r["fingerprints"] = [(f, fp) for f, fp in r["fingerprints"] or [] if f in frozen]
        out["users"] = pa.Table.from_pylist(rows, schema=previous["users"].schema)
    return {k: v for k, v in out.items() if v is not None and v.num_rows}


def carried_partial(vectors: pa.Table | None, population: np.ndarray | None, kappa: float) -> dict | None:
    """Carried users' share of the population sums (for the drift check): their unshrunk means, recovered.

    A stored CAA vector is (n·m + κ·p) / (n + κ) with n the user's pairs (weights have mean 1), so
    m = (v·(n + κ) − κ·p) / n.
    """
    from steerstore.operators.caa import vectors_array

    if vectors is None or population is None:
        return None
    rows = vectors.filter(pc.equal(vectors.column("method"), "caa"))
    if rows.num_rows == 0:
        return None
    v = vectors_array(rows).astype(np.float64)
    n = np.asarray(rows.column("n_pairs").to_pylist(), dtype=np.float64)
    means = (v * (n + kappa)[:, None, None] - kappa * population.astype(np.float64)[None]) / n[:, None, None]
    return {"sums": np.einsum("u,ulh->lh", n, means), "weight": float(n.sum()), "users": rows.num_rows}


def incremental_summary(store: SteeringStore, g: dict, markers: list[dict]) -> dict:
    """The run's reuse of the current version: statistics frozen or computed (and why), users per family
    carried forward, recomputed and new, users dropped or kept (absent from tonight's input)."""
    carry = g.get("carry")
    families: dict[str, dict[str, int]] = {}
    totals = {"dropped": 0, "kept_absent": 0}
    dropped_by_method: dict[str, int] = {}
    for m in markers:
        inc = m.get("incremental") or {}
        for family, counts in (inc.get("families") or {}).items():
            into = families.setdefault(family, {})
            for k, n in counts.items():
                into[k] = into.get(k, 0) + n
        for k in totals:
            totals[k] += inc.get(k, 0)
        for method, n in (inc.get("dropped_by_method") or {}).items():
            dropped_by_method[method] = dropped_by_method.get(method, 0) + n
    if carry is not None:  # buckets without a user tonight: every user of theirs in the previous version is absent
        visited = {int(m["bucket"]) for m in markers}
        users = store.read_manifest(carry["version"]).get("tables", {}).get("users", {}).get("files", [])
        for name in users:
            if bucket_of_file(name) in visited | {None}:
                continue
            t = storage.open_parquet(storage.join(store.table_uri(carry["version"], "users"), name),
                                     store.storage).read(columns=["methods"])
            totals["dropped"] += t.num_rows
            for ms in t.column("methods").to_pylist():
                for method in ms or []:
                    dropped_by_method[method] = dropped_by_method.get(method, 0) + 1
    return {"from_version": None if carry is None else carry["version"],
            "absent_users": None if carry is None else carry["absent"],
            "global_statistics": {f: {k: d.get(k) for k in ("action", "reason", "computed_in", "runs")}
                                  for f, d in (g.get("globals") or {}).items()},
            "users": families, "users_dropped": totals["dropped"], "users_kept_absent": totals["kept_absent"],
            "dropped_by_method": dropped_by_method}


__all__ = ["incremental_summary", "CARRIED_TABLES", "FAMILIES", "IncrementalConfig", "Previous", "carried_partial", "carried_rows",
           "carry_plan", "finish_plan", "fingerprints", "keep_buckets", "plan_carry", "plan_globals",
           "previous_version", "read_previous", "save_state"]
