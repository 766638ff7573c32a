"""The steering store: immutable versions under one prefix, published by writing the manifest, then ``LATEST``."""

from __future__ import annotations

import json
import logging
import posixpath
import re
import secrets
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from steerstore.infra.conditional import PreconditionFailed, read_tagged, write_if
from steerstore.infra.storage import (
    StorageConfig,
    exists,
    filesystem,
    join,
    list_dir,
    list_files,
    missing_bucket,
    read_text,
    with_retries,
    write_parquet,
    write_text,
)
from steerstore.schemas.store import BUCKETED_TABLES, bucket_file, conform, schema_from_b64

log = logging.getLogger("steerstore")
_SEQUENCE = re.compile(r"^v(\d+)-")


def _order(version: str) -> tuple:
    """Sort key of version ids: sequenced ids by their number (after every timestamp-only id), others by text."""
    m = _SEQUENCE.match(version)
    return (1, int(m.group(1)), version) if m else (0, 0, version)


class StoreNotFound(FileNotFoundError):
    """The steering store has no (usable) published version."""

    def __init__(self, uri: str, reason: str | None = None, refresh_hint: bool = True):
        self.uri = uri
        self.reason = reason
        self.refresh_hint = refresh_hint
        what = reason or "it has no published version (no LATEST file)"
        super().__init__(f"steering store {uri}: {what}."
                         + (" Create a version by running `steerstore refresh` with this store URI."
                            if refresh_hint else ""))

    def __reduce__(self):  # keep the arguments when Ray pickles the error
        return (type(self), (self.uri, self.reason, self.refresh_hint))


class SteeringStore:
    """A store is <uri>/versions/<version>/<table>/*.parquet + <uri>/versions/<version>/manifest.json, plus <uri>/LATEST.

    A version is visible only once its manifest.json exists; LATEST is written last (one PUT).
    """

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri = join(uri)
        self.storage = storage or StorageConfig()

    @staticmethod
    def new_version_id(now: datetime | None = None) -> str:
        """A sortable UTC timestamp plus random hex, e.g. "20261123T220501Z-3f9a1c" (naive times are UTC)."""
        now = now or datetime.now(timezone.utc)
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        # The random part keeps two jobs started in the same second from sharing a version.
        return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)

    def next_version_id(self, now: datetime | None = None) -> str:
        """``v<sequence>-<UTC time>-<random>``: the sequence is one above every version in the store.

        Versions sort by their sequence, so a driver whose clock is off can neither roll ``LATEST``
        back nor pin it. Taken under the store's lease (``infra/lease.py``), sequences are unique;
        the random part keeps ids distinct even without it. Older timestamp-only ids sort first.
        """
        names = list_dir(join(self.uri, "versions"), self.storage) + [self._read_latest() or ""]
        sequence = 1 + max([int(m.group(1)) for m in map(_SEQUENCE.match, names) if m], default=0)
        return f"v{sequence:06d}-{self.new_version_id(now)}"

    @property
    def _latest_uri(self) -> str:
        return join(self.uri, "LATEST")

    def version_uri(self, version: str) -> str:
        # A version id is one path segment; anything else (say, a hand-edited LATEST) could escape the store.
        if not version or "/" in version or version in (".", "..") or version != version.strip():
            raise ValueError(f"invalid store version id {version!r}")
        return join(self.uri, "versions", version)

    def _manifest_uri(self, version: str) -> str:
        return join(self.version_uri(version), "manifest.json")

    def table_uri(self, version: str, table: str) -> str:
        if not table or "/" in table or table in (".", ".."):
            raise ValueError(f"invalid table name {table!r}")
        return join(self.version_uri(version), table)

    def versions(self) -> list[str]:
        """Published versions (manifest present), oldest first."""
        names = list_dir(join(self.uri, "versions"), self.storage)
        return sorted(n for n in names if exists(self._manifest_uri(n), self.storage))

    def _read_latest(self) -> str | None:
        try:
            return read_text(self._latest_uri, self.storage).strip() or None
        except FileNotFoundError:
            return None

    def latest(self) -> str | None:
        """The version LATEST names, or None before the first publish."""
        version = self._read_latest()
        if version is not None and not exists(self._manifest_uri(version), self.storage):
            raise StoreNotFound(self.uri, f"LATEST names version {version!r}, but "
                                          f"{self._manifest_uri(version)} does not exist (deleted, or the "
                                          f"store was copied partially)")
        return version

    def resolve(self, version: str | None = None) -> str:
        """The given version, else the latest; StoreNotFound when there is none."""
        if version:
            self.version_uri(version)
            return version
        latest = self.latest()
        if latest is None:
            bucket = missing_bucket(self.uri, self.storage)
            raise StoreNotFound(self.uri, bucket, refresh_hint=bucket is None)
        return latest

    def read_manifest(self, version: str | None = None) -> dict[str, Any]:
        version = self.resolve(version)
        uri = self._manifest_uri(version)
        try:
            text = read_text(uri, self.storage)
        except FileNotFoundError:
            raise StoreNotFound(self.uri, f"version {version!r} is not published ({uri} does not exist)") from None
        return json.loads(text)

    def publish(self, version: str, manifest: dict[str, Any]) -> bool:
        """Make version visible: write its manifest, then move LATEST forward to it (True) unless it is older (False)."""
        manifest_uri = self._manifest_uri(version)
        if exists(manifest_uri, self.storage):
            raise ValueError(f"version {version} of steering store {self.uri} is already published and "
                             f"versions are immutable; write a new version instead")
        write_text(manifest_uri, json.dumps(manifest, indent=2, sort_keys=True) + "\n", self.storage)
        # Read the raw LATEST (not latest()): a LATEST that points at a missing manifest must not
        # block the publish that repairs it. LATEST moves by compare-and-swap, so of two writers
        # racing, the newer version wins whatever the order of their writes.
        while True:
            seen = read_tagged(self._latest_uri, self.storage)
            current = seen[0].decode("utf-8", "replace").strip() or None if seen else None
            if current is not None and not exists(self._manifest_uri(current), self.storage):
                log.warning("LATEST of %s names %s, which has no manifest: moving it to %s", self.uri, current, version)
                current = None
            if current is not None and _order(version) <= _order(current):
                # A job that started earlier but finished later must not roll readers back.
                log.info("published %s in %s but kept LATEST at the newer %s", version, self.uri, current)
                return False
            try:
                write_if(self._latest_uri, version.encode(), seen[1] if seen else None, self.storage)
                break
            except PreconditionFailed:
                continue
        log.info("published %s in %s (LATEST updated)", version, self.uri)
        return True

    def write_bucket(self, version: str, table: str, bucket: int, rows: pa.Table, schema: pa.Schema,
                     row_group_bytes: int) -> str:
        """Write one hash bucket of a per-user table, sorted by the table's keys; returns the file name.

        Row groups hold about ``row_group_bytes`` (at least one row), so a point lookup reads
        little more than the user's own rows.
        """
        rows = conform(rows, schema).sort_by([(k, "ascending") for k in BUCKETED_TABLES[table]])
        per_row = max(1, rows.nbytes // max(1, rows.num_rows))
        name = bucket_file(bucket)
        write_parquet(join(self.table_uri(version, table), name), rows, self.storage,
                      row_group_size=max(1, row_group_bytes // per_row))
        return name

    def write_empty(self, version: str, table: str, schema: pa.Schema) -> str:
        """Write an empty file of ``table`` (every version has every table); returns its name."""
        write_parquet(join(self.table_uri(version, table), "empty.parquet"), schema.empty_table(), self.storage)
        return "empty.parquet"

    def table_files(self, version: str, table: str) -> list[str]:
        """URIs of the table's parquet files, skipping hidden and temporary ones ("." or "_" names)."""
        files = list_files(self.table_uri(version, table), self.storage, suffix=".parquet")
        return [f for f in files if not posixpath.basename(f).startswith((".", "_"))]

    def read_table(self, table: str, version: str | None = None, columns: list[str] | None = None,
                   filter: ds.Expression | None = None) -> pa.Table:  # noqa: A002  (pyarrow's own name)
        """Read one table of a version (default: latest) with optional column projection and row filter."""
        version = self.resolve(version)
        files = self.table_files(version, table)
        if not files:
            return self._empty_table(version, table, columns)
        fs, _ = filesystem(files[0], self.storage)
        paths = [filesystem(f, self.storage)[1] for f in files]

        def read() -> pa.Table:
            dataset = ds.dataset(paths, format="parquet", filesystem=fs)
            return dataset.to_table(columns=columns, filter=filter)

        return with_retries(read, self.storage, f"read table {table} of {self.version_uri(version)}")

    def _empty_table(self, version: str, table: str, columns: list[str] | None) -> pa.Table:
        where = self.table_uri(version, table)
        try:
            manifest = self.read_manifest(version)
        except StoreNotFound as exc:
            raise FileNotFoundError(f"table {table!r} has no parquet files under {where}, and {exc}") from None
        entry = manifest.get("tables", {}).get(table) or {}
        if "schema" not in entry:
            raise FileNotFoundError(
                f"table {table!r} has no parquet files under {where}, and the manifest of version {version} "
                f"records no schema for it (tables in the manifest: {sorted(manifest.get('tables', {}))})")
        schema = schema_from_b64(entry["schema"])
        empty = schema.empty_table()
        return empty.select(columns) if columns is not None else empty
