"""What the refresh phases share: stage timing, the redacted config for the manifest, the package version."""

from __future__ import annotations

import logging
import time

from steerstore.infra.config import to_dict
from steerstore.jobs.refresh.config import RefreshConfig

log = logging.getLogger("steerstore")


class DeadlineExceeded(TimeoutError):
    """The run passed ``resources.deadline_s``: nothing was published; the same command resumes it."""


class Timer:
    """Stage seconds, and the run's deadline (``deadline_s`` from now; 0: none)."""

    def __init__(self, deadline_s: float = 0.0) -> None:
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter()
        self.deadline = self._t + deadline_s if deadline_s else None
        self.deadline_s = deadline_s

    def left(self) -> float | None:
        """Seconds to the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def check(self, where: str) -> None:
        left = self.left()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"the refresh passed resources.deadline_s={self.deadline_s:g} during {where}; "
                                   "nothing was published. Completed shards are kept: the same command resumes")

    def lap(self, stage: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._t, 3)
        self._t = now
        log.info("stage %-14s %7.1f s  %s", stage, self.stages[stage], detail)


def redacted(config: RefreshConfig) -> dict:
    data = to_dict(config)
    for key in ("access_key_id", "secret_access_key", "session_token"):
        if data["storage"].get(key):
            data["storage"][key] = "***"
    return data


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steerstore")
    except PackageNotFoundError:
        return "unknown"
