"""Reading the refresh inputs: JSONL (compressed or not) or Parquet files, local or on object storage.

Every input row arrives as one JSON text (``text``) with its file (``path``), line or row number
(``line``) and, when the bytes could not be read as text, a ``problem`` that validation turns
into a quarantine row. The files are read by ``infra.records.row_batches`` inside Ray read tasks
(a few files per task, each streamed in blocks): nothing in one file can fail the job, and Ray's
own text reader, which splits lines on every Unicode line break and stops at the first byte that
is not UTF-8, is not used.
"""

from __future__ import annotations

import functools
import logging
import posixpath

from steerstore.infra import storage
from steerstore.infra.records import row_batches, row_text_schema
from steerstore.infra.storage import StorageConfig

log = logging.getLogger("steerstore")


def input_files(uri: str, cfg: StorageConfig) -> list[tuple[str, int, int]]:
    """(URI, size, mtime in ns) of the input file, or of every file below the folder but hidden ones ("." or "_"
    names): what the refresh reads, and what its run key is made of."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri, cfg)
    info = storage.with_retries(lambda: fs.get_file_info(path), cfg, f"stat {uri}")
    if info.type == pafs.FileType.File:
        return [(uri, info.size, info.mtime_ns)]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    infos = storage.with_retries(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), cfg,
                                 f"list {uri}")
    base = path.rstrip("/")
    files = []
    for i in infos:
        rel = i.path[len(base):].lstrip("/")
        if i.type == pafs.FileType.File and not any(p.startswith((".", "_")) for p in rel.split("/")):
            files.append((storage.join(uri, rel), i.size, i.mtime_ns))
    return sorted(files)


@functools.cache
def row_files_datasource():
    """The Ray Data datasource class of input files (built on first use: ray is imported only then)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class RowFiles(Datasource):
        """Read tasks of about equal bytes, each streaming its files in blocks."""

        def __init__(self, files: list[tuple[str, int]], fmt: str, cfg: StorageConfig, batch_rows: int = 8192):
            super().__init__()
            self.files, self.fmt, self.cfg, self.batch_rows = files, fmt, cfg, batch_rows

        def estimate_inmemory_data_size(self) -> int:
            return sum(size for _, size in self.files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            groups: list[list[tuple[str, int]]] = [[] for _ in range(max(1, min(parallelism, len(self.files))))]
            loads = [0] * len(groups)
            for f in sorted(self.files, key=lambda f: -f[1]):  # largest first onto the lightest task
                i = loads.index(min(loads))
                groups[i].append(f)
                loads[i] += f[1]
            return [ReadTask(_reader(g, self.fmt, self.cfg, self.batch_rows),
                             BlockMetadata(num_rows=None, size_bytes=load, exec_stats=None,
                                           input_files=[u for u, _ in g]), schema=row_text_schema())
                    for g, load in zip(groups, loads) if g]

    return RowFiles


def _reader(group: list[tuple[str, int]], fmt: str, cfg: StorageConfig, batch_rows: int):
    def read():
        for uri, _ in group:
            yield from row_batches(uri, cfg, fmt, batch_rows)
    return read


def read_input(uri: str, fmt: str, cfg: StorageConfig):
    """A Ray dataset of the input's rows as JSON text (``text``, ``path``, ``line``, ``problem``)."""
    import ray.data

    files = [(u, size) for u, size, _ in input_files(uri, cfg)]
    if not files:
        log.warning("refresh: input %s has no files", uri)
        return ray.data.from_arrow(row_text_schema().empty_table())
    names = sorted({posixpath.splitext(u)[1] or "(none)" for u, _ in files})
    log.info("refresh: input %s: %d file(s) (%s)", uri, len(files), ", ".join(names[:8]))
    return ray.data.read_datasource(row_files_datasource()(files, fmt, cfg))
