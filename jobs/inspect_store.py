"""Describe a store: versions, row counts, schemas and the model it was built for.

Launch: ``steerstore inspect ./steerstore-out/store``
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from steerstore.infra.config import check, option
from steerstore.infra.storage import StorageConfig
from steerstore.infra.store import SteeringStore
from steerstore.schemas.store import schema_from_b64


@dataclass
class InspectConfig:
    store: str = option("", help="store URI (local folder or s3://bucket/prefix)")
    version: str | None = option(None, help="version to describe; default LATEST")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(bool(self.store), "a store URI is required")


def main(config: InspectConfig) -> dict:
    store = SteeringStore(config.store, config.storage)
    versions = store.versions()
    version = store.resolve(config.version)
    manifest = store.read_manifest(version)
    info = {"store": config.store, "versions": versions, "latest": store.latest(), "version": version,
            "model": manifest["model"], "summary": manifest["summary"],
            "tables": {name: {"rows": t["rows"], "files": len(t["files"]),
                              "schema": str(schema_from_b64(t["schema"])).splitlines()}
                       for name, t in manifest["tables"].items()}}
    print(f"store {config.store}")
    print(f"versions ({len(versions)}): " + ", ".join(v + (" (LATEST)" if v == info["latest"] else "") for v in versions))
    print(f"version {version} · created {manifest['created_at']} · methods {manifest.get('methods')}")
    print(f"model {manifest['model'].get('id')} · fingerprint {manifest['model'].get('fingerprint')} "
          f"· hidden {manifest['model'].get('hidden_size')}")
    s = manifest["summary"]
    print(f"users in {s['users_in']} = stored {s['users_stored']} + quarantined {s['users_quarantined']}; "
          f"input rows {s['input_rows']} ({s['rows_quarantined']} quarantined)")
    for name, t in info["tables"].items():
        print(f"table {name}: {t['rows']} rows in {t['files']} file(s)")
        for line in t["schema"]:
            if not line.startswith("--"):
                print(f"    {line}")
    print("stage seconds: " + json.dumps(s.get("stage_seconds", {})))
    return info
