"""Forget users: remove them from every retained version of a store, and from every later refresh.

Launch: ``steerstore forget --store s3://bucket/store --users forget.txt`` (one user id per line,
or JSON Lines with ``user_id``). Runs under the store's lease, so never beside a refresh. The
report (``<store>/reports/forget-<request>.json``) names users by the sha256 of their id only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from steerstore.infra import storage
from steerstore.infra.config import check, option
from steerstore.infra.lease import LeaseConfig, StoreLease
from steerstore.infra.lifecycle import RetentionConfig, forget, prune
from steerstore.infra.storage import StorageConfig
from steerstore.infra.store import SteeringStore


@dataclass
class ForgetConfig:
    store: str = option("", help="store URI (local folder or s3://bucket/prefix)")
    users: str = option("", help="file of user ids to forget: one per line, or JSON Lines with user_id")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})
    lease: LeaseConfig = dataclasses.field(default_factory=LeaseConfig, metadata={"help": "the store's lease"})
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig,
                                                   metadata={"help": "versions kept (applied first)"})

    def __post_init__(self) -> None:
        check(bool(self.store) and bool(self.users), "forget needs --store and --users")


def read_ids(uri: str, cfg: StorageConfig) -> list[str]:
    """User ids from a text file (one per line) or JSON Lines (``user_id``); a malformed line is an error."""
    ids = []
    for n, line in enumerate(storage.read_text(uri, cfg).split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                uid = json.loads(line).get("user_id")
            except ValueError:
                uid = None
            if not isinstance(uid, str) or not uid:
                raise ValueError(f"{uri} line {n}: a JSON line must hold a non-empty string user_id")
            ids.append(uid)
        else:
            ids.append(line)
    if not ids:
        raise ValueError(f"{uri} names no user")
    return ids


def main(config: ForgetConfig) -> dict:
    store = SteeringStore(config.store, config.storage)
    ids = read_ids(config.users, config.storage)
    with StoreLease(store.uri, config.storage, config.lease, purpose="forget") as lease:
        prune(store, config.retention)
        report = forget(store, ids, SteeringStore.new_version_id(), lease)
    removed = sum(n for per in report["rows_removed"].values() for n in per.values())
    print(f"forgot {report['users']} user(s) in {len(report['rows_removed'])} version(s) of {config.store}: "
          f"{removed} rows removed; {len(report['unfinished_versions_deleted'])} unfinished version(s) deleted; "
          f"report {storage.join(store.uri, 'reports', 'forget-' + report['request'] + '.json')}")
    return report
