"""A refresh run's identity and staging: where shards, sample state and completion markers live, and resume.

A run is keyed by what its output depends on: the input files (path, size, modification time),
the configuration that affects outputs (not the Ray connection, scheduling or credentials) and
the model's weights fingerprint. The first run with a key records the version it writes in
``<store>/runs/<key>.json``; a rerun with the same key whose version is not yet published
resumes it: shards whose completion marker exists are reused as they are. Everything the run
writes before publishing sits under the version's own prefix (invisible until its manifest is
written); the staging folder, which holds raw input text, is deleted after publishing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from steerstore.infra import storage
from steerstore.infra.config import to_dict
from steerstore.infra.store import SteeringStore
from steerstore.jobs.refresh.config import RefreshConfig

log = logging.getLogger("steerstore")

# config sections that do not change what a run writes (where and how it runs, credentials, the publish guard:
# a refused version is resumed and published by the same command with --publish.force)
_NOT_OUTPUT = ("ray", "resources", "storage", "publish", "lease", "retention")


def inputs_listing(inputs: dict[str, str], config: RefreshConfig) -> list[list]:
    """(kind, URI, size, mtime) of every input file the refresh reads, sorted: changes when any of them does."""
    from steerstore.jobs.refresh.inputs import input_files

    return sorted([kind, *f] for kind, uri in inputs.items() for f in input_files(uri, config.storage))


def run_key(inputs: dict[str, str], config: RefreshConfig, previous: str | None = None) -> str:
    """What the output depends on, but the model's weights (checked once the workers load them: ``check_model``).

    ``previous``: the version the run starts from (its statistics and unchanged users are reused).
    """
    settings = {k: v for k, v in to_dict(config).items() if k not in _NOT_OUTPUT}
    blob = json.dumps([inputs_listing(inputs, config), settings] + ([previous] if previous else []),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Run:
    store: SteeringStore
    version: str
    key: str
    resumed: bool = False

    @classmethod
    def start(cls, store: SteeringStore, key: str) -> "Run":
        """Resume the unpublished version recorded for ``key``, or begin a new version."""
        record = storage.join(store.uri, "runs", f"{key}.json")
        try:
            previous = json.loads(storage.read_text(record, store.storage))["version"]
        except FileNotFoundError:
            previous = None
        if previous is not None and previous not in store.versions():
            log.info("refresh: resuming version %s (run %s)", previous, key)
            return cls(store, previous, key, resumed=True)
        version = store.next_version_id()
        storage.write_text(record, json.dumps({"version": version, "key": key}) + "\n", store.storage)
        return cls(store, version, key)

    @property
    def record_uri(self) -> str:
        return storage.join(self.store.uri, "runs", f"{self.key}.json")

    def check_model(self, fingerprint: str) -> bool:
        """Record the model's fingerprint; False (and the run record dropped) when a resumed run had other weights."""
        record = self.read_json(self.record_uri) or {"version": self.version, "key": self.key}
        if record.get("model_fingerprint") not in (None, fingerprint):
            log.warning("refresh: the interrupted version %s was computed with other weights (%s, now %s); "
                        "starting a new version", self.version, record["model_fingerprint"], fingerprint)
            self.cleanup()
            return False
        self.write_json(self.record_uri, {**record, "model_fingerprint": fingerprint})
        return True

    @property
    def staging(self) -> str:
        return storage.join(self.store.version_uri(self.version), "_staging")

    def shard_uri(self, bucket: int) -> str:
        return storage.join(self.staging, "shards", f"{bucket:05d}.parquet")

    def shard_quarantine_uri(self, bucket: int) -> str:
        return storage.join(self.staging, "shards", f"{bucket:05d}.quarantine.parquet")

    def candidates_uri(self, bucket: int) -> str:
        return storage.join(self.staging, "candidates", f"{bucket:05d}.parquet")

    @property
    def unattributed_uri(self) -> str:
        return storage.join(self.staging, "shards", "unattributed.quarantine.parquet")

    @property
    def shards_done_uri(self) -> str:
        return storage.join(self.staging, "shards.json")

    @property
    def globals_uri(self) -> str:
        return storage.join(self.staging, "globals.pkl")

    def marker_uri(self, bucket: int) -> str:
        return storage.join(self.staging, "done", f"{bucket:05d}.json")

    def read_json(self, uri: str):
        try:
            return json.loads(storage.read_text(uri, self.store.storage))
        except FileNotFoundError:
            return None

    def write_json(self, uri: str, value) -> None:
        storage.write_text(uri, json.dumps(value, sort_keys=True, default=str) + "\n", self.store.storage)

    def cleanup(self) -> None:
        """Delete the staging folder (shards hold raw input text) and the run record."""
        fs, path = storage.filesystem(self.staging, self.store.storage)
        try:
            fs.delete_dir(path)
        except (FileNotFoundError, OSError) as exc:
            log.warning("refresh: could not delete staging %s: %s", self.staging, exc)
        record_fs, record = storage.filesystem(storage.join(self.store.uri, "runs", f"{self.key}.json"),
                                               self.store.storage)
        try:
            record_fs.delete_file(record)
        except (FileNotFoundError, OSError):
            pass
