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

import pyarrow as pa

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


# ----------------------------------------------------------------------------------------------
# Streaming input rows (the refresh): every line or Parquet row becomes one text row, or a problem
# ----------------------------------------------------------------------------------------------

ROW_TEXT_SCHEMA = pa.schema([("text", pa.string()), ("path", pa.string()), ("line", pa.int64()),
                             ("problem", pa.string())])
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2"}
MAX_LINE_BYTES = 16 << 20


def row_text_schema() -> pa.Schema:
    return ROW_TEXT_SCHEMA


def sniff(head: bytes, name: str) -> tuple[str, str | None]:
    """(format, compression) of a file from its first bytes: Parquet by its magic, else JSON Lines (maybe compressed)."""
    if head[:4] == b"PAR1" or (name.lower().endswith(PARQUET_EXT) and not head):
        return "parquet", None
    for magic, codec in _MAGIC.items():
        if head.startswith(magic):
            return "jsonl", codec
    return "jsonl", None


def _json_default(value):
    import datetime as dt
    import decimal

    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")  # UnicodeDecodeError: the row is quarantined
    raise TypeError(f"a value of type {type(value).__name__} cannot be read as JSON")


def _decode(line: bytes) -> tuple[str, str | None]:
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return line.decode("utf-8", "replace"), f"invalid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})"


def _jsonl_rows(stream, chunk_bytes: int) -> Iterator[tuple[str, int, str | None]]:
    """(text, line number, problem) of every non-blank line of a byte stream; split on ``\\n`` only."""
    pending, number, skipping = b"", 0, False
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if skipping:  # the rest of a line that was too long
                skipping = False
                continue
            number += 1
            if len(line) > MAX_LINE_BYTES:
                yield "", number, f"line longer than {MAX_LINE_BYTES} bytes"
            elif line.strip():
                yield _row(line, number)
        if len(pending) > MAX_LINE_BYTES:
            if not skipping:
                number += 1
                yield "", number, f"line longer than {MAX_LINE_BYTES} bytes"
            pending, skipping = b"", True
    if pending.strip() and not skipping:
        yield ("", number + 1, f"line longer than {MAX_LINE_BYTES} bytes") if len(pending) > MAX_LINE_BYTES \
            else _row(pending, number + 1)


def _row(line: bytes, number: int) -> tuple[str, int, str | None]:
    if number == 1 and line.startswith(b"\xef\xbb\xbf"):  # a byte-order mark
        line = line[3:]
    text, problem = _decode(line)
    return text, number, problem


class _Decompressing:
    """A streaming gzip (multi-member) or bz2 reader that hands out every byte before a truncation, then raises."""

    def __init__(self, raw, codec: str):
        import bz2
        import zlib

        self.raw, self.codec = raw, codec
        self._new = (lambda: zlib.decompressobj(31)) if codec == "gzip" else bz2.BZ2Decompressor
        self.d, self.buf, self.error = self._new(), b"", None

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and self.error is None:
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if not self.d.eof:
                    self.error = EOFError(f"truncated {self.codec} stream")
                break
            while chunk:
                self.buf += self.d.decompress(chunk)
                chunk = self.d.unused_data if self.d.eof else b""
                if chunk:  # the next member of a concatenated gzip file
                    self.d = self._new()
        if not self.buf and self.error is not None:
            raise self.error
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()


def _parquet_rows(handle, batch_rows: int) -> Iterator[tuple[str, int, str | None]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
        try:
            rows = batch.to_pylist()
        except Exception:  # noqa: BLE001 — a value Python cannot hold (a date out of range): row by row
            rows = []
            for i in range(batch.num_rows):
                try:
                    rows.extend(batch.slice(i, 1).to_pylist())
                except Exception as exc:  # noqa: BLE001
                    rows.append({"__unreadable__": f"{type(exc).__name__}: {str(exc)[:200]}"})
        for row in rows:
            number += 1
            if "__unreadable__" in row:
                yield "", number, f"row cannot be read: {row['__unreadable__']}"
                continue
            try:
                yield json.dumps(row, default=_json_default, ensure_ascii=False, allow_nan=True), number, None
            except (TypeError, ValueError, UnicodeDecodeError) as exc:
                yield json.dumps({k: (v if isinstance(v, (str, int, float, bool)) or v is None else repr(v)[:200])
                                  for k, v in row.items()}, ensure_ascii=False), number, \
                    f"row cannot be read as text: {exc}"


def row_batches(uri: str, cfg: StorageConfig | None = None, fmt: str = "auto", batch_rows: int = 8192,
                chunk_bytes: int = 8 << 20):
    """Arrow tables (``row_text_schema``) of one input file: a JSON text per JSONL line or Parquet row.

    Nothing in a file stops the read: a line that is not UTF-8 carries its ``problem`` (its text
    decoded with replacement characters, so its user can still be named); compression (gzip, zstd,
    bz2) is found from the first bytes, not the name; Parquet files are read one by one, each with
    its own schema, and every row becomes JSON text, so files whose column types differ never
    meet in one Arrow schema; a file that cannot be read past some point gives one problem row.
    Blank lines are skipped.
    """
    schema = ROW_TEXT_SCHEMA
    fs, path = storage.filesystem(uri, cfg)

    def table(rows: list) -> pa.Table:
        return pa.table({"text": [r[0] for r in rows], "path": [uri] * len(rows), "line": [r[1] for r in rows],
                         "problem": [r[2] for r in rows]}, schema=schema)

    rows: list = []
    number = 0
    try:
        with fs.open_input_stream(path, compression=None) as raw:
            head = raw.read(4)
        kind, codec = sniff(head, uri)
        kind = fmt if fmt != "auto" else kind
        if kind == "parquet":
            source = fs.open_input_file(path)
            it = _parquet_rows(source, batch_rows)
        else:
            raw = fs.open_input_stream(path, compression=None if codec in ("gzip", "bz2") else codec)
            source = _Decompressing(raw, codec) if codec in ("gzip", "bz2") else raw
            it = _jsonl_rows(source, chunk_bytes)
        with source:
            for text, number, problem in it:
                rows.append((text, number, problem))
                if len(rows) >= batch_rows:
                    yield table(rows)
                    rows = []
    except Exception as exc:  # noqa: BLE001 — a corrupt or truncated file: its rows so far, then one problem row
        if storage.is_transient(exc):
            raise  # the storage, not the file: the read task is retried
        rows.append(("", number + 1, f"file unreadable after row {number}: {type(exc).__name__}: {exc}"[:500]))
    if rows:
        yield table(rows)
