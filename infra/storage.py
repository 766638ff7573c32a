"""The one storage layer: local directories and s3:// URIs, plus the versioned steering store.

Everything goes through pyarrow filesystems so the same code runs on a laptop, against a local
S3-compatible server, and on AWS; transient errors are retried in one place (``with_retries``).
"""

from __future__ import annotations

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
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from steerstore.infra.config import check, option

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
    retries: int = option(40, help="attempts at most for transient storage errors (connection resets, timeouts, "
                                   "throttling, 5xx), within retry_budget_s")
    retry_backoff_s: float = option(0.5, help="first backoff; doubles each retry up to retry_max_backoff_s, "
                                              "with random jitter")
    retry_max_backoff_s: float = option(30.0, help="longest pause between two attempts")
    conditional_writes: bool = option(
        True, help="use conditional PUTs (If-None-Match / If-Match) for the store's lease and LATEST; set false "
                   "for S3-compatible stores without them (a weaker check-write-read-back is used)")
    retry_budget_s: float = option(
        300.0, help="give up retrying a call after this many seconds (an object store restarting takes minutes; "
                    "a serving process may want seconds)")
    connect_budget_s: float = option(
        60.0, help="an endpoint this process has never reached is given up on after this many seconds of "
                   "connection errors (a wrong endpoint fails fast, naming the setting); once reached, "
                   "retry_budget_s applies")

    def __post_init__(self) -> None:
        check(self.retries >= 1, f"storage.retries must be >= 1 (it counts attempts), got {self.retries}")
        check(self.retry_backoff_s >= 0, f"storage.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        check(self.retry_max_backoff_s >= self.retry_backoff_s and self.retry_budget_s >= 0,
              "storage.retry_max_backoff_s must be >= retry_backoff_s and storage.retry_budget_s >= 0")
        check(self.connect_budget_s >= 0, "storage.connect_budget_s must be >= 0")
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


class StorageUnreachable(ConnectionError):
    """The object store never answered this process: most often a wrong endpoint, or a server that is not running."""


_REACHED: set[str] = set()  # endpoints that answered at least once in this process
_CONNECT = re.compile(r"connection refused|could(n'?t| not) connect|curl.?code: ?(6|7)\b|network.?connection|"
                      r"name or service not known|failed to resolve|no route to host", re.IGNORECASE)


def _endpoint_name(cfg: StorageConfig) -> str:
    """The object store's endpoint as a person would name it (the setting, the environment, or AWS)."""
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") \
        or f"AWS S3 ({cfg.region or os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION') or 'us-east-1'})"


def _is_connect_error(exc: BaseException) -> bool:
    for _ in range(5):
        if isinstance(exc, ConnectionRefusedError) or type(exc).__name__ == "EndpointConnectionError" \
                or _CONNECT.search(str(exc)):
            return True
        if exc.__cause__ is None:
            return False
        exc = exc.__cause__
    return False


def with_retries(fn: Callable[[], T], cfg: StorageConfig | None, what: str) -> T:
    """Call fn, retrying transient storage errors with jittered exponential backoff; others raise at once.

    Gives up after ``cfg.retries`` attempts or once ``cfg.retry_budget_s`` seconds have passed; an
    object-store endpoint that never answered this process, after ``cfg.connect_budget_s`` seconds of
    connection errors (``StorageUnreachable``, naming the endpoint and the setting).
    """
    cfg = cfg or StorageConfig()
    delay = cfg.retry_backoff_s
    start = time.monotonic()
    deadline = start + cfg.retry_budget_s
    remote = "s3://" in what
    for attempt in range(1, cfg.retries + 1):
        try:
            result = fn()
            if remote:
                _REACHED.add(_endpoint_name(cfg))
            return result
        except Exception as exc:
            left = deadline - time.monotonic()
            if remote and _endpoint_name(cfg) not in _REACHED and _is_connect_error(exc) \
                    and time.monotonic() - start >= cfg.connect_budget_s:
                raise StorageUnreachable(
                    f"could not reach the object store at {_endpoint_name(cfg)} ({what}): {str(exc)[:300]}. Check "
                    "--storage.endpoint_url (or $AWS_ENDPOINT_URL), the network, and that the server is running"
                ) from exc
            if attempt >= cfg.retries or left <= 0 or not is_transient(exc):
                raise
            # Jitter keeps many Ray workers that were throttled together from retrying in lockstep.
            pause = min(delay * (0.5 + random.random() * 0.75), left)
            if remote and _endpoint_name(cfg) not in _REACHED:  # never answered: do not sleep past the connect budget
                pause = min(pause, max(0.05, start + cfg.connect_budget_s - time.monotonic()))
            log.warning("%s failed (attempt %d of %d), retrying in %.2fs: %s", what, attempt, cfg.retries,
                        pause, exc)
            time.sleep(pause)
            delay = min(delay * 2, cfg.retry_max_backoff_s)
    raise AssertionError("unreachable: the last attempt returns or raises")


# ----------------------------------------------------------------------------------------------
# Files


def missing_bucket(uri: str, cfg: StorageConfig | None = None) -> str | None:
    """For an s3:// URI whose bucket does not exist, what to tell the person; else None."""
    if not uri.startswith("s3://"):
        return None
    bucket = uri[len("s3://"):].split("/", 1)[0]
    fs, _ = filesystem(f"s3://{bucket}", cfg)
    info = with_retries(lambda: fs.get_file_info(bucket), cfg, f"stat s3://{bucket}")
    if info.type != pafs.FileType.NotFound:
        return None
    return (f"the bucket {bucket!r} does not exist at {_endpoint_name(cfg or StorageConfig())} (check the URI, "
            "--storage.endpoint_url and --storage.region)")


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
