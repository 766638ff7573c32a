"""Phase 3: every shard through the model workers and into the store, streaming, with at most a few in flight.

Per shard: the user pass on a model worker → descriptions on a generation worker (the same
worker when the smoothing LLM is the job's model) → the description pass on the first worker →
the recommend pass (each user's method and strength, on its held-out items) on the same worker → the
writer task, which writes the shard's bucket files and its completion marker. The driver
only moves references between these steps; shard state flows worker to worker through the
object store, and each worker has at most ``resources.shards_in_flight`` shards at a time, so
memory stays flat however many shards there are. Shards that already have a marker (a resumed
run) are skipped.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from steerstore.jobs.refresh.common import Timer
from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.jobs.refresh.outputs import write_shard
from steerstore.jobs.refresh.pool import Pool
from steerstore.jobs.refresh.run import Run
from steerstore.jobs.refresh.workers import worker_globals

log = logging.getLogger("steerstore")


def run_shards(config: RefreshConfig, run: Run, buckets: list[int], pool: Pool, gen: Pool, g: dict,
               timer: Timer | None = None) -> dict:
    """Process every bucket without a marker; returns {"markers": [...], "reused": n, "computed": n}."""
    import ray

    markers = {b: run.read_json(run.marker_uri(b)) for b in buckets}
    reused = {b: m for b, m in markers.items() if m is not None}
    todo = deque(b for b in buckets if markers[b] is None)
    if reused:
        log.info("refresh: %d of %d shards reused from the interrupted run", len(reused), len(buckets))
    values = ray.put(worker_globals(g))
    g_ref = ray.put(g)
    pool.call_all("set_globals", values)
    if gen is not pool:
        gen.call_all("set_globals", values)
    writer = ray.remote(write_shard).options(num_cpus=1, max_retries=config.resources.shard_retries)
    describe = g["steerx_active"]
    vectors = g["steerx_active"] and config.steerx.vectors.enabled
    recommends = config.recommend.enabled and g.get("recommend") is not None
    depth = config.resources.shards_in_flight
    inflight = [0] * len(pool)
    pending: dict = {}  # ref -> (step, bucket, worker index)
    done: dict[int, dict] = {}
    started, total = time.perf_counter(), len(todo)

    def fill() -> None:
        for w in range(len(pool)):
            while todo and inflight[w] < depth:
                b = todo.popleft()
                ref = pool.worker(w).user_pass.remote(b, run.shard_uri(b), run.staging)
                pending[ref] = ("user_pass", b, w)
                inflight[w] += 1

    fill()
    while pending:
        left = None if timer is None else timer.left()
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if left is None else max(left, 0.0))
        if not ready:
            for r in pending:
                ray.cancel(r)
            timer.check(f"the model pass ({len(done)} of {total} shards written)")
            continue
        ref = ready[0]
        step, b, w = pending.pop(ref)
        if step == "user_pass" and describe:
            nxt = (pool.worker(w) if gen is pool else gen.worker(b)).describe_shard.remote(ref)
            pending[nxt] = ("describe", b, w)
        elif step == "describe" and vectors:
            pending[pool.worker(w).description_pass.remote(ref)] = ("description_pass", b, w)
        elif step not in ("write", "recommend") and recommends:
            pending[pool.worker(w).recommend_pass.remote(ref)] = ("recommend", b, w)
        elif step != "write":
            pending[writer.remote(ref, run, config, g_ref)] = ("write", b, w)
        else:
            done[b] = ray.get(ref)
            inflight[w] -= 1
            if len(done) % max(1, total // 20) == 0 or len(done) == total:
                elapsed = time.perf_counter() - started
                log.info("refresh: %d/%d shards written (%.0f s, %.3g users/s)", len(done), total, elapsed,
                         sum(m["counts"]["users_in"] for m in done.values()) / max(elapsed, 1e-9))
            fill()
    return {"markers": [({**reused, **done})[b] for b in buckets], "reused": len(reused), "computed": len(done)}
