"""A store's lifecycle: retention of versions, and forgetting users. Run under the store's lease.

- **Retention** (``prune``): keep the newest ``keep_versions`` published versions (and always the
  one ``LATEST`` names); delete older ones, and delete unfinished versions (no manifest) whose
  newest file is older than ``unfinished_grace_s``. Ages are measured with the object store's own
  clock (the modification time of a marker written just before), never the driver's.
- **Forgetting** (``forget``): remove users from every retained version: their rows of every
  per-user table (bucket files rewritten without them), their quarantine rows (raw input text
  included, and rows without a user id whose raw text names them), their SteerX token effects;
  each version's manifest is re-published with the new row counts and a ``forgotten`` record.
  A version's saved global statistics (``_state/``, the next incremental refresh's starting
  point) are deleted when they hold a forgotten user (a sample member, SteerX pool text): the
  next refresh then computes new ones. Unfinished versions are deleted whole (their staging holds raw input). The ids are appended,
  hashed, to ``<store>/forget/`` so later refreshes drop those users' input rows. Reports name
  users only by the sha256 of their id, never the id or any text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from steerstore.infra import storage
from steerstore.infra.config import check, option
from steerstore.infra.store import SteeringStore
from steerstore.schemas.store import BUCKETED_TABLES, UNATTRIBUTED_PART, bucket_file, part_file, user_bucket

log = logging.getLogger("steerstore")

FORGET_FOLDER = "forget"
STATE_FOLDER = "_state"  # a version's global statistics, reused by the next incremental refresh
STATE_USERS = "users.json"  # sha256 of every user id the saved statistics hold (samples, SteerX pool)
_PER_SHARD_TABLES = ("quarantine", "steerx_token_effects")  # part-<bucket>.parquet files


@dataclass
class RetentionConfig:
    keep_versions: int = option(7, help="published versions kept (the newest; the one LATEST names always)")
    unfinished_grace_s: float = option(
        2 * 86400.0, help="unfinished versions (never published: interrupted or refused runs) are deleted once "
                          "their newest file is this old; within it, the same command can still resume them")

    def __post_init__(self) -> None:
        check(self.keep_versions >= 1, "retention.keep_versions must be >= 1")
        check(self.unfinished_grace_s >= 0, "retention.unfinished_grace_s must be >= 0")


def hashed(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.){1,4096})"')


def names_forgotten(raw: str | None, forgotten: frozenset) -> bool:
    """Whether a row without a user id names a forgotten user in one of its JSON strings (by hash)."""
    if not raw or not forgotten:
        return False
    for m in _JSON_STRING.finditer(raw):
        try:
            value = json.loads(f'"{m.group(1)}"')
        except ValueError:
            value = m.group(1)
        if hashed(value) in forgotten:
            return True
    return False


def _now_on_store(store: SteeringStore) -> int:
    """The object store's clock (ns): the modification time of a marker written now."""
    uri = storage.join(store.uri, "_clock")
    storage.write_bytes(uri, b"", store.storage)
    fs, path = storage.filesystem(uri, store.storage)
    return fs.get_file_info(path).mtime_ns


def _newest_file_ns(store: SteeringStore, version: str) -> int | None:
    fs, path = storage.filesystem(store.version_uri(version), store.storage)
    infos = storage.with_retries(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)),
                                 store.storage, f"list {version}")
    times = [i.mtime_ns for i in infos if i.type == pafs.FileType.File and i.mtime_ns is not None]
    return max(times) if times else None


def _delete_version(store: SteeringStore, version: str) -> None:
    fs, path = storage.filesystem(store.version_uri(version), store.storage)
    storage.with_retries(lambda: fs.delete_dir(path), store.storage, f"delete version {version}")
    for record in storage.list_files(storage.join(store.uri, "runs"), store.storage, suffix=".json"):
        try:
            if json.loads(storage.read_text(record, store.storage)).get("version") == version:
                rfs, rpath = storage.filesystem(record, store.storage)
                rfs.delete_file(rpath)
        except (FileNotFoundError, ValueError):
            continue


def prune(store: SteeringStore, config: RetentionConfig, keep: set[str] = frozenset()) -> dict:
    """Apply retention; ``keep``: versions never deleted (a run in progress). Returns what was deleted."""
    names = storage.list_dir(storage.join(store.uri, "versions"), store.storage)
    published = store.versions()
    latest = store.latest()
    kept = set(published[-config.keep_versions:]) | {latest} | set(keep)
    old = [v for v in published if v not in kept]
    for v in old:
        _delete_version(store, v)
    for v in kept & set(published):
        if storage.exists(storage.join(store.version_uri(v), "_staging", "shards.json"), store.storage):
            _delete_staging(store, v)
    unfinished = []
    now = _now_on_store(store) if set(names) - set(published) - set(keep) else 0
    for v in sorted(set(names) - set(published) - set(keep)):
        newest = _newest_file_ns(store, v)
        if newest is None or (now - newest) / 1e9 >= config.unfinished_grace_s:
            _delete_version(store, v)
            unfinished.append(v)
    if old or unfinished:
        log.info("retention: deleted %d old and %d unfinished version(s) of %s", len(old), len(unfinished), store.uri)
    return {"deleted_versions": old, "deleted_unfinished": unfinished}


def forgotten_hashes(store: SteeringStore) -> set[str]:
    """Hashed ids of every user forgotten in this store (what later refreshes must not take in again)."""
    out: set[str] = set()
    for f in storage.list_files(storage.join(store.uri, FORGET_FOLDER), store.storage, suffix=".json"):
        out.update(json.loads(storage.read_text(f, store.storage)).get("hashed_ids", []))
    return out


def _keep(table: pa.Table, ids: list[str]) -> pa.Array:
    """Which rows of ``table`` to keep: not the rows of ``ids``, nor user-less rows whose raw text names one of them."""
    keep = pc.invert(pc.fill_null(pc.is_in(table.column("user_id"), pa.array(ids, pa.string())), False))
    if "raw" in table.column_names:
        orphan = pc.is_null(table.column("user_id"))
        names = pa.array([False] * table.num_rows)
        for uid in ids:
            names = pc.or_(names, pc.fill_null(pc.match_substring(table.column("raw"), uid), False))
        keep = pc.and_(keep, pc.invert(pc.and_(orphan, names)))
    return keep


def _rewrite(store: SteeringStore, version: str, table: str, name: str, ids: list[str], sort: tuple | None,
             row_group_bytes: int) -> pa.Table | None:
    """Rewrite one file of ``table`` without ``ids``; returns the rows removed (None: the file is absent)."""
    uri = storage.join(store.table_uri(version, table), name)
    try:
        data = storage.open_parquet(uri, store.storage).read()
    except FileNotFoundError:
        return None
    keep = _keep(data, ids)
    kept = data.filter(keep)
    if kept.num_rows < data.num_rows:
        if sort:
            kept = kept.sort_by([(k, "ascending") for k in sort])
        per_row = max(1, kept.nbytes // max(1, kept.num_rows))
        storage.write_parquet(uri, kept, store.storage, row_group_size=max(1, row_group_bytes // per_row))
    return data.filter(pc.invert(keep))


def _discount(summary: dict, users: pa.Table) -> None:
    """Take forgotten users out of a version's summary counts (what the next publish guard compares with)."""
    for u in users.select(["status", "methods"]).to_pylist():
        summary["users_in"] = summary.get("users_in", 0) - 1
        key = "users_stored" if u["status"] == "stored" else "users_quarantined"
        summary[key] = summary.get(key, 0) - 1
        for m in u["methods"] or []:
            by = summary.setdefault("users_by_method", {})
            by[m] = by.get(m, 0) - 1
    summary["users_forgotten"] = summary.get("users_forgotten", 0) + users.num_rows


def forget_in_version(store: SteeringStore, version: str, ids: list[str]) -> dict[str, int]:
    """Remove ``ids`` from one published version and re-publish its manifest; returns rows removed per table."""
    manifest = store.read_manifest(version)
    layout = manifest.get("layout") or {}
    buckets = int(layout.get("buckets", 0))
    row_group_bytes = int(layout.get("row_group_bytes", 256 << 10))
    targets = {bucket_file(user_bucket(u, buckets)) for u in ids} if buckets else None
    parts = ({part_file(user_bucket(u, buckets)) for u in ids} | {UNATTRIBUTED_PART}
             if buckets else None)
    removed: dict[str, int] = {}
    for table, entry in manifest.get("tables", {}).items():
        if table in BUCKETED_TABLES:
            names, sort = [n for n in entry.get("files", []) if targets is None or n in targets], BUCKETED_TABLES[table]
        elif table in _PER_SHARD_TABLES:
            names, sort = [n for n in entry.get("files", []) if parts is None or n in parts], None
        else:
            continue  # version-wide tables (population, basis, clusters) hold no user's rows
        gone = [p for p in (_rewrite(store, version, table, name, ids, sort, row_group_bytes) for name in names)
                if p is not None and p.num_rows]
        n = sum(p.num_rows for p in gone)
        if n:
            removed[table] = n
            entry["rows"] = int(entry.get("rows", 0)) - n
        if table == "users" and gone:
            _discount(manifest.get("summary") or {}, pa.concat_tables(gone))
    if _drop_state(store, version, {hashed(u) for u in ids}):
        removed["global_statistics"] = 1
    if removed:
        record = manifest.setdefault("forgotten", [])
        record.append({"users": len(ids), "rows_removed": removed})
        storage.write_text(storage.join(store.version_uri(version), "manifest.json"),
                           json.dumps(manifest, indent=2, sort_keys=True) + "\n", store.storage)
    return removed


def _drop_state(store: SteeringStore, version: str, hashes: set[str]) -> bool:
    """Delete the version's saved global statistics when they hold one of the forgotten users; True if deleted."""
    folder = storage.join(store.version_uri(version), STATE_FOLDER)
    try:
        held = set(json.loads(storage.read_text(storage.join(folder, STATE_USERS), store.storage)))
    except FileNotFoundError:
        return False
    if not held & hashes:
        return False
    fs, path = storage.filesystem(folder, store.storage)
    storage.with_retries(lambda: fs.delete_dir(path), store.storage, f"delete the statistics of {version}")
    return True


def _delete_staging(store: SteeringStore, version: str) -> None:
    """A published version's leftover staging (a publish that crashed before cleaning up): raw input text."""
    fs, path = storage.filesystem(storage.join(store.version_uri(version), "_staging"), store.storage)
    try:
        storage.with_retries(lambda: fs.delete_dir(path), store.storage, f"delete staging of {version}")
    except (FileNotFoundError, OSError):
        pass


def forget(store: SteeringStore, user_ids: list[str], request_id: str, lease=None) -> dict:
    """Forget users in every retained version and record them for later refreshes; returns the report.

    ``lease``: the store's lease held by the caller, checked before every change (``LeaseLost`` stops it).
    """
    check = lease.check if lease is not None else (lambda: None)
    ids = sorted(set(user_ids))
    hashes = [hashed(u) for u in ids]
    storage.write_text(storage.join(store.uri, FORGET_FOLDER, f"{request_id}.json"),
                       json.dumps({"request": request_id, "hashed_ids": hashes}, sort_keys=True) + "\n",
                       store.storage)
    per_version = {}
    for v in store.versions():
        check()
        _delete_staging(store, v)
        per_version[v] = forget_in_version(store, v, ids)
    published = set(store.versions())
    unfinished = [v for v in storage.list_dir(storage.join(store.uri, "versions"), store.storage)
                  if v not in published]
    for v in unfinished:
        check()
        _delete_version(store, v)
    report = {"request": request_id, "users": len(ids), "hashed_ids": hashes, "rows_removed": per_version,
              "unfinished_versions_deleted": unfinished}
    storage.write_text(storage.join(store.uri, "reports", f"forget-{request_id}.json"),
                       json.dumps(report, indent=2, sort_keys=True) + "\n", store.storage)
    return report
