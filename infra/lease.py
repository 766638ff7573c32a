"""One writer at a time: a lease on the store, ``<store>/_lease.json``, taken and renewed with conditional writes.

- **Take**: create the lease object only if it is absent (``If-None-Match: *``), or replace a
  released one only if it is unchanged (``If-Match``).
- **Hold**: a heartbeat thread rewrites it every ``ttl_s / 5`` seconds, each time only if it is
  still the object this holder wrote last; if that fails, another job took the lease over (this one
  was presumed dead) and the holder is told at its next ``check()``: it must not publish.
- **Take over** a lease whose holder died: a contender watches the lease and, once its content has
  not changed for ``ttl_s`` seconds *of the contender's own monotonic clock*, replaces it (again
  only if unchanged). No clock of two machines is ever compared.
- **Release**: rewrite it as released (conditional), so the next job takes it at once.

Under the lease the store hands out version sequence numbers (``SteeringStore.next_version_id``),
so version order never depends on a driver's clock. Stores without conditional writes
(``storage.conditional_writes=false``) get a check-write-read-back instead (docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from steerstore.infra.config import check, option
from steerstore.infra.conditional import PreconditionFailed, read_tagged, write_if
from steerstore.infra.storage import StorageConfig, join

log = logging.getLogger("steerstore")


@dataclass
class LeaseConfig:
    ttl_s: float = option(300.0, help="a lease not renewed for this long (as a contender measures it) may be taken over")
    wait_s: float = option(
        900.0, help="how long a job waits for the store's lease before failing (above ttl_s, so a dead holder's "
                    "lease is taken over)")
    poll_s: float = option(10.0, help="how often a waiting job looks at the lease")

    def __post_init__(self) -> None:
        check(self.ttl_s > 0 and self.wait_s >= 0 and self.poll_s > 0, "lease: ttl_s, poll_s > 0 and wait_s >= 0")


class LeaseHeld(RuntimeError):
    """Another job holds the store's lease (and kept renewing it while this one waited)."""


class LeaseLost(RuntimeError):
    """This job's lease was taken over (its heartbeat stalled for longer than the TTL): it must not publish."""


class StoreLease:
    """The store's writer lease. Use as a context manager, or ``acquire()`` / ``release()``."""

    def __init__(self, store_uri: str, storage: StorageConfig | None = None, config: LeaseConfig | None = None,
                 purpose: str = "refresh"):
        self.uri = join(store_uri, "_lease.json")
        self.storage = storage or StorageConfig()
        self.config = config or LeaseConfig()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.purpose = purpose
        self._tag: str | None = None
        self._renewals = 0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({"holder": self.holder, "purpose": self.purpose, "ttl_s": self.config.ttl_s,
                           "renewals": self._renewals, "released": released}, sort_keys=True).encode()

    def acquire(self) -> "StoreLease":
        cfg = self.config
        start = time.monotonic()
        seen: tuple[str, float] | None = None  # (tag, when this contender first saw it)
        while True:
            current = read_tagged(self.uri, self.storage)
            try:
                if current is None:
                    self._tag = write_if(self.uri, self._body(), None, self.storage)
                    break
                body, tag = current
                info = _parse(body)
                if info.get("released"):
                    self._tag = write_if(self.uri, self._body(), tag, self.storage)
                    break
                now = time.monotonic()
                if seen is None or seen[0] != tag:
                    seen = (tag, now)
                elif now - seen[1] >= float(info.get("ttl_s", cfg.ttl_s)):
                    log.warning("lease: %s was not renewed for %.0f s; taking it over from %s", self.uri,
                                now - seen[1], info.get("holder"))
                    self._tag = write_if(self.uri, self._body(), tag, self.storage)
                    break
            except PreconditionFailed:
                seen = None  # someone else moved first: look again
                continue
            if time.monotonic() - start >= cfg.wait_s:
                raise LeaseHeld(f"the store's lease {self.uri} is held by {info.get('holder')} ({info.get('purpose')}), "
                                f"renewed while this job waited {cfg.wait_s:g} s: another job writes this store. "
                                "Wait for it to finish; a dead holder's lease is taken over after lease.ttl_s")
            time.sleep(min(cfg.poll_s, max(0.05, cfg.wait_s - (time.monotonic() - start))))
        log.info("lease: %s held by %s", self.uri, self.holder)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="steerstore-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.ttl_s / 5):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 — storage trouble: try again at the next beat
                log.warning("lease: could not renew %s: %s", self.uri, exc)

    def renew(self) -> None:
        """Rewrite the lease if it is still ours; LeaseLost otherwise."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            self._renewals += 1
            try:
                self._tag = write_if(self.uri, self._body(), self._tag, self.storage)
            except PreconditionFailed:
                self._lost = (f"the store's lease {self.uri} was taken over by another job while this one held it "
                              "(its renewals stalled for longer than lease.ttl_s): this job stops without publishing")
                raise LeaseLost(self._lost) from None

    def check(self) -> None:
        """Renew now (before publishing, say): LeaseLost if another job took the lease."""
        self.renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self._lost or self._tag is None:
                return
            try:
                write_if(self.uri, self._body(released=True), self._tag, self.storage)
            except PreconditionFailed:
                pass  # taken over meanwhile: nothing of ours to release
            except Exception as exc:  # noqa: BLE001 — the lease then expires after its TTL
                log.warning("lease: could not release %s (it expires after %g s): %s", self.uri,
                            self.config.ttl_s, exc)
            self._tag = None

    def __enter__(self) -> "StoreLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(body: bytes) -> dict:
    try:
        value = json.loads(body)
        return value if isinstance(value, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}
