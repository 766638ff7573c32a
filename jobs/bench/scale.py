"""Scale benchmark: the real refresh on N synthetic users, on embedded Ray, with a tiny random model.

Launch: ``steerstore bench scale --users 10000 --json docs/figures/bench-scale-10k.json``.

Every user has ``pairs`` preference pairs and ``items`` short history items, so the model work is
small and what is measured is the pipeline: whether driver memory, object-store memory and
throughput stay flat as N grows, and whether each worker loads its model once. All methods run
(CAA, BT, DPS with clusters and the population baseline, SteerX anchors and style vectors);
SteerX descriptions are off, because a random model writes no sentence that passes validation
(``bench steerx`` measures the smoothing LLM).

Figures: ``users``, ``seconds``, ``users_per_second``, ``peak_driver_rss_bytes`` (this process's
peak RSS, the driver), ``peak_object_store_bytes`` (the object store's use, polled every
``poll_seconds``), ``model_loads`` and the model workers' busy fraction per stage, with the
refresh's own stage seconds.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from steerstore.infra.cluster import RayConfig
from steerstore.infra.config import check, from_dict, option
from steerstore.jobs.bench.common import write_figures

WORDS = ("sun rain wind tea bread river stone music quiet bright happy calm brief formal wow great fine "
         "city garden book letter morning evening road light dark warm cold small large").split()


@dataclass
class BenchScaleConfig:
    users: int = option(10_000, help="synthetic users")
    pairs: int = option(2, help="preference pairs per user")
    items: int = option(2, help="history items per user")
    words: int = option(6, help="words per response and history output")
    out: str = option("./steerstore-out/bench-scale", help="folder for the inputs, the tiny model and the store")
    model_actors: int = option(2, help="model workers (each uses cpus_per_actor cores)")
    cpus_per_actor: float = option(1.0, help="CPUs per model worker")
    users_per_bucket: int = option(4096, help="users per bucket (= shard)")
    vector_dtype: str = option("float32", help="output.vector_dtype: float32 or float16")
    poll_seconds: float = option(0.5, help="how often the object store's use is read")
    seed: int = option(0, help="seed of the synthetic users")
    sample_users: int = option(256, help="bt.sample_users: users behind the population direction and basis")
    changed: float = option(
        0.0, help="then a second night on the same store with this share of users changed (one pair and one "
                  "history item each): the incremental refresh, measured against the first (full) night")
    json: str = option("docs/figures/bench-scale.json", help="where the figures are written ('' = print only)")
    ray: RayConfig = dataclasses.field(default_factory=lambda: RayConfig(progress_bars=False),
                                       metadata={"help": "Ray connection"})

    def __post_init__(self) -> None:
        check(self.users >= 2 and self.pairs >= 2 and self.items >= 2, "users, pairs and items must be >= 2")
        check(0.0 <= self.changed <= 1.0, "changed must be in [0, 1]")


def tiny_model(folder: Path) -> str:
    """A tiny random 4-layer Llama with a few-hundred-token tokenizer that knows the synthetic words, saved once.

    The small vocabulary keeps the LM head from dominating (it would with a 49k-token vocabulary
    on a 64-wide model): what the benchmark measures is the pipeline around the model.
    """
    if not (folder / ".steerstore-bench-model").exists():
        from steerstore.operators.runtime.tiny import save_tiny

        save_tiny(folder, corpus=[" ".join(WORDS).capitalize() + ".", "Say something.", "Write a line."])
        (folder / ".steerstore-bench-model").touch()
    return str(folder)


def write_inputs(config: BenchScaleConfig, folder: Path, changed: float = 0.0) -> dict[str, str]:
    """Synthetic JSONL inputs, written a user at a time (the bench's own memory stays small).

    ``changed``: a seeded share of users gets one pair and one history item rewritten (a later night).
    """
    folder.mkdir(parents=True, exist_ok=True)
    pairs, histories = folder / "pairs.jsonl", folder / "histories.jsonl"
    stamp = folder / f".users-{config.users}-{config.pairs}-{config.items}-{config.words}-{config.seed}-{changed}"
    if not stamp.exists():
        rng = random.Random(config.seed)
        pick = random.Random(config.seed + 1)

        def text() -> str:
            return " ".join(rng.choice(WORDS) for _ in range(config.words)).capitalize() + "."

        with open(pairs, "w") as fp, open(histories, "w") as fh:
            for u in range(config.users):
                uid = f"user-{u:07d}"
                edit = " Changed." if pick.random() < changed else ""
                for k in range(config.pairs):
                    fp.write(json.dumps({"user_id": uid, "pair_id": f"{uid}-p{k}", "prompt": "Say something.",
                                         "chosen": text() + (edit if k == 0 else ""), "rejected": text()}) + "\n")
                for k in range(config.items):
                    fh.write(json.dumps({"user_id": uid, "item_id": f"{uid}-h{k}", "input": "Write a line.",
                                         "output": text() + (edit if k == 0 else ""), "timestamp": k}) + "\n")
        stamp.touch()
    return {"preference_pairs": str(pairs), "histories": str(histories)}


class ObjectStorePeak:
    """Polls the object store's use (total − available ``object_store_memory``) in a thread."""

    def __init__(self, every: float):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes in use)
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import ray

        while not self._stop.is_set():
            if ray.is_initialized():
                try:
                    total = ray.cluster_resources().get("object_store_memory", 0)
                    free = ray.available_resources().get("object_store_memory", total)
                    used = int(total - free)
                    self.peak = max(self.peak, used)
                    self.samples.append((time.perf_counter() - self._start, used))
                except Exception:  # noqa: BLE001 — a poll during shutdown
                    pass
            self._stop.wait(self.every)

    def __enter__(self) -> "ObjectStorePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def by_stage(self, stage_seconds: dict[str, float]) -> dict[str, int]:
        """The peak within each stage (stages are consecutive, in the order the refresh ran them)."""
        out, start = {}, 0.0
        for stage, seconds in stage_seconds.items():
            end = start + seconds
            out[stage] = max((u for t, u in self.samples if start <= t < end), default=0)
            start = end
        return out


def _bytes_per_user(store_uri: str, users: int) -> dict[str, float]:
    """Bytes of each per-user table's files over the stored users (the latest version)."""
    import os

    from steerstore.infra.store import SteeringStore

    store = SteeringStore(store_uri)
    version = store.latest()
    return {t: round(sum(os.path.getsize(f) for f in store.table_files(version, t)) / max(users, 1), 1)
            for t in ("vectors", "users", "bt_coords", "dps_heads", "steerx_users")}


def main(config: BenchScaleConfig) -> dict:
    from steerstore.jobs import refresh

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out / "tiny-model")
    shutil.rmtree(out / "store", ignore_errors=True)  # the first night is a full one
    started = time.perf_counter()
    inputs = write_inputs(config, out)
    inputs_seconds = time.perf_counter() - started
    cfg = from_dict(refresh.RefreshConfig, {
        "inputs": inputs, "output": {"store": str(out / "store"), "users_per_bucket": config.users_per_bucket,
                                     "vector_dtype": config.vector_dtype},
        "model": {"name_or_path": model, "max_batch_tokens": 4096}, "ray": dataclasses.asdict(config.ray),
        "caa": {"layers": [1, 2], "recommended_layers": [2]}, "bt": {"k": 2, "sample_users": config.sample_users},
        "scale": {"sample_pairs": 8, "grid": [1.0, 2.0]},
        "dps": {"mode": "fast", "top_k": 2, "candidates": 4, "clusters": 2, "baseline_users": 4,
                "cluster_sample_users": 256, "history": {"context_items": 1}},
        "steerx": {"min_anchors": 1, "pool_users": 4, "history": {"context_items": 1}, "smoothing": {"enabled": False},
                   "vectors": {"layers": [2], "source": "history", "calibration_users": 4, "gamma_grid": [1.0],
                               "neutral_max_new_tokens": 4}},
        "resources": {"model_actors": config.model_actors, "cpus_per_actor": config.cpus_per_actor,
                      "caa_batch_size": 64, "dps_batch_size": 16}})
    with ObjectStorePeak(config.poll_seconds) as peak:
        started = time.perf_counter()
        summary = refresh.main(cfg)
        seconds = time.perf_counter() - started
    workers = summary["workers"]
    result = {"users": config.users, "pairs_per_user": config.pairs, "items_per_user": config.items,
              "seconds": round(seconds, 1), "users_per_second": round(config.users / seconds, 1),
              "peak_driver_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "peak_object_store_bytes": peak.peak,
              "peak_object_store_bytes_by_stage": peak.by_stage(summary["stage_seconds"]),
              "model_loads": workers["model_loads"],
              "model_workers": workers["workers"], "busy_fraction": workers["busy_fraction"],
              "stage_seconds": summary["stage_seconds"], "shards": summary["shards"],
              "users_stored": summary["users_stored"], "users_by_method": summary["users_by_method"],
              "inputs_seconds": round(inputs_seconds, 1), "vector_dtype": config.vector_dtype,
              "store_bytes_per_user": _bytes_per_user(str(out / "store"), summary["users_stored"]),
              "sample_users": config.sample_users, "population_drift": summary.get("population_drift")}
    if config.changed > 0:
        result["incremental"] = _second_night(config, cfg, out, seconds)
    write_figures(result, config.json)
    if config.json and "://" not in config.json:
        render_table(Path(config.json).parent)
    return result


def _second_night(config: BenchScaleConfig, cfg, out: Path, full_seconds: float) -> dict:
    """The same users with ``config.changed`` of them changed, on the store the first night wrote."""
    from steerstore.jobs import refresh

    cfg.inputs.preference_pairs, cfg.inputs.histories = write_inputs(config, out / "night2", config.changed).values()
    started = time.perf_counter()
    summary = refresh.main(cfg)
    seconds = time.perf_counter() - started
    inc = summary["incremental"]
    return {"changed_share": config.changed, "seconds": round(seconds, 1), "why": {
                f: d["reason"] for f, d in inc["global_statistics"].items() if d["action"] == "computed"},
            "users_per_second": round(config.users / seconds, 1),
            "speedup_over_full_night": round(full_seconds / seconds, 2),
            "users_computed": summary["workers"]["users_computed"], "users": inc["users"],
            "global_statistics": {f: d["action"] for f, d in inc["global_statistics"].items()},
            "stage_seconds": summary["stage_seconds"]}


def _incremental_cell(d: dict) -> str:
    inc = d.get("incremental")
    if not inc:
        return "—"
    again = [f for f, a in inc.get("global_statistics", {}).items() if a == "computed"]
    return (f"{inc['changed_share']:.0%}, {inc['seconds']:,.0f} s ({inc['speedup_over_full_night']:.2f}×)"
            + (f"; {', '.join(again)} statistics recomputed" if again else "; statistics frozen"))


def render_table(folder: Path) -> Path:
    """``bench-scale.md`` beside the figure files: one row per ``bench-scale*.json`` there, by users and dtype."""
    rows = []
    for f in sorted(folder.glob("bench-scale*.json")):
        d = json.loads(f.read_text())
        if "users_per_second" in d:
            rows.append((d["users"], d.get("vector_dtype", "float32"), f.name, d))
    lines = ["| users | dtype | seconds | users/s | driver peak RSS | object store peak (shards phase / model pass) "
             "| model loads / workers | busy: user pass / description pass / sample | vectors bytes per user "
             "| incremental night: changed, seconds (speedup) | file |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for users, dtype, name, d in sorted(rows, key=lambda r: (r[0], r[1])):
        stages = d.get("peak_object_store_bytes_by_stage", {})
        busy = d.get("busy_fraction", {})
        lines.append(
            f"| {users:,} | {dtype} | {d['seconds']:,.0f} | {d['users_per_second']:.1f} "
            f"| {d['peak_driver_rss_bytes'] / 2**20:,.0f} MiB "
            f"| {stages.get('shards', 0) / 2**20:,.1f} / {stages.get('model pass', 0) / 2**20:,.1f} MiB "
            f"| {d['model_loads']} / {d['model_workers']} "
            f"| {busy.get('user_pass', 0):.2f} / {busy.get('description_pass', 0):.2f} / {busy.get('sample', 0):.2f} "
            f"| {d.get('store_bytes_per_user', {}).get('vectors', 0):,.0f} | {_incremental_cell(d)} | [{name}]({name}) |")
    out = folder / "bench-scale.md"
    out.write_text("Generated by `steerstore bench scale` from the `bench-scale*.json` files beside it.\n\n"
                   + "\n".join(lines) + "\n")
    return out
