"""A fixed pool of long-lived model workers (Ray actors), each loading its model once for the whole run."""

from __future__ import annotations

import logging

import pyarrow as pa

from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.jobs.refresh.workers import ModelWorker
from steerstore.operators.runtime import ModelConfig

log = logging.getLogger("steerstore")


class Pool:
    """``size`` ModelWorker actors for ``model``, scheduled with the job's resources (GPUs, CPUs per actor)."""

    def __init__(self, config: RefreshConfig, model: ModelConfig, size: int, name: str = "model",
                 globals_uri: str | None = None):
        import ray

        res = config.resources
        actor = ray.remote(ModelWorker).options(
            num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor, max_restarts=res.actor_restarts,
            max_task_retries=res.actor_restarts, scheduling_strategy="SPREAD")  # across nodes, not packed on one
        self.name = name
        self.handles = [actor.remote(config, model, globals_uri) for _ in range(size)]
        self.info = ray.get(self.handles[0].info.remote())

    def __len__(self) -> int:
        return len(self.handles)

    def worker(self, key: int):
        return self.handles[key % len(self.handles)]

    def call_all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def first(self, method: str, *args, **kwargs):
        import ray

        return ray.get(getattr(self.handles[0], method).remote(*args, **kwargs))

    def by_bucket(self, method: str, selection: dict[int, tuple[str, list[str]]]) -> list:
        """``method(parts)`` on each worker with the selections of the buckets it owns (bucket mod size)."""
        import ray

        parts: dict[int, list] = {}
        for bucket, part in sorted(selection.items()):
            parts.setdefault(bucket % len(self.handles), []).append((bucket, *part))
        return ray.get([getattr(self.handles[w], method).remote(p) for w, p in sorted(parts.items())])

    def by_bucket_refs(self, method: str, selection: dict[int, tuple[str, list[str]]]) -> list:
        """As ``by_bucket``, returning the result references (for a task to reduce, not the driver)."""
        parts: dict[int, list] = {}
        for bucket, part in sorted(selection.items()):
            parts.setdefault(bucket % len(self.handles), []).append((bucket, *part))
        return [getattr(self.handles[w], method).remote(p) for w, p in sorted(parts.items())]

    def spread_selection(self, method: str, selection: dict[int, tuple[str, list[str]]]) -> list:
        return self.by_bucket(method, selection)

    def spread(self, method: str, rows: pa.Table, **kwargs) -> list:
        """``method`` on contiguous slices of ``rows``, one per worker; results in slice order."""
        import ray

        n = min(len(self.handles), max(rows.num_rows, 1))
        step = -(-rows.num_rows // n) if rows.num_rows else 0
        refs = [getattr(self.handles[i], method).remote(rows.slice(i * step, step), **kwargs)
                for i in range(n) if rows.num_rows == 0 or i * step < rows.num_rows]
        return ray.get(refs)

    def stats(self) -> list[dict]:
        return self.call_all("stats")

    def shutdown(self) -> None:
        import ray

        for h in self.handles:
            ray.kill(h)
        self.handles = []
