"""Readers that follow the nightly versions (``infra/follow.py``)."""

from __future__ import annotations

import threading

import numpy as np

from steerstore.infra.follow import StoreFollower
from steerstore.infra.reader import StoreReader
from steerstore.jobs.bench import serving as bench_serving

META = {"layers": [3, 4], "recommended": [4], "hidden": 8, "k": 2, "norm": 4.0, "num_layers": 6, "num_heads": 4,
        "group": 2, "model_id": "synthetic", "fingerprint": "sha256:x", "name_or_path": "synthetic",
        "model_config": {}}


def _publish(uri: str, seed: int, fingerprint: str = "sha256:x") -> str:
    version, _ = bench_serving.synthetic_store(uri, None, 40, {**META, "fingerprint": fingerprint}, seed,
                                               users_per_bucket=16, row_group_bytes=1024)
    return version


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_follower_moves_to_each_new_version_at_its_interval_and_a_request_stays_on_its_version(tmp_path):
    uri = str(tmp_path / "store")
    v1 = _publish(uri, seed=0)
    clock = Clock()
    follower = StoreFollower(uri, interval_s=30, clock=clock)
    first = follower.current()
    assert first.version == follower.version == v1
    before = first.vectors(["user-0000007"])["user-0000007"].vectors

    v2 = _publish(uri, seed=1)
    clock.now = 29.0
    assert follower.current() is first  # not checked before the interval
    clock.now = 30.0
    second = follower.current()
    assert second.version == v2 and follower.switches[-1][:2] == (v1, v2)
    after = second.vectors(["user-0000007"])["user-0000007"].vectors
    np.testing.assert_array_equal(after, StoreReader(uri, version=v2).vectors(["user-0000007"])["user-0000007"].vectors)
    assert not np.allclose(after, before)
    # a request that took the old reader is still served wholly from the old version
    np.testing.assert_array_equal(first.vectors(["user-0000007"])["user-0000007"].vectors, before)
    assert follower.check() is False  # nothing newer


def test_a_version_built_from_other_weights_is_never_switched_to(tmp_path):
    uri = str(tmp_path / "store")
    _publish(uri, seed=0)
    follower = StoreFollower(uri, interval_s=0)
    v2 = _publish(uri, seed=1)
    assert follower.current().version == v2
    v3 = _publish(uri, seed=2, fingerprint="sha256:other-weights")
    assert follower.current().version == v2 and follower.check() is False
    assert v3 in follower.refused and "sha256:other-weights" in follower.refused[v3]
    v4 = _publish(uri, seed=3)  # the next night is built from the right weights again
    assert follower.current().version == v4


def test_an_explicit_fingerprint_is_checked_from_the_first_version(tmp_path):
    import pytest

    from steerstore.infra.reader import FingerprintMismatch

    uri = str(tmp_path / "store")
    _publish(uri, seed=0)
    with pytest.raises(FingerprintMismatch):
        StoreFollower(uri, fingerprint="sha256:served")
    assert StoreFollower(uri, fingerprint="sha256:x").fingerprint == "sha256:x"


def test_a_storage_error_while_checking_keeps_the_current_version(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    v1 = _publish(uri, seed=0)
    clock = Clock()
    follower = StoreFollower(uri, interval_s=30, clock=clock)
    _publish(uri, seed=1)

    def down(*a, **k):
        raise OSError("connection refused")
    monkeypatch.setattr(follower.current().store, "latest", down)
    clock.now = 30.0
    assert follower.current().version == v1 and follower.check() is False
    monkeypatch.undo()
    assert follower.check() is True and follower.version != v1


def test_concurrent_requests_during_a_switch_each_see_one_whole_version(tmp_path):
    uri = str(tmp_path / "store")
    v1 = _publish(uri, seed=0)
    follower = StoreFollower(uri, interval_s=0)
    expected = {v1: StoreReader(uri, version=v1).vectors(["user-0000003"])["user-0000003"].vectors}
    seen, errors = [], []

    def request():
        try:
            reader = follower.current()
            vec = reader.vectors(["user-0000003"])["user-0000003"].vectors
            seen.append((reader.version, vec))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads[:4]:
        t.start()
    v2 = _publish(uri, seed=1)
    expected[v2] = StoreReader(uri, version=v2).vectors(["user-0000003"])["user-0000003"].vectors
    for t in threads[4:]:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 8
    for version, vec in seen:
        np.testing.assert_array_equal(vec, expected[version])
    assert follower.current().version == v2
