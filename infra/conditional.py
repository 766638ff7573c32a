"""Conditional writes (compare-and-swap) on the storage layer: the store's lease and ``LATEST``.

S3 (and S3-compatible stores that support it) checks ``If-None-Match: *`` / ``If-Match: <etag>``
on PutObject; a local file system does the same under an exclusive ``flock`` of a sidecar lock
file. ``storage.conditional_writes=false`` is the fallback for stores without conditional PUTs:
plain writes, then a read-back to confirm (best effort; two writers racing within one round trip
can both believe they won; see docs/operations.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import pyarrow.fs as pafs

from steerstore.infra.storage import (
    StorageConfig,
    _s3_cache_lock,
    _s3_options,
    _write_local_atomically,
    filesystem,
    is_s3,
    join,
    read_bytes,
    with_retries,
    write_bytes,
)


class PreconditionFailed(Exception):
    """A conditional write found the object absent, present or changed, against its condition."""


_clients: dict = {}


def _s3_client(cfg: StorageConfig):
    """One boto3 client per storage config (boto3's default session is not thread-safe; a client is)."""
    key = tuple(sorted(_s3_options(cfg).items()))
    with _s3_cache_lock:
        if key not in _clients:
            _clients[key] = _new_s3_client(cfg)
        return _clients[key]


def _new_s3_client(cfg: StorageConfig):
    import boto3  # noqa: PLC0415

    options = _s3_options(cfg)
    kwargs = {"region_name": options["region"]}
    if "endpoint_override" in options:
        kwargs["endpoint_url"] = f"{options['scheme']}://{options['endpoint_override']}"
    if cfg.access_key_id:
        kwargs.update(aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key,
                      aws_session_token=cfg.session_token)
    return boto3.session.Session().client("s3", **kwargs)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = join(uri)[len("s3://"):].partition("/")
    return bucket, key


@contextlib.contextmanager
def _local_lock(path: str):
    import fcntl  # noqa: PLC0415

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tagged(uri: str, cfg: StorageConfig | None = None) -> tuple[bytes, str] | None:
    """(content, tag) of an object, or None when it does not exist. The tag changes whenever the content does."""
    cfg = cfg or StorageConfig()
    if is_s3(uri) and cfg.conditional_writes:
        client, (bucket, key) = _s3_client(cfg), _bucket_key(uri)

        def get():
            from botocore.exceptions import ClientError  # noqa: PLC0415

            try:
                obj = client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return obj["Body"].read(), obj["ETag"]

        return with_retries(get, cfg, f"read {uri}")
    try:
        data = read_bytes(uri, cfg)
    except FileNotFoundError:
        return None
    return data, _tag(data)


def write_if(uri: str, data: bytes, tag: str | None, cfg: StorageConfig | None = None) -> str:
    """Write ``data`` only if the object is absent (``tag`` None) or still has ``tag``; returns the new tag.

    Raises PreconditionFailed when the condition does not hold.
    """
    cfg = cfg or StorageConfig()
    if is_s3(uri) and cfg.conditional_writes:
        client, (bucket, key) = _s3_client(cfg), _bucket_key(uri)

        def put() -> str:
            from botocore.exceptions import ClientError  # noqa: PLC0415

            condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
            try:
                return client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
                    # a retried PUT whose first attempt landed (its response lost) fails its own condition:
                    # the object holding exactly these bytes means the write succeeded
                    now = read_tagged(uri, cfg)
                    if now is not None and now[0] == data:
                        return now[1]
                    raise PreconditionFailed(f"{uri}: {code}") from None
                raise

        return with_retries(put, cfg, f"conditional write {uri}")
    fs, path = filesystem(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem):
        with _local_lock(path):
            current = read_tagged(uri, cfg)
            if (current is None) != (tag is None) or (current is not None and current[1] != tag):
                raise PreconditionFailed(f"{uri}: changed since it was read")
            _write_local_atomically(path, data)
        return _tag(data)
    current = read_tagged(uri, cfg)  # the fallback: check, write, read back
    if (current is None) != (tag is None) or (current is not None and current[1] != tag):
        raise PreconditionFailed(f"{uri}: changed since it was read")
    write_bytes(uri, data, cfg)
    back = read_tagged(uri, cfg)
    if back is None or back[0] != data:
        raise PreconditionFailed(f"{uri}: overwritten by another writer")
    return back[1]
