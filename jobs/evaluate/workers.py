"""Steps 3–4 on Ray actors: each worker loads the model (and the metric scorers) once for the run and
decodes and scores chunks of planned rows, every method of a chunk in one mixed batch.

A chunk holds all settings of a few held-out items (no personalisation, history in prompt, every
vector method and strength, influence, DPS), decoded together through the serving path
(``plan_requests`` then one ``generate`` call with per-row steering, head contrast and influence),
then scored in the same worker: text metrics against the target and the output's NLL under the
unsteered model. Content drift (BERTScore against the unsteered answer to the same prompt) is scored
once every row is back, its pairs spread over the same workers. ``actors: 0`` runs the same worker code in the driver process (the reference path
the tests compare the actors with).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd

from steerstore.infra.cluster import connect
from steerstore.infra.reader import StoreReader
from steerstore.infra.storage import StorageConfig
from steerstore.jobs import refresh
from steerstore.jobs.evaluate.config import EvalConfig, MethodsConfig
from steerstore.jobs.evaluate.score import anchor_word_effects, content_drift, preference_accuracy, score_items
from steerstore.jobs.evaluate.split import Split
from steerstore.operators.metrics import MetricsConfig, text_metrics
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.serving import Request, decode_plan, plan_requests

log = logging.getLogger("steerstore.eval")

# planned-row fields that say how to decode a row; not part of the evaluation's items table
PLAN_FIELDS = ("serve", "scale", "source", "context", "template", "layers", "order")


def chunks(rows: list[dict], size: int) -> list[list[dict]]:
    """Planned rows in chunks of at most ``size``, each holding whole held-out items (every setting of an item
    together; an item with more settings than ``size`` is split), tagged with their planned position."""
    items: dict[tuple, list[dict]] = {}
    for k, r in enumerate(rows):
        items.setdefault((r["user_id"], r["item_id"]), []).append(dict(r, order=k))
    out: list[list[dict]] = []
    for key in sorted(items):
        group = items[key]
        if out and len(out[-1]) + len(group) <= size:
            out[-1].extend(group)
            continue
        out.extend(group[i:i + size] for i in range(0, len(group), size))
    return out


class EvalWorker:
    """One model (loaded once) that decodes and scores planned rows of one store version."""

    def __init__(self, model: ModelConfig, metrics: MetricsConfig, methods: MethodsConfig,
                 runtime: ModelRuntime | None = None):
        self.runtime = runtime or ModelRuntime(model)
        self.metrics, self.methods = metrics, methods
        self.reader: StoreReader | None = None

    def fingerprint(self) -> str:
        return self.runtime.fingerprint

    def open(self, store: str, version: str, storage: StorageConfig) -> None:
        """Serve rows from this store version (its weights must be this worker's: checked)."""
        self.reader = StoreReader(store, storage, version)
        self.reader.check_model(self.runtime.fingerprint, "the evaluation model")

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Unsteered greedy answers (the neutral side of built preference pairs)."""
        return self.runtime.generate(prompts, max_new_tokens)

    def decode(self, rows: list[dict]) -> tuple[list[str], list[str]]:
        """(outputs, the prompts decoded) of planned rows, all in one mixed batch."""
        if self.reader is None:
            raise RuntimeError("EvalWorker.open(store, version) first")
        requests = [Request(r["user_id"], r["prompt"], r["serve"], r["scale"], r["source"] or None, r.get("layers"))
                    for r in rows]
        plan, served = plan_requests(self.reader, requests)
        for i, r in enumerate(rows):
            if r.get("context") is not None:  # a τ-sweep row: the description from a side store
                if plan.template not in (None, r["template"]):
                    raise ValueError("influence rows of one batch must share the style template")
                plan.template, plan.contexts[i], plan.lam[i] = r["template"], r["context"], float(r["scale"])
                continue
            want = {"none": "none", "population": "population"}.get(r["serve"], "user")
            if served[i].applied != want:  # the planner only plans users with the artifact: never a fallback
                raise RuntimeError(f"{r['method']} for user {r['user_id']!r} was served {served[i].applied!r} "
                                   f"instead of the user's own artifact: {served[i].note}")
        m = self.methods
        influence = plan.influence(m.influence_temperature, m.influence_plausibility)
        prompts = [r["prompt"] for r in rows]
        outputs = decode_plan(self.runtime, prompts, plan, m.max_new_tokens, None, influence)
        return outputs, (influence.with_context(prompts) if influence is not None else prompts)

    def run(self, rows: list[dict]) -> list[dict]:
        """Decode then score a chunk of planned rows; each comes back with its output and scores."""
        start = time.perf_counter()
        outputs, shown = self.decode(rows)
        items = pd.DataFrame(rows)
        items["output"] = outputs
        scored = score_items(items, self.runtime, self.metrics)  # fluency given the planned prompt
        scored["prompt"] = shown  # influence: the with-context prompt it was shown too
        log.info("eval worker: %d rows decoded and scored in %.1f s", len(rows), time.perf_counter() - start)
        return scored.to_dict("records")

    def bertscore(self, pairs: list[tuple[str, str]]) -> list[float]:
        """BERTScore F1 of (output, reference) pairs (content drift against the unsteered answers)."""
        return text_metrics([p for p, _ in pairs], [r for _, r in pairs], self.metrics,
                            which=("bertscore",))["bertscore"].tolist()

    def preference(self, pairs: list[dict], include: list[str],
                   train: dict[str, list[dict]] | None = None) -> tuple[pd.DataFrame, dict]:
        return preference_accuracy(self.runtime, self.reader, pairs, self.metrics, include, train,
                                   self.methods.history_context)

    def anchor_effects(self, split: Split):
        return anchor_word_effects(self.reader, self.runtime, split)


class Workers:
    """``config.actors`` EvalWorker actors on Ray (0: one EvalWorker in this process)."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.local: EvalWorker | None = None
        self.handles: list = []
        if config.actors == 0:
            self.local = EvalWorker(config.model, config.metrics, config.methods)
            return
        import ray

        res = config.resources
        # embedded Ray is sized once per process: for these actors and for the refresh the job may run next
        connect(config.ray, min_cpus=max(math.ceil(res.cpus_per_actor * config.actors), refresh.cpus_needed(res)))
        actor = ray.remote(EvalWorker).options(num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor,
                                               max_restarts=0, scheduling_strategy="SPREAD")
        self.handles = [actor.remote(config.model, config.metrics, config.methods) for _ in range(config.actors)]

    def _all(self, method: str, *args) -> list:
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        import ray

        return ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def _first(self, method: str, *args):
        if self.local is not None:
            return getattr(self.local, method)(*args)
        import ray

        return ray.get(getattr(self.handles[0], method).remote(*args))

    def fingerprint(self) -> str:
        return self._first("fingerprint")

    def open(self, store: str, version: str, storage: StorageConfig) -> None:
        self._all("open", store, version, storage)

    def _map(self, method: str, chunks: list, *args) -> list:
        """``method(chunk, *args)`` for every chunk, spread over the workers as each finishes one (in order)."""
        if self.local is not None:
            return [getattr(self.local, method)(c, *args) for c in chunks]
        from ray.util import ActorPool

        return list(ActorPool(self.handles).map(lambda a, c: getattr(a, method).remote(c, *args), chunks))

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Unsteered greedy answers, the prompts split evenly over the workers."""
        size = max(1, math.ceil(len(prompts) / max(1, len(self.handles))))
        parts = self._map("generate", [prompts[i:i + size] for i in range(0, len(prompts), size)], max_new_tokens)
        return [t for part in parts for t in part]

    def run(self, rows: list[dict]) -> list[dict]:
        """Decode and score planned rows in chunks of ``batch_rows`` holding all settings of a few items."""
        done = [r for part in self._map("run", chunks(rows, self.config.batch_rows)) for r in part]
        done.sort(key=lambda r: r["order"])
        return [{k: v for k, v in r.items() if k not in PLAN_FIELDS} for r in done]

    def drift(self, items: pd.DataFrame) -> np.ndarray:
        """Content drift of every scored row (``content_drift``), the BERTScore pairs spread over the workers."""
        def bertscore(outputs: list[str], references: list[str]) -> list[float]:
            pairs = list(zip(outputs, references))
            size = max(1, self.config.batch_rows)
            return [f for part in self._map("bertscore", [pairs[i:i + size] for i in range(0, len(pairs), size)])
                    for f in part]
        return content_drift(items, bertscore)

    def preference(self, pairs: list[dict], include: list[str],
                   train: dict[str, list[dict]] | None = None) -> tuple[pd.DataFrame, dict]:
        return self._first("preference", pairs, include, train)

    def anchor_effects(self, split: Split):
        return self._first("anchor_effects", split)

    def close(self) -> None:
        """Let the actors (and their models) go: e.g. before a refresh whose own actors need the slots."""
        if self.handles:
            import ray

            for h in self.handles:
                ray.kill(h)
        self.handles, self.local = [], None
