"""Reading the refresh inputs: JSONL (optionally gzip) or Parquet files, local or on object storage."""

from __future__ import annotations

import logging

from steerstore.infra import storage
from steerstore.infra.storage import StorageConfig

log = logging.getLogger("steerstore")


PARQUET_EXT = (".parquet", ".pq")


JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")


def input_format(uri: str, fmt: str, cfg: StorageConfig | None = None) -> str:
    if fmt != "auto":
        return fmt
    name = uri.rstrip("/").lower()
    if name.endswith(PARQUET_EXT):
        return "parquet"
    if name.endswith(JSONL_EXT):
        return "jsonl"
    files = storage.list_files(uri, cfg)
    kinds = {input_format(f, "auto") for f in files if f.lower().endswith(PARQUET_EXT + JSONL_EXT)}
    if len(kinds) != 1:
        raise ValueError(f"cannot tell the format of {uri}: set inputs.format to jsonl or parquet")
    return kinds.pop()


def read_input(uri: str, fmt: str, cfg: StorageConfig):
    """A Ray dataset of raw rows: JSONL lines (``text``) or Parquet rows, with ``path``."""
    import ray.data

    fs, path = storage.filesystem(uri, cfg)
    fmt = input_format(uri, fmt, cfg)
    if fmt == "parquet":
        return ray.data.read_parquet(path, filesystem=fs, include_paths=True)
    gz = path.endswith(".gz")
    return ray.data.read_text(path, filesystem=fs, include_paths=True,
                              arrow_open_stream_args={"compression": "gzip"} if gz else None)
