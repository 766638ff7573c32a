"""Reading the refresh inputs: JSONL (optionally gzip) or Parquet files, local or on object storage."""

from __future__ import annotations

import logging

from steerstore.infra import storage
from steerstore.infra.records import input_format
from steerstore.infra.storage import StorageConfig

log = logging.getLogger("steerstore")


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
