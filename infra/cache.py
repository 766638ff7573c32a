"""The local cache (converted models, WordNet) and the file lock that guards filling it across processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def cache_root() -> Path:
    """Where converted models live: $STEERSTORE_CACHE or ~/.cache/steerstore."""
    return Path(os.environ.get("STEERSTORE_CACHE", Path.home() / ".cache" / "steerstore"))



@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if missing) for the body's duration."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
