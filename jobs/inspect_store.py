"""Describe a store: what is in it, for whom, built with which model, and why users are missing.

Launch: ``steerstore inspect ./steerstore-out/store`` (the front page), ``--users`` (the user ids,
paged), ``--user ID`` (one user's artifacts, or why they are missing), ``--schema`` (every
table's Arrow schema).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass

import pyarrow.compute as pc
import pyarrow.fs as pafs

from steerstore.infra import storage
from steerstore.infra.config import check, option
from steerstore.infra.storage import StorageConfig
from steerstore.infra.store import SteeringStore, StoreNotFound
from steerstore.schemas.store import BUCKETED_TABLES, schema_from_b64

_PER_USER = tuple(BUCKETED_TABLES)


@dataclass
class InspectConfig:
    store: str = option("", help="store URI (local folder or s3://bucket/prefix)")
    version: str | None = option(None, help="version to describe; default LATEST")
    users: bool = option(False, help="list the version's user ids (and status), --limit at a time from --offset")
    offset: int = option(0, help="with --users: the first row to list")
    limit: int = option(50, help="with --users: how many rows to list")
    user: str | None = option(None, help="show one user's artifacts, or why they are missing")
    schema: bool = option(False, help="print every table's Arrow schema")
    reasons: int = option(10, help="most frequent quarantine reasons shown")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(bool(self.store), "a store URI is required")
        check(self.offset >= 0 and self.limit >= 1 and self.reasons >= 0, "offset >= 0, limit >= 1, reasons >= 0")


def main(config: InspectConfig) -> dict:
    store = SteeringStore(config.store, config.storage)
    versions = store.versions()
    if config.version and config.version not in versions:
        raise StoreNotFound(store.uri, f"it has no published version {config.version!r}; its versions: "
                                       + (", ".join(versions) or "none"), refresh_hint=not versions)
    version = store.resolve(config.version)
    manifest = store.read_manifest(version)
    if config.user is not None:
        return _user(store, version, config.user)
    if config.users:
        return _users(store, version, config.offset, config.limit)
    return _front_page(store, config, versions, version, manifest)


def _front_page(store: SteeringStore, config: InspectConfig, versions: list[str], version: str, manifest: dict) -> dict:
    latest = store.latest()
    s = manifest["summary"]
    tables = manifest["tables"]
    sizes = _table_bytes(store, version, tables)
    stored = max(1, s.get("users_stored", 0))
    per_user = sum(sizes.get(t, 0) for t in _PER_USER)
    info = {"store": config.store, "versions": versions, "latest": latest, "version": version,
            "model": manifest["model"], "methods": manifest.get("methods"), "layout": manifest.get("layout"),
            "users_by_method": s.get("users_by_method", {}), "quarantine_reasons": _reasons(store, version, config.reasons),
            "bytes_per_user": round(per_user / stored), "tables": {n: {"rows": t["rows"], "files": len(t["files"]),
                                                                       "bytes": sizes.get(n, 0)} for n, t in tables.items()},
            "summary": s}
    print(f"store {config.store}")
    print(f"versions ({len(versions)}): " + ", ".join(v + (" (LATEST)" if v == latest else "") for v in versions))
    print(f"version {version} · created {manifest['created_at']} · steerstore {manifest.get('steerstore_version')}")
    model = manifest["model"]
    print(f"model {model.get('name_or_path')} (id {model.get('id')}) · weights fingerprint {model.get('fingerprint')} "
          f"· hidden {model.get('hidden_size')} · vectors {manifest.get('vector_dtype', 'float32')}")
    print(f"users: {s['users_in']} in = {s['users_stored']} stored + {s['users_quarantined']} quarantined"
          + (f"; {s['users_kept_absent']} kept from an earlier version" if s.get("users_kept_absent") else ""))
    print("by method: " + (", ".join(f"{m} {n}" for m, n in sorted(info["users_by_method"].items())) or "none"))
    print(f"input rows: {s['input_rows']} = {s['rows_kept']} kept + {s['rows_quarantined']} quarantined"
          + (f" + {s['rows_forgotten']} forgotten" if s.get("rows_forgotten") else ""))
    if info["quarantine_reasons"]:
        print("quarantine reasons (most frequent):")
        for reason, n in info["quarantine_reasons"]:
            print(f"  {n:>7}  {reason}")
    inc = s.get("incremental") or {}
    if inc.get("from_version"):
        counts = "; ".join(f"{f} {c.get('carried', 0)} carried / {c.get('recomputed', 0)} recomputed / "
                           f"{c.get('new', 0)} new" for f, c in sorted((inc.get("users") or {}).items()))
        print(f"incremental from {inc['from_version']}: {counts}; {inc.get('users_dropped', 0)} dropped")
    layout = manifest.get("layout") or {}
    if layout:
        print(f"layout: {layout.get('buckets')} user buckets, row groups of ~{layout.get('row_group_bytes', 0) >> 10} "
              f"KiB; {per_user / stored / 1024:.1f} KiB per stored user across the per-user tables")
    for name, t in info["tables"].items():
        print(f"table {name}: {t['rows']} rows in {t['files']} file(s), {t['bytes'] / 2**20:.2f} MiB")
    if config.schema:
        for name, t in tables.items():
            print(f"schema {name}:")
            for line in str(schema_from_b64(t["schema"])).splitlines():
                if not line.startswith("--"):
                    print(f"    {line}")
    print("stage seconds: " + json.dumps(s.get("stage_seconds", {})))
    print("more: --users (ids), --user ID (one user), --schema (table schemas), --version V")
    return info


def _table_bytes(store: SteeringStore, version: str, tables: dict) -> dict[str, int]:
    out = {}
    for name in tables:
        fs, path = storage.filesystem(store.table_uri(version, name), store.storage)
        infos = storage.with_retries(lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)),
                                     store.storage, f"list {name}")
        out[name] = sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)
    return out


_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|\b\d+(\.\d+)?\b")


def _reasons(store: SteeringStore, version: str, top: int) -> list[tuple[str, int]]:
    """Quarantine reasons grouped with their quoted values and numbers masked ('…', N), most frequent first."""
    if top == 0:
        return []
    reasons = store.read_table("quarantine", version, columns=["reason"]).column("reason").to_pylist()
    counts = Counter(_VARIABLE.sub(lambda m: "N" if m.group(0)[0].isdigit() else "'…'", r or "")[:160]
                     for r in reasons)
    return counts.most_common(top)


def _users(store: SteeringStore, version: str, offset: int, limit: int) -> dict:
    table = store.read_table("users", version, columns=["user_id", "status", "methods", "reason"])
    table = table.sort_by("user_id").slice(offset, limit)
    total = store.read_manifest(version)["tables"]["users"]["rows"]
    for r in table.to_pylist():
        what = ",".join(r["methods"] or []) if r["status"] == "stored" else f"quarantined: {r['reason']}"
        print(f"{r['user_id']}\t{what}")
    print(f"({offset + 1}-{offset + table.num_rows} of {total}; --offset {offset + limit} for more)"
          if table.num_rows else f"(no users from {offset}; {total} in all)")
    return {"users": table.column("user_id").to_pylist(), "total": total}


def _user(store: SteeringStore, version: str, user_id: str) -> dict:
    """One user's artifacts per method family, or why each is missing."""
    from steerstore.infra.reader import StoreReader

    reader = StoreReader(store.uri, store.storage, version=version)
    row = reader.users([user_id]).to_pylist()
    art = reader.artifacts(user_id)
    found = {
        "caa": None if art.caa is None else f"layers {art.caa.layers}, α {art.caa.recommended_scale}",
        "bt": None if art.bt is None else f"ideal point θ over layers {art.bt.layers}",
        "style_vectors": ", ".join(sorted(art.style_vectors)) or None,
        "steerx": None if art.steerx is None else f"{len(art.steerx['anchors'] or [])} anchors; "
                                                  f"context: {(art.steerx['context'] or '')[:120]!r}",
        "dps": None if art.dps is None else f"{len(art.dps.heads)} heads from {art.dps.source}",
    }
    print(f"user {user_id!r} in version {version}:")
    if row:
        r = row[0]
        print(f"  status {r['status']}" + (f" ({r['reason']})" if r["reason"] else "")
              + f" · pairs {r['n_pairs_valid']}/{r['n_pairs_in']} valid · histories "
                f"{r['n_histories_valid']}/{r['n_histories_in']} valid")
    for what, value in found.items():
        print(f"  {what}: {value if value is not None else 'none — ' + reader.why_missing(user_id, what)}")
    quarantined = store.read_table("quarantine", version, columns=["user_id", "stage", "record_id", "reason"],
                                   filter=pc.field("user_id") == user_id).to_pylist()
    for q in quarantined:
        print(f"  quarantined {q['stage']} {q['record_id'] or ''}: {q['reason']}")
    return {"user": user_id, "status": row[0]["status"] if row else "not in the inputs", "artifacts": found,
            "quarantine": quarantined}
