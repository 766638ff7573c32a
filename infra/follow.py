"""A reader that follows the nightly versions: ``LATEST`` is checked again at an interval or on request.

A ``StoreReader`` is bound to one version (its caches too). ``StoreFollower`` holds the current one and
swaps in a new reader when ``LATEST`` moves: a request that took ``current()`` is served wholly from
that version, the next one from the new version. A version built from other weights than the one the
follower started with (the weights the serving model was checked against) is never switched to: it is
logged, remembered in ``refused`` and the current version stays. A storage error while checking keeps
the current version too (the next check tries again).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from steerstore.infra.reader import FingerprintMismatch, StoreReader
from steerstore.infra.storage import StorageConfig

log = logging.getLogger("steerstore")


class StoreFollower:
    """``current()``: the reader of the newest published version, checked at most every ``interval_s``.

    ``fingerprint``: the weights fingerprint of the model being served (default: the first version's;
    a serving call still checks the model against it). ``reader_kwargs`` go to every ``StoreReader``.
    """

    def __init__(self, uri: str, storage: StorageConfig | None = None, interval_s: float = 60.0,
                 fingerprint: str | None = None, clock: Callable[[], float] = time.monotonic, **reader_kwargs):
        self.uri, self.storage, self.interval_s = uri, storage, float(interval_s)
        self._clock = clock
        self._reader_kwargs = reader_kwargs
        reader = StoreReader(uri, storage, **reader_kwargs)
        if fingerprint is not None:
            reader.check_model(fingerprint)
        self.fingerprint = fingerprint or (reader.manifest.get("model") or {}).get("fingerprint")
        self._reader = reader
        self._checked_at = clock()
        self._check_lock = threading.Lock()
        self.refused: dict[str, str] = {}  # version -> why it was not switched to
        self.switches: list[tuple[str, str, float]] = []  # (from, to, seconds the switch took)

    @property
    def version(self) -> str:
        return self._reader.version

    def current(self) -> StoreReader:
        """The reader to serve one request (or one batch) with; checks ``LATEST`` when the interval passed."""
        if self._clock() - self._checked_at >= self.interval_s:
            self.check()
        return self._reader

    def check(self) -> bool:
        """Look at ``LATEST`` now; True when the follower moved to a new version.

        Concurrent callers do not queue: one checks, the others keep serving the current version.
        """
        if not self._check_lock.acquire(blocking=False):
            return False
        try:
            self._checked_at = self._clock()
            started = time.perf_counter()
            current = self._reader
            try:
                latest = current.store.latest()
            except Exception as exc:  # noqa: BLE001 — serving goes on from the version it has
                log.warning("store %s: could not read LATEST (%s); still serving %s", self.uri, exc, current.version)
                return False
            if latest is None or latest == current.version or latest in self.refused:
                return False
            try:
                new = StoreReader(self.uri, self.storage, version=latest, **self._reader_kwargs)
                if self.fingerprint:
                    new.check_model(self.fingerprint, name=f"the model serving version {current.version}")
            except FingerprintMismatch as exc:
                self.refused[latest] = str(exc)
                log.warning("store %s: not switching to %s: %s", self.uri, latest, exc)
                return False
            except Exception as exc:  # noqa: BLE001 — a version that cannot be opened now is tried again later
                log.warning("store %s: could not open %s (%s); still serving %s", self.uri, latest, exc,
                            current.version)
                return False
            self._reader = new  # one reference swap: a request holds the reader it started with
            self.switches.append((current.version, latest, time.perf_counter() - started))
            log.info("store %s: now serving %s (was %s)", self.uri, latest, current.version)
            return True
        finally:
            self._check_lock.release()
