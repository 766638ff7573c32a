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
    model_actors: int = option(1, help="model workers")
    cpus_per_actor: float = option(1.0, help="CPUs per model worker")
    users_per_bucket: int = option(4096, help="users per bucket (= shard)")
    poll_seconds: float = option(0.5, help="how often the object store's use is read")
    seed: int = option(0, help="seed of the synthetic users")
    json: str = option("docs/figures/bench-scale.json", help="where the figures are written ('' = print only)")
    ray: RayConfig = dataclasses.field(default_factory=lambda: RayConfig(progress_bars=False),
                                       metadata={"help": "Ray connection"})

    def __post_init__(self) -> None:
        check(self.users >= 2 and self.pairs >= 2 and self.items >= 2, "users, pairs and items must be >= 2")


def tiny_model(folder: Path) -> str:
    """A randomly initialised 4-layer Llama with the packaged default model's tokenizer, saved once.

    Its special and whitespace-only tokens' embeddings are zero (the LM head is tied), so greedy
    decoding never picks them and the neutral answers SteerX's style vectors need are not empty.
    """
    if (folder / ".steerstore-bench-model").exists():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from steerstore.operators.runtime.sources import DEFAULT_MODEL, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    # special and whitespace-only tokens get logit 0, below the largest random logit: never the argmax,
    # so the random model writes (meaningless) visible text
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.model.embed_tokens.weight[blank] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / ".steerstore-bench-model").touch()
    return str(folder)


def write_inputs(config: BenchScaleConfig, folder: Path) -> dict[str, str]:
    """Synthetic JSONL inputs, written a user at a time (the bench's own memory stays small)."""
    pairs, histories = folder / "pairs.jsonl", folder / "histories.jsonl"
    stamp = folder / f".users-{config.users}-{config.pairs}-{config.items}-{config.words}-{config.seed}"
    if not stamp.exists():
        rng = random.Random(config.seed)

        def text() -> str:
            return " ".join(rng.choice(WORDS) for _ in range(config.words)).capitalize() + "."

        with open(pairs, "w") as fp, open(histories, "w") as fh:
            for u in range(config.users):
                uid = f"user-{u:07d}"
                for k in range(config.pairs):
                    fp.write(json.dumps({"user_id": uid, "pair_id": f"{uid}-p{k}", "prompt": "Say something.",
                                         "chosen": text(), "rejected": text()}) + "\n")
                for k in range(config.items):
                    fh.write(json.dumps({"user_id": uid, "item_id": f"{uid}-h{k}", "input": "Write a line.",
                                         "output": text(), "timestamp": k}) + "\n")
        stamp.touch()
    return {"preference_pairs": str(pairs), "histories": str(histories)}


class ObjectStorePeak:
    """Polls the object store's use (total − available ``object_store_memory``) in a thread."""

    def __init__(self, every: float):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import ray

        while not self._stop.is_set():
            if ray.is_initialized():
                try:
                    total = ray.cluster_resources().get("object_store_memory", 0)
                    free = ray.available_resources().get("object_store_memory", total)
                    self.peak = max(self.peak, int(total - free))
                except Exception:  # noqa: BLE001 — a poll during shutdown
                    pass
            self._stop.wait(self.every)

    def __enter__(self) -> "ObjectStorePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(config: BenchScaleConfig) -> dict:
    from steerstore.jobs import refresh

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out / "tiny-model")
    started = time.perf_counter()
    inputs = write_inputs(config, out)
    inputs_seconds = time.perf_counter() - started
    cfg = from_dict(refresh.RefreshConfig, {
        "inputs": inputs, "output": {"store": str(out / "store"), "users_per_bucket": config.users_per_bucket},
        "model": {"name_or_path": model, "max_batch_tokens": 4096}, "ray": dataclasses.asdict(config.ray),
        "caa": {"layers": [1, 2], "recommended_layers": [2]}, "bt": {"k": 2, "sample_users": 256},
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
              "peak_object_store_bytes": peak.peak, "model_loads": workers["model_loads"],
              "model_workers": workers["workers"], "busy_fraction": workers["busy_fraction"],
              "stage_seconds": summary["stage_seconds"], "shards": summary["shards"],
              "users_stored": summary["users_stored"], "users_by_method": summary["users_by_method"],
              "inputs_seconds": round(inputs_seconds, 1)}
    write_figures(result, config.json)
    return result
