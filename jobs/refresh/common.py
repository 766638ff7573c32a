"""What the refresh phases share: stage timing, the redacted config for the manifest, the package version."""

from __future__ import annotations

import logging
import time

from steerstore.infra.config import to_dict
from steerstore.jobs.refresh.config import RefreshConfig

log = logging.getLogger("steerstore")


class Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter()

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
