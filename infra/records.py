"""Records in files: the one reader of JSONL (optionally gzip) and Parquet row files, local or on object storage.

The refresh reads its inputs with Ray (``jobs/refresh/inputs.py``) using the same format rules;
the evaluation, the importers and ``generate --requests`` read smaller files here. JSON Lines are
split on ``\\n`` only (``str.splitlines`` would also split inside a JSON string holding U+2028).
"""

from __future__ import annotations

import gzip
import io
import json
from typing import Iterator

from steerstore.infra import storage
from steerstore.infra.storage import StorageConfig

PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")


def input_format(uri: str, fmt: str = "auto", cfg: StorageConfig | None = None) -> str:
    """``jsonl`` or ``parquet``: ``fmt`` unless auto, else from the extension (a folder: of its files)."""
    if fmt != "auto":
        return fmt
    name = uri.rstrip("/").lower()
    if name.endswith(PARQUET_EXT):
        return "parquet"
    if name.endswith(JSONL_EXT):
        return "jsonl"
    files = storage.list_files(uri, cfg)
    kinds = {input_format(f) for f in files if f.lower().endswith(PARQUET_EXT + JSONL_EXT)}
    if len(kinds) != 1:
        raise ValueError(f"cannot tell the format of {uri}: set inputs.format to jsonl or parquet")
    return kinds.pop()


def jsonl_lines(text: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, the JSON object or None, the problem or None) per non-blank line of ``text``."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, None, f"invalid JSON ({exc.msg})"
            continue
        if isinstance(row, dict):
            yield n, row, None
        else:
            yield n, None, f"a JSON {type(row).__name__}, expected an object"


def read_records(uri: str, cfg: StorageConfig | None = None) -> list[dict]:
    """Every row of a JSONL(.gz) or Parquet file, or of every such file in a folder (sorted by name).

    A line that is not a JSON object raises ValueError naming the file and line.
    """
    formats = PARQUET_EXT + JSONL_EXT
    if not uri.lower().endswith(formats):
        files = [f for f in storage.list_files(uri, cfg) if f.lower().endswith(formats)]
        if not files:
            raise FileNotFoundError(f"no JSONL or Parquet files in {uri}")
        return [r for f in sorted(files) for r in read_records(f, cfg)]
    data = storage.read_bytes(uri, cfg)
    if uri.lower().endswith(PARQUET_EXT):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    if uri.lower().endswith(".gz"):
        data = gzip.decompress(data)
    rows = []
    for n, row, problem in jsonl_lines(data.decode("utf-8")):
        if problem:
            raise ValueError(f"{uri} line {n}: {problem}")
        rows.append(row)
    return rows
