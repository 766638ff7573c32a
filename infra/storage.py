"""The one storage layer: local directories and s3:// URIs, plus the versioned steering store.

Everything goes through pyarrow filesystems so the same code runs on a laptop, against a local
S3-compatible server, and on AWS; transient errors are retried in one place (``with_retries``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import posixpath
import random
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from steerstore.infra.config import check, option
from steerstore.schemas.store import BUCKETED_TABLES, bucket_file, conform

T = TypeVar("T")

log = logging.getLogger("steerstore.storage")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass
class StorageConfig:
    endpoint_url: str | None = option(
        None, help="S3-compatible endpoint, e.g. http://127.0.0.1:9000; default $AWS_ENDPOINT_URL_S3 / "
                   "$AWS_ENDPOINT_URL, else AWS")
    region: str | None = option(None, help="S3 region; default $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1")
    access_key_id: str | None = option(
        None, help="S3 access key id; default: the standard AWS credential chain ($AWS_ACCESS_KEY_ID, "
                   "~/.aws/credentials, instance or pod role)")
    # repr=False: configs get logged; secrets must not end up in logs.
    secret_access_key: str | None = option(None, help="S3 secret key (set together with access_key_id)",
                                           repr=False)
    session_token: str | None = option(None, help="S3 session token for temporary credentials", repr=False)
    retries: int = option(5, help="attempts for transient storage errors (connection resets, timeouts, "
                                  "throttling, 5xx)")
    retry_backoff_s: float = option(0.5, help="first backoff; doubles each retry")

    def __post_init__(self) -> None:
        check(self.retries >= 1, f"storage.retries must be >= 1 (it counts attempts), got {self.retries}")
        check(self.retry_backoff_s >= 0, f"storage.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        if self.endpoint_url:
            check(self.endpoint_url.startswith(("http://", "https://")),
                  f"storage.endpoint_url must start with http:// or https://, got {self.endpoint_url!r}")
        check((self.access_key_id is None) == (self.secret_access_key is None),
              "storage.access_key_id and storage.secret_access_key must be set together")
        check(self.session_token is None or self.access_key_id is not None,
              "storage.session_token needs storage.access_key_id and storage.secret_access_key")


# ----------------------------------------------------------------------------------------------
# URIs and filesystems


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join with "/" whatever the platform; a part's leading slash never resets to the root."""
    match = _SCHEME.match(uri)
    prefix = match.group(0) if match else ""
    rest = uri[len(prefix):]
    pieces = [rest] + [p.strip("/") for p in parts if p.strip("/")]
    joined = re.sub(r"/{2,}", "/", "/".join(p for p in pieces if p))
    if len(joined) > 1:
        joined = joined.rstrip("/")
    return prefix + joined


def _endpoint(endpoint_url: str) -> tuple[str, str]:
    """(scheme, host:port) for pyarrow, which takes them separately."""
    parts = urllib.parse.urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"S3 endpoint must look like http(s)://host[:port], got {endpoint_url!r}")
    return parts.scheme, parts.netloc


def _s3_options(cfg: StorageConfig) -> dict[str, str]:
    env = os.environ
    endpoint = cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    # Pinned here rather than left to the SDK, whose region lookup may probe instance metadata.
    options = {"region": cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        options["scheme"], options["endpoint_override"] = _endpoint(endpoint)
    # Keys from the environment are deliberately not copied in: left to the SDK's chain, rotated
    # or role-based credentials keep refreshing, including on Ray workers after unpickling.
    if cfg.access_key_id:
        options["access_key"] = cfg.access_key_id
        options["secret_key"] = cfg.secret_access_key or ""
        if cfg.session_token:
            options["session_token"] = cfg.session_token
    return options


_s3_cache: dict[tuple[tuple[str, str], ...], pafs.S3FileSystem] = {}
_s3_cache_lock = threading.Lock()


def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    options = _s3_options(cfg)
    key = tuple(sorted(options.items()))
    with _s3_cache_lock:
        fs = _s3_cache.get(key)
        if fs is None:
            # Each instance owns an S3 client with its own connection pool; reuse it.
            # allow_delayed_open: otherwise pyarrow turns every write, even a 20-byte LATEST, into a
            # three-request multipart upload; delayed, objects under one part size are a single PUT.
            fs = _s3_cache[key] = pafs.S3FileSystem(allow_delayed_open=True, **options)
        return fs


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// URI or s3://bucket/key."""
    if is_s3(uri):
        path = join(uri)[len("s3://"):].strip("/")
        if not path:
            raise ValueError(f"S3 URI has no bucket: {uri!r}")
        return _s3_filesystem(cfg or StorageConfig()), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif _SCHEME.match(uri):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


# ----------------------------------------------------------------------------------------------
# Retries

_PERMANENT = re.compile(
    r"access.?denied|forbidden|no.?such.?(bucket|key|upload)|not.?found|does not exist|"
    r"invalid.?bucket|invalid.?access.?key|signature.?does.?not.?match|invalid.?signature|"
    r"expired.?token|unrecognized.?client|invalid.?client.?token", re.IGNORECASE)
_TRANSIENT = re.compile(
    r"connection (reset|refused|aborted|closed)|broken pipe|timed out|time.?out|slow.?down|throttl|"
    r"too many requests|request.?limit.?exceeded|internal.?(error|failure)|service.?unavailable|"
    r"bad gateway|network.?connection|curl.?code|could(n'?t| not) connect|temporarily unavailable|"
    r"(http|status|response)\D{0,20}\b(500|502|503|504)\b", re.IGNORECASE)
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}


def _botocore_transient(exc: BaseException) -> bool | None:
    """True/False for botocore errors, None for anything else (botocore is optional here)."""
    try:
        from botocore import exceptions as bex  # noqa: PLC0415
    except ImportError:
        return None
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return error.get("Code") in _TRANSIENT_CODES or status in (500, 502, 503, 504)
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
                        bex.ConnectTimeoutError, bex.IncompleteReadError, bex.ResponseStreamingError)):
        return True
    if isinstance(exc, bex.BotoCoreError):
        return False
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call may succeed (network trouble, throttling, 5xx)."""
    for _ in range(5):  # the error itself and a few causes it was raised from
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                            FileExistsError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        verdict = _botocore_transient(exc)
        if verdict is not None:
            return verdict
        if isinstance(exc, OSError):
            # pyarrow raises plain OSError with the AWS error name in the message.
            message = str(exc)
            if _PERMANENT.search(message):
                return False
            if _TRANSIENT.search(message):
                return True
        if exc.__cause__ is None:
            return False
        exc = exc.__cause__
    return False


def with_retries(fn: Callable[[], T], cfg: StorageConfig | None, what: str) -> T:
    """Call fn, retrying transient storage errors with exponential backoff; others raise at once."""
    cfg = cfg or StorageConfig()
    delay = cfg.retry_backoff_s
    for attempt in range(1, cfg.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= cfg.retries or not is_transient(exc):
                raise
            # Jitter keeps many Ray workers that were throttled together from retrying in lockstep.
            pause = delay * (1 + random.random() * 0.25)
            log.warning("%s failed (attempt %d of %d), retrying in %.2fs: %s", what, attempt, cfg.retries,
                        pause, exc)
            time.sleep(pause)
            delay *= 2
    raise AssertionError("unreachable: the last attempt returns or raises")


# ----------------------------------------------------------------------------------------------
# Files


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, cfg)

    def read() -> bytes:
        # compression=None: pyarrow would otherwise decompress by file extension.
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()

    return with_retries(read, cfg, f"read {uri}")


def read_text(uri: str, cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, cfg).decode("utf-8")


def _write_local_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Hidden name without the target's suffix, so listings by suffix never pick up a partial file;
    # os.open with 0o666 lets the umask decide permissions as for any other file.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # Durable before it becomes visible: LATEST must never point at a manifest lost in a crash.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem):
        with_retries(lambda: _write_local_atomically(path, data), cfg, f"write {uri}")
        return

    def put() -> None:
        # An S3 object appears whole or not at all, so no temp-and-rename is needed.
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)

    with_retries(put, cfg, f"write {uri}")


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """``table`` as a Parquet file (with column statistics, which point lookups rely on)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    # dictionaries only for text: a float vector column dictionary-encodes badly (files ~1.5x larger, slower reads)
    text = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    pq.write_table(table, sink, row_group_size=row_group_size, write_statistics=True, use_dictionary=text)
    return sink.getvalue().to_pybytes()


def write_parquet(uri: str, table: pa.Table, cfg: StorageConfig | None = None,
                  row_group_size: int | None = None) -> None:
    write_bytes(uri, parquet_bytes(table, row_group_size), cfg)


def open_parquet(uri: str, cfg: StorageConfig | None = None):
    """A ``pyarrow.parquet.ParquetFile`` (footer read) for random access to its row groups."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, cfg)
    # pre_buffer: one coalesced ranged GET per row group on S3 instead of one per column chunk
    return with_retries(lambda: pq.ParquetFile(fs.open_input_file(path), pre_buffer=True), cfg, f"open {uri}")


def write_text(uri: str, text: str, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), cfg)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    return with_retries(lambda: fs.get_file_info(path).type != pafs.FileType.NotFound, cfg, f"stat {uri}")


def _children(fs: pafs.FileSystem, path: str, recursive: bool) -> list[pafs.FileInfo]:
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))


def list_dir(uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """Names of the direct children of uri, sorted; [] when it does not exist."""
    fs, path = filesystem(uri, cfg)
    infos = with_retries(lambda: _children(fs, path, recursive=False), cfg, f"list {uri}")
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


def _to_uri(uri: str, path: str) -> str:
    return "s3://" + path if is_s3(uri) else path


def list_files(uri: str, cfg: StorageConfig | None = None, suffix: str | None = None) -> list[str]:
    """Full URIs of all files below uri (recursive), sorted; local ones as absolute paths."""
    fs, path = filesystem(uri, cfg)
    infos = with_retries(lambda: _children(fs, path, recursive=True), cfg, f"list {uri}")
    return sorted(_to_uri(uri, info.path) for info in infos
                  if info.type == pafs.FileType.File and (suffix is None or info.path.endswith(suffix)))


def make_dirs(uri: str, cfg: StorageConfig | None = None) -> None:
    """Create a local directory and its parents; nothing to do on S3, where prefixes are implicit."""
    if is_s3(uri):
        return
    _, path = filesystem(uri, cfg)
    os.makedirs(path, exist_ok=True)


# ----------------------------------------------------------------------------------------------
# The versioned steering store


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_b64(s: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s)))


class StoreNotFound(FileNotFoundError):
    """The steering store has no (usable) published version."""

    def __init__(self, uri: str, reason: str | None = None):
        self.uri = uri
        self.reason = reason
        what = reason or "it has no published version (no LATEST file)"
        super().__init__(f"steering store {uri}: {what}. Create a version by running `steerstore refresh` "
                         f"with this store URI.")

    def __reduce__(self):  # keep the (uri, reason) arguments when Ray pickles the error
        return (type(self), (self.uri, self.reason))


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
            raise StoreNotFound(self.uri)
        return latest

    def read_manifest(self, version: str | None = None) -> dict[str, Any]:
        version = self.resolve(version)
        uri = self._manifest_uri(version)
        try:
            text = read_text(uri, self.storage)
        except FileNotFoundError:
            raise StoreNotFound(self.uri, f"version {version!r} is not published ({uri} does not exist)") from None
        return json.loads(text)

    def publish(self, version: str, manifest: dict[str, Any]) -> None:
        """Make version visible: write its manifest, then move LATEST forward to it."""
        manifest_uri = self._manifest_uri(version)
        if exists(manifest_uri, self.storage):
            raise ValueError(f"version {version} of steering store {self.uri} is already published and "
                             f"versions are immutable; write a new version instead")
        write_text(manifest_uri, json.dumps(manifest, indent=2, sort_keys=True) + "\n", self.storage)
        # Read the raw LATEST (not latest()): a LATEST that points at a missing manifest must not
        # block the publish that repairs it.
        current = self._read_latest()
        if current is not None and version <= current:
            # A job that started earlier but finished later must not roll readers back.
            log.info("published %s in %s but kept LATEST at the newer %s", version, self.uri, current)
            return
        write_text(self._latest_uri, version, self.storage)
        log.info("published %s in %s (LATEST updated)", version, self.uri)

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
